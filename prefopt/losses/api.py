"""The preference losses on per-sequence log-probabilities: validation, then the reference
formulas of :mod:`prefopt.losses.formulas` or one fused launch (:mod:`prefopt.losses.fused`).

Every function takes per-sequence vectors of shape ``[B]`` (one entry per example or per
chosen/rejected pair). The fused kernels are checked against the reference formulas.

Conventions shared by every function:

* Inputs are 1-D floating tensors of one dtype and device (float32 or float64 in practice); the
  result is computed in that dtype and is differentiable with respect to every log-prob input.
* Nothing here synchronizes with the host: there is no ``.item()`` and no Python branch on a
  tensor value, so each function traces under ``torch.compile(fullgraph=True)`` and can be
  captured in a CUDA graph. Validation looks only at shapes, dtypes, devices and Python scalars.
* ``reduction`` is ``"mean"`` (default), ``"sum"`` or ``"none"`` and applies to the per-example
  vector ``losses``; with ``"none"`` the returned ``loss`` is ``losses`` itself.
* Rewards are detached, as TRL logs them.
* ``backend`` chooses who computes the loss: ``"reference"`` is the plain PyTorch below;
  ``"triton"`` and ``"cuda"`` are one launch of the fused kernel of ``prefopt.losses.fused``
  (Triton, or the CUDA C++ extension) forward (losses, reduced loss, rewards and metrics) and one
  backward; ``"auto"`` (default) takes the fused kernel of the backend the log-prob kernels
  would run (CUDA tensors, or ``PREFOPT_BACKEND``) and the reference elsewhere. Validation always
  runs first, on the host. The fused kernels cover every type and option except ``aot`` and
  ``aot_unpaired``, which sort across the batch, and ``sft``: those stay on the reference path
  (``"auto"`` routes them there; ``"triton"`` and ``"cuda"`` raise).
* ``return_metrics=True`` also returns the batch metrics as TRL logs them, a dict of 0-d device
  tensors (no host sync: the caller decides when to read them). Pairwise losses give
  ``rewards/chosen``, ``rewards/rejected`` (batch means of the rewards), ``rewards/accuracies``
  (fraction of pairs whose chosen reward is strictly higher), ``rewards/margins`` (mean of
  chosen - rejected reward), ``logps/chosen`` and ``logps/rejected`` (means of the policy
  log-prob inputs). KTO gives the means over the desirable (``chosen``) and undesirable
  (``rejected``) examples, ``rewards/margins`` as their difference, and ``count/chosen``,
  ``count/rejected``; the mean over a class absent from the batch is NaN. ORPO adds
  ``log_odds_ratio`` (mean logσ of the log-odds ratio), ``log_odds_chosen`` (mean log-odds
  ratio) and ``nll_loss`` (mean NLL term).
* "Log-ratio" means policy minus reference log-prob of one completion; Δ is the chosen log-ratio
  minus the rejected log-ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from .. import backends
from .._codes import CPO_LOSS_TYPES, DPO_LOSS_TYPES, KTO_LOSS_TYPES, REDUCTIONS
from .._validation import (
    MARGIN_LOSS_TYPES,
    SORTING_LOSS_TYPES,
    check_constant,
    check_f_divergence,
    check_length_pair,
    check_lengths,
    check_loss_type,
    check_loss_types,
    check_pair_weights,
    check_real,
    check_reduction,
    check_smoothing,
    check_vector,
)
from . import fused as fused_losses
from .formulas import (
    alphapo_rewards,
    cpo_nll_losses,
    cpo_pair_losses,
    dpo_losses,
    kto_losses,
    orpo_log_odds,
    token_counts,
)
from .metrics import _kto_metrics, _pair_metrics

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "LOSS_BACKENDS",
    "REDUCTIONS",
    "PreferenceLossOutput",
    "cpo_loss",
    "dpo_loss",
    "ipo_loss",
    "kto_kl",
    "kto_loss",
    "orpo_loss",
    "simpo_loss",
]

LOSS_BACKENDS: tuple[str, ...] = backends.LOSS_BACKEND_CHOICES


class PreferenceLossOutput(NamedTuple):
    """What every loss returns.

    Attributes:
        loss: the reduced loss (0-d), or the ``[B]`` vector ``losses`` when ``reduction="none"``.
        losses: per-example losses, shape ``[B]``, differentiable.
        chosen_rewards: detached ``[B]`` rewards of the chosen completions (KTO: of the desirable
            examples, 0 at undesirable positions).
        rejected_rewards: detached ``[B]`` rewards of the rejected completions (KTO: of the
            undesirable examples, 0 at desirable positions).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


# --------------------------------------------------------------------------------------------
# Conversions of validated arguments; none of them reads a device value.
# --------------------------------------------------------------------------------------------


def _constant(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(like.dtype)
    return float(value)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _result(
    output: PreferenceLossOutput, metrics: dict[str, torch.Tensor] | None, return_metrics: bool
) -> PreferenceLossOutput | tuple[PreferenceLossOutput, dict[str, torch.Tensor]]:
    return (output, metrics) if return_metrics else output


# --------------------------------------------------------------------------------------------
# DPO family.
# --------------------------------------------------------------------------------------------



def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    loss_weights: Sequence[float] | None = None,
    reduction: str = "mean",
    bco_delta: float | torch.Tensor = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_weights: torch.Tensor | None = None,
    rejected_weights: torch.Tensor | None = None,
    sft_chosen_logps: torch.Tensor | None = None,
    backend: str = "auto",
    return_metrics: bool = False,
) -> PreferenceLossOutput | tuple[PreferenceLossOutput, dict[str, torch.Tensor]]:
    r"""DPO and its pairwise relatives, as TRL 1.16's ``DPOTrainer`` defines them, with one
    deliberate difference: ``sigmoid`` with ``label_smoothing`` > 0 is conservative DPO (cDPO, the
    paper's and older TRL's), where TRL 1.16's ``sigmoid`` ignores ``label_smoothing``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            ``[B]`` floating tensors (one dtype and device): summed log-probs of each pair's chosen
            and rejected completion under the policy and the reference model.
        beta: β > 0. For ``ipo`` it is the IPO paper's τ.
        loss_type: one name from :data:`DPO_LOSS_TYPES`, or a list of them to combine.
        label_smoothing: ε. ``sigmoid``/``aot``/``aot_unpaired``: [0, 0.5]; ``robust``: [0, 0.5);
            ``exo_pair``: (0, 1); ignored (but must be in [0, 1)) by the other types.
        chosen_lengths, rejected_lengths: optional ``[B]`` completion token counts (integer or
            floating; clamped at 1). ``ipo`` divides the log-ratios by them when given;
            ``sigmoid_norm`` and ``sft`` require them; the other types ignore them.
        margin: optional ``[B]`` per-pair margin m (margin-adaptive DPO), same dtype as the
            log-probs. Every type that depends on the pair only through βΔ uses βΔ - m instead:
            sigmoid, robust, hinge, ipo, exo_pair, apo_down, discopop, sigmoid_norm. The other
            types raise ValueError when a margin is given.
        loss_weights: one weight per entry of ``loss_type`` (default: all 1). ``losses`` is the
            weighted sum of the per-type per-pair losses, so its mean is the weighted sum of the
            per-type means (TRL's multi-loss combination).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        bco_delta: δ for ``bco_pair``, a float or 0-d tensor (detached). Older TRL kept it as
            hidden state: the running mean of all chosen and rejected rewards β·(log-ratio) seen
            so far, this batch included; current TRL uses 0. Pass it in to reproduce the former.
        discopop_tau: τ > 0 of ``discopop`` (TRL's default 0.05).
        f_divergence_type: TRL's f-DPO regularizer: ``"reverse_kl"`` (default, plain DPO),
            ``"forward_kl"``, ``"js_divergence"`` or ``"alpha_divergence"``. Other than reverse KL,
            each log-ratio x is replaced by the score f'(e^x) (see
            :func:`prefopt.losses.formulas.f_divergence_scores`) in the types that TRL allows
            with it: sigmoid, robust, hinge, ipo, exo_pair, discopop, sigmoid_norm (and sft,
            which reads no log-ratio); the others raise ValueError. The rewards stay β·x.
        f_alpha_divergence_coef: α of ``alpha_divergence`` (TRL's default 0.5), finite.
        chosen_weights, rejected_weights: optional ``[B]`` per-completion weights (WPO, TRL's
            ``use_weighting``), detached: every type's per-pair loss is multiplied by
            chosen_weights·rejected_weights before ``loss_weights``. :class:`prefopt.nn.DPOLoss`
            computes TRL's weights with ``use_weighting=True``; see
            :func:`prefopt.losses.formulas.wpo_weights`. Not with ``aot``/``aot_unpaired`` (TRL
            refuses them) nor ``sft`` (TRL 1.16 fails on it, so it has no defined value).
        sft_chosen_logps: optional ``[B]`` summed chosen log-probs that ``sft`` reads in place of
            ``policy_chosen_logps`` (LD-DPO weighs the others' but TRL's sft reads the plain sums).
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"`` (see the module docstring);
            ``aot`` and ``aot_unpaired`` run on the reference path only.
        return_metrics: also return the batch metrics (see the module docstring).

    Returns:
        :class:`PreferenceLossOutput` with ``[B]`` ``losses`` in the inputs' dtype and detached
        rewards ``chosen_rewards = β·(policy_chosen - ref_chosen)``, likewise for rejected; with
        ``return_metrics=True``, the pair ``(output, metrics)``.

    With c = policy_chosen - ref_chosen, r = policy_rejected - ref_rejected, Δ = c - r and
    z = βΔ - m (m = 0 without ``margin``), the per-pair losses are:

    * ``sigmoid`` (DPO, cDPO when ε > 0): -(1-ε)·logσ(z) - ε·logσ(-z)
    * ``robust`` (rDPO): [-(1-ε)·logσ(z) + ε·logσ(-z)] / (1-2ε)
    * ``hinge`` (SLiC): max(0, 1 - z)
    * ``ipo``: (h - (m + 1/2)/β)², h = Δ on sums (the paper), or
      h = c/len_chosen - r/len_rejected when lengths are given (TRL's per-token convention)
    * ``exo_pair`` (EXO): σ(z)·(logσ(z) - log(1-ε)) + σ(-z)·(logσ(-z) - log ε)
    * ``nca_pair`` (NCA): -logσ(βc) - ½·logσ(-βc) - ½·logσ(-βr)
    * ``bco_pair`` (BCO): -logσ(βc - δ) - logσ(δ - βr)
    * ``sppo_hard`` (SPPO, hard labels): (c - 1/(2β))² + (r + 1/(2β))²
    * ``aot`` (AOT paired): cDPO form of β·(sort(π_c - π_r) - sort(ref_c - ref_r)), sorted over
      the batch, so pair i of ``losses`` is the i-th quantile, not the i-th input pair
    * ``aot_unpaired``: cDPO form of β·(sort(c) - sort(r))
    * ``apo_zero`` (APO): (1 - σ(βc)) + σ(βr)
    * ``apo_down``: σ(βc) + (1 - σ(z))
    * ``discopop`` (DiscoPOP): (1 - σ(z/τ))·(-logσ(z)) + σ(z/τ)·exp(-z)
    * ``sigmoid_norm``: -logσ(β·(c/len_chosen - r/len_rejected) - m)
    * ``sft``: the token-mean NLL of the batch's chosen completions, -Σπ_c / Σlen_chosen, the same
      for every pair (TRL's expanded scalar); with other types in a list, MPO

    Under an f-divergence, c and r in z (and in ipo's and sigmoid_norm's h) are the scores.
    """
    types, weights = check_loss_types(loss_type, loss_weights)
    check_vector("policy_chosen_logps", policy_chosen_logps)
    for name, t in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        check_vector(name, t, policy_chosen_logps, "policy_chosen_logps")
    beta = check_real("beta", beta, positive=True)
    eps = check_smoothing(label_smoothing, types)
    check_length_pair(
        chosen_lengths,
        rejected_lengths,
        policy_chosen_logps,
        "policy_chosen_logps",
        next((f"loss_type {kind!r}" for kind in ("sigmoid_norm", "sft") if kind in types), None),
    )
    if margin is not None:
        check_vector("margin", margin, policy_chosen_logps, "policy_chosen_logps")
        unsupported = [kind for kind in types if kind not in MARGIN_LOSS_TYPES]
        if unsupported:
            raise ValueError(
                f"margin is only defined for loss_type in {sorted(MARGIN_LOSS_TYPES)}, "
                f"got loss_type {unsupported}"
            )
    check_constant("bco_delta", bco_delta, policy_chosen_logps)
    discopop_tau = check_real("discopop_tau", discopop_tau, positive=True)
    f_alpha_divergence_coef = check_f_divergence(f_divergence_type, f_alpha_divergence_coef, types)
    check_pair_weights(chosen_weights, rejected_weights, policy_chosen_logps, "policy_chosen_logps", types)
    if sft_chosen_logps is not None:
        check_vector("sft_chosen_logps", sft_chosen_logps, policy_chosen_logps, "policy_chosen_logps")
        if "sft" not in types:
            raise ValueError(f"sft_chosen_logps is only read by loss_type 'sft', got loss_type {types}")
    check_reduction(reduction)
    sorting = [kind for kind in types if kind in SORTING_LOSS_TYPES]
    unfused = None
    if sorting:
        unfused = f"loss_type {sorting} sorts across the batch and has no fused kernel"
    elif "sft" in types:
        unfused = "loss_type 'sft' has no fused kernel yet"
    backend = backends.resolve("loss", backend, policy_chosen_logps.device, policy_chosen_logps.dtype,
                               unfused=None if unfused is None else f"{unfused}; use backend='reference' or 'auto'")
    delta = _constant(bco_delta, policy_chosen_logps)
    pair_weights = None
    if chosen_weights is not None and rejected_weights is not None:
        pair_weights = (chosen_weights * rejected_weights).detach()

    if backend != "reference":
        loss, losses, chosen_rewards, rejected_rewards, metrics = fused_losses.fused_preference_loss(
            "dpo",
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            margin=margin,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            offset=delta,
            loss_types=types,
            loss_weights=weights,
            beta=beta,
            label_smoothing=eps,
            discopop_tau=discopop_tau,
            pair_weights=pair_weights,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            reduction=reduction,
            backend=backend,
        )
        return _result(PreferenceLossOutput(loss, losses, chosen_rewards, rejected_rewards), metrics, return_metrics)

    lengths = None
    if chosen_lengths is not None and rejected_lengths is not None:
        lengths = (
            token_counts(chosen_lengths, policy_chosen_logps),
            token_counts(rejected_lengths, policy_chosen_logps),
        )
    losses = dpo_losses(
        types,
        weights,
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        pair_weights=pair_weights,
        sft_chosen_logps=sft_chosen_logps,
        beta=beta,
        eps=eps,
        margin=0.0 if margin is None else margin,
        lengths=lengths,
        bco_delta=delta,
        discopop_tau=discopop_tau,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
    )

    chosen_rewards = (beta * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (policy_rejected_logps - ref_rejected_logps)).detach()
    output = PreferenceLossOutput(_reduce(losses, reduction), losses, chosen_rewards, rejected_rewards)
    metrics = _pair_metrics(output, policy_chosen_logps, policy_rejected_logps) if return_metrics else None
    return _result(output, metrics, return_metrics)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    return_metrics: bool = False,
) -> PreferenceLossOutput | tuple[PreferenceLossOutput, dict[str, torch.Tensor]]:
    """IPO: ``dpo_loss(..., loss_type="ipo")``; see :func:`dpo_loss` for shapes, dtypes,
    ``backend`` and ``return_metrics``.

    Per pair (h - 1/(2β))² (with a margin m: (h - (m + 1/2)/β)²), where h is the difference of
    the chosen and rejected log-ratios, each divided by its completion token count when
    ``chosen_lengths``/``rejected_lengths`` are given (TRL's convention, which the IPO authors
    confirmed matches their experiments), and on summed log-probs otherwise (the paper's
    formula).
    """
    return dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        loss_type="ipo",
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        margin=margin,
        reduction=reduction,
        backend=backend,
        return_metrics=return_metrics,
    )


# --------------------------------------------------------------------------------------------
# KTO.
# --------------------------------------------------------------------------------------------


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl: float | torch.Tensor = 0.0,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    reduction: str = "mean",
    backend: str = "auto",
    return_metrics: bool = False,
) -> PreferenceLossOutput | tuple[PreferenceLossOutput, dict[str, torch.Tensor]]:
    r"""KTO on unpaired examples, as TRL's ``KTOTrainer`` computes it.

    Args:
        policy_logps, ref_logps: ``[B]`` floating tensors (one dtype and device), summed
            completion log-probs under the policy and the reference.
        desirable: ``[B]`` ``torch.bool`` tensor, True where the example is desirable.
        kl: the reference point z₀, a float or a 0-d tensor (e.g. from :func:`kto_kl`); it is
            detached, a constant of the loss. Ignored by ``apo_zero_unpaired``.
        beta: β > 0.
        desirable_weight, undesirable_weight: λ_D, λ_U >= 0.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
        reduction: ``"mean"`` (over all B examples, TRL's), ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"`` (see the module docstring).
        return_metrics: also return the batch metrics (see the module docstring).

    With r = policy_logps - ref_logps, per example:

    * ``kto``: λ_D·(1 - σ(β(r - kl))) if desirable, λ_U·(1 - σ(β(kl - r))) otherwise
    * ``apo_zero_unpaired``: λ_D·(1 - σ(βr)) if desirable, λ_U·σ(βr) otherwise

    A batch with only desirable or only undesirable examples is valid.

    Returns:
        :class:`PreferenceLossOutput`. The rewards are full ``[B]`` vectors, so their shape does
        not depend on the labels (no host sync, capturable): ``chosen_rewards`` is β·r at the
        desirable positions and 0 elsewhere, ``rejected_rewards`` is β·r at the undesirable
        positions and 0 elsewhere. TRL returns only the selected entries; its logged
        ``rewards/chosen`` is ``chosen_rewards.sum() / desirable.sum()`` here (likewise
        ``rewards/rejected`` with ``~desirable``), and ``chosen_rewards[desirable]`` recovers
        TRL's vector when a host sync is acceptable. With ``return_metrics=True``, the pair
        ``(output, metrics)``.
    """
    check_loss_type(loss_type, KTO_LOSS_TYPES)
    check_vector("policy_logps", policy_logps)
    check_vector("ref_logps", ref_logps, policy_logps, "policy_logps")
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(f"desirable must be a torch.bool tensor of shape [B], got {type(desirable).__name__}")
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a torch.bool tensor, got dtype {desirable.dtype}")
    if desirable.shape != policy_logps.shape:
        raise ValueError(
            f"desirable must have shape {tuple(policy_logps.shape)} like policy_logps, got {tuple(desirable.shape)}"
        )
    if desirable.device != policy_logps.device:
        raise ValueError(f"desirable must be on device {policy_logps.device}, got {desirable.device}")
    check_constant("kl", kl, policy_logps)
    beta = check_real("beta", beta, positive=True)
    desirable_weight = check_real("desirable_weight", desirable_weight, nonnegative=True)
    undesirable_weight = check_real("undesirable_weight", undesirable_weight, nonnegative=True)
    check_reduction(reduction)
    backend = backends.resolve("loss", backend, policy_logps.device, policy_logps.dtype)
    reference_point = _constant(kl, policy_logps) if loss_type == "kto" else 0.0

    if backend != "reference":
        loss, losses, chosen_rewards, rejected_rewards, metrics = fused_losses.fused_preference_loss(
            "kto",
            policy_logps,
            None,
            ref_logps,
            desirable=desirable,
            offset=reference_point,
            loss_types=[loss_type],
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
            reduction=reduction,
            backend=backend,
        )
        return _result(PreferenceLossOutput(loss, losses, chosen_rewards, rejected_rewards), metrics, return_metrics)

    logratios = policy_logps - ref_logps
    losses = kto_losses(logratios, desirable, reference_point, beta=beta, desirable_weight=desirable_weight,
                        undesirable_weight=undesirable_weight)

    rewards = (beta * logratios).detach()
    zeros = torch.zeros_like(rewards)
    chosen_rewards = torch.where(desirable, rewards, zeros)
    rejected_rewards = torch.where(desirable, zeros, rewards)
    output = PreferenceLossOutput(_reduce(losses, reduction), losses, chosen_rewards, rejected_rewards)
    return _result(output, _kto_metrics(output, policy_logps, desirable) if return_metrics else None, return_metrics)


def kto_kl(
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """KTO's reference point: the batch KL estimate, a detached 0-d tensor.

    Args:
        policy_kl_logps, ref_kl_logps: ``[B]`` floating tensors (one dtype and device): summed
            log-probs of mismatched completions (prompt i paired with another example's
            completion) under the policy and the reference.
        process_group: when given and ``torch.distributed`` is initialized, the mean is taken
            over the examples of every rank of this group (one all-reduce of the sum and the
            count, no host sync), whatever each rank's batch size. With equal batch sizes this
            is TRL's ``gather_for_metrics(kl).mean()``, a mean of the ranks' means. Pass
            ``torch.distributed.group.WORLD`` for all ranks; with None the estimate stays local.

    Returns:
        max(0, mean(policy_kl_logps - ref_kl_logps)) over the group's examples, with no gradient.
    """
    check_vector("policy_kl_logps", policy_kl_logps)
    check_vector("ref_kl_logps", ref_kl_logps, policy_kl_logps, "policy_kl_logps")
    difference = (policy_kl_logps - ref_kl_logps).detach()
    if process_group is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        totals = torch.stack([difference.sum(), difference.new_tensor(difference.numel())])
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM, group=process_group)
        kl = totals[0] / totals[1]
    else:
        kl = difference.mean()
    return kl.clamp(min=0.0)


# --------------------------------------------------------------------------------------------
# Reference-free losses: CPO (and SimPO through it), ORPO.
# --------------------------------------------------------------------------------------------


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    alpha: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    return_metrics: bool = False,
) -> PreferenceLossOutput | tuple[PreferenceLossOutput, dict[str, torch.Tensor]]:
    r"""CPO and its variants, as TRL's ``CPOTrainer`` computes them (defaults are ``CPOConfig``'s).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` floating tensors (one dtype and
            device), **summed** completion log-probs under the policy. There is no reference.
        beta: β > 0.
        loss_type: ``"sigmoid"``, ``"hinge"``, ``"ipo"`` or ``"simpo"``.
        label_smoothing: ε in [0, 0.5] for ``sigmoid`` and ``simpo``; ignored (but must be in
            [0, 1)) by ``hinge`` and ``ipo``.
        simpo_gamma: γ, the target reward margin of ``simpo`` in loss units (TRL's
            ``simpo_gamma``: the loss is -logσ(βh - γ)). SimPO's reference code takes
            ``gamma_beta_ratio`` = γ/β instead.
        cpo_alpha: weight α of the behavior-cloning (NLL) term on the chosen completions.
        alpha: TRL's AlphaPO α (finite; 0, the default, is plain CPO): each log-prob x (after the
            per-token averaging of ``ipo`` and ``simpo``) becomes the reward (1 - e^(-αx))/α in
            the preference term and in the rewards; the NLL term keeps the log-probs.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts (clamped at 1).
            ``ipo`` and ``simpo`` need both, because TRL feeds them per-token average log-probs;
            the NLL term needs ``chosen_lengths`` whenever ``cpo_alpha != 0``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"`` (see the module docstring).
        return_metrics: also return the batch metrics (see the module docstring; the
            ``logps/*`` means are of the summed log-prob inputs).

    With c, r the chosen and rejected log-probs (divided by their lengths for ``ipo`` and
    ``simpo``) and h = c - r, the preference term per pair is

    * ``sigmoid``: -(1-ε)·logσ(βh) - ε·logσ(-βh)
    * ``hinge``: max(0, 1 - βh)
    * ``ipo``: (h - 1/(2β))²
    * ``simpo``: -(1-ε)·logσ(βh - γ) - ε·logσ(γ - βh)

    and ``losses[i]`` adds α·B·(-policy_chosen_logps[i]) / Σ chosen_lengths, pair i's share of
    the token-mean NLL over all chosen completion tokens, so that ``losses.mean()`` is TRL's
    ``mean(preference) + cpo_alpha · nll_loss``. With ``alpha`` != 0, c and r above are
    AlphaPO's rewards of the log-probs.

    Returns:
        :class:`PreferenceLossOutput` with detached rewards β·c and β·r (TRL's, on the same
        sums or averages the preference term uses); with ``return_metrics=True``, the pair
        ``(output, metrics)``.
    """
    check_loss_type(loss_type, CPO_LOSS_TYPES)
    check_vector("policy_chosen_logps", policy_chosen_logps)
    check_vector("policy_rejected_logps", policy_rejected_logps, policy_chosen_logps, "policy_chosen_logps")
    beta = check_real("beta", beta, positive=True)
    eps = check_smoothing(label_smoothing, [loss_type])
    simpo_gamma = check_real("simpo_gamma", simpo_gamma)
    cpo_alpha = check_real("cpo_alpha", cpo_alpha)
    alpha = check_real("alpha", alpha)
    averaged = loss_type in ("ipo", "simpo")  # TRL feeds these two per-token average log-probs
    if chosen_lengths is None and (averaged or cpo_alpha != 0.0):
        needs = f"loss_type {loss_type!r}" if averaged else "the NLL term (cpo_alpha != 0)"
        raise ValueError(f"chosen_lengths is required by {needs}")
    if rejected_lengths is None and averaged:
        raise ValueError(f"rejected_lengths is required by loss_type {loss_type!r}")
    if chosen_lengths is not None:
        check_lengths("chosen_lengths", chosen_lengths, policy_chosen_logps, "policy_chosen_logps")
    if rejected_lengths is not None:
        check_lengths("rejected_lengths", rejected_lengths, policy_chosen_logps, "policy_chosen_logps")
    check_reduction(reduction)
    backend = backends.resolve("loss", backend, policy_chosen_logps.device, policy_chosen_logps.dtype)

    if backend != "reference":
        loss, losses, chosen_rewards, rejected_rewards, metrics = fused_losses.fused_preference_loss(
            "cpo",
            policy_chosen_logps,
            policy_rejected_logps,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            loss_types=[loss_type],
            beta=beta,
            label_smoothing=eps,
            simpo_gamma=simpo_gamma,
            cpo_alpha=cpo_alpha,
            alpha=alpha,
            reduction=reduction,
            backend=backend,
        )
        return _result(PreferenceLossOutput(loss, losses, chosen_rewards, rejected_rewards), metrics, return_metrics)

    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if averaged:
        assert chosen_lengths is not None and rejected_lengths is not None  # checked above
        chosen = chosen / token_counts(chosen_lengths, chosen)
        rejected = rejected / token_counts(rejected_lengths, rejected)
    chosen, rejected = alphapo_rewards(chosen, alpha), alphapo_rewards(rejected, alpha)
    losses = cpo_pair_losses(loss_type, chosen, rejected, beta=beta, eps=eps, simpo_gamma=simpo_gamma)
    if cpo_alpha != 0.0:
        assert chosen_lengths is not None  # checked above
        losses = losses + cpo_nll_losses(
            policy_chosen_logps, token_counts(chosen_lengths, policy_chosen_logps), cpo_alpha
        )

    output = PreferenceLossOutput(
        _reduce(losses, reduction), losses, (beta * chosen).detach(), (beta * rejected).detach()
    )
    metrics = _pair_metrics(output, policy_chosen_logps, policy_rejected_logps) if return_metrics else None
    return _result(output, metrics, return_metrics)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    return_metrics: bool = False,
) -> PreferenceLossOutput | tuple[PreferenceLossOutput, dict[str, torch.Tensor]]:
    r"""SimPO: ``cpo_loss(loss_type="simpo", simpo_gamma=gamma, cpo_alpha=0)``.

    Per pair -(1-ε)·logσ(β·(c/len_c - r/len_r) - γ) - ε·logσ(γ - β·(c/len_c - r/len_r)), with c, r
    the ``[B]`` summed log-probs of the chosen and rejected completions and len_c, len_r their
    ``[B]`` token counts (clamped at 1). γ is the margin in loss units, TRL's ``simpo_gamma``
    (the SimPO paper's eq. 6); SimPO's reference code takes ``gamma_beta_ratio`` = γ/β instead.
    Rewards are β·c/len_c and β·r/len_r, detached. ε in [0, 0.5]. ``backend`` and
    ``return_metrics`` as in :func:`cpo_loss`.
    """
    check_real("gamma", gamma)
    return cpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        beta=beta,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
        cpo_alpha=0.0,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        reduction=reduction,
        backend=backend,
        return_metrics=return_metrics,
    )


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    chosen_nll: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    return_metrics: bool = False,
) -> PreferenceLossOutput | tuple[PreferenceLossOutput, dict[str, torch.Tensor]]:
    r"""ORPO, as TRL's ``ORPOTrainer`` computes it.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` floating tensors (one dtype and
            device), **per-token average** completion log-probs (TRL's ORPO convention,
            ``sequence_logprobs(..., average=True)``), so ≤ 0.
        beta: λ > 0, the weight of the odds-ratio term (TRL's ``beta``).
        chosen_nll: the NLL term. None: the per-pair -policy_chosen_logps (mean token NLL of each
            chosen completion). A 0-d tensor: one batch-level NLL added to every pair, e.g. TRL's
            token-mean cross-entropy of the chosen sequences (which, for decoder-only models,
            counts prompt tokens too). A ``[B]`` tensor: per-pair NLL. Same dtype and device as
            the log-probs; gradients flow into it.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"`` (see the module docstring).
        return_metrics: also return the batch metrics (see the module docstring).

    Per pair, with p_c = exp(c), p_r = exp(r):

        losses = nll + λ·(-logσ(log(p_c/(1-p_c)) - log(p_r/(1-p_r))))

    so ``loss`` with the default mean reduction and a 0-d ``chosen_nll`` is TRL's
    ``nll - mean(λ·logσ(log_odds))``. The log-odds log p - log(1-p) is computed with a stable
    log(1-exp(x)) that stays accurate as log p → 0; log p = 0 exactly (infinite odds) is clamped
    to the largest negative float, and that entry gets no gradient through the odds term.

    Returns:
        :class:`PreferenceLossOutput` with detached rewards β·c and β·r (TRL's); with
        ``return_metrics=True``, the pair ``(output, metrics)``.
    """
    check_vector("policy_chosen_logps", policy_chosen_logps)
    check_vector("policy_rejected_logps", policy_rejected_logps, policy_chosen_logps, "policy_chosen_logps")
    beta = check_real("beta", beta, positive=True)
    if chosen_nll is not None:
        if not isinstance(chosen_nll, torch.Tensor):
            raise TypeError(f"chosen_nll must be a 0-d or [B] tensor, got {type(chosen_nll).__name__}")
        if chosen_nll.dim() != 0:
            check_vector("chosen_nll", chosen_nll, policy_chosen_logps, "policy_chosen_logps")
        elif not chosen_nll.is_floating_point() or chosen_nll.dtype != policy_chosen_logps.dtype:
            raise TypeError(f"chosen_nll must have dtype {policy_chosen_logps.dtype}, got {chosen_nll.dtype}")
        elif chosen_nll.device != policy_chosen_logps.device:
            raise ValueError(f"chosen_nll must be on device {policy_chosen_logps.device}, got {chosen_nll.device}")
    check_reduction(reduction)
    backend = backends.resolve("loss", backend, policy_chosen_logps.device, policy_chosen_logps.dtype)

    if backend != "reference":
        loss, losses, chosen_rewards, rejected_rewards, metrics = fused_losses.fused_preference_loss(
            "orpo", policy_chosen_logps, policy_rejected_logps, nll=chosen_nll, beta=beta, reduction=reduction,
            backend=backend,
        )
        return _result(PreferenceLossOutput(loss, losses, chosen_rewards, rejected_rewards), metrics, return_metrics)

    log_odds = orpo_log_odds(policy_chosen_logps, policy_rejected_logps)
    nll = -policy_chosen_logps if chosen_nll is None else chosen_nll
    ratio = F.logsigmoid(log_odds)
    losses = nll - beta * ratio
    output = PreferenceLossOutput(
        _reduce(losses, reduction),
        losses,
        (beta * policy_chosen_logps).detach(),
        (beta * policy_rejected_logps).detach(),
    )
    metrics = None
    if return_metrics:
        metrics = _pair_metrics(output, policy_chosen_logps, policy_rejected_logps)
        metrics["log_odds_ratio"] = ratio.detach().mean()
        metrics["log_odds_chosen"] = log_odds.detach().mean()
        metrics["nll_loss"] = nll.detach().mean()
    return _result(output, metrics, return_metrics)
