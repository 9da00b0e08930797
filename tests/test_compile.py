"""torch.compile(fullgraph=True) traces the operators without graph breaks and agrees with eager."""

import pytest
import torch
from conftest import DEVICE, random_labels, random_logits

import prefopt


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: the same functions are compiled for every backend and
    option, and the recompiles of one worker's tests would otherwise reach Dynamo's limit (8)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_of(logits, labels, cu_seqlens, backend, inplace_backward):
    stats = prefopt.token_stats(logits, labels, stats=("entropy", "mean_logits", "is_top1"), backend=backend,
                                inplace_backward=inplace_backward)
    packed = prefopt.sequence_logprobs(logits.detach().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       cu_seqlens=cu_seqlens, average=True, backend=backend)
    return stats.logps.sum() + 0.1 * stats.entropy.sum() + stats.mean_logits.mean() + packed.sum(), stats.is_top1


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_fullgraph_compile_matches_eager(backend, compiler, inplace_backward):
    if compiler == "inductor" and backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("inductor on CPU with interpreted Triton kernels adds nothing over aot_eager")
    logits = random_logits((2, 6, 37), torch.float32)
    labels = random_labels((2, 6), 37)
    cu_seqlens = torch.tensor([0, 5, 5, 12], device=DEVICE)
    compiled = torch.compile(loss_of, backend=compiler, fullgraph=True)
    results = []
    for function in (loss_of, compiled):
        leaf = logits.clone().requires_grad_(True)
        loss, is_top1 = function(leaf * 1, labels, cu_seqlens, backend, inplace_backward)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss, is_top1, grad))
    (eager_loss, eager_top1, eager_grad), (compiled_loss, compiled_top1, compiled_grad) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert torch.equal(compiled_top1, eager_top1)
    torch.testing.assert_close(compiled_grad, eager_grad)


def _logits_functions(backend):
    labels = random_labels((2, 6), 37)
    index = labels.clamp(min=0)
    return {
        "token_logprobs": lambda x: prefopt.token_logprobs(x, labels, temperature=0.7, backend=backend),
        "token_stats": lambda x: prefopt.token_stats(x, labels, stats=("log_sum_sq_probs",),
                                                     backend=backend).log_sum_sq_probs,
        "sequence_logprobs": lambda x: prefopt.sequence_logprobs(x, labels, backend=backend),
        # TRL's signature: no backend argument, "auto" decides.
        "selective_log_softmax": lambda x: prefopt.selective_log_softmax(x, index, 0.9, row_mask=labels != -100),
    }


def _linear_functions(backend, weight):
    labels = random_labels((2, 6), 37)
    return {
        "linear_token_logprobs": lambda h: prefopt.linear_token_logprobs(h, weight, labels, softcap=3.0,
                                                                         backend=backend),
        "linear_sequence_logprobs": lambda h: prefopt.linear_sequence_logprobs(h, weight, labels, average=True,
                                                                               backend=backend),
    }


@pytest.mark.parametrize("name", [*_logits_functions("torch"), *_linear_functions("torch", None)])
def test_every_public_function_traces_fullgraph(backend, name):
    """Each public log-prob function, compiled whole, gives eager's values and input gradient."""
    generator = torch.Generator().manual_seed(3)
    if name.startswith("linear_"):
        weight = torch.randn(37, 8, generator=generator).to(DEVICE)
        function = _linear_functions(backend, weight)[name]
        leaf_value = torch.randn(2, 6, 8, generator=generator).to(DEVICE)
    else:
        function = _logits_functions(backend)[name]
        leaf_value = random_logits((2, 6, 37), torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    results = []
    for run in (function, compiled):
        leaf = leaf_value.clone().requires_grad_(True)
        value = run(leaf)
        (grad,) = torch.autograd.grad((value * torch.linspace(0.5, 1.5, value.numel()).view(value.shape)).sum(), leaf)
        results.append((value, grad))
    (eager_value, eager_grad), (compiled_value, compiled_grad) = results
    torch.testing.assert_close(compiled_value, eager_value)
    torch.testing.assert_close(compiled_grad, eager_grad)
