"""Tiles shared by the fused linear kernels: a [BLOCK_T, BLOCK_V] tile of logits computed in
registers from hidden rows and weight rows (never written to memory), and the gradient of the
per-token outputs with respect to that tile.

    x = logit_scale * (hidden @ weight.T + bias),     z = softcap(x) / T  (``_common``)

The gradient is that of ``token_logprobs_bwd`` (see its docstring for the formulas), times
dx/d(hidden @ weight.T + bias) = logit_scale.
"""

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ._common import transform_logits, transform_logits_derivative


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation. "ieee": float32 inputs keep float32 products (TF32
    would cost 1e-3 relative error); the option does not apply to bf16/fp16."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, rows, in_rows, cols, in_vocab, hidden_size, stride_hidden,
    stride_weight_v, stride_weight_h, logit_scale,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """x for rows x cols, float32 (rows and cols are int64 index vectors)."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for k in range(0, tl.cdiv(hidden_size, BLOCK_H)):
        ks = k * BLOCK_H + tl.arange(0, BLOCK_H)
        in_k = ks < hidden_size
        h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + ks[None, :],
                    mask=in_rows[:, None] & in_k[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[None, :] * stride_weight_v + ks[:, None] * stride_weight_h,
                    mask=in_k[:, None] & in_vocab[None, :], other=0.0)
        acc = dot(h, w, acc, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)[None, :]
    return acc * logit_scale


@triton.jit
def grad_logits_tile(
    x, cols, in_vocab, scored, labels, lse, entropy, log_sum_sq, grad_logps, grad_entropy, grad_mean,
    grad_log_sum_sq, vocab_size, logit_scale, inv_temperature, softcap,
    HAS_SOFTCAP: tl.constexpr, GRAD_ENTROPY: tl.constexpr, GRAD_MEAN: tl.constexpr, GRAD_SUM_SQ: tl.constexpr,
):
    """d(outputs)/d(hidden @ weight.T + bias) for a tile x [BLOCK_T, BLOCK_V]; 0 outside the
    vocabulary and on rows that are not scored. Per-row arguments are [BLOCK_T] vectors."""
    z = transform_logits(x, inv_temperature, softcap, HAS_SOFTCAP)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    dz = grad_logps[:, None] * (tl.where(cols[None, :] == labels[:, None], 1.0, 0.0) - p)
    if GRAD_ENTROPY:
        dz -= grad_entropy[:, None] * p * tl.where(p > 0.0, log_p + entropy[:, None], 0.0)
    if GRAD_MEAN:
        dz += grad_mean[:, None] / vocab_size
    if GRAD_SUM_SQ:
        sum_sq = tl.exp(log_sum_sq)
        dz += grad_log_sum_sq[:, None] * (2.0 * p * p / sum_sq[:, None] - 2.0 * p)
    dx = dz * transform_logits_derivative(x, inv_temperature, softcap, HAS_SOFTCAP) * logit_scale
    return tl.where(scored[:, None] & in_vocab[None, :], dx, 0.0)


def block_sizes(rows: int, vocab_size: int, hidden_size: int, block_t: int, block_v: int, block_h: int):
    """Tile sizes, shrunk to the problem (tl.dot needs every dimension >= 16)."""
    def fit(size: int, most: int) -> int:
        return max(16, min(most, triton.next_power_of_2(size)))

    return fit(rows, block_t), fit(vocab_size, block_v), fit(hidden_size, block_h)


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether products must be taken in float32: Triton's interpreter multiplies bfloat16 tiles
    as their raw 16-bit patterns (numpy has no bfloat16), so there they are upcast first."""
    return dtype == torch.bfloat16 and isinstance(logits_tile, InterpretedFunction)


@triton.jit
def load_row_statistics(rows, scored, lse_ptr, entropy_ptr, log_sum_sq_ptr, grad_logps_ptr, grad_entropy_ptr,
                        grad_mean_ptr, grad_log_sum_sq_ptr,
                        GRAD_ENTROPY: tl.constexpr, GRAD_MEAN: tl.constexpr, GRAD_SUM_SQ: tl.constexpr):
    """The per-row inputs of ``grad_logits_tile`` for a tile of rows: (lse, entropy, log_sum_sq,
    grad_logps, grad_entropy, grad_mean, grad_log_sum_sq). A statistic without an upstream
    gradient is not read; its slots hold lse as a placeholder the flags leave unused."""
    lse = tl.load(lse_ptr + rows, mask=scored, other=0.0)
    grad_logps = tl.load(grad_logps_ptr + rows, mask=scored, other=0.0)
    entropy = lse
    grad_entropy = lse
    grad_mean = lse
    log_sum_sq = lse
    grad_log_sum_sq = lse
    if GRAD_ENTROPY:
        entropy = tl.load(entropy_ptr + rows, mask=scored, other=0.0)
        grad_entropy = tl.load(grad_entropy_ptr + rows, mask=scored, other=0.0)
    if GRAD_MEAN:
        grad_mean = tl.load(grad_mean_ptr + rows, mask=scored, other=0.0)
    if GRAD_SUM_SQ:
        log_sum_sq = tl.load(log_sum_sq_ptr + rows, mask=scored, other=0.0)
        grad_log_sum_sq = tl.load(grad_log_sum_sq_ptr + rows, mask=scored, other=0.0)
    return lse, entropy, log_sum_sq, grad_logps, grad_entropy, grad_mean, grad_log_sum_sq
