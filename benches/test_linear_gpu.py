"""The fused linear path on a GPU: per-token log-probs from hidden states and the LM-head weight.

Workloads (bf16), in the order a run cut short needs them: the two target problems (16384 tokens
x H 4096 x V 128256 and 16384 x 2048 x 248320) forward+backward with every row scored and with
half of them ignored, then on peaked logits (mean entropy PEAKED_ENTROPY nats, a trained model's:
prefopt.bench.workloads.peaked_head), where a gradient filter has tiles to leave out; H 2048 and
4096 x V 32000-262144 at 16384 tokens; 4096-16384 tokens at V 128256; then the forward alone
(with the autograd graph, a policy's) and under torch.no_grad (a reference model's), and the
remaining half-ignored shapes. Implementations: prefopt's triton and torch backends, the
explicit-logits reference (bf16 matmul, float32 log-softmax, gather) and
torch.compile of it, TRL's chunked log-prob function, Liger-Kernel's fused linear cross entropy
and Cut Cross-Entropy (default and without gradient filtering), each skipped with the reason when
it cannot run (prefopt.bench.linear_implementations). prefopt-triton-fused-filtered
(grad_filter_eps = 2^-12) runs on the peaked workloads only: on random logits it has nothing to
leave out. A peaked row also records its inputs' measured mean entropy, the fused kernels' tiles
for the shape and the fraction of those gradient tiles below 2^-12 (``peaked_profile``).

Each row: median of CUDA events over rotating input sets, max_memory_allocated above the inputs,
the floor (cuBLAS time of the products the direction needs on the scored rows, measured in the
same run) and the fraction of it achieved; for prefopt's backends also the cuBLAS time of the
products they actually perform. Figures land in extra_info (and, with PREFOPT_BENCH_RECORD, in
its file: see conftest.py); the targets are computed from them by prefopt.bench.linear_checks
in benches/report.py: recorded as passed or failed, never asserted here.
"""

import pytest
import torch

from conftest import timed_calls
from prefopt import bench

pytestmark = pytest.mark.gpu

TOKENS = (4096, 8192, 16384)
HIDDEN_SIZES = (4096, 2048)
VOCABS = (32000, 128256, 151936, 262144)
PIVOT_TOKENS, PIVOT_VOCAB = 16384, 128256
# Mean entropy (nats) of the peaked workloads: a trained language model's is 1.5-3.
PEAKED_ENTROPY = 2.0
# What runs on peaked logits: the filtered backend, the unfiltered ones and the peers it is
# measured against.
PEAKED_IMPLEMENTATIONS = (bench.FUSED_FILTERED, "prefopt-triton-fused", "prefopt-triton", bench.CCE, bench.CCE_EXACT,
                          bench.TRL_CHUNKED)
CALLS, WARMUP = timed_calls(default=5), 2
DEVICE = torch.device("cuda")
# The rows benches/gpu_session.sh measures first (-m headline): the two target shapes,
# forward+backward, every row scored, prefopt's GPU backends and the peers.
HEADLINE_IMPLEMENTATIONS = ("prefopt-triton", "prefopt-cuda", "prefopt-triton-fused", bench.TRL_CHUNKED, bench.CCE,
                            bench.LIGER_LINEAR)


def shapes() -> list[tuple[int, int, int]]:
    """(tokens, hidden, vocab): the target shapes first, then every vocabulary at PIVOT_TOKENS and
    every token count at PIVOT_VOCAB, for each hidden size; no repeats."""
    listed = [*bench.LINEAR_TARGET_SHAPES]
    listed += [(PIVOT_TOKENS, h, v) for h in HIDDEN_SIZES for v in VOCABS]
    listed += [(t, h, PIVOT_VOCAB) for h in HIDDEN_SIZES for t in TOKENS]
    return sorted(set(listed), key=listed.index)


def workloads() -> list[bench.LinearWorkload]:
    def at(shape, ignored, direction):
        return bench.LinearWorkload(*shape, dtype=torch.bfloat16, ignored_fraction=ignored, direction=direction)

    ordered = [at(shape, ignored, "fwd+bwd") for shape in bench.LINEAR_TARGET_SHAPES for ignored in (0.0, 0.5)]
    ordered += [bench.LinearWorkload(*shape, dtype=torch.bfloat16, mean_entropy=PEAKED_ENTROPY)
                for shape in bench.LINEAR_TARGET_SHAPES]
    ordered += [at(shape, 0.0, "fwd+bwd") for shape in shapes()]
    ordered += [at(shape, 0.0, direction) for direction in ("fwd", "fwd-nograd") for shape in shapes()]
    ordered += [at(shape, 0.5, "fwd+bwd") for shape in shapes()]
    return sorted(set(ordered), key=ordered.index)


def row_id(workload: bench.LinearWorkload, name: str) -> str:
    peaked = "" if workload.mean_entropy is None else f"-entropy{workload.mean_entropy:g}"
    return (f"{workload.direction}-{workload.tokens}x{workload.hidden}x{workload.vocab}"
            f"-ignored{round(workload.ignored_fraction * 100)}{peaked}-{name}")


def runs_on(workload: bench.LinearWorkload, name: str) -> bool:
    return (name in PEAKED_IMPLEMENTATIONS) if workload.mean_entropy is not None else name != bench.FUSED_FILTERED


# Workload-major: every implementation of a workload before the next workload, so a run cut
# short has complete comparisons for the workloads it reached.
def is_headline(workload: bench.LinearWorkload, name: str) -> bool:
    shape = (workload.tokens, workload.hidden, workload.vocab)
    if shape not in bench.LINEAR_TARGET_SHAPES or workload.direction != "fwd+bwd" or workload.ignored_fraction:
        return False
    if workload.mean_entropy is not None:  # the filter's target: against CCE's default
        return name in (bench.FUSED_FILTERED, bench.CCE)
    return name in HEADLINE_IMPLEMENTATIONS


ROWS = [pytest.param(w, name, id=row_id(w, name), marks=[pytest.mark.headline] if is_headline(w, name) else [])
        for w in workloads() for name in bench.LINEAR_IMPLEMENTATION_NAMES if runs_on(w, name)]


@pytest.fixture(scope="module")
def candidates() -> dict[str, tuple[bench.Implementation, bench.Candidate | None, str | None]]:
    """Each implementation with its callable built once, or the reason it cannot run: not
    installed, or failing to import here (a peer's import error is a reason, not a failure)."""
    built = {}
    for implementation in bench.linear_implementations(DEVICE):
        reason, candidate = implementation.unavailable, None
        if reason is None:
            try:
                candidate = implementation.build()
            except Exception as error:  # noqa: BLE001 - reported as the skip reason of every row
                first_line = str(error).splitlines()[0] if str(error) else ""
                reason = f"cannot be set up here: {type(error).__name__}: {first_line}"
        built[implementation.name] = (implementation, candidate, reason)
    return built


@pytest.fixture(scope="module")
def gemm_times() -> dict[tuple, dict[str, float]]:
    """cuBLAS seconds of each product, per (scored rows, hidden, vocab, dtype), measured once."""
    return {}


@pytest.fixture(scope="module")
def peaked_profiles() -> dict[bench.LinearWorkload, dict[str, float]]:
    """``bench.peaked_profile`` of each peaked workload's first input set, computed once."""
    return {}


@pytest.mark.parametrize(("workload", "name"), ROWS)
def test_fused_linear_path(benchmark, workload, name, candidates, gemm_times, peaked_profiles):
    implementation, candidate, reason = candidates[name]
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    key = (workload.scored_rows, workload.hidden, workload.vocab, workload.dtype)
    if key not in gemm_times:
        gemm_times[key] = bench.gemm_seconds(workload, DEVICE)
    gemms = gemm_times[key]
    # pytest-benchmark's own time is the whole measurement (warm-up and input creation too); the
    # figures to read are the CUDA-event median and the rest in extra_info.
    result = benchmark.pedantic(bench.measure, args=(implementation, workload, DEVICE),
                                kwargs={"calls": CALLS, "warmup": WARMUP, "candidate": candidate, "gemms": gemms},
                                rounds=1, iterations=1)
    torch.cuda.empty_cache()  # the next row may need the memory this one's allocator kept
    if result.skipped is not None:
        pytest.skip(f"{name}: {result.skipped}")
    benchmark.extra_info.update({**result.to_json(), "gpu": torch.cuda.get_device_name(),
                                 "gemm_seconds": gemms})
    if workload.mean_entropy is not None:
        if workload not in peaked_profiles:
            from prefopt.kernels.linear_stats_fwd import tile_config

            hidden, weight, labels = bench.make_inputs(workload, DEVICE)
            with torch.no_grad():
                # The tiles the filtered backend chose for this shape (timed once, then kept).
                tiles = tile_config(hidden, weight, None, labels, logit_scale=1.0, temperature=1.0, softcap=None)
                peaked_profiles[workload] = {**bench.peaked_profile(hidden, weight, labels, bench.FILTER_EPS,
                                                                    (tiles.block_m, tiles.block_n)),
                                             "tiles": list(tiles)}
            del hidden, weight, labels
            torch.cuda.empty_cache()
        benchmark.extra_info.update(peaked_profiles[workload])
    method = "" if result.method_gemm_s is None else f"  {result.median_s / result.method_gemm_s:5.2f}x its GEMMs"
    profile = benchmark.extra_info.get("skipped_tile_fraction")
    filtered = "" if profile is None else (f"  entropy {benchmark.extra_info['mean_entropy']:.2f} nats,"
                                           f" {profile:.1%} of tiles below 2^-12")
    print(f"\n{name:<34} {workload.name():<44} {result.median_s * 1e3:9.2f} ms  {result.fraction_of_floor:6.1%} of"
          f" floor{method}  peak extra {result.peak_extra_bytes / 2**30:6.2f} GiB{filtered}")
