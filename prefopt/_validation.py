"""Input checks, run before any kernel.

Shape, dtype, device and scalar checks are free on the host and raise at once. Checks of values
that live on an accelerator (the label range, cu_seqlens) must not synchronize: there they are
asynchronous device assertions, queued ahead of the kernels. On CPU they are plain checks that
raise ValueError.
"""

import math
import numbers
from collections.abc import Sequence

import torch

from ._codes import DPO_LOSS_TYPES, F_DIVERGENCE_TYPES, REDUCTIONS

_INTEGER_DTYPES = (torch.int32, torch.int64)


def _must_check_asynchronously(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cpu" or torch.compiler.is_compiling()


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(
            f"{name}: expected a floating-point tensor (bfloat16, float16, float32 or float64), "
            f"got {logits.dtype}"
        )
    if logits.dim() == 0:
        raise ValueError(f"{name}: expected shape [..., V], got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name}: the vocabulary dimension is empty (shape {tuple(logits.shape)})")
    if logits.stride(-1) != 1 and logits.shape[-1] != 1:
        raise ValueError(
            f"{name}: the last (vocabulary) dimension must be contiguous (stride 1), got strides "
            f"{tuple(logits.stride())}; other strides may be anything, e.g. logits[:, :-1]"
        )


def check_rows_do_not_overlap(logits: torch.Tensor, name: str = "logits") -> None:
    """The rows of ``logits`` [..., V] lie in distinct memory, as an in-place gradient needs: where
    rows share elements (an expanded view, stride 0) each row's gradient would overwrite another's.

    Decided from the strides alone: sorted by stride, each dimension must step past everything the
    smaller-stride dimensions span. That is exact for expanded and sliced views; a layout it cannot
    prove disjoint is refused too.
    """
    span = 1
    dims = sorted(((stride, size) for size, stride in zip(logits.shape, logits.stride()) if size > 1))
    for stride, size in dims:
        if stride < span:
            raise ValueError(
                f"{name}: inplace_backward=True needs rows that do not share memory, got shape "
                f"{tuple(logits.shape)} with strides {tuple(logits.stride())} (an expanded or "
                "overlapping view); pass a tensor with its own storage per row, or inplace_backward=False"
            )
        span += stride * (size - 1)


def check_labels(labels: torch.Tensor, logits: torch.Tensor, name: str = "labels") -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name}: expected an int64 or int32 tensor, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name}: expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"{name}: expected a tensor on {logits.device} like logits, got {labels.device}")


def check_transform(temperature: float, softcap: float | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature: expected a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap: expected a float or None, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap: expected None or a finite value > 0, got {softcap}")


_INT64 = torch.iinfo(torch.int64)


def check_ignore_index(ignore_index: int | None) -> None:
    if ignore_index is None:
        return
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int or None, got {type(ignore_index).__name__}")
    # Compared with int64 labels, and passed to the kernels, as a 64-bit integer.
    if not _INT64.min <= ignore_index <= _INT64.max:
        raise ValueError(f"ignore_index: expected a 64-bit integer in [{_INT64.min}, {_INT64.max}], got {ignore_index}")


def check_stats(stats: Sequence[str], valid: Sequence[str]) -> frozenset[str]:
    if isinstance(stats, str):
        raise TypeError(f"stats: expected a sequence of names, got the string {stats!r}; write ({stats!r},)")
    unknown = [name for name in stats if name not in valid]
    if unknown:
        raise ValueError(f"stats: unknown statistic(s) {unknown}; valid: {list(valid)}")
    return frozenset(stats)


def check_label_values(labels: torch.Tensor, vocab_size: int, ignore_index: int | None) -> torch.Tensor:
    """Every label is in [0, vocab_size) or equals ignore_index.

    Returns the labels to use from here on: ``labels`` itself, except under torch.compile on a
    CPU, where they come out of the opaque operator ``prefopt::checked_labels`` so that the
    compiled graph raises eager's ValueError (an asynchronous assertion would raise a
    RuntimeError there, and a check whose result nothing uses would be dropped from the graph).
    """
    if labels.device.type == "cpu" and torch.compiler.is_compiling():
        return torch.ops.prefopt.checked_labels(labels, vocab_size, ignore_index)
    if _must_check_asynchronously(labels):
        torch._assert_async(_labels_in_range(labels, vocab_size, ignore_index).all(),
                            _label_range_message(vocab_size, ignore_index))
    else:
        _raise_on_bad_labels(labels, vocab_size, ignore_index)
    return labels


def _labels_in_range(labels: torch.Tensor, vocab_size: int, ignore_index: int | None) -> torch.Tensor:
    in_range = (labels >= 0) & (labels < vocab_size)
    if ignore_index is not None:
        in_range |= labels == ignore_index
    return in_range


def _label_range_message(vocab_size: int, ignore_index: int | None) -> str:
    return f"labels: every label must be in [0, {vocab_size}) or equal ignore_index={ignore_index}"


def _raise_on_bad_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int | None) -> None:
    """The host check of CPU labels (it reads their values)."""
    in_range = _labels_in_range(labels, vocab_size, ignore_index)
    if not bool(in_range.all()):
        bad = labels[~in_range]
        raise ValueError(f"{_label_range_message(vocab_size, ignore_index)}; found {bad[0].item()} ({bad.numel()} such)")


@torch.library.custom_op("prefopt::checked_labels", mutates_args=())
def checked_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int | None) -> torch.Tensor:
    """A copy of CPU ``labels`` [...] (int32/int64) once they pass ``check_label_values``'s host
    check: under torch.compile the downstream kernels read the copy, so the check always runs."""
    _raise_on_bad_labels(labels, vocab_size, ignore_index)
    return labels.clone()


@checked_labels.register_fake
def _(labels: torch.Tensor, vocab_size: int, ignore_index: int | None) -> torch.Tensor:
    return torch.empty_like(labels)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> None:
    """cu_seqlens is [S + 1] int32/int64 offsets, 0 = c_0 <= c_1 <= ... <= c_S = total."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"cu_seqlens: expected an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"cu_seqlens: expected shape [S + 1] with S >= 0, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: expected a tensor on {device} like logits, got {cu_seqlens.device}")
    valid = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (cu_seqlens.diff() >= 0).all()
    message = f"cu_seqlens: expected non-decreasing offsets from 0 to the packed length {total}"
    if _must_check_asynchronously(cu_seqlens):
        torch._assert_async(valid, message)
    elif not bool(valid):
        raise ValueError(f"{message}, got {cu_seqlens.tolist()}")


def check_lm_head_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                         logit_scale: float) -> None:
    """hidden [..., H] floating point, weight [V, H] and bias [V] (or None) of its dtype and
    device, labels [...] int64/int32, logit_scale a finite float > 0."""
    for name, tensor in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not hidden.dtype.is_floating_point:
        raise TypeError("hidden: expected a floating-point tensor (bfloat16, float16, float32 or float64), "
                        f"got {hidden.dtype}")
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden: expected shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    hidden_size = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden_size:
        raise ValueError(f"weight: expected shape [V, {hidden_size}] (V >= 1, H = hidden.shape[-1]), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} like hidden, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected a tensor on {hidden.device} like hidden, got {weight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias: expected shape [{weight.shape[0]}] (weight.shape[0]), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: expected dtype {weight.dtype} like weight, got {bias.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias: expected a tensor on {weight.device} like weight, got {bias.device}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels: expected an int64 or int32 tensor, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), "
                         f"got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels: expected a tensor on {hidden.device} like hidden, got {labels.device}")
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise TypeError(f"logit_scale: expected a float, got {type(logit_scale).__name__}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale: expected a finite value > 0, got {logit_scale}")


# The loss arguments: shapes, dtypes, devices and Python scalars only, so none touches device values.

# Types whose losses pair quantiles of the whole batch (a sort), not examples: no fused kernel.
SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})

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
MARGIN_LOSS_TYPES = frozenset(
    {"sigmoid", "robust", "hinge", "ipo", "exo_pair", "apo_down", "discopop", "sigmoid_norm"}
)

# The types whose log-ratios TRL lets an f-divergence replace by its scores (TRL 1.16's set).
_F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)


def check_vector(name: str, t: object, like: torch.Tensor | None = None, like_name: str = "") -> None:
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


def check_lengths(name: str, t: object, like: torch.Tensor, like_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token counts with shape [B], got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must hold integer or floating token counts, got dtype {t.dtype}")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} like {like_name}, got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on device {like.device} like {like_name}, got {t.device}")


def check_real(name: str, value: object, *, positive: bool = False, nonnegative: bool = False) -> float:
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


def check_smoothing(label_smoothing: object, loss_types: Sequence[str]) -> float:
    eps = check_real("label_smoothing", label_smoothing)
    for kind in loss_types:
        low, low_in, high, high_in = _SMOOTHING_RANGES.get(kind, _ANY_SMOOTHING)
        if (eps < low or (eps == low and not low_in)) or (eps > high or (eps == high and not high_in)):
            interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise ValueError(f"label_smoothing must lie in {interval} for loss_type {kind!r}, got {eps}")
    return eps


def check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")


def check_loss_type(loss_type: object, valid: tuple[str, ...]) -> str:
    if not isinstance(loss_type, str) or loss_type not in valid:
        raise ValueError(f"loss_type must be one of {list(valid)}, got {loss_type!r}")
    return loss_type


def check_loss_types(loss_type: object, loss_weights: object) -> tuple[list[str], list[float]]:
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(types, Sequence) or len(types) == 0:
        raise ValueError(
            f"loss_type must be one of {list(DPO_LOSS_TYPES)} or a non-empty list of them, got {loss_type!r}"
        )
    for kind in types:
        check_loss_type(kind, DPO_LOSS_TYPES)
    if loss_weights is None:
        return list(types), [1.0] * len(types)
    if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
        raise TypeError(f"loss_weights must be a list of floats, got {type(loss_weights).__name__}")
    if len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights must have one weight per loss_type ({len(types)}), got {len(loss_weights)}"
        )
    return list(types), [check_real("loss_weights", w) for w in loss_weights]


def check_constant(name: str, value: object, like: torch.Tensor) -> None:
    """A constant of the loss: a real Python number, or a one-element floating tensor."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating 0-d tensor, got dtype {value.dtype}")
        if value.dim() > 1 or value.numel() != 1:
            raise ValueError(f"{name} must be a float or a 0-d tensor, got shape {tuple(value.shape)}")
        if value.device != like.device:
            raise ValueError(f"{name} must be on device {like.device}, got {value.device}")
    else:
        check_real(name, value)


def check_length_pair(
    chosen_lengths: object, rejected_lengths: object, like: torch.Tensor, like_name: str, required_by: str | None
) -> None:
    if chosen_lengths is None and rejected_lengths is None:
        if required_by is not None:
            raise ValueError(f"chosen_lengths and rejected_lengths are required by {required_by}")
        return
    if chosen_lengths is None or rejected_lengths is None:
        missing = "chosen_lengths" if chosen_lengths is None else "rejected_lengths"
        raise ValueError(f"{missing} must be given together with the other completion lengths")
    check_lengths("chosen_lengths", chosen_lengths, like, like_name)
    check_lengths("rejected_lengths", rejected_lengths, like, like_name)



def check_f_divergence(f_divergence_type: object, coef: object, loss_types: Sequence[str]) -> float:
    """TRL's f-DPO options: the divergence's name, and α (finite) for alpha_divergence."""
    if not isinstance(f_divergence_type, str) or f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCE_TYPES)}, got {f_divergence_type!r}")
    coef = check_real("f_alpha_divergence_coef", coef)
    if f_divergence_type != "reverse_kl":
        unsupported = [kind for kind in loss_types if kind not in _F_DIVERGENCE_LOSS_TYPES]
        if unsupported:
            raise ValueError(
                f"f_divergence_type={f_divergence_type!r} is only defined for loss_type in "
                f"{sorted(_F_DIVERGENCE_LOSS_TYPES)}, got loss_type {unsupported}"
            )
    return coef


def check_pair_weights(
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
    check_vector("chosen_weights", chosen_weights, like, like_name)
    check_vector("rejected_weights", rejected_weights, like, like_name)
    sorting = [kind for kind in loss_types if kind in SORTING_LOSS_TYPES]
    if sorting:
        raise ValueError(f"chosen_weights (WPO) cannot weigh loss_type {sorting}, which pairs quantiles of the batch")
    if "sft" in loss_types:
        # TRL 1.16 fails on this combination (it scales its expanded batch NLL in place), so
        # there is no reference value to match.
        raise ValueError("chosen_weights (WPO) cannot weigh loss_type 'sft', which TRL 1.16 does not define")
