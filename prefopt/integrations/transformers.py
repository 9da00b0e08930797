"""Per-token log-probs and softmax statistics of a Hugging Face causal LM, through prefopt's fused
linear path: the backbone runs, and the LM head is never applied to all [B, T] positions.

Shift convention (that of ``model(input_ids, labels=labels)`` in Transformers and of TRL's fused
LM head): ``labels`` [B, T] is aligned with ``input_ids``, not shifted. The hidden state at position
t predicts token t + 1, so

    hidden[:, :-1]  is scored against  labels[:, 1:]

and every output is [B, T - 1]: ``output[:, t]`` belongs to ``labels[:, t + 1]``, e.g.
``logps[:, t] = log p(labels[:, t + 1] | input_ids[:, :t + 1])``. Positions whose label is
``ignore_index`` (-100) give exactly 0 and receive no gradient. Completion-only labels are
``input_ids.masked_fill(completion_mask == 0, -100)`` (padding must be -100 too); their sum over the
last dimension is the sequence log-prob the DPO family compares.

The model's logits are ``softcap(logit_scale * lm_head(hidden))``, with the soft cap and the scale
read from its config by ``logits_transform``. Nothing here imports Transformers: any model with
``base_model``, ``get_output_embeddings()`` and ``config`` in the Transformers layout works.
"""

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch

from .._types import TokenStats
from ..logprobs.linear import linear_token_stats

Tensor = torch.Tensor


class LogitsTransform(NamedTuple):
    """How a model turns ``lm_head(hidden)`` into its logits: ``softcap(logit_scale * x)``."""

    softcap: float | None
    logit_scale: float


# Config fields that multiply the LM head's output: Cohere and Cohere 2 (``logit_scale``), Muse
# Glimmer and Muse Spark (``output_multiplier``, before their soft cap), Falcon-H1
# (``lm_head_multiplier``).
_LOGIT_MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
# ``logits_scaling`` divides the logits (Granite, MiniCPM3), except in these model types, which
# multiply by it.
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


def logits_transform(config: Any) -> LogitsTransform:
    """The soft cap and the logit scale a causal LM applies after its LM head, from its config.

    Args:
        config: a Transformers ``PretrainedConfig`` (multimodal configs are read through
            ``get_text_config()``).

    Returns:
        ``LogitsTransform(softcap, logit_scale)``: ``final_logit_softcapping`` (None without one;
        Gemma 2/3), and the product the model multiplies the LM head's output by (1.0 without one).
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return LogitsTransform(None if softcap is None else float(softcap), _logit_scale(text_config))


def _logit_scale(text_config: Any) -> float:
    for name in _LOGIT_MULTIPLIERS:
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    logits_scaling = getattr(text_config, "logits_scaling", None)
    if logits_scaling is None:
        return 1.0
    if getattr(text_config, "model_type", None) in _MULTIPLYING_LOGITS_SCALING:
        return float(logits_scaling)
    return 1.0 / float(logits_scaling)


class _Partitioned(NamedTuple):
    """What autograd keeps of a ZeRO-3 parameter saved for backward: the parameter, not its data,
    which DeepSpeed frees when it re-partitions the head after the forward."""

    parameter: Tensor


@contextlib.contextmanager
def zero3_gathered(*tensors: Tensor | None) -> Iterator[None]:
    """While inside: DeepSpeed ZeRO-3 parameters among ``tensors`` (an LM head's weight and bias)
    hold their full data, and whatever autograd saves of them is gathered again for the backward.

    ZeRO-3 partitions every parameter and gathers a module's own only around that module's forward;
    a fused LM head reads the head's weight without calling the head. Those not yet gathered are
    gathered here with DeepSpeed's ``GatheredParameters`` (ones already gathered, e.g. a head tied
    to the embedding, are left alone, since re-partitioning them on exit would take them from the
    module that gathered them). The backward runs after DeepSpeed has partitioned them again: a
    saved parameter still partitioned then is gathered once more (``GatheredParameters``) and its
    full data copied out for the backward (one DeepSpeed already gathered, as its backward hooks do
    when the head was used inside the model's forward, is read as is). The backward returns the
    full gradient: DeepSpeed's own gradient hooks on the parameter reduce-scatter it onto the
    partitions, as for any module's weight. Other tensors, and everything outside ZeRO-3, pass
    through untouched.
    """
    partitioned = {id(tensor): tensor for tensor in tensors if tensor is not None and hasattr(tensor, "ds_id")}
    if not partitioned:
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    def pack(tensor: Tensor) -> Tensor | _Partitioned:
        return _Partitioned(tensor) if partitioned.get(id(tensor)) is tensor else tensor

    def unpack(saved: Tensor | _Partitioned) -> Tensor:
        if not isinstance(saved, _Partitioned):
            return saved
        parameter = saved.parameter
        if parameter.ds_status == ZeroParamStatus.AVAILABLE:
            return parameter.detach()
        with deepspeed.zero.GatheredParameters([parameter]):
            return parameter.detach().clone()

    not_gathered = [tensor for tensor in partitioned.values() if tensor.ds_status != ZeroParamStatus.AVAILABLE]
    gathered = deepspeed.zero.GatheredParameters(not_gathered) if not_gathered else contextlib.nullcontext()
    with gathered, torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def lm_head_token_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    *,
    stats: Sequence[str],
    ignore_index: int | None,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    backend: str,
) -> TokenStats:
    """``prefopt.linear_token_stats`` in the dtype the model's LM head computes in.

    That dtype is autocast's when autocast is on for hidden's device, else hidden's (TRL's fused LM
    head reads it the same way). Hidden, weight and bias are cast to it (a weight in another dtype
    is copied once) and autocast is off inside, so the fused path's float32 products are not recast.
    A DeepSpeed ZeRO-3 head is gathered for the forward and again for the backward
    (``zero3_gathered``); a DTensor head (FSDP2) is gathered by ``prefopt.linear_token_stats``.

    Args:
        hidden: [..., H] float; weight: [V, H]; bias: [V] or None; labels: hidden.shape[:-1].
        stats, ignore_index, temperature, softcap, logit_scale, backend: as for
            ``prefopt.linear_token_stats``.

    Returns:
        ``TokenStats`` of the labels' shape (float32; is_top1 bool).
    """
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else hidden.dtype)
    with torch.autocast(device_type, enabled=False), zero3_gathered(weight, bias):
        return linear_token_stats(
            hidden.to(compute_dtype), weight.to(compute_dtype), labels,
            bias=None if bias is None else bias.to(compute_dtype), stats=stats, ignore_index=ignore_index,
            temperature=temperature, softcap=softcap, logit_scale=logit_scale, backend=backend,
        )


def _check_inputs(model: Any, input_ids: Tensor, labels: Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(f"labels: expected an unshifted tensor of input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {getattr(labels, 'shape', type(labels))}")
    for attribute in ("base_model", "get_output_embeddings", "config"):
        if not hasattr(model, attribute):
            raise TypeError(f"model: expected a Transformers causal LM (with {attribute!r}), "
                            f"got {type(model).__name__}")
    if model.base_model is model:
        raise TypeError(f"model: {type(model).__name__} is its own base model; expected a causal LM "
                        "(e.g. LlamaForCausalLM) whose backbone returns last_hidden_state")


def causal_lm_token_stats(
    model: Any,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    stats: Sequence[str] = ("entropy",),
    ignore_index: int | None = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    **model_kwargs: Any,
) -> TokenStats:
    """Log-probs of the next-token labels and the statistics in ``stats``, from a causal LM's last
    hidden states, without its [B, T, V] logits.

    Runs ``model.base_model`` (the backbone), takes ``last_hidden_state[:, :-1]`` and scores it
    against ``labels[:, 1:]`` through ``model.get_output_embeddings()``'s weight and bias, with the
    config's soft cap and logit scale (``logits_transform``). For a PEFT model, pass
    ``peft_model.get_base_model()``: the adapters live inside it.

    Args:
        model: a Transformers causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
            ``Gemma2ForCausalLM``, ``CohereForCausalLM``, ...).
        input_ids: [B, T] token ids. labels: [B, T] int64/int32, aligned with input_ids (not
            shifted; see the module docstring); ``ignore_index`` marks unscored positions.
        attention_mask: optional [B, T], passed to the backbone.
        stats: any of "entropy", "mean_logits", "log_sum_sq_probs", "is_top1".
        temperature: > 0; the softmax is over the model's logits divided by it.
        backend: "auto", "triton", "torch" or "reference" (see ``prefopt.linear_token_stats``).
        model_kwargs: further keyword arguments for the backbone (``use_cache`` defaults to False).

    Returns:
        ``TokenStats(logps, entropy, mean_logits, log_sum_sq_probs, is_top1)``, each [B, T - 1]
        float32 (is_top1 bool), differentiable with respect to the model's parameters; fields not
        in ``stats`` are None.
    """
    _check_inputs(model, input_ids, labels)
    lm_head = model.get_output_embeddings()
    if lm_head is None or not isinstance(getattr(lm_head, "weight", None), torch.Tensor):
        raise TypeError(f"model: {type(model).__name__} has no LM head (get_output_embeddings() returned "
                        f"{type(lm_head).__name__})")
    outputs = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               **{"use_cache": False, **model_kwargs})
    last_hidden_state = getattr(outputs, "last_hidden_state", None)
    if last_hidden_state is None:
        raise TypeError(f"model: the backbone of {type(model).__name__} returned no last_hidden_state")
    weight = lm_head.weight
    # With the model split across devices, the backbone can end on another device than the head.
    hidden = last_hidden_state[:, :-1].to(weight.device)
    softcap, logit_scale = logits_transform(model.config)
    return lm_head_token_stats(
        hidden, weight, getattr(lm_head, "bias", None), labels[:, 1:].to(weight.device), stats=stats,
        ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
        backend=backend,
    )


def causal_lm_token_logprobs(
    model: Any,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    return_entropy: bool = False,
    ignore_index: int | None = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    **model_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """log p(labels[:, t + 1] | input_ids[:, :t + 1]) for every t, from a causal LM's hidden states
    (see ``causal_lm_token_stats`` for the arguments and the shift).

    Returns:
        logps [B, T - 1] float32 (<= 0; 0 where the label is ignored); with ``return_entropy=True``
        also the entropy of each position's next-token distribution, [B, T - 1] float32.
    """
    result = causal_lm_token_stats(
        model, input_ids, labels, attention_mask=attention_mask, stats=("entropy",) if return_entropy else (),
        ignore_index=ignore_index, temperature=temperature, backend=backend, **model_kwargs,
    )
    return (result.logps, result.entropy) if return_entropy else result.logps
