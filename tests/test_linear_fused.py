"""The fused linear path's statistics inside the GEMM ("triton-fused": prefopt/kernels/linear_stats_fwd.py
and linear_stats_bwd.py) against explicit float64 logits, under Triton's interpreter on a CPU.

Shapes stay tiny and odd (rows, hidden size and vocabulary that no block divides): every kernel
program runs as numpy code.
"""

import pytest
import torch
from conftest import ALL_STATS, available_backend
from test_linear import check, random_problem

import prefopt
from prefopt.kernels.linear_stats_fwd import DEFAULT_TILES, GPU_TILES, TileConfig, fastest, tile_config
from prefopt.logprobs.linear import FUSED, linear_token_stats

# Tiles other than the interpreter's default, not square, so that a launcher or a mask that took
# the wrong side or the default would show.
OTHER_TILES = TileConfig(32, 64, 16, 4, 3)


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
    monkeypatch.setattr(prefopt.logprobs.linear, "GEMM_TILE_BYTES", 4 * 64 * 70)
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


def _gradients(hidden, weight, bias, labels, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = linear_token_stats(leaves[0], leaves[1], labels, bias=leaves[2], stats=("entropy",), backend=FUSED, **kwargs)
    return torch.autograd.grad(out.logps.sum() - 0.3 * out.entropy.sum(), leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_filter_eps_zero_is_exact_bit_for_bit(dtype):
    hidden, weight, bias, labels = random_problem((2, 40), 12, 150, dtype, seed=8)
    exact = _gradients(hidden, weight, bias, labels)
    for a, b in zip(exact, _gradients(hidden, weight, bias, labels, grad_filter_eps=0.0)):
        assert torch.equal(a, b)


def test_grad_filter_eps_above_every_entry_leaves_every_tile_out():
    hidden, weight, bias, labels = random_problem((2, 40), 12, 150, torch.float32, seed=9)
    grad_hidden, grad_weight, grad_bias = _gradients(hidden, weight, bias, labels, grad_filter_eps=1e9)
    assert not grad_hidden.any() and not grad_weight.any()
    assert grad_bias.any()  # grad_bias is never filtered


@pytest.mark.parametrize("function", [prefopt.linear_token_logprobs, prefopt.linear_sequence_logprobs])
def test_grad_filter_eps_reaches_the_backward_of_every_linear_function(function):
    hidden, weight, bias, labels = random_problem((2, 40), 12, 150, torch.float32, seed=12)
    hidden.requires_grad_(True)
    function(hidden, weight, labels, bias=bias, backend=FUSED, grad_filter_eps=1e9).sum().backward()
    assert hidden.grad is not None and not hidden.grad.any()


@pytest.mark.parametrize("tiles", [DEFAULT_TILES, OTHER_TILES], ids=["default-tiles", "other-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sparse_products_sum_the_kept_tiles(dtype, tiles):
    """The two block-sparse kernels against float64 products of the logits gradient with the
    left-out [block_m, block_n] tiles zeroed, ragged blocks at every edge, grad_hidden added to a
    nonzero accumulator, twice (deterministic)."""
    from prefopt.kernels.linear_grad_hidden import linear_grad_hidden
    from prefopt.kernels.linear_grad_weight import linear_grad_weight

    BLOCK_M, BLOCK_N = tiles.block_m, tiles.block_n

    generator = torch.Generator().manual_seed(10)
    rows, columns, hidden_size, col_start = 150, 140, 70, 64
    grad = torch.randn(rows, columns, generator=generator).to(dtype)
    hidden = torch.randn(rows, hidden_size, generator=generator).to(dtype)
    weight = torch.randn(col_start + columns + 5, hidden_size, generator=generator).to(dtype)
    earlier_chunks = torch.randn(rows, hidden_size, generator=generator)
    keep = (torch.rand(-(-rows // BLOCK_M), -(-columns // BLOCK_N), generator=generator) > 0.4).to(torch.int32)
    keep[0, 0], keep[-1, -1] = 1, 0
    mask = keep.repeat_interleave(BLOCK_M, 0)[:rows].repeat_interleave(BLOCK_N, 1)[:, :columns]
    kept = grad.double() * mask
    expected_hidden = earlier_chunks.double() + kept @ weight[col_start: col_start + columns].double()
    expected_weight = kept.T @ hidden.double()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    got = []
    for _ in range(2):
        got_hidden = earlier_chunks.clone()
        linear_grad_hidden(grad, weight, keep, col_start, accumulator=got_hidden, tiles=tiles)
        got_weight = linear_grad_weight(grad, hidden, keep, tiles=tiles)
        assert (got_hidden.double() - expected_hidden).abs().max() <= tolerance * expected_hidden.abs().max()
        assert (got_weight.double() - expected_weight).abs().max() <= tolerance * expected_weight.abs().max()
        got.append((got_hidden, got_weight))
    assert all(torch.equal(a, b) for a, b in zip(*got))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_filter_eps_below_every_entry_keeps_every_tile(dtype, monkeypatch):
    """A threshold above 0 sends every tile through the block-sparse kernels: below every entry,
    they keep all of them and give the exact gradients (to rounding), here over vocabulary chunks
    of one BLOCK_N each (grad_hidden accumulated across them)."""
    monkeypatch.setattr(prefopt.logprobs.linear, "GEMM_TILE_BYTES", 1)
    hidden, weight, bias, labels = random_problem((2, 40), 12, 150, dtype, seed=11)
    exact = _gradients(hidden, weight, bias, labels)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(exact, _gradients(hidden, weight, bias, labels, grad_filter_eps=1e-30)):
        assert (a.double() - b.double()).norm() <= tolerance * a.double().norm()


@pytest.mark.parametrize("eps,error", [(-1.0, ValueError), (float("nan"), ValueError), ("0", TypeError)])
def test_grad_filter_eps_is_checked(eps, error):
    hidden, weight, bias, labels = random_problem((1, 4), 4, 9, torch.float32)
    with pytest.raises(error, match="grad_filter_eps"):
        linear_token_stats(hidden, weight, labels, bias=bias, backend=FUSED, grad_filter_eps=eps)


def test_grad_filter_eps_needs_the_fused_backend():
    hidden, weight, bias, labels = random_problem((1, 4), 4, 9, torch.float32)
    with pytest.raises(ValueError, match="grad_filter_eps"):
        linear_token_stats(hidden, weight, labels, bias=bias, backend="torch", grad_filter_eps=1e-3)


def test_every_kernel_follows_the_tiles_chosen(monkeypatch):
    """With tiles other than the default (as a GPU's timing may choose), the forward, the
    backward's recomputation and the filter's block-sparse products agree on them: every
    statistic and gradient against float64, and a filter below every entry exact to rounding."""
    monkeypatch.setattr(prefopt.kernels.linear_stats_fwd, "DEFAULT_TILES", OTHER_TILES)
    monkeypatch.setattr(prefopt.logprobs.linear, "GEMM_TILE_BYTES", 1)  # vocabulary chunks of one tile
    hidden, weight, bias, labels = random_problem((2, 41), 17, 150, torch.float32, seed=13)
    check(hidden, weight, bias, labels, FUSED, softcap=5.0)
    exact = _gradients(hidden, weight, bias, labels)
    for a, b in zip(exact, _gradients(hidden, weight, bias, labels, grad_filter_eps=1e-30)):
        assert (a.double() - b.double()).norm() <= 1e-5 * a.double().norm()


def test_tiles_are_the_default_off_a_gpu():
    hidden, weight, bias, labels = random_problem((1, 8), 16, 70, torch.float32)
    assert tile_config(hidden, weight, bias, labels, logit_scale=1.0, temperature=1.0, softcap=None) == DEFAULT_TILES
    assert DEFAULT_TILES in GPU_TILES


def test_fastest_tiles_skip_what_cannot_run_and_keep_the_earlier_on_a_tie():
    a, b, c = GPU_TILES[:3]
    assert fastest((a, b, c), {a: 2.0, b: None, c: 1.0}.get) == c
    assert fastest((a, b, c), {a: 1.0, b: 1.0, c: 3.0}.get) == a
    with pytest.raises(RuntimeError, match="no tile configuration"):
        fastest((a, b), lambda tiles: None)
