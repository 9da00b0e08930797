"""Forward+backward of per-token log-probs on a GPU, against the byte floor and the peers.

The floor is bytes: read the logits twice (forward, backward) and write the gradient once. Each
candidate's time is reported as achieved bandwidth over that floor and as a fraction of the
measured copy bandwidth of this GPU, next to torch.compile of the reference and TRL's Triton
kernel (`trl.kernels.logprob_entropy.selective_log_softmax_and_entropy`) where it can be loaded.
Figures land in pytest-benchmark's extra_info: run with `pytest benches --benchmark-json=FILE`.
"""

import importlib
import importlib.util
import statistics

import pytest
import torch

import prefopt

pytestmark = pytest.mark.gpu

TOKENS, VOCAB = 16384, 128256
PROMPT_FRACTION = 0.0  # every position scored: the floor counts every row


def cuda_median_seconds(function, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read + write), the practical HBM ceiling."""
    source = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    target = torch.empty_like(source)
    seconds = cuda_median_seconds(lambda: target.copy_(source), repeats=20)
    bandwidth = 2 * source.numel() * source.element_size() / seconds
    del source, target
    return bandwidth


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    logits = (torch.randn(TOKENS, VOCAB, device="cuda") * 4).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
    return logits, labels


def load_trl_kernel():
    """TRL's kernel module, by package or, when TRL's package import needs what is missing
    (datasets, transformers), by its file path alone."""
    name = "trl.kernels.logprob_entropy"
    try:
        return importlib.import_module(name)
    except ImportError:
        spec = importlib.util.find_spec("trl")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = f"{spec.submodule_search_locations[0]}/kernels/logprob_entropy.py"
        file_spec = importlib.util.spec_from_file_location("trl_logprob_entropy", path)
        if file_spec is None:
            return None
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except (ImportError, FileNotFoundError):
            return None
        return module


def reference_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def candidates():
    compiled_reference = torch.compile(reference_logprobs, dynamic=False)

    def prefopt_triton(logits, labels, inplace):
        return prefopt.token_logprobs(logits, labels, backend="triton", inplace_backward=inplace)

    trl_kernel = load_trl_kernel()
    runs = {
        "prefopt-triton": lambda logits, labels: prefopt_triton(logits, labels, False),
        "prefopt-triton-inplace": lambda logits, labels: prefopt_triton(logits, labels, True),
        "prefopt-triton-entropy": lambda logits, labels: sum(
            prefopt.token_logprobs(logits, labels, backend="triton", return_entropy=True)),
        "torch.compile-reference": compiled_reference,
    }
    if trl_kernel is not None:
        runs["trl-selective_log_softmax_and_entropy"] = lambda logits, labels: sum(
            trl_kernel.selective_log_softmax_and_entropy(logits, labels))
    return runs


CANDIDATES = ["prefopt-triton", "prefopt-triton-inplace", "prefopt-triton-entropy", "torch.compile-reference",
              "trl-selective_log_softmax_and_entropy"]


@pytest.mark.parametrize("name", CANDIDATES)
def test_forward_backward_16k_by_128k_bf16(benchmark, name, problem, copy_bandwidth):
    runs = candidates()
    if name not in runs:
        pytest.skip(f"{name}: TRL is not installed here (carry its wheel to the GPU machine)")
    run = runs[name]
    base, labels = problem
    inplace = name.endswith("inplace")
    # The in-place variant overwrites its logits with the gradient, so it gets its own copy; the
    # values it then reads are gradients, which costs the same bytes and arithmetic.
    logits = (base.clone() if inplace else base).requires_grad_(True)

    def step():
        output = run(logits, labels)
        (grad,) = torch.autograd.grad(output.sum(), logits)
        return grad

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    inputs_bytes = torch.cuda.memory_allocated()
    seconds = cuda_median_seconds(step)
    peak_extra = torch.cuda.max_memory_allocated() - inputs_bytes
    benchmark.pedantic(step, rounds=3, iterations=1)

    floor_bytes = 3 * base.numel() * base.element_size()
    achieved = floor_bytes / seconds
    benchmark.extra_info.update({
        "gpu": torch.cuda.get_device_name(),
        "tokens": TOKENS, "vocab": VOCAB, "dtype": "bfloat16",
        "median_ms": seconds * 1e3,
        "floor_bytes": floor_bytes,
        "achieved_bandwidth_TBps": achieved / 1e12,
        "copy_bandwidth_TBps": copy_bandwidth / 1e12,
        "fraction_of_copy_bandwidth": achieved / copy_bandwidth,
        "peak_extra_memory_GB": peak_extra / 1e9,
    })
    print(f"\n{name:<40} {seconds * 1e3:8.2f} ms  {achieved / 1e12:5.2f} TB/s "
          f"= {achieved / copy_bandwidth:5.1%} of copy  peak extra {peak_extra / 1e9:6.2f} GB")
