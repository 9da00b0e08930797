"""prefopt.integrations.trl beyond one process and one padded batch, with the real engines on CPU
(gloo): a TRL DPO step under FSDP2 and under DeepSpeed ZeRO-3 on 2 processes, with enable() against
the same step without it and against one process on the whole batch (loss, TRL's metrics, every
parameter's gradient, float32, to 1e-5); a DTensor LM head given to prefopt's own functions; and
padding-free packed batches through TRL's fused LM head and its SFTTrainer."""

import importlib.util
import multiprocessing
import socket
import time
from pathlib import Path
from typing import NamedTuple

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


class World(NamedTuple):
    engine: str
    directory: Path
    processes: list


def start_world(engine: str, directory: Path, world_size: int = 2) -> World:
    """``trl_engine_worker.rank_main`` on ``world_size`` CPU processes, in the background."""
    # Forked from a server process that has imported the worker (torch, Transformers, TRL) once:
    # each rank starts without importing them again.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["trl_engine_worker"])
    port = free_port()
    processes = [context.Process(target=worker.rank_main,
                                 args=(engine, rank, world_size, port, str(directory / "results.pt")))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    return World(engine, directory, processes)


def finish_world(world: World) -> dict:
    """Waits for the world's ranks (killing them after WORLD_TIMEOUT_S) and returns rank 0's results."""
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    failures = []
    for rank, process in enumerate(world.processes):
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
            failures.append(f"rank {rank} still running after {WORLD_TIMEOUT_S} s")
        elif process.exitcode != 0:
            tail = (world.directory / f"rank{rank}.log").read_text()[-3000:]
            failures.append(f"rank {rank} exited with {process.exitcode}:\n{tail}")
    if failures:
        pytest.fail(f"{world.engine} on {len(world.processes)} processes: " + "\n".join(failures))
    return torch.load(world.directory / "results.pt")


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


def deepspeed_unavailable() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (.ci/run installs it)"
    return None


ENGINES = ["fsdp2", "zero3"] if deepspeed_unavailable() is None else ["fsdp2"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, World]:
    """Every engine's world, started together: their start-up (imports, the engines' setup) overlaps."""
    started = {engine: start_world(engine, tmp_path_factory.mktemp(engine)) for engine in ENGINES}
    yield started
    for world in started.values():
        for process in world.processes:
            if process.is_alive():
                process.kill()
                process.join()


@pytest.fixture(scope="module")
def one_process(worlds, tmp_path_factory) -> dict:
    """The same two steps in this process, on the whole batch (while the worlds run)."""
    return worker.run("none", str(tmp_path_factory.mktemp("one-process")))


def assert_engine_matches(results: dict, one_process: dict, head: str) -> None:
    assert results["fused_calls"][0] == 0 and results["fused_calls"][1] >= 2  # the policy and the reference
    assert all(layout.startswith(head) for layout in results["heads"]), results["heads"]
    (trl_step, prefopt_step), (whole_batch_step, _) = steps(results), steps(one_process)
    for gradient in trl_step[2].values():
        assert gradient.norm() > 0
    for against, reference in (("TRL on the engine", trl_step), ("one process", whole_batch_step)):
        found = differences(prefopt_step, reference)
        worst = max(found, key=found.get)
        print(f"{results['heads'][0]}: prefopt against {against}: largest relative difference "
              f"{found[worst]:.2e} ({worst})")
        assert found[worst] <= TOLERANCE, (against, worst, found[worst])


def test_one_process_steps_agree(one_process):
    trl_step, prefopt_step = steps(one_process)
    assert one_process["fused_calls"][0] == 0 and one_process["fused_calls"][1] >= 2
    found = differences(prefopt_step, trl_step)
    assert max(found.values()) <= TOLERANCE


@pytest.fixture(scope="module")
def fsdp2(worlds) -> dict:
    return finish_world(worlds["fsdp2"])


def test_fsdp2_dpo_step(fsdp2, one_process):
    # Between steps FSDP2 holds each rank's half of the head's rows.
    assert_engine_matches(fsdp2, one_process, "DTensor (Shard(dim=0),) of (19, 32) with (10, 32)")


def test_fsdp2_dtensor_head_in_prefopt_functions(fsdp2):
    # DPOLoss on an LMHeadInput and linear_token_logprobs, given the sharded head's DTensors.
    found = fsdp2["dtensor_head"]
    print(f"DTensor head against the plain head on the whole batch: {found}")
    assert max(found.values()) <= TOLERANCE, found
    assert fsdp2["dtensor_refusal"].startswith("weight: a DTensor with process_group"), fsdp2["dtensor_refusal"]


needs_deepspeed = pytest.mark.skipif(deepspeed_unavailable() is not None, reason=str(deepspeed_unavailable()))


@pytest.fixture(scope="module")
def zero3(worlds) -> dict:
    return finish_world(worlds["zero3"])


@needs_deepspeed
def test_deepspeed_zero3_dpo_step(zero3, one_process):
    # Inside the model's forward, as TRL runs its fused head, DeepSpeed's own backward hooks have
    # the head gathered again by the time prefopt's backward reads it.
    assert_engine_matches(zero3, one_process, "zero3 partition of 608 with 0 here")


@needs_deepspeed
def test_deepspeed_zero3_head_outside_a_forward(zero3):
    # No module forward gathers this head: prefopt gathers it for the forward and the backward.
    found = zero3["zero3_head"]
    print(f"ZeRO-3 head outside a forward against the plain head: {found}")
    assert max(found.values()) <= TOLERANCE, found


# ----------------------------------------------------------------------------- padding-free batches


def sft_step(trainer, batch) -> tuple:
    """Loss, TRL's metrics and every parameter's gradient of one compute_loss + backward."""
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if name != "num_tokens"}
    return loss.item(), metrics, {name: p.grad.clone() for name, p in trainer.model.named_parameters()}


def test_padding_free_sft_step(tmp_path):
    # TRL 1.16 packs only in its SFTTrainer (its DPOTrainer turns padding_free=True off, with a
    # warning): the batch is one row of every example, with position_ids restarting at each.
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=len(worker.PROMPTS),
                     padding_free=True, packing=True, packing_strategy="bfd", max_length=64, use_cpu=True, bf16=False,
                     max_steps=1, disable_tqdm=True)
    dataset = Dataset.from_dict({"prompt": worker.PROMPTS, "completion": worker.CHOSEN})
    trainer = SFTTrainer(model=worker.tiny_llama(0), args=args, train_dataset=dataset,
                         processing_class=worker.tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert int((batch["position_ids"] == 0).sum()) == len(worker.PROMPTS)
    trl_step = sft_step(trainer, batch)
    with prefopt_trl.enabled("torch"):
        prefopt_step = sft_step(trainer, batch)
    found = differences(prefopt_step, trl_step)
    worst = max(found, key=found.get)
    print(f"padding-free SFT step: largest relative difference {found[worst]:.2e} ({worst})")
    assert found[worst] <= TOLERANCE, (worst, found[worst])


def test_packed_shift_labels_match_the_padded_batch(monkeypatch):
    # TRL's fused head on one packed row with position_ids and pre-shifted shift_labels (as under
    # context parallelism) gives, through prefopt, each sequence's log-probs of the padded batch.
    model = worker.tiny_llama(0)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    generator = torch.Generator().manual_seed(4)
    lengths = [5, 3, 7]
    sequences = [torch.randint(3, model.config.vocab_size, (n,), generator=generator) for n in lengths]
    packed = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    # Each sequence's last token predicts nothing: -100 where the next position starts another.
    shift_labels = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in sequences])[None]
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=1)
    labels = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=-100)
    attention_mask = labels != -100
    with prefopt_trl.enabled("torch"):
        packed_out = model(input_ids=packed, position_ids=position_ids, shift_labels=shift_labels, fused_lm_head=True)
        padded_out = model(input_ids=padded, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    packed_sums = torch.stack([part.sum() for part in packed_out.log_probs[0].split(lengths)])
    assert relative_error(packed_sums, padded_out.log_probs.sum(-1)) <= TOLERANCE
    trl_out = model(input_ids=packed, position_ids=position_ids, shift_labels=shift_labels, fused_lm_head=True)
    for field in ("log_probs", "entropy"):
        assert relative_error(getattr(packed_out, field), getattr(trl_out, field)) <= TOLERANCE, field
