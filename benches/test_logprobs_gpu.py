"""The logits path on a GPU: forward, backward and forward+backward of per-token log-probs.

Workloads (bf16): 4096-32768 tokens at V 128256 and V 32000-262144 at 16384 tokens, every row
scored or half of them ignored. Implementations: the plain-PyTorch reference, torch.compile of
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

from prefopt import bench

pytestmark = pytest.mark.gpu

TOKENS = (4096, 8192, 16384, 32768)
VOCABS = (32000, 128256, 151936, 262144)
# forward+backward first, so that a run cut short (benches/gpu_session.sh caps each part) has it.
WORKLOADS = [
    workload
    for direction, ignored in [("fwd+bwd", 0.0), ("fwd+bwd", 0.5), ("fwd", 0.0), ("bwd", 0.0), ("fwd", 0.5),
                               ("bwd", 0.5)]
    for workload in bench.sweep(TOKENS, VOCABS, 16384, 128256, dtype=torch.bfloat16, ignored_fraction=ignored,
                                direction=direction)
]
CALLS = 10
DEVICE = torch.device("cuda")


def workload_id(workload: bench.Workload) -> str:
    return f"{workload.direction}-{workload.tokens}x{workload.vocab}-ignored{round(workload.ignored_fraction * 100)}"


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


@pytest.mark.parametrize("name", bench.IMPLEMENTATION_NAMES)
@pytest.mark.parametrize("workload", WORKLOADS, ids=workload_id)
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
