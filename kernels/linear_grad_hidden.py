"""Backward of the fused linear path, part 1: grad_hidden = dx @ weight, with dx the gradient of
the per-token outputs with respect to the logits (``linear_common.grad_logits_tile``).

One program owns BLOCK_T rows and streams the vocabulary: each BLOCK_V tile of logits is
recomputed in registers, turned into dx, and multiplied by the weight tile into the rows' float32
accumulator, slice by slice of H. The accumulator lives in a zero-initialized float32 [N, H]
buffer that only this program touches, so the sum runs in one fixed order (deterministic, no
atomics). A tile of rows that are all ignored runs nothing and keeps its exact zeros.
"""

import torch
import triton
import triton.language as tl

from .linear_common import block_sizes, dot, grad_logits_tile, load_row_statistics, logits_tile, upcast_dot


@triton.jit
def _linear_grad_hidden_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, entropy_ptr, log_sum_sq_ptr,
    grad_logps_ptr, grad_entropy_ptr, grad_mean_ptr, grad_log_sum_sq_ptr, grad_hidden_ptr,
    n_rows, hidden_size, vocab_size, stride_hidden, stride_weight_v, stride_weight_h,
    ignore_index, logit_scale, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, GRAD_ENTROPY: tl.constexpr, GRAD_MEAN: tl.constexpr,
    GRAD_SUM_SQ: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_rows = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=in_rows, other=0).to(tl.int64)
    scored = in_rows & (labels != ignore_index)
    num_blocks = tl.where(tl.max(scored.to(tl.int32), 0) > 0, tl.cdiv(vocab_size, BLOCK_V), 0)

    lse, entropy, log_sum_sq, grad_logps, grad_entropy, grad_mean, grad_log_sum_sq = load_row_statistics(
        rows, scored, lse_ptr, entropy_ptr, log_sum_sq_ptr, grad_logps_ptr, grad_entropy_ptr, grad_mean_ptr,
        grad_log_sum_sq_ptr, GRAD_ENTROPY, GRAD_MEAN, GRAD_SUM_SQ)

    for block in range(0, num_blocks):
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        in_vocab = cols < vocab_size
        x = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, in_rows, cols, in_vocab, hidden_size,
                        stride_hidden, stride_weight_v, stride_weight_h, logit_scale,
                        HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT)
        dx = grad_logits_tile(x, cols, in_vocab, scored, labels, lse, entropy, log_sum_sq, grad_logps,
                              grad_entropy, grad_mean, grad_log_sum_sq, vocab_size, logit_scale,
                              inv_temperature, softcap, HAS_SOFTCAP, GRAD_ENTROPY, GRAD_MEAN, GRAD_SUM_SQ)
        # dx meets the weight in the weight's dtype (tensor cores); the products are summed in
        # float32.
        dx = dx.to(weight_ptr.dtype.element_ty)
        for k in range(0, tl.cdiv(hidden_size, BLOCK_H)):
            ks = k * BLOCK_H + tl.arange(0, BLOCK_H)
            in_k = ks < hidden_size
            w = tl.load(weight_ptr + cols[:, None] * stride_weight_v + ks[None, :] * stride_weight_h,
                        mask=in_vocab[:, None] & in_k[None, :], other=0.0)
            accumulator = grad_hidden_ptr + rows[:, None] * hidden_size + ks[None, :]
            mask = in_rows[:, None] & in_k[None, :]
            partial = tl.load(accumulator, mask=mask, other=0.0)
            tl.store(accumulator, dot(dx, w, partial, UPCAST_DOT), mask=mask)
            # The next visit of this slice may be read by other threads of the program.
            tl.debug_barrier()


def linear_grad_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    log_sum_sq_probs: torch.Tensor | None,
    grad_logps: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_mean_logits: torch.Tensor | None,
    grad_log_sum_sq_probs: torch.Tensor | None,
    grad_hidden: torch.Tensor,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
) -> None:
    """Add d(outputs)/d(hidden) into ``grad_hidden`` [N, H] float32, contiguous (zeros on entry).

    hidden [N, H] (contiguous last dimension), weight [V, H], bias [V] or None: one dtype.
    labels [N]; lse, entropy, log_sum_sq_probs and the upstream gradients [N] float32,
    contiguous; a gradient passed as None contributes nothing (entropy comes with grad_entropy,
    log_sum_sq_probs with grad_log_sum_sq_probs).
    """
    rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    if rows == 0:
        return
    block_t, block_v, block_h = block_sizes(rows, vocab_size, hidden_size, 64, 128, 64)
    _linear_grad_hidden_kernel[(triton.cdiv(rows, block_t),)](
        hidden, weight, weight if bias is None else bias, labels, lse,
        lse if entropy is None else entropy,
        lse if log_sum_sq_probs is None else log_sum_sq_probs,
        grad_logps,
        lse if grad_entropy is None else grad_entropy,
        lse if grad_mean_logits is None else grad_mean_logits,
        lse if grad_log_sum_sq_probs is None else grad_log_sum_sq_probs,
        grad_hidden,
        rows, hidden_size, vocab_size, hidden.stride(0), weight.stride(0), weight.stride(1),
        ignore_index, logit_scale, 1.0 / temperature, 1.0 if softcap is None else softcap,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        GRAD_ENTROPY=grad_entropy is not None,
        GRAD_MEAN=grad_mean_logits is not None,
        GRAD_SUM_SQ=grad_log_sum_sq_probs is not None,
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_H=block_h, UPCAST_DOT=upcast_dot(hidden.dtype),
        num_warps=8 if block_t * block_v >= 8192 else 4,
    )
