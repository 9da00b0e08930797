"""The gradient at large |logit|: p_j = exp((z_j - lse) - lse_residual) keeps float32 rounding of
z_j - m however far the logits sit from 0 (a float32 lse alone is off by up to half an ulp of |m|,
2^-9 at 65536 and 2^-5 at 2^20, an error every p_j would inherit).

The oracle is float64 autograd on the very float32 values the backends read.
"""

import pytest
import torch
from conftest import DEVICE, reference_stats, relative_error

import prefopt

# Relative error of the whole gradient at float32 rounding of z - m: the logits spread over
# ~±16 around the offset, so |log p| reaches ~40 and its rounding 2^-24 * 40 ~ 2.4e-6 for the
# farthest (least weighted) entries; measured 5e-8 to 8e-8 (1.9e-3 and 3.3e-2 without the residual).
GRADIENT_BOUND = 1e-6


def offset_logits(offset: float, rows: int = 6, vocab_size: int = 300, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (offset + 4.0 * torch.randn(rows, vocab_size, generator=generator, dtype=torch.float64)).float()


def weighted_gradient(logits: torch.Tensor, labels: torch.Tensor, backend: str, inplace_backward: bool = False):
    """d(sum w1 log p + w2 entropy)/d logits; the weights are fixed per row."""
    leaf = logits.clone().requires_grad_()
    source = leaf.clone() if inplace_backward else leaf
    if backend == "reference":
        stats = reference_stats(source, labels, stats=("entropy",))
    else:
        stats = prefopt.token_stats(source, labels, stats=("entropy",), backend=backend,
                                    inplace_backward=inplace_backward)
    w = torch.linspace(0.5, 1.5, labels.numel(), dtype=torch.float64).view(labels.shape)
    ((stats.logps.double().cpu() * w).sum() + (stats.entropy.double().cpu() * (2.0 - w)).sum()).backward()
    return leaf.grad


@pytest.mark.parametrize("offset", [65536.0, -65536.0, 2.0**20, -(2.0**20)])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_gradient_at_large_logits_is_at_float32_rounding_of_z_minus_m(backend, offset, inplace_backward):
    logits = offset_logits(offset)
    labels = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=torch.Generator().manual_seed(1))
    labels[2] = -100  # an ignored row: exact zeros, as anywhere
    expected = weighted_gradient(logits.double(), labels, "reference")
    gradient = weighted_gradient(logits.to(DEVICE), labels.to(DEVICE), backend, inplace_backward)
    assert relative_error(gradient, expected) < GRADIENT_BOUND
    assert torch.equal(gradient[2].cpu(), torch.zeros(logits.shape[1]))


def test_float16_ties_at_6e4_split_the_probability_exactly(backend):
    """Two maxima at 6e4 (fp16's range) and two far below: p = (1/2, 0, 0, 1/2), so the
    log-prob's gradient is exactly (1/2, 0, 0, -1/2) in float16 (0.499 / -0.501 from lse alone)."""
    logits = torch.tensor([[6e4, -6e4, 0.0, 6e4]], dtype=torch.float16, device=DEVICE, requires_grad=True)
    labels = torch.tensor([0], device=DEVICE)
    prefopt.token_stats(logits, labels, backend=backend).logps.sum().backward()
    assert torch.equal(logits.grad.cpu(), torch.tensor([[0.5, 0.0, 0.0, -0.5]], dtype=torch.float16))
