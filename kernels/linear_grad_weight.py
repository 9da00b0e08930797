"""Backward of the fused linear path, part 2: grad_weight = dx.T @ hidden and grad_bias = the
column sums of dx, with dx the gradient with respect to the logits
(``linear_common.grad_logits_tile``).

One program owns BLOCK_V rows of the weight and streams the tokens: each BLOCK_T tile of logits
is recomputed in registers, turned into dx, and multiplied by the hidden tile into the weight
rows' float32 accumulator, slice by slice of H. The accumulator is a zero-initialized float32
[V, H] buffer that only this program touches: one fixed summation order (deterministic, no
atomics), and one rounding to the weight's dtype at the end, on the host. Token tiles whose
rows are all ignored are skipped before any product.
"""

import torch
import triton
import triton.language as tl

from .linear_common import block_sizes, dot, grad_logits_tile, load_row_statistics, logits_tile, upcast_dot


@triton.jit
def _linear_grad_weight_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr, entropy_ptr, log_sum_sq_ptr,
    grad_logps_ptr, grad_entropy_ptr, grad_mean_ptr, grad_log_sum_sq_ptr, grad_weight_ptr, grad_bias_ptr,
    n_rows, hidden_size, vocab_size, stride_hidden, stride_weight_v, stride_weight_h,
    ignore_index, logit_scale, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, GRAD_ENTROPY: tl.constexpr, GRAD_MEAN: tl.constexpr,
    GRAD_SUM_SQ: tl.constexpr, WITH_GRAD_WEIGHT: tl.constexpr, WITH_GRAD_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab_size
    bias_sum = tl.zeros((BLOCK_V,), tl.float32)
    for tile in range(0, tl.cdiv(n_rows, BLOCK_T)):
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        in_rows = rows < n_rows
        labels = tl.load(labels_ptr + rows, mask=in_rows, other=0).to(tl.int64)
        scored = in_rows & (labels != ignore_index)
        if tl.max(scored.to(tl.int32), 0) > 0:
            lse, entropy, log_sum_sq, grad_logps, grad_entropy, grad_mean, grad_log_sum_sq = load_row_statistics(
                rows, scored, lse_ptr, entropy_ptr, log_sum_sq_ptr, grad_logps_ptr, grad_entropy_ptr, grad_mean_ptr,
                grad_log_sum_sq_ptr, GRAD_ENTROPY, GRAD_MEAN, GRAD_SUM_SQ)
            x = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, in_rows, cols, in_vocab, hidden_size,
                            stride_hidden, stride_weight_v, stride_weight_h, logit_scale,
                            HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT)
            dx = grad_logits_tile(x, cols, in_vocab, scored, labels, lse, entropy, log_sum_sq, grad_logps,
                                  grad_entropy, grad_mean, grad_log_sum_sq, vocab_size, logit_scale,
                                  inv_temperature, softcap, HAS_SOFTCAP, GRAD_ENTROPY, GRAD_MEAN, GRAD_SUM_SQ)
            if WITH_GRAD_BIAS:
                bias_sum += tl.sum(dx, 0)
            if WITH_GRAD_WEIGHT:
                # dx meets hidden in hidden's dtype (tensor cores); products are summed in float32.
                dx_t = tl.trans(dx.to(hidden_ptr.dtype.element_ty))
                for k in range(0, tl.cdiv(hidden_size, BLOCK_H)):
                    ks = k * BLOCK_H + tl.arange(0, BLOCK_H)
                    in_k = ks < hidden_size
                    h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + ks[None, :],
                                mask=in_rows[:, None] & in_k[None, :], other=0.0)
                    accumulator = grad_weight_ptr + cols[:, None] * hidden_size + ks[None, :]
                    mask = in_vocab[:, None] & in_k[None, :]
                    partial = tl.load(accumulator, mask=mask, other=0.0)
                    tl.store(accumulator, dot(dx_t, h, partial, UPCAST_DOT), mask=mask)
                    # The next visit of this slice may be read by other threads of the program.
                    tl.debug_barrier()
    if WITH_GRAD_BIAS:
        tl.store(grad_bias_ptr + cols, bias_sum, mask=in_vocab)


def linear_grad_weight(
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
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
) -> None:
    """Add d(outputs)/d(weight) into ``grad_weight`` [V, H] float32 (contiguous, zeros on entry)
    and write d(outputs)/d(bias) into ``grad_bias`` [V] float32; either may be None (not
    computed). The other arguments are those of ``linear_grad_hidden``.
    """
    rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    if grad_weight is None and grad_bias is None:
        return
    block_t, block_v, block_h = block_sizes(rows, vocab_size, hidden_size, 64, 128, 64)
    _linear_grad_weight_kernel[(triton.cdiv(vocab_size, block_v),)](
        hidden, weight, weight if bias is None else bias, labels, lse,
        lse if entropy is None else entropy,
        lse if log_sum_sq_probs is None else log_sum_sq_probs,
        grad_logps,
        lse if grad_entropy is None else grad_entropy,
        lse if grad_mean_logits is None else grad_mean_logits,
        lse if grad_log_sum_sq_probs is None else grad_log_sum_sq_probs,
        lse if grad_weight is None else grad_weight,
        lse if grad_bias is None else grad_bias,
        rows, hidden_size, vocab_size, hidden.stride(0), weight.stride(0), weight.stride(1),
        ignore_index, logit_scale, 1.0 / temperature, 1.0 if softcap is None else softcap,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        GRAD_ENTROPY=grad_entropy is not None,
        GRAD_MEAN=grad_mean_logits is not None,
        GRAD_SUM_SQ=grad_log_sum_sq_probs is not None,
        WITH_GRAD_WEIGHT=grad_weight is not None,
        WITH_GRAD_BIAS=grad_bias is not None,
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_H=block_h, UPCAST_DOT=upcast_dot(hidden.dtype),
        num_warps=8 if block_t * block_v >= 8192 else 4,
    )
