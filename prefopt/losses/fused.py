"""The fused preference-loss operators, registered with ``torch.library``.

- ``prefopt::preference_loss``: one launch of the fused kernel of a loss family computes the
  per-example losses, the reduced loss, the rewards and the batch metrics.
- ``prefopt::preference_loss_backward``: one launch computes the gradients with respect to every
  log-prob input (and the margin, and ORPO's NLL), recomputed from the inputs.

``backend`` chooses the kernel: ``"triton"`` (``prefopt.kernels.preference_loss``) or ``"cuda"``
(``csrc/preference_loss.cu`` through ``prefopt.cuda_ext``); both have the same contract.

Both are opaque single operators to autograd, ``torch.compile(fullgraph=True)`` and CUDA graphs:
nothing here reads a device value on the host. Families and the arguments each one reads:

=========  ==================================================================================
``dpo``    chosen, rejected, ref_chosen, ref_rejected; margin, lengths, ``pair_weights`` (WPO)
           and ``offset`` (δ of bco_pair) optional; ``loss_types`` the elementwise types,
           comma-separated, with one weight each in ``loss_weights``; ``f_divergence``
``kto``    chosen (policy), ref_chosen (reference), desirable; ``offset`` is the KL reference
           point; ``loss_types`` = "kto" or "apo_zero_unpaired"
``cpo``    chosen, rejected; lengths as ``prefopt.losses.cpo_loss`` needs them;
           ``loss_types`` = one of sigmoid, hinge, ipo, simpo; ``alpha`` (AlphaPO)
``orpo``   chosen, rejected (per-token averages); ``nll`` None, 0-d or [B]
=========  ==================================================================================

Callers (``prefopt.losses.api``) validate every argument first; the formulas are those of
``prefopt.losses.formulas``, which is what the fused path is tested against.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch

Tensor = torch.Tensor

from .. import backends
from .._codes import METRIC_NAMES
from .formulas import ALPHA_DIVERGENCE_LIMIT


class LossCall(NamedTuple):
    """One fused loss call, the record both kernels' launchers take (``prefopt.kernels.
    preference_loss.launch`` and ``prefopt.cuda_ext.preference_loss``). Tensors are contiguous
    ``[B]`` (``offset`` 0-d, ``nll`` 0-d or ``[B]``) or None where absent; the families read the
    fields the module docstring lists."""

    family: str
    chosen: Tensor
    rejected: Tensor | None
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    margin: Tensor | None
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    desirable: Tensor | None
    offset: Tensor | None
    nll: Tensor | None
    pair_weights: Tensor | None  # dpo: WPO's per-pair weights, constants multiplying every type's loss
    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    beta: float
    label_smoothing: float
    discopop_tau: float
    simpo_gamma: float
    cpo_alpha: float
    desirable_weight: float
    undesirable_weight: float
    offset_value: float  # the offset when ``offset`` is None
    f_divergence: str  # dpo: TRL's f_divergence_type ("reverse_kl" also for α-divergence at α = 1)
    f_alpha_divergence_coef: float
    alpha: float  # cpo: AlphaPO's α (0: plain log-probs)
    mean: bool  # the reduced loss is the mean of the losses, else their sum


class LossOutputs(NamedTuple):
    """What a forward launch fills: loss 0-d, the others ``[B]``, metrics ``[len(METRIC_NAMES[family])]``."""

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: Tensor


class LossGrads(NamedTuple):
    """What a backward launch reads (the upstream gradients, 0-d and dense ``[B]``) and fills: the
    gradient of each differentiable input, shaped like it, or None where it is absent or not
    wanted. One layout for both backends."""

    grad_loss: Tensor
    grad_losses: Tensor
    chosen: Tensor | None
    rejected: Tensor | None
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    margin: Tensor | None
    nll: Tensor | None


# The operators' arguments are a LossCall's fields, in its order, then the backend: the schema is
# written from the record, so that the two operators and the record cannot drift apart.
_SCHEMA_TYPES = {Tensor: "Tensor", Tensor | None: "Tensor?", str: "str", float: "float", bool: "bool",
                 tuple[str, ...]: "str[]", tuple[float, ...]: "float[]"}
_CALL_ARGUMENTS = ", ".join(f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in LossCall.__annotations__.items())
# LossCall's tensors: the fields after ``family``.
_TENSORS = slice(1, 12)

_library = torch.library.Library("prefopt", "FRAGMENT")
# (loss, losses, chosen_rewards, rejected_rewards, metrics): loss 0-d (the mean, or the sum for
# reduction "sum" and "none"), the others [B], metrics [len(METRIC_NAMES[family])], all in
# ``chosen``'s dtype. Every tensor input is contiguous.
_library.define(f"preference_loss({_CALL_ARGUMENTS}, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
# Gradients [chosen, rejected, ref_chosen, ref_rejected, margin, nll] from the upstream gradients
# of the reduced loss (0-d) and of ``losses`` ([B], dense); an input that is absent, or that the
# family does not differentiate, gets an empty tensor (a custom operator cannot return None).
_library.define(f"preference_loss_backward(Tensor grad_loss, Tensor grad_losses, {_CALL_ARGUMENTS}, "
                "str backend) -> Tensor[]")


def _call(arguments: Sequence) -> LossCall:
    """The call record of an operator's flat arguments (the dispatcher passes lists for tuples)."""
    call = LossCall(*arguments)
    return call._replace(loss_types=tuple(call.loss_types), loss_weights=tuple(call.loss_weights))


def _empty_outputs(chosen: Tensor, family: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Uninitialized (loss, losses, chosen_rewards, rejected_rewards, metrics), the layout the
    forward operator returns, real or fake."""
    n = chosen.shape[0]
    return (chosen.new_empty(()), chosen.new_empty(n), chosen.new_empty(n), chosen.new_empty(n),
            chosen.new_empty(len(METRIC_NAMES[family])))


def _empty_grads(call: LossCall) -> list[Tensor]:
    differentiable = (call.chosen, call.rejected, call.ref_chosen, call.ref_rejected, call.margin, call.nll)
    return [call.chosen.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
            for t in differentiable]


@torch.library.register_kernel("prefopt::preference_loss", None, lib=_library)
def _forward(*arguments) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    *fields, backend = arguments
    call = _call(fields)
    outputs = _empty_outputs(call.chosen, call.family)
    backends.loss_kernel(backend)(call, LossOutputs(*outputs), None)
    return outputs


@torch.library.register_fake("prefopt::preference_loss", lib=_library)
def _(family, chosen, *rest):
    return _empty_outputs(chosen, family)


@torch.library.register_kernel("prefopt::preference_loss_backward", None, lib=_library)
def _backward_kernel(grad_loss: Tensor, grad_losses: Tensor, *arguments) -> list[Tensor]:
    *fields, backend = arguments
    call = _call(fields)
    grads = _empty_grads(call)
    # A gradient for each present input: KTO's "rejected" slot is absent, so it gets none.
    present = (call.chosen, call.rejected, call.ref_chosen, call.ref_rejected, call.margin, call.nll)
    wanted = [None if t is None else g for t, g in zip(present, grads)]
    backends.loss_kernel(backend)(call, None, LossGrads(grad_loss, grad_losses, *wanted))
    return grads


@torch.library.register_fake("prefopt::preference_loss_backward", lib=_library)
def _(grad_loss, grad_losses, *arguments):
    return _empty_grads(_call(arguments[:-1]))


def _setup_context(ctx, inputs, output) -> None:
    ctx.family = inputs[0]
    ctx.save_for_backward(*inputs[_TENSORS])
    ctx.constants = inputs[_TENSORS.stop:]
    _, _, chosen_rewards, rejected_rewards, metrics = output
    ctx.mark_non_differentiable(chosen_rewards, rejected_rewards, metrics)


def _backward(ctx, grad_loss, grad_losses, grad_chosen_rewards, grad_rejected_rewards, grad_metrics):
    saved = ctx.saved_tensors
    chosen = saved[0]
    # An output that took no part in the loss has no gradient; the kernel reads zeros for it.
    # grad_losses may be a broadcast view (e.g. from losses.sum()), which the kernel cannot index.
    grad_loss = chosen.new_zeros(()) if grad_loss is None else grad_loss
    grad_losses = chosen.new_zeros(chosen.shape) if grad_losses is None else grad_losses.contiguous()
    g_chosen, g_rejected, g_ref_chosen, g_ref_rejected, g_margin, g_nll = (
        torch.ops.prefopt.preference_loss_backward(grad_loss, grad_losses, ctx.family, *saved, *ctx.constants)
    )
    _, rejected, ref_chosen, ref_rejected, margin, _, _, _, _, nll, _ = saved

    def present(grad: Tensor, t: Tensor | None, used: bool = True) -> Tensor | None:
        return grad if t is not None and used else None

    return (
        None,  # family
        g_chosen,
        present(g_rejected, rejected, ctx.family != "kto"),
        present(g_ref_chosen, ref_chosen),
        present(g_ref_rejected, ref_rejected),
        present(g_margin, margin),
        None,
        None,
        None,
        None,
        present(g_nll, nll),
        None,  # the pair weights are constants
        *([None] * len(ctx.constants)),
    )


torch.library.register_autograd("prefopt::preference_loss", _backward, setup_context=_setup_context, lib=_library)


def fused_preference_loss(
    family: str,
    chosen: Tensor,
    rejected: Tensor | None = None,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    margin: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    desirable: Tensor | None = None,
    offset: float | Tensor = 0.0,
    nll: Tensor | None = None,
    loss_types: Sequence[str] = (),
    loss_weights: Sequence[float] = (),
    beta: float,
    label_smoothing: float = 0.0,
    discopop_tau: float = 1.0,
    simpo_gamma: float = 0.0,
    cpo_alpha: float = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    pair_weights: Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    alpha: float = 0.0,
    reduction: str = "mean",
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """One loss of ``family`` through the fused operators of ``backend`` (one of
    :data:`prefopt.backends.FUSED_BACKENDS`), on already validated arguments.

    ``offset`` is bco_pair's δ (dpo) or the KL reference point (kto): a float, or a 0-d tensor
    already in ``chosen``'s dtype and detached. Returns (loss, losses, chosen_rewards,
    rejected_rewards, metrics): ``loss`` is ``losses`` itself for reduction "none"; metrics maps
    :data:`METRIC_NAMES` ``[family]`` to 0-d device tensors.
    """

    def dense(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.contiguous()

    offset_tensor = offset if isinstance(offset, torch.Tensor) else None
    call = LossCall(
        family, dense(chosen), dense(rejected), dense(ref_chosen), dense(ref_rejected), dense(margin),
        dense(chosen_lengths), dense(rejected_lengths), dense(desirable), dense(offset_tensor), dense(nll),
        dense(pair_weights), tuple(loss_types), tuple(float(w) for w in loss_weights), float(beta),
        float(label_smoothing), float(discopop_tau), float(simpo_gamma), float(cpo_alpha), float(desirable_weight),
        float(undesirable_weight), 0.0 if offset_tensor is not None else float(offset),
        # α-divergence within 1e-6 of α = 1 is its limit, reverse KL: the kernels see that type.
        "reverse_kl" if f_divergence_type == "alpha_divergence" and abs(f_alpha_divergence_coef - 1.0)
        < ALPHA_DIVERGENCE_LIMIT else f_divergence_type,
        float(f_alpha_divergence_coef), float(alpha), reduction == "mean",
    )
    loss, losses, chosen_rewards, rejected_rewards, metrics = torch.ops.prefopt.preference_loss(*call, backend)
    named = dict(zip(METRIC_NAMES[family], metrics.unbind(0)))
    return (losses if reduction == "none" else loss), losses, chosen_rewards, rejected_rewards, named
