"""One rank of a TRL DPO training run on a tiny Llama, under FSDP2, DeepSpeed ZeRO-3 or neither,
for tests/test_trl_engines.py: two steps on the same batch with a learning rate of 0, the first
through TRL's own fused LM head and the second with ``prefopt.integrations.trl.enable()``.

    python tests/trl_engine_worker.py {fsdp2,zero3} RESULTS_PATH     # with RANK, WORLD_SIZE, ... set

Each step's loss, TRL's logged metrics and every parameter's full gradient (gathered from the
shards before the optimizer step, with clipping off) go to RESULTS_PATH (``torch.save``, from rank 0).
``run("none", ...)`` is the same run in the calling process, on the whole batch.
"""

import os
import sys
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import SequentialSampler
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer

import prefopt.integrations.trl as prefopt_trl

WORDS = "the a cat dog sat ran on mat log red blue big small is was and".split()
PROMPTS = ["the cat", "a dog", "the big dog", "a red cat"]
CHOSEN = [" sat on the mat", " ran", " is small", " was on a log"]
REJECTED = [" ran on", " sat on a red mat", " is", " sat"]
# Logged by the Trainer, not by the loss: the step's bookkeeping, and a token count that grows.
NOT_METRICS = ("loss", "epoch", "step", "learning_rate", "num_tokens", "grad_norm")

ENGINE_ARGS: dict[str, dict[str, Any]] = {
    "none": {},
    # What TRL's accelerate configs for FSDP2 set: each decoder layer and the root sharded.
    "fsdp2": {"fsdp": "full_shard",
              "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                              "reshard_after_forward": True}},
    "zero3": {"deepspeed": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
                            "fp16": {"enabled": False}, "train_micro_batch_size_per_gpu": "auto",
                            "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                            "gradient_clipping": "auto"}},
}


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(["<unk>", "<pad>", "<eos>", *WORDS])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")


def tiny_llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=3 + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1,
                         eos_token_id=2, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def full_gradient(parameter: torch.Tensor) -> torch.Tensor:
    """The parameter's whole gradient, on every rank (a collective under FSDP2 and ZeRO-3)."""
    if hasattr(parameter, "ds_id"):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(parameter).detach().clone()
    gradient = parameter.grad
    if isinstance(gradient, torch.distributed.tensor.DTensor):
        gradient = gradient.full_tensor()
    return gradient.detach().clone()


class _SequentialDPOTrainer(DPOTrainer):
    """Rank r always gets the same pairs (the r-th slice of the batch), step after step."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class _Steps(TrainerCallback):
    """Gradients of each step before the optimizer's; prefopt on from the second step."""

    def __init__(self, model_of, at_optimizer_step: bool) -> None:
        self.model_of = model_of
        self.at_optimizer_step = at_optimizer_step
        self.gradients: list[dict[str, torch.Tensor]] = []

    def record(self) -> None:
        model = self.model_of()
        self.gradients.append({name: full_gradient(parameter) for name, parameter in model.named_parameters()})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.at_optimizer_step:
            self.record()

    def on_step_end(self, args, state, control, **kwargs):
        prefopt_trl.enable(backend="torch")


def run(engine: str, output_dir: str) -> dict[str, list]:
    """Two DPO steps (TRL's, then prefopt's) of this process's share of the 4 pairs.

    Returns {"loss": [2 floats], "metrics": [2 dicts], "gradients": [2 dicts name -> full tensor]}.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    engine_args = ENGINE_ARGS[engine]
    args = DPOConfig(output_dir=output_dir, report_to="none", per_device_train_batch_size=len(PROMPTS) // world_size,
                     max_steps=2, logging_steps=1, learning_rate=0.0, max_grad_norm=0.0, use_cpu=True, bf16=False,
                     save_strategy="no", disable_tqdm=True, **engine_args)
    dataset = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    trainer = _SequentialDPOTrainer(model=tiny_llama(0), ref_model=tiny_llama(1), args=args, train_dataset=dataset,
                                    processing_class=tokenizer())
    steps = _Steps(lambda: trainer.model_wrapped.module if engine == "zero3" else trainer.model,
                   at_optimizer_step=engine != "zero3")
    trainer.add_callback(steps)
    if engine == "zero3":
        # Under ZeRO-3 the optimizer step runs inside accelerate's backward, before any callback:
        # the gradients are read as the engine's step begins.
        from deepspeed.runtime.engine import DeepSpeedEngine

        step = DeepSpeedEngine.step

        def recording_step(engine_self, *step_args, **step_kwargs):
            steps.record()
            return step(engine_self, *step_args, **step_kwargs)

        DeepSpeedEngine.step = recording_step
    prefopt_trl.disable()
    try:
        trainer.train()
    finally:
        prefopt_trl.disable()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "loss": [entry["loss"] for entry in logged],
        "metrics": [{key: value for key, value in entry.items() if key not in NOT_METRICS} for entry in logged],
        "gradients": steps.gradients,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    engine_name, results_path = sys.argv[1:]
    results = run(engine_name, os.path.dirname(results_path))
    if int(os.environ["RANK"]) == 0:
        torch.save(results, results_path)
