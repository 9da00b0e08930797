"""Block-sparse grad_hidden of the fused linear path: for a block of rows r and of hidden columns,

    grad_hidden[r, :] += sum over the vocabulary tiles t, in order, of dy[r, t] @ weight[t, :]

skipping every tile whose max |dy| is below the filter's threshold (its ``keep`` flag is 0). One
program owns its output block and walks the tiles in a fixed order: deterministic, no atomics.
The sum starts from the float32 accumulator it adds to (the earlier vocabulary chunks' share), so
no [N, H] partial is written and read back per chunk.
"""

import torch
import triton
import triton.language as tl

from .linear_stats_fwd import TileConfig, precision, tile_dot

BLOCK_H = 64


@triton.jit
def _linear_grad_hidden_kernel(
    grad_ptr, weight_ptr, keep_ptr, acc_ptr, n_rows, n_cols, col_start, hidden_size, n_tiles,
    stride_grad, stride_weight, stride_acc,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row_block = tl.program_id(0)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc_ptrs = acc_ptr + rows[:, None].to(tl.int64) * stride_acc + hs[None, :]
    acc_mask = (rows[:, None] < n_rows) & (hs[None, :] < hidden_size)
    acc = tl.load(acc_ptrs, mask=acc_mask, other=0.0)
    for tile in range(0, n_tiles):
        if tl.load(keep_ptr + row_block * n_tiles + tile) != 0:
            cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            g = tl.load(grad_ptr + rows[:, None].to(tl.int64) * stride_grad + cols[None, :],
                        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
            w = tl.load(weight_ptr + (col_start + cols[:, None]).to(tl.int64) * stride_weight + hs[None, :],
                        mask=(cols[:, None] < n_cols) & (hs[None, :] < hidden_size), other=0.0)
            acc = tile_dot(g, w, acc, IEEE, UPCAST)
    tl.store(acc_ptrs, acc, mask=acc_mask)


def linear_grad_hidden(grad: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, col_start: int, *,
                       accumulator: torch.Tensor, tiles: TileConfig) -> None:
    """accumulator (float32 [N, H], row-contiguous) += grad [N, C] @ weight[col_start : col_start + C]
    over the kept [tiles.block_m, tiles.block_n] tiles (``keep`` int32 [row blocks, tiles])."""
    n_rows, n_cols = grad.shape
    hidden_size = weight.shape[1]
    grid = (triton.cdiv(n_rows, tiles.block_m), triton.cdiv(hidden_size, BLOCK_H))
    _linear_grad_hidden_kernel[grid](
        grad, weight, keep, accumulator, n_rows, n_cols, col_start, hidden_size, keep.shape[1],
        grad.stride(0), weight.stride(0), accumulator.stride(0), **precision(grad.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_H=BLOCK_H,
    )
