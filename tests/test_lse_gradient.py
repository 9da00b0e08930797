"""The log-sum-exp is a differentiable output of the fused operators (the vocabulary-parallel
path combines it across shards): its gradient, mixed with those of the log-probs and entropy,
against the float64 oracle for the logits and the fused linear paths.

The operators' outputs are float32 whatever the input dtype, so finite differences
(torch.autograd.gradcheck) cannot resolve them; the float64 reference's autograd is the oracle.
"""

import pytest
import torch
from conftest import DEVICE, TOLERANCE, random_labels, random_logits, reference_stats, relative_error

import prefopt
from prefopt.backends import unavailable_reason
from prefopt.logprobs.linear import _local_linear_token_stats
from prefopt.logprobs.api import local_token_stats
from prefopt.logprobs.transform import transformed_logits

TRANSFORMS = [(1.0, None), (0.7, 5.0)]
OUTPUTS = ("logps", "lse", "entropy")


def reference_outputs(logits64, labels, temperature, softcap):
    """logps, lse (0 where ignored) and entropy of float64 logits, by plain autograd."""
    stats = reference_stats(logits64, labels, temperature=temperature, softcap=softcap)
    scored = labels != -100
    lse = torch.where(scored, torch.logsumexp(transformed_logits(logits64, temperature, softcap), -1), 0.0)
    return {"logps": stats.logps, "lse": lse, "entropy": stats.entropy}


def weighted_sum(outputs, upstream):
    return sum((outputs[name].double().cpu() * upstream[name]).sum() for name in OUTPUTS)


@pytest.mark.parametrize("temperature,softcap", TRANSFORMS)
@pytest.mark.parametrize("inplace_backward", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_path(backend, temperature, softcap, inplace_backward, dtype):
    logits = random_logits((3, 4, 37), dtype)
    labels = random_labels((3, 4), 37)
    labels[0, 0] = -100
    upstream = {name: torch.randn(labels.shape, dtype=torch.float64) for name in OUTPUTS}

    reference_input = logits.detach().double().cpu().requires_grad_(True)
    reference = reference_outputs(reference_input, labels.cpu(), temperature, softcap)
    (reference_grad,) = torch.autograd.grad(weighted_sum(reference, upstream), reference_input)

    leaf = logits.detach().clone().requires_grad_(True)
    model_logits = leaf * 1  # a non-leaf buffer, which the in-place backward overwrites
    stats, lse = local_token_stats(model_logits, labels, frozenset({"entropy"}), -100, temperature=temperature,
                                   softcap=softcap, inplace_backward=inplace_backward, backend=backend,
                                   with_lse=True)
    outputs = {"logps": stats.logps, "lse": lse, "entropy": stats.entropy}
    tolerance = TOLERANCE[dtype]
    for name in OUTPUTS:
        error = relative_error(outputs[name].cpu(), reference[name])
        assert error <= tolerance, f"{name}: relative error {error:.2e}"
    (grad,) = torch.autograd.grad(weighted_sum(outputs, upstream), model_logits)
    assert grad.dtype == dtype
    error = relative_error(grad.cpu(), reference_grad)
    assert error <= tolerance, f"gradient: relative error {error:.2e}"
    assert (grad[labels == -100] == 0).all(), "ignored rows must receive exactly zero gradient"


def test_logits_path_lse_alone(backend):
    """Only the log-sum-exp differentiated: the gradient is softmax(z) * dz/dx."""
    logits = random_logits((5, 23), torch.float32)
    labels = random_labels((5,), 23)
    leaf = logits.detach().clone().requires_grad_(True)
    _, lse = local_token_stats(leaf, labels, frozenset(), -100, temperature=0.5, softcap=3.0,
                               inplace_backward=False, backend=backend, with_lse=True)
    (grad,) = torch.autograd.grad(lse.sum(), leaf)
    reference_input = logits.detach().double().cpu().requires_grad_(True)
    reference = reference_outputs(reference_input, labels.cpu(), 0.5, 3.0)["lse"]
    (reference_grad,) = torch.autograd.grad(reference.sum(), reference_input)
    assert relative_error(grad.cpu(), reference_grad) <= 1e-5


@pytest.mark.parametrize("linear_backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("temperature,softcap", TRANSFORMS)
@pytest.mark.parametrize("tiling", ["one tile", "small tiles", "small tiles, every row multiplied"])
def test_linear_path(linear_backend, temperature, softcap, tiling, monkeypatch):
    reason = unavailable_reason(linear_backend, DEVICE)
    if reason is not None:
        pytest.skip(f"backend {linear_backend!r}: {reason}")
    if tiling != "one tile":
        # Several chunks of rows and vocabulary tiles: each label's term lands in its own tile.
        monkeypatch.setattr(prefopt.logprobs.torch_backend, "MIN_CHUNK_BYTES", 4 * 29 * 3)
        monkeypatch.setattr(prefopt.logprobs.torch_backend, "MAX_CHUNK_BYTES", 4 * 29 * 3)
        monkeypatch.setattr(prefopt.logprobs.linear, "WEIGHT_TILE_BYTES", 4 * 29 * 3)
        monkeypatch.setattr(prefopt.logprobs.linear, "GEMM_TILE_BYTES", 4 * 29 * 3)
        monkeypatch.setattr(prefopt.logprobs.linear, "GEMM_TILE_MULTIPLE", 1)
    if tiling.endswith("every row multiplied"):
        # As during a CUDA graph capture: the ignored row goes through the products too.
        monkeypatch.setattr(prefopt.logprobs.linear, "_capturing", lambda labels: True)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(10, 8, generator=generator)
    weight = torch.randn(29, 8, generator=generator)
    bias = torch.randn(29, generator=generator)
    labels = torch.randint(0, 29, (10,), generator=generator)
    labels[3] = -100
    labels[5] = labels[6]  # a repeated label: its weight row gathers two rows' gradients
    logit_scale = 0.5
    upstream = {name: torch.randn(labels.shape, dtype=torch.float64, generator=generator) for name in OUTPUTS}

    reference_leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = (reference_leaves[0] @ reference_leaves[1].T + reference_leaves[2]) * logit_scale
    reference = reference_outputs(logits, labels, temperature, softcap)
    reference_grads = torch.autograd.grad(weighted_sum(reference, upstream), reference_leaves)

    leaves = [t.to(DEVICE).requires_grad_(True) for t in (hidden, weight, bias)]
    stats, lse = _local_linear_token_stats(*leaves, labels.to(DEVICE), frozenset({"entropy"}), -100,
                                           temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                                           backend=linear_backend, with_lse=True)
    outputs = {"logps": stats.logps, "lse": lse, "entropy": stats.entropy}
    for name in OUTPUTS:
        assert relative_error(outputs[name].cpu(), reference[name]) <= 1e-5, name
    grads = torch.autograd.grad(weighted_sum(outputs, upstream), leaves)
    for name, grad, reference_grad in zip(("hidden", "weight", "bias"), grads, reference_grads):
        error = relative_error(grad.cpu(), reference_grad)
        assert error <= 1e-5, f"{name} gradient: relative error {error:.2e}"
    assert (grads[0][3] == 0).all(), "an ignored row's hidden state must receive exactly zero gradient"
