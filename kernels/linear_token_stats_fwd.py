"""Forward of the fused linear path, part 1: per-row partial softmax states over slices of the
vocabulary, from hidden states and the LM-head weight; the logits are computed tile by tile in
registers and never stored.

The grid is token tiles x vocabulary splits. Each program owns BLOCK_T rows and one split (a run
of BLOCK_V tiles), each logits tile the product of BLOCK_H slices of hidden and weight, and keeps
the per-row online state of ``token_logprobs_fwd`` (its docstring has the formulas): running
maximum m, r = s - 1 with the maximum's own exp(0) = 1 kept out, t for the entropy, r2 for
log sum p^2, the sum of z, the label's z (from the split that holds it) and the first argmax.
It writes that state for its split; ``linear_token_stats_merge`` combines the splits in order and
writes the outputs. A tile of rows that are all ignored runs zero vocabulary tiles: no product
and no host round trip (the merge gives its rows 0 without reading their states).
"""

import torch
import triton
import triton.language as tl

from ._common import transform_logits
from .linear_common import block_sizes, logits_tile, upcast_dot
from .linear_token_stats_merge import STATES, merge_states

# Programs to aim for: enough to fill an H100/H200 (132 SMs) twice.
_TARGET_PROGRAMS = 264


@triton.jit
def _linear_token_stats_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr,
    states_ptr, best_index_ptr,
    n_rows, blocks_per_split, hidden_size, vocab_size, stride_hidden, stride_weight_v, stride_weight_h,
    ignore_index, logit_scale, inv_temperature, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_MEAN: tl.constexpr,
    WITH_SUM_SQ: tl.constexpr, WITH_TOP1: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    in_rows = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=in_rows, other=0).to(tl.int64)
    scored = in_rows & (labels != ignore_index)
    any_scored = tl.max(scored.to(tl.int32), 0) > 0
    first_block = split * blocks_per_split
    last_block = tl.where(any_scored, tl.minimum(first_block + blocks_per_split, tl.cdiv(vocab_size, BLOCK_V)),
                          first_block)

    neg_inf = float("-inf")
    m = tl.full((BLOCK_T,), neg_inf, tl.float32)
    r = tl.zeros((BLOCK_T,), tl.float32)
    t = tl.zeros((BLOCK_T,), tl.float32)
    r2 = tl.zeros((BLOCK_T,), tl.float32)
    z_sum = tl.zeros((BLOCK_T,), tl.float32)
    label_z = tl.zeros((BLOCK_T,), tl.float32)
    best_index = tl.zeros((BLOCK_T,), tl.int64) - 1
    for block in range(first_block, last_block):
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        in_vocab = cols < vocab_size
        x = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, in_rows, cols, in_vocab, hidden_size,
                        stride_hidden, stride_weight_v, stride_weight_h, logit_scale,
                        HAS_BIAS, BLOCK_T, BLOCK_V, BLOCK_H, UPCAST_DOT)
        z = tl.where(in_vocab[None, :], transform_logits(x, inv_temperature, softcap, HAS_SOFTCAP), neg_inf)
        # The label's logit is taken from the same tile as the maximum, so z_y <= m exactly.
        label_z += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        block_max = tl.max(z, 1)
        new_max = block_max > m
        m_new = tl.maximum(m, block_max)
        m_safe = tl.where(m_new > neg_inf, m_new, 0.0)
        scale = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        at_block_max = z == block_max[:, None]
        e_below = tl.where(at_block_max, 0.0, e)
        e_at_max = tl.exp(block_max - m_safe)
        extra_maxima = (tl.sum(at_block_max.to(tl.int32), 1) - new_max.to(tl.int32)).to(tl.float32)
        if WITH_ENTROPY:
            shift = tl.where(m > neg_inf, m - m_safe, 0.0)
            t = scale * (t + (1.0 + r) * shift) + tl.sum(e * tl.where(e > 0.0, z - m_safe[:, None], 0.0), 1)
        if WITH_SUM_SQ:
            r2 = tl.where(new_max, scale * scale * (1.0 + r2), r2)
            r2 += tl.sum(e_below * e_below, 1) + extra_maxima * e_at_max * e_at_max
        if WITH_MEAN:
            z_sum += tl.sum(tl.where(in_vocab[None, :], z, 0.0), 1)
        if WITH_TOP1:
            # Strictly greater: on ties the earlier tile keeps the argmax; tl.argmax keeps the
            # earliest column within a tile (and the merge, the earlier split).
            best_index = tl.where(new_max, block * BLOCK_V + tl.argmax(z, 1), best_index)
        r = tl.where(new_max, scale * (1.0 + r), r) + tl.sum(e_below, 1) + extra_maxima * e_at_max
        m = m_new

    # states [STATES, splits, N]: m, r, t, r2, sum of z, label's z.
    state_ptr = states_ptr + split.to(tl.int64) * n_rows + rows
    plane = tl.num_programs(1).to(tl.int64) * n_rows
    tl.store(state_ptr, m, mask=in_rows)
    tl.store(state_ptr + plane, r, mask=in_rows)
    tl.store(state_ptr + 2 * plane, t, mask=in_rows)
    tl.store(state_ptr + 3 * plane, r2, mask=in_rows)
    tl.store(state_ptr + 4 * plane, z_sum, mask=in_rows)
    tl.store(state_ptr + 5 * plane, label_z, mask=in_rows)
    tl.store(best_index_ptr + split.to(tl.int64) * n_rows + rows, best_index, mask=in_rows)


def linear_token_stats_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    outputs: list[torch.Tensor | None],
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
) -> None:
    """Fill ``outputs`` = [logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1].

    hidden: [N, H] bf16/fp16/fp32 with a contiguous last dimension; weight: [V, H] (any strides)
    and bias: [V] or None, hidden's dtype. labels: [N] int32/int64, contiguous. Outputs: [N]
    contiguous float32 (is_top1 bool); a statistic passed as None is not computed. The partial
    states take 6 float32 and 1 int64 per row and split; there are fewer splits than vocabulary
    tiles, and 1 once there are enough token tiles to fill the GPU.
    """
    logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1 = outputs
    rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    if rows == 0:
        return
    block_t, block_v, block_h = block_sizes(rows, vocab_size, hidden_size, 64, 128, 64)
    token_tiles = triton.cdiv(rows, block_t)
    vocab_blocks = triton.cdiv(vocab_size, block_v)
    blocks_per_split = triton.cdiv(vocab_blocks, min(vocab_blocks, triton.cdiv(_TARGET_PROGRAMS, token_tiles)))
    splits = triton.cdiv(vocab_blocks, blocks_per_split)  # none empty
    states = torch.empty((STATES, splits, rows), dtype=torch.float32, device=hidden.device)
    best_index = torch.empty((splits, rows), dtype=torch.int64, device=hidden.device)
    _linear_token_stats_fwd_kernel[(token_tiles, splits)](
        hidden, weight, weight if bias is None else bias, labels, states, best_index,
        rows, blocks_per_split, hidden_size, vocab_size, hidden.stride(0), weight.stride(0), weight.stride(1),
        ignore_index, logit_scale, 1.0 / temperature, 1.0 if softcap is None else softcap,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        WITH_ENTROPY=entropy is not None,
        WITH_MEAN=mean_logits is not None,
        WITH_SUM_SQ=log_sum_sq_probs is not None,
        WITH_TOP1=is_top1 is not None,
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_H=block_h, UPCAST_DOT=upcast_dot(hidden.dtype),
        num_warps=8 if block_t * block_v >= 8192 else 4,
    )
    merge_states(states, best_index, labels, outputs, ignore_index=ignore_index, vocab_size=vocab_size)
