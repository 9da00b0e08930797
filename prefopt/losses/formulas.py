"""The reference formula of every preference loss, in plain PyTorch on per-sequence ``[B]`` vectors.

Every loss of the package is written here once, each with its derivation or its source beside
it; the fused kernels (``prefopt/kernels/preference_loss.py``, ``csrc/preference_loss.cu``) are checked
against these functions, derive their gradients from their own one copy of each formula (dual
numbers), and point here for the reasoning. Inputs are validated by :mod:`prefopt.losses.api`.

Notation: c, r are the chosen and rejected log-ratios (policy minus reference log-prob of one
completion), Δ = c - r, m the optional per-pair margin, z = βΔ - m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_LN2 = math.log(2.0)

# TRL's α-divergence clamps the exponent (α-1)·x at 80 so that exp stays finite in float32 (and
# bfloat16); prefopt applies the same bound in every dtype, so the float64 reference is the
# oracle of the float32 kernels.
ALPHA_DIVERGENCE_MAX_EXPONENT = 80.0
# Below this distance from 1, α-divergence is its limit, reverse KL (TRL's threshold).
ALPHA_DIVERGENCE_LIMIT = 1e-6


def token_counts(lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Lengths in ``like``'s dtype, at least 1 token (TRL's clamp: an empty completion divides by 1)."""
    return lengths.to(like.dtype).clamp(min=1.0)


def smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """cDPO: -(1-ε)·logσ(z) - ε·logσ(-z); plain -logσ(z) at ε = 0."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
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


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, coef: float) -> torch.Tensor:
    """The score that replaces a log-ratio x = log t in the DPO loss under an f-divergence
    regularizer (f-DPO, Wang et al. 2023): f'(t), the derivative of the divergence's generator.

    * ``reverse_kl``: f(t) = t log t, f'(t) = log t + 1, the constant cancels in Δ: x (plain DPO)
    * ``forward_kl``: f(t) = -log t, f'(t) = 1 - 1/t = -expm1(-x)
    * ``js_divergence``: f'(t) = log(2t/(1+t)) = log 2 + logσ(x)
    * ``alpha_divergence`` (coefficient α): f'(t) = (t^(α-1) - 1)/(α-1) = expm1((α-1)x)/(α-1),
      the exponent clamped at 80 (TRL's float32 bound); within 1e-6 of α = 1, its limit x.
    """
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-logratios)
    if f_divergence_type == "js_divergence":
        return _LN2 + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence" and abs(coef - 1.0) >= ALPHA_DIVERGENCE_LIMIT:
        exponent = ((coef - 1.0) * logratios).clamp(max=ALPHA_DIVERGENCE_MAX_EXPONENT)
        return torch.expm1(exponent) / (coef - 1.0)
    return logratios


def sft_losses(policy_chosen_logps: torch.Tensor, chosen_counts: torch.Tensor) -> torch.Tensor:
    """TRL's ``sft`` term: the token-mean NLL of all chosen completions of the batch, -Σc / Σlen_c
    (c the policy's summed log-probs), the same value for every pair (TRL's expanded scalar), so
    its mean is that NLL."""
    value = -policy_chosen_logps.sum() / chosen_counts.sum()
    return value.expand(policy_chosen_logps.shape)


def dpo_pair_losses(
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
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """One DPO loss type per pair (see :func:`prefopt.losses.dpo_loss` for the list). The types
    that TRL lets an f-divergence change (sigmoid, robust, hinge, ipo, exo_pair, discopop,
    sigmoid_norm) see the log-ratios through :func:`f_divergence_scores`; the others see them as
    they are."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (chosen_scores - rejected_scores) - margin

    if kind == "sigmoid":
        return smoothed_logistic(z, eps)
    if kind == "robust":
        # Unbiased under labels flipped with probability ε (rDPO, Chowdhury et al. 2024, eq. 6).
        return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    if kind == "hinge":
        return F.relu(1.0 - z)
    if kind == "ipo":
        if lengths is None:
            h = chosen_scores - rejected_scores
        else:
            h = chosen_scores / lengths[0] - rejected_scores / lengths[1]
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
        return smoothed_logistic(beta * d, eps)
    if kind == "aot_unpaired":
        d = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
        return smoothed_logistic(beta * d, eps)
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
        z_norm = beta * (chosen_scores / lengths[0] - rejected_scores / lengths[1]) - margin
        return -F.logsigmoid(z_norm)
    if kind == "sft":
        assert lengths is not None  # guaranteed by dpo_loss's validation
        return sft_losses(policy_chosen_logps, lengths[0])
    raise AssertionError(f"unhandled loss_type {kind!r}")  # DPO_LOSS_TYPES and this chain disagree


def dpo_losses(
    types: Sequence[str],
    weights: Sequence[float],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    pair_weights: torch.Tensor | None = None,
    sft_chosen_logps: torch.Tensor | None = None,
    **constants,
) -> torch.Tensor:
    """Σ_k weights[k] · w · dpo_pair_losses(types[k]), summed in list order (TRL's MPO-style
    combination), with w the detached per-pair weight (WPO) or 1. ``sft`` reads
    ``sft_chosen_logps`` when given."""
    total = None
    for kind, weight in zip(types, weights):
        chosen = sft_chosen_logps if kind == "sft" and sft_chosen_logps is not None else policy_chosen_logps
        term = dpo_pair_losses(kind, chosen, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **constants)
        if pair_weights is not None:
            term = term * pair_weights
        total = weight * term if total is None else total + weight * term
    assert total is not None  # at least one type, checked by dpo_loss
    return total


def wpo_weights(mean_aligned_logps: torch.Tensor) -> torch.Tensor:
    """WPO (Zhou et al. 2024, eq. 2) as TRL computes it: exp of the per-token mean of
    log p(y_t) - log Σ_v p(v)², over the completion, detached: how likely the completion is under
    the current policy, measured against the policy's own sampling distribution."""
    return torch.exp(mean_aligned_logps.detach())


def kto_losses(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: float | torch.Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 7) with s = β(r - z₀): λ_D·(1 - σ(s)) for a desirable
    example, λ_U·(1 - σ(-s)) otherwise; apo_zero_unpaired is z₀ = 0."""
    s = beta * (logratios - reference_point)
    # σ(-s) is the 1 - σ(s) of the paper without its cancellation.
    value = torch.sigmoid(torch.where(desirable, -s, s))
    return torch.where(desirable, desirable_weight * value, undesirable_weight * value)


def alphapo_rewards(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO (Gupta et al. 2025): the reward (1 - p^(-α))/α of p = e^x, written -expm1(-αx)/α;
    its limit at α = 0 is x itself."""
    if alpha == 0.0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def cpo_pair_losses(
    kind: str, chosen: torch.Tensor, rejected: torch.Tensor, *, beta: float, eps: float, simpo_gamma: float
) -> torch.Tensor:
    """CPO's preference term (Xu et al. 2024) on h = chosen - rejected (log-probs, AlphaPO
    rewards, or their per-token averages for ipo and simpo): sigmoid -(1-ε)·logσ(βh) - ε·logσ(-βh),
    hinge max(0, 1 - βh), ipo (h - 1/(2β))², simpo (SimPO, Meng et al. 2024, with γ in loss
    units) -(1-ε)·logσ(βh - γ) - ε·logσ(γ - βh)."""
    h = chosen - rejected
    if kind == "sigmoid":
        return smoothed_logistic(beta * h, eps)
    if kind == "hinge":
        return F.relu(1.0 - beta * h)
    if kind == "ipo":
        return (h - 0.5 / beta) ** 2
    return smoothed_logistic(beta * h - simpo_gamma, eps)


def cpo_nll_losses(policy_chosen_logps: torch.Tensor, chosen_counts: torch.Tensor, cpo_alpha: float) -> torch.Tensor:
    """Pair i's share α·B·(-c_i)/Σlen_c of CPO's token-mean NLL over all chosen completion tokens,
    so that the mean over the batch is α times that NLL."""
    batch = policy_chosen_logps.shape[0]
    return -cpo_alpha * batch * policy_chosen_logps / chosen_counts.sum()


def orpo_log_odds(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eqs. 4 and 7): log(p_c/(1-p_c)) - log(p_r/(1-p_r)) of p = e^x, with
    the stable :func:`log1mexp`."""
    return (policy_chosen_logps - log1mexp(policy_chosen_logps)) - (
        policy_rejected_logps - log1mexp(policy_rejected_logps)
    )

