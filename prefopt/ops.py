"""The fused log-prob operators, registered with ``torch.library`` so that autograd,
``torch.compile(fullgraph=True)`` and CUDA graphs see single opaque operators.

- ``prefopt::token_stats``: the forward pass. Inputs are the logits [..., V] (any strides with a
  contiguous last dimension, read where they lie) and the flattened labels [N]; outputs are flat
  [N] float32 log-probs, the float32 log-sum-exp kept for backward, and the optional statistics
  (empty tensors when not asked for).
- ``prefopt::token_stats_backward``: writes the logits gradient into a fresh tensor.
- ``prefopt::token_stats_backward_``: writes it over the logits (``inplace_backward=True``).

``backend`` ("triton", "cuda" or "torch") selects the implementation; all follow the same contract.
"""

import math

import torch

from . import chunked
from ._layout import row_blocks

Tensor = torch.Tensor

# Stands for "no position is ignored": validation has already proved every label is in [0, V).
NO_IGNORE_INDEX = -(2**63)


def _implementation(backend: str, direction: str):
    """(function, leading dimensions per block) of a backend's forward or backward."""
    if backend == "triton":
        from . import kernels

        function = kernels.token_stats_forward if direction == "forward" else kernels.token_stats_backward
        return function, 2
    if backend == "cuda":
        from . import cuda_ext

        cuda_ext.load()  # compiled on first use; raises BackendUnavailableError saying why not
        function = cuda_ext.token_stats_forward if direction == "forward" else cuda_ext.token_stats_backward
        return function, 2
    if backend == "torch":
        function = chunked.token_stats_forward if direction == "forward" else chunked.token_stats_backward
        return function, 1
    raise ValueError(f"backend: the fused operators run 'triton', 'cuda' or 'torch', got {backend!r}")


def _flat_rows(block: Tensor, first_row: int) -> slice:
    return slice(first_row, first_row + math.prod(block.shape[:-1]))


def _optional(tensor: Tensor | None, rows: slice) -> Tensor | None:
    return None if tensor is None else tensor[rows]


def empty_stats_outputs(like: Tensor, rows: int, with_entropy: bool, with_mean_logits: bool,
                        with_log_sum_sq_probs: bool, with_is_top1: bool) -> tuple[Tensor, ...]:
    """Uninitialized (logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1) on ``like``'s
    device: [rows] float32 (is_top1 bool), [0] for a statistic not asked for. The layout every
    token-statistics operator returns, real or fake."""

    def output(asked: bool, dtype: torch.dtype = torch.float32) -> Tensor:
        return like.new_empty(rows if asked else 0, dtype=dtype)

    return (output(True), output(True), output(with_entropy), output(with_mean_logits),
            output(with_log_sum_sq_probs), output(with_is_top1, torch.bool))


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1), each [N] (or [0]
    when not asked for). ``inplace_backward`` only tells autograd how to run the backward."""
    forward, levels = _implementation(backend, "forward")
    logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1 = empty_stats_outputs(
        logits, labels.numel(), with_entropy, with_mean_logits, with_log_sum_sq_probs, with_is_top1)
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
        )
    return logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1


@token_stats_op.register_fake
def _(logits, labels, ignore_index, temperature, softcap, with_entropy, with_mean_logits,
      with_log_sum_sq_probs, with_is_top1, inplace_backward, backend):
    return empty_stats_outputs(logits, labels.numel(), with_entropy, with_mean_logits,
                               with_log_sum_sq_probs, with_is_top1)


def _run_backward(
    logits: Tensor,
    grad_logits: Tensor,
    labels: Tensor,
    lse: Tensor,
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
        )


@torch.library.custom_op("prefopt::token_stats_backward", mutates_args=())
def token_stats_backward_op(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
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
) -> Tensor:
    """The logits gradient as a new contiguous tensor of the logits' shape and dtype."""
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _run_backward(logits, grad_logits, labels, lse, entropy, log_sum_sq_probs, grad_logps,
                  grad_entropy, grad_mean_logits, grad_log_sum_sq_probs, ignore_index,
                  temperature, softcap, backend)
    return grad_logits


@token_stats_backward_op.register_fake
def _(logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("prefopt::token_stats_backward_", mutates_args=("logits",))
def token_stats_backward_inplace_op(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
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
    """Overwrites the logits with their gradient."""
    _run_backward(logits, logits, labels, lse, entropy, log_sum_sq_probs, grad_logps,
                  grad_entropy, grad_mean_logits, grad_log_sum_sq_probs, ignore_index,
                  temperature, softcap, backend)


def _setup_context(ctx, inputs, output) -> None:
    (logits, labels, ignore_index, temperature, softcap, *_, inplace_backward, backend) = inputs
    _, lse, entropy, _, log_sum_sq_probs, _ = output
    ctx.save_for_backward(logits, labels, lse, entropy, log_sum_sq_probs)
    ctx.hyperparameters = (ignore_index, temperature, softcap, backend)
    ctx.inplace_backward = inplace_backward


def dense_upstream(grad: Tensor | None) -> Tensor | None:
    """An upstream gradient of a per-row output as the kernels read it, or None if it adds nothing."""
    # Upstream gradients may be broadcast views (stride 0, e.g. from .sum()); the kernels index
    # them by row, so they are made dense. They are [N] floats: this is cheap. A statistic that
    # was not asked for is an empty output, and its gradient contributes nothing.
    if grad is None or grad.numel() == 0:
        return None
    return grad.contiguous()


def _backward(ctx, grad_logps, grad_lse, grad_entropy, grad_mean_logits, grad_log_sum_sq_probs, grad_is_top1):
    logits, labels, lse, entropy, log_sum_sq_probs = ctx.saved_tensors
    grad_entropy = dense_upstream(grad_entropy)
    grad_mean_logits = dense_upstream(grad_mean_logits)
    grad_log_sum_sq_probs = dense_upstream(grad_log_sum_sq_probs)
    grad_logps = dense_upstream(grad_logps)
    if grad_logps is None:
        grad_logps = torch.zeros_like(lse)
    arguments = (
        labels,
        lse,
        entropy if grad_entropy is not None else None,
        log_sum_sq_probs if grad_log_sum_sq_probs is not None else None,
        grad_logps,
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
