"""Per-token and per-sequence log-probabilities of labels under softmax(logits), without the
[tokens, V] float32 tensors that ``log_softmax(logits.float()).gather(...)`` allocates.

Conventions shared by every function here:

- ``logits`` [..., V]: bfloat16, float16, float32 or float64, any strides as long as the last
  dimension is contiguous (``logits[:, :-1]`` is read in place, never copied).
- ``labels`` [...] = logits.shape[:-1], int64 or int32, already shifted by the caller (position
  t holds the token that logits[t] predicts). A label equal to ``ignore_index`` marks a position
  that is not scored: it is never read, gives exactly 0 and receives exactly 0 gradient.
- The softmax is taken over z = softcap(logits) / temperature, softcap(x) = c * tanh(x / c)
  (Gemma-style, off when ``softcap`` is None).
- Outputs are float32 (float64 from the reference backend given float64 logits).
- ``inplace_backward=True`` writes the logits gradient into the logits buffer: no [tokens, V]
  gradient is allocated, and the caller promises not to read the logits after backward.
- ``backend``: "auto", "triton", "cuda", "torch" or "reference" (see ``prefopt.backends``).
- ``process_group``: the logits are this rank's slice of a vocabulary sharded over the group's
  ranks, the labels global ids (see ``prefopt.logprobs.distributed``); None for the whole vocabulary.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .. import _validation, backends
from .._codes import NO_LABEL
from .._types import STAT_NAMES, TokenStats
from . import distributed, op
from .reference import reference_token_stats
from .transform import scored_logits, transformed_logits

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    stats: Sequence[str] = ("entropy",),
    ignore_index: int | None = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group: "ProcessGroup | None" = None,
) -> TokenStats:
    """Log-probs of ``labels`` and the per-token statistics named in ``stats``, in one pass.

    Args:
        logits: [..., V] float logits (see the module docstring for layout).
        labels: [...] int64/int32 labels, ``logits.shape[:-1]``.
        stats: any of "entropy", "mean_logits", "log_sum_sq_probs", "is_top1".
        ignore_index: label value of unscored positions; None scores every position.
        temperature: > 0; the softmax is over softcap(logits) / temperature.
        softcap: None, or c > 0 for z = c * tanh(logits / c).
        inplace_backward: write the logits gradient over the logits.
        backend: "auto", "triton", "cuda", "torch" or "reference".
        process_group: None, or the group whose ranks each hold a contiguous slice of the
            vocabulary (in rank order, sizes may differ): ``logits`` [..., V_rank] is this rank's
            slice, ``labels`` are global ids in [0, sum of V_rank), equal on every rank. Every
            rank calls with the same arguments and gets the same outputs; its logits receive
            their part of the gradient. "is_top1" is not available (see ``prefopt.logprobs.distributed``).

    Returns:
        ``TokenStats(logps, entropy, mean_logits, log_sum_sq_probs, is_top1)``, each of the
        labels' shape (float32; is_top1 bool); fields not in ``stats`` are None. logps,
        entropy, mean_logits and log_sum_sq_probs are differentiable with respect to logits.
    """
    _validation.check_logits(logits)
    _validation.check_labels(labels, logits)
    _validation.check_transform(temperature, softcap)
    _validation.check_ignore_index(ignore_index)
    if inplace_backward:
        _validation.check_rows_do_not_overlap(logits)
    asked = _validation.check_stats(stats, STAT_NAMES)
    backend = backends.resolve("token_stats", backend, logits.device, logits.dtype)
    options = {"temperature": float(temperature), "softcap": None if softcap is None else float(softcap),
               "inplace_backward": bool(inplace_backward), "backend": backend}
    if process_group is None:
        labels = _validation.check_label_values(labels, logits.shape[-1], ignore_index)
        kernel_ignore_index = NO_LABEL if ignore_index is None else ignore_index
        result, _ = local_token_stats(logits, labels, asked, kernel_ignore_index, with_lse=False, **options)
        return result
    shard = distributed.vocab_shard(process_group, logits.shape[-1], labels, ignore_index, asked, logits.dtype,
                                    what="logits")
    labels = _validation.check_label_values(labels, shard.vocab_size, ignore_index)
    local, lse = local_token_stats(logits, distributed.local_labels(labels, ignore_index, shard), asked,
                                    NO_LABEL, with_lse=True, **options)
    return distributed.combine(local, lse, labels, ignore_index, shard)


def local_token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    asked: frozenset[str],
    ignore_index: int,
    *,
    temperature: float,
    softcap: float | None,
    inplace_backward: bool,
    backend: str,
    with_lse: bool,
) -> tuple[TokenStats, torch.Tensor | None]:
    """(TokenStats, lse) of checked inputs on one device: lse [...] is each row's differentiable
    log-sum-exp (0 where ignored) when ``with_lse``, else None; ``ignore_index`` is an int."""
    if backend == "reference":
        result = reference_token_stats(logits, labels, ignore_index=ignore_index, temperature=temperature,
                                       softcap=softcap, stats=asked)
        if not with_lse:
            return result, None
        scored = labels != ignore_index
        lse = torch.logsumexp(scored_logits(logits, scored, temperature, softcap), dim=-1)
        return result, torch.where(scored, lse, 0.0)
    outputs = torch.ops.prefopt.token_stats(
        logits,
        labels.reshape(-1),
        ignore_index,
        temperature,
        softcap,
        "entropy" in asked,
        "mean_logits" in asked,
        "log_sum_sq_probs" in asked,
        "is_top1" in asked,
        inplace_backward,
        backend,
    )
    result, lse = op.shaped_stats(outputs, labels.shape, asked)
    return result, lse if with_lse else None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group: "ProcessGroup | None" = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(softcap(logits) / temperature)[label] for every position.

    Args:
        logits: [..., V] float logits; labels: [...] int64/int32 (see ``token_stats``).
        process_group: vocabulary parallelism, as in ``token_stats``.

    Returns:
        logps [...] float32 (<= 0; exactly 0 where the label is ``ignore_index``), and with
        ``return_entropy=True`` also the entropy of each position's distribution, [...] float32.
    """
    result = token_stats(
        logits, labels, stats=("entropy",) if return_entropy else (), ignore_index=ignore_index,
        temperature=temperature, softcap=softcap, inplace_backward=inplace_backward,
        backend=backend, process_group=process_group,
    )
    return (result.logps, result.entropy) if return_entropy else result.logps


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    average: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    backend: str = "auto",
    process_group: "ProcessGroup | None" = None,
) -> torch.Tensor:
    """Per-sequence sum (``average=True``: mean over scored tokens) of the label log-probs.

    Args:
        logits: [..., T, V] float logits; labels: [..., T] int64/int32.
        cu_seqlens: optional [S + 1] int32/int64 offsets of S sequences packed into one row:
            logits [1, total, V] or [total, V], labels [1, total] or [total].
        process_group: vocabulary parallelism, as in ``token_stats``.

    Returns:
        float32 [...] (the last dimension reduced), or [S] with ``cu_seqlens``. A sequence with
        no scored token gives 0, never NaN.
    """
    if cu_seqlens is not None:
        _validation.check_logits(logits)
        if not (logits.dim() == 2 or (logits.dim() == 3 and logits.shape[0] == 1)):
            raise ValueError(
                "logits: with cu_seqlens, expected one packed row [1, total, V] or [total, V], "
                f"got shape {tuple(logits.shape)}"
            )
        _validation.check_cu_seqlens(cu_seqlens, logits.shape[-2], logits.device)
    elif isinstance(logits, torch.Tensor) and logits.dim() < 2:
        raise ValueError(f"logits: expected shape [..., T, V], got {tuple(logits.shape)}")
    logps = token_logprobs(
        logits, labels, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        inplace_backward=inplace_backward, backend=backend, process_group=process_group,
    )
    return reduce_sequences(logps, labels, ignore_index, average, cu_seqlens)


def reduce_sequences(logps: torch.Tensor, labels: torch.Tensor, ignore_index: int | None, average: bool,
                     cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence sums (``average``: means over scored tokens, 0 for none) of per-token
    log-probs [..., T] that are 0 at ignored positions, or of one packed row [1, total] /
    [total] split by ``cu_seqlens``. Shared by the logits and the fused linear paths."""
    scored = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    if cu_seqlens is None:
        sums = logps.sum(-1)
        counts = scored.sum(-1)
    else:
        # unsafe=True skips segment_reduce's own offset checks, which synchronize the host;
        # check_cu_seqlens has already checked them without doing so.
        sums = torch.segment_reduce(logps.reshape(-1), "sum", offsets=cu_seqlens, unsafe=True)
        counts = torch.segment_reduce(scored.reshape(-1).to(logps.dtype), "sum", offsets=cu_seqlens, unsafe=True)
    if not average:
        return sums
    return sums / counts.clamp_min(1).to(sums.dtype)


def row_mask_labels(index: torch.Tensor, row_mask: torch.Tensor | None) -> tuple[torch.Tensor, int | None]:
    """TRL's row-mask rule, the one prefopt's ``selective_log_softmax`` and its TRL integration
    share: (labels, ignore_index) for an ``index`` [...] or [..., K] and an optional ``row_mask``
    of the same shape and any dtype (TRL's trainers pass the integer completion mask), zero where
    a position is switched off (as TRL's ``masked_fill(row_mask == 0, 0)``; a NaN is not zero)."""
    if row_mask is None:
        return index, None
    if not isinstance(row_mask, torch.Tensor):
        raise TypeError(f"row_mask: expected a torch.Tensor or None, got {type(row_mask).__name__}")
    if row_mask.shape != index.shape:
        raise ValueError(f"row_mask: expected shape {tuple(index.shape)} (index.shape), got {tuple(row_mask.shape)}")
    if row_mask.device != index.device:
        raise ValueError(f"row_mask: expected a tensor on {index.device} like index, got {row_mask.device}")
    return torch.where(row_mask != 0, index.long(), NO_LABEL), NO_LABEL


def selective_output_dtype(logits: torch.Tensor) -> torch.dtype:
    """TRL's output dtype: float64 for float64 logits (computed in float64), else float32 (what its
    fused kernel returns on a GPU; on a CPU TRL returns bf16/fp16 logits' own dtype)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def selective_logprobs(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float,
    row_mask: torch.Tensor | None,
    *,
    backend: str,
) -> torch.Tensor:
    """TRL 1.16's ``selective_log_softmax`` on ``backend``: see :func:`selective_log_softmax`."""
    _validation.check_logits(logits)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index: expected a torch.Tensor, got {type(index).__name__}")
    backend = backends.resolve("selective", backend, logits.device, logits.dtype)
    labels, ignore_index = row_mask_labels(index, row_mask)
    if index.dim() != logits.dim():
        logps = token_logprobs(logits, labels, ignore_index=ignore_index, temperature=temperature, backend=backend)
        return logps.to(selective_output_dtype(logits))
    # Top-K: index [..., K]. One pass gives each row's log-sum-exp; the K log-probs are the
    # gathered logits minus it. A row is scored where any of its K positions is.
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index: expected an int64 or int32 tensor, got {index.dtype}")
    if index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"index: expected shape [{', '.join(map(str, logits.shape[:-1]))}] or "
                         f"{tuple(logits.shape[:-1])} + (K,), got {tuple(index.shape)}")
    if index.device != logits.device:
        raise ValueError(f"index: expected a tensor on {logits.device} like logits, got {index.device}")
    _validation.check_transform(temperature, None)
    labels = _validation.check_label_values(labels, logits.shape[-1], ignore_index)
    kernel_ignore_index = NO_LABEL if ignore_index is None else ignore_index
    scored = labels != kernel_ignore_index
    # The largest label of a row is one of its scored ones, or NO_LABEL when none is.
    row_labels = labels.amax(-1) if labels.shape[-1] else labels.new_full(labels.shape[:-1], kernel_ignore_index)
    resolved = backends.resolve("token_stats", backend, logits.device, logits.dtype)
    _, lse = local_token_stats(logits, row_labels, frozenset(), kernel_ignore_index, temperature=float(temperature),
                               softcap=None, inplace_backward=False, backend=resolved, with_lse=True)
    z = transformed_logits(logits.gather(-1, torch.where(scored, labels, 0).long()), float(temperature), None)
    # z_y <= max z <= lse makes every log-prob <= 0; the clamp keeps it so through a last-ulp
    # difference between this z_y and the kernel's evaluation of the same transform.
    logps = (z - lse.unsqueeze(-1).to(z.dtype)).clamp_max(0.0)
    return torch.where(scored, logps, 0.0).to(selective_output_dtype(logits))


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Drop-in for TRL 1.16's ``selective_log_softmax``: log_softmax(logits / temperature)
    gathered at ``index``, with no ignore_index (every index not masked off must be in [0, V)).

    Args:
        logits: [..., V] float logits.
        index: [...] int64/int32 (one log-prob per position), or [..., K] (K per position, e.g.
            top-K), in [0, V).
        temperature: > 0.
        row_mask: optional mask of ``index``'s shape and any dtype (bool, or TRL's integer
            completion mask): where it is 0 the position is not computed (its index is not
            checked, it gives 0 and receives 0 gradient).

    Returns:
        log-probs of ``index``'s shape: float64 for float64 logits (computed in float64, by the
        reference backend, as TRL does), else float32 (TRL's fused GPU kernel's dtype; TRL's CPU
        path returns bf16/fp16 for bf16/fp16 logits, prefopt keeps float32).
    """
    return selective_logprobs(logits, index, temperature, row_mask, backend="auto")
