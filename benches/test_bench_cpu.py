"""The main job on this machine's CPU: `python -m prefopt bench --quick`, run in a fresh process.

It times the torch backend (and in place) against the reference at 256 x 32000 float32 and
measures each one's peak resident memory; a fresh process keeps this pytest process's own
resident size out of the figures. The table is printed and the raw figures land in extra_info.
"""

import json
import os
import subprocess
import sys

import torch


def run_main_job(json_path) -> tuple[str, dict]:
    command = [sys.executable, "-m", "prefopt", "bench", "--quick", "--json", str(json_path)]
    # CUDA_VISIBLE_DEVICES="" keeps it on the CPU on a GPU machine too.
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return result.stdout, json.loads(json_path.read_text())


def test_cpu_torch_backend_against_reference(benchmark, tmp_path):
    table, document = benchmark.pedantic(run_main_job, args=(tmp_path / "bench.json",), rounds=1, iterations=1)
    print("\n" + table)
    measured = {r["implementation"]: r for r in document["results"] if r["skipped"] is None}
    assert {"reference", "prefopt-torch", "prefopt-torch-inplace"} <= set(measured)
    benchmark.extra_info.update({"torch": torch.__version__, "results": list(measured.values())})
    for figures in measured.values():
        assert figures["median_s"] > 0 and figures["peak_extra_bytes"] is not None
    # The in-place torch backend holds chunks, not a [tokens, V] float32 tensor; the reference
    # holds several. Resident-memory figures are coarse at this size, hence the loose bound.
    assert measured["prefopt-torch-inplace"]["peak_extra_bytes"] < measured["reference"]["peak_extra_bytes"]
