"""The report of a run: the table, the environment it ran in, the JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .timing import Measurement


def _format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 2**20:,.1f} MiB" if count < 2**30 else f"{count / 2**30:,.2f} GiB"


PATH_TITLES = {
    "logits": "logits path: per-token log-probs from logits [tokens, V]",
    "linear": "fused linear path: per-token log-probs from hidden [tokens, H] and LM-head weight [V, H]; "
              "reference: logits = hidden @ weight.T, then log-softmax",
}


def _time_cell(r: Measurement) -> str:
    if r.median_s is None:
        return "-"
    cell = f"{r.median_s * 1e3:,.1f} ms"
    if len(r.times_s) > 1:
        cell += f" ({min(r.times_s) * 1e3:,.1f}-{max(r.times_s) * 1e3:,.1f})"
    return cell


def _speedup_cell(r: Measurement) -> str:
    if r.speedup_vs_reference is None:
        return "-"
    cell = f"{r.speedup_vs_reference:.2f}x"
    if r.speedup_range is not None:
        cell += f" ({r.speedup_range[0]:.2f}-{r.speedup_range[1]:.2f})"
    return cell


def format_table(results: Sequence[Measurement]) -> str:
    """The measurements as fixed-width text, one table per path (logits, fused linear) under its
    title, one row per implementation and workload: timed calls, median time with the (min-max)
    of the calls, peak extra memory, % of the floor (a column only when some row has a floor) and
    speed-up over the reference, with the (min-max) of its per-round ratio when the calls were
    interleaved. Each path's skipped implementations are listed once each under its table with
    the reason."""
    with_floor = any(r.fraction_of_floor is not None for r in results)
    header = ("implementation", "workload", "calls", "median time (min-max)", "peak extra memory",
              *(("% of floor",) if with_floor else ()), "speed-up (min-max)")
    tables: dict[str, list[tuple[str, ...]]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for r in results:
        path = r.workload.path
        tables.setdefault(path, [])
        if r.skipped is not None:
            skipped.setdefault(path, {}).setdefault(r.implementation, r.skipped)
            continue
        floor = f"{r.fraction_of_floor:.1%}" if r.fraction_of_floor is not None else "-"
        tables[path].append((
            r.implementation,
            r.workload.name(),
            str(len(r.times_s)) if r.times_s else "-",
            _time_cell(r),
            _format_bytes(r.peak_extra_bytes),
            *((floor,) if with_floor else ()),
            _speedup_cell(r),
        ))
    # One set of widths for every table, so that the paths' columns line up.
    widths = [max(len(row[k]) for row in (header, *(row for rows in tables.values() for row in rows)))
              for k in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if k < 2 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths)))

    blocks = []
    for path in sorted(tables, key=list(PATH_TITLES).index):
        lines = [PATH_TITLES[path], line(header), "-" * len(line(header)), *map(line, tables[path])]
        lines += [f"not run: {name}: {reason}" for name, reason in skipped.get(path, {}).items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, command: str) -> dict[str, object]:
    """Where and how the figures were measured: device name, driver, versions, date, command."""
    from .. import __version__

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    driver = None
    if device.type == "cuda":
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, check=True, timeout=30)
            driver = query.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": device_name,
        "driver": driver,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "prefopt": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def results_stem(env: Mapping[str, object]) -> str:
    """``<date>-<device>`` naming a results set (benches/results/README.md) from an
    :func:`environment`: the UTC date and the device's name in lower case without the vendor,
    e.g. ``2026-12-01-h200`` for an 'NVIDIA H200'."""
    words = str(env["device_name"]).lower().replace("nvidia", " ").split()
    device = "-".join("".join(c if c.isalnum() else "-" for c in word).strip("-") for word in words)
    return f"{str(env['date'])[:10]}-{device or 'unknown'}"


def write_json(path: Path, results: Sequence[Measurement], env: dict[str, object],
               bandwidth: float | None) -> None:
    """Write the environment, the measured copy bandwidth (bytes/s, GPU) and every measurement."""
    document = {**env, "copy_bandwidth_bytes_per_s": bandwidth, "results": [r.to_json() for r in results]}
    path.write_text(json.dumps(document, indent=2) + "\n")
