"""The memory-efficient PyTorch fallback: the same outputs and gradients as the Triton kernels,
computed over chunks of rows so that no [tokens, V] float32 temporary ever exists.

A chunk is a [rows, V] float32 buffer (float64 for float64 inputs), whole vocabulary rows, so
that each statistic is one reduction and each product of the fused linear path is a GEMM of
hundreds of rows. Its size scales with the problem within a stated bound (``rows_per_chunk``):
``1 / fraction`` of the problem's [tokens, V] float32 logits, at least ``MIN_CHUNK_BYTES`` (small
problems take one or a few chunks) and at most ``MAX_CHUNK_BYTES`` (huge ones keep a bounded
footprint). The work on a chunk happens in place in that buffer, with at most two more buffers
of its size alive (the entropy and softcap terms, ``row_stats_`` and ``row_gradient_``), so
memory is at most three chunks whatever the number of tokens.

It runs on any device PyTorch supports; it is the ``"torch"`` backend and the one ``"auto"``
picks where Triton cannot run. ``prefopt.logprobs.linear``'s torch backend runs the same two
row functions on the chunks of logits it computes.
"""

from typing import NamedTuple

import torch

Tensor = torch.Tensor

MIN_CHUNK_BYTES = 8 << 20
MAX_CHUNK_BYTES = 256 << 20
# The logits path keeps a chunk at 1/16 of its logits: its in-place backward promises an extra
# footprint within 10% of them (benches/test_memory.py), and its forward needs one scratch chunk.
LOGITS_PATH_FRACTION = 16
# exp(-1e4) is 0 in float64 (and float32); moderate enough that a times it stays finite.
LOG_P_FLOOR = -1e4


def rows_per_chunk(rows: int, vocab_size: int, fraction: int = LOGITS_PATH_FRACTION) -> int:
    """Rows of a [rows, V] float32 chunk of ``1 / fraction`` of the [rows, V] logits, within
    [MIN_CHUNK_BYTES, MAX_CHUNK_BYTES]; at least 1, at most ``rows``."""
    budget = min(max(rows * vocab_size * 4 // fraction, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
    return max(1, min(rows, budget // (4 * vocab_size)))


def rounding_residual(m: Tensor, log_s: Tensor, lse: Tensor) -> Tensor:
    """(m + log_s) - lse, exact, for lse = m + log_s rounded (Fast2Sum, the larger magnitude
    first); 0 where lse is not finite. The backward's p = exp((z - lse) - residual) then keeps
    float32 rounding of z - m at large |z| (see prefopt/kernels/token_stats_fwd.py)."""
    m_larger = m.abs() >= log_s.abs()
    larger = torch.where(m_larger, m, log_s)
    smaller = torch.where(m_larger, log_s, m)
    return torch.where(lse.isfinite(), smaller - (lse - larger), 0.0)


def _column(values: Tensor) -> Tensor:
    return values.unsqueeze(-1)


def copy_scored_rows(buffer: Tensor, x: Tensor, scored: Tensor) -> None:
    """buffer = x on the rows where ``scored``, zeros elsewhere (so that NaN or inf in an ignored
    row cannot reach its outputs); one pass, ``buffer`` may be ``x`` itself."""
    if x.dtype == buffer.dtype:
        torch.where(_column(scored), x, buffer.new_zeros(()), out=buffer)
    else:
        buffer.copy_(x).masked_fill_(_column(~scored), 0.0)


def _transform_(x: Tensor, temperature: float, softcap: float | None) -> Tensor:
    """z = softcap(x) / T over ``x`` (the order of ``reference.transformed_logits``)."""
    if softcap is not None:
        x.div_(softcap).tanh_().mul_(softcap)
    return x.div_(temperature) if temperature != 1.0 else x


def row_stats_(
    x: Tensor,
    labels: Tensor,
    logps: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    mean_logits: Tensor | None,
    log_sum_sq_probs: Tensor | None,
    is_top1: Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    lse_residual: Tensor | None = None,
) -> None:
    """Fill the [rows] outputs from the logits ``x`` [rows, V] (float32/64, contiguous rows),
    which are overwritten: the buffer is the caller's scratch. Formulas of the Triton kernel;
    ``lse_residual``, when given, receives lse's rounding error (``rounding_residual``)."""
    label = labels.long()
    scored = label != ignore_index
    z = _transform_(x, temperature, softcap)
    if mean_logits is not None:
        mean_logits.copy_(torch.where(scored, z.mean(-1), 0.0))
    m, top = z.max(-1, keepdim=True)  # the first maximal index: ties go to the earlier token
    if is_top1 is not None:
        is_top1.copy_(scored & (top.squeeze(-1) == label))
    label_z = z.gather(-1, _column(torch.where(scored, label, 0))).squeeze(-1)
    m = m.squeeze(-1)
    # A row of -inf logits has no finite maximum; shifting by 0 keeps its sums NaN-free, and
    # log s is NaN below (no distribution, as on every backend). A NaN logit wins the max: m
    # stays NaN so that the whole row is NaN.
    no_finite_logit = m == float("-inf")
    m = torch.where(no_finite_logit, 0.0, m)
    shifted = z.sub_(_column(m))
    # The maximum's own term exp(0) = 1 is kept out of the sums, s = 1 + r, so that a peaked
    # row keeps the relative precision of log s = log1p(r) (see the Triton kernel). Without the
    # entropy the shifted logits are not needed again and become their exponentials in place.
    e_rest = shifted.exp() if entropy is not None else shifted.exp_()
    e_rest.scatter_(-1, _column(top.squeeze(-1)), 0.0)
    r = e_rest.sum(-1)
    log_s = torch.where(no_finite_logit, float("nan"), r.log1p())
    logps.copy_(torch.where(scored, label_z - m - log_s, 0.0))
    row_lse = m + log_s
    lse.copy_(torch.where(scored, row_lse, 0.0))
    if lse_residual is not None:
        lse_residual.copy_(torch.where(scored, rounding_residual(m, log_s, row_lse), 0.0))
    if entropy is not None:
        # e * (z - m) -> 0 for a -inf logit, not 0 * -inf: -inf is clamped to the lowest finite
        # value (whose e is 0) and a NaN stays NaN. The maximum's term is 0 anyway.
        t = shifted.clamp_(min=torch.finfo(shifted.dtype).min).mul_(e_rest).sum(-1)
        entropy.copy_(torch.where(scored, log_s - t / (1.0 + r), 0.0))
    if log_sum_sq_probs is not None:
        log_s2 = e_rest.square_().sum(-1).log1p()
        log_sum_sq_probs.copy_(torch.where(scored, log_s2 - 2.0 * log_s, 0.0))


class GradientCoefficients(NamedTuple):
    """Per-row [rows] coefficients of the logits gradient (see ``gradient_coefficients``); b and c
    are None where their term is absent."""

    g: Tensor
    a: Tensor
    b: Tensor | None
    c: Tensor | None
    d: Tensor | None


def gradient_coefficients(
    labels: Tensor,
    entropy: Tensor | None,
    log_sum_sq_probs: Tensor | None,
    grad_logps: Tensor,
    grad_entropy: Tensor | None,
    grad_mean_logits: Tensor | None,
    grad_log_sum_sq_probs: Tensor | None,
    *,
    ignore_index: int,
    vocab_size: int,
    scale: float = 1.0,
) -> GradientCoefficients:
    """The coefficients of dz, the gradient with respect to z = softcap(x) / T, for p = exp(z - lse)
    and per-row upstream gradients g (log-prob), g_H (entropy), g_m (mean logit), g_2 (log sum
    p^2, whose value is log S2):

        dz = g onehot + p (a + b log p + c p) + d,
        a = -g - g_H H - 2 g_2,  b = -g_H,  c = 2 g_2 / S2,  d = g_m / V,

    the gradients of log p_y, H = -sum p log p, mean z and log sum p^2, all times ``scale``
    (every term is linear in the upstream gradients). Ignored rows get zeros."""
    scored = labels.long() != ignore_index

    def upstream(grad: Tensor | None) -> Tensor | None:
        return None if grad is None else torch.where(scored, grad, 0.0) * scale

    g, g_entropy, g_mean, g_sq = map(upstream, (grad_logps, grad_entropy, grad_mean_logits, grad_log_sum_sq_probs))
    a = -g
    if g_entropy is not None:
        a = a - g_entropy * entropy
    c = None
    if g_sq is not None:
        a = a - 2.0 * g_sq
        c = 2.0 * g_sq * log_sum_sq_probs.neg().exp()
    return GradientCoefficients(g, a, None if g_entropy is None else -g_entropy, c,
                                None if g_mean is None else g_mean / vocab_size)


def row_gradient_(
    x: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    log_sum_sq_probs: Tensor | None,
    grad_logps: Tensor,
    grad_entropy: Tensor | None,
    grad_mean_logits: Tensor | None,
    grad_log_sum_sq_probs: Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    lse_residual: Tensor | None = None,
) -> Tensor:
    """Overwrite the logits ``x`` [rows, V] (float32/64, contiguous rows) with d(outputs)/dx and
    return it; log p = (z - lse) - lse_residual where the forward gave the residual. Rows whose label is ignored must hold finite logits or zeros (the callers zero
    them or never multiply them); they get exact zeros.

    dz is that of ``gradient_coefficients``; dz/dx = dz * softcap'(x) / T takes 1/T on the
    coefficients ([rows], not [rows, V]), and softcap'(x) = 1 - tanh(x / c)^2.
    """
    label = labels.long()
    scored = label != ignore_index
    g, a, b, c, d = (None if t is None else _column(t) for t in gradient_coefficients(
        labels, entropy, log_sum_sq_probs, grad_logps, grad_entropy, grad_mean_logits, grad_log_sum_sq_probs,
        ignore_index=ignore_index, vocab_size=x.shape[-1], scale=1.0 / temperature))
    tanh = None
    if softcap is None:
        log_p = (x.div_(temperature) if temperature != 1.0 else x).sub_(_column(lse))
    else:
        # tanh(x / c) stays in x's buffer for the chain; log p in a second one.
        tanh = x.div_(softcap).tanh_()
        log_p = torch.add(_column(-lse), tanh, alpha=softcap / temperature)
    if lse_residual is not None:
        log_p.sub_(_column(lse_residual))
    if b is None:
        p = log_p.exp_()
        # p (a + c p): the factor in a new buffer, the product over p.
        grad = p.mul_(a) if c is None else p.mul_(torch.addcmul(a, p, c))
    else:
        # p log p -> 0 as p -> 0: log p below LOG_P_FLOOR (where p is exactly 0 in float32 and
        # float64) is raised to it, so that a -inf logit gives p * finite = 0, not 0 * inf.
        log_p.clamp_(min=LOG_P_FLOOR)
        p = log_p.exp()
        factor = torch.addcmul(a, log_p, b, out=log_p)
        if c is not None:
            factor.addcmul_(p, c)
        grad = factor.mul_(p)
        del p
    if d is not None:
        grad.add_(d)
    grad.scatter_add_(-1, _column(torch.where(scored, label, 0)), g.to(grad.dtype))
    if tanh is not None:
        # d softcap(x)/dx = 1 - tanh^2: grad - grad tanh^2, written over the tanh buffer (x's).
        grad = torch.addcmul(grad, grad, tanh.square_(), value=-1.0, out=tanh)
    return grad


def token_stats_forward(
    logits: Tensor,
    labels: Tensor,
    logps: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    mean_logits: Tensor | None,
    log_sum_sq_probs: Tensor | None,
    is_top1: Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    lse_residual: Tensor | None = None,
) -> None:
    """Fill the per-row outputs for ``logits`` [rows, V] (same contract as the Triton launcher).
    Each chunk of rows is copied (as float32/64, ignored rows as zeros, so that NaN there cannot
    reach anything) into one scratch buffer, reused from chunk to chunk."""
    rows, vocab_size = logits.shape
    step = rows_per_chunk(rows, vocab_size)
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scratch = logits.new_empty(min(step, rows), vocab_size, dtype=compute_dtype)
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        label = labels[chunk]
        buffer = scratch[: label.shape[0]]
        copy_scored_rows(buffer, logits[chunk], label != ignore_index)
        row_stats_(buffer, label, logps[chunk], lse[chunk],
                   *(None if t is None else t[chunk] for t in (entropy, mean_logits, log_sum_sq_probs, is_top1)),
                   ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                   lse_residual=None if lse_residual is None else lse_residual[chunk])


def token_stats_backward(
    logits: Tensor,
    grad_logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    log_sum_sq_probs: Tensor | None,
    grad_logps: Tensor,
    grad_entropy: Tensor | None,
    grad_mean_logits: Tensor | None,
    grad_log_sum_sq_probs: Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    lse_residual: Tensor | None = None,
) -> None:
    """Write the gradient for ``logits`` [rows, V] into ``grad_logits`` [rows, V], which may be
    ``logits`` itself (same contract and formulas as the Triton launcher).

    float32/64 logits are turned into their gradient in the destination's rows themselves (one
    pass copies them there, ignored rows as zeros, when it is not the logits), so the in-place
    backward does the same work as the out-of-place one and allocates nothing [rows, V]; bf16/fp16
    go through a float32 scratch chunk."""
    rows, vocab_size = logits.shape
    step = rows_per_chunk(rows, vocab_size)
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    direct = grad_logits.dtype == compute_dtype
    scratch = None if direct else logits.new_empty(min(step, rows), vocab_size, dtype=compute_dtype)
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        label = labels[chunk]
        buffer = grad_logits[chunk] if direct else scratch[: label.shape[0]]
        copy_scored_rows(buffer, logits[chunk], label != ignore_index)
        grad = row_gradient_(buffer, label, lse[chunk],
                             *(None if t is None else t[chunk] for t in (entropy, log_sum_sq_probs, grad_logps,
                                                                          grad_entropy, grad_mean_logits,
                                                                          grad_log_sum_sq_probs)),
                             ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                             lse_residual=None if lse_residual is None else lse_residual[chunk])
        if not direct:
            grad_logits[chunk] = grad
