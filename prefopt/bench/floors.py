"""What a measurement is held against: its floor (:func:`fill_floor`), the reference
(:func:`fill_speedups`) and, for the fused linear path, its targets (:func:`linear_checks`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .implementations import (CCE, CCE_EXACT, FUSED_FILTERED, LIGER_LINEAR, LINEAR_PEERS, REFERENCE, TRL_CHUNKED,
                              Implementation)
from .workloads import LinearWorkload

if TYPE_CHECKING:
    from .timing import Measurement


def fill_floor(result: Measurement, implementation: Implementation, bandwidth: float | None,
               gemms: Mapping[str, float] | None) -> None:
    """Set the floor of a timed ``result`` and its fraction (see :func:`measure`)."""
    workload = result.workload
    if isinstance(workload, LinearWorkload):
        if gemms is not None:
            result.floor_s = sum(gemms[name] for name in workload.products())
            result.fraction_of_floor = result.floor_s / result.median_s
            performed = (implementation.gemm_products or {}).get(workload.direction)
            if performed is not None:
                result.method_gemm_s = sum(gemms[name] for name in performed)
    elif bandwidth is not None:
        result.floor_bytes = workload.floor_bytes()
        result.floor_s = result.floor_bytes / bandwidth
        result.fraction_of_floor = result.floor_s / result.median_s


def fill_speedups(results: Sequence[Measurement]) -> None:
    """Set each measurement's speed-up: the reference's median time over its own, same workload."""
    reference = {r.workload: r.median_s for r in results if r.implementation == REFERENCE and r.median_s}
    for r in results:
        base = reference.get(r.workload)
        if base is not None and r.median_s:
            r.speedup_vs_reference = base / r.median_s


# The fused linear path's two target problems, measured first and shown first: (tokens, hidden,
# vocab), bf16.
LINEAR_TARGET_SHAPES = ((16384, 4096, 128256), (16384, 2048, 248320))
# prefopt's GPU backends of the fused linear path, each held to the targets of linear_checks on
# random logits; FUSED_FILTERED is checked on peaked logits only, where the filter has tiles to
# leave out.
CHECKED = ("prefopt-triton", "prefopt-cuda", "prefopt-triton-fused")
# Time over the cuBLAS time of the products a backend performs: forward+backward (4 products),
# forward alone (1).
GEMM_FACTORS = {"fwd+bwd": 1.10, "fwd": 1.05, "fwd-nograd": 1.05}
# With the gradient filter on peaked logits, time over Cut Cross-Entropy's default (filtering too).
FILTERED_VS_CCE = 0.8


def linear_checks(results: Sequence[Measurement]) -> list[dict[str, object]]:
    """The fused linear path's targets for prefopt's GPU backends (``CHECKED``) on every fused
    linear workload measured (``target_shape`` marks LINEAR_TARGET_SHAPES).

    Forward+backward: time at most Cut Cross-Entropy's (default and exact, each a check), at
    most 0.9x TRL's chunked log-prob function's, at most 0.4x Liger's fused linear cross entropy;
    peak extra memory at most the lowest peer's; time at most GEMM_FACTORS x the cuBLAS time of
    the products it performs; with half the rows ignored, time at most 0.55x that of the same
    shape with every row valid. Forward alone (with and without the autograd graph): time at most
    GEMM_FACTORS x its product. On peaked logits (``mean_entropy`` set), FUSED_FILTERED
    (grad_filter_eps = 2^-12) at most FILTERED_VS_CCE x CCE's default.

    Returns one dict per check: the implementation, the workload, the check, ``value`` and ``bound`` (seconds or
    bytes) and ``passed`` (None, with ``note`` saying why, when a figure is missing). Timing
    targets are recorded here, never asserted: they belong in benchmarks, not in tests.
    """
    measured = {(r.workload, r.implementation): r for r in results
                if isinstance(r.workload, LinearWorkload) and r.median_s is not None}
    checks: list[dict[str, object]] = []
    for (workload, name), subject in measured.items():
        peaked = workload.mean_entropy is not None
        if name not in (*CHECKED, FUSED_FILTERED) or (name == FUSED_FILTERED) != peaked:
            continue

        def add(check: str, value: float | int | None, bound: float | None, missing: str) -> None:
            known = value is not None and bound is not None
            checks.append({
                "implementation": name, "workload": workload.name(), "tokens": workload.tokens, "hidden": workload.hidden,
                "vocab": workload.vocab, "ignored_fraction": workload.ignored_fraction,
                "direction": workload.direction, "mean_entropy": workload.mean_entropy,
                "target_shape": (workload.tokens, workload.hidden, workload.vocab) in LINEAR_TARGET_SHAPES,
                "check": check, "value": value, "bound": bound, "passed": value <= bound if known else None,
                "note": None if known else missing,
            })

        def against(peer: str, factor: float, check: str) -> None:
            other = measured.get((workload, peer))
            add(check, subject.median_s, None if other is None else factor * other.median_s, f"{peer} not measured")

        factor = GEMM_FACTORS[workload.direction]
        add(f"time <= {factor:.2f} x cuBLAS time of the products it performs", subject.median_s,
            None if subject.method_gemm_s is None else factor * subject.method_gemm_s, "no cuBLAS timing in this run")
        if workload.direction != "fwd+bwd":
            continue
        if peaked:
            against(CCE, FILTERED_VS_CCE, f"time with grad_filter_eps=2^-12 <= {FILTERED_VS_CCE} x Cut "
                                          "Cross-Entropy's default (peaked logits)")
            continue
        for peer, peer_factor, check in (
                (CCE, 1.0, "time <= Cut Cross-Entropy's (default: filters small gradients)"),
                (CCE_EXACT, 1.0, "time <= Cut Cross-Entropy's without filtering"),
                (TRL_CHUNKED, 0.9, "time <= 0.9 x TRL's chunked log-prob function's"),
                (LIGER_LINEAR, 0.4, "time <= 0.4 x Liger-Kernel's fused linear cross entropy")):
            against(peer, peer_factor, check)
        peaks = [other.peak_extra_bytes for peer in LINEAR_PEERS
                 if (other := measured.get((workload, peer))) is not None and other.peak_extra_bytes is not None]
        add("peak extra memory <= the lowest peer's", subject.peak_extra_bytes, min(peaks) if peaks else None,
            "no peer's peak memory measured")
        if workload.ignored_fraction == 0.5:
            all_valid = measured.get((dataclasses.replace(workload, ignored_fraction=0.0), name))
            add("time with half the rows ignored <= 0.55 x all rows valid", subject.median_s,
                None if all_valid is None else 0.55 * all_valid.median_s, "the all-valid workload was not measured")
    return checks
