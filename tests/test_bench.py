"""`python -m prefopt bench` on a CPU: the table, --json, --plot, bad arguments; prefopt.bench's
floor, speed-ups and timers."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from prefopt import bench
from prefopt.__main__ import main

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
CPU = torch.device("cpu")
MEASURED = ("reference", "prefopt-torch", "prefopt-torch-inplace")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default main job, once, in a fresh process kept on the CPU, with --json (and --plot
    where matplotlib is installed). Returns (completed process, json path, plot dir)."""
    directory = tmp_path_factory.mktemp("bench")
    json_path, plot_dir = directory / "figures.json", directory / "plots"
    command = [sys.executable, "-m", "prefopt", "bench", "--json", str(json_path)]
    if HAS_MATPLOTLIB:
        command += ["--plot", str(plot_dir)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return process, json_path, plot_dir


def test_default_run_prints_a_table(default_run):
    process, _, _ = default_run
    assert process.returncode == 0, process.stderr
    lines = process.stdout.splitlines()
    assert lines[0].split()[:2] == ["implementation", "workload"] and "speed-up" in lines[0]
    for workload in bench.default_workloads(CPU):
        for name in MEASURED:
            row = [line for line in lines if line.startswith(name + " ") and workload.name() in line]
            assert len(row) == 1, f"no single table row for {name} at {workload.name()}"
            assert row[0].rstrip().endswith("x") and " ms " in row[0]
    assert any(line.startswith("not run: prefopt-triton: ") for line in lines)
    assert "[  1/" in process.stderr, "no progress indication"


def test_json_holds_the_environment_and_the_raw_figures(default_run):
    process, json_path, _ = default_run
    assert process.returncode == 0, process.stderr
    document = json.loads(json_path.read_text())
    assert {"device", "device_name", "driver", "torch", "triton", "python", "date", "command",
            "copy_bandwidth_bytes_per_s", "results"} <= set(document)
    assert document["device"] == "cpu" and document["torch"] == torch.__version__
    assert document["command"].startswith("python -m prefopt bench --json")
    measured = [r for r in document["results"] if r["skipped"] is None]
    assert {r["implementation"] for r in measured} == set(MEASURED)
    assert len(measured) == len(MEASURED) * len(bench.default_workloads(CPU))
    for r in measured:
        assert {"tokens", "vocab", "dtype", "direction", "ignored_fraction", "median_s", "times_s",
                "peak_extra_bytes", "speedup_vs_reference", "logits_bytes"} <= set(r)
        assert r["median_s"] == sorted(r["times_s"])[len(r["times_s"]) // 2] > 0
        assert r["peak_extra_bytes"] > 0
    # Peak memory measured per implementation, not the launching process's: the reference holds
    # several [tokens, V] float32 tensors, the in-place torch backend only chunks.
    for r in measured:
        ratio = r["peak_extra_bytes"] / r["logits_bytes"]
        if r["implementation"] == "reference":
            assert ratio > 2.0, r
        elif r["implementation"] == "prefopt-torch-inplace" and r["logits_bytes"] >= 100 * 2**20:
            assert ratio < 0.5, r
    assert all(r["speedup_vs_reference"] == 1.0 for r in measured if r["implementation"] == "reference")


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install -e '.[test]')")
def test_plot_writes_png_files(default_run):
    process, _, plot_dir = default_run
    assert process.returncode == 0, process.stderr
    pngs = sorted(plot_dir.glob("*.png"))
    assert [p.name.split("-vs_")[1].split("-")[0] for p in pngs] == ["tokens", "vocab"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {png}" in process.stdout


@pytest.mark.parametrize(("arguments", "message"), [
    (["--calls", "0"], "expected a positive integer"),
    (["--calls", "many"], "expected a positive integer"),
    (["--impl", "nonsense"], "--impl 'nonsense': unknown; choose from reference"),
    (["--json", "/nonexistent-directory/figures.json"], "must be a file in an existing directory"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_arguments_give_a_clear_error(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_into_a_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("")
    with pytest.raises(SystemExit):
        main(["bench", "--plot", str(path)])
    assert "exists and is not a directory" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured before failing"))
    assert main(["bench", "--quick", "--plot", str(tmp_path / "plots")]) == 1
    error = capsys.readouterr().err
    assert "matplotlib" in error and "prefopt[bench]" in error


def test_floor_bytes_count_scored_reads_and_the_whole_gradient():
    element = 2  # bf16
    for direction, expected in (("fwd", 5 * 100 * element), ("bwd", (5 + 10) * 100 * element),
                                ("fwd+bwd", (2 * 5 + 10) * 100 * element)):
        assert bench.Workload(10, 100, torch.bfloat16, 0.5, direction).floor_bytes() == expected


@pytest.mark.parametrize("bad", [{"tokens": 0}, {"ignored_fraction": 1.0}, {"direction": "sideways"}])
def test_workload_rejects_bad_fields(bad):
    with pytest.raises(ValueError):
        bench.Workload(**{"tokens": 8, "vocab": 16, **bad})


def test_sweep_covers_both_axes_without_repeats():
    workloads = bench.sweep((1, 2), (10, 20), 1, 10, dtype=torch.float32)
    assert [(w.tokens, w.vocab) for w in workloads] == [(1, 10), (2, 10), (1, 20)]


@pytest.mark.parametrize("direction", bench.DIRECTIONS)
@pytest.mark.parametrize("name", MEASURED)
def test_measure_times_every_direction_on_cpu(name, direction):
    implementation = next(i for i in bench.implementations(CPU) if i.name == name)
    workload = bench.Workload(33, 257, torch.float32, 0.5, direction)
    result = bench.measure(implementation, workload, CPU, calls=3, warmup=1, bandwidth=1e9)
    assert result.skipped is None and len(result.times_s) == 3 and result.median_s > 0
    assert result.floor_bytes == workload.floor_bytes()
    assert result.fraction_of_floor == pytest.approx(workload.floor_bytes() / 1e9 / result.median_s)


def test_unavailable_implementation_is_skipped_with_its_reason():
    implementation = bench.Implementation("absent", lambda: pytest.fail("built"), unavailable="not here")
    result = bench.measure(implementation, bench.Workload(4, 8), CPU, calls=1)
    assert result.skipped == "not here" and result.median_s is None
    assert "not run: absent: not here" in bench.format_table([result])


def test_speedups_are_relative_to_the_reference_on_the_same_workload():
    small, large = bench.Workload(4, 8), bench.Workload(8, 8)
    results = [bench.Measurement("reference", small, "cpu", median_s=2.0),
               bench.Measurement("reference", large, "cpu", median_s=6.0),
               bench.Measurement("fast", small, "cpu", median_s=0.5),
               bench.Measurement("fast", large, "cpu", median_s=3.0)]
    bench.fill_speedups(results)
    assert [r.speedup_vs_reference for r in results] == [1.0, 1.0, 4.0, 2.0]


def test_a_failing_implementation_is_reported_and_the_run_goes_on(monkeypatch, capsys):
    def broken(logits, labels):
        raise RuntimeError("kernel exploded")

    chosen = [next(i for i in bench.implementations(CPU) if i.name == "reference"),
              bench.Implementation("broken", lambda: broken)]
    monkeypatch.setattr(bench, "implementations", lambda device: chosen)
    monkeypatch.setattr(bench, "_add_cpu_memory", lambda *args: None)  # no fresh processes here
    results = bench.run(device=CPU, quick=True, calls=1)
    assert [r.implementation for r in results] == ["reference", "broken"]
    assert results[0].median_s > 0
    assert results[1].skipped.startswith("failed at fwd+bwd 256x32000") and "kernel exploded" in results[1].skipped
    assert "not run: broken: failed at" in capsys.readouterr().out
