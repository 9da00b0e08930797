"""The main job, ``python -m prefopt bench`` (:func:`run`): which implementations run
(:func:`chosen_implementations`), for how many calls (:class:`CallBudget`), on a GPU each alone
and on a CPU in interleaved rounds, then the CPU memory in fresh processes."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import torch

from .floors import fill_speedups
from .implementations import REFERENCE, Candidate, Implementation, implementations, linear_implementations
from .plots import pyplot, write_plots
from .report import environment, format_table, write_json
from .timing import Measurement, copy_bandwidth, failure_reason, gemm_seconds, measure, measure_interleaved
from .workloads import LinearWorkload, Workload, default_workloads


# Left out of the default run on a GPU, measured when --impl names them: (path, name) -> why.
DEFAULT_RUN_LEAVES_OUT = {
    ("linear", "torch.compile(reference)"): "left out of the default run (it compiles one graph per shape, minutes "
                                            "in all); --impl 'torch.compile(reference)' measures it",
}


def chosen_implementations(device: torch.device, names: Sequence[str] | None = None) -> dict[str, list[Implementation]]:
    """Per path ("logits", "linear"), the implementations :func:`run` measures on ``device``.

    By default every one, those in DEFAULT_RUN_LEAVES_OUT marked unavailable with the reason.
    With ``names``, those named and the reference (what the speed-ups are relative to), on each
    path where any of them is named; a path none of them belongs to is left out.
    """
    chosen = {}
    for path, candidates in (("logits", implementations(device)), ("linear", linear_implementations(device))):
        if names is None:
            chosen[path] = [dataclasses.replace(i, unavailable=DEFAULT_RUN_LEAVES_OUT[(path, i.name)])
                            if i.unavailable is None and (path, i.name) in DEFAULT_RUN_LEAVES_OUT else i
                            for i in candidates]
        elif any(i.name in names for i in candidates):
            chosen[path] = [i for i in candidates if i.name in names or i.name == REFERENCE]
    return chosen


@dataclasses.dataclass(frozen=True)
class CallBudget:
    """How long a CPU run times one workload (:func:`measure_interleaved`): rounds until every
    implementation has ``min_calls`` timed calls and the timed calls took ``seconds`` in all, or
    until each has ``max_calls``."""

    min_calls: int
    max_calls: int
    seconds: float


# About 10 s per workload on an idle 2-core machine (7-8 rounds there); on a loaded one, 5 rounds
# however long they take.
CPU_CALLS = CallBudget(min_calls=5, max_calls=50, seconds=10.0)
# --quick: a smoke test of the machinery, not a measurement.
CPU_QUICK_CALLS = CallBudget(min_calls=3, max_calls=10, seconds=1.0)


def _load_average() -> float | None:
    """The one-minute load average (None where the OS has none): how busy the machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run(*, device: torch.device | None = None, quick: bool = False, names: Sequence[str] | None = None,
        calls: int | None = None, json_path: Path | None = None, plot_dir: Path | None = None,
        command: str | None = None, progress: TextIO | None = None, out: TextIO | None = None) -> list[Measurement]:
    """``python -m prefopt bench``: measure the default subset of both paths on ``device`` (the
    GPU when there is one), print the table to ``out`` and progress to ``progress``, and write
    ``json_path`` and the plots under ``plot_dir`` when given (``out``/``progress`` default to
    the current sys.stdout/sys.stderr). ``names`` restricts the implementations
    (:func:`chosen_implementations`).

    On a GPU each implementation is timed alone, ``calls`` times (default 10) with CUDA events,
    which measure the device and not the host's load. On a CPU the implementations of each
    workload are timed in interleaved rounds (:func:`measure_interleaved`), so that machine load
    falls on all of them alike: ``calls`` rounds when given, else rounds within CPU_CALLS's
    budget (CPU_QUICK_CALLS with ``quick``). Progress lists only what runs here; what cannot is
    listed once per path, with the reason, under the tables.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out, progress = out or sys.stdout, progress or sys.stderr
    if plot_dir is not None:
        pyplot()  # fail before measuring, not after
    on_gpu = device.type == "cuda"
    load_before = _load_average()
    chosen = chosen_implementations(device, names)
    workloads = [w for w in default_workloads(device, quick) if w.path in chosen]
    runnable = sum(i.unavailable is None for w in workloads for i in chosen[w.path])
    not_here = sorted({i.name for w in workloads for i in chosen[w.path] if i.unavailable is not None})
    print(f"{runnable} measurements run here"
          + (f"; not run here, each with its reason under the tables: {', '.join(not_here)}" if not_here else ""),
          file=progress, flush=True)
    bandwidth = None
    if on_gpu:
        results, bandwidth = _run_gpu(chosen, workloads, device, calls or 10, progress)
    else:
        budget = CPU_QUICK_CALLS if quick else CPU_CALLS
        if calls is not None:
            budget = CallBudget(min_calls=calls, max_calls=calls, seconds=0.0)
        results = _run_cpu(chosen, workloads, device, budget, progress)
        _add_cpu_memory(results, chosen, progress)
    fill_speedups(results)
    print(format_table(results), file=out)
    env = environment(device, command or shlex.join([sys.executable, "-m", "prefopt", "bench"]))
    env["load_average_before"], env["load_average_after"] = load_before, _load_average()
    if not on_gpu:
        print("time: perf_counter; each round calls every implementation of a workload once, in turn, starting one "
              "further along each round; median and (min-max) over the timed calls. speed-up: the reference's "
              "median over this one's, (min-max) of the same ratio within one round. peak extra memory: resident "
              "memory of one fwd+bwd above its inputs, in a fresh process (python -m prefopt.bench.memory). "
              "Floors are measured on GPUs only.", file=out)
        load = ("" if load_before is None else
                f"; one-minute load average {load_before:.2f} before the run, {env['load_average_after']:.2f} after")
        print(f"machine: {env['device_name']}, {os.cpu_count()} logical CPUs{load}", file=out)
    else:
        floors = []
        if bandwidth is not None:
            floors.append(f"logits path, bytes / measured copy bandwidth {bandwidth / 1e12:.2f} TB/s")
        if any(isinstance(r.workload, LinearWorkload) and r.floor_s is not None for r in results):
            floors.append("fused linear path, cuBLAS time of the products the direction needs on the scored rows "
                          "(logits, hidden and weight gradients), measured in this run")
        print("time: median and (min-max) of CUDA events over calls on rotating inputs; memory: max_memory_allocated "
              f"above the inputs; floor: {'; '.join(floors) or 'none measured'}", file=out)
    if json_path is not None:
        write_json(json_path, results, env, bandwidth)
        print(f"wrote {json_path}", file=out)
    if plot_dir is not None:
        written = write_plots(plot_dir, results, str(env["device_name"]))
        for path in written:
            print(f"wrote {path}", file=out)
        if not written:
            print(f"no plots written: nothing was measured, so {plot_dir} was not created", file=out)
    return results


def _build(implementation: Implementation, workload: Workload | LinearWorkload,
           built: dict[tuple[str, str], Candidate | Exception]) -> Candidate | Exception:
    """The implementation's callable, built (compiled, loaded) once per path, or the error its
    build raised (then reported as that implementation's failure on every workload)."""
    key = (workload.path, implementation.name)
    if key not in built:
        try:
            built[key] = implementation.build()
        except Exception as error:  # noqa: BLE001 - one peer that does not load must not end the run
            built[key] = error
    return built[key]


def _run_gpu(chosen: Mapping[str, Sequence[Implementation]], workloads: Sequence[Workload | LinearWorkload],
             device: torch.device, calls: int, progress: TextIO) -> tuple[list[Measurement], float | None]:
    """Each implementation alone on each workload, ``calls`` timed calls after two warm-ups, with
    the floors measured in the same run; rows that cannot run here are recorded without a line
    of progress. Returns the measurements and the copy bandwidth (bytes/s) when measured."""
    plan = [(implementation, workload) for path, candidates in chosen.items() for implementation in candidates
            for workload in workloads if workload.path == path]
    runnable = sum(implementation.unavailable is None for implementation, _ in plan)
    bandwidth = None
    if "logits" in chosen:
        print("measuring the copy bandwidth (the logits path's floor) ...", file=progress, flush=True)
        bandwidth = copy_bandwidth(device)
        print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)", file=progress, flush=True)
    gemms: dict[LinearWorkload, dict[str, float]] = {}  # the fused linear path's floors
    results: list[Measurement] = []
    built: dict[tuple[str, str], Candidate | Exception] = {}
    k = 0
    for implementation, workload in plan:
        if implementation.unavailable is not None:
            results.append(measure(implementation, workload, device, calls=calls))
            continue
        if isinstance(workload, LinearWorkload) and workload not in gemms:
            print(f"measuring the cuBLAS time of the products of {workload.name()} (its floor) ...",
                  file=progress, flush=True)
            gemms[workload] = gemm_seconds(workload, device)
            torch.cuda.empty_cache()
        k += 1
        print(f"[{k:>3}/{runnable}] {workload.path:<6} {implementation.name:<40} {workload.name()}",
              file=progress, flush=True)
        candidate = _build(implementation, workload, built)
        try:
            if isinstance(candidate, Exception):
                raise candidate
            results.append(measure(implementation, workload, device, calls=calls, warmup=2, candidate=candidate,
                                   bandwidth=bandwidth, gemms=gemms.get(workload)))
        except Exception as error:  # noqa: BLE001 - one failing peer must not end the run; it is reported
            results.append(Measurement(implementation.name, workload, str(device),
                                       skipped=failure_reason(workload, error)))
        torch.cuda.empty_cache()  # the next row may need the memory this one's allocator kept
    return results, bandwidth


def _run_cpu(chosen: Mapping[str, Sequence[Implementation]], workloads: Sequence[Workload | LinearWorkload],
             device: torch.device, budget: CallBudget, progress: TextIO) -> list[Measurement]:
    """Per workload, the implementations that run here in interleaved rounds within ``budget``,
    one warm-up round first (it warms the thread pools and
    the allocator); the others recorded as not run, with the reason."""
    results: list[Measurement] = []
    built: dict[tuple[str, str], Candidate | Exception] = {}
    for k, workload in enumerate(workloads, start=1):
        candidates = chosen[workload.path]
        group, by_name = [], {}
        for implementation in candidates:
            candidate = None if implementation.unavailable else _build(implementation, workload, built)
            if implementation.unavailable is not None:
                by_name[implementation.name] = measure(implementation, workload, device, calls=1)
            elif isinstance(candidate, Exception):
                by_name[implementation.name] = Measurement(implementation.name, workload, str(device),
                                                           skipped=failure_reason(workload, candidate))
            else:
                group.append((implementation, candidate))
        print(f"[{k:>3}/{len(workloads)}] {workload.path:<6} {workload.name()}: "
              f"{', '.join(i.name for i, _ in group)}, in interleaved rounds ...", file=progress, flush=True)
        begin = time.perf_counter()
        measured = measure_interleaved(group, workload, device, warmup=1, min_calls=budget.min_calls,
                                       max_calls=budget.max_calls, budget_s=budget.seconds)
        by_name.update((m.implementation, m) for m in measured)
        print(f"          {max((len(m.times_s) for m in measured), default=0)} timed rounds in "
              f"{time.perf_counter() - begin:.1f} s", file=progress, flush=True)
        results += [by_name[i.name] for i in candidates]
    return results


def _add_cpu_memory(results: Sequence[Measurement], chosen: Mapping[str, Sequence[Implementation]],
                    progress: TextIO) -> None:
    """Fill the CPU memory figures, two fresh processes at a time (after the timings, so the
    processes do not share the cores with a timed call)."""
    # Imported here, not with the package: it is also the fresh process's `python -m` entry.
    from .memory import cpu_memory_unavailable, measure_cpu_memory

    memory_args = {(path, i.name): i.memory_script_args for path, candidates in chosen.items() for i in candidates}
    jobs = []
    for r in results:
        args = memory_args.get((r.workload.path, r.implementation))
        if r.skipped is None and args is not None:
            reason = cpu_memory_unavailable(r.workload)
            if reason is None:
                jobs.append((r, args))
            elif r.memory_method is None:
                r.memory_method = f"not measured: {reason}"
    if not jobs:
        return
    print(f"measuring peak memory in {len(jobs)} fresh processes ...", file=progress, flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        peaks = list(pool.map(lambda job: measure_cpu_memory(*job), ((r.workload, args) for r, args in jobs)))
    for (r, _), peak in zip(jobs, peaks):
        r.peak_extra_bytes, r.memory_method = peak, "peak resident memory (VmHWM) above the inputs, fresh process"
