"""prefopt.integrations.trl against TRL's own path, with the real DPOTrainer and KTOTrainer on a tiny
randomly initialized Llama (no downloads): one step's loss, gradients and metrics agree to 1e-5
relative in float32, and a few training steps lower the loss."""

import math
import subprocess
import sys
import types

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

import trl.trainer.utils as trl_utils  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

import prefopt.integrations.trl as prefopt_trl  # noqa: E402
from prefopt.backends import unavailable_reason  # noqa: E402

from conftest import ALL_STATS, relative_error  # noqa: E402
from trl_engine_worker import WORDS  # noqa: E402
from trl_engine_worker import tokenizer as word_tokenizer  # noqa: E402

# Raised inside TRL and Transformers 5.23, which still call their own deprecated names.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated:FutureWarning")

TRL_ORIGINALS = {name: getattr(trl_utils, name) for name in
                 ("_ChunkedLogProbFunction", "selective_log_softmax", "selective_log_softmax_and_entropy")}
PROMPTS = ["the cat", "a dog", "the big dog", "a red cat"]
CHOSEN = [" sat on the mat", " ran", " is small", " was on a log"]
REJECTED = [" ran on", " sat on a red mat", " is", " sat"]


@pytest.fixture(autouse=True)
def trl_restored():
    yield
    prefopt_trl.disable()
    assert {name: getattr(trl_utils, name) for name in TRL_ORIGINALS} == TRL_ORIGINALS


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """One entry per fused-LM-head call that reached prefopt."""
    calls = []
    fused = prefopt_trl.lm_head_token_stats

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(prefopt_trl, "lm_head_token_stats", counted)
    return calls


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


def tiny_llama(seed: int, vocab_size: int = 3 + len(WORDS)) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1,
                         eos_token_id=2, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def common_args(tmp_path, max_steps: int = 1) -> dict:
    # The whole dataset is one batch, so every step sees the same examples.
    return dict(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=len(PROMPTS),
                max_steps=max_steps, logging_steps=1, learning_rate=1e-2, use_cpu=True, bf16=False,
                save_strategy="no", disable_tqdm=True)


def dpo_trainer(tmp_path, tokenizer, max_steps: int = 1, **config) -> DPOTrainer:
    dataset = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = DPOConfig(**common_args(tmp_path, max_steps), **config)
    return DPOTrainer(model=tiny_llama(0), ref_model=tiny_llama(1), args=args, train_dataset=dataset,
                      processing_class=tokenizer)


def kto_trainer(tmp_path, tokenizer, max_steps: int = 1) -> KTOTrainer:
    dataset = Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN, "label": [True, False, True, False]})
    args = KTOConfig(**common_args(tmp_path, max_steps))
    return KTOTrainer(model=tiny_llama(0), ref_model=tiny_llama(1), args=args, train_dataset=dataset,
                      processing_class=tokenizer)


def one_step(trainer, batch) -> tuple[torch.Tensor, dict, dict]:
    """Loss, parameter gradients and logged metrics of one compute_loss + backward."""
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in trainer.model.named_parameters()}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), gradients, metrics


def assert_step_matches_trl(trainer, fused_calls: list, backend: str = "torch") -> None:
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss, trl_gradients, trl_metrics = one_step(trainer, batch)
    assert fused_calls == []
    with prefopt_trl.enabled(backend):
        loss, gradients, metrics = one_step(trainer, batch)
    assert len(fused_calls) >= 2  # the policy and the reference model
    assert relative_error(loss, trl_loss) <= 1e-5
    for name, trl_gradient in trl_gradients.items():
        assert trl_gradient.norm() > 0, name
        assert relative_error(gradients[name], trl_gradient) <= 1e-5, name
    assert metrics.keys() == trl_metrics.keys()
    for name, value in trl_metrics.items():
        assert math.isclose(metrics[name], value, rel_tol=1e-5, abs_tol=1e-6), (name, metrics[name], value)


@pytest.mark.parametrize("loss_type, use_weighting", [("sigmoid", True), ("ipo", False), ("hinge", False)])
def test_dpo_step_matches_trl(tmp_path, tokenizer, fused_calls, loss_type, use_weighting):
    # use_weighting makes TRL ask the fused LM head for log_sum_sq_probs too.
    trainer = dpo_trainer(tmp_path, tokenizer, loss_type=[loss_type], use_weighting=use_weighting)
    assert_step_matches_trl(trainer, fused_calls)


def test_kto_step_matches_trl(tmp_path, tokenizer, fused_calls):
    assert_step_matches_trl(kto_trainer(tmp_path, tokenizer), fused_calls)


def test_dpo_step_matches_trl_with_compact_rows(tmp_path, tokenizer, fused_calls, monkeypatch):
    # On CUDA the fused LM head passes only the scored rows; on CPU TRL passes every row. Make it
    # take the CUDA branch (TRL's own chunked function keeps its CPU tiles either way).
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    trainer = dpo_trainer(tmp_path, tokenizer)
    assert_step_matches_trl(trainer, fused_calls)
    scored_rows = int(next(iter(trainer.get_train_dataloader()))["completion_mask"][:, 1:].sum())
    assert {shape for shape in fused_calls} == {(scored_rows, 32)}


def test_dpo_step_matches_trl_on_the_triton_kernels(tmp_path, tokenizer, fused_calls):
    reason = unavailable_reason("triton", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend 'triton' on CPU: {reason}")
    assert_step_matches_trl(dpo_trainer(tmp_path, tokenizer), fused_calls, backend="triton")


@pytest.mark.parametrize("make_trainer", [dpo_trainer, kto_trainer], ids=["dpo", "kto"])
def test_training_lowers_the_loss(tmp_path, tokenizer, fused_calls, make_trainer):
    trainer = make_trainer(tmp_path, tokenizer, max_steps=4)
    prefopt_trl.enable(backend="torch")
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert fused_calls
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- the fused LM head alone


def fused_head_outputs(model, input_ids, labels, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    model.zero_grad()
    (output.log_probs.sum() + 0.5 * output.entropy.sum()).backward()
    return ({field: getattr(output, field) for field in fields},
            {name: parameter.grad.clone() for name, parameter in model.named_parameters()})


@pytest.mark.parametrize("compact", [False, True], ids=["every-row", "compact"])
@pytest.mark.parametrize("temperature, softcap, logit_scale", [(1.0, None, 1.0), (0.7, 3.0, 0.5)])
# The head's outputs and the LM-head gradient agree to float32 rounding unless the head computes in
# bfloat16; the backbone's gradients pass through bfloat16 whenever autocast is on. With a bfloat16
# head, TRL rounds each logits tile and its gradient to bfloat16 where prefopt keeps float32, and
# the backbone's bfloat16 backward amplifies that difference: its gradients are not compared (None).
@pytest.mark.parametrize("autocast, cast_lm_head_to_fp32, head_tolerance, backbone_tolerance",
                         [(False, False, 1e-5, 1e-5), (True, True, 1e-5, 1e-2), (True, False, 1e-2, None)],
                         ids=["float32", "autocast-fp32-head", "autocast-bf16"])
def test_fused_lm_head_matches_trl(monkeypatch, fused_calls, compact, temperature, softcap, logit_scale, autocast,
                                   cast_lm_head_to_fp32, head_tolerance, backbone_tolerance):
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: compact)
    model = tiny_llama(0, vocab_size=50)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # logits spread over several units, so the soft cap bites
    # TRL reads the soft cap and the scale from the config, as from a Gemma or a Cohere model.
    model.config.final_logit_softcapping = softcap
    model.config.logit_scale = logit_scale
    trl_utils.add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                                outputs=("log_probs", *ALL_STATS))
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 50, (3, 11), generator=generator)
    labels = input_ids.masked_fill(torch.rand(input_ids.shape, generator=generator) < 0.3, -100)

    trl_outputs, trl_gradients = fused_head_outputs(model, input_ids, labels, autocast)
    with prefopt_trl.enabled("torch"):
        outputs, gradients = fused_head_outputs(model, input_ids, labels, autocast)
    assert len(fused_calls) == 1
    assert torch.equal(outputs["log_probs"] == 0, labels[:, 1:] == -100)
    for field in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert outputs[field].dtype == torch.float32
        assert relative_error(outputs[field], trl_outputs[field]) <= head_tolerance, field
    # TRL gives no gradient to these three statistics; neither does prefopt through TRL.
    assert not any(outputs[field].requires_grad for field in ("log_sum_sq_probs", "mean_logits", "is_top1"))
    if head_tolerance <= 1e-5:
        assert torch.equal(outputs["is_top1"], trl_outputs["is_top1"])
    assert relative_error(gradients["lm_head.weight"], trl_gradients["lm_head.weight"]) <= head_tolerance
    for name, trl_gradient in trl_gradients.items():
        if backbone_tolerance is not None:
            assert relative_error(gradients[name], trl_gradient) <= backbone_tolerance, name


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy", "is_top1")])
def test_fused_lm_head_computes_what_trl_asks_for(outputs):
    model = tiny_llama(0)
    trl_utils.add_fused_lm_head(model, outputs=outputs)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 7))
    prefopt_trl.enable(backend="torch")
    output = model(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
    for field in ALL_STATS:
        assert (getattr(output, field) is None) == (field not in outputs), field


def test_fused_lm_head_with_no_scored_row_stays_differentiable(monkeypatch):
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    model = tiny_llama(0)
    trl_utils.add_fused_lm_head(model)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 7))
    prefopt_trl.enable(backend="torch")
    output = model(input_ids=input_ids, labels=torch.full_like(input_ids, -100), fused_lm_head=True)
    output.log_probs.sum().backward()
    assert torch.equal(output.log_probs, torch.zeros(2, 6))
    assert torch.equal(model.lm_head.weight.grad, torch.zeros_like(model.lm_head.weight))


# ----------------------------------------------------------------------------- selective_log_softmax


def logits_and_index(shape=(3, 5), vocab_size=37, seed=3):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab_size, generator=generator) * 4).requires_grad_()
    return logits, torch.randint(0, vocab_size, shape, generator=generator)


@pytest.mark.parametrize("row_mask_dtype", [None, torch.bool, torch.int64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_selective_log_softmax_matches_trl(row_mask_dtype, temperature):
    logits, index = logits_and_index()
    row_mask = None if row_mask_dtype is None else (torch.arange(15).view(3, 5) % 3 != 0).to(row_mask_dtype)
    upstream = torch.randn(3, 5)

    def run(function):
        logits.grad = None
        logps = function(logits, index, temperature=temperature, row_mask=row_mask)
        (logps * upstream).sum().backward()
        return logps, logits.grad.clone()

    trl_logps, trl_gradient = run(TRL_ORIGINALS["selective_log_softmax"])
    prefopt_trl.enable(backend="torch")
    logps, gradient = run(trl_utils.selective_log_softmax)
    assert trl_utils.selective_log_softmax is prefopt_trl.selective_log_softmax
    assert logps.dtype == torch.float32
    assert relative_error(logps, trl_logps) <= 1e-5
    assert relative_error(gradient, trl_gradient) <= 1e-5


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy_matches_trl(entropy_requires_grad):
    logits, index = logits_and_index()
    row_mask = torch.arange(15).view(3, 5) % 4 != 1
    upstream_logps, upstream_entropy = torch.randn(3, 5), torch.randn(3, 5)

    def run(function):
        logits.grad = None
        logps, entropy = function(logits, index, entropy_requires_grad, 0.8, row_mask)
        loss = (logps * upstream_logps).sum()
        if entropy_requires_grad:
            loss = loss + (entropy * upstream_entropy).sum()
        loss.backward()
        return logps, entropy, logits.grad.clone()

    trl_logps, trl_entropy, trl_gradient = run(TRL_ORIGINALS["selective_log_softmax_and_entropy"])
    prefopt_trl.enable(backend="torch")
    logps, entropy, gradient = run(trl_utils.selective_log_softmax_and_entropy)
    assert entropy.requires_grad == entropy_requires_grad
    assert relative_error(logps, trl_logps) <= 1e-5
    assert relative_error(entropy, trl_entropy) <= 1e-5
    assert relative_error(gradient, trl_gradient) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_index_and_integer_row_mask_match_trl(dtype):
    """The trainers' top-K index [..., K] with their integer mask goes through prefopt too, with
    TRL's values, gradient and output dtype (float64 stays float64)."""
    logits, _ = logits_and_index()
    logits = logits.detach().to(dtype).requires_grad_(True)
    top_k = logits.detach().topk(4, dim=-1).indices
    row_mask = (torch.arange(60).view(3, 5, 4) % 3 != 0).long()
    upstream = torch.randn(3, 5, 4, dtype=dtype)

    def run(function):
        logits.grad = None
        logps = function(logits, top_k, 0.7, row_mask)
        (logps * upstream).sum().backward()
        return logps, logits.grad.clone()

    trl_logps, trl_gradient = run(TRL_ORIGINALS["selective_log_softmax"])
    prefopt_trl.enable(backend="torch")
    logps, gradient = run(trl_utils.selective_log_softmax)
    assert logps.dtype == trl_logps.dtype == dtype
    assert (logps[row_mask == 0] == 0).all()
    assert relative_error(logps, trl_logps) <= (1e-12 if dtype == torch.float64 else 1e-5)
    assert relative_error(gradient, trl_gradient) <= (1e-12 if dtype == torch.float64 else 1e-5)


# ----------------------------------------------------------------------------- enable / disable


def test_enable_is_idempotent_and_disable_restores_every_module(monkeypatch):
    # A TRL module that imported the functions by name (as the trainers do), before enable() ...
    before = types.ModuleType("trl._imported_before_enable")
    before.selective_log_softmax = TRL_ORIGINALS["selective_log_softmax"]
    before.renamed = TRL_ORIGINALS["selective_log_softmax_and_entropy"]
    monkeypatch.setitem(sys.modules, before.__name__, before)
    prefopt_trl.enable()
    prefopt_trl.enable()
    assert prefopt_trl.is_enabled()
    assert before.selective_log_softmax is prefopt_trl.selective_log_softmax
    assert before.renamed is prefopt_trl.selective_log_softmax_and_entropy
    assert trl_utils._ChunkedLogProbFunction is not TRL_ORIGINALS["_ChunkedLogProbFunction"]
    # ... and one imported while enabled.
    after = types.ModuleType("trl._imported_while_enabled")
    exec("from trl.trainer.utils import selective_log_softmax", vars(after))
    monkeypatch.setitem(sys.modules, after.__name__, after)
    assert after.selective_log_softmax is prefopt_trl.selective_log_softmax

    prefopt_trl.disable()
    prefopt_trl.disable()
    assert not prefopt_trl.is_enabled()
    assert before.selective_log_softmax is TRL_ORIGINALS["selective_log_softmax"]
    assert before.renamed is TRL_ORIGINALS["selective_log_softmax_and_entropy"]
    assert after.selective_log_softmax is TRL_ORIGINALS["selective_log_softmax"]
    # TRL's public kernel stays its own throughout.
    assert trl.kernels.ChunkedLogProbFunction is TRL_ORIGINALS["_ChunkedLogProbFunction"]


def test_context_manager_restores_the_previous_state():
    with prefopt_trl.enabled("reference"):
        assert prefopt_trl.is_enabled() and prefopt_trl._backend == "reference"
        with prefopt_trl.enabled("torch"):
            assert prefopt_trl._backend == "torch"
        assert prefopt_trl.is_enabled() and prefopt_trl._backend == "reference"
    assert not prefopt_trl.is_enabled()


def test_unsupported_trl_version_is_refused(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match=r"TRL 1\.17\.0 is installed"):
        prefopt_trl.enable()
    assert not prefopt_trl.is_enabled()


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        prefopt_trl.enable(backend="fast")
    assert not prefopt_trl.is_enabled()


def test_importing_prefopt_imports_neither_trl_nor_transformers():
    code = ("import sys, prefopt, prefopt.integrations.trl, prefopt.integrations.transformers; "
            "print(sorted({name.split('.')[0] for name in sys.modules} & {'trl', 'transformers', 'datasets'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
