"""The fused loss kernels (backend="triton" and "cuda") against the reference formulas of
prefopt.losses.

Values, rewards, metrics and gradients, for every type the kernels cover, in float32 and
float64, at ordinary and extreme (±1e4) margins. Without a GPU the Triton kernels run through
Triton's interpreter on CPU tensors (tests/conftest.py), and the CUDA kernels' source runs these
same tests on the CPU through the host simulator (the fixture's "cuda-sim", tests/cuda_simulator.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CUDA, DEVICE, fixture_backend

from prefopt import BackendUnavailableError
from prefopt.backends import unavailable_reason
from prefopt._codes import FUSED_BACKENDS, METRIC_NAMES
from prefopt.losses import CPO_LOSS_TYPES, DPO_LOSS_TYPES, KTO_LOSS_TYPES, cpo_loss, dpo_loss, kto_loss, orpo_loss

DTYPES = [torch.float32, torch.float64]
# aot and aot_unpaired sort across the batch; sft (a batch-level NLL) has no fused kernel yet.
FUSED_DPO_TYPES = [kind for kind in DPO_LOSS_TYPES if kind not in ("aot", "aot_unpaired", "sft")]
MARGIN_TYPES = ["sigmoid", "robust", "hinge", "ipo", "exo_pair", "apo_down", "discopop", "sigmoid_norm"]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-11}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[CUDA if name == "cuda" else name for name in FUSED_BACKENDS])
def backend(request) -> str:
    """The fused backends that can run here (the log-prob ``backend`` fixture also has "torch")."""
    return fixture_backend(request)


def smoothing_for(kind: str) -> float:
    return {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 0.15}.get(kind, 0.0)


def rand_logps(n: int, dtype, seed: int, count: int = 4, scale: float = 6.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(-scale * torch.rand(n, generator=g, dtype=torch.float64) - 0.05).to(dtype) for _ in range(count)]


def lengths(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Zeros included: an empty completion counts as one token.
    return torch.randint(0, 12, (n,), generator=g), torch.randint(0, 12, (n,), generator=g)


def on(device, tensors):
    return [None if t is None else t.to(device).requires_grad_(t.is_floating_point()) for t in tensors]


def assert_near(actual: torch.Tensor, expected: torch.Tensor, dtype, what: str) -> None:
    """Elementwise, with the absolute slack scaled to the size of the whole tensor."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype] * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def compare(fn, tensors, grad_names, dtype, backend, **kwargs):
    """Run ``fn`` fused by ``backend`` on DEVICE and as the reference on CPU, with the same
    values; compare the outputs, the metrics and the gradients of loss + a random weighting of
    losses (so both upstream paths of the backward are exercised)."""
    results = []
    for name, device in ((backend, DEVICE), ("reference", "cpu")):
        args = on(device, tensors[0])
        named = {k: v for k, v in zip(tensors[1], on(device, list(tensors[2].values())))}
        out, metrics = fn(*args, **named, **kwargs, backend=name, return_metrics=True)
        weights = torch.linspace(0.5, 1.5, out.losses.shape[0], dtype=out.losses.dtype, device=out.losses.device)
        objective = out.loss.sum() + (weights * out.losses).sum()
        leaves = [a for a in args if a is not None and a.is_floating_point()] + [
            named[k] for k in grad_names if named.get(k) is not None
        ]
        grads = torch.autograd.grad(objective, leaves)
        results.append((out, metrics, grads))
    (out, metrics, grads), (ref, ref_metrics, ref_grads) = results
    for name, a, b in zip(ref._fields, out, ref):
        assert a.dtype == dtype and a.device.type == DEVICE.type, name
        assert_near(a, b, dtype, name)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert list(metrics) == list(ref_metrics)
    for name in ref_metrics:
        assert metrics[name].shape == () and not metrics[name].requires_grad, name
        assert_near(metrics[name], ref_metrics[name], dtype, name)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert torch.isfinite(a).all(), f"gradient {i} not finite"
        assert_near(a, b, dtype, f"gradient {i}")
    return out, metrics


# ----------------------------------------------------------------------------------------------
# DPO family.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", FUSED_DPO_TYPES)
def test_dpo_types_match_reference(kind, dtype, backend):
    seed = FUSED_DPO_TYPES.index(kind)
    logps = rand_logps(7, dtype, seed)
    lc, lr = lengths(7, seed)
    optional = {"chosen_lengths": lc, "rejected_lengths": lr}
    if kind in MARGIN_TYPES:
        optional["margin"] = torch.linspace(-0.4, 0.6, 7, dtype=dtype)
    out, metrics = compare(dpo_loss, (logps, list(optional), optional), ["margin"], dtype, backend,
                           beta=0.3, loss_type=kind, label_smoothing=smoothing_for(kind),
                           bco_delta=0.2, discopop_tau=0.3)
    assert list(metrics) == list(METRIC_NAMES["dpo"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ipo_without_lengths_and_bco_delta_tensor(dtype, backend):
    logps = rand_logps(6, dtype, seed=20)
    compare(dpo_loss, (logps, [], {}), [], dtype, backend, beta=0.2, loss_type="ipo")
    delta = torch.tensor(0.35, dtype=dtype, device=DEVICE)
    compare(dpo_loss, (logps, [], {}), [], dtype, backend, beta=0.2, loss_type="bco_pair", bco_delta=delta)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_list_of_every_fused_type(dtype, backend):
    # Weights that float32 cannot hold exactly check the float64 path end to end.
    logps = rand_logps(9, dtype, seed=21)
    lc, lr = lengths(9, 21)
    weights = [0.1 * (i + 1) / 3 for i in range(len(FUSED_DPO_TYPES))]
    optional = {"chosen_lengths": lc, "rejected_lengths": lr}
    compare(dpo_loss, (logps, list(optional), optional), [], dtype, backend, beta=0.7, loss_type=FUSED_DPO_TYPES,
            loss_weights=weights, label_smoothing=0.1)


def test_accuracy_counts_strict_wins_only(backend):
    # Pairs 0 and 1 tie (equal rewards), pair 2 wins, pair 3 loses: TRL's chosen > rejected.
    pc = torch.tensor([-1.0, -2.0, -1.0, -3.0])
    pr = torch.tensor([-1.0, -2.0, -2.0, -1.0])
    ref = torch.full((4,), -1.5)
    for name in (backend, "reference"):
        _, metrics = dpo_loss(*(t.to(DEVICE) for t in (pc, pr, ref, ref)), backend=name, return_metrics=True)
        assert metrics["rewards/accuracies"].item() == 0.25


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction, backend):
    logps = rand_logps(5, torch.float64, seed=22)
    out, _ = compare(dpo_loss, (logps, [], {}), [], torch.float64, backend, loss_type="robust", label_smoothing=0.1,
                     reduction=reduction)
    assert out.loss.shape == (() if reduction == "sum" else (5,))


def test_many_blocks(backend):
    # More examples than one block of the kernels: the loops over the batch and every batch sum
    # (metrics, CPO's token count, the gradient of ORPO's batch NLL).
    logps = rand_logps(2500, torch.float32, seed=23)
    compare(dpo_loss, (logps, ["margin"], {"margin": torch.rand(2500) - 0.5}), ["margin"], torch.float32, backend,
            loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.01])
    desirable = torch.rand(2500, generator=torch.Generator().manual_seed(23)) < 0.4
    compare(kto_loss, (logps[:2], ["desirable"], {"desirable": desirable}), [], torch.float32, backend, kl=0.2)
    lc, lr = lengths(2500, 23)
    compare(cpo_loss, (logps[:2], ["chosen_lengths", "rejected_lengths"], {"chosen_lengths": lc, "rejected_lengths": lr}),
            [], torch.float32, backend, loss_type="simpo", cpo_alpha=0.5)
    compare(orpo_loss, ([t / 10 for t in logps[:2]], ["chosen_nll"], {"chosen_nll": torch.tensor(1.25)}),
            ["chosen_nll"], torch.float32, backend)


def test_gradcheck_every_type_at_once(backend):
    logps = [t.to(DEVICE).requires_grad_() for t in rand_logps(4, torch.float64, seed=24, scale=2.0)]
    margin = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64, device=DEVICE, requires_grad=True)
    lc, lr = (t.to(DEVICE) for t in lengths(4, 24))

    def fn(a, b, c, d, m):
        kinds = [k for k in FUSED_DPO_TYPES if k in MARGIN_TYPES]
        first = dpo_loss(a, b, c, d, loss_type=kinds, margin=m, chosen_lengths=lc, rejected_lengths=lr,
                         label_smoothing=0.1, discopop_tau=0.5, backend=backend).loss
        others = dpo_loss(a, b, c, d, loss_type=["nca_pair", "bco_pair", "sppo_hard", "apo_zero"],
                          backend=backend, reduction="none").loss
        return first + others

    assert torch.autograd.gradcheck(fn, (*logps, margin), fast_mode=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", FUSED_DPO_TYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_dpo_extreme_margins(kind, dtype, sign, backend):
    # βΔ = ±1e4 with β = 0.1: chosen log-ratio ±5e4, rejected ∓5e4, plus a ±1e4 margin.
    pc = torch.full((3,), sign * 5e4, dtype=dtype)
    pr = -pc
    zeros = torch.zeros(3, dtype=dtype)
    ones = torch.ones(3, dtype=torch.int64)
    optional = {"chosen_lengths": ones, "rejected_lengths": ones}
    if kind in MARGIN_TYPES:
        optional["margin"] = torch.tensor([1e4, -1e4, 0.0], dtype=dtype)
    compare(dpo_loss, ([pc, pr, zeros, zeros.clone()], list(optional), optional), ["margin"], dtype, backend,
            beta=0.1, loss_type=kind, label_smoothing=smoothing_for(kind))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype, backend):
    # Outputs and gradients come back in the inputs' dtype; the math ran in float32, so they are
    # the float64 reference rounded once (relative error within the dtype's resolution).
    logps = [t.to(dtype).to(DEVICE).requires_grad_() for t in rand_logps(6, torch.float64, seed=28)]
    out, metrics = dpo_loss(*logps, loss_type=["sigmoid", "ipo"], backend=backend, return_metrics=True)
    grads = torch.autograd.grad(out.loss, logps)
    exact = [t.detach().double().cpu().requires_grad_() for t in logps]
    ref, ref_metrics = dpo_loss(*exact, loss_type=["sigmoid", "ipo"], backend="reference", return_metrics=True)
    ref_grads = torch.autograd.grad(ref.loss, exact)
    resolution = torch.finfo(dtype).eps
    for actual, expected in [(out.losses, ref.losses), (out.loss, ref.loss), *zip(grads, ref_grads),
                             (metrics["rewards/margins"], ref_metrics["rewards/margins"])]:
        assert actual.dtype == dtype
        torch.testing.assert_close(actual.double().cpu(), expected.detach(), rtol=resolution, atol=resolution)


def test_sorting_types_stay_on_the_reference_path(backend):
    logps = [t.to(DEVICE) for t in rand_logps(4, torch.float32, seed=25)]
    for kind in ("aot", "aot_unpaired"):
        with pytest.raises(BackendUnavailableError, match=f"backend='{backend}'.*{kind}.*sorts across the batch"):
            dpo_loss(*logps, loss_type=["sigmoid", kind], backend=backend)
        # "auto" computes them (on the reference path) wherever it runs.
        auto = dpo_loss(*logps, loss_type=kind)
        torch.testing.assert_close(auto.losses, dpo_loss(*logps, loss_type=kind, backend="reference").losses)


def test_sft_stays_on_the_reference_path(backend):
    logps = [t.to(DEVICE) for t in rand_logps(4, torch.float32, seed=27)]
    counts = torch.tensor([3, 1, 4, 2], device=DEVICE)
    options = dict(loss_type=["sigmoid", "sft"], chosen_lengths=counts, rejected_lengths=counts)
    with pytest.raises(BackendUnavailableError, match=f"backend='{backend}'.*loss_type 'sft'"):
        dpo_loss(*logps, backend=backend, **options)
    auto = dpo_loss(*logps, **options)
    torch.testing.assert_close(auto.losses, dpo_loss(*logps, backend="reference", **options).losses)


# The types TRL lets an f-divergence change, less sft (no fused kernel).
F_DIVERGENCE_KINDS = ["sigmoid", "robust", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f_divergence_type", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergences_match_reference(backend, f_divergence_type, dtype):
    seed = 40 + ["forward_kl", "js_divergence", "alpha_divergence"].index(f_divergence_type)
    # Log-ratios within a few units: forward KL's scores grow as e^(-x).
    logps = rand_logps(6, dtype, seed=seed, scale=1.5)
    chosen_lengths, rejected_lengths = lengths(6, seed)
    margin = 0.3 * rand_logps(6, dtype, seed=seed + 100, count=1)[0]
    for kinds in (["ipo"], F_DIVERGENCE_KINDS):
        weights = [0.2 * (i + 1) for i in range(len(kinds))]
        compare(dpo_loss, (logps, ["chosen_lengths", "rejected_lengths", "margin"],
                           {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths,
                            "margin": margin}),
                ["margin"], dtype, backend, beta=0.4, loss_type=kinds, loss_weights=weights, label_smoothing=0.2,
                f_divergence_type=f_divergence_type, f_alpha_divergence_coef=-0.7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_divergence_clamp_matches_reference(backend, dtype):
    # (α-1)·x past 80 on some pairs: the clamp, and its zero gradient, in both paths.
    logps = rand_logps(4, dtype, seed=44, scale=1.0)
    logps[0] = logps[0] + torch.tensor([0.0, 30.0, 0.0, 45.0], dtype=dtype)
    compare(dpo_loss, (logps, [], {}), [], dtype, backend, beta=0.01, loss_type="hinge",
            f_divergence_type="alpha_divergence", f_alpha_divergence_coef=3.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_wpo_weights_match_reference(backend, dtype):
    logps = rand_logps(7, dtype, seed=45)
    chosen_lengths, rejected_lengths = lengths(7, 45)
    chosen_weights, rejected_weights = (t.exp() for t in rand_logps(7, dtype, seed=46, count=2, scale=1.0))
    for kinds in (["sigmoid"], FUSED_DPO_TYPES):
        compare(dpo_loss, (logps, ["chosen_lengths", "rejected_lengths"],
                           {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}),
                [], dtype, backend, beta=0.3, loss_type=kinds, label_smoothing=0.2,
                chosen_weights=chosen_weights.to(DEVICE), rejected_weights=rejected_weights.to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", CPO_LOSS_TYPES)
def test_alphapo_matches_reference(backend, kind, dtype):
    logps = rand_logps(5, dtype, seed=47 + CPO_LOSS_TYPES.index(kind), count=2)
    chosen_lengths, rejected_lengths = lengths(5, 47)
    for alpha in (0.3, -0.6):
        compare(cpo_loss, (logps, ["chosen_lengths", "rejected_lengths"],
                           {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}),
                [], dtype, backend, beta=0.5, loss_type=kind, label_smoothing=0.1 if kind in ("sigmoid", "simpo") else 0.0,
                simpo_gamma=0.4, cpo_alpha=0.8, alpha=alpha)


def test_bad_backend_is_rejected_before_any_kernel():
    logps = rand_logps(3, torch.float32, seed=26)
    for bad in ("torch", "fused", None):
        with pytest.raises(ValueError, match="backend"):
            dpo_loss(*logps, backend=bad)
    with pytest.raises(ValueError, match="backend"):
        kto_loss(logps[0], logps[1], torch.tensor([True, False, True]), backend="Triton")
    # Validation of the other arguments still comes first and names them.
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*logps, beta=-1.0, backend="triton")


def test_an_unavailable_fused_backend_says_why():
    logps = rand_logps(3, torch.float32, seed=26)
    for backend in FUSED_BACKENDS:
        reason = unavailable_reason(backend, DEVICE)
        if reason is None:
            continue
        with pytest.raises(BackendUnavailableError, match=f"backend='{backend}' cannot compute this loss"):
            dpo_loss(*logps, backend=backend)
        # "auto" still computes the loss, on whichever path can.
        dpo_loss(*logps)


def test_deterministic_bitwise(backend):
    logps = [t.to(DEVICE).requires_grad_() for t in rand_logps(3000, torch.float32, seed=27)]
    runs = []
    for _ in range(2):
        out, metrics = dpo_loss(*logps, loss_type=["sigmoid", "discopop"], backend=backend, return_metrics=True)
        grads = torch.autograd.grad(out.loss, logps)
        runs.append([out.loss, out.losses, *metrics.values(), *grads])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# KTO, CPO/SimPO, ORPO.
# ----------------------------------------------------------------------------------------------


# The interpreter computes the NaN mean of an absent class with numpy, which warns about 0/0.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KTO_LOSS_TYPES)
@pytest.mark.parametrize("mix", ["mixed", "all_desirable", "all_undesirable"])
def test_kto_matches_reference(kind, mix, dtype, backend):
    policy, ref = rand_logps(8, dtype, seed=30, count=2)
    desirable = {"mixed": torch.tensor([True, False, False, True, True, False, True, False]),
                 "all_desirable": torch.ones(8, dtype=torch.bool),
                 "all_undesirable": torch.zeros(8, dtype=torch.bool)}[mix]
    kl = torch.tensor(0.4, dtype=dtype, device=DEVICE)
    _, metrics = compare(kto_loss, ([policy, ref], ["desirable"], {"desirable": desirable}), [], dtype, backend,
                         kl=kl, beta=0.3, desirable_weight=1.3, undesirable_weight=0.6, loss_type=kind)
    assert list(metrics) == list(METRIC_NAMES["kto"])
    assert metrics["count/chosen"].item() == desirable.sum().item()
    # A class absent from the batch has no mean.
    assert torch.isnan(metrics["rewards/rejected"]).item() == (mix == "all_desirable")
    assert torch.isnan(metrics["rewards/chosen"]).item() == (mix == "all_undesirable")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kto_extremes_and_float_kl(dtype, backend):
    policy = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=dtype)
    ref = torch.zeros(4, dtype=dtype)
    desirable = torch.tensor([True, True, False, False])
    for kind in KTO_LOSS_TYPES:
        compare(kto_loss, ([policy, ref], ["desirable"], {"desirable": desirable}), [], dtype, backend, kl=1e3,
                loss_type=kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", CPO_LOSS_TYPES)
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_cpo_matches_reference(kind, alpha, dtype, backend):
    chosen, rejected = rand_logps(7, dtype, seed=31, count=2)
    lc, lr = lengths(7, 31)
    optional = {"chosen_lengths": lc, "rejected_lengths": lr}
    eps = 0.1 if kind in ("sigmoid", "simpo") else 0.0
    compare(cpo_loss, ([chosen, rejected], list(optional), optional), [], dtype, backend, beta=0.4, loss_type=kind,
            label_smoothing=eps, simpo_gamma=0.3, cpo_alpha=alpha)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpo_extremes(dtype, backend):
    chosen = torch.tensor([-1e5, -1e-3, -1e4], dtype=dtype)
    rejected = torch.tensor([-1e-3, -1e5, -1e4], dtype=dtype)
    ones = torch.ones(3, dtype=torch.int64)
    for kind in CPO_LOSS_TYPES:
        compare(cpo_loss, ([chosen, rejected], ["chosen_lengths", "rejected_lengths"],
                           {"chosen_lengths": ones, "rejected_lengths": ones}), [], dtype, backend, loss_type=kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nll", ["none", "scalar", "vector"])
def test_orpo_matches_reference(nll, dtype, backend):
    chosen, rejected = rand_logps(6, dtype, seed=32, count=2, scale=3.0)
    optional = {"none": {}, "scalar": {"chosen_nll": torch.tensor(1.25, dtype=dtype)},
                "vector": {"chosen_nll": torch.linspace(0.5, 2.0, 6, dtype=dtype)}}[nll]
    _, metrics = compare(orpo_loss, ([chosen, rejected], list(optional), optional), ["chosen_nll"], dtype, backend,
                         beta=0.25)
    assert list(metrics) == list(METRIC_NAMES["orpo"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "chosen,rejected",
    [(0.0, -3.0), (-1e-30, -1e-3), (-1e-8, -1e4), (-0.69, -0.7), (-0.7, 0.0), (-1e4, -1e-30), (-3.0, -1e4)],
)
def test_orpo_extremes(chosen, rejected, dtype, backend):
    # log p = 0 exactly (infinite odds: the clamp), -1e-30 (odds ~1e30), around -ln 2, and -1e4.
    # One pair per call: a 1e30 gradient would otherwise set the tolerance of its neighbours.
    pair = [torch.tensor([chosen], dtype=dtype), torch.tensor([rejected], dtype=dtype)]
    compare(orpo_loss, (pair, [], {}), [], dtype, backend)


def test_torch_compile_fullgraph_fused(backend):
    torch._dynamo.reset()
    pc, pr, rc, rr = [t.to(DEVICE) for t in rand_logps(6, torch.float32, seed=33)]
    lc, lr = (t.to(DEVICE) for t in lengths(6, 33))
    desirable = torch.tensor([True, False, True, True, False, False], device=DEVICE)

    def step(pc, pr, rc, rr):
        a, metrics = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.1],
                              chosen_lengths=lc, rejected_lengths=lr, backend=backend, return_metrics=True)
        b = kto_loss(pc, rc, desirable, kl=torch.tensor(0.1, device=DEVICE), backend=backend)
        c = cpo_loss(pc, pr, loss_type="simpo", chosen_lengths=lc, rejected_lengths=lr, backend=backend)
        d = orpo_loss(pc / 10, pr / 10, backend=backend)
        return a.loss + b.loss + c.loss + d.loss, metrics["rewards/accuracies"], a.chosen_rewards

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for function in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
        loss, accuracy, rewards = function(*leaves)
        results.append((loss, accuracy, rewards, *torch.autograd.grad(loss, leaves)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("kind", ["ipo", "sigmoid_norm"])
def test_a_nan_completion_length_gives_nan_in_that_pair_only(kind, backend):
    """A NaN length is no length: the pair's loss is NaN as in the reference (torch.clamp keeps
    NaN), never a loss computed as if the completion held one token; the other pairs are unchanged."""
    logps = rand_logps(5, torch.float32, seed=31)
    chosen_lengths, rejected_lengths = (length.float() for length in lengths(5, seed=32))
    chosen_lengths[2] = float("nan")
    for name in (backend, "reference"):
        out = dpo_loss(*[t.to(DEVICE) for t in logps], loss_type=kind, chosen_lengths=chosen_lengths.to(DEVICE),
                       rejected_lengths=rejected_lengths.to(DEVICE), reduction="none", backend=name)
        assert torch.isnan(out.losses[2]), name
        assert torch.isfinite(out.losses[[0, 1, 3, 4]]).all(), name


def test_the_triton_kernel_compiles_for_sm90_in_every_configuration(monkeypatch):
    """The interpreter runs the kernel as Python and accepts what the compiler refuses; this
    compiles every configuration the launcher can choose for the GPU (no GPU needed)."""
    # Only for this test: processes started later (the engine tests' forkserver) inherit sys.path,
    # and benches/ ahead of tests/ would give them benches/conftest.py for `import conftest`.
    monkeypatch.syspath_prepend(str(ROOT / "benches"))
    import kernel_report

    reason = kernel_report.triton_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "sm90_loss_compiler.py")], capture_output=True,
                            text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = [line for line in result.stdout.splitlines() if line.startswith("compiled ")]
    # Per dtype: 4 f-divergences and a plain ipo (dpo), 2 kto, 4 cpo, 3 orpo; each both ways.
    assert len(compiled) == 2 * 2 * (5 + 2 + 4 + 3)
