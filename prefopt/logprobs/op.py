"""The fused log-prob operators, registered with ``torch.library`` so that autograd,
``torch.compile(fullgraph=True)`` and CUDA graphs see single opaque operators.

- ``prefopt::token_stats``: the forward pass. Inputs are the logits [..., V] (any strides with a
  contiguous last dimension, read where they lie) and the flattened labels [N]; outputs are flat
  [N] float32 log-probs, the float32 log-sum-exp kept for backward, the optional statistics
  (empty tensors when not asked for) and last the log-sum-exp's rounding residual, which only the
  backward reads (p = exp((z - lse) - residual) stays precise at large |z|; see
  prefopt/kernels/token_stats_fwd.py).
- ``prefopt::token_stats_backward``: writes the logits gradient into a fresh tensor.
- ``prefopt::token_stats_backward_``: writes it over the logits (``inplace_backward=True``).

Every float output is differentiable, the log-sum-exp included: the vocabulary-parallel path
(``prefopt.logprobs.distributed``) combines the shards' log-sum-exps and differentiates through them.
The kernels apply d log p_y / dz = onehot(y) - p; since d lse / dz = p,

    g_logp (onehot - p) + g_lse p = (g_logp - g_lse) (onehot - p) + g_lse onehot,

so the backward runs the kernels with g_logp - g_lse and then adds g_lse dz/dx at each row's
label column (``lse_label_gradient``), an [N] gather and scatter.

``backend`` ("triton", "cuda" or "torch") selects the implementation; all follow the same contract.
"""

import math

import torch

from .. import backends
from .._types import TokenStats
from .layout import row_blocks
from .transform import chain_through_transform_

Tensor = torch.Tensor


def _implementation(backend: str, direction: str):
    """(function, leading dimensions per block) of a backend's forward or backward: the kernels
    take [rows, tokens] blocks, the chunked torch fallback flat rows."""
    kernels = backends.row_kernels(backend)
    function = kernels.token_stats_forward if direction == "forward" else kernels.token_stats_backward
    return function, 1 if backend == "torch" else 2


def _flat_rows(block: Tensor, first_row: int) -> slice:
    return slice(first_row, first_row + math.prod(block.shape[:-1]))


def _optional(tensor: Tensor | None, rows: slice) -> Tensor | None:
    return None if tensor is None else tensor[rows]


def lse_label_gradient(grad_lse: Tensor, scored: Tensor, label_logits: Tensor | None, temperature: float,
                       softcap: float | None) -> Tensor:
    """g_lse * dz/dx at each row's label column, 0 on unscored rows: the part of the log-sum-exp's
    gradient that the kernels, run with g_logp - g_lse, leave out (see the module docstring).

    Args:
        grad_lse: [N] float upstream gradient of the log-sum-exp.
        scored: [N] bool, False where the label is ignored.
        label_logits: [N] raw logits x at the labels; read only with ``softcap`` (without it
            dz/dx = 1 / temperature), so the caller may pass None then.
    """
    gradient = chain_through_transform_(grad_lse.clone(), label_logits, temperature, softcap)
    return torch.where(scored, gradient, 0.0)


def _label_columns(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(index [..., 1] of each row's label column, 0 where ignored; scored [...] bool) for flat
    labels [N] of logits [..., V]."""
    labels = labels.reshape(logits.shape[:-1]).long()
    scored = labels != ignore_index
    return torch.where(scored, labels, 0).unsqueeze(-1), scored


def _lse_gradient_at_labels(logits: Tensor, labels: Tensor, grad_lse: Tensor, ignore_index: int,
                            temperature: float, softcap: float | None) -> tuple[Tensor, Tensor]:
    """(label column index [..., 1], the gradient to add there [..., 1]); read from the logits,
    so for an in-place backward it is taken before they are overwritten."""
    index, scored = _label_columns(logits, labels, ignore_index)
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    label_logits = None if softcap is None else logits.gather(-1, index).squeeze(-1).to(compute_dtype)
    gradient = lse_label_gradient(grad_lse.view(scored.shape).to(compute_dtype), scored, label_logits,
                                  temperature, softcap)
    return index, gradient.unsqueeze(-1)


def _add_at_labels(grad_logits: Tensor, index: Tensor, gradient: Tensor) -> None:
    # Summed in the compute dtype and rounded once to the gradient's dtype.
    total = grad_logits.gather(-1, index).to(gradient.dtype) + gradient
    grad_logits.scatter_(-1, index, total.to(grad_logits.dtype))


def empty_stats_outputs(like: Tensor, rows: int, with_entropy: bool, with_mean_logits: bool,
                        with_log_sum_sq_probs: bool, with_is_top1: bool) -> tuple[Tensor, ...]:
    """Uninitialized (logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1) on ``like``'s
    device: [rows] float32 (is_top1 bool), [0] for a statistic not asked for. The layout every
    token-statistics operator returns, real or fake."""

    def output(asked: bool, dtype: torch.dtype = torch.float32) -> Tensor:
        return like.new_empty(rows if asked else 0, dtype=dtype)

    return (output(True), output(True), output(with_entropy), output(with_mean_logits),
            output(with_log_sum_sq_probs), output(with_is_top1, torch.bool))


def shaped_stats(outputs: tuple[Tensor, ...], shape: torch.Size, asked: frozenset[str]) -> tuple[TokenStats, Tensor]:
    """(TokenStats, lse) of the labels' ``shape`` from an operator's flat outputs (the layout of
    ``empty_stats_outputs``, then possibly backward-only outputs, left out); fields not ``asked``
    for are None."""
    logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1 = outputs[:6]

    def shaped(flat: Tensor, name: str) -> Tensor | None:
        return flat.view(shape) if name in asked else None

    stats = TokenStats(logps.view(shape), shaped(entropy, "entropy"), shaped(mean_logits, "mean_logits"),
                       shaped(log_sum_sq_probs, "log_sum_sq_probs"), shaped(is_top1, "is_top1"))
    return stats, lse.view(shape)


@torch.library.custom_op("prefopt::token_stats", mutates_args=())
def token_stats_op(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
    with_mean_logits: bool,
    with_log_sum_sq_probs: bool,
    with_is_top1: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1, lse_residual), each
    [N] (or [0] when not asked for). ``inplace_backward`` only tells autograd how to run the
    backward."""
    forward, levels = _implementation(backend, "forward")
    logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1 = empty_stats_outputs(
        logits, labels.numel(), with_entropy, with_mean_logits, with_log_sum_sq_probs, with_is_top1)
    lse_residual = torch.empty_like(lse)
    for block, first_row in row_blocks(logits, levels):
        rows = _flat_rows(block, first_row)
        forward(
            block,
            labels[rows],
            logps[rows],
            lse[rows],
            entropy[rows] if with_entropy else None,
            mean_logits[rows] if with_mean_logits else None,
            log_sum_sq_probs[rows] if with_log_sum_sq_probs else None,
            is_top1[rows] if with_is_top1 else None,
            ignore_index=ignore_index,
            temperature=temperature,
            softcap=softcap,
            lse_residual=lse_residual[rows],
        )
    return logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1, lse_residual


@token_stats_op.register_fake
def _(logits, labels, ignore_index, temperature, softcap, with_entropy, with_mean_logits,
      with_log_sum_sq_probs, with_is_top1, inplace_backward, backend):
    outputs = empty_stats_outputs(logits, labels.numel(), with_entropy, with_mean_logits,
                                  with_log_sum_sq_probs, with_is_top1)
    return (*outputs, torch.empty_like(outputs[1]))


def _run_backward(
    logits: Tensor,
    grad_logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    lse_residual: Tensor,
    entropy: Tensor | None,
    log_sum_sq_probs: Tensor | None,
    grad_logps: Tensor,
    grad_entropy: Tensor | None,
    grad_mean_logits: Tensor | None,
    grad_log_sum_sq_probs: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    backend: str,
) -> None:
    backward, levels = _implementation(backend, "backward")
    in_place = grad_logits is logits
    grad_rows = grad_logits.view(-1, logits.shape[-1]) if not in_place else None
    for block, first_row in row_blocks(logits, levels):
        rows = _flat_rows(block, first_row)
        # The fresh gradient is contiguous: the same rows, laid out as the block is.
        grad_block = block if in_place else grad_rows[rows].view(block.shape)
        backward(
            block,
            grad_block,
            labels[rows],
            lse[rows],
            _optional(entropy, rows),
            _optional(log_sum_sq_probs, rows),
            grad_logps[rows],
            _optional(grad_entropy, rows),
            _optional(grad_mean_logits, rows),
            _optional(grad_log_sum_sq_probs, rows),
            ignore_index=ignore_index,
            temperature=temperature,
            softcap=softcap,
            lse_residual=lse_residual[rows],
        )


@torch.library.custom_op("prefopt::token_stats_backward", mutates_args=())
def token_stats_backward_op(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    lse_residual: Tensor,
    entropy: Tensor | None,
    log_sum_sq_probs: Tensor | None,
    grad_logps: Tensor,
    grad_lse: Tensor | None,
    grad_entropy: Tensor | None,
    grad_mean_logits: Tensor | None,
    grad_log_sum_sq_probs: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    backend: str,
) -> Tensor:
    """The logits gradient as a new contiguous tensor of the logits' shape and dtype.
    ``grad_logps`` is g_logp - g_lse when ``grad_lse`` is given (see the module docstring)."""
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _run_backward(logits, grad_logits, labels, lse, lse_residual, entropy, log_sum_sq_probs, grad_logps,
                  grad_entropy, grad_mean_logits, grad_log_sum_sq_probs, ignore_index,
                  temperature, softcap, backend)
    if grad_lse is not None:
        _add_at_labels(grad_logits, *_lse_gradient_at_labels(logits, labels, grad_lse, ignore_index,
                                                             temperature, softcap))
    return grad_logits


@token_stats_backward_op.register_fake
def _(logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("prefopt::token_stats_backward_", mutates_args=("logits",))
def token_stats_backward_inplace_op(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    lse_residual: Tensor,
    entropy: Tensor | None,
    log_sum_sq_probs: Tensor | None,
    grad_logps: Tensor,
    grad_lse: Tensor | None,
    grad_entropy: Tensor | None,
    grad_mean_logits: Tensor | None,
    grad_log_sum_sq_probs: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    backend: str,
) -> None:
    """Overwrites the logits with their gradient (``grad_logps`` as in token_stats_backward)."""
    label_gradient = None if grad_lse is None else _lse_gradient_at_labels(
        logits, labels, grad_lse, ignore_index, temperature, softcap)
    _run_backward(logits, logits, labels, lse, lse_residual, entropy, log_sum_sq_probs, grad_logps,
                  grad_entropy, grad_mean_logits, grad_log_sum_sq_probs, ignore_index,
                  temperature, softcap, backend)
    if label_gradient is not None:
        _add_at_labels(logits, *label_gradient)


def _setup_context(ctx, inputs, output) -> None:
    (logits, labels, ignore_index, temperature, softcap, *_, inplace_backward, backend) = inputs
    _, lse, entropy, _, log_sum_sq_probs, _, lse_residual = output
    ctx.save_for_backward(logits, labels, lse, lse_residual, entropy, log_sum_sq_probs)
    ctx.mark_non_differentiable(lse_residual)  # a rounding error, read by the backward only
    ctx.hyperparameters = (ignore_index, temperature, softcap, backend)
    ctx.inplace_backward = inplace_backward
    # Outputs nobody differentiated arrive as None, not as zeros: without a gradient for the
    # log-sum-exp the backward does no label-column work.
    ctx.set_materialize_grads(False)


def logps_upstream(grad_logps: Tensor | None, grad_lse: Tensor | None, like: Tensor) -> Tensor:
    """What the kernels take as the log-probs' upstream gradient: g_logp - g_lse (see the module
    docstring), zeros when neither was differentiated. Both arguments are dense or None."""
    if grad_lse is None:
        return torch.zeros_like(like) if grad_logps is None else grad_logps
    return -grad_lse if grad_logps is None else grad_logps - grad_lse


def dense_upstream(grad: Tensor | None) -> Tensor | None:
    """An upstream gradient of a per-row output as the kernels read it, or None if it adds nothing."""
    # Upstream gradients may be broadcast views (stride 0, e.g. from .sum()); the kernels index
    # them by row, so they are made dense. They are [N] floats: this is cheap. A statistic that
    # was not asked for is an empty output, and its gradient contributes nothing.
    if grad is None or grad.numel() == 0:
        return None
    return grad.contiguous()


def _backward(ctx, grad_logps, grad_lse, grad_entropy, grad_mean_logits, grad_log_sum_sq_probs, grad_is_top1,
              grad_lse_residual):
    logits, labels, lse, lse_residual, entropy, log_sum_sq_probs = ctx.saved_tensors
    grad_entropy = dense_upstream(grad_entropy)
    grad_mean_logits = dense_upstream(grad_mean_logits)
    grad_log_sum_sq_probs = dense_upstream(grad_log_sum_sq_probs)
    grad_lse = dense_upstream(grad_lse)
    arguments = (
        labels,
        lse,
        lse_residual,
        entropy if grad_entropy is not None else None,
        log_sum_sq_probs if grad_log_sum_sq_probs is not None else None,
        logps_upstream(dense_upstream(grad_logps), grad_lse, lse),
        grad_lse,
        grad_entropy,
        grad_mean_logits,
        grad_log_sum_sq_probs,
        *ctx.hyperparameters,
    )
    if ctx.inplace_backward:
        torch.ops.prefopt.token_stats_backward_(logits, *arguments)
        grad_logits = logits
    else:
        grad_logits = torch.ops.prefopt.token_stats_backward(logits, *arguments)
    return grad_logits, None, None, None, None, None, None, None, None, None, None


token_stats_op.register_autograd(_backward, setup_context=_setup_context)
