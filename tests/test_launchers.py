"""The kernel launchers write every output element: outputs are poisoned with NaN before a run."""

import pytest
import torch
from conftest import DEVICE, random_labels, random_logits

from prefopt.logprobs import op as ops


def launchers(backend):
    """(forward, backward, leading dimensions per block) exactly as the operators dispatch them."""
    forward, levels = ops._implementation(backend, "forward")
    backward, _ = ops._implementation(backend, "backward")
    return forward, backward, levels


@pytest.mark.parametrize("vocab_size", [1, 5, 9000])
def test_every_output_element_is_written(backend, vocab_size):
    forward, backward, levels = launchers(backend)
    logits = random_logits((4, vocab_size), torch.bfloat16)
    labels = random_labels((4,), vocab_size, ignored_fraction=0.5)
    labels[0] = -100
    block = logits.view(1, 4, vocab_size) if levels == 2 else logits
    poisoned = {"dtype": torch.float32, "device": DEVICE}
    outputs = [torch.full((4,), float("nan"), **poisoned) for _ in range(5)]
    is_top1 = torch.ones(4, dtype=torch.bool, device=DEVICE)
    forward(block, labels, *outputs, is_top1, ignore_index=-100, temperature=1.0, softcap=None)
    logps, lse, entropy, mean_logits, log_sum_sq = outputs
    for output in outputs:
        assert torch.isfinite(output).all()
        assert (output[labels == -100] == 0).all()
    assert not is_top1[labels == -100].any()

    grad = torch.full_like(logits, float("nan"))
    grad_block = grad.view(1, 4, vocab_size) if levels == 2 else grad
    upstream = [torch.randn(4, **poisoned) for _ in range(4)]
    backward(block, grad_block, labels, lse, entropy, log_sum_sq, *upstream,
             ignore_index=-100, temperature=1.0, softcap=None)
    assert torch.isfinite(grad).all()
    assert (grad[labels == -100] == 0).all()
