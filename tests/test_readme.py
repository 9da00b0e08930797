"""Every code block of the README runs as written, or is run where this file names.

Python blocks are executed here, each once, and what they promise is checked; the distributed
fragment is the core of examples/vocab_parallel.py, which runs here under torchrun on two gloo
processes. Shell blocks either install (not run: they need the network; their order is checked)
or are commands that a named test of this suite runs. The example table of `python -m prefopt
bench` is checked against the table that command prints on a CPU.
"""

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
VOCAB_PARALLEL = ROOT / "examples" / "vocab_parallel.py"


def code_blocks() -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced block, in order."""
    blocks, section = [], ""
    for match in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```$", README.read_text(), re.M | re.S):
        if match.group(1):
            section = match.group(1).lstrip("# ").strip()
        else:
            blocks.append((section, match.group(2), match.group(3)))
    return blocks


BLOCKS = code_blocks()

# ------------------------------------------------------------------------------- Python blocks


def check_example(namespace: dict) -> None:
    assert namespace["policy_logps"].shape == (2,)
    assert namespace["lm_head"].weight.grad is not None


def check_hidden_states(namespace: dict) -> None:
    assert namespace["lm_head"].weight.grad is not None and namespace["hidden"].grad is not None


def check_preference_losses(namespace: dict) -> None:
    assert namespace["policy_logits"].grad is not None and namespace["kto_logits"].grad is not None
    assert {"rewards/accuracies", "logits/chosen", "entropy"} <= set(namespace["metrics"])
    assert namespace["kto_metrics"]["kl"].shape == ()
    # The example says why the clamped KL can be 0: it is never negative.
    assert namespace["kto_metrics"]["kl"].item() >= 0
    assert namespace["output"].losses.shape == (3,) and "rewards/margins" in namespace["ipo_metrics"]
    assert namespace["found"] == []


def check_trl_or_transformers(namespace: dict) -> None:
    if "stats" in namespace:
        assert namespace["stats"].logps.shape == (2, 15)
        assert namespace["model"].lm_head.weight.grad is not None
    else:
        import prefopt.integrations.trl as integration

        integration.disable()  # the block enables it for the rest of the process


PYTHON_CHECKS = {
    "Example": check_example,
    "Log-probs from hidden states (fused LM head)": check_hidden_states,
    "Preference losses": check_preference_losses,
    "In TRL and Transformers": check_trl_or_transformers,
}

# ------------------------------------------------------------------------------- shell blocks

# The install lines, in the order a CPU-only user must run them: the CPU build of torch first.
INSTALL_LINES = ["pip install torch --index-url https://download.pytorch.org/whl/cpu", 'pip install -e ".[test]"']
# Each other command of a shell block, and the test of this suite that runs it.
RUN_BY = {
    "python -m prefopt bench": ("test_bench", "test_default_run_prints_a_table_per_path"),
    "python -m prefopt check": ("test_backends", "test_cli_check_passes"),
    "pytest": ("test_readme", "test_every_code_block_is_run_or_covered"),  # the suite itself
}


def commands(code: str) -> list[str]:
    """The shell commands of a block: one a line, comments and blank lines dropped."""
    return [line.partition("#")[0].strip() for line in code.splitlines() if line.partition("#")[0].strip()]


@pytest.mark.parametrize(("section", "language", "code"), BLOCKS,
                         ids=[f"{k}-{section}-{language}" for k, (section, language, _) in enumerate(BLOCKS)])
def test_every_code_block_is_run_or_covered(section, language, code):
    if language == "python" and section == "Distributed training":
        # The fragment is the script's core, line for line; test_vocab_parallel_example_runs runs it.
        script = {line.strip() for line in VOCAB_PARALLEL.read_text().splitlines()}
        missing = [line for line in code.splitlines() if line.strip() and line.strip() not in script]
        assert not missing, f"README lines not in {VOCAB_PARALLEL.name}: {missing}"
    elif language == "python":
        assert section in PYTHON_CHECKS, f"a Python block under '{section}' that no check covers"
        if "prefopt.integrations.trl" in code and importlib.util.find_spec("trl") is None:
            pytest.skip("TRL is not installed (pip install -e '.[test]')")
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)
        PYTHON_CHECKS[section](namespace)
    elif language == "bash":
        lines = commands(code)
        installs = [line for line in lines if line.startswith("pip ")]
        assert installs in ([], INSTALL_LINES), f"install lines out of order or unknown: {installs}"
        for line in lines:
            if line in INSTALL_LINES:
                continue
            assert line in RUN_BY, f"'{line}' (under '{section}') is run by no test"
            module, test = RUN_BY[line]
            assert hasattr(importlib.import_module(module), test), f"{module}.{test} does not exist"
    elif language == "text" and section == "Benchmarks":
        check_bench_table(code)
    else:
        pytest.fail(f"a {language or 'plain'} block under '{section}' that no check covers")


def test_install_comes_before_the_commands_that_need_it():
    shell = [commands(code) for _, language, code in BLOCKS if language == "bash"]
    assert shell[0] == INSTALL_LINES, "the first shell block must be the install, CPU build of torch first"
    assert all(not any(line.startswith("pip ") for line in lines) for lines in shell[1:])


def test_readme_links_the_design_notes_in_the_project():
    text = README.read_text()
    assert "(docs/design.md)" in text and (ROOT / "docs" / "design.md").is_file()
    assert "shared/" not in text


# ------------------------------------------------------------------------------- the bench table


def check_bench_table(table: str) -> None:
    """The README's example output has the layout `python -m prefopt bench` prints on a CPU: the
    same titles and header, a row per implementation measured there on each default workload,
    with the spread of the time and of the speed-up, and the footer naming the machine."""
    from prefopt import bench

    cpu = torch.device("cpu")
    header = bench.format_table([bench.Measurement("reference", bench.Workload(4, 8), "cpu", median_s=1.0)])
    assert header.splitlines()[1].split() == table.splitlines()[1].split()
    for title in bench.PATH_TITLES.values():
        assert title in table
    measured = {path: [i.name for i in chosen if i.unavailable is None]
                for path, chosen in bench.chosen_implementations(cpu).items()}
    for workload in bench.default_workloads(cpu):
        for name in measured[workload.path]:
            rows = [line for line in table.splitlines() if line.startswith(name + " ") and workload.name() in line]
            assert len(rows) == 1, f"no single row for {name} at {workload.name()}"
            assert re.search(r" ms \([\d,.]+-[\d,.]+\) ", rows[0]), rows[0]
            assert name == "reference" or re.search(r"x \([\d.]+-[\d.]+\)$", rows[0]), rows[0]
    assert re.search(r"^machine: .*, \d+ logical CPUs; one-minute load average", table, re.M)


# ------------------------------------------------------------------------------- the examples


def test_vocab_parallel_example_runs():
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(VOCAB_PARALLEL)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 ranks, vocabulary slices of [502, 501]" in result.stdout
    assert "match one process on the whole vocabulary" in result.stdout
