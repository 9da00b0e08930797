"""The logits path on a GPU: forward, backward and forward+backward of per-token log-probs.

Workloads (bf16): the headline rows first (forward+backward at 16384 x 128256, 8192 x 262144 and
512 x 128256, marked ``headline``), then 4096-32768 tokens at V 128256 and V 32000-262144 at 16384
tokens, every row scored or half of them ignored. Implementations: the plain-PyTorch reference, torch.compile of
it, prefopt's triton (also in place, and with the entropy), cuda and torch backends, TRL's
`selective_log_softmax_and_entropy` and Liger's cross entropy (skipped with the reason when they
cannot run). Timing, rotation of the inputs, memory and the floor are prefopt.bench's: median of
CUDA events, inputs rotated past the L2 cache, max_memory_allocated above the inputs, the floor
as bytes over the copy bandwidth measured in the same run. Figures land in pytest-benchmark's
extra_info (pytest-benchmark's own time is the whole measurement, warm-up included): run with
`pytest benches -m gpu --benchmark-json=FILE`.
"""

import pytest
import torch

from conftest import timed_calls
from prefopt import bench

pytestmark = pytest.mark.gpu

TOKENS = (4096, 8192, 16384, 32768)
VOCABS = (32000, 128256, 151936, 262144)
# The rows benches/gpu_session.sh measures first (-m headline): forward+backward at the shapes the
# kernel targets name, every row scored and half of them ignored, prefopt's GPU backends against the
# reference and the peers.
HEADLINE_SHAPES = ((16384, 128256), (8192, 262144), (512, 128256))
HEADLINE_IMPLEMENTATIONS = ("prefopt-triton", "prefopt-triton-inplace", "prefopt-cuda", bench.REFERENCE,
                            "trl-selective_log_softmax_and_entropy", "liger-cross_entropy")
HEADLINE_WORKLOADS = [bench.Workload(tokens, vocab, torch.bfloat16, ignored, "fwd+bwd")
                      for tokens, vocab in HEADLINE_SHAPES for ignored in (0.0, 0.5)]
# forward+backward first, so that a run cut short (benches/gpu_session.sh caps each part) has it.
WORKLOADS = list(dict.fromkeys(HEADLINE_WORKLOADS + [
    workload
    for direction, ignored in [("fwd+bwd", 0.0), ("fwd+bwd", 0.5), ("fwd", 0.0), ("bwd", 0.0), ("fwd", 0.5),
                               ("bwd", 0.5)]
    for workload in bench.sweep(TOKENS, VOCABS, 16384, 128256, dtype=torch.bfloat16, ignored_fraction=ignored,
                                direction=direction)
]))
CALLS = timed_calls(default=10)
DEVICE = torch.device("cuda")


def workload_id(workload: bench.Workload) -> str:
    return f"{workload.direction}-{workload.tokens}x{workload.vocab}-ignored{round(workload.ignored_fraction * 100)}"


def is_headline(workload: bench.Workload, name: str) -> bool:
    return workload in HEADLINE_WORKLOADS and name in HEADLINE_IMPLEMENTATIONS


# Workload-major: every implementation of a workload before the next workload.
ROWS = [pytest.param(workload, name, id=f"{workload_id(workload)}-{name}",
                     marks=[pytest.mark.headline] if is_headline(workload, name) else [])
        for workload in WORKLOADS for name in bench.IMPLEMENTATION_NAMES]


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read + write): the floor's ceiling."""
    return bench.copy_bandwidth(DEVICE)


@pytest.fixture(scope="module")
def candidates() -> dict[str, tuple[bench.Implementation, bench.Candidate | None]]:
    """Each implementation with its callable built once (torch.compile, peers' imports)."""
    built = {}
    for implementation in bench.implementations(DEVICE):
        built[implementation.name] = (implementation,
                                      None if implementation.unavailable else implementation.build())
    return built


@pytest.mark.parametrize(("workload", "name"), ROWS)
def test_logits_path(benchmark, workload, name, candidates, copy_bandwidth):
    implementation, candidate = candidates[name]
    if implementation.unavailable is not None:
        pytest.skip(f"{name}: {implementation.unavailable}")
    # pytest-benchmark's own time is the whole measurement (warm-up and input creation too); the
    # figures to read are the CUDA-event median and the rest in extra_info.
    result = benchmark.pedantic(bench.measure, args=(implementation, workload, DEVICE),
                                kwargs={"calls": CALLS, "candidate": candidate, "bandwidth": copy_bandwidth},
                                rounds=1, iterations=1)
    if result.skipped is not None:
        pytest.skip(f"{name}: {result.skipped}")
    benchmark.extra_info.update({
        **result.to_json(),
        "gpu": torch.cuda.get_device_name(),
        "copy_bandwidth_bytes_per_s": copy_bandwidth,
        "achieved_bandwidth_bytes_per_s": result.floor_bytes / result.median_s,
    })
    print(f"\n{name:<40} {workload.name():<42} {result.median_s * 1e3:9.2f} ms  "
          f"{result.fraction_of_floor:6.1%} of floor  peak extra {result.peak_extra_bytes / 2**30:6.2f} GiB")
