"""The memory-efficient PyTorch fallback: the same outputs and gradients as the Triton kernels,
computed over chunks of rows so that no [tokens, V] float32 tensor ever exists.

Each chunk holds at most ``CHUNK_BYTES`` of float32 per temporary (a handful are alive at once),
whatever the number of tokens. It runs on any device PyTorch supports; it is the ``"torch"``
backend and the one ``"auto"`` picks where Triton cannot run.
"""

import torch

from .transform import chain_through_transform_, transformed_logits

CHUNK_BYTES = 8 << 20


def rows_per_chunk(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def rounding_residual(m: torch.Tensor, log_s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(m + log_s) - lse, exact, for lse = m + log_s rounded (Fast2Sum, the larger magnitude
    first); 0 where lse is not finite. The backward's p = exp((z - lse) - residual) then keeps
    float32 rounding of z - m at large |z| (see kernels/token_stats_fwd.py)."""
    m_larger = m.abs() >= log_s.abs()
    larger = torch.where(m_larger, m, log_s)
    smaller = torch.where(m_larger, log_s, m)
    return torch.where(lse.isfinite(), smaller - (lse - larger), 0.0)


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
    """Fill the per-row outputs for ``logits`` [rows, V] (same contract as the Triton launcher)."""
    rows, vocab_size = logits.shape
    step = rows_per_chunk(vocab_size)
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        label = labels[chunk].long()
        scored = label != ignore_index
        z = transformed_logits(logits[chunk], temperature, softcap)
        if mean_logits is not None:
            mean_logits[chunk] = torch.where(scored, z.mean(-1), 0.0)
        top = z.argmax(-1, keepdim=True)
        if is_top1 is not None:
            is_top1[chunk] = scored & (top.squeeze(-1) == label)
        label_z = z.gather(-1, torch.where(scored, label, 0).unsqueeze(-1)).squeeze(-1)
        m = z.gather(-1, top).squeeze(-1)
        # A row of -inf logits has no finite maximum; shifting by 0 keeps its sums NaN-free, and
        # log s is NaN below (no distribution, as on every backend). A NaN logit wins the argmax:
        # m stays NaN so that the whole row is NaN (the NaN column is scattered out of the sums).
        no_finite_logit = m == float("-inf")
        m = torch.where(no_finite_logit, 0.0, m)
        shifted = z.sub_(m.unsqueeze(-1))
        # The maximum's own term exp(0) = 1 is kept out of the sums, s = 1 + r, so that a
        # peaked row keeps the relative precision of log s = log1p(r) (see the Triton kernel).
        e_rest = shifted.exp().scatter_(-1, top, 0.0)
        r = e_rest.sum(-1)
        log_s = torch.where(no_finite_logit, float("nan"), r.log1p())
        logps[chunk] = torch.where(scored, label_z - m - log_s, 0.0)
        row_lse = m + log_s
        lse[chunk] = torch.where(scored, row_lse, 0.0)
        if lse_residual is not None:
            lse_residual[chunk] = torch.where(scored, rounding_residual(m, log_s, row_lse), 0.0)
        if entropy is not None:
            # e * (z - m) -> 0 for a -inf logit, not 0 * -inf; the maximum's term is 0 anyway.
            t = torch.where(e_rest > 0, e_rest * shifted, 0.0).sum(-1)
            entropy[chunk] = torch.where(scored, log_s - t / (1.0 + r), 0.0)
        if log_sum_sq_probs is not None:
            log_s2 = e_rest.square_().sum(-1).log1p()
            log_sum_sq_probs[chunk] = torch.where(scored, log_s2 - 2.0 * log_s, 0.0)


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
    lse_residual: torch.Tensor | None = None,
) -> None:
    """Write the gradient for ``logits`` [rows, V] into ``grad_logits`` [rows, V], which may be
    ``logits`` itself (same contract and formulas as the Triton launcher)."""
    rows, vocab_size = logits.shape
    step = rows_per_chunk(vocab_size)
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        label = labels[chunk].long()
        scored = label != ignore_index
        x = logits[chunk]
        z = transformed_logits(x, temperature, softcap)
        log_p = z.sub_(lse[chunk].unsqueeze(-1))
        if lse_residual is not None:
            log_p.sub_(lse_residual[chunk].unsqueeze(-1))
        p = log_p.exp()
        g = torch.where(scored, grad_logps[chunk], 0.0).unsqueeze(-1)
        dz = p * -g
        dz.scatter_add_(-1, torch.where(scored, label, 0).unsqueeze(-1), g.to(dz.dtype))
        if grad_entropy is not None:
            weight = log_p.add_(entropy[chunk].unsqueeze(-1)).mul_(p)
            dz -= torch.where(p > 0, weight, 0.0) * grad_entropy[chunk].unsqueeze(-1)
        if grad_mean_logits is not None:
            dz += (grad_mean_logits[chunk] / vocab_size).unsqueeze(-1)
        if grad_log_sum_sq_probs is not None:
            inv_sum_sq = log_sum_sq_probs[chunk].neg().exp().unsqueeze(-1)
            g_sq = grad_log_sum_sq_probs[chunk].unsqueeze(-1)
            dz += (p * inv_sum_sq - 1.0).mul_(p).mul_(2.0 * g_sq)
        chain_through_transform_(dz, x, temperature, softcap)
        grad_logits[chunk] = dz.masked_fill_(~scored.unsqueeze(-1), 0.0)
