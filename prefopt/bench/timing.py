"""The timers (:func:`time_calls`), the ceilings measured with them (:func:`copy_bandwidth`,
:func:`gemm_seconds`), and one implementation's figures on one workload (:class:`Measurement`):
timed alone (:func:`measure`) or in rounds with the others (:func:`measure_interleaved`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from .floors import fill_floor
from .implementations import REFERENCE, Candidate, Implementation
from .workloads import GEMM_PRODUCTS, LinearWorkload, Workload, dtype_name, make_inputs


@dataclasses.dataclass
class Measurement:
    """The figures of one implementation on one workload. Times in seconds, memory in bytes;
    ``skipped`` holds the reason when it did not run (the figures are then None)."""

    implementation: str
    workload: Workload | LinearWorkload
    device: str
    median_s: float | None = None
    times_s: list[float] = dataclasses.field(default_factory=list)
    peak_extra_bytes: int | None = None
    memory_method: str | None = None
    floor_bytes: int | None = None
    floor_s: float | None = None
    fraction_of_floor: float | None = None
    # Fused linear path, prefopt's backends: the cuBLAS time of the products it performs.
    method_gemm_s: float | None = None
    speedup_vs_reference: float | None = None
    # Interleaved runs (measure_interleaved): [lowest, highest] ratio of the reference's call to
    # this one's within one round, the spread of the speed-up.
    speedup_range: list[float] | None = None
    skipped: str | None = None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict: the workload's path and fields inline, the dtype as its name."""
        figures = dataclasses.asdict(self)
        workload = figures.pop("workload")
        workload["dtype"] = dtype_name(self.workload.dtype)
        return {"path": self.workload.path, **workload, **figures, "logits_bytes": self.workload.logits_bytes}

    @classmethod
    def from_json(cls, row: Mapping[str, object]) -> Measurement:
        """The measurement a :meth:`to_json` dict describes (keys it does not know are ignored)."""
        workload_type = {"logits": Workload, "linear": LinearWorkload}[str(row["path"])]
        workload_fields = {f.name for f in dataclasses.fields(workload_type)}
        # A field a record predates (e.g. mean_entropy) takes its default.
        workload = workload_type(**{k: row[k] for k in workload_fields if k != "dtype" and k in row},
                                 dtype=getattr(torch, str(row["dtype"])))
        own_fields = {f.name for f in dataclasses.fields(cls)} - {"workload"}
        return cls(workload=workload, **{k: row[k] for k in own_fields if k in row})

# ----------------------------------------------------------------------------------------------
# Timers and ceilings


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to rotate over so that together they exceed twice the L2 cache (GPU);
    1 on a CPU."""
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, math.ceil(2 * l2 / max(bytes_per_set, 1)) + 1)


def time_calls(prepare: Callable[[int], object], timed: Callable[[int, object], object], *, calls: int,
               warmup: int, device: torch.device) -> tuple[list[float], int | None]:
    """Run ``prepare(i)`` untimed then ``timed(i, prepared)`` timed, for i in range(warmup + calls).

    Returns the seconds of the last ``calls`` timed parts (CUDA events on a GPU, perf_counter on
    a CPU) and, on a GPU, the largest ``max_memory_allocated`` of a timed part above what was
    allocated as it began (bytes); None on a CPU.
    """
    seconds: list[float] = []
    peak_extra: int | None = 0 if device.type == "cuda" else None
    for i in range(warmup + calls):
        prepared = prepare(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = timed(i, prepared)
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end) / 1e3
            peak_extra = max(peak_extra or 0, torch.cuda.max_memory_allocated(device) - before)
        else:
            begin = time.perf_counter()
            result = timed(i, prepared)
            elapsed = time.perf_counter() - begin
        del result, prepared
        if i >= warmup:
            seconds.append(elapsed)
    return seconds, peak_extra


def copy_bandwidth(device: torch.device, size_bytes: int = 2**30, calls: int = 20) -> float:
    """Bytes per second of a device-to-device copy of ``size_bytes`` (read + write counted),
    the practical memory-bandwidth ceiling of a GPU. Measured, never assumed."""
    source = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    seconds, _ = time_calls(lambda i: None, lambda i, _: target.copy_(source), calls=calls, warmup=3, device=device)
    return 2 * source.numel() * source.element_size() / statistics.median(seconds)


def gemm_seconds(workload: LinearWorkload, device: torch.device, *, calls: int = 5, warmup: int = 2,
                 seed: int = 0) -> dict[str, float]:
    """Median seconds of each matrix product of the fused linear path (GEMM_PRODUCTS) through
    torch.mm (cuBLAS on a GPU) on ``workload``'s scored rows n, in its dtype, on random data and
    rotating operand sets like :func:`measure`: "logits" [n, H] @ [H, V], "grad_hidden" [n, V] @
    [V, H] and "grad_weight" [V, n] @ [n, H], each written into a preallocated output. The floor
    of a fused linear measurement and the ceiling of what prefopt's kernels can reach."""
    n, hidden_size, vocab = workload.scored_rows, workload.hidden, workload.vocab
    operand_bytes = (n * hidden_size + vocab * hidden_size + n * vocab) * workload.element_size
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=generator).to(workload.dtype)

    sets = [(normal(n, hidden_size), normal(vocab, hidden_size), normal(n, vocab))
            for _ in range(rotation_count(operand_bytes, device))]
    outputs = {"logits": torch.empty(n, vocab, device=device, dtype=workload.dtype),
               "grad_hidden": torch.empty(n, hidden_size, device=device, dtype=workload.dtype),
               "grad_weight": torch.empty(vocab, hidden_size, device=device, dtype=workload.dtype)}

    def product(name: str, rows: torch.Tensor, weight: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
        if name == "logits":
            return torch.mm(rows, weight.T, out=outputs[name])
        if name == "grad_hidden":
            return torch.mm(grad_logits, weight, out=outputs[name])
        return torch.mm(grad_logits.T, rows, out=outputs[name])

    medians = {}
    for name in GEMM_PRODUCTS:
        seconds, _ = time_calls(lambda i: None, lambda i, _, name=name: product(name, *sets[i % len(sets)]),
                                calls=calls, warmup=warmup, device=device)
        medians[name] = statistics.median(seconds)
    return medians


# ----------------------------------------------------------------------------------------------
# Measuring


def measure(implementation: Implementation, workload: Workload | LinearWorkload, device: torch.device, *,
            calls: int, warmup: int = 2, candidate: Candidate | None = None, bandwidth: float | None = None,
            gemms: Mapping[str, float] | None = None, seed: int = 0) -> Measurement:
    """Time ``implementation`` on ``workload`` (and on a GPU its peak extra memory and floor).

    ``candidate``: the built callable, to reuse one across workloads (built here otherwise).
    ``bandwidth``: the copy bandwidth in bytes/s from :func:`copy_bandwidth`, for the floor of
    the logits path. ``gemms``: the seconds of each matrix product from :func:`gemm_seconds` on
    the same workload, for the floor of the fused linear path (and, for prefopt's backends, the
    cuBLAS time of the products they perform). A GPU out-of-memory error gives a skipped
    measurement, not an exception.
    """
    result = Measurement(implementation.name, workload, str(device))
    if implementation.unavailable is not None:
        result.skipped = implementation.unavailable
        return result
    run = candidate if candidate is not None else implementation.build()
    sets: list[tuple[torch.Tensor, ...]] = []
    try:
        sets = [make_inputs(workload, device, seed + k) for k in range(rotation_count(workload.input_bytes, device))]
        prepare, timed = _call_steps(run, workload, sets)
        seconds, peak = time_calls(prepare, timed, calls=calls, warmup=warmup, device=device)
    except torch.cuda.OutOfMemoryError as error:
        result.skipped = f"out of GPU memory: {str(error).splitlines()[0]}"
        return result
    finally:
        del sets
    result.times_s = seconds
    result.median_s = statistics.median(seconds)
    if peak is not None:
        result.peak_extra_bytes, result.memory_method = peak, "torch.cuda.max_memory_allocated above the inputs"
    fill_floor(result, implementation, bandwidth, gemms)
    return result


def _call_steps(run: Candidate, workload: Workload | LinearWorkload, sets: Sequence[tuple[torch.Tensor, ...]]
                ) -> tuple[Callable[[int], object], Callable[[int, object], object]]:
    """The (prepare, timed) pair :func:`time_calls` takes for call i of ``run`` on input set
    ``i % len(sets)``: a forward; a backward after an untimed forward; or both, timed together."""
    grad_mode = torch.no_grad if workload.direction == "fwd-nograd" else contextlib.nullcontext

    def forward(i: int) -> torch.Tensor:
        with grad_mode():
            return run(*sets[i % len(sets)])

    def backward(i: int, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        differentiable = [tensor for tensor in sets[i % len(sets)] if tensor.requires_grad]
        return torch.autograd.grad(output, differentiable, torch.ones_like(output))

    if workload.direction in ("fwd", "fwd-nograd"):
        return lambda i: None, lambda i, _: forward(i)
    if workload.direction == "bwd":
        return forward, backward
    return lambda i: None, lambda i, _: backward(i, forward(i))

def failure_reason(workload: Workload | LinearWorkload, error: Exception) -> str:
    """The reason a measurement records when its implementation raised ``error``."""
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"failed at {workload.name()}: {type(error).__name__}: {first_line}"


def measure_interleaved(chosen: Sequence[tuple[Implementation, Candidate]], workload: Workload | LinearWorkload,
                        device: torch.device, *, min_calls: int, max_calls: int, budget_s: float, warmup: int = 1,
                        seed: int = 0) -> list[Measurement]:
    """Time every implementation of ``chosen`` (each with its built callable) on ``workload`` in
    rounds: a round calls each of them once, starting one further along each round, so that a
    change of machine load falls on all of them alike rather than on whichever ran then.

    After ``warmup`` rounds, rounds go on until every implementation has ``min_calls`` timed
    calls and the timed calls of all of them together took ``budget_s`` seconds, or until each
    has ``max_calls``: the run time is bounded, and a fast machine gets more calls. Each
    implementation has its own input set (``make_inputs`` with ``seed``), so one that writes
    its gradient over the logits leaves the others' inputs alone. One that raises is recorded
    as failed and leaves the rounds. Returns one measurement per implementation, in the order of
    ``chosen``, with ``times_s`` in round order; when the reference is among them, each other's
    ``speedup_range`` holds the lowest and highest per-round ratio of the reference's time to its
    own. Floors are not set (a CPU has none here).
    """
    if not 1 <= min_calls <= max_calls:
        raise ValueError(f"min_calls and max_calls must satisfy 1 <= min_calls <= max_calls, got {min_calls}, {max_calls}")
    results = {i.name: Measurement(i.name, workload, str(device)) for i, _ in chosen}
    steps = {}
    for implementation, run in chosen:
        sets = [make_inputs(workload, device, seed + k) for k in range(rotation_count(workload.input_bytes, device))]
        steps[implementation.name] = _call_steps(run, workload, sets)
    active = list(steps)
    timed_s = 0.0
    for round_index in range(warmup + max_calls):
        timed_rounds = round_index - warmup
        if not active or (timed_rounds >= min_calls and timed_s >= budget_s):
            break
        start = round_index % len(active)
        for name in active[start:] + active[:start]:
            prepare, timed = steps[name]
            try:
                (seconds,), _ = time_calls(lambda _, i=round_index: prepare(i), lambda _, p, i=round_index: timed(i, p),
                                           calls=1, warmup=0, device=device)
            except Exception as error:  # noqa: BLE001 - one failing implementation must not end the others' rounds
                results[name].skipped = failure_reason(workload, error)
                active.remove(name)
                del steps[name]  # frees its inputs
                continue
            if timed_rounds >= 0:
                results[name].times_s.append(seconds)
                timed_s += seconds
    for r in results.values():
        if r.skipped is None:
            r.median_s = statistics.median(r.times_s)
    reference = results.get(REFERENCE)
    for r in results.values():
        if r is not reference and reference is not None and r.skipped is None and reference.times_s:
            # Rounds are aligned: every implementation started in the first one, and one that
            # failed stopped for good, so the shorter list is a prefix of the rounds.
            ratios = [base / own for base, own in zip(reference.times_s, r.times_s)]
            r.speedup_range = [min(ratios), max(ratios)]
    return list(results.values())
