"""The reference formula of every preference loss, in plain PyTorch on per-sequence ``[B]`` vectors.

Every loss of the package is written here once; the fused kernels are checked against these
functions and are never a second hand copy of the math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


_LN2 = math.log(2.0)


def _token_counts(lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Lengths in ``like``'s dtype, at least 1 token (TRL's clamp: an empty completion divides by 1)."""
    return lengths.to(like.dtype).clamp(min=1.0)


# --------------------------------------------------------------------------------------------
# Shared pieces of math.
# --------------------------------------------------------------------------------------------


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """cDPO: -(1-ε)·logσ(z) - ε·logσ(-z); plain -logσ(z) at ε = 0."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Mächler's split at -ln 2).

    Near 0, 1 - exp(x) cancels, so -expm1(x) is used; far below, exp(x) is tiny and log1p keeps
    it. Each branch only sees inputs from its own side of -ln 2: torch.where still backpropagates
    through the branch it drops, and an inf there would turn the gradient into NaN. x = 0
    (probability 1) has infinite log-odds: x is clamped to -finfo.tiny, the negative normal
    float nearest 0, which keeps value and gradient finite.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near_zero, far)



def _dpo_pair_losses(
    kind: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    eps: float,
    margin: float | torch.Tensor,
    lengths: tuple[torch.Tensor, torch.Tensor] | None,
    bco_delta: float | torch.Tensor,
    discopop_tau: float,
) -> torch.Tensor:
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    z = beta * (chosen_logratios - rejected_logratios) - margin

    if kind == "sigmoid":
        return _smoothed_logistic(z, eps)
    if kind == "robust":
        # Unbiased under labels flipped with probability ε (rDPO, Chowdhury et al. 2024, eq. 6).
        return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    if kind == "hinge":
        return F.relu(1.0 - z)
    if kind == "ipo":
        if lengths is None:
            h = chosen_logratios - rejected_logratios
        else:
            h = chosen_logratios / lengths[0] - rejected_logratios / lengths[1]
        # (βh - margin - 1/2)² / β², i.e. the paper's (h - 1/(2β))² with the margin inside βh.
        return (h - (margin + 0.5) / beta) ** 2
    if kind == "exo_pair":
        # KL(p_θ || p_label) over {chosen, rejected}, p_θ = (σ(z), σ(-z)), p_label = (1-ε, ε).
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
    if kind == "nca_pair":
        chosen_reward = beta * chosen_logratios
        rejected_reward = beta * rejected_logratios
        return (
            -F.logsigmoid(chosen_reward)
            - 0.5 * F.logsigmoid(-chosen_reward)
            - 0.5 * F.logsigmoid(-rejected_reward)
        )
    if kind == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios - bco_delta) - F.logsigmoid(bco_delta - beta * rejected_logratios)
    if kind == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if kind == "aot":
        # Optimal transport between the batch distributions of policy and reference log-ratio
        # margins: compare them quantile by quantile, i.e. sorted, not pair by pair.
        d = torch.sort(policy_chosen_logps - policy_rejected_logps).values - torch.sort(
            ref_chosen_logps - ref_rejected_logps
        ).values
        return _smoothed_logistic(beta * d, eps)
    if kind == "aot_unpaired":
        d = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
        return _smoothed_logistic(beta * d, eps)
    if kind == "apo_zero":
        # 1 - σ(x) written as σ(-x), which keeps its precision when σ(x) is close to 1.
        return torch.sigmoid(-beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    if kind == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(-z)
    if kind == "discopop":
        # (1 - σ(z/τ))·(-logσ(z)) + σ(z/τ)·exp(-z). The second product is formed in log space:
        # exp(-z) overflows long before σ(z/τ) underflows, and inf·0 would be NaN.
        return -F.logsigmoid(z) * torch.sigmoid(-z / discopop_tau) + torch.exp(
            F.logsigmoid(z / discopop_tau) - z
        )
    if kind == "sigmoid_norm":
        assert lengths is not None  # guaranteed by dpo_loss's validation
        z_norm = beta * (chosen_logratios / lengths[0] - rejected_logratios / lengths[1]) - margin
        return -F.logsigmoid(z_norm)
    raise AssertionError(f"unhandled loss_type {kind!r}")  # DPO_LOSS_TYPES and this chain disagree

