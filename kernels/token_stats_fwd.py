"""Forward: per-token log-probability of the label, and optional softmax statistics, in one pass.

For a row of transformed logits z (see ``_common.transform_logits``) and its label y, streamed
over the vocabulary in blocks with an online maximum m and rescaled sums:

    s  = sum_j exp(z_j - m) = 1 + r                 lse     = m + log1p(r)
    t  = sum_j exp(z_j - m) (z_j - m)               entropy = log1p(r) - t / s
    s2 = sum_j exp(z_j - m)^2 = 1 + r2              log sum_j p_j^2 = log1p(r2) - 2 log1p(r)
    log p_y = (z_y - m) - log1p(r)                  mean logit = sum_j z_j / V
    is_top1 = (first argmax_j z_j) == y

The maximum's own term exp(0) = 1 is kept out of the running sums r and r2: on a peaked row
(p_max ~ 1) r is tiny, and 1 + r in float32 would lose it, and with it the relative precision of
log p, the entropy and log sum p^2. When a block raises the maximum from m to m', earlier sums
are rescaled by a = exp(m - m'): s <- a s (so r <- a (1 + r) - 1, the new maximum bringing the
new 1), s2 <- a^2 s2, and t <- a (t + s (m - m')) because every earlier z_j - m shifts by m - m'.
A scored row with no finite logit (all -inf) has no distribution: its log-prob, lse, entropy and
log sum p^2 are NaN (its mean logit is -inf), and a NaN logit makes every statistic of its row NaN,
as on every backend. A row whose label is ``ignore_index`` runs zero iterations: it is never read,
and all its outputs are 0.

The backward pass keeps lse and its rounding residual lse_residual = (m + log s) - lse, exact
(float32, one each per row): p_j = exp((z_j - lse) - lse_residual). At large |z| a float32 lse is
off by up to half an ulp of |m| (2^-9 at |z| = 65536), an error every p_j would inherit; z_j - lse
is exact wherever p_j is not negligible (Sterbenz), so the residual brings p_j back to float32
rounding of z_j - m.
"""

import torch
import triton
import triton.language as tl

from ._common import log1p, lse_and_residual, transform_logits

_MAX_BLOCK_V = 8192


@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logps_ptr,
    lse_ptr,
    lse_residual_ptr,
    entropy_ptr,
    mean_logits_ptr,
    log_sum_sq_ptr,
    is_top1_ptr,
    inner_size,
    stride_outer,
    stride_inner,
    vocab_size,
    ignore_index,
    inv_temperature,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WITH_RESIDUAL: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_MEAN: tl.constexpr,
    WITH_SUM_SQ: tl.constexpr,
    WITH_TOP1: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # 64-bit offsets: rows x vocab passes 2^31 at 16k tokens of a 128k vocabulary.
    row_ptr = logits_ptr + (row // inner_size) * stride_outer + (row % inner_size) * stride_inner
    label = tl.load(labels_ptr + row).to(tl.int64)
    scored = label != ignore_index
    num_blocks = tl.where(scored, tl.cdiv(vocab_size, BLOCK_V), 0)

    # Labels were validated before launch; the bounds test only keeps a bad one from reading
    # outside the row.
    in_row = scored & (label >= 0) & (label < vocab_size)
    label_x = tl.load(row_ptr + tl.where(in_row, label, 0), mask=in_row, other=0.0).to(tl.float32)
    label_z = transform_logits(label_x, inv_temperature, softcap, HAS_SOFTCAP)

    neg_inf = float("-inf")
    m = tl.full((), neg_inf, tl.float32)
    r = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    r2 = tl.zeros((), tl.float32)
    z_sum = tl.zeros((), tl.float32)
    best_index = tl.zeros((), tl.int64) - 1
    for block in range(0, num_blocks):
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        in_vocab = cols < vocab_size
        x = tl.load(row_ptr + cols, mask=in_vocab, other=0.0).to(tl.float32)
        z = tl.where(in_vocab, transform_logits(x, inv_temperature, softcap, HAS_SOFTCAP), neg_inf)
        block_max = tl.max(z, 0)
        new_max = block_max > m
        m_new = tl.maximum(m, block_max)
        # A block of -inf logits (masked vocabulary) must not turn the sums into NaN.
        m_safe = tl.where(m_new > neg_inf, m_new, 0.0)
        scale = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        # The block's maximal elements are summed apart from the rest, exactly: each is
        # exp(block_max - m'), and when the block raises the maximum one of them is the 1 of s.
        at_block_max = z == block_max
        e_below = tl.where(at_block_max, 0.0, e)
        e_at_max = tl.exp(block_max - m_safe)
        extra_maxima = (tl.sum(at_block_max.to(tl.int32), 0) - new_max.to(tl.int32)).to(tl.float32)
        if WITH_ENTROPY:
            shift = tl.where(m > neg_inf, m - m_safe, 0.0)
            # Select before multiplying: a -inf logit has e = 0 and z - m = -inf.
            t = scale * (t + (1.0 + r) * shift) + tl.sum(e * tl.where(e > 0.0, z - m_safe, 0.0), 0)
        if WITH_SUM_SQ:
            r2 = tl.where(new_max, scale * scale * (1.0 + r2), r2)
            r2 += tl.sum(e_below * e_below, 0) + extra_maxima * e_at_max * e_at_max
        if WITH_MEAN:
            z_sum += tl.sum(tl.where(in_vocab, z, 0.0), 0)
        if WITH_TOP1:
            # Strictly greater: on ties the earlier block keeps the argmax, and tl.argmax keeps
            # the earliest column within a block.
            best_index = tl.where(new_max, block * BLOCK_V + tl.argmax(z, 0), best_index)
        r = tl.where(new_max, scale * (1.0 + r), r) + tl.sum(e_below, 0) + extra_maxima * e_at_max
        m = m_new

    # log1p(r) >= 0 and z_y <= m make every log-prob <= 0 by construction. The min() guards z_y
    # against a last-ulp difference between the scalar and the vector evaluation of the transform.
    # A row with no finite logit (m = -inf) has no distribution: log s = NaN makes its log-prob,
    # lse, entropy and log sum p^2 NaN, where min(NaN, 0) = 0 would have read as probability 1.
    log_s = tl.where(scored, tl.where(m > neg_inf, log1p(r), float("nan")), 0.0)
    logp = tl.minimum(label_z - m, 0.0) - log_s
    tl.store(logps_ptr + row, tl.where(scored, logp, 0.0))
    lse, lse_residual = lse_and_residual(m, log_s)
    tl.store(lse_ptr + row, tl.where(scored, lse, 0.0))
    if WITH_RESIDUAL:
        tl.store(lse_residual_ptr + row, tl.where(scored, lse_residual, 0.0))
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(scored, log_s - t / (1.0 + r), 0.0))
    if WITH_SUM_SQ:
        tl.store(log_sum_sq_ptr + row, tl.where(scored, log1p(r2) - 2.0 * log_s, 0.0))
    if WITH_MEAN:
        tl.store(mean_logits_ptr + row, tl.where(scored, z_sum / vocab_size, 0.0))
    if WITH_TOP1:
        tl.store(is_top1_ptr + row, scored & (best_index == label))


def token_stats_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logps: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    mean_logits: torch.Tensor | None,
    log_sum_sq_probs: torch.Tensor | None,
    is_top1: torch.Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    lse_residual: torch.Tensor | None = None,
) -> None:
    """Fill the per-row outputs for one block of rows.

    logits: [outer, inner, V] view (any float dtype, last dimension contiguous, other strides
    free). labels: [outer * inner] int32/int64, contiguous. Outputs: [outer * inner] contiguous,
    float32 (is_top1: bool); a statistic passed as None is not computed. lse_residual, if given
    ([outer * inner] float32), receives (m + log s) - lse, which the backward takes with lse.
    """
    outer, inner, vocab_size = logits.shape
    rows = outer * inner
    if rows == 0:
        return
    block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(vocab_size))
    _token_stats_fwd_kernel[(rows,)](
        logits,
        labels,
        logps,
        lse,
        lse if lse_residual is None else lse_residual,
        lse if entropy is None else entropy,
        lse if mean_logits is None else mean_logits,
        lse if log_sum_sq_probs is None else log_sum_sq_probs,
        lse if is_top1 is None else is_top1,
        inner,
        logits.stride(0),
        logits.stride(1),
        vocab_size,
        ignore_index,
        1.0 / temperature,
        1.0 if softcap is None else softcap,
        HAS_SOFTCAP=softcap is not None,
        WITH_RESIDUAL=lse_residual is not None,
        WITH_ENTROPY=entropy is not None,
        WITH_MEAN=mean_logits is not None,
        WITH_SUM_SQ=log_sum_sq_probs is not None,
        WITH_TOP1=is_top1 is not None,
        BLOCK_V=block_v,
        num_warps=16 if block_v >= 8192 else 8 if block_v >= 2048 else 4,
    )
