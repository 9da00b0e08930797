"""Validation of the loss arguments: shapes, dtypes, devices and Python scalars only, so it never
touches device values."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from .._codes import DPO_LOSS_TYPES, F_DIVERGENCE_TYPES, REDUCTIONS


# Types whose losses pair quantiles of the whole batch (a sort), not examples: no fused kernel.
_SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})

# Allowed label_smoothing ε per loss type: (low, low_inclusive, high, high_inclusive). Types that
# do not use ε accept the generic [0, 1). cDPO-style smoothing past 0.5 would mean trusting the
# flipped label more than the given one, rDPO divides by 1 - 2ε, and EXO takes log ε.
_ANY_SMOOTHING = (0.0, True, 1.0, False)
_SMOOTHING_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "sigmoid": (0.0, True, 0.5, True),
    "robust": (0.0, True, 0.5, False),
    "exo_pair": (0.0, False, 1.0, False),
    "aot": (0.0, True, 0.5, True),
    "aot_unpaired": (0.0, True, 0.5, True),
    "simpo": (0.0, True, 0.5, True),
}

# DPO types with a βΔ term, where a per-pair margin has one meaning: βΔ - margin. The others score
# each completion on its own or sort across the batch, where a per-pair margin has none.
_MARGIN_LOSS_TYPES = frozenset(
    {"sigmoid", "robust", "hinge", "ipo", "exo_pair", "apo_down", "discopop", "sigmoid_norm"}
)

# The types whose log-ratios TRL lets an f-divergence replace by its scores (TRL 1.16's set).
_F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)


def _check_vector(name: str, t: object, like: torch.Tensor | None = None, like_name: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B], got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32 or float64), got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D with shape [B], got shape {tuple(t.shape)}")
    if like is None:
        if t.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one example, got shape {tuple(t.shape)}")
        return
    if t.shape != like.shape:
        raise ValueError(
            f"{name} must have shape {tuple(like.shape)} like {like_name}, got shape {tuple(t.shape)}"
        )
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have dtype {like.dtype} like {like_name}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on device {like.device} like {like_name}, got {t.device}")


def _check_lengths(name: str, t: object, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token counts with shape [B], got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integer or floating token counts, got dtype {t.dtype}")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} like {like_name}, got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on device {like.device} like {like_name}, got {t.device}")


def _check_real(name: str, value: object, *, positive: bool = False, nonnegative: bool = False) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real Python number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_smoothing(label_smoothing: object, loss_types: Sequence[str]) -> float:
    eps = _check_real("label_smoothing", label_smoothing)
    for kind in loss_types:
        low, low_in, high, high_in = _SMOOTHING_RANGES.get(kind, _ANY_SMOOTHING)
        if (eps < low or (eps == low and not low_in)) or (eps > high or (eps == high and not high_in)):
            interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise ValueError(f"label_smoothing must lie in {interval} for loss_type {kind!r}, got {eps}")
    return eps


def _check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")


def _check_loss_type(loss_type: object, valid: tuple[str, ...]) -> str:
    if not isinstance(loss_type, str) or loss_type not in valid:
        raise ValueError(f"loss_type must be one of {list(valid)}, got {loss_type!r}")
    return loss_type


def _check_loss_types(loss_type: object, loss_weights: object) -> tuple[list[str], list[float]]:
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(types, Sequence) or len(types) == 0:
        raise ValueError(
            f"loss_type must be one of {list(DPO_LOSS_TYPES)} or a non-empty list of them, got {loss_type!r}"
        )
    for kind in types:
        _check_loss_type(kind, DPO_LOSS_TYPES)
    if loss_weights is None:
        return list(types), [1.0] * len(types)
    if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
        raise TypeError(f"loss_weights must be a list of floats, got {type(loss_weights).__name__}")
    if len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights must have one weight per loss_type ({len(types)}), got {len(loss_weights)}"
        )
    return list(types), [_check_real("loss_weights", w) for w in loss_weights]


def _check_constant(name: str, value: object, like: torch.Tensor) -> None:
    """A constant of the loss: a real Python number, or a one-element floating tensor."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating 0-d tensor, got dtype {value.dtype}")
        if value.dim() > 1 or value.numel() != 1:
            raise ValueError(f"{name} must be a float or a 0-d tensor, got shape {tuple(value.shape)}")
        if value.device != like.device:
            raise ValueError(f"{name} must be on device {like.device}, got {value.device}")
    else:
        _check_real(name, value)


def _check_length_pair(
    chosen_lengths: object, rejected_lengths: object, like: torch.Tensor, like_name: str, required_by: str | None
) -> None:
    if chosen_lengths is None and rejected_lengths is None:
        if required_by is not None:
            raise ValueError(f"chosen_lengths and rejected_lengths are required by {required_by}")
        return
    if chosen_lengths is None or rejected_lengths is None:
        missing = "chosen_lengths" if chosen_lengths is None else "rejected_lengths"
        raise ValueError(f"{missing} must be given together with the other completion lengths")
    _check_lengths("chosen_lengths", chosen_lengths, like, like_name)
    _check_lengths("rejected_lengths", rejected_lengths, like, like_name)



def _check_f_divergence(f_divergence_type: object, coef: object, loss_types: Sequence[str]) -> float:
    """TRL's f-DPO options: the divergence's name, and α (finite) for alpha_divergence."""
    if not isinstance(f_divergence_type, str) or f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCE_TYPES)}, got {f_divergence_type!r}")
    coef = _check_real("f_alpha_divergence_coef", coef)
    if f_divergence_type != "reverse_kl":
        unsupported = [kind for kind in loss_types if kind not in _F_DIVERGENCE_LOSS_TYPES]
        if unsupported:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} is only defined for loss_type in "
                f"{sorted(_F_DIVERGENCE_LOSS_TYPES)}, got loss_type {unsupported}"
            )
    return coef


def _check_pair_weights(
    chosen_weights: object, rejected_weights: object, like: torch.Tensor, like_name: str, loss_types: Sequence[str]
) -> None:
    """WPO's per-completion weights: both or neither, [B] like the log-probs; not with the types
    that sort across the batch, where a pair's loss is not its own (TRL refuses them too), nor
    with sft."""
    if chosen_weights is None and rejected_weights is None:
        return
    if chosen_weights is None or rejected_weights is None:
        missing = "chosen_weights" if chosen_weights is None else "rejected_weights"
        raise ValueError(f"{missing} must be given together with the other completion weights")
    _check_vector("chosen_weights", chosen_weights, like, like_name)
    _check_vector("rejected_weights", rejected_weights, like, like_name)
    sorting = [kind for kind in loss_types if kind in _SORTING_LOSS_TYPES]
    if sorting:
        raise ValueError(f"chosen_weights (WPO) cannot weigh loss_type {sorting}, which pairs quantiles of the batch")
    if "sft" in loss_types:
        # TRL 1.16 fails on this combination (it scales its expanded batch NLL in place), so
        # there is no reference value to match.
        raise ValueError("chosen_weights (WPO) cannot weigh loss_type 'sft', which TRL 1.16 does not define")
