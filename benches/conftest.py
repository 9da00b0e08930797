"""Shared set-up of ``pytest benches``.

- Rows marked ``gpu`` are skipped where PyTorch sees no CUDA GPU (the repository's conftest.py);
  rows marked ``headline`` are the ones benches/gpu_session.sh measures (``-m headline``).
- ``PREFOPT_BENCH_CALLS=N`` sets the timed calls of every row (:func:`timed_calls`).
- With ``PREFOPT_BENCH_RECORD=FILE`` in the environment, the session's environment (device,
  driver, versions, command) and then every row, as soon as it ends, are appended to FILE as
  one JSON line each: its test id, outcome, the reason when it was skipped or failed, and the
  figures it put in pytest-benchmark's ``extra_info``. benches/gpu_session.sh sets it, so a
  session cut short keeps every row it finished; benches/report.py turns the lines into the
  committed results.
"""

import json
import os
import shlex

import pytest
import torch

from prefopt import bench

RECORD_VARIABLE = "PREFOPT_BENCH_RECORD"
CALLS_VARIABLE = "PREFOPT_BENCH_CALLS"


def timed_calls(default: int) -> int:
    """Timed calls per row: ``PREFOPT_BENCH_CALLS`` when set (benches/gpu_session.sh sets 5, to
    fit the headline rows in one device call), else the file's ``default``."""
    text = os.environ.get(CALLS_VARIABLE)
    if text is None:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{CALLS_VARIABLE}: expected a positive integer, got {text!r}")
    return int(text)


def _record(line: dict) -> None:
    with open(os.environ[RECORD_VARIABLE], "a") as record:
        record.write(json.dumps(line, default=str) + "\n")


def pytest_sessionstart(session):
    if os.environ.get(RECORD_VARIABLE):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        command = shlex.join(["pytest", *session.config.invocation_params.args])
        _record({"kind": "environment", **bench.environment(device, command)})


def _reason(report: pytest.TestReport) -> str | None:
    if report.skipped and isinstance(report.longrepr, tuple):
        return report.longrepr[2].removeprefix("Skipped: ")
    if report.failed:
        lines = report.longreprtext.strip().splitlines()
        errors = [line for line in lines if line.startswith("E ")]
        return (errors[0] if errors else lines[-1] if lines else "failed").removeprefix("E ").strip()
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # One line per row: its call, or its setup when that skipped or failed (no call then).
    ended = report.when == "call" or (report.when == "setup" and not report.passed)
    if not os.environ.get(RECORD_VARIABLE) or not ended:
        return
    benchmark = getattr(item, "funcargs", {}).get("benchmark")
    figures = dict(getattr(benchmark, "extra_info", None) or {})
    _record({"kind": "row", "test": item.nodeid, "outcome": report.outcome, "reason": _reason(report), **figures})
