"""Backward: the gradient of the per-token outputs with respect to the raw logits, written once.

With p = softmax(z), the saved lse and its rounding residual (so p_j = exp((z_j - lse) -
lse_residual), at float32 rounding of z_j - m even at large |z|: see ``token_stats_fwd``) and the
upstream gradients g of each output, the gradient with respect to the transformed logits z is

    d log p_y / dz_j          = 1[j = y] - p_j
    d entropy / dz_j          = -p_j (log p_j + entropy)
    d mean logit / dz_j       = 1 / V
    d log sum p^2 / dz_j      = 2 p_j^2 / sum p^2 - 2 p_j

and dx_j = dz_j * dz/dx (dz/dx = 1/T, or (1 - y_j^2) / T with a softcap, y_j = tanh(x_j / c)
computed once for z_j and its derivative). Each program writes one block of one row, in the
logits' dtype, either into a fresh gradient buffer or over the logits themselves (in-place
backward). Rows whose label is ``ignore_index`` are not read and get exact zeros. p is
``_common.exp2`` in the log2 domain (``ex2.approx.ftz.f32`` when compiled).

Per element the block costs one product for every term but the mean's (they are p_j times a
row coefficient, the sum of p^2 term's 1 / sum p^2 taken once per row): the one-hot 1[j = y]
is not compared per element; the program that holds the label writes that one element again,
from the same formula with the one-hot term, after a barrier that orders it behind the block's
store. Compiled for sm_90 (bf16, benches/kernel_report.py): 10.6 instructions per element read
and written with the log-prob only, 15.5 with the entropy, 19.2 with every statistic, 19.8 with
a softcap; the HBM budget is 31.1.

A launch may cover one tile of columns of each row, [column_offset, column_offset + V) of a
softmax over softmax_size columns (the fused linear path builds its logits a vocabulary tile at a
time): the label term lands in the tile that holds the label, the mean term divides by the whole
row's size.
"""

import os

import torch
import triton
import triton.language as tl

from ._common import LOG2_E, exp2, tanh_scaled

# 32 elements per thread (8 warps): the per-program prologue (row addressing, the row's
# coefficients) is spread over twice the elements of 4096, at 32 registers.
_MAX_BLOCK_V = 8192
_MAX_GRID_Z = 65535


@triton.jit
def _grad_x(x, lse, residual, entropy_minus_residual, two_over_sum_sq, label_term, g, g_entropy, g_mean, g_sum_sq,
            z_scale, tanh_scale, HAS_SOFTCAP: tl.constexpr, GRAD_ENTROPY: tl.constexpr, GRAD_MEAN: tl.constexpr,
            GRAD_SUM_SQ: tl.constexpr, APPROX: tl.constexpr, log2_e: tl.constexpr):
    """dx for logits x (a block, or the label's one logit with label_term = g): the module
    docstring's sum times dz/dx. z = z_scale y, y = x, or y = tanh(x / c) with a softcap, computed
    once for z and for dz/dx = (1 - y^2) / T; the row coefficients (g, ...) carry the 1/T."""
    if HAS_SOFTCAP:
        y = tanh_scaled(x, tanh_scale, APPROX)
    else:
        y = x
    # z - lse is exact where p matters; the residual (0 if not kept) makes it z - m - log s.
    z_minus_lse = y * z_scale - lse
    p = exp2(z_minus_lse * log2_e - residual * log2_e, APPROX)
    # Every term but the one-hot and the mean's is p_j times a coefficient: one product per element.
    coefficient = g
    if GRAD_ENTROPY:
        # p_j = 0 for a -inf logit, whose (log p_j + entropy) is -inf: its term is 0.
        coefficient += g_entropy * tl.where(p > 0.0, z_minus_lse + entropy_minus_residual, 0.0)
    if GRAD_SUM_SQ:
        coefficient += g_sum_sq * (2.0 - p * two_over_sum_sq)
    dz = label_term - p * coefficient
    if GRAD_MEAN:
        dz += g_mean
    if HAS_SOFTCAP:
        dz = dz * (1.0 - y * y)
    return dz


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
    z_scale,
    tanh_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    GRAD_ENTROPY: tl.constexpr,
    GRAD_MEAN: tl.constexpr,
    GRAD_SUM_SQ: tl.constexpr,
    APPROX: tl.constexpr,
    BLOCK_V: tl.constexpr,
    log2_e: tl.constexpr = LOG2_E,
):
    # The grid is (inner, column block, outer): a row's two indices without a division.
    inner = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    outer = tl.program_id(2).to(tl.int64)
    row = outer * inner_size + inner
    block_start = block * BLOCK_V
    cols = block_start + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab_size
    grad_row = grad_ptr + outer * grad_stride_outer + inner * grad_stride_inner
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        # An ignored row reads nothing and gets exact zeros.
        tl.store(grad_row + cols, tl.zeros((BLOCK_V,), grad_ptr.dtype.element_ty), mask=in_vocab)
    else:
        logits_row = logits_ptr + outer * stride_outer + inner * stride_inner
        # The label's column in this launch's tile, in 32 bits (outside [0, V) when another tile
        # holds it), and whether this block holds it.
        label_column = (label - column_offset).to(tl.int32)
        holds_label = (label_column >= block_start) & (label_column < block_start + BLOCK_V) & \
            (label_column < vocab_size)
        # Read before the block is written: the gradient may overwrite the logits (in place).
        label_x = tl.load(logits_row + label_column, mask=holds_label, other=0.0).to(tl.float32)
        x = tl.load(logits_row + cols, mask=in_vocab, other=0.0).to(tl.float32)
        # dz/dx = 1/T, times (1 - y^2) with a softcap: the 1/T is folded into the row's coefficients.
        lse = tl.load(lse_ptr + row)
        residual = tl.load(lse_residual_ptr + row) if HAS_RESIDUAL else 0.0
        g = tl.load(grad_logps_ptr + row) * inv_temperature
        entropy_minus_residual = tl.load(entropy_ptr + row) - residual if GRAD_ENTROPY else 0.0
        g_entropy = tl.load(grad_entropy_ptr + row) * inv_temperature if GRAD_ENTROPY else 0.0
        g_mean = tl.load(grad_mean_ptr + row) * inv_temperature / softmax_size if GRAD_MEAN else 0.0
        two_over_sum_sq = 2.0 * tl.exp(-tl.load(log_sum_sq_ptr + row)) if GRAD_SUM_SQ else 0.0
        g_sum_sq = tl.load(grad_log_sum_sq_ptr + row) * inv_temperature if GRAD_SUM_SQ else 0.0
        # The block without the one-hot term d log p_y / dz_y = 1: no comparison per element.
        dx = _grad_x(x, lse, residual, entropy_minus_residual, two_over_sum_sq, 0.0, g, g_entropy, g_mean, g_sum_sq,
                     z_scale, tanh_scale, HAS_SOFTCAP, GRAD_ENTROPY, GRAD_MEAN, GRAD_SUM_SQ, APPROX, log2_e)
        tl.store(grad_row + cols, dx.to(grad_ptr.dtype.element_ty), mask=in_vocab)
        if holds_label:
            # The label's element rewritten with it, by the same formula on the same logit. The
            # barrier orders the block's store (by whichever thread held that column) before this one.
            tl.debug_barrier()
            label_dx = _grad_x(label_x, lse, residual, entropy_minus_residual, two_over_sum_sq, g, g, g_entropy, g_mean,
                               g_sum_sq, z_scale, tanh_scale, HAS_SOFTCAP, GRAD_ENTROPY, GRAD_MEAN, GRAD_SUM_SQ,
                               APPROX, log2_e)
            tl.store(grad_row + label_column, label_dx.to(grad_ptr.dtype.element_ty))


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
    float32, contiguous. A gradient passed as None contributes nothing (entropy must be given with
    grad_entropy, log_sum_sq_probs with grad_log_sum_sq_probs). The logits may be one tile of
    columns of each row: columns [column_offset, column_offset + V) of a softmax over
    ``softmax_size`` columns (default V: whole rows), with labels and per-row statistics of the
    whole rows.
    """
    outer, inner, vocab_size = logits.shape
    rows = outer * inner
    if rows == 0:
        return
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    per_row = [labels, lse, lse_residual, entropy, log_sum_sq_probs, grad_logps, grad_entropy, grad_mean_logits,
               grad_log_sum_sq_probs]
    # The grid's third dimension (outer) holds at most 65535 programs: larger batches take turns.
    for first in range(0, outer, _MAX_GRID_Z):
        last = min(outer, first + _MAX_GRID_Z)
        rows = slice(first * inner, last * inner)
        (labels_, lse_, lse_residual_, entropy_, log_sum_sq_, grad_logps_, grad_entropy_, grad_mean_,
         grad_log_sum_sq_) = (lse[rows] if t is None else t[rows] for t in per_row)
        _token_stats_bwd_kernel[(inner, triton.cdiv(vocab_size, block_v), last - first)](
            logits[first:last],
            grad_logits[first:last],
            labels_,
            lse_,
            lse_residual_,
            entropy_,
            log_sum_sq_,
            grad_logps_,
            grad_entropy_,
            grad_mean_,
            grad_log_sum_sq_,
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
            # z = z_scale y: y = x, z_scale = 1/T without a softcap; y = tanh(x / c), z_scale = c / T with one.
            (1.0 if softcap is None else softcap) / temperature,
            0.0 if softcap is None else 2.0 * LOG2_E / softcap,
            HAS_SOFTCAP=softcap is not None,
            HAS_RESIDUAL=lse_residual is not None,
            GRAD_ENTROPY=grad_entropy is not None,
            GRAD_MEAN=grad_mean_logits is not None,
            GRAD_SUM_SQ=grad_log_sum_sq_probs is not None,
            APPROX=os.environ.get("TRITON_INTERPRET") != "1",
            BLOCK_V=block_v,
            num_warps=8 if block_v >= 4096 else 4,
        )
