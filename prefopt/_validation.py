"""Input checks, run before any kernel.

Shape, dtype, device and scalar checks are free on the host and raise at once. Checks of values
that live on an accelerator (the label range, cu_seqlens) must not synchronize: there they are
asynchronous device assertions, queued ahead of the kernels. On CPU they are plain checks that
raise ValueError.
"""

import math
from collections.abc import Sequence

import torch

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
