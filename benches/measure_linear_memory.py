"""Peak extra host memory of one forward+backward of the fused linear path, in a fresh process.

    python benches/measure_linear_memory.py BACKEND TOKENS HIDDEN VOCAB

prints one JSON line: the size the explicit float32 logits [TOKENS, VOCAB] would take, the size
of the gradients the call must return (grad_hidden and grad_weight, float32), and the peak
resident memory above what the process held once its inputs existed (VmHWM, see
measure_memory.py; every temporary counts, including those freed before the call returns). A warm-up on a small problem
first loads libraries and thread pools. Run it with MALLOC_MMAP_THRESHOLD_ set, for the reason
given in measure_memory.py.
"""

import json
import sys

import torch
from measure_memory import peak_resident_bytes, resident_bytes

import prefopt.logprobs.linear


def forward_backward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, backend: str) -> None:
    logps = prefopt.logprobs.linear.linear_sequence_logprobs(hidden, weight, labels, backend=backend)
    grads = torch.autograd.grad(logps.sum(), (hidden, weight))
    del grads


def main() -> None:
    backend, tokens, hidden_size, vocab_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    warm_weight = torch.randn(vocab_size, hidden_size).requires_grad_(True)
    forward_backward(torch.randn(1, 64, hidden_size, requires_grad=True), warm_weight,
                     torch.randint(0, vocab_size, (1, 64)), backend)
    del warm_weight

    hidden = torch.randn(1, tokens, hidden_size).requires_grad_(True)
    weight = (torch.randn(vocab_size, hidden_size) / hidden_size**0.5).requires_grad_(True)
    labels = torch.randint(0, vocab_size, (1, tokens))
    labels[:, : tokens // 4] = -100  # a prompt
    before = resident_bytes()
    forward_backward(hidden, weight, labels, backend)
    peak = peak_resident_bytes()
    logits_bytes = tokens * vocab_size * 4
    gradient_bytes = (hidden.numel() + weight.numel()) * 4
    extra = peak - before
    print(json.dumps({"backend": backend, "tokens": tokens, "hidden": hidden_size, "vocab": vocab_size,
                      "logits_bytes": logits_bytes, "gradient_bytes": gradient_bytes, "peak_extra_bytes": extra,
                      "working_bytes": extra - gradient_bytes, "working_ratio": (extra - gradient_bytes) / logits_bytes,
                      "ratio": extra / logits_bytes}))


if __name__ == "__main__":
    main()
