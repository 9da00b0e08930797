"""prefopt.integrations.trl beyond one process and one padded batch, with the real engines on CPU
(gloo): a TRL DPO step under FSDP2 and under DeepSpeed ZeRO-3 on 2 processes, with enable() against
the same step without it and against one process on the whole batch (loss, TRL's metrics, every
parameter's gradient, float32, to 1e-5); a DTensor LM head given to prefopt's own functions; and
padding-free packed batches through TRL's fused LM head and its SFTTrainer."""

import importlib.util
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import trl.trainer.utils as trl_utils  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import prefopt.integrations.trl as prefopt_trl  # noqa: E402

import trl_engine_worker as worker  # noqa: E402
from conftest import relative_error  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated:FutureWarning")

TESTS = Path(__file__).parent
# One world of 2 ranks starts in about 15 s here (imports, the engines' setup); far more is a hang.
WORLD_TIMEOUT_S = 240
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def trl_restored():
    yield
    prefopt_trl.disable()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(engine: str, directory: Path, world_size: int = 2) -> dict:
    """``tests/trl_engine_worker.py engine`` on ``world_size`` CPU processes; rank 0's results."""
    results = directory / "results.pt"
    port = str(free_port())
    processes = []
    for rank in range(world_size):
        environment = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                       "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        log = open(directory / f"rank{rank}.log", "w")
        processes.append((subprocess.Popen([sys.executable, str(TESTS / "trl_engine_worker.py"), engine, str(results)],
                                           env=environment, stdout=log, stderr=subprocess.STDOUT), log))
    failures = []
    for rank, (process, log) in enumerate(processes):
        try:
            process.wait(timeout=WORLD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            failures.append(f"rank {rank} still running after {WORLD_TIMEOUT_S} s")
        log.close()
        if process.returncode != 0:
            tail = (directory / f"rank{rank}.log").read_text()[-3000:]
            failures.append(f"rank {rank} exited with {process.returncode}:\n{tail}")
    if failures:
        pytest.fail(f"{engine} on {world_size} processes: " + "\n".join(failures))
    return torch.load(results)


def differences(step: dict, reference: dict) -> dict[str, float]:
    """Relative differences of one step's loss, metrics and gradients from another's."""
    loss, metrics, gradients = step
    reference_loss, reference_metrics, reference_gradients = reference
    assert metrics.keys() == reference_metrics.keys()
    assert gradients.keys() == reference_gradients.keys()
    found = {"loss": abs(loss - reference_loss) / abs(reference_loss)}
    found.update({name: abs(value - reference_metrics[name]) / max(abs(reference_metrics[name]), 1e-1)
                  for name, value in metrics.items()})
    found.update({name: relative_error(gradient, reference_gradients[name])
                  for name, gradient in gradients.items()})
    return found


def steps(results: dict) -> list[tuple]:
    return list(zip(results["loss"], results["metrics"], results["gradients"]))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The same two steps in this process, on the whole batch."""
    return worker.run("none", str(tmp_path_factory.mktemp("one-process")))


def assert_engine_matches(results: dict, one_process: dict) -> None:
    (trl_step, prefopt_step), (whole_batch_step, _) = steps(results), steps(one_process)
    for gradient in trl_step[2].values():
        assert gradient.norm() > 0
    for against, reference in (("TRL on the engine", trl_step), ("one process", whole_batch_step)):
        found = differences(prefopt_step, reference)
        worst = max(found, key=found.get)
        print(f"prefopt against {against}: largest relative difference {found[worst]:.2e} ({worst})")
        assert found[worst] <= TOLERANCE, (against, worst, found[worst])


def test_one_process_steps_agree(one_process):
    trl_step, prefopt_step = steps(one_process)
    found = differences(prefopt_step, trl_step)
    assert max(found.values()) <= TOLERANCE


def test_fsdp2_dpo_step(tmp_path, one_process):
    assert_engine_matches(run_world("fsdp2", tmp_path), one_process)


def deepspeed_unavailable() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (.ci/run installs it)"
    return None


@pytest.mark.skipif(deepspeed_unavailable() is not None, reason=str(deepspeed_unavailable()))
def test_deepspeed_zero3_dpo_step(tmp_path, one_process):
    assert_engine_matches(run_world("zero3", tmp_path), one_process)
