"""The fused linear path: peak extra host memory at 8192 tokens x H 1024 x V 32000 float32 (explicit
logits of 1 GB), and on a GPU the time of forward+backward against the GEMMs it performs.

On CPU the torch backend must keep its working memory, the peak above the inputs less the
gradients the call returns (grad_hidden and grad_weight, 164 MB, which any method must allocate),
under 10% of the explicit logits; the reference, which materializes them, needs several times
their size. Each measurement runs in a fresh process (measure_linear_memory.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("measure_linear_memory.py")
TOKENS, HIDDEN, VOCAB = 8192, 1024, 32000
WORKING_BOUND = {"torch": 0.10, "reference": None}


def measure(backend: str) -> dict:
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    arguments = [sys.executable, str(SCRIPT), backend, str(TOKENS), str(HIDDEN), str(VOCAB)]
    result = subprocess.run(arguments, env=environment, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", list(WORKING_BOUND))
def test_peak_extra_memory(benchmark, backend):
    figures = benchmark.pedantic(measure, args=(backend,), rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    print(f"\n{backend:<9} peak extra {figures['peak_extra_bytes'] / 2**20:8.1f} MiB = {figures['ratio']:.3f} x the"
          f" logits ({figures['logits_bytes'] / 2**20:.0f} MiB); less the gradients"
          f" ({figures['gradient_bytes'] / 2**20:.0f} MiB): {figures['working_ratio']:.3f} x")
    bound = WORKING_BOUND[backend]
    if bound is None:
        assert figures["ratio"] > 1.0, "the reference is expected to materialize [tokens, V] float32 tensors"
    else:
        assert figures["working_ratio"] <= bound


def gpu_milliseconds(function, calls: int = 5) -> float:
    function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


@pytest.mark.gpu
@pytest.mark.parametrize(("tokens", "hidden_size", "vocab_size"), [(16384, 4096, 128256), (16384, 2048, 248320)])
@pytest.mark.parametrize("ignored_fraction", [0.0, 0.5])
def test_gpu_time_against_the_gemms(benchmark, tokens, hidden_size, vocab_size, ignored_fraction):
    """Records (does not bound: never measured yet) bf16 forward+backward time of the triton
    backend, its peak memory above the inputs, and the cuBLAS time of the three GEMMs it performs
    (logits, grad_hidden, grad_weight) on all rows."""
    from prefopt.linear import linear_sequence_logprobs

    device = torch.device("cuda")
    hidden = torch.randn(1, tokens, hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab_size, hidden_size, device=device) / hidden_size**0.5).bfloat16().requires_grad_(True)
    labels = torch.randint(0, vocab_size, (1, tokens), device=device)
    labels[:, : int(tokens * ignored_fraction)] = -100

    def fused():
        logps = linear_sequence_logprobs(hidden, weight, labels, backend="triton")
        torch.autograd.grad(logps.sum(), (hidden, weight))

    rows, logits = hidden[0], torch.empty(tokens, vocab_size, device=device, dtype=torch.bfloat16)

    def gemms():
        torch.mm(rows, weight.T, out=logits)
        torch.mm(logits, weight)
        torch.mm(logits.T, rows)

    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fused_ms = benchmark.pedantic(gpu_milliseconds, args=(fused,), rounds=1, iterations=1)
    peak = torch.cuda.max_memory_allocated() - before
    gemm_ms = gpu_milliseconds(gemms)
    benchmark.extra_info.update({"fused_ms": fused_ms, "gemm_ms": gemm_ms, "ratio_to_gemms": fused_ms / gemm_ms,
                                 "peak_extra_bytes": peak, "ignored_fraction": ignored_fraction})
    print(f"\n{tokens}x{hidden_size}x{vocab_size} ignored {ignored_fraction}: fused {fused_ms:.1f} ms,"
          f" GEMMs {gemm_ms:.1f} ms ({fused_ms / gemm_ms:.2f}x), peak extra {peak / 2**30:.2f} GiB")
