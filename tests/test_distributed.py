"""torch.distributed on CPU with gloo, in 2 and 4 processes: vocabulary parallelism (the logits
and the fused linear paths, every backend that runs here, uneven shards, ignored rows,
temperature and softcap) against the single-process float64 oracle on the whole vocabulary,
kto_kl over uneven batches, and DistributedDataParallel with the fused linear path against one
process on the concatenated batch.

Importing torch and prefopt costs seconds, so each world size starts once, forked from a server
process that imported them (multiprocessing's forkserver); ``worker`` runs every check in
``CHECKS`` and writes one traceback (or None) per check to a JSON file, and each check is one
pytest item. The checks keep their collectives ahead of their assertions, so a failing rank
still leaves the others running; a worker that dies or hangs fails its whole world.
"""

import json
import multiprocessing
import time
import traceback
from datetime import timedelta
from functools import partial

import pytest
import torch
import torch.distributed as dist
from conftest import relative_error

import prefopt
from prefopt.backends import unavailable_reason

WORLD_SIZES = (2, 4)
# Uneven vocabulary slices, in rank order; the 4-rank split has a one-token shard.
SHARD_SIZES = {2: (19, 26), 4: (11, 1, 20, 13)}
# The processes hold CPU tensors: Triton runs through its interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 where there is no GPU), or not at all.
BACKENDS = tuple(backend for backend in ("torch", "triton", "reference")
                 if unavailable_reason(backend, torch.device("cpu")) is None)
DIFFERENTIABLE = ("logps", "entropy", "mean_logits", "log_sum_sq_probs")
STATS = ("entropy", "mean_logits", "log_sum_sq_probs")
TOLERANCE = 1e-5
WORLD_TIMEOUT_S = 240


# ---------------------------------------------------------------------------------- the worker


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    error = relative_error(out, ref)
    assert error <= TOLERANCE, f"{name}: relative error {error:.2e} > {TOLERANCE:.0e}"


def same_on_every_rank(name: str, tensor: torch.Tensor, group) -> None:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.detach().contiguous(), group=group)
    for rank, other in enumerate(gathered):
        assert torch.equal(other, gathered[0]), f"{name}: rank {rank} differs from rank 0"


def shard_bounds(group) -> tuple[int, int, int]:
    """(start, end, vocab size) of this rank in ``group``."""
    sizes = SHARD_SIZES[dist.get_world_size(group)]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes[: rank + 1]), sum(sizes)


def problem_labels(generator, shape, group) -> torch.Tensor:
    """Global labels, among them every shard's first and last id (never ignored), 30% ignored."""
    sizes = SHARD_SIZES[dist.get_world_size(group)]
    labels = torch.randint(0, sum(sizes), shape, generator=generator)
    ignored = torch.rand(shape, generator=generator) < 0.3
    edges = sorted({edge for rank in range(len(sizes)) for edge in (sum(sizes[:rank]), sum(sizes[: rank + 1]) - 1)})
    labels.view(-1)[: len(edges)] = torch.tensor(edges)
    ignored.view(-1)[: len(edges)] = False
    return torch.where(ignored, -100, labels)


def weighted_loss(outputs, upstream) -> torch.Tensor:
    return sum((getattr(outputs, name).double() * upstream[name]).sum() for name in DIFFERENTIABLE)


def check_logits(group, backend, *, temperature=1.0, softcap=None, inplace_backward=False, seed=0):
    """Vocabulary-parallel token_stats of this rank's slice of the logits against the oracle."""
    start, end, vocab_size = shard_bounds(group)
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, vocab_size, generator=generator) * 4
    labels = problem_labels(generator, (3, 5), group)
    upstream = {name: torch.randn(3, 5, generator=generator, dtype=torch.float64) for name in DIFFERENTIABLE}
    options = {"temperature": temperature, "softcap": softcap, "stats": STATS}

    reference_input = logits.double().requires_grad_(True)
    reference = prefopt.token_stats(reference_input, labels, backend="reference", **options)
    (reference_grad,) = torch.autograd.grad(weighted_loss(reference, upstream), reference_input)

    leaf = logits.clone().requires_grad_(True)
    # A view of this rank's columns, read in place; the in-place backward overwrites it.
    shard = leaf[..., start:end] * 1 if inplace_backward else leaf[..., start:end]
    result = prefopt.token_stats(shard, labels, backend=backend, inplace_backward=inplace_backward,
                                 process_group=group, **options)
    # Before the backward, which may overwrite the shard with its gradient.
    sequences = prefopt.sequence_logprobs(shard.detach(), labels, average=True, backend=backend,
                                          temperature=temperature, softcap=softcap, process_group=group)
    (grad,) = torch.autograd.grad(weighted_loss(result, upstream), shard)
    for name in DIFFERENTIABLE:
        same_on_every_rank(name, getattr(result, name), group)

    for name in DIFFERENTIABLE:
        assert getattr(result, name).dtype == torch.float32 or backend == "reference"
        assert_close(name, getattr(result, name), getattr(reference, name))
        assert (getattr(result, name)[labels == -100] == 0).all(), f"{name}: ignored rows must give 0"
    assert result.is_top1 is None
    assert_close("gradient of this rank's logits", grad, reference_grad[..., start:end])
    assert (grad[labels == -100] == 0).all(), "ignored rows must receive exactly zero gradient"
    reference_sequences = prefopt.sequence_logprobs(logits.double(), labels, average=True, backend="reference",
                                                    temperature=temperature, softcap=softcap)
    assert_close("sequence_logprobs", sequences, reference_sequences)


def check_linear(group, backend, *, temperature=1.0, softcap=None, logit_scale=1.0, seed=1):
    """Vocabulary-parallel linear_token_stats of this rank's weight and bias rows against the
    oracle: outputs, the full gradient of hidden on every rank, this rank's weight/bias rows'."""
    start, end, vocab_size = shard_bounds(group)
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 6, 16, generator=generator)
    weight = torch.randn(vocab_size, 16, generator=generator) * 0.75
    bias = torch.randn(vocab_size, generator=generator)
    labels = problem_labels(generator, (2, 6), group)
    upstream = {name: torch.randn(2, 6, generator=generator, dtype=torch.float64) for name in DIFFERENTIABLE}
    options = {"temperature": temperature, "softcap": softcap, "logit_scale": logit_scale, "stats": STATS}

    reference_leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    reference = prefopt.linear_token_stats(reference_leaves[0], reference_leaves[1], labels, bias=reference_leaves[2],
                                           backend="reference", **options)
    reference_grads = torch.autograd.grad(weighted_loss(reference, upstream), reference_leaves)

    leaves = [hidden.clone().requires_grad_(True), weight[start:end].clone().requires_grad_(True),
              bias[start:end].clone().requires_grad_(True)]
    result = prefopt.linear_token_stats(leaves[0], leaves[1], labels, bias=leaves[2], backend=backend,
                                        process_group=group, **options)
    grad_hidden, grad_weight, grad_bias = torch.autograd.grad(weighted_loss(result, upstream), leaves)
    for name in DIFFERENTIABLE:
        same_on_every_rank(name, getattr(result, name), group)
    same_on_every_rank("gradient of hidden", grad_hidden, group)

    for name in DIFFERENTIABLE:
        assert_close(name, getattr(result, name), getattr(reference, name))
    assert_close("gradient of hidden", grad_hidden, reference_grads[0])
    assert_close("gradient of this rank's weight rows", grad_weight, reference_grads[1][start:end])
    assert_close("gradient of this rank's bias", grad_bias, reference_grads[2][start:end])
    assert (grad_hidden[labels == -100] == 0).all(), "ignored rows must receive exactly zero gradient"


def check_subgroups(group, backend):
    """Two-rank vocabulary groups inside four ranks (tensor x data parallel): each pair splits
    the vocabulary by its own rank order and holds its own data."""
    size = 2
    pair, _ = dist.new_subgroups(size)
    global_rank = dist.get_rank()
    check_logits(pair, backend, softcap=5.0, seed=10 + global_rank // size)
    check_linear(pair, backend, seed=20 + global_rank // size)


def check_errors(group):
    """Bad input, even on one rank only, raises the same error on every rank: none is left waiting
    in a collective."""
    start, end, vocab_size = shard_bounds(group)
    logits = torch.randn(4, end - start)
    labels = torch.tensor([0, 3, -100, vocab_size - 1])
    with pytest.raises(ValueError, match="is_top1"):
        prefopt.token_stats(logits, labels, stats=("is_top1",), process_group=group)
    with pytest.raises(ValueError, match=rf"labels: every label must be in \[0, {vocab_size}\)"):
        prefopt.token_logprobs(logits, torch.tensor([0, 3, -100, vocab_size]), process_group=group)
    different = labels.clone()
    different[1] += int(dist.get_rank(group) == 1)
    with pytest.raises(ValueError, match="labels: the label values must be the same on every rank"):
        prefopt.token_logprobs(logits, different, process_group=group)
    with pytest.raises(ValueError, match="labels: the number of labels"):
        prefopt.token_logprobs(logits[: 2 + dist.get_rank(group) % 2], labels[: 2 + dist.get_rank(group) % 2],
                               process_group=group)
    with pytest.raises(TypeError, match="process_group"):
        prefopt.token_logprobs(logits, labels, process_group="world")


def check_kto_kl(group):
    """The mean over every rank's examples, with a different batch size on each rank."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    generator = torch.Generator().manual_seed(5)
    sizes = [rank_index + 2 for rank_index in range(world_size)]
    policy = torch.randn(sum(sizes), generator=generator, dtype=torch.float64) - 1.0
    reference = torch.randn(sum(sizes), generator=generator, dtype=torch.float64) - 2.0
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    kl = prefopt.kto_kl(policy[mine], reference[mine], process_group=group)
    expected = (policy - reference).mean().clamp(min=0)
    assert kl.item() == pytest.approx(expected.item(), rel=1e-12)


class TinyPolicy(torch.nn.Module):
    """Embedding, one tanh layer and an LM head whose log-probs come from the fused linear path."""

    def __init__(self, vocab_size: int, hidden_size: int, backend: str) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden_size)
        self.layer = torch.nn.Linear(hidden_size, hidden_size)
        self.lm_head = torch.nn.Linear(hidden_size, vocab_size)
        self.backend = backend

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.layer(self.embed(input_ids)))
        logps = prefopt.linear_token_logprobs(hidden, self.lm_head.weight, labels, bias=self.lm_head.bias,
                                              backend=self.backend)
        return logps.sum(-1)


def dpo_step_data(generator, pairs, length, vocab_size):
    """input_ids [2 * pairs, length] (chosen rows, then rejected), shifted labels with the prompt
    ignored, reference log-probs [pairs] x 2."""
    input_ids = torch.randint(0, vocab_size, (2 * pairs, length), generator=generator)
    labels = input_ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[:, :2] = -100
    reference = torch.randn(2, pairs, generator=generator, dtype=torch.float32) - 20.0
    return input_ids, labels, reference


def dpo_loss_of(model, input_ids, labels, reference) -> torch.Tensor:
    logps = model(input_ids, labels)
    chosen, rejected = logps.chunk(2)
    return prefopt.dpo_loss(chosen, rejected, reference[0], reference[1], beta=0.5).loss


def check_ddp(group, backend, steps=2):
    """DDP over the fused linear path and a DPO loss: after SGD steps the parameters are equal
    on every rank and to one process trained on the concatenated batch."""
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    vocab_size, hidden_size, pairs, length = 37, 16, 2, 7
    torch.manual_seed(0)
    single = TinyPolicy(vocab_size, hidden_size, backend)
    # Other ranks start elsewhere: DDP's broadcast from rank 0 must bring them to rank 0's start.
    torch.manual_seed(rank)
    replica = TinyPolicy(vocab_size, hidden_size, backend)
    model = torch.nn.parallel.DistributedDataParallel(replica, process_group=group)
    initial = [parameter.detach().clone() for parameter in single.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    single_optimizer = torch.optim.SGD(single.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        batches = [dpo_step_data(generator, pairs, length, vocab_size) for _ in range(world_size)]
        input_ids, labels, reference = batches[rank]
        optimizer.zero_grad()
        dpo_loss_of(model, input_ids, labels, reference).backward()
        optimizer.step()

        # One process, the same examples: chosen rows of every rank, then rejected rows.
        def joined(index, pick):
            return torch.cat([pick(batch[index]) for batch in batches])

        all_ids = torch.cat([joined(0, lambda t: t[:pairs]), joined(0, lambda t: t[pairs:])])
        all_labels = torch.cat([joined(1, lambda t: t[:pairs]), joined(1, lambda t: t[pairs:])])
        all_reference = torch.cat([batch[2] for batch in batches], dim=1)
        single_optimizer.zero_grad()
        dpo_loss_of(single, all_ids, all_labels, all_reference).backward()
        single_optimizer.step()

    for name, parameter in replica.named_parameters():
        same_on_every_rank(name, parameter, group)
    for (name, parameter), single_parameter, start in zip(replica.named_parameters(), single.parameters(), initial):
        assert not torch.equal(single_parameter, start), f"{name}: the steps did not change it"
        assert_close(name, parameter, single_parameter)


# name -> (check, the world sizes it runs in).
CHECKS = {}
for _backend in BACKENDS:
    CHECKS[f"logits[{_backend}]"] = (partial(check_logits, backend=_backend), WORLD_SIZES)
    CHECKS[f"logits_softcap_temperature[{_backend}]"] = (
        partial(check_logits, backend=_backend, temperature=0.7, softcap=5.0, seed=2), WORLD_SIZES)
    CHECKS[f"linear[{_backend}]"] = (partial(check_linear, backend=_backend), WORLD_SIZES)
    CHECKS[f"linear_softcap_temperature_scale[{_backend}]"] = (
        partial(check_linear, backend=_backend, temperature=0.7, softcap=5.0, logit_scale=0.5, seed=3), WORLD_SIZES)
for _backend in [backend for backend in BACKENDS if backend != "reference"]:
    CHECKS[f"logits_inplace_backward[{_backend}]"] = (
        partial(check_logits, backend=_backend, inplace_backward=True), WORLD_SIZES)
    CHECKS[f"ddp[{_backend}]"] = (partial(check_ddp, backend=_backend), WORLD_SIZES)
CHECKS["subgroups[torch]"] = (partial(check_subgroups, backend="torch"), (4,))
CHECKS["errors"] = (check_errors, WORLD_SIZES)
CHECKS["kto_kl"] = (check_kto_kl, WORLD_SIZES)


def worker(rank: int, world_size: int, store_path: str, results_path: str) -> None:
    """One rank: every check of this world size, each traceback (or None) to ``results_path``."""
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=90))
    results = {}
    for name, (check, world_sizes) in CHECKS.items():
        if world_size not in world_sizes:
            continue
        try:
            check(dist.group.WORLD)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
        # A failed check may have left collectives of its own behind; the next starts together.
        dist.barrier()
    with open(results_path, "w") as file:
        json.dump(results, file)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- the tests


def run_world(world_size: int, directory) -> list[dict]:
    """Runs ``worker`` in ``world_size`` processes and returns each rank's results."""
    # Forked from a fresh server process that has imported prefopt (and Triton, torch) once:
    # starting a world costs no imports, and nothing is forked from pytest's threads.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["prefopt"])
    store = directory / "store"
    processes = [
        context.Process(target=worker, args=(rank, world_size, str(store), str(directory / f"rank{rank}.json")))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()
    if hung:
        pytest.fail(f"world of {world_size}: ranks {hung} still running after {WORLD_TIMEOUT_S} s")
    results = []
    for rank, process in enumerate(processes):
        path = directory / f"rank{rank}.json"
        if process.exitcode != 0 or not path.exists():
            pytest.fail(f"world of {world_size}: rank {rank} exited with {process.exitcode} (its output is above)")
        results.append(json.loads(path.read_text()))
    return results


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda size: f"world{size}")
def world(request, tmp_path_factory) -> list[dict]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    return run_world(request.param, tmp_path_factory.mktemp(f"world{request.param}"))


@pytest.mark.parametrize("check", list(CHECKS))
def test_distributed(world, check):
    if check not in world[0]:
        pytest.skip(f"{check} runs in the worlds of {CHECKS[check][1]} processes")
    failures = [f"rank {rank}:\n{results[check]}" for rank, results in enumerate(world) if results[check]]
    assert not failures, "\n".join(failures)



def test_process_group_needs_an_initialized_torch_distributed():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group is set up in this process")
    logits, labels = torch.randn(2, 5), torch.tensor([1, 4])
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialized"):
        prefopt.token_logprobs(logits, labels, process_group=object())
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialized"):
        prefopt.linear_token_logprobs(torch.randn(2, 3), torch.randn(5, 3), labels, process_group=object())
