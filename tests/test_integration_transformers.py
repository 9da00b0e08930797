"""prefopt.integrations.transformers against a float64 copy of the model's own logits, for tiny
randomly initialized Llama, Gemma 2 (final_logit_softcapping), Cohere (logit_scale) and Granite
(logits_scaling) models: log-probs, every statistic and the parameter gradients."""

import copy
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from conftest import ALL_STATS, relative_error  # noqa: E402
from prefopt.backends import unavailable_reason  # noqa: E402
from prefopt.integrations.transformers import (  # noqa: E402
    LogitsTransform,
    causal_lm_token_logprobs,
    causal_lm_token_stats,
    logits_transform,
)

VOCAB_SIZE = 50
COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "gemma2-softcap": lambda: Gemma2ForCausalLM(Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=2.0,
                                                             attn_implementation="eager")),
    "cohere-logit-scale": lambda: CohereForCausalLM(CohereConfig(**COMMON, logit_scale=0.25)),
    "granite-logits-scaling": lambda: GraniteForCausalLM(GraniteConfig(**COMMON, logits_scaling=4.0)),
}


def tiny_model(name: str):
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():
        # Logits spread over several units, so that a soft cap or a scale changes them visibly.
        model.get_output_embeddings().weight.mul_(40)
    return model


def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB_SIZE, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    return input_ids, attention_mask, labels


def reference_stats(model, input_ids, attention_mask, labels, temperature):
    """Every statistic from the float64 logits of the model's own forward, [B, T - 1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1] / temperature
    shifted = labels[:, 1:]
    scored = shifted != -100
    log_probs = logits.log_softmax(-1)
    safe_labels = shifted.clamp(min=0).unsqueeze(-1)
    logps = log_probs.gather(-1, safe_labels).squeeze(-1)
    return {
        "logps": logps * scored,
        "entropy": -(log_probs.exp() * log_probs).sum(-1) * scored,
        "mean_logits": logits.mean(-1) * scored,
        "log_sum_sq_probs": torch.logsumexp(2 * log_probs, -1) * scored,
        "is_top1": (logits.argmax(-1) == shifted) & scored,
    }


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_the_models_own_logits(name, temperature):
    model = tiny_model(name)
    reference_model = copy.deepcopy(model).double()
    input_ids, attention_mask, labels = batch()

    def refuse_full_logits(module, inputs):
        raise AssertionError("the LM head ran on every position")

    hook = model.get_output_embeddings().register_forward_pre_hook(refuse_full_logits)
    stats = causal_lm_token_stats(model, input_ids, labels, attention_mask=attention_mask, stats=ALL_STATS,
                                  temperature=temperature, backend="torch")
    hook.remove()
    reference = reference_stats(reference_model, input_ids, attention_mask, labels, temperature)

    assert stats.logps.shape == (3, 9) and stats.logps.dtype == torch.float32
    for field in ("logps", "entropy", "mean_logits", "log_sum_sq_probs"):
        assert relative_error(getattr(stats, field), reference[field]) <= 1e-5, field
    assert torch.equal(stats.is_top1, reference["is_top1"])

    upstream = torch.randn(3, 9, dtype=torch.float64)
    (stats.logps * upstream + stats.entropy).sum().backward()
    ((reference["logps"] * upstream + reference["entropy"]).sum()).backward()
    for (parameter_name, parameter), reference_parameter in zip(model.named_parameters(),
                                                                reference_model.parameters()):
        assert relative_error(parameter.grad, reference_parameter.grad) <= 1e-5, parameter_name


@pytest.mark.parametrize("name", ["gemma2-softcap", "cohere-logit-scale", "granite-logits-scaling"])
def test_the_config_transform_matters(name):
    # Without the soft cap or the scale read from the config, these models' log-probs would differ.
    model = tiny_model(name)
    input_ids, attention_mask, labels = batch()
    softcap, logit_scale = logits_transform(model.config)
    assert softcap is not None or logit_scale != 1.0
    with torch.no_grad():
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
        plain = hidden @ model.get_output_embeddings().weight.T
        logps = causal_lm_token_logprobs(model, input_ids, labels, attention_mask=attention_mask, backend="torch")
    untransformed = plain.log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert relative_error(logps, untransformed * (labels[:, 1:] != -100)) > 1e-2


def test_triton_kernels_match_the_torch_backend():
    reason = unavailable_reason("triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend 'triton' on CPU: {reason}")
    model = tiny_model("gemma2-softcap")
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        expected = causal_lm_token_logprobs(model, input_ids, labels, attention_mask=attention_mask,
                                            return_entropy=True, backend="torch")
        logps, entropy = causal_lm_token_logprobs(model, input_ids, labels, attention_mask=attention_mask,
                                                  return_entropy=True, backend="triton")
    assert relative_error(logps, expected[0]) <= 1e-5
    assert relative_error(entropy, expected[1]) <= 1e-5


def test_ignored_positions_give_zero_and_no_gradient():
    model = tiny_model("llama")
    input_ids, attention_mask, labels = batch()
    labels[0] = -100
    logps = causal_lm_token_logprobs(model, input_ids, labels, attention_mask=attention_mask, backend="torch")
    assert torch.equal(logps[0], torch.zeros(9))
    assert bool((logps[1:][labels[1:, 1:] != -100] < 0).all())


@pytest.mark.parametrize("config, expected", [
    (SimpleNamespace(), LogitsTransform(None, 1.0)),
    (SimpleNamespace(final_logit_softcapping=30.0), LogitsTransform(30.0, 1.0)),
    (SimpleNamespace(logit_scale=0.0625), LogitsTransform(None, 0.0625)),
    (SimpleNamespace(logit_scale=None, output_multiplier=2.0, final_logit_softcapping=15.0),
     LogitsTransform(15.0, 2.0)),
    (SimpleNamespace(lm_head_multiplier=0.5), LogitsTransform(None, 0.5)),
    (SimpleNamespace(model_type="granite", logits_scaling=8.0), LogitsTransform(None, 0.125)),
    (SimpleNamespace(model_type="hyperclovax", logits_scaling=8.0), LogitsTransform(None, 8.0)),
    (SimpleNamespace(get_text_config=lambda: SimpleNamespace(final_logit_softcapping=30.0, logit_scale=0.5)),
     LogitsTransform(30.0, 0.5)),
])
def test_logits_transform_reads_the_config(config, expected):
    assert logits_transform(config) == expected


def test_bad_input_is_refused():
    model = tiny_model("llama")
    input_ids, _, labels = batch()
    with pytest.raises(ValueError, match="labels"):
        causal_lm_token_stats(model, input_ids, labels[:, 1:])
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_token_stats(model, input_ids[0], labels[0])
    with pytest.raises(TypeError, match="model"):
        causal_lm_token_stats(model.base_model, input_ids, labels)
