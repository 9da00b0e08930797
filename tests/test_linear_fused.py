"""The fused linear path's statistics inside the GEMM ("triton-fused": kernels/linear_stats_fwd.py
and linear_stats_bwd.py) against explicit float64 logits, under Triton's interpreter on a CPU.

Shapes stay tiny and odd (rows, hidden size and vocabulary that no block divides): every kernel
program runs as numpy code.
"""

import pytest
import torch
from conftest import ALL_STATS, available_backend
from test_linear import check, random_problem

import prefopt
from prefopt.linear import FUSED, linear_token_stats


@pytest.fixture(autouse=True)
def triton_available():
    available_backend("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_every_statistic_and_gradient(dtype, bias):
    hidden, weight, bias_tensor, labels = random_problem((3, 23), 17, 150, dtype, bias=bias, seed=2)
    check(hidden, weight, bias_tensor, labels, FUSED)


@pytest.mark.parametrize("transform", [{"softcap": 5.0}, {"temperature": 0.7}, {"logit_scale": 0.5},
                                       {"softcap": 3.0, "temperature": 1.3, "logit_scale": 2.0}])
def test_softcap_temperature_and_logit_scale(transform):
    hidden, weight, bias, labels = random_problem((2, 37), 9, 131, torch.float32, seed=3)
    check(hidden, weight, bias, labels, FUSED, **transform)


@pytest.mark.parametrize("stats", [(), ("entropy",), ("log_sum_sq_probs",), ("mean_logits", "is_top1")])
def test_some_statistics(stats):
    hidden, weight, bias, labels = random_problem((1, 41), 8, 70, torch.float32, seed=4)
    check(hidden, weight, bias, labels, FUSED, stats=stats)


def test_ignored_rows_and_no_ignore_index():
    hidden, weight, bias, labels = random_problem((2, 30), 8, 65, torch.float32, seed=5, ignored_fraction=0.5)
    out, (grad_hidden, _, _) = check(hidden, weight, bias, labels, FUSED)
    ignored = labels == -100
    assert ignored.any() and not out.logps[ignored].any() and not out.entropy[ignored].any()
    assert not grad_hidden[ignored].any()
    check(hidden, weight, bias, labels.clamp(min=0), FUSED, ignore_index=None)


def test_many_row_chunks_and_vocabulary_tiles(monkeypatch):
    """Budgets shrunk so that the forward takes several chunks of rows and the backward several
    vocabulary tiles (each a multiple of the kernel's block, ragged at the end)."""
    monkeypatch.setattr(prefopt.linear, "GEMM_TILE_BYTES", 4 * 64 * 70)
    hidden, weight, bias, labels = random_problem((3, 50), 8, 301, torch.float32, seed=6)
    check(hidden, weight, bias, labels, FUSED, softcap=4.0)


def test_deterministic():
    hidden, weight, bias, labels = random_problem((2, 33), 12, 140, torch.bfloat16, seed=7)
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
        out = linear_token_stats(leaves[0], leaves[1], labels, bias=leaves[2], stats=ALL_STATS, backend=FUSED)
        loss = out.logps.sum() + 0.5 * out.entropy.sum() - out.log_sum_sq_probs.sum()
        runs.append((out, torch.autograd.grad(loss, leaves)))
    (first, first_grads), (second, second_grads) = runs
    for name in ("logps", "entropy", "mean_logits", "log_sum_sq_probs", "is_top1"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    for a, b in zip(first_grads, second_grads):
        assert torch.equal(a, b)


def test_float64_is_refused_naming_the_argument():
    hidden, weight, bias, labels = random_problem((1, 4), 4, 9, torch.float64)
    with pytest.raises(TypeError, match="hidden"):
        linear_token_stats(hidden, weight, labels, bias=bias, backend=FUSED)
