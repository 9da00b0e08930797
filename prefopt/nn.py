"""End-to-end preference losses from logits, or from the LM head's inputs without logits:
``DPOLoss``, ``IPOLoss``, ``KTOLoss``, ``SimPOLoss``, ``ORPOLoss``.

Each module takes the policy logits and the (already shifted) labels of a batch and returns
``(loss, metrics)``. One :func:`prefopt.token_stats` call reads the policy logits once and gives
the per-token log-probs, the vocabulary-mean logit and the entropy; the per-sequence sums come
from its per-token output, and the loss runs through :mod:`prefopt.losses` (one fused launch
each way where the Triton backend runs). Nothing synchronizes with the host: a step traces under
``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph. (With an
:class:`LMHeadInput`, counting the scored rows is one host round trip per call, which is skipped
while a CUDA graph is captured: every row is multiplied then.)

Wherever a module takes logits (the policy's, ``ref_logits``, KTO's ``kl_logits`` and
``ref_kl_logits``) it also takes an :class:`LMHeadInput` — the hidden states ``[rows, T, H]``
and the LM-head weight ``[V, H]`` (bias, logit scale and softcap optional) — and then computes
the same statistics with :func:`prefopt.linear_token_stats`, so the ``[rows, T, V]`` logits are
never materialized; the gradients reach the hidden states, the weight and the bias.

Layout (TRL's): the pairwise modules take a concatenated ``[chosen; rejected]`` batch, logits
``[2B, T, V]`` and labels ``[2B, T]``, rows ``0..B-1`` the chosen completions and ``B..2B-1``
the rejected ones of the same prompts; KTO takes ``[N, T, V]`` unpaired examples. Labels are
already shifted (position t holds the token ``logits[:, t]`` predicts) and equal
``ignore_index`` at prompt and padding positions, so only completion tokens are scored.

The reference model enters as its per-sequence log-probs (``ref_logps``, summed over the
completion, in the policy log-probs' dtype: float32, or float64 from the reference backend on
float64 logits), or as its logits (``ref_logits``), reduced under ``torch.no_grad`` so nothing
is kept for backward. Either way it is a constant: no gradient reaches it.

Metrics: 0-d device tensors (read them with ``.item()`` when you log). Besides the loss
metrics of :mod:`prefopt.losses` (``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, and KTO's
``count/*``, ORPO's ``log_odds_*`` and ``nll_loss``):

- ``logits/chosen``, ``logits/rejected``: the vocabulary-mean logit averaged over the completion
  tokens of the chosen (KTO: desirable) and rejected (undesirable) sequences, as TRL logs it;
- ``entropy``: the mean per-token entropy of the policy over all completion tokens;
- ``completion_length/chosen``, ``completion_length/rejected``: mean completion token counts
  (what :class:`prefopt.diagnostics.PreferenceMonitor` watches for length drift);
- KTO with ``loss_type="kto"``: ``kl``, the reference point of :func:`prefopt.kto_kl`.

A mean over no tokens or no examples is NaN.

``backend`` is the log-prob backend (see :mod:`prefopt.backends`); the loss reduction runs the
fused kernel of that backend when it is ``"triton"`` or ``"cuda"`` (except for the loss types that
sort over the batch, ``aot`` and ``aot_unpaired``, and ``sft``, which have none), the reference when it is
``"reference"``, and chooses as ``"auto"`` otherwise (the fused kernel on CUDA tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from . import _validation, backends
from .backends import BACKEND_CHOICES
from .logprobs.api import sequence_logprobs, token_stats
from .logprobs.linear import linear_sequence_logprobs, linear_token_stats
from .losses import KTO_LOSS_TYPES, dpo_loss, kto_kl, kto_loss, orpo_loss, simpo_loss
from ._validation import (
    SORTING_LOSS_TYPES,
    check_f_divergence,
    check_loss_type,
    check_loss_types,
    check_real,
    check_smoothing,
)
from .losses.formulas import wpo_weights

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["DPOLoss", "IPOLoss", "KTOLoss", "LMHeadInput", "ORPOLoss", "SimPOLoss"]

Tensor = torch.Tensor
Metrics = dict[str, Tensor]


class LMHeadInput(NamedTuple):
    """The inputs of a model's LM head, passed to a loss module in place of its logits.

    The logits they stand for are ``x = logit_scale * (hidden @ weight.T + bias)``, softcapped
    as ``softcap * tanh(x / softcap)`` when ``softcap`` is set (Gemma's
    ``final_logit_softcapping``); the module's temperature divides them after that.

    Fields:
        hidden: [rows, T, H] bfloat16/float16/float32 (float64 for the reference backend), the
            final hidden states at the positions the labels score (already shifted).
        weight: [V, H], hidden's dtype and device. bias: optional [V], the same.
        logit_scale: finite > 0. softcap: None or finite > 0.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None


Scores = Tensor | LMHeadInput  # what a module reads a model's log-probs from: logits or LM-head inputs


class _Completions(NamedTuple):
    """Per-sequence reductions of one token_stats pass, each [N]."""

    logps: Tensor  # summed completion log-probs, differentiable
    tokens: Tensor  # scored (completion) token counts, int64
    mean_logits: Tensor  # sum over the completion of the vocabulary-mean logit, detached
    entropy: Tensor  # sum over the completion of the entropy, detached
    plain_logps: Tensor  # logps without LD-DPO's token weights (logps itself without them)
    aligned: Tensor | None  # WPO: sum over the completion of log p - log Σp², detached (when asked)


# ----------------------------------------------------------------------------------------------
# Validation of module inputs: shapes, dtypes and devices only, before any kernel runs.
# ----------------------------------------------------------------------------------------------


def _leading(scores: Scores) -> Tensor:
    """The tensor whose leading dimensions are the labels' and whose device and dtype are the
    model's: the logits, or the LM head's hidden states."""
    return scores.hidden if isinstance(scores, LMHeadInput) else scores


def _check_scores(name: str, scores: object, labels: object, layout: str, labels_name: str = "labels") -> None:
    """Logits [rows, T, V] or an LMHeadInput with hidden [rows, T, H], scored by labels [rows, T]."""
    if isinstance(scores, LMHeadInput):
        hidden = scores.hidden
        if not isinstance(hidden, Tensor) or hidden.dim() != 3:
            shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            # The layout names the logits' [..., V]; the hidden states end in H instead.
            raise ValueError(f"{name}.hidden must be a tensor of shape {layout.replace('V]', 'H]')}, got {shape}")
        if not isinstance(labels, Tensor):
            raise TypeError(
                f"{labels_name} must be a torch.Tensor of shape {tuple(hidden.shape[:-1])}, "
                f"got {type(labels).__name__}"
            )
        _validation.check_labels(labels, hidden, labels_name)
        try:
            _validation.check_lm_head_inputs(hidden, scores.weight, scores.bias, labels, scores.logit_scale)
            _validation.check_transform(1.0, scores.softcap)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}.{error}") from None
        return
    if not isinstance(scores, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {layout} or a prefopt.nn.LMHeadInput, got {type(scores).__name__}"
        )
    if scores.dim() != 3:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(scores.shape)}")
    if not isinstance(labels, Tensor):
        raise TypeError(
            f"{labels_name} must be a torch.Tensor of shape {tuple(scores.shape[:-1])}, got {type(labels).__name__}"
        )
    _validation.check_logits(scores, name)
    _validation.check_labels(labels, scores, labels_name)


def _check_batch(logits: object, labels: object, paired: bool) -> int:
    """Returns B (paired) or N."""
    layout = "[2B, T, V] ([chosen; rejected])" if paired else "[N, T, V]"
    _check_scores("logits", logits, labels, layout)
    rows = _leading(logits).shape[0]
    if rows == 0 or (paired and rows % 2):
        what = "an even, nonzero number of rows (chosen then rejected)" if paired else "at least one row"
        raise ValueError(f"logits must hold {what}, got {rows}")
    return rows // 2 if paired else rows


def _policy_dtype(logits: Scores, backend: str) -> torch.dtype:
    """The dtype the log-probs will have: float64 only from the reference on float64 inputs."""
    model = _leading(logits)
    resolved = backends.resolve("token_stats", backend, model.device, model.dtype)
    return torch.float64 if resolved == "reference" and model.dtype == torch.float64 else torch.float32


def _check_sequence_values(name: str, t: object, rows: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{rows}], got {type(t).__name__}")
    if t.shape != (rows,):
        raise ValueError(f"{name} must have shape [{rows}], one value per sequence, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, the dtype of the policy's log-probs, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on device {device} like logits, got {t.device}")


def _check_constant_model(
    logps_name: str,
    logps: object,
    logits_name: str,
    logits: object,
    labels: Tensor | None,
    rows: int,
    dtype: torch.dtype,
    device: torch.device,
    labels_name: str = "labels",
) -> None:
    """Exactly one of per-sequence log-probs [rows] or logits [rows, T, V] / an LMHeadInput
    (scored by ``labels``)."""
    if (logps is None) == (logits is None):
        raise ValueError(
            f"pass exactly one of {logps_name} (per-sequence log-probs, shape [{rows}]) and {logits_name} "
            f"(shape [{rows}, T, V], or a prefopt.nn.LMHeadInput)"
        )
    if logps is not None:
        _check_sequence_values(logps_name, logps, rows, dtype, device)
        return
    assert labels is not None  # every caller passes the labels that score these logits
    scored, last = (f"{logits_name}.hidden", "H") if isinstance(logits, LMHeadInput) else (logits_name, "V")
    leading = _leading(logits)
    if isinstance(leading, Tensor) and (leading.dim() != 3 or leading.shape[:-1] != labels.shape):
        raise ValueError(
            f"{scored} must have shape [{labels.shape[0]}, {labels.shape[1]}, {last}] (its labels' shape plus "
            f"{'the hidden size' if last == 'H' else 'the vocabulary'}), got {tuple(leading.shape)}"
        )
    _check_scores(logits_name, logits, labels, f"[{labels.shape[0]}, {labels.shape[1]}, V]", labels_name)
    if _leading(logits).device != device:
        raise ValueError(f"{logits_name} must be on device {device} like logits, got {_leading(logits).device}")


def _check_module_options(ignore_index: object, temperature: object, inplace_backward: object, backend: object) -> None:
    # The modules find the completion tokens by it, so "score every position" (None) has no place.
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _validation.check_transform(temperature, None)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {list(BACKEND_CHOICES)}, got {backend!r}")


# ----------------------------------------------------------------------------------------------
# The shared machinery.
# ----------------------------------------------------------------------------------------------


class _FromLogits(torch.nn.Module):
    """Options shared by every module: how the log-probs are computed."""

    # Whether the loss has a fused kernel: the modules whose loss type sorts over the batch say no.
    _fusable = True

    def __init__(self, ignore_index: int, temperature: float, inplace_backward: bool, backend: str) -> None:
        super().__init__()
        _check_module_options(ignore_index, temperature, inplace_backward, backend)
        self.ignore_index = ignore_index
        self.temperature = float(temperature)
        self.inplace_backward = inplace_backward
        self.backend = backend

    @property
    def _loss_backend(self) -> str:
        if self.backend == "reference" or (self.backend in ("triton", "cuda") and self._fusable):
            return self.backend
        return "auto"

    def _completions(
        self, logits: Scores, labels: Tensor, token_weights: Tensor | None = None, wpo: bool = False
    ) -> _Completions:
        """One pass over the policy logits (or its LM head): log-probs, mean logit and entropy
        of every token (and log Σp² for WPO). ``token_weights`` [rows, T] weigh the log-probs in
        their sums (LD-DPO)."""
        names = ("entropy", "mean_logits", "log_sum_sq_probs") if wpo else ("entropy", "mean_logits")
        options = {"stats": names, "ignore_index": self.ignore_index,
                   "temperature": self.temperature, "backend": self.backend}
        if isinstance(logits, LMHeadInput):
            stats = linear_token_stats(logits.hidden, logits.weight, labels, bias=logits.bias,
                                       logit_scale=logits.logit_scale, softcap=logits.softcap, **options)
        else:
            stats = token_stats(logits, labels, inplace_backward=self.inplace_backward, **options)
        plain = stats.logps.sum(-1)
        aligned = None
        if wpo:
            # Ignored positions are exact zeros in both statistics, so the sum is over the completion.
            aligned = (stats.logps.detach() - stats.log_sum_sq_probs).sum(-1)
        return _Completions(
            plain if token_weights is None else (stats.logps * token_weights).sum(-1),
            (labels != self.ignore_index).sum(-1),
            stats.mean_logits.detach().sum(-1),
            stats.entropy.detach().sum(-1),
            plain,
            aligned,
        )

    def _constant_logps(
        self,
        logps: Tensor | None,
        logits: Scores | None,
        labels: Tensor | None,
        dtype: torch.dtype,
        token_weights: Tensor | None = None,
    ) -> Tensor:
        """Per-sequence log-probs of a model that receives no gradient (the reference, KL terms),
        their tokens weighted by ``token_weights`` when given (LD-DPO)."""
        if logps is not None:
            return logps.detach()
        options = {"ignore_index": self.ignore_index, "temperature": self.temperature, "backend": self.backend}
        with torch.no_grad():
            if token_weights is not None:
                if isinstance(logits, LMHeadInput):
                    per_token = linear_token_stats(logits.hidden, logits.weight, labels, bias=logits.bias,
                                                   logit_scale=logits.logit_scale, softcap=logits.softcap,
                                                   stats=(), **options).logps
                else:
                    per_token = token_stats(logits, labels, stats=(), **options).logps
                sums = (per_token * token_weights).sum(-1)
            elif isinstance(logits, LMHeadInput):
                sums = linear_sequence_logprobs(logits.hidden, logits.weight, labels, bias=logits.bias,
                                                logit_scale=logits.logit_scale, softcap=logits.softcap, **options)
            else:
                sums = sequence_logprobs(logits, labels, **options)
        return sums.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
            f"inplace_backward={self.inplace_backward}, backend={self.backend!r}"
        )


def _ld_token_weights(labels: Tensor, ignore_index: int, pairs: int, ld_alpha: float, dtype: torch.dtype) -> Tensor:
    """LD-DPO's (Liu et al. 2024) token weights for a [chosen; rejected] batch, as TRL builds
    them: 1 on the first min(len_chosen, len_rejected) completion tokens of each pair's two
    completions, ld_alpha on the tokens past that shared length, 0 off the completion."""
    scored = labels != ignore_index
    position = scored.cumsum(-1)
    counts = scored.sum(-1)
    shared = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)
    tail = position > shared[:, None]
    return (1.0 + (ld_alpha - 1.0) * tail.to(dtype)) * scored.to(dtype)


def _token_mean(sums: Tensor, tokens: Tensor) -> Tensor:
    return sums.sum() / tokens.sum().to(sums.dtype)


def _paired_metrics(completions: _Completions, pairs: int) -> Metrics:
    chosen, rejected = slice(0, pairs), slice(pairs, None)
    tokens = completions.tokens.to(completions.mean_logits.dtype)
    return {
        "logits/chosen": _token_mean(completions.mean_logits[chosen], completions.tokens[chosen]),
        "logits/rejected": _token_mean(completions.mean_logits[rejected], completions.tokens[rejected]),
        "entropy": _token_mean(completions.entropy, completions.tokens),
        "completion_length/chosen": tokens[chosen].mean(),
        "completion_length/rejected": tokens[rejected].mean(),
    }


# ----------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------


class DPOLoss(_FromLogits):
    r"""DPO (or any pairwise type of :func:`prefopt.dpo_loss`) from policy logits.

    Args:
        beta: β > 0.
        loss_type: one of :data:`prefopt.losses.DPO_LOSS_TYPES` or a list of them.
        label_smoothing, loss_weights, bco_delta, discopop_tau, f_divergence_type,
            f_alpha_divergence_coef: as in :func:`prefopt.dpo_loss`.
        use_weighting: WPO (TRL's ``use_weighting``): every pair's loss is weighted by
            exp(mean over each completion of log p(y_t) - log Σ_v p(v)²), chosen times rejected,
            detached; log Σp² comes from the same pass over the logits.
        ld_alpha: LD-DPO (TRL's ``ld_alpha``), None (off) or a float in [0, 1]: the log-probs of
            the completion tokens past the shorter completion of the pair count ld_alpha times,
            for the policy and for ``ref_logits`` (a ``ref_logps`` given must be weighted the same
            way, as TRL's precomputed reference log-probs are). ``sft`` reads the unweighted sums,
            as TRL's does.
        ignore_index: the label of unscored (prompt, padding) positions.
        temperature: > 0; the log-probs of policy and reference are of softmax(logits / T).
        inplace_backward: write the logits gradient over the policy logits (the caller promises
            not to read them after backward); nothing to overwrite given an LMHeadInput.
        backend: the log-prob backend (see the module docstring).

    ``ipo`` and ``sigmoid_norm`` see the log-ratios divided by the completion token counts
    (TRL's convention).

    Call: ``loss, metrics = dpo(logits, labels, ref_logps=... or ref_logits=..., margin=None)``
    with logits ``[2B, T, V]`` and labels ``[2B, T]`` (``[chosen; rejected]``), ``ref_logps``
    ``[2B]`` in the same layout or ``ref_logits`` ``[2B, T, V]``, and an optional per-pair
    ``margin`` ``[B]``. Either logits may be an :class:`LMHeadInput` (hidden ``[2B, T, H]`` and
    the head's weight) instead. Returns the 0-d loss and the metrics dict.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        *,
        label_smoothing: float = 0.0,
        loss_weights: Sequence[float] | None = None,
        bco_delta: float = 0.0,
        discopop_tau: float = 0.05,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        use_weighting: bool = False,
        ld_alpha: float | None = None,
        ignore_index: int = -100,
        temperature: float = 1.0,
        inplace_backward: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(ignore_index, temperature, inplace_backward, backend)
        types, weights = check_loss_types(loss_type, loss_weights)
        self.f_alpha_divergence_coef = check_f_divergence(f_divergence_type, f_alpha_divergence_coef, types)
        self.f_divergence_type = f_divergence_type
        if not isinstance(use_weighting, bool):
            raise TypeError(f"use_weighting must be a bool, got {type(use_weighting).__name__}")
        unweighable = [kind for kind in types if kind in SORTING_LOSS_TYPES or kind == "sft"]
        if use_weighting and unweighable:
            raise ValueError(f"use_weighting cannot weigh loss_type {unweighable} (see prefopt.dpo_loss's chosen_weights)")
        self.use_weighting = use_weighting
        if ld_alpha is not None:
            ld_alpha = check_real("ld_alpha", ld_alpha)
            if not 0.0 <= ld_alpha <= 1.0:
                raise ValueError(f"ld_alpha must be None or lie in [0, 1], got {ld_alpha}")
        self.ld_alpha = ld_alpha
        self.beta = check_real("beta", beta, positive=True)
        self.loss_type = loss_type if isinstance(loss_type, str) else list(types)
        self.loss_weights = None if loss_weights is None else weights
        self.label_smoothing = check_smoothing(label_smoothing, types)
        self.bco_delta = check_real("bco_delta", bco_delta)
        self.discopop_tau = check_real("discopop_tau", discopop_tau, positive=True)
        self.length_normalized = True
        # The types that sort over the batch, and sft (a batch-level NLL), have no fused kernel.
        self._fusable = not any(kind in SORTING_LOSS_TYPES or kind == "sft" for kind in types)

    def forward(
        self,
        logits: Scores,
        labels: Tensor,
        *,
        ref_logps: Tensor | None = None,
        ref_logits: Scores | None = None,
        margin: Tensor | None = None,
    ) -> tuple[Tensor, Metrics]:
        pairs = _check_batch(logits, labels, paired=True)
        dtype = _policy_dtype(logits, self.backend)
        device = _leading(logits).device
        _check_constant_model("ref_logps", ref_logps, "ref_logits", ref_logits, labels, 2 * pairs, dtype, device)
        if margin is not None:
            _check_sequence_values("margin", margin, pairs, dtype, device)

        token_weights = None
        if self.ld_alpha is not None:
            token_weights = _ld_token_weights(labels, self.ignore_index, pairs, self.ld_alpha, dtype)
        policy = self._completions(logits, labels, token_weights, wpo=self.use_weighting)
        ref = self._constant_logps(ref_logps, ref_logits, labels, dtype, token_weights)
        types, _ = check_loss_types(self.loss_type, self.loss_weights)
        options = {}
        if self.length_normalized or "sft" in types:
            options = {"chosen_lengths": policy.tokens[:pairs], "rejected_lengths": policy.tokens[pairs:]}
        if policy.aligned is not None:
            completion_weights = wpo_weights(policy.aligned / policy.tokens.clamp(min=1).to(policy.aligned.dtype))
            options.update(chosen_weights=completion_weights[:pairs], rejected_weights=completion_weights[pairs:])
        if token_weights is not None and "sft" in types:
            # TRL's sft reads the unweighted log-probs.
            options["sft_chosen_logps"] = policy.plain_logps[:pairs]
        output, metrics = dpo_loss(
            policy.logps[:pairs],
            policy.logps[pairs:],
            ref[:pairs],
            ref[pairs:],
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            margin=margin,
            loss_weights=self.loss_weights,
            bco_delta=self.bco_delta,
            discopop_tau=self.discopop_tau,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            backend=self._loss_backend,
            return_metrics=True,
            **options,
        )
        loss = output.loss
        metrics.update(_paired_metrics(policy, pairs))
        return loss, metrics

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, " + super().extra_repr()


class IPOLoss(DPOLoss):
    r"""IPO from policy logits: :class:`DPOLoss` with ``loss_type="ipo"``.

    Per pair (h - 1/(2β))², h the difference of the chosen and rejected log-ratios, each divided
    by its completion token count with ``length_normalized=True`` (TRL's convention, the default)
    or on sums with ``False`` (the paper's). The other arguments and the call are
    :class:`DPOLoss`'s.
    """

    def __init__(
        self,
        beta: float = 0.1,
        *,
        length_normalized: bool = True,
        ignore_index: int = -100,
        temperature: float = 1.0,
        inplace_backward: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            beta, "ipo", ignore_index=ignore_index, temperature=temperature, inplace_backward=inplace_backward,
            backend=backend,
        )
        if not isinstance(length_normalized, bool):
            raise TypeError(f"length_normalized must be a bool, got {type(length_normalized).__name__}")
        self.length_normalized = length_normalized


class KTOLoss(_FromLogits):
    r"""KTO from policy logits of unpaired examples (:func:`prefopt.kto_loss`).

    Args:
        beta: β > 0.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
        desirable_weight, undesirable_weight: λ_D, λ_U >= 0.
        process_group: the group :func:`prefopt.kto_kl` averages the KL estimate over (None:
            this rank only).
        ignore_index, temperature, inplace_backward, backend: as in :class:`DPOLoss`.

    Call: ``loss, metrics = kto(logits, labels, desirable, ref_logps=... or ref_logits=...,
    kl_logps=... or kl_logits=..., ref_kl_logps=... or ref_kl_logits=..., kl_labels=...)``.
    logits ``[N, T, V]``, labels ``[N, T]``, desirable ``[N]`` bool. The KL reference point of
    ``kto`` comes from mismatched completions (prompt i with another example's answer), as TRL
    builds them: the policy's summed log-probs ``kl_logps`` ``[M]`` or its logits
    ``kl_logits`` ``[M, T', V]`` (reduced under no_grad, as TRL does), the reference's
    ``ref_kl_logps`` or ``ref_kl_logits``, and ``kl_labels`` ``[M, T']`` for whichever are
    logits. ``apo_zero_unpaired`` has no reference point and takes none of them.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "kto",
        *,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        process_group: ProcessGroup | None = None,
        ignore_index: int = -100,
        temperature: float = 1.0,
        inplace_backward: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(ignore_index, temperature, inplace_backward, backend)
        self.loss_type = check_loss_type(loss_type, KTO_LOSS_TYPES)
        self.beta = check_real("beta", beta, positive=True)
        self.desirable_weight = check_real("desirable_weight", desirable_weight, nonnegative=True)
        self.undesirable_weight = check_real("undesirable_weight", undesirable_weight, nonnegative=True)
        self.process_group = process_group

    def _check_kl_inputs(self, kl: dict[str, object], dtype: torch.dtype, device: torch.device) -> None:
        given = [name for name, value in kl.items() if value is not None]
        if self.loss_type != "kto":
            if given:
                raise ValueError(f"{given[0]}: loss_type {self.loss_type!r} has no KL reference point; pass none")
            return
        for logps_name, logits_name in (("kl_logps", "kl_logits"), ("ref_kl_logps", "ref_kl_logits")):
            if kl[logps_name] is None and kl[logits_name] is None:
                raise ValueError(
                    f"loss_type 'kto' needs the KL completions: pass {logps_name} or {logits_name} (with kl_labels)"
                )
        kl_labels = kl["kl_labels"]
        if kl["kl_logits"] is not None or kl["ref_kl_logits"] is not None:
            if not isinstance(kl_labels, Tensor):
                raise TypeError(
                    f"kl_labels must be a torch.Tensor [M, T'] scoring kl_logits/ref_kl_logits, "
                    f"got {type(kl_labels).__name__}"
                )
            if kl_labels.dim() != 2:
                raise ValueError(f"kl_labels must have shape [M, T'], got {tuple(kl_labels.shape)}")
            rows = kl_labels.shape[0]
        elif kl_labels is not None:
            raise ValueError("kl_labels: only used to score kl_logits or ref_kl_logits, and neither was given")
        else:
            # Both are log-probs: the first one sets M, and the second must agree.
            kl_logps = kl["kl_logps"]
            rows = kl_logps.shape[0] if isinstance(kl_logps, Tensor) and kl_logps.dim() == 1 else 1
        for logps_name, logits_name in (("kl_logps", "kl_logits"), ("ref_kl_logps", "ref_kl_logits")):
            _check_constant_model(
                logps_name, kl[logps_name], logits_name, kl[logits_name], kl_labels, rows, dtype, device, "kl_labels"
            )

    def forward(
        self,
        logits: Scores,
        labels: Tensor,
        desirable: Tensor,
        *,
        ref_logps: Tensor | None = None,
        ref_logits: Scores | None = None,
        kl_logps: Tensor | None = None,
        kl_logits: Scores | None = None,
        ref_kl_logps: Tensor | None = None,
        ref_kl_logits: Scores | None = None,
        kl_labels: Tensor | None = None,
    ) -> tuple[Tensor, Metrics]:
        rows = _check_batch(logits, labels, paired=False)
        dtype = _policy_dtype(logits, self.backend)
        device = _leading(logits).device
        _check_constant_model("ref_logps", ref_logps, "ref_logits", ref_logits, labels, rows, dtype, device)
        if not isinstance(desirable, Tensor):
            raise TypeError(f"desirable must be a torch.bool tensor of shape [{rows}], got {type(desirable).__name__}")
        if desirable.dtype != torch.bool:
            raise TypeError(f"desirable must be a torch.bool tensor, got dtype {desirable.dtype}")
        if desirable.shape != (rows,):
            raise ValueError(
                f"desirable must have shape [{rows}], one flag per row of logits, got {tuple(desirable.shape)}"
            )
        if desirable.device != device:
            raise ValueError(f"desirable must be on device {device} like logits, got {desirable.device}")
        kl_inputs = {"kl_logps": kl_logps, "kl_logits": kl_logits, "ref_kl_logps": ref_kl_logps,
                     "ref_kl_logits": ref_kl_logits, "kl_labels": kl_labels}
        self._check_kl_inputs(kl_inputs, dtype, device)

        policy = self._completions(logits, labels)
        ref = self._constant_logps(ref_logps, ref_logits, labels, dtype)
        kl: float | Tensor = 0.0
        if self.loss_type == "kto":
            policy_kl = self._constant_logps(kl_logps, kl_logits, kl_labels, dtype)
            reference_kl = self._constant_logps(ref_kl_logps, ref_kl_logits, kl_labels, dtype)
            kl = kto_kl(policy_kl, reference_kl, self.process_group)
        output, metrics = kto_loss(
            policy.logps,
            ref,
            desirable,
            kl=kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            loss_type=self.loss_type,
            backend=self._loss_backend,
            return_metrics=True,
        )
        tokens = policy.tokens.to(dtype)
        zero = torch.zeros_like(policy.mean_logits)
        undesirable = ~desirable

        def class_mean(values: Tensor, members: Tensor, weights: Tensor) -> Tensor:
            return torch.where(members, values, zero).sum() / torch.where(members, weights, zero).sum()

        metrics.update({
            "logits/chosen": class_mean(policy.mean_logits, desirable, tokens),
            "logits/rejected": class_mean(policy.mean_logits, undesirable, tokens),
            "entropy": _token_mean(policy.entropy, policy.tokens),
            "completion_length/chosen": class_mean(tokens, desirable, torch.ones_like(tokens)),
            "completion_length/rejected": class_mean(tokens, undesirable, torch.ones_like(tokens)),
        })
        if isinstance(kl, Tensor):
            metrics["kl"] = kl
        return output.loss, metrics

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, " + super().extra_repr()


class SimPOLoss(_FromLogits):
    r"""SimPO from policy logits (:func:`prefopt.simpo_loss`): no reference model.

    Args:
        beta: β > 0 (SimPO's default 2.0).
        gamma: γ, the target margin in loss units (TRL's ``simpo_gamma``).
        label_smoothing: ε in [0, 0.5].
        ignore_index, temperature, inplace_backward, backend: as in :class:`DPOLoss`.

    Call: ``loss, metrics = simpo(logits, labels)`` with the ``[chosen; rejected]`` layout.
    """

    def __init__(
        self,
        beta: float = 2.0,
        gamma: float = 0.5,
        *,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        temperature: float = 1.0,
        inplace_backward: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(ignore_index, temperature, inplace_backward, backend)
        self.beta = check_real("beta", beta, positive=True)
        self.gamma = check_real("gamma", gamma)
        self.label_smoothing = check_smoothing(label_smoothing, ["simpo"])

    def forward(self, logits: Scores, labels: Tensor) -> tuple[Tensor, Metrics]:
        pairs = _check_batch(logits, labels, paired=True)
        policy = self._completions(logits, labels)
        output, metrics = simpo_loss(
            policy.logps[:pairs],
            policy.logps[pairs:],
            policy.tokens[:pairs],
            policy.tokens[pairs:],
            beta=self.beta,
            gamma=self.gamma,
            label_smoothing=self.label_smoothing,
            backend=self._loss_backend,
            return_metrics=True,
        )
        metrics.update(_paired_metrics(policy, pairs))
        return output.loss, metrics

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, " + super().extra_repr()


class ORPOLoss(_FromLogits):
    r"""ORPO from policy logits (:func:`prefopt.orpo_loss`): no reference model.

    The odds ratio is on per-token average log-probs (TRL's), and the NLL term is the token-mean
    NLL over the chosen completions' tokens, added once to the batch loss (TRL's cross-entropy
    of the chosen sequences, restricted to the completion as the labels mark it).

    Args:
        beta: λ > 0, the weight of the odds-ratio term.
        ignore_index, temperature, inplace_backward, backend: as in :class:`DPOLoss`.

    Call: ``loss, metrics = orpo(logits, labels)`` with the ``[chosen; rejected]`` layout.
    """

    def __init__(
        self,
        beta: float = 0.1,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        inplace_backward: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(ignore_index, temperature, inplace_backward, backend)
        self.beta = check_real("beta", beta, positive=True)

    def forward(self, logits: Scores, labels: Tensor) -> tuple[Tensor, Metrics]:
        pairs = _check_batch(logits, labels, paired=True)
        policy = self._completions(logits, labels)
        # An empty completion averages to 0, never NaN.
        counts = policy.tokens.clamp(min=1).to(policy.logps.dtype)
        average = policy.logps / counts
        chosen_nll = -policy.logps[:pairs].sum() / policy.tokens[:pairs].sum().clamp(min=1).to(policy.logps.dtype)
        output, metrics = orpo_loss(
            average[:pairs],
            average[pairs:],
            beta=self.beta,
            chosen_nll=chosen_nll,
            backend=self._loss_backend,
            return_metrics=True,
        )
        metrics.update(_paired_metrics(policy, pairs))
        return output.loss, metrics

    def extra_repr(self) -> str:
        return f"beta={self.beta}, " + super().extra_repr()
