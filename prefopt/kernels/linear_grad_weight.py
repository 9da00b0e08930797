"""Block-sparse grad_weight of the fused linear path: for a vocabulary tile t and a block of
hidden columns,

    grad_weight[t, :] = sum over the row blocks r, in order, of dy[r, t].T @ hidden[r, :]

skipping every tile whose max |dy| is below the filter's threshold (its ``keep`` flag is 0). One
program owns its output block and walks the row blocks in a fixed order: deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl

from .linear_grad_hidden import BLOCK_H
from .linear_stats_fwd import TileConfig, precision, tile_dot


@triton.jit
def _linear_grad_weight_kernel(
    grad_ptr, hidden_ptr, keep_ptr, out_ptr, n_rows, n_cols, hidden_size, n_tiles, n_row_blocks,
    stride_grad, stride_hidden, stride_out,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tile = tl.program_id(0)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for row_block in range(0, n_row_blocks):
        if tl.load(keep_ptr + row_block * n_tiles + tile) != 0:
            rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
            g = tl.load(grad_ptr + rows[:, None].to(tl.int64) * stride_grad + cols[None, :],
                        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
            h = tl.load(hidden_ptr + rows[:, None].to(tl.int64) * stride_hidden + hs[None, :],
                        mask=(rows[:, None] < n_rows) & (hs[None, :] < hidden_size), other=0.0)
            acc = tile_dot(tl.trans(g), h, acc, IEEE, UPCAST)
    tl.store(out_ptr + cols[:, None].to(tl.int64) * stride_out + hs[None, :], acc,
             mask=(cols[:, None] < n_cols) & (hs[None, :] < hidden_size))


def linear_grad_weight(grad: torch.Tensor, hidden: torch.Tensor, keep: torch.Tensor, *, tiles: TileConfig
                       ) -> torch.Tensor:
    """float32 [C, H] = grad [N, C].T @ hidden [N, H] over the kept [tiles.block_m, tiles.block_n]
    tiles (``keep`` int32 [row blocks, tiles])."""
    n_rows, n_cols = grad.shape
    hidden_size = hidden.shape[1]
    out = torch.empty(n_cols, hidden_size, dtype=torch.float32, device=grad.device)
    grid = (triton.cdiv(n_cols, tiles.block_n), triton.cdiv(hidden_size, BLOCK_H))
    _linear_grad_weight_kernel[grid](
        grad, hidden, keep, out, n_rows, n_cols, hidden_size, keep.shape[1], keep.shape[0],
        grad.stride(0), hidden.stride(0), out.stride(0), **precision(grad.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_H=BLOCK_H,
    )
    return out
