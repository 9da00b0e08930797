"""Peak extra host memory of one forward+backward, measured in a fresh process.

    python benches/measure_memory.py BACKEND INPLACE TOKENS VOCAB

prints one JSON line: the logits' size and the peak resident memory above what the process held
once its inputs existed. The peak is the kernel's high-water mark of this process image (VmHWM),
so every temporary counts, including those freed before the call returns. (Not ru_maxrss: Linux
carries that across fork and exec, so it would start from the size of whatever launched this
script.) A warm-up on a small problem
first loads libraries and thread pools, so that they are not charged to the measured call.

Run it with MALLOC_MMAP_THRESHOLD_ set (test_memory.py does): glibc otherwise raises its mmap
threshold after the first large free and keeps later chunk-sized blocks resident in its heap,
so the resident size would measure the allocator's caching rather than the live tensors.
"""

import json
import resource
import sys

import torch

import prefopt


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
    logps = prefopt.sequence_logprobs(logits, labels, backend=backend, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(logps.sum(), logits)
    del grad


def main() -> None:
    backend, inplace, tokens, vocab_size = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
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
    print(json.dumps({"backend": backend, "inplace_backward": inplace, "tokens": tokens, "vocab": vocab_size,
                      "logits_bytes": logits_bytes, "peak_extra_bytes": peak - before,
                      "ratio": (peak - before) / logits_bytes}))


if __name__ == "__main__":
    main()
