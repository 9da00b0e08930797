"""Backward of the fused linear path with the statistics inside the GEMM: each program recomputes
its [BM, BN] logits tile with the forward's ``logits_tile`` (same kernel code, same blocks: bit
for bit the logits whose log-sum-exp was saved), forms the gradient in registers and writes it
once, in the operands' dtype, for the two gradient products.

With p = exp(z - lse) and the per-row coefficients of ``prefopt.logprobs.torch_backend.row_gradient_``
(a, b, c, the upstream gradient g of the log-prob and d = g_m / V of the mean logit):

    dz_ij = p_ij (a_i + b_i log p_ij + c_i p_ij) + d_i + g_i [j == y_i]
    dy_ij = dz_ij * dz/dx_ij * logit_scale,   dz/dx = (1 - tanh(x / cap)^2) / T   (1 / T uncapped)

Rows whose label is ignored get exact zeros. Each program also writes max_ij |dy_ij| of its tile,
which a gradient filter compares with its threshold.
"""

import torch
import triton
import triton.language as tl

from ._common import transform_logits_derivative
from .linear_stats_fwd import TileConfig, logits_tile, precision


@triton.jit
def _linear_stats_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, lse_ptr,
    a_ptr, b_ptr, c_ptr, g_ptr, d_ptr, grad_ptr, tile_max_ptr,
    n_rows, vocab_size, col_start, col_end, hidden_size, stride_hidden, stride_weight, stride_grad, ignore_index,
    logit_scale, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, WITH_LOG_P: tl.constexpr,
    WITH_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_start + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x, z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, n_rows, vocab_size, hidden_size,
                       stride_hidden, stride_weight, logit_scale, inv_temperature, softcap,
                       HAS_BIAS, HAS_SOFTCAP, IEEE, UPCAST, BLOCK_K)
    in_rows = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=in_rows, other=ignore_index).to(tl.int64)
    scored = in_rows & (labels != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=scored, other=0.0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    factor = tl.load(a_ptr + rows, mask=scored, other=0.0)[:, None] + tl.zeros_like(p)
    if WITH_LOG_P:
        # p log p -> 0 as p -> 0: log p of a vanishing p is never multiplied by its own infinity.
        factor += tl.load(b_ptr + rows, mask=scored, other=0.0)[:, None] * tl.where(p > 0.0, log_p, 0.0)
    if WITH_P2:
        factor += tl.load(c_ptr + rows, mask=scored, other=0.0)[:, None] * p
    g = tl.load(g_ptr + rows, mask=scored, other=0.0)
    dz = p * factor + tl.load(d_ptr + rows, mask=scored, other=0.0)[:, None]
    dz += tl.where(cols[None, :] == labels[:, None], g[:, None], 0.0)
    dy = dz * transform_logits_derivative(x, inv_temperature, softcap, HAS_SOFTCAP) * logit_scale
    in_cols = cols[None, :] < col_end
    dy = tl.where(scored[:, None] & in_cols, dy, 0.0)
    tl.store(grad_ptr + rows[:, None].to(tl.int64) * stride_grad + (cols - col_start)[None, :],
             dy.to(grad_ptr.dtype.element_ty), mask=in_rows[:, None] & in_cols)
    tl.store(tile_max_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.max(tl.max(tl.abs(dy), 1), 0))


def linear_stats_grad_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, lse: torch.Tensor, coefficients, columns: slice, *,
                             ignore_index: int, logit_scale: float, temperature: float, softcap: float | None,
                             tiles: TileConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [N, columns] in hidden's dtype, the gradient of y = hidden @ weight.T + bias at the
    vocabulary ``columns``, whose start is a multiple of tiles.block_n so that its tiles are the
    forward's (``tiles``: the forward's); tile maxima of |dy| float32 [row blocks, its vocabulary
    tiles]).
    ``coefficients``: ``prefopt.logprobs.torch_backend.GradientCoefficients`` of the rows, float32 [N]."""
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    start, stop = columns.start, min(columns.stop, vocab_size)
    if start % tiles.block_n:
        raise ValueError(f"columns: expected a start that is a multiple of {tiles.block_n}, got {start}")
    grid = (triton.cdiv(n_rows, tiles.block_m), triton.cdiv(stop - start, tiles.block_n))
    grad = torch.empty(n_rows, stop - start, dtype=hidden.dtype, device=hidden.device)
    tile_max = torch.empty(grid, dtype=torch.float32, device=hidden.device)
    g, a, b, c, d = coefficients
    zeros = torch.zeros_like(a)
    _linear_stats_bwd_kernel[grid](
        hidden, weight, hidden if bias is None else bias, labels, lse,
        a, a if b is None else b, a if c is None else c, g, zeros if d is None else d, grad, tile_max,
        n_rows, vocab_size, start, stop, hidden_size, hidden.stride(0), weight.stride(0), grad.stride(0),
        ignore_index, float(logit_scale), 1.0 / temperature, 1.0 if softcap is None else float(softcap),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **precision(hidden.dtype),
        WITH_LOG_P=b is not None, WITH_P2=c is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return grad, tile_max
