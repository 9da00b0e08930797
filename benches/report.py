"""Turn recorded benchmark rows into the committed results: JSON, a markdown summary, PNG plots.

    python benches/report.py --out DIR [--stem STEM] [--junit SUITE=FILE ...] RECORD.jsonl ...

RECORD files are what ``pytest benches`` appends to with ``PREFOPT_BENCH_RECORD=FILE`` (see
benches/conftest.py): an environment line per pytest session, then one line per row; and what
``benches/kernel_bench.py --record FILE`` appends: its run's environment and one line per kernel
figure. Several
files (sessions of one GPU, e.g. two device calls) merge; a row recorded twice keeps its last
figures. ``--junit SUITE=FILE``: a pytest ``--junitxml`` file whose counts (and failing tests)
go in the summary under SUITE. Writes, with STEM defaulting to ``<date>-<device>`` of the first
session (prefopt.bench.results_stem):

- DIR/STEM.json: the environment of each session, the kernel microbenchmark's runs and figures
  (``kernel_runs``, ``kernels``), the correctness counts, every measured row
  (raw figures, speed-up over the reference filled in), the DPO/KTO step rows, the fused linear
  path's target checks (prefopt.bench.linear_checks: passed or failed, never asserted) and every
  row not run, with the reason;
- DIR/STEM.md: the summary tables, stating the commands that produced them;
- DIR/STEM/*.png: time and peak memory against tokens and vocabulary size (needs matplotlib;
  not with ``--no-plots``).

Runs anywhere (no GPU needed), so rows fetched from a GPU machine can be merged later.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

from prefopt import bench

MEASURED_PATHS = ("linear", "logits")
STEP_PATHS = ("dpo-step", "kto-step")


def read_records(paths: Sequence[Path]) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(environment lines, row lines, kernel-run environment lines, kernel rows) of the record
    files; a row recorded again replaces the earlier one, a kernel figure measured again too."""
    environments, rows, kernel_environments, kernel_rows = [], {}, [], {}
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                # The last line of a session killed mid-write may be cut short; say so, go on.
                print(f"{path}:{number}: skipped, not JSON ({error})", file=sys.stderr)
                continue
            kind = record.pop("kind", None)
            if kind == "environment":
                environments.append(record)
            elif kind == "row":
                rows[record["test"]] = record
            elif kind == "kernel-environment":
                kernel_environments.append(record)
            elif kind == "kernel":
                key = tuple(record[k] for k in ("backend", "kernel", "variant", "tokens", "vocab"))
                kernel_rows[key] = record
    return environments, list(rows.values()), kernel_environments, list(kernel_rows.values())


def junit_counts(suite: str, path: Path) -> dict[str, object]:
    """Counts of a pytest --junitxml file and the ids of its failed or erroring tests."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"suite": suite, "file": path.name, "passed": passed, **counts, "failed_tests": failed}


def _milliseconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.2f} ms"


def _gibibytes(count: float | None) -> str:
    return "-" if count is None else f"{count / 2**30:,.2f} GiB"


def _cell(m: bench.Measurement) -> str:
    floor = "" if m.fraction_of_floor is None else f" ({m.fraction_of_floor:.0%})"
    return f"{_milliseconds(m.median_s)}{floor}, {_gibibytes(m.peak_extra_bytes)}"


def _pivot(measurements: Sequence[bench.Measurement], path: str) -> list[str]:
    """One markdown table per direction: a row per workload, a column per implementation."""
    lines = []
    chosen = [m for m in measurements if m.workload.path == path]
    for direction in dict.fromkeys(m.workload.direction for m in chosen):
        group = [m for m in chosen if m.workload.direction == direction]
        names = list(dict.fromkeys(m.implementation for m in group))
        cells = {(m.workload, m.implementation): m for m in group}
        lines += [f"\n**{direction}**\n", "| workload | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        for workload in dict.fromkeys(m.workload for m in group):
            shape = workload.name().removeprefix(f"{direction} ")
            row = [_cell(cells[(workload, name)]) if (workload, name) in cells else "-" for name in names]
            lines.append(f"| {shape} | " + " | ".join(row) + " |")
    return lines


def _check_value(check: dict, key: str) -> str:
    value = check[key]
    if value is None:
        return "-"
    return _gibibytes(value) if check["check"].startswith("peak") else _milliseconds(value)


def markdown(document: dict, measurements: Sequence[bench.Measurement], stem: str) -> str:
    env = document["environment"]
    lines = [f"# prefopt benchmarks: {env['device_name']}, {str(env['date'])[:10]}", "",
             f"{env['device_name']}, driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, "
             f"Triton {env['triton']}, Python {env['python']}, prefopt {env['prefopt']}. Raw figures: `{stem}.json`; "
             f"plots: `{stem}/`. Produced by `bash benches/gpu_session.sh`, which ran:", ""]
    lines += [f"- `{session['command']}` ({session['date']})" for session in document["sessions"]]
    if document["kernels"]:
        lines += ["", "## Kernel microbenchmark (benches/kernel_bench.py)", ""]
        for run in document["kernel_runs"]:
            copy = run.get("copy_bandwidth_bytes_per_s")
            copy_text = "no GPU: a smoke run, not a measurement" if copy is None else f"copy bandwidth {copy / 1e9:,.0f} GB/s"
            lines.append(f"- `{run['command']}` ({run['date']}): {copy_text}; clocks before {run.get('clocks_before')}, "
                         f"after {run.get('clocks_after')}")
            lines += [f"- not run: {what}: {why}" for what, why in (run.get("skipped") or {}).items()]
        lines += ["", "| backend | kernel | variant | tokens x vocab | median time | GB/s | of copy bandwidth |",
                  "|---|---|---|---|---:|---:|---:|"]
        for row in document["kernels"]:
            fraction = "-" if row["fraction_of_copy"] is None else f"{row['fraction_of_copy']:.1%}"
            lines.append(f"| {row['backend']} | {row['kernel']} | {row['variant']} | {row['tokens']} x {row['vocab']} | "
                         f"{row['median_s'] * 1e6:,.1f} us | {row['bandwidth_bytes_per_s'] / 1e9:,.1f} | {fraction} |")
    if document["correctness"]:
        lines += ["", "## GPU correctness", "", "| suite | passed | failed | errors | skipped |",
                  "|---|---:|---:|---:|---:|"]
        for suite in document["correctness"]:
            lines.append(f"| {suite['suite']} | {suite['passed']} | {suite['failures']} | {suite['errors']} "
                         f"| {suite['skipped']} |")
        for suite in document["correctness"]:
            lines += [f"- failed in {suite['suite']}: `{name}`" for name in suite["failed_tests"]]
    if document["linear_checks"]:
        targets = " and ".join(" x ".join(map(str, shape)) for shape in bench.LINEAR_TARGET_SHAPES)
        lines += ["", "## Fused linear path: the targets of prefopt's GPU backends (forward+backward, bf16)", "",
                  f"Recorded, not asserted. The target problems are {targets} (in bold).", "",
                  "| workload | implementation | check | value | bound | result |", "|---|---|---|---:|---:|---|"]
        ordered = sorted(document["linear_checks"], key=lambda c: not c["target_shape"])
        for check in ordered:
            shape = check["workload"].removeprefix("fwd+bwd ")
            shape = f"**{shape}**" if check["target_shape"] else shape
            result = {True: "pass", False: "FAIL", None: f"not known: {check['note']}"}[check["passed"]]
            lines.append(f"| {shape} | {check['implementation']} | {check['check']} | {_check_value(check, 'value')} | "
                         f"{_check_value(check, 'bound')} | {result} |")
    titles = {"linear": ("Fused linear path", "the cuBLAS time of the products the direction needs on the scored rows"),
              "logits": ("Logits path", "bytes over the copy bandwidth measured in the same run")}
    for path in MEASURED_PATHS:
        if any(m.workload.path == path for m in measurements):
            title, floor = titles[path]
            lines += ["", f"## {title}: median time (fraction of the floor), peak extra memory", "",
                      f"Floor: {floor}. Peak extra memory: torch.cuda.max_memory_allocated above the inputs."]
            lines += _pivot(measurements, path)
    if document["steps"]:
        lines += ["", "## DPO and KTO steps (Llama-3-8B-like shapes, V 128256, bf16)", "",
                  "| step | implementation | median time | fraction of floor | peak extra memory |",
                  "|---|---|---:|---:|---:|"]
        for row in document["steps"]:
            lines.append(f"| {row['path']} | {row['implementation']} | {_milliseconds(row['median_s'])} | "
                         f"{row['fraction_of_floor']:.0%} | {_gibibytes(row['peak_extra_bytes'])} |")
    if document["not_run"]:
        reasons: dict[str, int] = {}
        for row in document["not_run"]:
            reason = f"{row['outcome']}: {row['reason']}"
            reasons[reason] = reasons.get(reason, 0) + 1
        lines += ["", "## Not run", "", "| rows | why |", "|---:|---|"]
        lines += [f"| {count} | {reason} |" for reason, count in reasons.items()]
    return "\n".join(lines) + "\n"


def build(records: Sequence[Path], junit: Sequence[tuple[str, Path]]) -> tuple[dict, list[bench.Measurement]]:
    """The results document and the measurements of the two paths, from the record files."""
    environments, rows, kernel_environments, kernel_rows = read_records(records)
    if not environments and not kernel_environments:
        raise SystemExit(f"report.py: no environment line in {', '.join(map(str, records))}: not a record file?")
    measured_rows = [r for r in rows if r["outcome"] == "passed" and r.get("path") in MEASURED_PATHS]
    measurements = [bench.Measurement.from_json(r) for r in measured_rows]
    bench.fill_speedups(measurements)
    for row, measurement in zip(measured_rows, measurements):
        row["speedup_vs_reference"] = measurement.speedup_vs_reference
    document = {
        "environment": (environments or kernel_environments)[0],
        "sessions": environments,
        "kernel_runs": kernel_environments,
        "kernels": kernel_rows,
        "correctness": [junit_counts(suite, path) for suite, path in junit],
        "results": measured_rows,
        "steps": [r for r in rows if r["outcome"] == "passed" and r.get("path") in STEP_PATHS],
        "linear_checks": bench.linear_checks(measurements),
        "not_run": [{key: r[key] for key in ("test", "outcome", "reason")} for r in rows if r["outcome"] != "passed"],
    }
    return document, measurements


def _junit_argument(text: str) -> tuple[str, Path]:
    suite, separator, path = text.partition("=")
    if not separator or not suite or not path:
        raise argparse.ArgumentTypeError(f"expected SUITE=FILE, got {text!r}")
    return suite, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", type=Path, help="PREFOPT_BENCH_RECORD files (JSON lines)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write STEM.json, STEM.md, STEM/")
    parser.add_argument("--stem", help="file name stem (default: <date>-<device> of the first session)")
    parser.add_argument("--junit", action="append", default=[], type=_junit_argument, metavar="SUITE=FILE",
                        help="a pytest --junitxml file to summarize (repeatable)")
    parser.add_argument("--no-plots", action="store_true", help="write only STEM.json and STEM.md")
    arguments = parser.parse_args(argv)
    for path in [*arguments.records, *(path for _, path in arguments.junit)]:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    document, measurements = build(arguments.records, arguments.junit)
    stem = arguments.stem or bench.results_stem(document["environment"])
    arguments.out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = arguments.out / f"{stem}.json", arguments.out / f"{stem}.md"
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    markdown_path.write_text(markdown(document, measurements, stem))
    print(f"wrote {json_path}\nwrote {markdown_path}")
    if arguments.no_plots:
        return 0
    try:
        plots = bench.write_plots(arguments.out / stem, measurements, str(document["environment"]["device_name"]))
    except bench.MissingExtraError as error:
        print(f"no plots: {error}")
    else:
        print(f"wrote {len(plots)} plots under {arguments.out / stem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
