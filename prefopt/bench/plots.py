"""PNG plots of a run's measurements (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from .timing import Measurement
from .workloads import LinearWorkload, Workload, dtype_name


class MissingExtraError(RuntimeError):
    """An optional dependency is missing; the message names the extra that installs it."""


def pyplot() -> ModuleType:
    """matplotlib.pyplot drawing to files (Agg), or MissingExtraError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise MissingExtraError(
            f"--plot needs matplotlib ({error}): pip install 'prefopt[bench]' (or pip install matplotlib)"
        ) from error
    return plt


def _plot_group(workload: Workload | LinearWorkload) -> tuple[str, str, torch.dtype, float, int | None]:
    """What one figure holds fixed besides its axes: path, direction, dtype, ignored fraction
    and (fused linear path) the hidden size."""
    return (workload.path, workload.direction, workload.dtype, workload.ignored_fraction,
            getattr(workload, "hidden", None))


def write_plots(directory: Path, results: Sequence[Measurement], title: str) -> list[Path]:
    """PNG plots of median time and peak extra memory against tokens (one figure per vocabulary
    with at least two token counts) and against vocabulary size (one per token count with at
    least two vocabularies), one line per implementation and the floor dashed, for each path,
    direction, dtype, ignored fraction and hidden size measured; and for each workload that lies
    on no such line (a CPU run measures one per path), one bar chart of its implementations'
    median time (min-max as error bars) and peak extra memory. ``directory`` is created only
    when there is something to draw. Returns the files written."""
    plt = pyplot()
    measured = [r for r in results if r.median_s is not None]
    if measured:
        directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    on_a_line: set[Workload | LinearWorkload] = set()
    for key in sorted({_plot_group(r.workload) for r in measured}, key=str):
        path_name, direction, dtype, ignored, hidden_size = key
        group = [r for r in measured if _plot_group(r.workload) == key]
        for axis, fixed in (("tokens", "vocab"), ("vocab", "tokens")):
            for value in sorted({getattr(r.workload, fixed) for r in group}):
                line_points = [r for r in group if getattr(r.workload, fixed) == value]
                if len({getattr(r.workload, axis) for r in line_points}) < 2:
                    continue
                on_a_line.update(r.workload for r in line_points)
                figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
                for name in dict.fromkeys(r.implementation for r in line_points):
                    points = sorted((getattr(r.workload, axis), r) for r in line_points if r.implementation == name)
                    xs = [x for x, _ in points]
                    time_axes.plot(xs, [r.median_s * 1e3 for _, r in points], marker="o", label=name)
                    memory = [(x, r.peak_extra_bytes / 2**20) for x, r in points if r.peak_extra_bytes is not None]
                    if memory:
                        memory_axes.plot(*zip(*memory), marker="o", label=name)
                floors = sorted({(getattr(r.workload, axis), r.floor_s) for r in line_points if r.floor_s is not None})
                if floors:
                    floor_label = "floor (cuBLAS GEMMs)" if path_name == "linear" else "floor (bytes / copy bandwidth)"
                    time_axes.plot([x for x, _ in floors], [f * 1e3 for _, f in floors], "k--", label=floor_label)
                for axes, ylabel in ((time_axes, "median time (ms)"), (memory_axes, "peak extra memory (MiB)")):
                    axes.set_xlabel("tokens" if axis == "tokens" else "vocabulary size")
                    axes.set_ylabel(ylabel)
                    axes.grid(True, alpha=0.3)
                time_axes.legend(fontsize="small")
                hidden_text = "" if hidden_size is None else f"H {hidden_size}, "
                figure.suptitle(f"{title}: {path_name} path, {direction}, {dtype_name(dtype)}, {hidden_text}"
                                f"{fixed} {value}, ignored {ignored:.0%}")
                figure.tight_layout()
                hidden_part = "" if hidden_size is None else f"-H{hidden_size}"
                path = directory / (f"{path_name}-{direction.replace('+', '_')}-{dtype_name(dtype)}{hidden_part}"
                                    f"-ignored{round(ignored * 100)}-vs_{axis}-{fixed}{value}.png")
                figure.savefig(path, dpi=120)
                plt.close(figure)
                written.append(path)
    for workload in dict.fromkeys(r.workload for r in measured if r.workload not in on_a_line):
        written.append(_bar_chart(plt, directory, [r for r in measured if r.workload == workload], title))
    return written


def _bar_chart(plt: ModuleType, directory: Path, rows: Sequence[Measurement], title: str) -> Path:
    """One workload's implementations side by side: median time with (min-max) error bars, and
    peak extra memory (where measured). Returns the file written."""
    workload = rows[0].workload
    names = [r.implementation for r in rows]
    medians = [r.median_s * 1e3 for r in rows]
    below = [m - min(r.times_s or [r.median_s]) * 1e3 for m, r in zip(medians, rows)]
    above = [max(r.times_s or [r.median_s]) * 1e3 - m for m, r in zip(medians, rows)]
    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    time_axes.bar(names, medians, yerr=[below, above], capsize=4)
    time_axes.set_ylabel("median time (ms), min-max of the calls")
    memory_axes.bar(names, [0 if r.peak_extra_bytes is None else r.peak_extra_bytes / 2**20 for r in rows])
    memory_axes.set_ylabel("peak extra memory (MiB)")
    for axes in (time_axes, memory_axes):
        axes.tick_params(axis="x", labelrotation=20)
        axes.grid(True, axis="y", alpha=0.3)
    figure.suptitle(f"{title}: {workload.path} path, {workload.name()}")
    figure.tight_layout()
    shape = "x".join(str(size) for size in (workload.tokens, getattr(workload, "hidden", None), workload.vocab)
                     if size is not None)
    path = directory / (f"{workload.path}-{workload.direction.replace('+', '_')}-{dtype_name(workload.dtype)}"
                        f"-{shape}-ignored{round(workload.ignored_fraction * 100)}-bars.png")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
