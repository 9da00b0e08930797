"""Vocabulary parallelism: the log-probs and statistics of an LM head sharded over the vocabulary
across the ranks of a process group, as Megatron's vocabulary-parallel cross-entropy shards it.

Rank r of the group (in the group's rank order) holds the logits, or the LM-head weight rows and
bias, of the contiguous vocabulary slice [start_r, end_r); the slices follow one another in rank
order from 0 and may have different sizes. The labels are global vocabulary ids and the same on
every rank, as are, for the fused linear path, the hidden states.

Each rank runs the ordinary single-process operator on its slice, with every scored row scored
there too: a label the rank owns becomes its local id, any other label the local id 0 (whose
log-prob is computed and then dropped). Per row, from each shard's log-sum-exp lse_r, log-prob,
entropy H_r, mean logit and log sum q^2 (q the shard's own softmax):

    M = max_r lse_r (an all-reduce MAX, detached: it only keeps exp in range)
    e_r = exp(lse_r - M),  s = sum_r e_r >= 1,  lse = M + log s
    log p_y = (log q_y + lse_owner - M) - log s             (owner = the rank holding the label)
    H = sum_r e_r (H_r - (lse_r - M)) / s + log s           (= sum_r w_r H_r - sum_r w_r log w_r,
                                                              w_r = e_r / s)
    mean logit = sum_r mean_r V_r / V
    log sum p^2 = log sum_r e_r^2 exp(log sum q^2_r) - 2 log s

Each sum over ranks is an all-reduce SUM of a term that depends on that rank's shard only, so
every output is the same on every rank. Its backward is the identity: every rank computes the
same loss from these outputs and differentiates it, so each rank already holds the full upstream
gradient of the sum, and the gradient of its own term is its share (the log-sum-exp is a
differentiable output of the operators for this; see ``prefopt.logprobs.op``). The gradients of the
logits, weight and bias therefore stay on their rank: concatenated in rank order they are the
single-process gradients of the full vocabulary.

The hidden states of the fused linear path are the one input every shard reads. They enter
through ``replicated``, identity forward and all-reduce SUM backward (Megatron's "copy to the
tensor-parallel region"): each rank's operator yields the gradient through its own slice of the
vocabulary, and their sum is the gradient of hidden, the same on every rank afterwards.

Each call all-gathers, once, the shard sizes together with what every rank must agree on (the
number of labels, a checksum of their values, the hidden size, the dtype), and reads the result
on the host: one host round trip per call on a GPU, so this path runs eagerly (no CUDA graph, no
``torch.compile(fullgraph=True)``). Every rank gets the same answer, so a mismatch raises the
same error on every rank instead of leaving some waiting in a collective.

Not supported: "is_top1", which needs each shard's row maximum (the operators do not return
it), and rows in which a shard holds no finite logit (its log-sum-exp would be -inf).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist

from .._codes import NO_LABEL
from .._types import TokenStats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Tensor = torch.Tensor

_DTYPE_CODES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


class VocabShard(NamedTuple):
    """This rank's slice [start, end) of a vocabulary of ``vocab_size`` ids split over ``group``."""

    start: int
    end: int
    vocab_size: int
    group: ProcessGroup


def _labels_checksum(labels: Tensor, ignore_index: int | None) -> Tensor:
    """A position-weighted sum of the labels, with ignored positions as -1: equal on ranks whose
    labels are equal. int64 arithmetic wraps identically everywhere, so overflow is harmless."""
    flat = labels.reshape(-1).long()
    if ignore_index is not None:
        flat = torch.where(flat == ignore_index, -1, flat)
    weights = torch.arange(flat.numel(), device=flat.device) % 65521 + 1
    return (flat * weights).sum()


def vocab_shard(process_group: object, local_vocab: int, labels: Tensor, ignore_index: int | None,
                stats: frozenset[str], dtype: torch.dtype, *, what: str, hidden_size: int = 0) -> VocabShard:
    """This rank's vocabulary slice, from one all-gather of every rank's shard size, checked for
    consistency across the group. The caller then checks the label values against the global
    vocabulary, ``shard.vocab_size``, and goes on with the labels that check returns.

    Args:
        process_group: the group the vocabulary is split over.
        local_vocab: this rank's number of vocabulary ids (logits.shape[-1] or weight.shape[0]).
        labels: [...] global vocabulary ids, equal on every rank.
        stats: the statistics asked for ("is_top1" is refused).
        dtype: the logits' (or hidden states') dtype, equal on every rank.
        what: what is split, for error messages ("logits", or "weight and bias").
        hidden_size: H of the fused linear path (0 for logits), equal on every rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first, or pass process_group=None")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup or None, "
                        f"got {type(process_group).__name__}")
    if "is_top1" in stats:
        raise ValueError("stats: 'is_top1' is not available with process_group: deciding the argmax across "
                         "vocabulary shards needs each shard's row maximum, which the operators do not return")
    mine = torch.stack([
        torch.tensor(value, device=labels.device)
        for value in (local_vocab, labels.numel(), hidden_size, _DTYPE_CODES.index(dtype))
    ] + [_labels_checksum(labels, ignore_index)])
    world_size = dist.get_world_size(process_group)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=process_group)
    rows = torch.stack(gathered).tolist()
    sizes = [row[0] for row in rows]
    for rank, row in enumerate(rows):
        for column, name in ((1, "labels: the number of labels"), (2, "hidden: the hidden size"),
                             (3, "the dtype of the inputs"), (4, "labels: the label values")):
            if row[column] != rows[0][column]:
                raise ValueError(f"{name} must be the same on every rank of process_group (only the {what} "
                                 f"are split over the vocabulary); rank {rank} differs from rank 0")
    rank = dist.get_rank(process_group)
    start = sum(sizes[:rank])
    return VocabShard(start, start + sizes[rank], sum(sizes), process_group)


def local_labels(labels: Tensor, ignore_index: int | None, shard: VocabShard) -> Tensor:
    """The labels as this rank's operator takes them, int64 of the labels' shape: label - start
    where this rank owns it, 0 where another rank does (the row is still scored here, for its
    log-sum-exp and statistics), ``NO_LABEL`` where it is ignored (the caller's ignore_index may
    be a valid local id)."""
    labels = labels.long()
    owned = (labels >= shard.start) & (labels < shard.end)
    local = torch.where(owned, labels - shard.start, 0)
    if ignore_index is None:
        return local
    return torch.where(labels == ignore_index, NO_LABEL, local)


class _SumAcrossGroup(torch.autograd.Function):
    """All-reduce SUM whose backward is the identity: the sum feeds a loss every rank computes
    alike, so each rank's upstream gradient is already the whole one."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Replicated(torch.autograd.Function):
    """Identity forward, all-reduce SUM backward: an input every rank holds alike and feeds to its
    own shard; the gradient is the sum of the shards' gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def replicated(tensor: Tensor, shard: VocabShard) -> Tensor:
    """``tensor`` (held alike on every rank), whose gradient is summed across the group."""
    return _Replicated.apply(tensor, shard.group)


def combine(local: TokenStats, lse: Tensor, labels: Tensor, ignore_index: int | None,
            shard: VocabShard) -> TokenStats:
    """The full-vocabulary statistics from this rank's (see the module docstring for the formulas).

    Args:
        local: this rank's TokenStats under ``local_labels``, each [...] = labels.shape.
        lse: [...] this rank's log-sum-exp of each row, differentiable.
        labels: [...] the global labels.

    Returns:
        TokenStats of the labels' shape and the local outputs' dtype, equal on every rank; exact
        zeros where the label is ignored.
    """
    group = shard.group

    def summed(term: Tensor) -> Tensor:
        return _SumAcrossGroup.apply(term, group)

    scored = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    owned = scored & (labels >= shard.start) & (labels < shard.end)
    shift = lse.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    log_weight = lse - shift
    weight = log_weight.exp()
    total = summed(weight)
    log_total = total.log()

    def scored_only(value: Tensor | None) -> Tensor | None:
        return None if value is None else torch.where(scored, value, 0.0)

    logps = summed(torch.where(owned, local.logps + log_weight, 0.0)) - log_total
    entropy = mean_logits = log_sum_sq_probs = None
    if local.entropy is not None:
        entropy = summed(weight * (local.entropy - log_weight)) / total + log_total
    if local.mean_logits is not None:
        mean_logits = summed(local.mean_logits * ((shard.end - shard.start) / shard.vocab_size))
    if local.log_sum_sq_probs is not None:
        # Every term is <= 1 and the largest shard's is >= 1 / V: no overflow, no harmful underflow.
        log_sum_sq_probs = summed((2.0 * log_weight + local.log_sum_sq_probs).exp()).log() - 2.0 * log_total
    return TokenStats(scored_only(logps), scored_only(entropy), scored_only(mean_logits),
                      scored_only(log_sum_sq_probs), None)
