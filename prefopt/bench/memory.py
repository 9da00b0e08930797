"""Peak extra host memory of one forward+backward on a CPU, measured in a fresh process.

    python -m prefopt.bench.memory logits BACKEND INPLACE TOKENS VOCAB
    python -m prefopt.bench.memory linear BACKEND TOKENS HIDDEN VOCAB

prints one JSON line: for the logits path (``prefopt.sequence_logprobs``, INPLACE 1 for
``inplace_backward=True``) the logits' size; for the fused linear path
(``prefopt.logprobs.linear.linear_sequence_logprobs``) the size the explicit float32 logits [TOKENS, VOCAB]
would take and the size of the gradients the call must return (grad_hidden and grad_weight,
float32); for both, the peak resident memory above what the process held once its inputs existed.
The inputs are float32 with a quarter of the rows ignored (a prompt).

The peak is the kernel's high-water mark of this process image (VmHWM), so every temporary counts,
including those freed before the call returns. (Not ru_maxrss: Linux carries that across fork and
exec, so it would start from the size of whatever launched this process.) A warm-up on a small
problem first loads libraries and thread pools, so that they are not charged to the measured call.

Run it with MALLOC_MMAP_THRESHOLD_ set (:func:`fresh_process` does): glibc otherwise raises its
mmap threshold after the first large free and keeps later chunk-sized blocks resident in its heap,
so the resident size would measure the allocator's caching rather than the live tensors.

prefopt.bench does not import this module: it is the fresh process's ``python -m`` entry, which
runpy warns about (and would execute twice) when its package has imported it first.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence

import torch

from ..logprobs.linear import linear_sequence_logprobs
from ..logprobs.api import sequence_logprobs
from .workloads import LinearWorkload, Workload

PATHS = ("logits", "linear")


def fresh_process(path: str, arguments: Sequence[object]) -> dict[str, object]:
    """The figures of ``python -m prefopt.bench.memory PATH ARGUMENTS...``, run in a fresh process
    with glibc returning freed blocks to the system."""
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    command = [sys.executable, "-m", __name__, path, *map(str, arguments)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_cpu_memory(workload: Workload | LinearWorkload, script_args: Sequence[str]) -> int:
    """Peak extra resident bytes of one float32 forward+backward of ``workload``'s shape, in a
    fresh process (a quarter of the rows ignored there) given ``script_args``
    (Implementation.memory_script_args), then the shape."""
    shape = ((workload.tokens, workload.vocab) if isinstance(workload, Workload)
             else (workload.tokens, workload.hidden, workload.vocab))
    return int(fresh_process(workload.path, [*script_args, *shape])["peak_extra_bytes"])


def cpu_memory_unavailable(workload: Workload | LinearWorkload) -> str | None:
    """Why the CPU memory figure of ``workload`` cannot be measured (None when it can): the fresh
    process measures float32 fwd+bwd with a quarter of the rows ignored."""
    if (workload.dtype, workload.direction, workload.ignored_fraction) != (torch.float32, "fwd+bwd", 0.25):
        return "CPU memory is measured for float32 fwd+bwd with 25% ignored rows only"
    return None


# ----------------------------------------------------------------------------------------------
# The fresh process


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line: peak memory needs Linux")


def forward_backward(logits: torch.Tensor, labels: torch.Tensor, backend: str, inplace: bool) -> None:
    logps = sequence_logprobs(logits, labels, backend=backend, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(logps.sum(), logits)
    del grad


def linear_forward_backward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, backend: str) -> None:
    logps = linear_sequence_logprobs(hidden, weight, labels, backend=backend)
    grads = torch.autograd.grad(logps.sum(), (hidden, weight))
    del grads


def measure_logits(backend: str, inplace: bool, tokens: int, vocab_size: int) -> dict[str, object]:
    """The logits path's figures, in this process (which must be a fresh one)."""
    torch.manual_seed(0)
    warm_logits = torch.randn(1, 64, vocab_size, requires_grad=True)
    forward_backward(warm_logits, torch.randint(0, vocab_size, (1, 64)), backend, inplace)
    del warm_logits

    logits = torch.randn(1, tokens, vocab_size).requires_grad_(True)
    labels = torch.randint(0, vocab_size, (1, tokens))
    labels[:, : tokens // 4] = -100  # a prompt
    before = resident_bytes()
    forward_backward(logits, labels, backend, inplace)
    peak = peak_resident_bytes()
    logits_bytes = logits.numel() * logits.element_size()
    return {"backend": backend, "inplace_backward": inplace, "tokens": tokens, "vocab": vocab_size,
            "logits_bytes": logits_bytes, "peak_extra_bytes": peak - before, "ratio": (peak - before) / logits_bytes}


def measure_linear(backend: str, tokens: int, hidden_size: int, vocab_size: int) -> dict[str, object]:
    """The fused linear path's figures, in this process (which must be a fresh one)."""
    torch.manual_seed(0)
    warm_weight = torch.randn(vocab_size, hidden_size).requires_grad_(True)
    linear_forward_backward(torch.randn(1, 64, hidden_size, requires_grad=True), warm_weight,
                            torch.randint(0, vocab_size, (1, 64)), backend)
    del warm_weight

    hidden = torch.randn(1, tokens, hidden_size).requires_grad_(True)
    weight = (torch.randn(vocab_size, hidden_size) / hidden_size**0.5).requires_grad_(True)
    labels = torch.randint(0, vocab_size, (1, tokens))
    labels[:, : tokens // 4] = -100  # a prompt
    before = resident_bytes()
    linear_forward_backward(hidden, weight, labels, backend)
    peak = peak_resident_bytes()
    logits_bytes = tokens * vocab_size * 4
    gradient_bytes = (hidden.numel() + weight.numel()) * 4
    extra = peak - before
    return {"backend": backend, "tokens": tokens, "hidden": hidden_size, "vocab": vocab_size,
            "logits_bytes": logits_bytes, "gradient_bytes": gradient_bytes, "peak_extra_bytes": extra,
            "working_bytes": extra - gradient_bytes, "working_ratio": (extra - gradient_bytes) / logits_bytes,
            "ratio": extra / logits_bytes}


def main(argv: Sequence[str]) -> int:
    usage = __doc__.split("\n\n")[1]
    if len(argv) != 5 or argv[0] not in PATHS:
        print(f"usage:\n{usage}", file=sys.stderr)
        return 2
    if argv[0] == "logits":
        backend, inplace, tokens, vocab_size = argv[1], argv[2] == "1", int(argv[3]), int(argv[4])
        figures = measure_logits(backend, inplace, tokens, vocab_size)
    else:
        figures = measure_linear(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
