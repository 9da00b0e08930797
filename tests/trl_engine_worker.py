"""One rank of a TRL DPO training run on a tiny Llama, under FSDP2, DeepSpeed ZeRO-3 or neither,
for tests/test_trl_engines.py: two steps on the same batch with a learning rate of 0, the first
through TRL's own fused LM head and the second with ``prefopt.integrations.trl.enable()``.

    rank_main("fsdp2" or "zero3", rank, world_size, port, results_path)   # in each rank's process

Each step's loss, TRL's logged metrics and every parameter's full gradient (gathered from the
shards before the optimizer step, with clipping off) go to RESULTS_PATH (``torch.save``, from rank 0).
``run("none", ...)`` is the same run in the calling process, on the whole batch.
"""

import os
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
    "fsdp2": {"fsdp": True,
              "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                              "reshard_after_forward": True}},
    # Parameters under the persistence threshold (all of a tiny model by default) are never
    # partitioned: 0 partitions every one, as ZeRO-3 does the large ones of a real model.
    "zero3": {"deepspeed": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "bf16": {"enabled": False},
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


def fsdp_on_cpu() -> None:
    """Accelerate turns its FSDP plugin on for accelerator devices only (CUDA, XPU, NPU, ...), and
    leaves CPU processes to DDP: here the CPU ranks take it as an accelerator's would, so that the
    Trainer prepares the model with accelerate's own FSDP2 code (``fully_shard`` per decoder layer
    and on the root) and TRL its reference model (``prepare_fsdp``)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    initialize = AcceleratorState.__init__

    def initialize_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        initialize(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = initialize_with_fsdp


def head_layout(weight: torch.Tensor) -> str:
    """How the engine holds the LM head between steps: what the test checks it really shards."""
    if hasattr(weight, "ds_id"):
        return f"zero3 partition of {weight.ds_numel} with {weight.numel()} here"
    if isinstance(weight, torch.distributed.tensor.DTensor):
        return f"DTensor {weight.placements} of {tuple(weight.shape)} with {tuple(weight.to_local().shape)} here"
    return f"tensor of {tuple(weight.shape)}"


class _SequentialDPOTrainer(DPOTrainer):
    """Rank r always gets the same pairs (the r-th slice of the batch), step after step."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class _Steps(TrainerCallback):
    """Gradients of each step before the optimizer's; prefopt on from the second step."""

    def __init__(self, model_of, at_optimizer_step: bool, fused_calls: list) -> None:
        self.model_of = model_of
        self.at_optimizer_step = at_optimizer_step
        self.gradients: list[dict[str, torch.Tensor]] = []
        self.heads: list[str] = []
        self.fused_calls: list[int] = []
        self.calls = fused_calls

    def record(self) -> None:
        model = self.model_of()
        self.heads.append(head_layout(model.lm_head.weight))
        self.fused_calls.append(len(self.calls))
        self.gradients.append({name: full_gradient(parameter) for name, parameter in model.named_parameters()})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.at_optimizer_step:
            self.record()

    def on_step_end(self, args, state, control, **kwargs):
        prefopt_trl.enable(backend="torch")


def run(engine: str, output_dir: str) -> dict[str, list]:
    """Two DPO steps (TRL's, then prefopt's) of this process's share of the 4 pairs.

    Returns {"loss": [2 floats], "metrics": [2 dicts], "gradients": [2 dicts name -> full tensor],
    "heads": [2 layouts of the LM head's weight], "fused_calls": [prefopt's fused calls by each step]}.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    engine_args = ENGINE_ARGS[engine]
    args = DPOConfig(output_dir=output_dir, report_to="none", per_device_train_batch_size=len(PROMPTS) // world_size,
                     max_steps=2, logging_steps=1, learning_rate=0.0, max_grad_norm=0.0, use_cpu=True, bf16=False,
                     save_strategy="no", disable_tqdm=True, **engine_args)
    dataset = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    # One entry per call of TRL's fused LM head that reached prefopt.
    fused_calls: list[int] = []
    fused = prefopt_trl.lm_head_token_stats

    def counted(*call_args, **call_kwargs):
        fused_calls.append(1)
        return fused(*call_args, **call_kwargs)

    trainer = _SequentialDPOTrainer(model=tiny_llama(0), ref_model=tiny_llama(1), args=args, train_dataset=dataset,
                                    processing_class=tokenizer())
    steps = _Steps(lambda: trainer.model_wrapped.module if engine == "zero3" else trainer.model,
                   at_optimizer_step=engine != "zero3", fused_calls=fused_calls)
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
    prefopt_trl.lm_head_token_stats = counted
    try:
        trainer.train()
    finally:
        prefopt_trl.disable()
        prefopt_trl.lm_head_token_stats = fused
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "loss": [entry["loss"] for entry in logged],
        "metrics": [{key: value for key, value in entry.items() if key not in NOT_METRICS} for entry in logged],
        "gradients": steps.gradients,
        "heads": steps.heads,
        "fused_calls": steps.fused_calls,
    }


def dtensor_head() -> tuple[dict[str, float], str | None]:
    """prefopt's own functions on an FSDP2-sharded LM head (a DTensor weight and bias), each rank
    with its own half of the batch, against the plain head on the whole batch: relative differences
    of the loss and of the head's gradients (FSDP2 averages a gradient over the ranks), and the
    error a DTensor with ``process_group`` raises (None if it raised none)."""
    from torch.distributed.fsdp import fully_shard

    import prefopt
    from prefopt.nn import DPOLoss, LMHeadInput

    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    generator = torch.Generator().manual_seed(5)
    pairs, length, hidden_size, vocab_size = 2 * world_size, 6, 32, 19
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=generator)
    labels = torch.randint(0, vocab_size, (2 * pairs, length), generator=generator)
    labels[:, :2] = -100  # the prompt
    ref_logps = -20 * torch.rand(2 * pairs, generator=generator)
    torch.manual_seed(0)
    plain = torch.nn.Linear(hidden_size, vocab_size)
    sharded = torch.nn.Linear(hidden_size, vocab_size)
    sharded.load_state_dict(plain.state_dict())
    fully_shard(sharded)
    assert isinstance(sharded.weight, torch.distributed.tensor.DTensor)

    def loss_of(head: torch.nn.Linear, rows: torch.Tensor) -> torch.Tensor:
        chosen, rejected = rows, rows + pairs  # TRL's [chosen; rejected] layout, these pairs only
        index = torch.cat([chosen, rejected])
        loss, _ = DPOLoss(beta=0.3, backend="torch")(
            LMHeadInput(hidden[index], head.weight, head.bias), labels[index],
            ref_logps=ref_logps[index])
        token_logps = prefopt.linear_token_logprobs(hidden[index], head.weight, labels[index], bias=head.bias,
                                                    backend="torch")
        return loss + 0.01 * token_logps.sum()

    mine = torch.arange(rank * pairs // world_size, (rank + 1) * pairs // world_size)
    loss = loss_of(sharded, mine)  # the gathered head is not a module call: FSDP2's hooks stay out
    loss.backward()
    whole = torch.stack([loss_of(plain, torch.arange(r * pairs // world_size, (r + 1) * pairs // world_size))
                         for r in range(world_size)]).mean()
    whole.backward()
    losses = [torch.zeros(()) for _ in range(world_size)]
    torch.distributed.all_gather(losses, loss.detach())
    from conftest import relative_error

    whole = whole.item()
    found = {"loss": abs(torch.stack(losses).mean().item() - whole) / abs(whole)}
    try:  # a vocabulary-parallel call takes this rank's rows, not a DTensor to gather
        prefopt.linear_token_logprobs(hidden, sharded.weight, labels, process_group=torch.distributed.group.WORLD)
        refusal = None
    except TypeError as error:
        refusal = str(error)
    for name in ("weight", "bias"):
        gradient = getattr(sharded, name).grad
        assert isinstance(gradient, torch.distributed.tensor.DTensor), name
        found[name] = relative_error(gradient.full_tensor(), getattr(plain, name).grad)
    return found, refusal


def zero3_head_outside_a_forward() -> dict[str, float]:
    """prefopt's LM-head path on a ZeRO-3 partitioned head that no module forward gathers (a frozen
    one, as a reference model's): it gathers the head for the forward, and again for the backward,
    whose hidden-state gradient needs the whole weight. Relative differences of the log-probs, the
    entropy and that gradient from the plain head's."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from conftest import relative_error
    from prefopt.integrations.transformers import lm_head_token_stats

    generator = torch.Generator().manual_seed(6)
    hidden = torch.randn(9, 32, generator=generator)
    labels = torch.randint(0, 19, (9,), generator=generator)
    torch.manual_seed(0)
    plain = torch.nn.Linear(32, 19).requires_grad_(False)
    # In float32 (without a config DeepSpeed 0.19.8 partitions into a 16-bit dtype whatever dtype= says).
    with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 2, "zero_optimization": {"stage": 3},
                                                  "bf16": {"enabled": False}, "fp16": {"enabled": False}}):
        partitioned = torch.nn.Linear(32, 19).requires_grad_(False)
    with deepspeed.zero.GatheredParameters(list(partitioned.parameters()), modifier_rank=0), torch.no_grad():
        partitioned.load_state_dict(plain.state_dict())
    assert partitioned.weight.ds_status == ZeroParamStatus.NOT_AVAILABLE and partitioned.weight.numel() == 0
    outputs = []
    for head in (plain, partitioned):
        rows = hidden.clone().requires_grad_()
        stats = lm_head_token_stats(rows, head.weight, head.bias, labels, stats=("entropy",), ignore_index=None,
                                    temperature=1.0, softcap=None, logit_scale=1.0, backend="torch")
        assert partitioned.weight.ds_status == ZeroParamStatus.NOT_AVAILABLE  # partitioned before the backward
        (stats.logps.sum() + 0.5 * stats.entropy.sum()).backward()
        outputs.append((stats.logps.detach(), stats.entropy.detach(), rows.grad))
    return {name: relative_error(mine, reference)
            for name, mine, reference in zip(("logps", "entropy", "hidden gradient"), outputs[1], outputs[0])}


def rank_main(engine: str, rank: int, world_size: int, port: int, results_path: str) -> None:
    """One rank of a world of ``world_size`` on this machine (forked by tests/test_trl_engines.py from
    a server that has imported this module once); its output goes to rank{rank}.log beside the results."""
    directory = os.path.dirname(results_path)
    with open(os.path.join(directory, f"rank{rank}.log"), "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    if engine == "fsdp2":
        fsdp_on_cpu()
    results = run(engine, directory)
    if engine == "fsdp2":
        results["dtensor_head"], results["dtensor_refusal"] = dtensor_head()
    if engine == "zero3":
        results["zero3_head"] = zero3_head_outside_a_forward()
    if rank == 0:
        torch.save(results, results_path)
