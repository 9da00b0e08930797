"""Kernel microbenchmark of the logits path: each token-statistics kernel alone, in GB/s and as a
fraction of the copy bandwidth measured in the same run.

    python benches/kernel_bench.py [--record FILE] [--calls N]

On a GPU, for the Triton launchers (``prefopt.kernels``) and the CUDA C++ ones
(``prefopt.cuda_ext``), bf16, every row scored, at 16384 x 128256, 16384 x 262144 and 512 x 128256:

- forward variants: ``logps`` (log-prob and lse only), ``entropy``, ``all`` (every statistic),
  ``entropy,softcap``; bytes moved: the logits read once;
- backward variants: ``logps`` and ``entropy`` (the upstream gradients of those outputs), out of
  place; bytes moved: the logits read once and the gradient written once.

The launchers are called directly (no autograd, no input checks), so each figure is one kernel's
launch (the CUDA forward's combine kernel included). Each time is the median of ``--calls`` CUDA-
event timings after warm-up, the inputs rotating over enough copies to exceed twice the L2 cache.
Also recorded: the SM and memory clocks before and after (``nvidia-smi``), and the registers and
spills of every kernel launched (Triton's compiled kernels; ``cuobjdump -res-usage`` of the
extension). The static counterpart, with no GPU, is ``benches/kernel_report.py``.

Without a GPU it runs the same code on tiny shapes through Triton's interpreter (the CUDA
kernels skipped with the reason): a smoke run that proves the script works, never a measurement
(its rows say ``"smoke": true``).

``--record FILE`` appends one JSON line per row (``"kind": "kernel"``) and one with the run's
environment (``"kind": "kernel-environment"``) to FILE, the format of ``PREFOPT_BENCH_RECORD``
that ``benches/report.py`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

GPU_SHAPES = ((16384, 128256), (16384, 262144), (512, 128256))
SMOKE_SHAPES = ((5, 300),)
FORWARD_VARIANTS = {
    # name: (statistics computed, softcap)
    "logps": ((), None),
    "entropy": (("entropy",), None),
    "all": (("entropy", "mean_logits", "log_sum_sq_probs", "is_top1"), None),
    "entropy,softcap": (("entropy",), 30.0),
}
BACKWARD_VARIANTS = {"logps": (), "entropy": ("entropy",)}
BACKENDS = ("triton", "cuda")


def launchers(backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) launchers of ``backend``: the same contract for both languages."""
    if backend == "triton":
        from prefopt import kernels

        return kernels.token_stats_forward, kernels.token_stats_backward
    from prefopt import cuda_ext

    return cuda_ext.token_stats_forward, cuda_ext.token_stats_backward


def clocks() -> dict[str, str] | None:
    """The GPU's clocks, temperature and power as nvidia-smi reads them now (None without it)."""
    fields = ("clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "temperature.gpu", "power.draw")
    try:
        query = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                               capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    values = [value.strip() for value in query.stdout.splitlines()[0].split(",")]
    return dict(zip(fields, values))


def triton_kernel_resources(kernel) -> dict[str, dict[str, int]] | str:
    """Registers and spills of each compiled variant of a Triton JIT function in this process,
    by the variant's cache key; or why they could not be read (Triton's internals move)."""
    found = {}
    try:
        for caches in kernel.device_caches.values():
            for key, compiled in caches[0].items():
                compiled._init_handles()
                found[str(key)] = {"registers": compiled.n_regs, "spill_bytes": compiled.n_spills,
                                   "warps": compiled.metadata.num_warps, "shared_bytes": compiled.metadata.shared}
    except (AttributeError, IndexError, TypeError) as error:
        return f"not readable from this Triton: {type(error).__name__}: {error}"
    return found


def cuda_kernel_resources(library: str) -> dict[str, dict[str, int]] | str:
    """Registers, spill (local memory) bytes and shared memory of the sm_90 token-statistics
    kernels of the built extension, by mangled name; or why they could not be read. The tools
    and the parser are the static report's (benches/kernel_report.py)."""
    import kernel_report

    tools = kernel_report.find_tools()
    if tools.cuobjdump is None:
        return tools.missing["cuobjdump"]
    listing = subprocess.run([tools.cuobjdump, "-res-usage", "-arch", "sm_90", library], capture_output=True,
                             text=True)
    if listing.returncode != 0:
        return f"cuobjdump -res-usage failed: {listing.stderr.strip()[:200]}"
    return {name: {"registers": fields.get("REG", 0), "spill_bytes": fields.get("LOCAL", 0),
                   "shared_bytes": fields.get("SHARED", 0)}
            for name, fields in kernel_report.parse_res_usage(listing.stdout).items() if "token_stats" in name}


def time_launch(launch: Callable[[int], None], sets: int, calls: int, device: torch.device) -> list[float]:
    """Seconds of ``launch(set_index)`` for each of ``calls`` timed calls after 3 warm-up calls."""
    from prefopt import bench

    seconds, _ = bench.time_calls(lambda i: None, lambda i, _: launch(i % sets), calls=calls, warmup=3,
                                  device=device)
    return seconds


def measure_shape(backend: str, tokens: int, vocab: int, device: torch.device, calls: int,
                  copy_bandwidth: float | None) -> list[dict]:
    """Every forward and backward variant of ``backend`` at one shape."""
    from prefopt import bench

    forward, backward = launchers(backend)
    element_bytes = 2
    sets = bench.rotation_count(tokens * vocab * element_bytes, device)
    generator = torch.Generator(device=device).manual_seed(tokens + vocab)
    logits = [(torch.randn(1, tokens, vocab, device=device, generator=generator) * 4).to(torch.bfloat16)
              for _ in range(sets)]
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)

    def out() -> torch.Tensor:
        return torch.empty(tokens, device=device, dtype=torch.float32)

    rows = []

    def record(kernel: str, variant: str, seconds: list[float], bytes_moved: int) -> None:
        median = statistics.median(seconds)
        bandwidth = bytes_moved / median
        rows.append({"kind": "kernel", "backend": backend, "kernel": kernel, "variant": f"bf16,{variant}",
                     "tokens": tokens, "vocab": vocab, "dtype": "bfloat16", "smoke": device.type != "cuda",
                     "median_s": median, "times_s": seconds, "bytes": bytes_moved, "bandwidth_bytes_per_s": bandwidth,
                     "copy_bandwidth_bytes_per_s": copy_bandwidth,
                     "fraction_of_copy": None if copy_bandwidth is None else bandwidth / copy_bandwidth})

    statistics_of_forward = {}
    for variant, (stats, softcap) in FORWARD_VARIANTS.items():
        outputs = {name: torch.empty(tokens, device=device, dtype=torch.bool if name == "is_top1" else torch.float32)
                   for name in stats}
        logps, lse = out(), out()

        def launch(index, stats_outputs=outputs, logps=logps, lse=lse, softcap=softcap):
            forward(logits[index], labels, logps, lse, stats_outputs.get("entropy"),
                    stats_outputs.get("mean_logits"), stats_outputs.get("log_sum_sq_probs"),
                    stats_outputs.get("is_top1"), ignore_index=-100, temperature=1.0, softcap=softcap)

        record("forward", variant, time_launch(launch, sets, calls, device), tokens * vocab * element_bytes)
        if variant in ("logps", "entropy"):
            statistics_of_forward[variant] = (lse, outputs.get("entropy"))

    grad = torch.empty_like(logits[0])
    upstream = torch.randn(tokens, device=device, generator=generator)
    for variant, stats in BACKWARD_VARIANTS.items():
        lse, entropy = statistics_of_forward[variant]

        def launch(index, lse=lse, entropy=entropy, with_entropy="entropy" in stats):
            backward(logits[index], grad, labels, lse, entropy if with_entropy else None, None, upstream,
                     upstream if with_entropy else None, None, None, ignore_index=-100, temperature=1.0,
                     softcap=None)

        record("backward", variant, time_launch(launch, sets, calls, device), 2 * tokens * vocab * element_bytes)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, help="append the rows as JSON lines to this file")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per figure (default 20)")
    arguments = parser.parse_args(argv)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # The smoke run needs Triton's interpreter, chosen before Triton is first imported.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})

    from prefopt import bench
    from prefopt.backends import unavailable_reason

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = GPU_SHAPES if device.type == "cuda" else SMOKE_SHAPES
    copy = bench.copy_bandwidth(device) if device.type == "cuda" else None
    environment = {"kind": "kernel-environment", **bench.environment(device, " ".join(["python", *sys.argv])),
                   "copy_bandwidth_bytes_per_s": copy, "clocks_before": clocks() if device.type == "cuda" else None}
    rows, skipped = [], {}
    for backend in BACKENDS:
        reason = unavailable_reason(backend, device)
        if reason is None and backend == "cuda":
            from prefopt import cuda_ext
            from prefopt.backends import BackendUnavailableError

            try:
                cuda_ext.load()
            except BackendUnavailableError as error:
                reason = str(error)
        if reason is not None:
            skipped[backend] = reason
            print(f"{backend}: skipped: {reason}")
            continue
        for tokens, vocab in shapes:
            try:
                rows += measure_shape(backend, tokens, vocab, device, arguments.calls, copy)
            except torch.OutOfMemoryError as error:
                skipped[f"{backend} {tokens}x{vocab}"] = f"out of memory: {str(error).splitlines()[0]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    environment["clocks_after"] = clocks() if device.type == "cuda" else None
    environment["skipped"] = skipped
    if device.type == "cuda":
        from prefopt import cuda_ext
        from prefopt.kernels.token_stats_bwd import _token_stats_bwd_kernel
        from prefopt.kernels.token_stats_fwd import _token_stats_fwd_kernel

        environment["triton_resources"] = {"forward": triton_kernel_resources(_token_stats_fwd_kernel),
                                           "backward": triton_kernel_resources(_token_stats_bwd_kernel)}
        if "cuda" not in skipped:
            environment["cuda_resources"] = cuda_kernel_resources(cuda_ext.load())

    header = f"{'backend':<7} {'kernel':<8} {'variant':<20} {'shape':>14} {'time':>10} {'GB/s':>8} {'of copy':>8}"
    print(("smoke run through Triton's interpreter on the CPU: not a measurement\n" if device.type != "cuda" else
           f"copy bandwidth {copy / 1e9:,.0f} GB/s; clocks {environment['clocks_before']}\n") + header)
    for row in rows:
        fraction = "-" if row["fraction_of_copy"] is None else f"{row['fraction_of_copy']:.1%}"
        print(f"{row['backend']:<7} {row['kernel']:<8} {row['variant']:<20} {row['tokens']:>6}x{row['vocab']:<7} "
              f"{row['median_s'] * 1e6:8.1f}us {row['bandwidth_bytes_per_s'] / 1e9:8.1f} {fraction:>8}")
    if arguments.record is not None:
        with arguments.record.open("a") as record:
            for line in (environment, *rows):
                record.write(json.dumps(line, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
