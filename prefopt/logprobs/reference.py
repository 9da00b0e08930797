"""The plain-PyTorch oracle: per-token statistics with ordinary autograd.

It materializes the whole [tokens, V] log-softmax, so it is the memory wall prefopt removes; it
exists to define the results the other backends are checked against. With float64 logits it
computes (and returns) float64; every other dtype is computed in float32.
"""

import torch
import torch.nn.functional as F

from .._types import TokenStats
from .transform import scored_logits


def reference_token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    stats: frozenset[str],
) -> TokenStats:
    """TokenStats of ``logits`` [..., V] at ``labels`` [...], differentiable by autograd."""
    scored = labels != ignore_index
    z = scored_logits(logits, scored, temperature, softcap)
    log_p = F.log_softmax(z, dim=-1)
    safe_labels = torch.where(scored, labels, 0).long().unsqueeze(-1)

    def masked(value: torch.Tensor) -> torch.Tensor:
        return torch.where(scored, value, torch.zeros_like(value))

    logps = masked(log_p.gather(-1, safe_labels).squeeze(-1))
    entropy = mean_logits = log_sum_sq_probs = is_top1 = None
    if "entropy" in stats:
        p = log_p.exp()
        # p log p -> 0 as p -> 0. log p is replaced before the product, not after, so that a -inf
        # logit gives neither 0 * -inf = NaN nor a NaN gradient.
        entropy = masked(-(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1))
    if "mean_logits" in stats:
        mean_logits = masked(z.mean(-1))
    if "log_sum_sq_probs" in stats:
        log_sum_sq_probs = masked(torch.logsumexp(2.0 * log_p, dim=-1))
    if "is_top1" in stats:
        # torch.argmax returns the first maximal index: ties go to the earlier token.
        is_top1 = scored & (z.argmax(-1) == labels)
    return TokenStats(logps, entropy, mean_logits, log_sum_sq_probs, is_top1)
