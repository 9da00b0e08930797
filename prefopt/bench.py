"""Benchmarks of the logits path: time, peak extra memory and fraction of the byte floor.

``python -m prefopt bench`` (see :func:`run`) and ``pytest benches`` share this module: the
workloads, the implementations measured (prefopt's backends, the plain-PyTorch reference,
``torch.compile`` of it, and the peers where they import), the timers and the floor.

How each figure is measured:

- time: the median over repeated calls of one direction (``"fwd"``, ``"bwd"`` or ``"fwd+bwd"``),
  after warm-up calls. On a GPU each call is timed with CUDA events and the calls rotate over
  enough copies of the inputs that together exceed twice the L2 cache, so no call finds its
  inputs cached; on a CPU with ``time.perf_counter`` (the inputs, at least tens of MB, already
  exceed the CPU caches). A backward is timed alone: its forward runs untimed before each call.
- peak extra memory: on a GPU ``torch.cuda.max_memory_allocated`` above what was allocated just
  before the timed part of each call (inputs, and for ``"bwd"`` the forward's saved tensors),
  the maximum over the calls. On a CPU the peak resident memory of one forward+backward in a
  fresh process (``benches/measure_memory.py``, run with ``MALLOC_MMAP_THRESHOLD_`` so glibc
  returns freed blocks), which needs a source checkout.
- floor (GPU): the bytes a direction must move (read the scored rows of the logits once per
  pass, write the whole gradient once) over the copy bandwidth of the same GPU, measured in the
  same run by :func:`copy_bandwidth`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import TextIO

import torch

from .backends import unavailable_reason

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
IGNORE_INDEX = -100
REFERENCE = "reference"
# benches/measure_memory.py, next to the package in a source checkout.
MEMORY_SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "measure_memory.py"

# A function of (logits [N, V], labels [N]) whose output's sum is what the backward differentiates.
Candidate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Workload:
    """One problem of the logits path: ``tokens`` rows of ``vocab`` logits of ``dtype``.

    ``ignored_fraction`` of the rows (the leading ones, like a prompt) carry the ignore label;
    ``direction`` is what is timed: ``"fwd"``, ``"bwd"`` or ``"fwd+bwd"``.
    """

    tokens: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16
    ignored_fraction: float = 0.0
    direction: str = "fwd+bwd"

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.vocab < 1:
            raise ValueError(f"tokens and vocab must be >= 1, got {self.tokens} and {self.vocab}")
        if not 0.0 <= self.ignored_fraction < 1.0:
            raise ValueError(f"ignored_fraction must be in [0, 1), got {self.ignored_fraction}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")

    @property
    def ignored_rows(self) -> int:
        return int(self.tokens * self.ignored_fraction)

    @property
    def logits_bytes(self) -> int:
        """Bytes of one [tokens, vocab] logits tensor."""
        return self.tokens * self.vocab * torch.empty((), dtype=self.dtype).element_size()

    def floor_bytes(self) -> int:
        """Bytes the direction must move at least: each pass reads the scored rows once; the
        backward writes the whole gradient (zeros included) once."""
        element = torch.empty((), dtype=self.dtype).element_size()
        scored = (self.tokens - self.ignored_rows) * self.vocab * element
        reads = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[self.direction]
        writes = 0 if self.direction == "fwd" else self.logits_bytes
        return reads * scored + writes

    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.direction} {self.tokens}x{self.vocab} {dtype} ignored={self.ignored_fraction:.0%}"


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A way to compute per-token log-probs; ``build`` makes the callable (compiling or loading
    a peer happens there, once). Implementations that write the gradient over their logits
    ("-inplace", Liger) are safe to time: every measurement makes its own inputs."""

    name: str
    build: Callable[[], Candidate]
    unavailable: str | None = None
    # The (backend, inplace) pair benches/measure_memory.py understands, for CPU memory.
    memory_script_args: tuple[str, bool] | None = None


@dataclasses.dataclass
class Measurement:
    """The figures of one implementation on one workload. Times in seconds, memory in bytes;
    ``skipped`` holds the reason when it did not run (the figures are then None)."""

    implementation: str
    workload: Workload
    device: str
    median_s: float | None = None
    times_s: list[float] = dataclasses.field(default_factory=list)
    peak_extra_bytes: int | None = None
    memory_method: str | None = None
    floor_bytes: int | None = None
    floor_s: float | None = None
    fraction_of_floor: float | None = None
    speedup_vs_reference: float | None = None
    skipped: str | None = None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict: the workload's fields inline, the dtype as its name."""
        figures = dataclasses.asdict(self)
        workload = figures.pop("workload")
        workload["dtype"] = str(self.workload.dtype).removeprefix("torch.")
        return {**workload, **figures, "logits_bytes": self.workload.logits_bytes}


# ----------------------------------------------------------------------------------------------
# Implementations


def _reference_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """prefopt's plain-PyTorch definition (prefopt.reference), uncompiled, for torch.compile."""
    from .reference import reference_token_stats

    return reference_token_stats(logits, labels, ignore_index=IGNORE_INDEX, temperature=1.0, softcap=None,
                                 stats=frozenset()).logps


def _prefopt(backend: str, inplace: bool = False, entropy: bool = False) -> Callable[[], Candidate]:
    def build() -> Candidate:
        from .logprobs import token_logprobs

        def candidate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            out = token_logprobs(logits, labels, backend=backend, inplace_backward=inplace, return_entropy=entropy)
            return out[0] + out[1] if entropy else out

        return candidate

    return build


def _compiled_reference() -> Candidate:
    # dynamic=False: one specialized graph per shape, as a trainer with fixed shapes gets it.
    return torch.compile(_reference_logprobs, dynamic=False)


def load_trl_logprob_module() -> ModuleType | None:
    """TRL's ``trl.kernels.logprob_entropy`` module, imported by package or, when TRL's package
    import needs what is missing here (datasets, transformers), loaded by its file path alone;
    None when TRL is not installed."""
    name = "trl.kernels.logprob_entropy"
    try:
        return importlib.import_module(name)
    except ImportError:
        spec = importlib.util.find_spec("trl")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0]) / "kernels" / "logprob_entropy.py"
        file_spec = importlib.util.spec_from_file_location("trl_logprob_entropy", path)
        if file_spec is None or file_spec.loader is None:
            return None
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except (ImportError, FileNotFoundError):
            return None
        return module


def _trl() -> Candidate:
    module = load_trl_logprob_module()
    assert module is not None, "checked by implementations()"

    def candidate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # TRL's kernel has no ignore label: ignored rows are masked out by row_mask instead.
        scored = labels != IGNORE_INDEX
        logps, entropy = module.selective_log_softmax_and_entropy(logits, labels.clamp(min=0), row_mask=scored)
        return logps + entropy

    return candidate


def _liger() -> Candidate:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    # reduction="sum" is -(sum of the log-probs); Liger computes the gradient during the forward
    # and writes it over the logits.
    loss = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

    def candidate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss(logits, labels)

    return candidate


def implementations(device: torch.device) -> list[Implementation]:
    """Every implementation this module knows, each with the reason it cannot run on tensors
    of ``device`` (None when it can): prefopt's backends, the reference, torch.compile of the
    reference, TRL's Triton kernel (log-probs + entropy) and Liger's cross entropy."""
    on_gpu = device.type == "cuda"
    gpu_only = None if on_gpu else "GPU only"
    # On a CPU the kernels could only run through Triton's interpreter: a correctness tool.
    triton = unavailable_reason("triton", device) if on_gpu else "GPU only"
    trl_reason = gpu_only
    if trl_reason is None and load_trl_logprob_module() is None:
        trl_reason = "TRL is not installed (pip install trl, or carry its wheel)"
    liger_reason = gpu_only
    if liger_reason is None and importlib.util.find_spec("liger_kernel") is None:
        liger_reason = "Liger-Kernel is not installed (pip install liger-kernel)"
    compile_reason = None if on_gpu else "GPU only (compiling takes longer than the whole CPU run)"
    return [
        Implementation(REFERENCE, lambda: _reference_logprobs, memory_script_args=("reference", False)),
        Implementation("torch.compile(reference)", _compiled_reference, unavailable=compile_reason),
        Implementation("prefopt-triton", _prefopt("triton"), unavailable=triton),
        Implementation("prefopt-triton-inplace", _prefopt("triton", inplace=True), unavailable=triton),
        Implementation("prefopt-triton-entropy", _prefopt("triton", entropy=True), unavailable=triton),
        Implementation("prefopt-cuda", _prefopt("cuda"), unavailable=unavailable_reason("cuda", device)),
        Implementation("prefopt-torch", _prefopt("torch"), memory_script_args=("torch", False)),
        Implementation("prefopt-torch-inplace", _prefopt("torch", inplace=True),
                       memory_script_args=("torch", True)),
        Implementation("trl-selective_log_softmax_and_entropy", _trl, unavailable=trl_reason),
        Implementation("liger-cross_entropy", _liger, unavailable=liger_reason),
    ]


IMPLEMENTATION_NAMES: tuple[str, ...] = tuple(i.name for i in implementations(torch.device("cpu")))


# ----------------------------------------------------------------------------------------------
# Workloads


def sweep(tokens: Sequence[int], vocabs: Sequence[int], pivot_tokens: int, pivot_vocab: int, *,
          dtype: torch.dtype, ignored_fraction: float = 0.0, direction: str = "fwd+bwd") -> list[Workload]:
    """Every token count at ``pivot_vocab`` and every vocabulary size at ``pivot_tokens``, without
    repeats: the two axes of the plots."""
    shapes = [(t, pivot_vocab) for t in tokens] + [(pivot_tokens, v) for v in vocabs]
    unique = sorted(set(shapes), key=shapes.index)
    return [Workload(t, v, dtype, ignored_fraction, direction) for t, v in unique]


def default_workloads(device: torch.device, quick: bool = False) -> list[Workload]:
    """The representative subset ``python -m prefopt bench`` runs.

    CPU: float32 (what the CPU path is for), a quarter of the rows ignored (the memory script's
    prompt), 512-1024 tokens at V 32000 and V 32000-128256 at 512 tokens. GPU: bf16, 4096-16384 tokens at V 128256 and
    V 32000-262144 at 8192 tokens. ``quick``: one small workload, a smoke test of the machinery.
    """
    if device.type == "cuda":
        if quick:
            return [Workload(4096, 32000, torch.bfloat16)]
        return sweep((4096, 8192, 16384), (32000, 128256, 151936, 262144), 8192, 128256, dtype=torch.bfloat16)
    if quick:
        return [Workload(256, 32000, torch.float32, 0.25)]
    return sweep((512, 1024), (32000, 128256), 512, 32000, dtype=torch.float32, ignored_fraction=0.25)


def make_inputs(workload: Workload, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [tokens, vocab] (normal, scale 4, like a language model's) with requires_grad, and
    labels [tokens] whose first ``ignored_rows`` are the ignore label."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(workload.tokens, workload.vocab, device=device, generator=generator) * 4
    logits = logits.to(workload.dtype).requires_grad_(True)
    labels = torch.randint(0, workload.vocab, (workload.tokens,), device=device, generator=generator)
    labels[: workload.ignored_rows] = IGNORE_INDEX
    return logits, labels


# ----------------------------------------------------------------------------------------------
# Timers and ceilings


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to rotate over so that together they exceed twice the L2 cache (GPU);
    1 on a CPU."""
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, math.ceil(2 * l2 / max(bytes_per_set, 1)) + 1)


def time_calls(prepare: Callable[[int], object], timed: Callable[[int, object], object], *, calls: int,
               warmup: int, device: torch.device) -> tuple[list[float], int | None]:
    """Run ``prepare(i)`` untimed then ``timed(i, prepared)`` timed, for i in range(warmup + calls).

    Returns the seconds of the last ``calls`` timed parts (CUDA events on a GPU, perf_counter on
    a CPU) and, on a GPU, the largest ``max_memory_allocated`` of a timed part above what was
    allocated as it began (bytes); None on a CPU.
    """
    seconds: list[float] = []
    peak_extra: int | None = 0 if device.type == "cuda" else None
    for i in range(warmup + calls):
        prepared = prepare(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = timed(i, prepared)
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end) / 1e3
            peak_extra = max(peak_extra or 0, torch.cuda.max_memory_allocated(device) - before)
        else:
            begin = time.perf_counter()
            result = timed(i, prepared)
            elapsed = time.perf_counter() - begin
        del result, prepared
        if i >= warmup:
            seconds.append(elapsed)
    return seconds, peak_extra


def copy_bandwidth(device: torch.device, size_bytes: int = 2**30, calls: int = 20) -> float:
    """Bytes per second of a device-to-device copy of ``size_bytes`` (read + write counted),
    the practical memory-bandwidth ceiling of a GPU. Measured, never assumed."""
    source = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    seconds, _ = time_calls(lambda i: None, lambda i, _: target.copy_(source), calls=calls, warmup=3, device=device)
    return 2 * source.numel() * source.element_size() / statistics.median(seconds)


def measure_cpu_memory(workload: Workload, backend: str, inplace: bool) -> int:
    """Peak extra resident bytes of one float32 forward+backward of ``workload``'s shape, in a
    fresh process by benches/measure_memory.py (a quarter of the rows ignored there)."""
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    arguments = [sys.executable, str(MEMORY_SCRIPT), backend, "1" if inplace else "0", str(workload.tokens),
                 str(workload.vocab)]
    result = subprocess.run(arguments, env=environment, capture_output=True, text=True, check=True)
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def cpu_memory_unavailable(workload: Workload) -> str | None:
    """Why the CPU memory figure of ``workload`` cannot be measured (None when it can): the
    script measures float32 fwd+bwd with a quarter of the rows ignored, from a source checkout."""
    if not MEMORY_SCRIPT.is_file():
        return f"{MEMORY_SCRIPT} not found (CPU memory needs a source checkout)"
    if (workload.dtype, workload.direction, workload.ignored_fraction) != (torch.float32, "fwd+bwd", 0.25):
        return "CPU memory is measured for float32 fwd+bwd with 25% ignored rows only"
    return None


# ----------------------------------------------------------------------------------------------
# Measuring


def measure(implementation: Implementation, workload: Workload, device: torch.device, *, calls: int,
            warmup: int = 2, candidate: Candidate | None = None, bandwidth: float | None = None,
            seed: int = 0) -> Measurement:
    """Time ``implementation`` on ``workload`` (and on a GPU its peak extra memory and floor).

    ``candidate``: the built callable, to reuse one across workloads (built here otherwise).
    ``bandwidth``: the copy bandwidth in bytes/s from :func:`copy_bandwidth`, for the floor.
    A GPU out-of-memory error gives a skipped measurement, not an exception.
    """
    result = Measurement(implementation.name, workload, str(device))
    if implementation.unavailable is not None:
        result.skipped = implementation.unavailable
        return result
    run = candidate if candidate is not None else implementation.build()
    sets: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        sets = [make_inputs(workload, device, seed + k)
                for k in range(rotation_count(workload.logits_bytes, device))]

        def forward(i: int) -> torch.Tensor:
            logits, labels = sets[i % len(sets)]
            return run(logits, labels)

        def backward(i: int, output: torch.Tensor) -> torch.Tensor:
            (grad,) = torch.autograd.grad(output, sets[i % len(sets)][0], torch.ones_like(output))
            return grad

        if workload.direction == "fwd":
            seconds, peak = time_calls(lambda i: None, lambda i, _: forward(i), calls=calls, warmup=warmup,
                                       device=device)
        elif workload.direction == "bwd":
            seconds, peak = time_calls(forward, backward, calls=calls, warmup=warmup, device=device)
        else:
            seconds, peak = time_calls(lambda i: None, lambda i, _: backward(i, forward(i)), calls=calls,
                                       warmup=warmup, device=device)
    except torch.cuda.OutOfMemoryError as error:
        result.skipped = f"out of GPU memory: {str(error).splitlines()[0]}"
        return result
    finally:
        del sets
    result.times_s = seconds
    result.median_s = statistics.median(seconds)
    if peak is not None:
        result.peak_extra_bytes, result.memory_method = peak, "torch.cuda.max_memory_allocated above the inputs"
    if bandwidth is not None:
        result.floor_bytes = workload.floor_bytes()
        result.floor_s = result.floor_bytes / bandwidth
        result.fraction_of_floor = result.floor_s / result.median_s
    return result


def fill_speedups(results: Sequence[Measurement]) -> None:
    """Set each measurement's speed-up: the reference's median time over its own, same workload."""
    reference = {r.workload: r.median_s for r in results if r.implementation == REFERENCE and r.median_s}
    for r in results:
        base = reference.get(r.workload)
        if base is not None and r.median_s:
            r.speedup_vs_reference = base / r.median_s


# ----------------------------------------------------------------------------------------------
# Report: table, JSON, plots


def _format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 2**20:,.1f} MiB" if count < 2**30 else f"{count / 2**30:,.2f} GiB"


def format_table(results: Sequence[Measurement]) -> str:
    """The measurements as a fixed-width text table, one row per implementation and workload;
    skipped implementations are listed once each under the table with the reason."""
    header = ("implementation", "workload", "median time", "peak extra memory", "% of floor", "speed-up")
    rows = [header]
    skipped: dict[str, str] = {}
    for r in results:
        if r.skipped is not None:
            skipped.setdefault(r.implementation, r.skipped)
            continue
        rows.append((
            r.implementation,
            r.workload.name(),
            f"{r.median_s * 1e3:,.2f} ms" if r.median_s is not None else "-",
            _format_bytes(r.peak_extra_bytes),
            f"{r.fraction_of_floor:.1%}" if r.fraction_of_floor is not None else "-",
            f"{r.speedup_vs_reference:.2f}x" if r.speedup_vs_reference is not None else "-",
        ))
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if k < 2 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += [f"not run: {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, command: str) -> dict[str, object]:
    """Where and how the figures were measured: device name, driver, versions, date, command."""
    from . import __version__

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    driver = None
    if device.type == "cuda":
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, check=True, timeout=30)
            driver = query.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": device_name,
        "driver": driver,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "prefopt": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def write_json(path: Path, results: Sequence[Measurement], env: dict[str, object],
               bandwidth: float | None) -> None:
    """Write the environment, the measured copy bandwidth (bytes/s, GPU) and every measurement."""
    document = {**env, "copy_bandwidth_bytes_per_s": bandwidth, "results": [r.to_json() for r in results]}
    path.write_text(json.dumps(document, indent=2) + "\n")


class MissingExtraError(RuntimeError):
    """An optional dependency is missing; the message names the extra that installs it."""


def _pyplot() -> ModuleType:
    """matplotlib.pyplot drawing to files (Agg), or MissingExtraError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise MissingExtraError(
            f"--plot needs matplotlib ({error}): pip install 'prefopt[bench]' (or pip install matplotlib)"
        ) from error
    return plt


def write_plots(directory: Path, results: Sequence[Measurement], title: str) -> list[Path]:
    """PNG plots of median time and peak extra memory against tokens (one figure per vocabulary
    with at least two token counts) and against vocabulary size (one per token count with at
    least two vocabularies), one line per implementation. Returns the files written."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    measured = [r for r in results if r.median_s is not None]
    written: list[Path] = []
    groups = {(r.workload.direction, r.workload.dtype, r.workload.ignored_fraction) for r in measured}
    for direction, dtype, ignored in sorted(groups, key=str):
        group = [r for r in measured if (r.workload.direction, r.workload.dtype, r.workload.ignored_fraction)
                 == (direction, dtype, ignored)]
        for axis, fixed in (("tokens", "vocab"), ("vocab", "tokens")):
            for value in sorted({getattr(r.workload, fixed) for r in group}):
                line_points = [r for r in group if getattr(r.workload, fixed) == value]
                if len({getattr(r.workload, axis) for r in line_points}) < 2:
                    continue
                figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
                for name in dict.fromkeys(r.implementation for r in line_points):
                    points = sorted((getattr(r.workload, axis), r) for r in line_points if r.implementation == name)
                    xs = [x for x, _ in points]
                    time_axes.plot(xs, [r.median_s * 1e3 for _, r in points], marker="o", label=name)
                    memory = [(x, r.peak_extra_bytes / 2**20) for x, r in points if r.peak_extra_bytes is not None]
                    if memory:
                        memory_axes.plot(*zip(*memory), marker="o", label=name)
                dtype_name = str(dtype).removeprefix("torch.")
                for axes, ylabel in ((time_axes, "median time (ms)"), (memory_axes, "peak extra memory (MiB)")):
                    axes.set_xlabel("tokens" if axis == "tokens" else "vocabulary size")
                    axes.set_ylabel(ylabel)
                    axes.grid(True, alpha=0.3)
                time_axes.legend(fontsize="small")
                figure.suptitle(f"{title}: {direction}, {dtype_name}, {fixed} {value}, ignored {ignored:.0%}")
                figure.tight_layout()
                path = directory / (f"{direction.replace('+', '_')}-{dtype_name}-ignored{round(ignored * 100)}"
                                    f"-vs_{axis}-{fixed}{value}.png")
                figure.savefig(path, dpi=120)
                plt.close(figure)
                written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# The main job


def run(*, device: torch.device | None = None, quick: bool = False, names: Sequence[str] | None = None,
        calls: int | None = None, json_path: Path | None = None, plot_dir: Path | None = None,
        command: str | None = None, progress: TextIO | None = None, out: TextIO | None = None) -> list[Measurement]:
    """``python -m prefopt bench``: measure the default subset on ``device`` (the GPU when there
    is one), print the table to ``out`` and progress to ``progress``, and write ``json_path``
    and the plots under ``plot_dir`` when given (``out``/``progress`` default to the current
    sys.stdout/sys.stderr). ``names`` restricts the implementations; by
    default every one that can run here. ``calls``: timed calls per measurement (default 10 on a
    GPU, 5 on a CPU)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out, progress = out or sys.stdout, progress or sys.stderr
    if plot_dir is not None:
        _pyplot()  # fail before measuring, not after
    calls = calls or (10 if device.type == "cuda" else 5)
    workloads = default_workloads(device, quick)
    # The reference always runs: it is what the speed-ups are relative to.
    chosen = [i for i in implementations(device) if names is None or i.name in (*names, REFERENCE)]
    bandwidth = None
    if device.type == "cuda":
        print("measuring the copy bandwidth (the floor's ceiling) ...", file=progress, flush=True)
        bandwidth = copy_bandwidth(device)
        print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)", file=progress, flush=True)
    results: list[Measurement] = []
    built: dict[str, Candidate | None] = {}  # each implementation built (compiled, loaded) once
    total = len(workloads) * len(chosen)
    for k, (implementation, workload) in enumerate(((i, w) for i in chosen for w in workloads), start=1):
        print(f"[{k:>3}/{total}] {implementation.name:<40} {workload.name()}", file=progress, flush=True)
        try:
            if implementation.name not in built:
                built[implementation.name] = None if implementation.unavailable else implementation.build()
            results.append(measure(implementation, workload, device, calls=calls,
                                   candidate=built[implementation.name], bandwidth=bandwidth))
        except Exception as error:  # noqa: BLE001 - one failing peer must not end the run; it is reported
            failed = Measurement(implementation.name, workload, str(device))
            first_line = str(error).splitlines()[0] if str(error) else ""
            failed.skipped = f"failed at {workload.name()}: {type(error).__name__}: {first_line}"
            results.append(failed)
    if device.type == "cpu":
        _add_cpu_memory(results, chosen, progress)
    fill_speedups(results)
    print(format_table(results), file=out)
    if device.type == "cpu":
        print("time: median of perf_counter over calls; peak extra memory: resident memory of one fwd+bwd above "
              "its inputs, in a fresh process (benches/measure_memory.py); floors are measured on GPUs only",
              file=out)
    else:
        print(f"time: median of CUDA events over calls on rotating inputs; memory: max_memory_allocated above the "
              f"inputs; floor: bytes / measured copy bandwidth {bandwidth / 1e12:.2f} TB/s", file=out)
    env = environment(device, command or shlex.join([sys.executable, "-m", "prefopt", "bench"]))
    if json_path is not None:
        write_json(json_path, results, env, bandwidth)
        print(f"wrote {json_path}", file=out)
    if plot_dir is not None:
        for path in write_plots(plot_dir, results, env["device_name"]):
            print(f"wrote {path}", file=out)
    return results


def _add_cpu_memory(results: Sequence[Measurement], chosen: Sequence[Implementation], progress: TextIO) -> None:
    """Fill the CPU memory figures, two fresh processes at a time (after the timings, so the
    processes do not share the cores with a timed call)."""
    scripts = {i.name: i.memory_script_args for i in chosen}
    jobs = []
    for r in results:
        args = scripts.get(r.implementation)
        if r.skipped is None and args is not None:
            reason = cpu_memory_unavailable(r.workload)
            if reason is None:
                jobs.append((r, args))
            elif r.memory_method is None:
                r.memory_method = f"not measured: {reason}"
    if not jobs:
        return
    print(f"measuring peak memory in {len(jobs)} fresh processes ...", file=progress, flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        peaks = list(pool.map(lambda job: measure_cpu_memory(job[0].workload, *job[1]), jobs))
    for (r, _), peak in zip(jobs, peaks):
        r.peak_extra_bytes, r.memory_method = peak, "peak resident memory (VmHWM) above the inputs, fresh process"
