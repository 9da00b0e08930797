"""`python -m prefopt bench` on a CPU: the tables of both paths, --json, --plot, --impl, bad
arguments; prefopt.bench's floors, speed-ups, timers and plots."""

import dataclasses
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefopt import bench
from prefopt.__main__ import main

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
CPU = torch.device("cpu")
MEASURED = ("reference", "prefopt-torch", "prefopt-torch-inplace")
# What the fused linear path measures on a CPU: prefopt's torch backend, the reference, and the
# peers that run there when installed.
LINEAR_MEASURED = ("reference", "prefopt-torch", *(
    name for name, module in ((bench.TRL_CHUNKED, "trl"), (bench.CCE_COMPILE, "cut_cross_entropy"),
                              (bench.LIGER_DPO, "liger_kernel")) if importlib.util.find_spec(module)))
# Those whose CPU memory is measured (a memory script runs prefopt's backends and the reference).
CPU_MEMORY_MEASURED = (*MEASURED, "prefopt-torch")
MEASURED_BY_PATH = {"logits": MEASURED, "linear": LINEAR_MEASURED}


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


def test_default_run_prints_a_table_per_path(default_run):
    process, _, _ = default_run
    assert process.returncode == 0, process.stderr
    blocks = process.stdout.split("\n\n")
    assert [block.splitlines()[0] for block in blocks[:2]] == [bench.PATH_TITLES["logits"], bench.PATH_TITLES["linear"]]
    workloads = bench.default_workloads(CPU)
    assert {w.path for w in workloads} == {"logits", "linear"}
    for block, path in zip(blocks, ("logits", "linear")):
        lines = block.splitlines()
        assert lines[1].split()[:2] == ["implementation", "workload"] and "speed-up" in lines[1]
        for workload in (w for w in workloads if w.path == path):
            for name in MEASURED_BY_PATH[path]:
                row = [line for line in lines if line.startswith(name + " ") and workload.name() in line]
                assert len(row) == 1, f"no single {path} row for {name} at {workload.name()}"
                # Median time and speed-up, each with the (min-max) of the interleaved calls.
                time_cell, speedup = re.search(r" ([\d,.]+ ms \([\d,.]+-[\d,.]+\)) .* ([\d.]+x.*)$", row[0]).groups()
                assert (" MiB " in row[0]) == (name in CPU_MEMORY_MEASURED), row[0]
                assert speedup.endswith("x" if name == "reference" else ")"), row[0]
        assert any(line.startswith("not run: prefopt-triton: GPU only") for line in lines)
    assert "[  1/2]" in process.stderr, "no progress indication"
    # Progress names only what runs here; what cannot is named once, in one line.
    assert "GPU only" not in process.stderr and process.stderr.count("prefopt-triton,") == 1
    assert "liger-cross_entropy" not in "\n".join(l for l in process.stderr.splitlines() if l.startswith("["))
    assert "load average" in process.stdout and "logical CPUs" in process.stdout


def test_json_holds_the_environment_and_the_raw_figures(default_run):
    process, json_path, _ = default_run
    assert process.returncode == 0, process.stderr
    document = json.loads(json_path.read_text())
    assert {"device", "device_name", "driver", "torch", "triton", "python", "date", "command",
            "copy_bandwidth_bytes_per_s", "results"} <= set(document)
    assert document["device"] == "cpu" and document["torch"] == torch.__version__
    assert {"load_average_before", "load_average_after"} <= set(document)
    assert document["command"].startswith("python -m prefopt bench --json")
    measured = [r for r in document["results"] if r["skipped"] is None]
    for path, names in MEASURED_BY_PATH.items():
        rows = [r for r in measured if r["path"] == path]
        assert {r["implementation"] for r in rows} == set(names)
        assert len(rows) == len(names) * sum(w.path == path for w in bench.default_workloads(CPU))
    for r in measured:
        assert {"path", "tokens", "vocab", "dtype", "direction", "ignored_fraction", "median_s", "times_s",
                "peak_extra_bytes", "speedup_vs_reference", "logits_bytes"} <= set(r)
        assert r["median_s"] == statistics.median(r["times_s"]) > 0  # an even count of calls averages two
        assert r["speedup_vs_reference"] > 0
        assert (r["peak_extra_bytes"] or 0) > 0 or r["implementation"] not in CPU_MEMORY_MEASURED
        assert len(r["times_s"]) >= bench.CPU_CALLS.min_calls
        if r["implementation"] != "reference":
            low, high = r["speedup_range"]
            assert 0 < low <= high
        assert r["path"] == "logits" or r["hidden"] > 0
    # Peak memory measured per implementation, not the launching process's: the references hold
    # several [tokens, V] float32 tensors (the fused linear one computes the logits explicitly);
    # the in-place torch backend only chunks, and the fused linear torch backend never holds the
    # whole float32 logits.
    for r in (r for r in measured if r["implementation"] in CPU_MEMORY_MEASURED):
        ratio = r["peak_extra_bytes"] / r["logits_bytes"]
        if r["implementation"] == "reference":
            assert ratio > 2.0, r
        elif r["implementation"] == "prefopt-torch-inplace" and r["logits_bytes"] >= 100 * 2**20:
            assert ratio < 0.5, r
        elif r["implementation"] == "prefopt-torch" and r["path"] == "linear":
            assert ratio < 1.0, r
    assert all(r["speedup_vs_reference"] == 1.0 for r in measured if r["implementation"] == "reference")


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install -e '.[test]')")
def test_plot_on_one_workload_per_path_draws_a_bar_chart_each(default_run):
    process, _, plot_dir = default_run
    assert process.returncode == 0, process.stderr
    pngs = sorted(plot_dir.glob("*.png"))
    assert [p.name for p in pngs] == ["linear-fwd_bwd-float32-1024x256x32000-ignored25-bars.png",
                                      "logits-fwd_bwd-float32-512x128256-ignored25-bars.png"]
    assert all(png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for png in pngs)
    assert all(f"wrote {png}" in process.stdout for png in pngs)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install -e '.[test]')")
def test_plots_of_nothing_measured_create_no_directory(tmp_path):
    skipped = [bench.Measurement("peer", bench.Workload(4, 8), "cpu", skipped="GPU only")]
    assert bench.write_plots(tmp_path / "plots", skipped, "test device") == []
    assert not (tmp_path / "plots").exists()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install -e '.[test]')")
def test_plots_draw_each_path_against_tokens_and_vocabulary(tmp_path):
    workloads = [*bench.sweep((1, 2), (10, 20), 1, 10, dtype=torch.float32),
                 *bench.sweep((1, 2), (10, 20), 1, 10, dtype=torch.float32, hidden=4)]
    results = [bench.Measurement(name, w, "cpu", median_s=1e-3 * w.tokens, peak_extra_bytes=2**20 * w.vocab,
                                 floor_s=1e-4 if w.path == "linear" else None)
               for w in workloads for name in MEASURED_BY_PATH[w.path]]
    pngs = bench.write_plots(tmp_path, results, "test device")
    assert sorted(p.name for p in pngs) == [
        "linear-fwd_bwd-float32-H4-ignored0-vs_tokens-vocab10.png", "linear-fwd_bwd-float32-H4-ignored0-vs_vocab-tokens1.png",
        "logits-fwd_bwd-float32-ignored0-vs_tokens-vocab10.png", "logits-fwd_bwd-float32-ignored0-vs_vocab-tokens1.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_impl_accepts_the_names_of_either_path(monkeypatch):
    chosen_names = []
    monkeypatch.setattr(bench, "run", lambda **arguments: chosen_names.append(arguments["names"]))
    assert main(["bench", "--impl", bench.TRL_CHUNKED, "--impl", "prefopt-torch-inplace"]) == 0
    assert chosen_names == [[bench.TRL_CHUNKED, "prefopt-torch-inplace"]]


def test_chosen_implementations_follow_the_names():
    by_default = bench.chosen_implementations(CPU)
    assert [i.name for i in by_default["logits"]] == list(bench.IMPLEMENTATION_NAMES)
    assert [i.name for i in by_default["linear"]] == list(bench.LINEAR_IMPLEMENTATION_NAMES)
    # A name of one path only leaves the other path out; the reference always runs.
    linear_only = bench.chosen_implementations(CPU, [bench.LIGER_LINEAR])
    assert {path: [i.name for i in chosen] for path, chosen in linear_only.items()} == {
        "linear": [bench.LIGER_LINEAR, "reference"]}
    both = bench.chosen_implementations(CPU, ["prefopt-torch"])
    assert {path: [i.name for i in chosen] for path, chosen in both.items()} == {
        "logits": ["reference", "prefopt-torch"], "linear": ["reference", "prefopt-torch"]}


def test_compiling_the_linear_reference_is_left_out_of_the_default_gpu_run():
    gpu = torch.device("cuda")
    compiled = "torch.compile(reference)"
    by_default = {i.name: i for i in bench.chosen_implementations(gpu)["linear"]}
    assert by_default[compiled].unavailable == bench.DEFAULT_RUN_LEAVES_OUT[("linear", compiled)]
    named = {i.name: i for i in bench.chosen_implementations(gpu, [compiled])["linear"]}
    assert named[compiled].unavailable is None


def test_plot_into_a_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("")
    with pytest.raises(SystemExit):
        main(["bench", "--plot", str(path)])
    assert "exists and is not a directory" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setattr(bench.runner, "measure", lambda *a, **k: pytest.fail("measured before failing"))
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
    linear = bench.sweep((1, 2), (10, 20), 1, 10, dtype=torch.float32, hidden=4)
    assert [(w.tokens, w.hidden, w.vocab) for w in linear] == [(1, 4, 10), (2, 4, 10), (1, 4, 20)]
    assert all(isinstance(w, bench.LinearWorkload) for w in linear)


@pytest.mark.parametrize("direction", bench.DIRECTIONS)
@pytest.mark.parametrize("name", MEASURED)
def test_measure_times_every_direction_on_cpu(name, direction):
    implementation = next(i for i in bench.implementations(CPU) if i.name == name)
    workload = bench.Workload(33, 257, torch.float32, 0.5, direction)
    result = bench.measure(implementation, workload, CPU, calls=3, warmup=1, bandwidth=1e9)
    assert result.skipped is None and len(result.times_s) == 3 and result.median_s > 0
    assert result.floor_bytes == workload.floor_bytes()
    assert result.fraction_of_floor == pytest.approx(workload.floor_bytes() / 1e9 / result.median_s)


def recording(name: str, calls: list) -> tuple[bench.Implementation, bench.Candidate]:
    """An implementation whose callable records its name on every call."""
    def candidate(logits, labels):
        calls.append(name)
        return logits.sum(-1)

    return bench.Implementation(name, lambda: candidate), candidate


FORWARD = bench.Workload(4, 8, torch.float32, direction="fwd")


def test_interleaved_rounds_start_one_further_along_each_round():
    calls = []
    chosen = [recording(name, calls) for name in ("reference", "b", "c")]
    results = bench.measure_interleaved(chosen, FORWARD, CPU, warmup=1, min_calls=3, max_calls=3, budget_s=0.0)
    assert calls == ["reference", "b", "c", "b", "c", "reference", "c", "reference", "b", "reference", "b", "c"]
    assert [r.implementation for r in results] == ["reference", "b", "c"]
    assert all(len(r.times_s) == 3 and r.median_s == sorted(r.times_s)[1] for r in results)


@pytest.mark.parametrize(("min_calls", "max_calls", "budget_s", "expected"), [
    (2, 4, 0.0, 2),    # the budget is spent at once: the minimum
    (2, 4, 1e9, 4),    # the budget is never spent: the maximum
    (3, 3, 1e9, 3),
])
def test_interleaved_rounds_stop_at_the_budget_within_the_call_counts(min_calls, max_calls, budget_s, expected):
    chosen = [recording(name, []) for name in ("reference", "b")]
    results = bench.measure_interleaved(chosen, FORWARD, CPU, warmup=0, min_calls=min_calls, max_calls=max_calls,
                                        budget_s=budget_s)
    assert [len(r.times_s) for r in results] == [expected, expected]


def test_interleaved_rejects_bad_call_counts():
    with pytest.raises(ValueError, match="min_calls"):
        bench.measure_interleaved([], FORWARD, CPU, min_calls=3, max_calls=2, budget_s=1.0)


def test_interleaved_speedup_range_pairs_the_calls_of_one_round(monkeypatch):
    # Call order with warmup=0: round 0 reference, b; round 1 b, reference; round 2 reference, b.
    scripted = iter([4.0, 2.0, 1.0, 3.0, 6.0, 2.0])

    def fake_time_calls(prepare, timed, *, calls, warmup, device):
        timed(0, prepare(0))
        return [next(scripted)], None

    monkeypatch.setattr(bench.timing, "time_calls", fake_time_calls)
    reference, b = bench.measure_interleaved([recording(name, []) for name in ("reference", "b")], FORWARD, CPU,
                                             warmup=0, min_calls=3, max_calls=3, budget_s=0.0)
    assert reference.times_s == [4.0, 3.0, 6.0] and b.times_s == [2.0, 1.0, 2.0]
    assert reference.speedup_range is None and b.speedup_range == [2.0, 3.0]
    bench.fill_speedups([reference, b])
    assert b.speedup_vs_reference == 2.0
    assert "2.00x (2.00-3.00)" in bench.format_table([reference, b])


def test_interleaved_failure_is_recorded_and_the_others_go_on():
    calls = []
    good = recording("reference", calls)

    def broken(logits, labels):
        if len(calls) >= 2:
            raise RuntimeError("kernel exploded\nsecond line")
        calls.append("broken")
        return logits.sum(-1)

    reference, failed = bench.measure_interleaved([good, (bench.Implementation("broken", lambda: broken), broken)],
                                                  FORWARD, CPU, warmup=0, min_calls=4, max_calls=4, budget_s=0.0)
    assert len(reference.times_s) == 4 and reference.skipped is None
    assert failed.skipped == f"failed at {FORWARD.name()}: RuntimeError: kernel exploded"
    assert failed.median_s is None and "not run: broken: failed at" in bench.format_table([reference, failed])


def test_table_shows_the_floor_column_only_when_a_row_has_a_floor():
    workload = bench.Workload(4, 8)
    plain = bench.Measurement("reference", workload, "cpu", median_s=1e-3, times_s=[1e-3], speedup_vs_reference=1.0)
    assert "% of floor" not in bench.format_table([plain])
    floored = dataclasses.replace(plain, fraction_of_floor=0.5)
    assert "% of floor" in bench.format_table([floored]) and "50.0%" in bench.format_table([floored])


def test_unavailable_implementation_is_skipped_with_its_reason():
    implementation = bench.Implementation("absent", lambda: pytest.fail("built"), unavailable="not here")
    result = bench.measure(implementation, bench.Workload(4, 8), CPU, calls=1)
    assert result.skipped == "not here" and result.median_s is None
    assert "not run: absent: not here" in bench.format_table([result])


def test_table_groups_the_rows_and_the_skipped_by_path():
    logits, linear = bench.Workload(4, 8), bench.LinearWorkload(4, 2, 8)
    results = [bench.Measurement("reference", linear, "cpu", median_s=2e-3, speedup_vs_reference=1.0),
               bench.Measurement("reference", logits, "cpu", median_s=1e-3, speedup_vs_reference=1.0),
               bench.Measurement("peer", logits, "cpu", skipped="GPU only"),
               bench.Measurement("peer", linear, "cpu", skipped="not installed")]
    logits_block, linear_block = bench.format_table(results).split("\n\n")
    assert logits_block.splitlines()[0] == bench.PATH_TITLES["logits"]
    assert logits.name() in logits_block and linear.name() not in logits_block
    assert logits_block.endswith("not run: peer: GPU only")
    assert linear_block.splitlines()[0] == bench.PATH_TITLES["linear"]
    assert linear.name() in linear_block and linear_block.endswith("not run: peer: not installed")
    # One set of column widths: the header lines of both tables are the same.
    assert logits_block.splitlines()[1] == linear_block.splitlines()[1]


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
    monkeypatch.setattr(bench.runner, "implementations", lambda device: chosen)
    monkeypatch.setattr(bench.runner, "linear_implementations", lambda device: [])  # the logits path alone
    monkeypatch.setattr(bench.runner, "_add_cpu_memory", lambda *args: None)  # no fresh processes here
    results = bench.run(device=CPU, quick=True, calls=1)
    assert [r.implementation for r in results] == ["reference", "broken"]
    assert results[0].median_s > 0
    assert results[1].skipped.startswith("failed at fwd+bwd 256x32000") and "kernel exploded" in results[1].skipped
    assert "not run: broken: failed at" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The fused linear path's workloads, floors and checks, and the GPU session's record and report

REPORT_SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "report.py"


def linear_implementation(name: str) -> bench.Implementation:
    return next(i for i in bench.linear_implementations(CPU) if i.name == name)


@pytest.mark.parametrize("bad", [{"hidden": 0}, {"vocab": 0}, {"ignored_fraction": -0.1}, {"direction": "bwd"}])
def test_linear_workload_rejects_bad_fields(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        bench.LinearWorkload(**{"tokens": 8, "hidden": 4, "vocab": 16, **bad})


def test_linear_workload_sizes_and_products():
    workload = bench.LinearWorkload(10, 4, 100, torch.bfloat16, 0.5, "fwd+bwd")
    assert (workload.ignored_rows, workload.scored_rows) == (5, 5)
    assert workload.input_bytes == (10 + 100) * 4 * 2 and workload.logits_bytes == 10 * 100 * 2
    assert workload.products() == bench.GEMM_PRODUCTS
    assert bench.LinearWorkload(10, 4, 100, direction="fwd-nograd").products() == ("logits",)
    assert workload.name() == "fwd+bwd 10x4x100 bfloat16 ignored=50%"


def test_linear_inputs_follow_the_direction():
    hidden, weight, labels = bench.make_inputs(bench.LinearWorkload(8, 4, 16, torch.float32, 0.25), CPU)
    assert hidden.shape == (8, 4) and weight.shape == (16, 4) and hidden.requires_grad and weight.requires_grad
    assert (labels[:2] == bench.IGNORE_INDEX).all() and (labels[2:] >= 0).all()
    frozen = bench.make_inputs(bench.LinearWorkload(8, 4, 16, torch.float32, direction="fwd-nograd"), CPU)
    assert not any(tensor.requires_grad for tensor in frozen)


def test_gemm_seconds_times_every_product():
    seconds = bench.gemm_seconds(bench.LinearWorkload(16, 8, 64, torch.float32), CPU, calls=2, warmup=1)
    assert set(seconds) == set(bench.GEMM_PRODUCTS) and all(s > 0 for s in seconds.values())


@pytest.mark.parametrize("direction", bench.LINEAR_DIRECTIONS)
@pytest.mark.parametrize("name", LINEAR_MEASURED)
def test_measure_times_the_linear_path_against_its_gemms(name, direction):
    workload = bench.LinearWorkload(24, 16, 300, torch.float32, 0.5, direction)
    gemms = {"logits": 1.0, "grad_hidden": 2.0, "grad_weight": 4.0}
    implementation = linear_implementation(name)
    result = bench.measure(implementation, workload, CPU, calls=2, warmup=1, gemms=gemms)
    assert result.skipped is None and len(result.times_s) == 2 and result.median_s > 0
    assert result.floor_s == (7.0 if direction == "fwd+bwd" else 1.0)
    assert result.fraction_of_floor == pytest.approx(result.floor_s / result.median_s)
    declared = (implementation.gemm_products or {}).get(direction)
    assert result.method_gemm_s == (None if declared is None else sum(gemms[p] for p in declared))
    assert name != "prefopt-torch" or result.method_gemm_s == (8.0 if direction == "fwd+bwd" else 1.0)


def test_linear_peers_are_skipped_on_cpu_with_a_reason():
    for implementation in bench.linear_implementations(CPU):
        if implementation.name not in LINEAR_MEASURED:
            assert implementation.unavailable, implementation.name


@pytest.mark.parametrize("workload", [bench.Workload(8, 16, torch.float32, 0.25, "bwd"),
                                      bench.LinearWorkload(8, 4, 16, torch.bfloat16, 0.5, "fwd-nograd")])
def test_measurement_json_round_trip(workload):
    measurement = bench.Measurement("x", workload, "cpu", median_s=0.5, times_s=[0.5], floor_s=0.25,
                                    fraction_of_floor=0.5, method_gemm_s=0.3)
    row = {**measurement.to_json(), "gpu": "ignored extra key"}
    assert row["path"] == workload.path and row["dtype"] == str(workload.dtype).removeprefix("torch.")
    assert bench.Measurement.from_json(json.loads(json.dumps(row))) == measurement


def linear_result(name, median_s, peak, ignored=0.0, shape=(16384, 4096, 128256), method_gemm_s=None,
                  direction="fwd+bwd", mean_entropy=None):
    workload = bench.LinearWorkload(*shape, torch.bfloat16, ignored, direction, mean_entropy)
    return bench.Measurement(name, workload, "cuda", median_s=median_s, peak_extra_bytes=peak,
                             method_gemm_s=method_gemm_s)


def test_linear_checks_record_each_target_with_its_figures():
    results = [
        linear_result("prefopt-triton", 1.0, 100, method_gemm_s=0.9),
        linear_result(bench.CCE, 1.5, 300),
        linear_result(bench.CCE_EXACT, 0.9, 200),
        linear_result(bench.LIGER_LINEAR, 3.0, 150),
        # TRL not measured: its check is recorded as unknown, with the reason.
        linear_result("prefopt-triton", 0.5, 80, ignored=0.5, method_gemm_s=0.5),
        linear_result("prefopt-triton", 1.0, 100, shape=(4096, 2048, 32000)),
        linear_result("prefopt-cuda", 0.8, 90, method_gemm_s=0.7),
        linear_result("prefopt-triton-fused", 0.3, 10, direction="fwd", method_gemm_s=0.29),
        # Peaked logits: the filtered backend against CCE's default; the unfiltered one is not
        # checked there, nor the filtered one on random logits.
        linear_result(bench.FUSED_FILTERED, 1.1, 50, mean_entropy=2.0, method_gemm_s=1.0),
        linear_result(bench.CCE, 1.5, 300, mean_entropy=2.0),
        linear_result("prefopt-triton-fused", 1.2, 50, mean_entropy=2.0),
        linear_result(bench.FUSED_FILTERED, 1.1, 50),
    ]
    checks = bench.linear_checks(results)
    cuda = {c["check"]: c for c in checks if c["implementation"] == "prefopt-cuda"}
    assert cuda["time <= 1.10 x cuBLAS time of the products it performs"]["bound"] == pytest.approx(0.77)
    assert cuda["time <= Cut Cross-Entropy's without filtering"]["passed"] is True
    forward = [c for c in checks if c["implementation"] == "prefopt-triton-fused"]
    assert [c["check"] for c in forward] == ["time <= 1.05 x cuBLAS time of the products it performs"]
    assert forward[0]["bound"] == pytest.approx(0.3045) and forward[0]["passed"] is True
    filtered = [c for c in checks if c["implementation"] == bench.FUSED_FILTERED]
    assert {c["mean_entropy"] for c in filtered} == {2.0}
    versus_cce = [c for c in filtered if "Cut Cross-Entropy" in c["check"]]
    assert len(versus_cce) == 1 and versus_cce[0]["bound"] == pytest.approx(1.2) and versus_cce[0]["passed"] is True
    checks = [c for c in checks if c["implementation"] == "prefopt-triton"]
    targets = {c["check"]: c for c in checks if c["target_shape"] and c["ignored_fraction"] == 0.0}
    assert targets["time <= Cut Cross-Entropy's (default: filters small gradients)"]["passed"] is True
    assert targets["time <= Cut Cross-Entropy's without filtering"]["passed"] is False
    trl = targets["time <= 0.9 x TRL's chunked log-prob function's"]
    assert trl["passed"] is None and bench.TRL_CHUNKED in trl["note"]
    liger = targets["time <= 0.4 x Liger-Kernel's fused linear cross entropy"]
    assert liger["bound"] == pytest.approx(1.2) and liger["passed"] is True
    memory = targets["peak extra memory <= the lowest peer's"]
    assert (memory["value"], memory["bound"], memory["passed"]) == (100, 150, True)
    gemm = targets["time <= 1.10 x cuBLAS time of the products it performs"]
    assert gemm["bound"] == pytest.approx(0.99) and gemm["passed"] is False
    half = [c for c in checks if c["check"].startswith("time with half the rows ignored")]
    assert len(half) == 1 and half[0]["bound"] == pytest.approx(0.55) and half[0]["passed"] is True
    other_shape = [c for c in checks if not c["target_shape"]]
    assert other_shape and all(c["passed"] is None for c in other_shape if "cuBLAS" in c["check"])


def test_peaked_inputs_have_the_entropy_asked_for_and_tiles_to_filter():
    """The peaked head's mean entropy lands near the one asked for, its labels are among the
    probable tokens, and a 2^-12 filter finds whole tiles to leave out, unlike on random logits."""
    peaked = bench.LinearWorkload(256, 64, 32000, torch.float32, mean_entropy=2.0)
    hidden, weight, labels = bench.make_inputs(peaked, torch.device("cpu"))
    profile = bench.peaked_profile(hidden.detach(), weight.detach(), labels, bench.FILTER_EPS, (64, 64))
    assert 1.7 < profile["mean_entropy"] < 2.3
    assert 0.02 < profile["skipped_tile_fraction"] < 1.0
    label_p = torch.softmax(hidden.detach() @ weight.detach().T, 1).gather(1, labels[:, None])
    assert label_p.mean() > 0.4
    random = bench.make_inputs(dataclasses.replace(peaked, mean_entropy=None), torch.device("cpu"))
    assert bench.peaked_profile(random[0].detach(), random[1].detach(), random[2], bench.FILTER_EPS,
                                (64, 64))["skipped_tile_fraction"] == 0.0
    with pytest.raises(ValueError, match="mean_entropy"):
        bench.LinearWorkload(256, 64, 32000, torch.float32, mean_entropy=11.0)


def test_results_stem_names_date_and_device():
    assert bench.results_stem({"device_name": "NVIDIA H200", "date": "2026-12-01T10:00:00+00:00"}) == "2026-12-01-h200"


def test_bench_rows_are_recorded_as_they_end(tmp_path):
    """PREFOPT_BENCH_RECORD: the environment, then one line per row with its reason when skipped."""
    record = tmp_path / "records.jsonl"
    command = [sys.executable, "-m", "pytest", str(REPORT_SCRIPT.parent / "test_linear_gpu.py"), "-q",
               "-p", "no:cacheprovider", "-k", "fwd+bwd-16384x4096x128256-ignored0 and not entropy2"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PREFOPT_BENCH_RECORD": str(record), "CUDA_VISIBLE_DEVICES": ""})
    assert process.returncode == 0, process.stdout + process.stderr
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert lines[0]["kind"] == "environment" and lines[0]["command"].startswith("pytest ")
    rows = lines[1:]
    # Every implementation but the filtered one, which runs on peaked logits only.
    assert len(rows) == len(bench.LINEAR_IMPLEMENTATION_NAMES) - 1
    assert all(r["kind"] == "row" and r["outcome"] == "skipped" and r["reason"] == "needs a CUDA GPU" for r in rows)


def write_records(path: Path) -> None:
    """A record file like a GPU session's, measured on this CPU: two vocabularies, two ignored
    fractions, the reference and prefopt-torch, one row skipped and one cut-off last line."""
    lines = [{"kind": "environment", **bench.environment(CPU, "pytest benches/test_linear_gpu.py")}]
    gemms = {"logits": 1e-4, "grad_hidden": 1e-4, "grad_weight": 1e-4}
    for ignored in (0.0, 0.5):
        for vocab in (200, 400):
            workload = bench.LinearWorkload(16, 8, vocab, torch.float32, ignored)
            for name in LINEAR_MEASURED:
                result = bench.measure(linear_implementation(name), workload, CPU, calls=1, warmup=0, gemms=gemms)
                lines.append({"kind": "row", "test": f"t[{workload.name()}-{name}]", "outcome": "passed",
                              "reason": None, **result.to_json()})
    lines.append({"kind": "row", "test": "t[absent]", "outcome": "skipped", "reason": "absent: not installed"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"kind": "row", "te')


def test_report_writes_json_markdown_and_plots(tmp_path):
    records, junit = tmp_path / "records.jsonl", tmp_path / "junit.xml"
    write_records(records)
    junit.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                     '<testcase classname="tests.test_x" name="test_ok"/>'
                     '<testcase classname="tests.test_x" name="test_bad"><failure message="no"/></testcase>'
                     '<testcase classname="tests.test_x" name="test_gpu"><skipped/></testcase>'
                     '</testsuite></testsuites>')
    out = tmp_path / "results"
    process = subprocess.run([sys.executable, str(REPORT_SCRIPT), "--out", str(out), "--stem", "run",
                              "--junit", f"tests={junit}", str(records)], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    assert "not JSON" in process.stderr  # the cut-off last line is reported and left out
    document = json.loads((out / "run.json").read_text())
    assert document["environment"]["device"] == "cpu"
    assert document["correctness"] == [{"suite": "tests", "file": "junit.xml", "passed": 1, "tests": 3, "failures": 1,
                                        "errors": 0, "skipped": 1, "failed_tests": ["tests.test_x::test_bad"]}]
    assert len(document["results"]) == 4 * len(LINEAR_MEASURED)
    assert all(r["speedup_vs_reference"] > 0 for r in document["results"])
    assert document["not_run"] == [{"test": "t[absent]", "outcome": "skipped", "reason": "absent: not installed"}]
    summary = (out / "run.md").read_text()
    assert "| tests | 1 | 1 | 0 | 1 |" in summary and "`tests.test_x::test_bad`" in summary
    assert "| workload | reference | prefopt-torch |" in summary and "| 1 | skipped: absent: not installed |" in summary
    if HAS_MATPLOTLIB:
        names = sorted(p.name for p in (out / "run").glob("*.png"))
        assert names == [f"linear-fwd_bwd-float32-H8-ignored{i}-vs_vocab-tokens16.png" for i in (0, 50)]


KERNEL_BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "kernel_bench.py"


def test_kernel_microbenchmark_smoke_run_and_its_report(tmp_path):
    # Without a GPU the microbenchmark runs its code on a tiny shape through the interpreter: its
    # rows are recorded as a smoke run, and the report shows them with the CUDA kernels' reason.
    records = tmp_path / "records.jsonl"
    run = subprocess.run([sys.executable, str(KERNEL_BENCH_SCRIPT), "--record", str(records), "--calls", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    environment, rows = lines[0], lines[1:]
    assert environment["kind"] == "kernel-environment" and "cuda" in environment["skipped"]
    variants = {(row["kernel"], row["variant"]) for row in rows}
    assert variants == {("forward", "bf16,logps"), ("forward", "bf16,entropy"), ("forward", "bf16,all"),
                        ("forward", "bf16,entropy,softcap"), ("backward", "bf16,logps"), ("backward", "bf16,entropy")}
    assert all(row["smoke"] and row["backend"] == "triton" and row["median_s"] > 0 for row in rows)
    out = tmp_path / "results"
    report = subprocess.run([sys.executable, str(REPORT_SCRIPT), "--no-plots", "--out", str(out), "--stem", "run",
                             str(records)], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert len(json.loads((out / "run.json").read_text())["kernels"]) == 6
    assert not (out / "run").exists()
    summary = (out / "run.md").read_text()
    assert "## Kernel microbenchmark" in summary and "a smoke run, not a measurement" in summary
    assert "| triton | backward | bf16,entropy | 5 x 300 |" in summary
    assert f"not run: cuda: {environment['skipped']['cuda']}" in summary


# ----------------------------------------------------------------------------------------------
# The rest of the command line: help texts and what `check` covers


def test_help_shows_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "python -m prefopt info, check, build and bench" in text and "``" not in text


def test_check_covers_the_logits_and_linear_paths_and_the_losses(capsys):
    assert main(["check", "--backend", "triton"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("triton ")]
    assert {row[2] for row in rows} == {"logits", "linear", "dpo", "kto"}
    assert all(row[-1] == "pass" for row in rows)
