"""torch.compile(fullgraph=True) traces the operators without graph breaks and agrees with eager."""

import pytest
import torch
from conftest import DEVICE, random_labels, random_logits

import prefopt


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
