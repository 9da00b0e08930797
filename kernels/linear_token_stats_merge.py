"""Forward of the fused linear path, part 2: combine the per-split softmax states of
``linear_token_stats_fwd`` in split order and write the per-token outputs.

A split's state (m_k, r_k, t_k, r2_k) is relative to its own maximum m_k, with s_k = 1 + r_k. At
the running maximum M the sums rescale as in the streaming pass: s_k -> exp(m_k - M) s_k,
s2_k -> exp(2 (m_k - M)) s2_k and t_k -> exp(m_k - M) (t_k + s_k (m_k - M)); the split that holds
the maximum brings the 1 kept out of r and r2. Then, as in ``token_logprobs_fwd``,

    log p_y = (z_y - m) - log1p(r),  lse = m + log1p(r),  entropy = log1p(r) - t / (1 + r),
    log sum p^2 = log1p(r2) - 2 log1p(r),  mean logit = sum z / V,  is_top1 = (argmax == y).

Splits are visited in order and the maximum moves only when strictly exceeded, so the argmax
ties go to the earlier token and the result is the same, bit for bit, run after run.
"""

import torch
import triton
import triton.language as tl

from ._common import log1p

# m, r, t, r2, sum of z, label's z
STATES = 6
_BLOCK = 256


@triton.jit
def _linear_token_stats_merge_kernel(
    states_ptr, best_index_ptr, labels_ptr,
    logps_ptr, lse_ptr, entropy_ptr, mean_logits_ptr, log_sum_sq_ptr, is_top1_ptr,
    n_rows, n_splits, plane, vocab_size, ignore_index,
    WITH_ENTROPY: tl.constexpr, WITH_MEAN: tl.constexpr, WITH_SUM_SQ: tl.constexpr, WITH_TOP1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # states [STATES, n_splits, n_rows]: planes of n_splits * n_rows words.
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_rows = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=in_rows, other=0).to(tl.int64)
    scored = in_rows & (labels != ignore_index)

    neg_inf = float("-inf")
    m = tl.full((BLOCK,), neg_inf, tl.float32)
    r = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    r2 = tl.zeros((BLOCK,), tl.float32)
    z_sum = tl.zeros((BLOCK,), tl.float32)
    label_z = tl.zeros((BLOCK,), tl.float32)
    best_index = tl.zeros((BLOCK,), tl.int64) - 1
    for split in range(0, n_splits):
        state_ptr = states_ptr + split * n_rows + rows
        # Rows of an all-ignored tile hold the empty state (m = -inf); others are never empty.
        m_k = tl.load(state_ptr, mask=scored, other=0.0)
        r_k = tl.load(state_ptr + plane, mask=scored, other=0.0)
        new_max = m_k > m
        m_new = tl.maximum(m, m_k)
        scale = tl.exp(m - m_new)
        scale_k = tl.exp(m_k - m_new)
        if WITH_ENTROPY:
            t_k = tl.load(state_ptr + 2 * plane, mask=scored, other=0.0)
            shift = tl.where(m > neg_inf, m - m_new, 0.0)
            t = scale * (t + (1.0 + r) * shift) + scale_k * (t_k + (1.0 + r_k) * (m_k - m_new))
        if WITH_SUM_SQ:
            r2_k = tl.load(state_ptr + 3 * plane, mask=scored, other=0.0)
            r2 = tl.where(new_max, r2_k + scale * scale * (1.0 + r2), r2 + scale_k * scale_k * (1.0 + r2_k))
        if WITH_MEAN:
            z_sum += tl.load(state_ptr + 4 * plane, mask=scored, other=0.0)
        if WITH_TOP1:
            best_k = tl.load(best_index_ptr + split * n_rows + rows, mask=scored, other=-1)
            best_index = tl.where(new_max, best_k, best_index)
        label_z += tl.load(state_ptr + 5 * plane, mask=scored, other=0.0)
        r = tl.where(new_max, r_k + scale * (1.0 + r), r + scale_k * (1.0 + r_k))
        m = m_new

    log_s = tl.where(scored, log1p(r), 0.0)
    # log1p(r) >= 0 and z_y <= m make every log-prob <= 0 by construction.
    logp = tl.minimum(label_z - m, 0.0) - log_s
    tl.store(logps_ptr + rows, tl.where(scored, logp, 0.0), mask=in_rows)
    tl.store(lse_ptr + rows, tl.where(scored, m + log_s, 0.0), mask=in_rows)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(scored, log_s - t / (1.0 + r), 0.0), mask=in_rows)
    if WITH_SUM_SQ:
        tl.store(log_sum_sq_ptr + rows, tl.where(scored, log1p(r2) - 2.0 * log_s, 0.0), mask=in_rows)
    if WITH_MEAN:
        tl.store(mean_logits_ptr + rows, tl.where(scored, z_sum / vocab_size, 0.0), mask=in_rows)
    if WITH_TOP1:
        tl.store(is_top1_ptr + rows, scored & (best_index == labels), mask=in_rows)


def merge_states(
    states: torch.Tensor,
    best_index: torch.Tensor,
    labels: torch.Tensor,
    outputs: list[torch.Tensor | None],
    *,
    ignore_index: int,
    vocab_size: int,
) -> None:
    """Write ``outputs`` = [logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1] ([N]
    contiguous float32, is_top1 bool; None: not computed) from ``states`` [STATES, splits, N]
    float32 and ``best_index`` [splits, N] int64; labels [N] int32/int64, contiguous."""
    logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1 = outputs
    splits, rows = best_index.shape
    _linear_token_stats_merge_kernel[(triton.cdiv(rows, _BLOCK),)](
        states, best_index, labels, logps, lse,
        lse if entropy is None else entropy,
        lse if mean_logits is None else mean_logits,
        lse if log_sum_sq_probs is None else log_sum_sq_probs,
        lse if is_top1 is None else is_top1,
        rows, splits, splits * rows, vocab_size, ignore_index,
        WITH_ENTROPY=entropy is not None,
        WITH_MEAN=mean_logits is not None,
        WITH_SUM_SQ=log_sum_sq_probs is not None,
        WITH_TOP1=is_top1 is not None,
        BLOCK=_BLOCK,
    )
