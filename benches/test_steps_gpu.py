"""A full DPO step and a KTO step on a GPU at Llama-3-8B-like shapes (V 128256, bf16).

DPO: 4 pairs of 2048 tokens (policy logits [8, 2048, 128256]), the first half of every row a
prompt; the step is the policy's forward and backward through prefopt.DPOLoss and the reference
model's forward (its logits given, reduced without gradient inside the loss). KTO: 8 unpaired
examples of the same shape through prefopt.KTOLoss, with the reference logits and the mismatched
KL completions of policy and reference. Each row: median of CUDA events over rotating input sets,
max_memory_allocated above the inputs, and the floor (read the policy's scored rows twice and
every other model's once, write the policy gradient once) over the copy bandwidth measured in the
same run.
"""

import statistics

import pytest
import torch

import prefopt
from conftest import timed_calls
from prefopt import bench
from prefopt.backends import unavailable_reason

pytestmark = pytest.mark.gpu

ROWS, LENGTH, PROMPT, VOCAB = 8, 2048, 1024, 128256
CALLS, WARMUP = timed_calls(default=10), 2
DEVICE = torch.device("cuda")
# (name, log-prob backend, inplace_backward); all but the CPU fallback are headline rows
# (benches/gpu_session.sh measures them with -m headline).
VARIANTS = [
    pytest.param(name, backend, inplace, id=name, marks=[] if backend == "torch" else [pytest.mark.headline])
    for name, backend, inplace in [
        ("reference", "reference", False),
        ("prefopt-triton", "triton", False),
        ("prefopt-triton-inplace", "triton", True),
        ("prefopt-cuda", "cuda", False),
        ("prefopt-torch", "torch", False),
    ]
]


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    return bench.copy_bandwidth(DEVICE)


def logits_and_labels(seed: int, requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (torch.randn(ROWS, LENGTH, VOCAB, device=DEVICE, generator=generator) * 4).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB, (ROWS, LENGTH), device=DEVICE, generator=generator)
    labels[:, :PROMPT] = -100
    return logits.requires_grad_(requires_grad), labels


def measure_step(benchmark, path: str, name: str, step, sets: list, floor_bytes: int, copy_bandwidth: float) -> None:
    """Times ``step`` over the rotating ``sets``, records the figures as row ``path`` of
    implementation ``name`` and prints them."""

    def figures() -> dict:
        seconds, peak = bench.time_calls(lambda i: None, lambda i, _: step(sets[i % len(sets)]), calls=CALLS,
                                         warmup=WARMUP, device=DEVICE)
        median = statistics.median(seconds)
        floor_s = floor_bytes / copy_bandwidth
        return {"gpu": torch.cuda.get_device_name(), "rows": ROWS, "length": LENGTH, "prompt": PROMPT,
                "vocab": VOCAB, "dtype": "bfloat16", "median_s": median, "times_s": seconds,
                "peak_extra_bytes": peak, "floor_bytes": floor_bytes, "floor_s": floor_s,
                "fraction_of_floor": floor_s / median, "copy_bandwidth_bytes_per_s": copy_bandwidth}

    result = benchmark.pedantic(figures, rounds=1, iterations=1)
    benchmark.extra_info.update({"path": path, "implementation": name, **result})
    print(f"\n{path} {name:<24} {result['median_s'] * 1e3:9.2f} ms  {result['fraction_of_floor']:6.1%} of floor"
          f"  peak extra {result['peak_extra_bytes'] / 2**30:6.2f} GiB")


def skip_unless_available(backend: str) -> None:
    reason = unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")


def scored_bytes() -> int:
    """Bytes of the scored rows of one [ROWS, LENGTH, VOCAB] bf16 logits tensor."""
    return ROWS * (LENGTH - PROMPT) * VOCAB * 2


@pytest.mark.parametrize(("name", "backend", "inplace"), VARIANTS)
def test_dpo_step(benchmark, name, backend, inplace, copy_bandwidth):
    skip_unless_available(backend)
    loss_module = prefopt.DPOLoss(beta=0.1, backend=backend, inplace_backward=inplace)
    one_set = 2 * ROWS * LENGTH * VOCAB * 2
    sets = []
    for k in range(bench.rotation_count(one_set, DEVICE)):
        policy, labels = logits_and_labels(2 * k, requires_grad=True)
        reference, _ = logits_and_labels(2 * k + 1, requires_grad=False)
        sets.append((policy, labels, reference))

    def step(inputs):
        policy, labels, reference = inputs
        loss, _ = loss_module(policy, labels, ref_logits=reference)
        (grad,) = torch.autograd.grad(loss, policy)
        return grad

    # Policy: read twice, gradient written once; reference: read once.
    floor_bytes = 3 * scored_bytes() + ROWS * LENGTH * VOCAB * 2
    measure_step(benchmark, "dpo-step", name, step, sets, floor_bytes, copy_bandwidth)


@pytest.mark.parametrize(("name", "backend", "inplace"), VARIANTS)
def test_kto_step(benchmark, name, backend, inplace, copy_bandwidth):
    skip_unless_available(backend)
    loss_module = prefopt.KTOLoss(beta=0.1, backend=backend, inplace_backward=inplace)
    one_set = 4 * ROWS * LENGTH * VOCAB * 2
    desirable = torch.arange(ROWS, device=DEVICE) % 2 == 0
    sets = []
    for k in range(bench.rotation_count(one_set, DEVICE)):
        policy, labels = logits_and_labels(4 * k, requires_grad=True)
        others = [logits_and_labels(4 * k + j, requires_grad=False)[0] for j in (1, 2, 3)]
        sets.append((policy, labels, *others))

    def step(inputs):
        policy, labels, reference, kl, reference_kl = inputs
        loss, _ = loss_module(policy, labels, desirable, ref_logits=reference, kl_logits=kl,
                              ref_kl_logits=reference_kl, kl_labels=labels.roll(1, dims=0))
        (grad,) = torch.autograd.grad(loss, policy)
        return grad

    # Policy: read twice, gradient written once; reference, KL and reference KL: read once each.
    floor_bytes = 5 * scored_bytes() + ROWS * LENGTH * VOCAB * 2
    measure_step(benchmark, "kto-step", name, step, sets, floor_bytes, copy_bandwidth)
