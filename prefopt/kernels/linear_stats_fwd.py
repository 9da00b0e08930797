"""Forward of the fused linear path with the statistics inside the GEMM: each program computes one
[BM, BN] tile of logits with ``tl.dot`` (float32 accumulation) and turns it, in registers, into
per-(row, vocabulary tile) partials; the logits never reach memory.

For the rows i of the tile and its columns j (vocabulary tile t),

    y_ij = hidden_i . weight_j + bias_j,   x = logit_scale y,   z = softcap(x) / T
    m_t  = max_j z_ij,  k_t = first argmax_j z_ij
    r_t  = sum_{j != k_t} exp(z_ij - m_t)                  (s_t = 1 + r_t)
    a_t  = sum_j exp(z_ij - m_t) (z_ij - m_t)
    q_t  = sum_{j != k_t} exp(z_ij - m_t)^2                 (sum of squares = 1 + q_t)
    u_t  = sum_j z_ij,   z_iy where the label y lies in tile t

written at [t, i]. ``combine_partials`` merges them over t in a fixed order (deterministic). The
tile's own maximum term exp(0) = 1 stays out of r_t and q_t, as in the logits path's kernel, so
that a peaked row keeps the relative precision of log1p. ``logits_tile`` is the one tile product
of forward and backward: the backward recomputes each tile with it, bit for bit, with the same
``TileConfig`` (``tile_config``: one per shape class, the fastest of GPU_TILES timed once on a GPU).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from prefopt.backends import triton_interpreting

from ._common import transform_logits


class TileConfig(NamedTuple):
    """The fused linear kernels' tile: [block_m rows, block_n vocabulary columns] of logits,
    block_k of the hidden size a step, and the launch's warps and pipeline stages. The forward,
    the backward's recomputation of each tile and the gradient filter's tiles all take the same
    one: a tile is recomputed bit for bit, and a left-out tile is a forward tile."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Triton's interpreter and every device without its own choice; on CUDA Triton's default warps
# and stages.
DEFAULT_TILES = TileConfig(64, 64, 32, 4, 3)
# Timed once per shape class on a GPU: tiles sized for Hopper's warpgroup products (rows in
# multiples of 64, 64 of the hidden size a step) and the default.
GPU_TILES = (DEFAULT_TILES, TileConfig(128, 64, 64, 4, 3), TileConfig(64, 128, 64, 4, 3),
             TileConfig(128, 128, 64, 8, 3))
# Rows of hidden the candidates are timed on: enough row blocks to fill the GPU at every tile.
TUNE_ROWS = 4096
_chosen: dict[tuple, TileConfig] = {}


def tile_config(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, *,
                logit_scale: float, temperature: float, softcap: float | None) -> TileConfig:
    """The tiles of every fused linear kernel for hidden [N, H] and weight [V, H]: DEFAULT_TILES
    under the interpreter and off CUDA; on a GPU the fastest forward of GPU_TILES on the first
    TUNE_ROWS rows, timed once per shape class (H, V, dtype, bias, softcap, device) and kept for
    the process, so the backward finds the forward's choice. A first call inside a CUDA graph
    capture, which cannot wait for timings, keeps DEFAULT_TILES."""
    if not hidden.is_cuda or triton_interpreting():
        return DEFAULT_TILES
    key = (hidden.shape[1], weight.shape[0], hidden.dtype, bias is not None, softcap is not None, hidden.device)
    if key not in _chosen:
        if torch.cuda.is_current_stream_capturing():
            _chosen[key] = DEFAULT_TILES
        else:
            rows, row_labels = hidden[:TUNE_ROWS].contiguous(), labels[:TUNE_ROWS]

            def forward(tiles: TileConfig) -> None:
                linear_stats_partials(rows, weight, bias, row_labels, logit_scale=logit_scale,
                                      temperature=temperature, softcap=softcap, tiles=tiles)

            _chosen[key] = fastest(GPU_TILES, lambda tiles: _cuda_seconds(forward, tiles))
    return _chosen[key]


def fastest(candidates: tuple[TileConfig, ...], seconds: Callable[[TileConfig], float | None]) -> TileConfig:
    """The candidate of least ``seconds`` (None: it cannot run here), the earlier one on a tie."""
    timed = [(time, k, tiles) for k, tiles in enumerate(candidates) if (time := seconds(tiles)) is not None]
    if not timed:
        raise RuntimeError(f"no tile configuration of {candidates} runs here")
    return min(timed)[2]


def _cuda_seconds(run: Callable[[TileConfig], None], tiles: TileConfig, repeats: int = 3) -> float | None:
    """Seconds of one ``run(tiles)`` after a first call (its compilation), from CUDA events; None
    when the tiles need more shared memory or registers than the GPU has."""
    try:
        run(tiles)
    except OutOfResources:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run(tiles)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def precision(dtype: torch.dtype) -> dict[str, bool]:
    """The tile product's precision flags for operands of ``dtype``."""
    return {"IEEE": dtype == torch.float32, "UPCAST": triton_interpreting() and dtype != torch.float32}


@triton.jit
def tile_dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in float32: the one tile product of every fused linear kernel."""
    if UPCAST:
        # Triton's interpreter multiplies bf16/fp16 operands wrongly; their float32 values give
        # the same products (exact in float32) and sums.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # float32 operands are multiplied in float32 (no TF32), as the explicit logits are.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, n_rows, vocab_size, hidden_size,
                stride_hidden, stride_weight, logit_scale, inv_temperature, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """(x, z) of the tile rows x cols, float32: x = logit_scale (hidden @ weight.T + bias)."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for k in range(0, hidden_size, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        a = tl.load(hidden_ptr + rows[:, None] * stride_hidden + ks[None, :],
                    mask=(rows[:, None] < n_rows) & (ks[None, :] < hidden_size), other=0.0)
        b = tl.load(weight_ptr + cols[None, :] * stride_weight + ks[:, None],
                    mask=(cols[None, :] < vocab_size) & (ks[:, None] < hidden_size), other=0.0)
        acc = tile_dot(a, b, acc, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < vocab_size, other=0.0).to(tl.float32)[None, :]
    x = acc * logit_scale
    return x, transform_logits(x, inv_temperature, softcap, HAS_SOFTCAP)


@triton.jit
def _linear_stats_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr,
    max_ptr, argmax_ptr, rest_ptr, shifted_ptr, rest_sq_ptr, sum_ptr, label_z_ptr,
    n_rows, vocab_size, hidden_size, stride_hidden, stride_weight,
    logit_scale, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    _, z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, n_rows, vocab_size, hidden_size,
                       stride_hidden, stride_weight, logit_scale, inv_temperature, softcap,
                       HAS_BIAS, HAS_SOFTCAP, IEEE, UPCAST, BLOCK_K)
    valid = cols[None, :] < vocab_size
    z = tl.where(valid, z, float("-inf"))
    m = tl.max(z, axis=1)
    k = tl.argmax(z, axis=1, tie_break_left=True)
    # A row of -inf logits in this tile shifts by 0 (its e are all 0, no NaN from -inf - -inf).
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    shifted = z - m_safe[:, None]
    e = tl.exp(shifted)
    rest = tl.where(tl.arange(0, BLOCK_N)[None, :] == k[:, None], 0.0, e)
    # e (z - m) -> 0 where e is 0 (a -inf logit or a padding column), not 0 * -inf.
    weighted = tl.where(e > 0.0, e * shifted, 0.0)
    labels = tl.load(labels_ptr + rows, mask=rows < n_rows, other=-1).to(tl.int64)
    label_z = tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
    out = tile * n_rows + rows
    keep = rows < n_rows
    tl.store(max_ptr + out, m, mask=keep)
    tl.store(argmax_ptr + out, tile * BLOCK_N + k, mask=keep)
    tl.store(rest_ptr + out, tl.sum(rest, axis=1), mask=keep)
    tl.store(shifted_ptr + out, tl.sum(weighted, axis=1), mask=keep)
    tl.store(rest_sq_ptr + out, tl.sum(rest * rest, axis=1), mask=keep)
    tl.store(sum_ptr + out, tl.sum(tl.where(valid, z, 0.0), axis=1), mask=keep)
    in_tile = keep & (labels >= tile * BLOCK_N) & (labels < tile * BLOCK_N + BLOCK_N)
    tl.store(label_z_ptr + rows, label_z, mask=in_tile)


def linear_stats_partials(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor, *, logit_scale: float, temperature: float, softcap: float | None,
                          tiles: TileConfig) -> dict[str, torch.Tensor]:
    """The per-tile partials of hidden [N, H] (contiguous rows) and weight [V, H] with labels [N]
    (a label outside [0, V), e.g. the ignore index, lies in no tile), in ``tiles``: float32
    [vocabulary tiles, N] "max", "rest", "shifted", "rest_sq", "sum", int64 [vocabulary tiles, N]
    "argmax" (a global column), float32 [N] "label_z" (0 where the label lies in no tile)."""
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    vocab_tiles = triton.cdiv(vocab_size, tiles.block_n)

    def partial(dtype=torch.float32):
        return torch.empty(vocab_tiles, n_rows, dtype=dtype, device=hidden.device)

    out = {"max": partial(), "argmax": partial(torch.int64), "rest": partial(), "shifted": partial(),
           "rest_sq": partial(), "sum": partial(),
           "label_z": torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)}
    grid = (triton.cdiv(n_rows, tiles.block_m), vocab_tiles)
    _linear_stats_fwd_kernel[grid](
        hidden, weight, hidden if bias is None else bias, labels,
        out["max"], out["argmax"], out["rest"], out["shifted"], out["rest_sq"], out["sum"], out["label_z"],
        n_rows, vocab_size, hidden_size, hidden.stride(0), weight.stride(0),
        float(logit_scale), 1.0 / temperature, 1.0 if softcap is None else float(softcap),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **precision(hidden.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out


def combine_partials(partials: dict[str, torch.Tensor], labels: torch.Tensor, ignore_index: int,
                     vocab_size: int) -> dict[str, torch.Tensor]:
    """The rows' statistics from the tiles' partials, merged over the tiles in a fixed order
    (torch reductions over dimension 0, no atomics). With M = max_t m_t, w_t = exp(m_t - M) and
    t* the first tile reaching M:

        s = 1 + R,  R = r_t* + sum_{t != t*} w_t (1 + r_t)       lse = M + log1p(R)
        A = sum_t w_t (a_t + s_t (m_t - M))                       entropy = log1p(R) - A / s
        sum p^2 = (1 + Q) / s^2,  Q = q_t* + sum_{t != t*} w_t^2 (1 + q_t)
        log p_y = z_y - lse,  mean = sum_t u_t / V,  is_top1 = (argmax of t*) == y

    Returns float32 [N] "logps", "lse", "entropy", "mean_logits", "log_sum_sq_probs" and bool
    "is_top1", zeros (False) where the label is ignored."""
    m = partials["max"]
    big_m, first = m.max(0)
    finite = big_m != float("-inf")
    big_m_safe = torch.where(finite, big_m, 0.0)
    w = torch.exp(m - big_m_safe)
    is_first = torch.arange(m.shape[0], device=m.device)[:, None] == first[None, :]
    s_t = 1.0 + partials["rest"]
    total_rest = torch.where(is_first, partials["rest"], w * s_t).sum(0)
    total_rest_sq = torch.where(is_first, partials["rest_sq"], w * w * (1.0 + partials["rest_sq"])).sum(0)
    # The shift m_t - M of a tile whose e all vanish (m_t = -inf) contributes nothing.
    shift = torch.where(w > 0, w * (partials["shifted"] + s_t * (m - big_m_safe)), 0.0).sum(0)
    log_s = torch.where(finite, torch.log1p(total_rest), float("nan"))
    s = 1.0 + total_rest
    label = labels.long()
    scored = label != ignore_index
    lse = big_m_safe + log_s
    top = partials["argmax"].gather(0, first[None, :]).squeeze(0)

    def masked(value):
        return torch.where(scored, value, 0.0)

    return {"logps": masked(partials["label_z"] - lse), "lse": masked(lse),
            "entropy": masked(log_s - shift / s), "mean_logits": masked(partials["sum"].sum(0) / vocab_size),
            "log_sum_sq_probs": masked(torch.log1p(total_rest_sq) - 2.0 * log_s),
            "is_top1": scored & (top == label)}
