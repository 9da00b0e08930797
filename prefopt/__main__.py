"""Command line: python -m prefopt info, check, build and bench."""

import argparse
import os
import platform
import sys
from collections.abc import Sequence

import torch


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def info() -> int:
    """Print the software, the devices, and which backends can run on each (or why not)."""
    from . import __version__
    from .backends import BACKENDS, ENV_VARIABLE, resolve_backend, unavailable_reason

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"prefopt {__version__}, torch {torch.__version__}, triton {triton_version}, "
          f"python {platform.python_version()}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"GPU: {torch.cuda.get_device_name()} (compute capability "
              f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        print("GPU: none visible to PyTorch")
    print(f"{ENV_VARIABLE}={os.environ.get(ENV_VARIABLE, '(unset)')}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}")
    for device in devices:
        print(f"\nbackends for {device.type} tensors (auto -> {resolve_backend('auto', device)}):")
        for backend in BACKENDS:
            reason = unavailable_reason(backend, device)
            print(f"  {backend:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    from . import cuda_ext

    print(f"\nCUDA C++ extension: {cuda_ext.describe()}")
    return 0


CHECKED_BACKENDS = ("triton", "cuda", "torch")
_CHECK_PROBLEMS = (
    # (leading shape, vocabulary, dtype, temperature, softcap)
    ((3, 17), 7, torch.float32, 1.0, None),
    ((2, 9), 50257, torch.float32, 0.7, None),
    ((2, 9), 50257, torch.bfloat16, 1.0, None),
    ((4, 5), 1003, torch.float16, 1.3, 30.0),
)
_LINEAR_CHECK_PROBLEMS = (
    # (leading shape, hidden size, vocabulary, dtype, temperature, softcap)
    ((2, 9), 48, 1003, torch.float32, 0.7, None),
    ((4, 5), 32, 4099, torch.bfloat16, 1.0, 30.0),
)
# The preference losses with a fused kernel, checked on [B] float32 log-probs of this batch size.
_LOSS_BATCH = 6
COVERAGE = ("logits path: log-probs, entropy and the logits gradient; fused linear path: log-probs, entropy and "
            "the hidden and weight gradients; losses, on the backends with fused loss kernels: DPO and KTO losses "
            "and rewards and the gradients of the policy log-probs")


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    scale = ref.norm()
    return float((out - ref).norm() / scale) if scale > 0 else float((out - ref).norm())


def _limit(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2


def _check_logits(backend: str, device: torch.device, generator: torch.Generator) -> list[tuple]:
    """Rows (what, dtype, shape, [errors], limit, passed) of token_logprobs on ``backend``."""
    from .logprobs.api import token_logprobs

    rows = []
    for leading, vocab_size, dtype, temperature, softcap in _CHECK_PROBLEMS:
        shape = (*leading, vocab_size)
        logits = (torch.randn(shape, generator=generator) * 4).to(dtype)
        labels = torch.randint(0, vocab_size, leading, generator=generator)
        labels[torch.rand(leading, generator=generator) < 0.3] = -100
        upstream = torch.randn((2, *leading), generator=generator, dtype=torch.float64)
        kwargs = {"return_entropy": True, "temperature": temperature, "softcap": softcap}

        exact_input = logits.double().requires_grad_(True)
        exact_logps, exact_entropy = token_logprobs(exact_input, labels, backend="reference", **kwargs)
        (exact_grad,) = torch.autograd.grad(
            (exact_logps * upstream[0] + exact_entropy * upstream[1]).sum(), exact_input)

        fused_input = logits.to(device).requires_grad_(True)
        logps, entropy = token_logprobs(fused_input, labels.to(device), backend=backend, **kwargs)
        (grad,) = torch.autograd.grad(
            (logps * upstream[0].to(device) + entropy * upstream[1].to(device)).sum(), fused_input)

        errors = [_relative_error(logps, exact_logps), _relative_error(entropy, exact_entropy),
                  _relative_error(grad, exact_grad)]
        passed = all(error <= _limit(dtype) for error in errors) and bool((logps <= 0).all())
        rows.append(("logits", dtype, "x".join(map(str, shape)), errors, _limit(dtype), passed))
    return rows


def _check_linear(backend: str, device: torch.device, generator: torch.Generator) -> list[tuple]:
    """Rows of linear_token_stats on ``backend``; the gradient error is the larger of hidden's
    and weight's."""
    from .logprobs.linear import linear_token_stats

    rows = []
    for leading, hidden_size, vocab_size, dtype, temperature, softcap in _LINEAR_CHECK_PROBLEMS:
        hidden = torch.randn((*leading, hidden_size), generator=generator).to(dtype)
        weight = (torch.randn(vocab_size, hidden_size, generator=generator) * 4 / hidden_size**0.5).to(dtype)
        labels = torch.randint(0, vocab_size, leading, generator=generator)
        labels[torch.rand(leading, generator=generator) < 0.3] = -100
        upstream = torch.randn((2, *leading), generator=generator, dtype=torch.float64)
        kwargs = {"stats": ("entropy",), "temperature": temperature, "softcap": softcap}

        def run(h: torch.Tensor, w: torch.Tensor, on: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
            h, w = h.requires_grad_(True), w.requires_grad_(True)
            stats = linear_token_stats(h, w, labels.to(h.device), backend=on, **kwargs)
            total = (stats.logps * upstream[0].to(h.device) + stats.entropy * upstream[1].to(h.device)).sum()
            return stats.logps, stats.entropy, list(torch.autograd.grad(total, (h, w)))

        exact = run(hidden.double(), weight.double(), "reference")
        fused = run(hidden.to(device), weight.to(device), backend)
        errors = [_relative_error(fused[0], exact[0]), _relative_error(fused[1], exact[1]),
                  max(_relative_error(g, e) for g, e in zip(fused[2], exact[2]))]
        passed = all(error <= _limit(dtype) for error in errors) and bool((fused[0] <= 0).all())
        shape = f"{'x'.join(map(str, leading))} H{hidden_size} V{vocab_size}"
        rows.append(("linear", dtype, shape, errors, _limit(dtype), passed))
    return rows


def _check_losses(backend: str, device: torch.device, generator: torch.Generator) -> list[tuple]:
    """Rows of the fused DPO (sigmoid) and KTO losses on ``backend``: the error of the losses,
    the reduced loss and the rewards together, and of the gradients of the policy log-probs."""
    from .losses import dpo_loss, kto_loss

    def logps() -> torch.Tensor:
        return -20 * torch.rand(_LOSS_BATCH, generator=generator, dtype=torch.float64)

    desirable = torch.rand(_LOSS_BATCH, generator=generator) < 0.5
    problems = {
        "dpo": (lambda policy, ref, on: dpo_loss(*policy, *ref, beta=0.1, backend=on), (logps(), logps()),
                (logps(), logps())),
        "kto": (lambda policy, ref, on: kto_loss(*policy, *ref, desirable.to(ref[0].device), kl=0.5, beta=0.1,
                                                 backend=on), (logps(),), (logps(),)),
    }
    rows = []
    for name, (loss, policy, ref) in problems.items():
        def run(dtype: torch.dtype, on: str, at: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
            leaves = [p.to(at, dtype).requires_grad_(True) for p in policy]
            out = loss(leaves, [r.to(at, dtype) for r in ref], on)
            values = torch.cat([out.loss.reshape(1), out.losses, out.chosen_rewards, out.rejected_rewards])
            return values, list(torch.autograd.grad(out.loss, leaves))

        exact_values, exact_grads = run(torch.float64, "reference", torch.device("cpu"))
        values, grads = run(torch.float32, backend, device)
        errors = [_relative_error(values, exact_values), None,
                  max(_relative_error(g, e) for g, e in zip(grads, exact_grads))]
        passed = all(error is None or error <= 1e-5 for error in errors)
        rows.append((name, torch.float32, f"B {_LOSS_BATCH}", errors, 1e-5, passed))
    return rows


def check(seed: int, backends: Sequence[str] | None = None) -> int:
    """Every backend that can run here (or those named) against the float64 reference, forward
    and backward, on what COVERAGE says: the logits path, the fused linear path and the fused
    DPO and KTO losses."""
    device = _default_device()
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # The Triton kernels can run on the CPU through Triton's interpreter, which must be chosen
        # before Triton is first imported (importing prefopt already imports it, through
        # torch.compile's machinery): start again with it chosen.
        environment = {**os.environ, "TRITON_INTERPRET": "1"}
        arguments = ["check", "--seed", str(seed), *(f"--backend={backend}" for backend in backends or ())]
        os.execve(sys.executable, [sys.executable, "-m", "prefopt", *arguments], environment)
    from .backends import BACKENDS, FUSED_BACKENDS, unavailable_reason

    generator = torch.Generator().manual_seed(seed)
    header = (f"{'backend':<8} {'dtype':<9} {'what':<7} {'shape':<16} {'value':>9} {'entropy':>9} {'grad':>9} "
              f"{'limit':>7}  verdict")
    print(f"device: {device}" + (" (Triton through its interpreter)" if device.type == "cpu" else ""))
    print(f"checks: {COVERAGE}")
    print(header)
    print("-" * len(header))
    failures = 0
    for backend in BACKENDS:
        if backend == "reference" or (backends and backend not in backends):
            continue
        reason = unavailable_reason(backend, device)
        if reason is not None:
            print(f"{backend:<8} skipped: {reason}")
            continue
        if backend == "cuda":
            # It can run here, so it must also build: a failed build is a failed check.
            from . import cuda_ext
            from .backends import BackendUnavailableError

            try:
                cuda_ext.load()
            except BackendUnavailableError as error:
                print(f"{backend:<8} FAIL: {error}")
                failures += 1
                continue
        rows = _check_logits(backend, device, generator) + _check_linear(backend, device, generator)
        if backend in FUSED_BACKENDS:
            rows += _check_losses(backend, device, generator)
        for what, dtype, shape, errors, limit, passed in rows:
            failures += not passed
            dtype_name = str(dtype).removeprefix("torch.")
            print(f"{backend:<8} {dtype_name:<9} {what:<7} {shape:<16} "
                  + " ".join("-".rjust(9) if error is None else f"{error:>9.1e}" for error in errors)
                  + f" {limit:>7.0e}  {'pass' if passed else 'FAIL'}")
    print("-" * len(header))
    print("relative errors ||out - ref|| / ||ref|| against float64 PyTorch (value: log-probs, or for the losses "
          "the loss, per-example losses and rewards; grad: the logits', the larger of hidden's and weight's, or "
          "the policy log-probs'); the torch backend has no fused loss kernel; "
          + ("all checks passed" if failures == 0 else f"{failures} check(s) FAILED"))
    return 0 if failures == 0 else 1


def build() -> int:
    """Compile the CUDA C++ extension ahead of time (otherwise it is compiled on first use)."""
    from . import cuda_ext
    from .backends import BackendUnavailableError

    toolkit, _ = cuda_ext.find_cuda_toolkit()
    if toolkit is not None:
        print(f"CUDA toolkit: {toolkit} (CUDA_HOME overrides it)")
    try:
        library = cuda_ext.build(verbose=True)
    except BackendUnavailableError as error:
        print(f"python -m prefopt build: {error}", file=sys.stderr)
        return 1
    print(f"CUDA C++ extension built and loaded: {library}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def bench(arguments: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Measure the representative subset on this machine's device and print the table."""
    import shlex
    from pathlib import Path

    from . import bench as benchmarks

    json_path = Path(arguments.json) if arguments.json is not None else None
    plot_dir = Path(arguments.plot) if arguments.plot is not None else None
    if json_path is not None and (json_path.is_dir() or not json_path.parent.is_dir()):
        parser.error(f"--json {arguments.json}: must be a file in an existing directory")
    if plot_dir is not None and plot_dir.exists() and not plot_dir.is_dir():
        parser.error(f"--plot {arguments.plot}: exists and is not a directory")
    unknown = sorted(set(arguments.impl or ()) - set(benchmarks.ALL_IMPLEMENTATION_NAMES))
    if unknown:
        parser.error(f"--impl {unknown[0]!r}: unknown; choose from {', '.join(benchmarks.ALL_IMPLEMENTATION_NAMES)}")
    command = shlex.join(["python", "-m", "prefopt", *(sys.argv[1:] if argv is None else argv)])
    try:
        benchmarks.run(quick=arguments.quick, names=arguments.impl, calls=arguments.calls, json_path=json_path,
                       plot_dir=plot_dir, command=command)
    except benchmarks.MissingExtraError as error:
        print(f"python -m prefopt bench: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="which backends can run here and, for each that cannot, why")
    check_parser = commands.add_parser(
        "check", help="every backend that can run here against the float64 reference, forward and backward: "
                      "the logits path, the fused linear path and the fused DPO and KTO losses")
    check_parser.add_argument("--seed", type=int, default=0)
    check_parser.add_argument("--backend", action="append", choices=CHECKED_BACKENDS,
                              help="check only this backend (repeatable; default: every one that can run here)")
    commands.add_parser("build", help="compile the CUDA C++ extension (csrc/) ahead of time into its cache directory")
    bench_parser = commands.add_parser(
        "bench", help="time and peak memory of the logits path and the fused linear path on this machine, against "
                      "the reference and peers")
    bench_parser.add_argument("--json", metavar="PATH", help="write the raw figures and the environment as JSON")
    bench_parser.add_argument("--plot", metavar="DIR", help="write PNG plots: lines against tokens and vocabulary "
                                                             "where a run sweeps them, else a bar chart per workload "
                                                             "(needs matplotlib: prefopt[bench])")
    bench_parser.add_argument("--quick", action="store_true", help="one small workload: a smoke test")
    bench_parser.add_argument("--calls", type=_positive_int, default=None,
                              help="timed calls per measurement (default: 10 on a GPU; on a CPU, interleaved "
                                   "rounds until each implementation has 5 calls and 10 s were timed, at most 50)")
    bench_parser.add_argument("--impl", action="append", metavar="NAME",
                              help="measure only this implementation (repeatable; of either path, on each path it "
                                   "names one of); the reference always runs")
    arguments = parser.parse_args(argv)
    if arguments.command == "bench":
        return bench(arguments, bench_parser, argv)
    if arguments.command == "info":
        return info()
    if arguments.command == "build":
        return build()
    return check(arguments.seed, arguments.backend)


if __name__ == "__main__":
    sys.exit(main())
