"""Backward: the gradient of the per-token outputs with respect to the raw logits, written once.

With p = softmax(z), the saved lse and its rounding residual (so p_j = exp((z_j - lse) -
lse_residual), at float32 rounding of z_j - m even at large |z|: see ``token_stats_fwd``) and the
upstream gradients g of each output, the gradient with respect to the transformed logits z is

    d log p_y / dz_j          = 1[j = y] - p_j
    d entropy / dz_j          = -p_j (log p_j + entropy)
    d mean logit / dz_j       = 1 / V
    d log sum p^2 / dz_j      = 2 p_j^2 / sum p^2 - 2 p_j

and dx_j = dz_j * dz/dx (see ``_common.transform_logits_derivative``). Each program writes one
block of one row, in the logits' dtype, either into a fresh gradient buffer or over the logits
themselves (in-place backward). Rows whose label is ``ignore_index`` are not read and get exact
zeros. p is ``_common.exp2`` in the log2 domain (``ex2.approx.ftz.f32`` when compiled).

A launch may cover one tile of columns of each row, [column_offset, column_offset + V) of a
softmax over softmax_size columns (the fused linear path builds its logits a vocabulary tile at a
time): the label term lands in the tile that holds the label, the mean term divides by the whole
row's size.
"""

import os

import torch
import triton
import triton.language as tl

from ._common import LOG2_E, exp2, transform_logits, transform_logits_derivative

_MAX_BLOCK_V = 4096


@triton.jit
def _token_stats_bwd_kernel(
    logits_ptr,
    grad_ptr,
    labels_ptr,
    lse_ptr,
    lse_residual_ptr,
    entropy_ptr,
    log_sum_sq_ptr,
    grad_logps_ptr,
    grad_entropy_ptr,
    grad_mean_ptr,
    grad_log_sum_sq_ptr,
    inner_size,
    stride_outer,
    stride_inner,
    grad_stride_outer,
    grad_stride_inner,
    vocab_size,
    column_offset,
    softmax_size,
    ignore_index,
    inv_temperature,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    GRAD_MEAN: tl.constexpr,
    GRAD_SUM_SQ: tl.constexpr,
    APPROX: tl.constexpr,
    BLOCK_V: tl.constexpr,
    log2_e: tl.constexpr = LOG2_E,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    outer = row // inner_size
    inner = row % inner_size
    cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab_size
    grad_row = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        # An ignored row reads nothing and gets exact zeros.
        tl.store(grad_row + cols, tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty), mask=in_vocab)
    else:
        # The label's column in this tile, in 32 bits (outside [0, V) when another tile holds it).
        label_column = (label - column_offset).to(tl.int32)
        x = tl.load(logits_ptr + outer * stride_outer + inner * stride_inner + cols, mask=in_vocab,
                    other=0.0).to(tl.float32)
        # Without a softcap dz/dx = 1/T is folded into the row's coefficients.
        k = 1.0 if HAS_SOFTCAP else inv_temperature
        z = transform_logits(x, inv_temperature, softcap, HAS_SOFTCAP)
        # z - lse is exact where p matters; the residual (0 if not kept) makes it z - m - log s.
        z_minus_lse = z - tl.load(lse_ptr + row)
        residual = tl.load(lse_residual_ptr + row) if HAS_RESIDUAL else 0.0
        p = exp2(z_minus_lse * log2_e - residual * log2_e, APPROX)

        g = tl.load(grad_logps_ptr + row) * k
        dz = tl.where(cols == label_column, g, 0.0) - g * p
        if GRAD_ENTROPY:
            entropy = tl.load(entropy_ptr + row)
            g_entropy = tl.load(grad_entropy_ptr + row) * k
            # p_j = 0 for a -inf logit, whose (log p_j + entropy) is -inf: its term is 0.
            dz -= g_entropy * p * tl.where(p > 0.0, z_minus_lse - residual + entropy, 0.0)
        if GRAD_MEAN:
            dz += tl.load(grad_mean_ptr + row) * k / softmax_size
        if GRAD_SUM_SQ:
            sum_sq = tl.exp(tl.load(log_sum_sq_ptr + row))
            dz += tl.load(grad_log_sum_sq_ptr + row) * k * (2.0 * p * p / sum_sq - 2.0 * p)
        if HAS_SOFTCAP:
            dz = dz * transform_logits_derivative(x, inv_temperature, softcap, HAS_SOFTCAP)
        tl.store(grad_row + cols, dz.to(grad_ptr.dtype.element_ty), mask=in_vocab)


def token_stats_backward(
    logits: torch.Tensor,
    grad_logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    log_sum_sq_probs: torch.Tensor | None,
    grad_logps: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_mean_logits: torch.Tensor | None,
    grad_log_sum_sq_probs: torch.Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    column_offset: int = 0,
    softmax_size: int | None = None,
    lse_residual: torch.Tensor | None = None,
) -> None:
    """Write the logits gradient for one block of rows.

    logits, grad_logits: [outer, inner, V] views with a contiguous last dimension; they may be
    the same tensor (in-place backward: each element is read before it is overwritten, by the
    same program). labels: [outer * inner] int32/int64; lse, lse_residual (the forward's; None
    takes lse as exact), entropy, log_sum_sq_probs and the upstream gradients: [outer * inner]
    float32, contiguous. A gradient passed as None contributes nothing (entropy must be given with grad_entropy, log_sum_sq_probs with
    grad_log_sum_sq_probs). The logits may be one tile of columns of each row: columns
    [column_offset, column_offset + V) of a softmax over ``softmax_size`` columns (default V:
    whole rows), with labels and per-row statistics of the whole rows.
    """
    outer, inner, vocab_size = logits.shape
    rows = outer * inner
    if rows == 0:
        return
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    _token_stats_bwd_kernel[(rows, triton.cdiv(vocab_size, block_v))](
        logits,
        grad_logits,
        labels,
        lse,
        lse if lse_residual is None else lse_residual,
        lse if entropy is None else entropy,
        lse if log_sum_sq_probs is None else log_sum_sq_probs,
        grad_logps,
        lse if grad_entropy is None else grad_entropy,
        lse if grad_mean_logits is None else grad_mean_logits,
        lse if grad_log_sum_sq_probs is None else grad_log_sum_sq_probs,
        inner,
        logits.stride(0),
        logits.stride(1),
        grad_logits.stride(0),
        grad_logits.stride(1),
        vocab_size,
        column_offset,
        vocab_size if softmax_size is None else softmax_size,
        ignore_index,
        1.0 / temperature,
        1.0 if softcap is None else softcap,
        HAS_SOFTCAP=softcap is not None,
        HAS_RESIDUAL=lse_residual is not None,
        GRAD_ENTROPY=grad_entropy is not None,
        GRAD_MEAN=grad_mean_logits is not None,
        GRAD_SUM_SQ=grad_log_sum_sq_probs is not None,
        APPROX=os.environ.get("TRITON_INTERPRET") != "1",
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 4096 else 4,
    )
