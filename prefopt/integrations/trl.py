"""Route TRL's log-prob computations through prefopt: one line before building a trainer.

    import prefopt.integrations.trl
    prefopt.integrations.trl.enable()
    trainer = DPOTrainer(...)        # or KTOTrainer, or any TRL trainer; nothing else changes
    trainer.train()

What ``enable()`` replaces, while it is on:

- The chunked log-prob function behind TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``,
  which DPOTrainer, KTOTrainer, SFTTrainer, GRPOTrainer and RLOOTrainer install on their models):
  ``prefopt.linear_token_stats`` computes the log-probs and exactly the statistics TRL asks for
  (entropy, log sum p^2, mean logit, is-top-1), with TRL's temperature, ``final_logit_softcapping``
  and logit scale, in TRL's compute dtype (autocast's when autocast is on, else the hidden
  states'; a ``cast_lm_head_to_fp32`` head arrives in float32 with autocast off). TRL's forward is
  unchanged around it: on CUDA/XPU it passes only the rows whose label is scored, elsewhere every
  row, and it scatters the results back and zeroes ignored positions itself. As in TRL, gradients
  flow through the log-probs and the entropy; log sum p^2, the mean logit and is-top-1 carry none.
- ``trl.trainer.utils.selective_log_softmax`` and ``selective_log_softmax_and_entropy``, in every
  TRL module that imported them by name: ``prefopt.selective_log_softmax`` (top-K index and
  row_mask of any dtype included) / ``prefopt.token_stats`` on the logits, with one row-mask rule
  (``prefopt.logprobs.row_mask_labels``). The top-K form of ``..._and_entropy`` stays TRL's own.

Outputs are float32, as from TRL's GPU kernels (float64 for float64 logits, as TRL). TRL's metrics keep their names; their values agree
with TRL's to float32 rounding (in bfloat16, prefopt keeps the logits in float32 where TRL rounds
each logits tile to bfloat16, so the two differ at bfloat16 rounding). TRL's ``chunk_size`` is not
used: prefopt sizes its own tiles.

Beyond one process (each tested on 2 CPU processes against TRL's own step and against one process
on the whole batch, ``tests/test_trl_engines.py``):

- FSDP2: TRL gathers a DTensor head into a full tensor before the call, and FSDP2 reduce-scatters
  its gradient; prefopt's own functions gather a DTensor weight themselves (``prefopt.logprobs.linear``).
- DeepSpeed ZeRO-3: TRL gathers the partitioned head around the forward; prefopt's backward gathers
  it again (``prefopt.integrations.transformers.zero3_gathered``) and returns the full gradient,
  which DeepSpeed's hooks reduce-scatter onto the partitions.
- Padding-free batches (one packed row, ``position_ids``, pre-shifted ``shift_labels``): TRL's
  fused head passes them through unchanged. (TRL 1.16's DPOTrainer turns ``padding_free=True``
  off with a warning; its SFTTrainer packs.)

The TRL versions supported are ``SUPPORTED_TRL_VERSIONS``: the replaced functions are TRL
internals whose call signature and outputs may change in any minor release, and a mismatch would
silently train on wrong gradients, so ``enable()`` refuses other versions with an error naming the
installed one rather than warning.
"""

import contextlib
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

from .._types import STAT_NAMES
from .. import backends
from ..backends import BACKEND_CHOICES
from ..logprobs.api import row_mask_labels, selective_logprobs, selective_output_dtype, token_stats
from .transformers import lm_head_token_stats

Tensor = torch.Tensor

SUPPORTED_TRL_VERSIONS = ">=1.16.0,<1.17"
# The module whose globals TRL's fused LM head and trainers read the replaced names from.
_TRL_UTILS = "trl.trainer.utils"
_originals: dict[str, Any] = {}
_backend = "auto"
_enabled = False


def _check_trl_version() -> None:
    try:
        import trl
    except ImportError as error:
        raise ImportError("prefopt.integrations.trl needs TRL: pip install 'prefopt[trl]'") from error
    from packaging.specifiers import SpecifierSet

    if trl.__version__ not in SpecifierSet(SUPPORTED_TRL_VERSIONS, prereleases=True):
        raise RuntimeError(
            f"prefopt.integrations.trl supports TRL {SUPPORTED_TRL_VERSIONS}, but TRL {trl.__version__} is "
            "installed: it replaces TRL internals that may differ in this version. Install a supported TRL "
            "(pip install 'prefopt[trl]')."
        )


class _FusedLMHeadLogProbs:
    """Stands in for TRL's ``ChunkedLogProbFunction`` where ``add_fused_lm_head``'s forward calls
    ``_ChunkedLogProbFunction.apply``, with its arguments and its 5-tuple of outputs."""

    @staticmethod
    def apply(
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = STAT_NAMES,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1) of hidden [N, H] against
        targets [N] (every target in [0, V)), each [N] float32 (is_top1 bool); a statistic not
        named in ``outputs`` is None. ``chunk_size`` is TRL's tiling and is not used."""
        result = lm_head_token_stats(
            hidden, weight, bias, targets, stats=tuple(name for name in STAT_NAMES if name in outputs),
            ignore_index=None, temperature=temperature, softcap=final_logit_softcapping,
            logit_scale=float(logit_scale), backend=_backend,
        )

        def without_gradient(statistic: Tensor | None) -> Tensor | None:
            return None if statistic is None else statistic.detach()

        return (result.logps, result.entropy, without_gradient(result.log_sum_sq_probs),
                without_gradient(result.mean_logits), result.is_top1)


def _has_top_k(logits: Tensor, index: Tensor) -> bool:
    return isinstance(index, torch.Tensor) and isinstance(logits, torch.Tensor) and index.dim() == logits.dim()


def selective_log_softmax(
    logits: Tensor,
    index: Tensor,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
) -> Tensor:
    """TRL's ``selective_log_softmax`` through prefopt: ``prefopt.selective_log_softmax`` (the
    same semantics: index [...] or top-K [..., K], row_mask of any dtype, float64 kept) on the
    backend given to :func:`enable`."""
    return selective_logprobs(logits, index, temperature, row_mask, backend=_backend)


def selective_log_softmax_and_entropy(
    logits: Tensor,
    index: Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """TRL's ``selective_log_softmax_and_entropy`` through prefopt, in one pass over the logits.

    Args:
        logits: [..., V]; index: [...] int64/int32 in [0, V) (an index [..., K] goes to TRL's own
            function); row_mask: optional mask of index's shape and any dtype, zero where a
            position is skipped (``prefopt.logprobs.row_mask_labels``, the rule
            ``selective_log_softmax`` uses too).
        entropy_requires_grad: False detaches the entropy.
        temperature: > 0; the softmax is over logits / temperature.

    Returns:
        (logps, entropy), each [...], 0 where row_mask is zero: float64 for float64 logits, else
        float32, as ``selective_log_softmax``.
    """
    if _has_top_k(logits, index):
        return _originals["selective_log_softmax_and_entropy"](logits, index, entropy_requires_grad, temperature,
                                                               row_mask)
    labels, ignore_index = row_mask_labels(index, row_mask)
    result = token_stats(logits, labels, stats=("entropy",), ignore_index=ignore_index, temperature=temperature,
                         backend=backends.resolve("selective", _backend, logits.device, logits.dtype))
    logps, entropy = (value.to(selective_output_dtype(logits)) for value in (result.logps, result.entropy))
    return logps, entropy if entropy_requires_grad else entropy.detach()


# Name in trl.trainer.utils -> prefopt's stand-in. The fused LM head looks _ChunkedLogProbFunction
# up in that module's globals on every call; trainers import the other two by name.
_REPLACEMENTS: dict[str, Any] = {
    "_ChunkedLogProbFunction": _FusedLMHeadLogProbs,
    "selective_log_softmax": selective_log_softmax,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
}
# Replaced wherever a TRL module holds them; the chunked function only where the fused LM head reads
# it, so trl.kernels.ChunkedLogProbFunction stays TRL's own (e.g. for benchmarking against it).
_REPLACED_IN_EVERY_MODULE = ("selective_log_softmax", "selective_log_softmax_and_entropy")


def _trl_modules() -> list[Any]:
    return [module for name, module in list(sys.modules.items())
            if module is not None and (name == "trl" or name.startswith("trl."))]


def _swap(old_to_new: dict[int, tuple[Any, Any]], modules: list[Any]) -> None:
    """In each module, every attribute holding one of the old objects (by identity) gets its new one."""
    for module in modules:
        for attribute, value in list(vars(module).items()):
            swap = old_to_new.get(id(value))
            if swap is not None and swap[0] is value:
                setattr(module, attribute, swap[1])


def enable(backend: str = "auto") -> None:
    """Route TRL's fused-LM-head log-probs and ``selective_log_softmax`` (and ``..._and_entropy``)
    through prefopt until ``disable()``. Call it before or after building the trainer.

    Calling it again changes only the backend. Raises RuntimeError for a TRL version outside
    ``SUPPORTED_TRL_VERSIONS`` and ImportError without TRL.

    Args:
        backend: the prefopt backend of every replaced computation: "auto" (Triton on CUDA tensors,
            the chunked PyTorch fallback elsewhere), "triton", "torch" or "reference".
    """
    global _backend, _enabled
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {BACKEND_CHOICES}, got {backend!r}")
    _check_trl_version()
    utils = importlib.import_module(_TRL_UTILS)
    _backend = backend
    if not _originals:
        _originals.update({name: getattr(utils, name) for name in _REPLACEMENTS})
    # Modules imported while enabled take the stand-ins from trl.trainer.utils; those imported
    # before hold the originals, so every TRL module loaded now is visited.
    everywhere = {id(_originals[name]): (_originals[name], _REPLACEMENTS[name]) for name in _REPLACED_IN_EVERY_MODULE}
    _swap(everywhere, _trl_modules())
    utils._ChunkedLogProbFunction = _FusedLMHeadLogProbs
    _enabled = True


def disable() -> None:
    """Restore TRL's own functions everywhere ``enable()`` (or an import while enabled) put
    prefopt's. Does nothing when not enabled."""
    global _backend, _enabled
    if not _enabled:
        return
    _swap({id(new): (new, _originals[name]) for name, new in _REPLACEMENTS.items()}, _trl_modules())
    _backend = "auto"
    _enabled = False


def is_enabled() -> bool:
    """Whether TRL's log-prob computations currently go through prefopt."""
    return _enabled


@contextlib.contextmanager
def enabled(backend: str = "auto") -> Iterator[None]:
    """``enable(backend)`` for the duration of a ``with`` block; on exit the previous state (off,
    or on with its backend) comes back."""
    previous_backend = _backend if _enabled else None
    enable(backend)
    try:
        yield
    finally:
        if previous_backend is None:
            disable()
        else:
            enable(previous_backend)
