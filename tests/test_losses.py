"""Reference preference losses against independent hand computations on Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.losses import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    PreferenceLossOutput,
    cpo_loss,
    dpo_loss,
    ipo_loss,
    kto_kl,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

DTYPES = [torch.float32, torch.float64]

# A tiny batch of 4 pairs, exactly representable in float32.
PC = [-10.0, -20.0, -5.0, -7.5]
PR = [-12.0, -18.0, -9.0, -7.0]
RC = [-11.0, -19.5, -6.0, -8.0]
RR = [-11.5, -19.0, -6.5, -7.25]
LC = [3, 4, 5, 2]
LR = [2, 4, 6, 3]
BETA = 0.5
EPS = 0.1
MARGIN = [0.25, -0.5, 1.0, 0.0]
MARGIN_TYPES = ["sigmoid", "robust", "hinge", "ipo", "exo_pair", "apo_down", "discopop", "sigmoid_norm"]


# ----------------------------------------------------------------------------------------------
# Independent float formulas (math module only).
# ----------------------------------------------------------------------------------------------


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def cdpo(z: float, eps: float) -> float:
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


def expected_dpo(kind, beta=BETA, eps=0.0, margin=None, lengths=False, delta=0.0, tau=0.05):
    n = len(PC)
    c = [PC[i] - RC[i] for i in range(n)]
    r = [PR[i] - RR[i] for i in range(n)]
    m = margin or [0.0] * n
    out = []
    for i in range(n):
        z = beta * (c[i] - r[i]) - m[i]
        if kind == "sigmoid":
            out.append(cdpo(z, eps))
        elif kind == "robust":
            out.append((-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps))
        elif kind == "hinge":
            out.append(max(0.0, 1.0 - z))
        elif kind == "ipo":
            h = c[i] / LC[i] - r[i] / LR[i] if lengths else c[i] - r[i]
            out.append((beta * h - m[i] - 0.5) ** 2 / beta**2)
        elif kind == "exo_pair":
            qw, ql = sig(z), sig(-z)
            out.append(qw * math.log(qw / (1 - eps)) + ql * math.log(ql / eps))
        elif kind == "nca_pair":
            out.append(-logsig(beta * c[i]) - 0.5 * logsig(-beta * c[i]) - 0.5 * logsig(-beta * r[i]))
        elif kind == "bco_pair":
            out.append(-logsig(beta * c[i] - delta) - logsig(-(beta * r[i] - delta)))
        elif kind == "sppo_hard":
            out.append((c[i] - 1 / (2 * beta)) ** 2 + (r[i] + 1 / (2 * beta)) ** 2)
        elif kind == "apo_zero":
            out.append(1 - sig(beta * c[i]) + sig(beta * r[i]))
        elif kind == "apo_down":
            out.append(sig(beta * c[i]) + 1 - sig(z))
        elif kind == "discopop":
            w = sig(z / tau)
            out.append(-logsig(z) * (1 - w) + math.exp(-z) * w)
        elif kind == "sigmoid_norm":
            out.append(-logsig(beta * (c[i] / LC[i] - r[i] / LR[i]) - m[i]))
    if kind == "sft":
        # The token-mean NLL of the batch's chosen completions, the same for every pair.
        out = [-sum(PC) / sum(LC)] * n
    if kind == "aot":
        pol = sorted(PC[i] - PR[i] for i in range(n))
        ref = sorted(RC[i] - RR[i] for i in range(n))
        out = [cdpo(beta * (pol[i] - ref[i]), eps) for i in range(n)]
    if kind == "aot_unpaired":
        cs, rs = sorted(c), sorted(r)
        out = [cdpo(beta * (cs[i] - rs[i]), eps) for i in range(n)]
    assert len(out) == n, kind
    return out


def tensors(dtype, *lists):
    return [torch.tensor(x, dtype=dtype) for x in lists]


def close(dtype):
    return {"rtol": 2e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}


def check(actual: torch.Tensor, expected, dtype) -> None:
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), **close(dtype))


def smoothing_for(kind: str) -> float:
    return EPS if kind in ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired") else 0.0


def lengths_for(kind: str, dtype=torch.int64) -> dict:
    if kind in ("ipo", "sigmoid_norm", "sft"):
        return {"chosen_lengths": torch.tensor(LC, dtype=dtype), "rejected_lengths": torch.tensor(LR, dtype=dtype)}
    return {}


def unit_lengths_for(kind, n):
    if kind in ("ipo", "sigmoid_norm", "sft"):
        ones = torch.ones(n, dtype=torch.int64)
        return {"chosen_lengths": ones, "rejected_lengths": ones}
    return {}


def rand_logps(n: int, seed: int, dtype=torch.float64, count: int = 4, scale: float = 5.0):
    g = torch.Generator().manual_seed(seed)
    return [(-scale * torch.rand(n, generator=g, dtype=dtype) - 0.1).requires_grad_() for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# DPO family: values.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", DPO_LOSS_TYPES)
def test_dpo_matches_hand_formula(kind, dtype):
    eps = smoothing_for(kind)
    args = [t.requires_grad_() for t in tensors(dtype, PC, PR, RC, RR)]
    # Lengths are passed to every type: the types other than ipo and sigmoid_norm must ignore them.
    lengths = {"chosen_lengths": torch.tensor(LC), "rejected_lengths": torch.tensor(LR)}
    out = dpo_loss(*args, beta=BETA, loss_type=kind, label_smoothing=eps, **lengths)
    expected = expected_dpo(kind, eps=eps, lengths=kind in ("ipo", "sigmoid_norm", "sft"))
    assert isinstance(out, PreferenceLossOutput)
    check(out.losses.detach(), expected, dtype)
    check(out.loss.detach(), sum(expected) / len(expected), dtype)
    check(out.chosen_rewards, [BETA * (PC[i] - RC[i]) for i in range(4)], dtype)
    check(out.rejected_rewards, [BETA * (PR[i] - RR[i]) for i in range(4)], dtype)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_dpo_literal_values():
    zero = torch.zeros(3, dtype=torch.float64)
    assert dpo_loss(zero, zero, zero, zero).loss.item() == pytest.approx(0.6931471805599453, rel=1e-15)
    assert ipo_loss(zero, zero, zero, zero, beta=0.1).loss.item() == pytest.approx(25.0, rel=1e-15)
    one = torch.ones(3, dtype=torch.float64)
    # βΔ = 0.1·10 = 1: hinge gives 0, sigmoid gives log(1 + e^-1).
    assert dpo_loss(10 * one, zero, zero, zero, loss_type="hinge").loss.item() == 0.0
    assert dpo_loss(10 * one, zero, zero, zero).loss.item() == pytest.approx(0.31326168751822286, rel=1e-14)


def test_label_smoothing_changes_sigmoid_and_robust_differently():
    args = tensors(torch.float64, PC, PR, RC, RR)
    plain = dpo_loss(*args, beta=BETA).losses
    cdpo_ = dpo_loss(*args, beta=BETA, label_smoothing=EPS).losses
    rdpo = dpo_loss(*args, beta=BETA, loss_type="robust", label_smoothing=EPS).losses
    assert not torch.allclose(plain, cdpo_) and not torch.allclose(cdpo_, rdpo)
    torch.testing.assert_close(dpo_loss(*args, beta=BETA, loss_type="robust").losses, plain)


def test_bco_pair_delta_and_discopop_tau():
    args = tensors(torch.float64, PC, PR, RC, RR)
    out = dpo_loss(*args, beta=BETA, loss_type="bco_pair", bco_delta=0.3)
    check(out.losses, expected_dpo("bco_pair", delta=0.3), torch.float64)
    as_tensor = dpo_loss(*args, beta=BETA, loss_type="bco_pair", bco_delta=torch.tensor(0.3, dtype=torch.float64))
    torch.testing.assert_close(as_tensor.losses, out.losses)
    out = dpo_loss(*args, beta=BETA, loss_type="discopop", discopop_tau=0.7)
    check(out.losses, expected_dpo("discopop", tau=0.7), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ipo_with_and_without_lengths(dtype):
    args = tensors(dtype, PC, PR, RC, RR)
    on_sums = ipo_loss(*args, beta=BETA)
    per_token = ipo_loss(*args, beta=BETA, **lengths_for("ipo"))
    check(on_sums.losses, expected_dpo("ipo", lengths=False), dtype)
    check(per_token.losses, expected_dpo("ipo", lengths=True), dtype)
    assert not torch.allclose(on_sums.losses, per_token.losses)
    # Literal: pair 0 has c = 1 over 3 tokens, r = -0.5 over 2, h = 1/3 + 1/4, and (h - 1)² at β = 0.5.
    assert per_token.losses[0].item() == pytest.approx((1 / 3 + 0.25 - 1.0) ** 2, rel=1e-5)
    assert on_sums.losses[0].item() == pytest.approx((1.5 - 1.0) ** 2, rel=1e-6)
    # Float lengths give the same result as integer ones; lengths are clamped at one token.
    floats = ipo_loss(*args, beta=BETA, **lengths_for("ipo", dtype))
    torch.testing.assert_close(floats.losses, per_token.losses)
    zeros = torch.zeros(4, dtype=torch.int64)
    torch.testing.assert_close(
        ipo_loss(*args, beta=BETA, chosen_lengths=zeros, rejected_lengths=zeros).losses, on_sums.losses
    )
    # ipo_loss is dpo_loss(loss_type="ipo").
    same = dpo_loss(*args, beta=BETA, loss_type="ipo", **lengths_for("ipo"))
    torch.testing.assert_close(same.losses, per_token.losses)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MARGIN_TYPES)
def test_margin(kind, dtype):
    eps = smoothing_for(kind)
    out = dpo_loss(
        *tensors(dtype, PC, PR, RC, RR),
        beta=BETA,
        loss_type=kind,
        label_smoothing=eps,
        margin=torch.tensor(MARGIN, dtype=dtype),
        **lengths_for(kind),
    )
    check(out.losses, expected_dpo(kind, eps=eps, margin=MARGIN, lengths=kind in ("ipo", "sigmoid_norm")), dtype)


def test_margin_literal():
    zero = torch.zeros(1, dtype=torch.float64)
    out = dpo_loss(zero, zero, zero, zero, margin=torch.tensor([2.0], dtype=torch.float64))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_list_loss_type_with_weights(dtype):
    args = tensors(dtype, PC, PR, RC, RR)
    kinds, weights = ["sigmoid", "ipo", "hinge"], [0.5, 2.0, 1.5]
    out = dpo_loss(*args, beta=BETA, loss_type=kinds, loss_weights=weights)
    per_type = [expected_dpo(k) for k in kinds]
    expected_losses = [sum(w * l[i] for w, l in zip(weights, per_type)) for i in range(4)]
    check(out.losses, expected_losses, dtype)
    check(out.loss, sum(w * sum(l) / 4 for w, l in zip(weights, per_type)), dtype)
    # Without weights every type counts once.
    unweighted = dpo_loss(*args, beta=BETA, loss_type=kinds)
    check(unweighted.loss, sum(sum(l) / 4 for l in per_type), dtype)
    # A one-element list is the plain type.
    torch.testing.assert_close(
        dpo_loss(*args, beta=BETA, loss_type=["hinge"]).losses, dpo_loss(*args, beta=BETA, loss_type="hinge").losses
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_reductions(dtype):
    args = tensors(dtype, PC, PR, RC, RR)
    expected = expected_dpo("sigmoid")
    check(dpo_loss(*args, beta=BETA, reduction="sum").loss, sum(expected), dtype)
    none = dpo_loss(*args, beta=BETA, reduction="none")
    check(none.loss, expected, dtype)
    assert none.loss.shape == (4,)


def test_aot_sorts_across_the_batch():
    # Permuting the pairs permutes nothing in aot's losses: they are per quantile.
    args = tensors(torch.float64, PC, PR, RC, RR)
    perm = torch.tensor([2, 0, 3, 1])
    for kind in ("aot", "aot_unpaired"):
        a = dpo_loss(*args, loss_type=kind).losses
        b = dpo_loss(*[t[perm] for t in args], loss_type=kind).losses
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# DPO family: gradients and extremes.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DPO_LOSS_TYPES)
def test_dpo_gradcheck(kind):
    pc, pr, rc, rr = rand_logps(5, seed=DPO_LOSS_TYPES.index(kind))
    kwargs = dict(beta=0.3, loss_type=kind, label_smoothing=smoothing_for(kind))
    # Lengths go to every type; only ipo and sigmoid_norm use them.
    kwargs.update(chosen_lengths=torch.tensor([3, 4, 5, 2, 7]), rejected_lengths=torch.tensor([2, 4, 6, 3, 1]))
    inputs = [pc, pr, rc, rr]
    if kind in MARGIN_TYPES:
        inputs.append(torch.linspace(-0.3, 0.4, 5, dtype=torch.float64).requires_grad_())

        def fn(a, b, c, d, m):
            return dpo_loss(a, b, c, d, margin=m, **kwargs).loss
    else:

        def fn(a, b, c, d):
            return dpo_loss(a, b, c, d, **kwargs).loss

    assert torch.autograd.gradcheck(fn, inputs)


def test_list_loss_type_gradcheck():
    inputs = rand_logps(6, seed=7)

    def fn(a, b, c, d):
        return dpo_loss(a, b, c, d, loss_type=["sigmoid", "bco_pair", "sppo_hard"], loss_weights=[0.2, 0.8, 0.1]).loss

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", DPO_LOSS_TYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_dpo_extreme_margins_stay_finite(kind, dtype, sign):
    # β = 0.1, chosen log-ratio ±5e4 and rejected ∓5e4: βΔ = ±1e4, β·c = ±5e3.
    n = 3
    pc = torch.full((n,), sign * 5e4, dtype=dtype, requires_grad=True)
    pr = torch.full((n,), -sign * 5e4, dtype=dtype, requires_grad=True)
    rc = torch.zeros(n, dtype=dtype, requires_grad=True)
    rr = torch.zeros(n, dtype=dtype, requires_grad=True)
    out = dpo_loss(
        pc, pr, rc, rr, beta=0.1, loss_type=kind, label_smoothing=smoothing_for(kind), **unit_lengths_for(kind, n)
    )
    assert torch.isfinite(out.losses).all(), out.losses
    out.loss.backward()
    for t in (pc, pr, rc, rr):
        if kind == "sft" and t is not pc:
            assert t.grad is None  # sft reads the policy's chosen log-probs only
            continue
        assert torch.isfinite(t.grad).all(), (kind, t.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MARGIN_TYPES)
def test_extreme_margin_tensor_stays_finite(kind, dtype):
    logps = [torch.full((2,), -3.0, dtype=dtype, requires_grad=True) for _ in range(4)]
    margin = torch.tensor([1e4, -1e4], dtype=dtype, requires_grad=True)
    kwargs = dict(loss_type=kind, label_smoothing=smoothing_for(kind), margin=margin, **unit_lengths_for(kind, 2))
    out = dpo_loss(*logps, **kwargs)
    assert torch.isfinite(out.losses).all()
    out.loss.backward()
    assert torch.isfinite(margin.grad).all() and all(torch.isfinite(t.grad).all() for t in logps)


def test_discopop_large_negative_is_not_nan():
    # exp(-z) overflows at z = -1e4 while σ(z/τ) underflows: a naive product is inf·0 = NaN.
    zero = torch.zeros(1, dtype=torch.float32)
    out = dpo_loss(torch.tensor([-1e5]), zero, zero, zero, loss_type="discopop")
    assert out.loss.item() == pytest.approx(1e4, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# KTO.
# ----------------------------------------------------------------------------------------------

KP = [-10.0, -4.0, -7.5, -3.0, -12.0]
KR = [-9.0, -6.0, -7.0, -5.5, -11.0]
KD = [True, False, True, False, False]


def expected_kto(kind, desirable, kl, beta, wd, wu):
    out = []
    for p, q, d in zip(KP, KR, desirable):
        r = p - q
        z0 = kl if kind == "kto" else 0.0
        if d:
            out.append(wd * (1 - sig(beta * (r - z0))))
        else:
            out.append(wu * (1 - sig(beta * (z0 - r))))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KTO_LOSS_TYPES)
@pytest.mark.parametrize("desirable", [KD, [True] * 5, [False] * 5], ids=["mixed", "all_desirable", "all_undesirable"])
def test_kto_matches_hand_formula(kind, desirable, dtype):
    p, q = tensors(dtype, KP, KR)
    d = torch.tensor(desirable)
    out = kto_loss(p, q, d, kl=0.3, beta=0.4, desirable_weight=1.5, undesirable_weight=0.7, loss_type=kind)
    expected = expected_kto(kind, desirable, 0.3, 0.4, 1.5, 0.7)
    check(out.losses, expected, dtype)
    check(out.loss, sum(expected) / 5, dtype)
    rewards = [0.4 * (a - b) for a, b in zip(KP, KR)]
    check(out.chosen_rewards, [r if di else 0.0 for r, di in zip(rewards, desirable)], dtype)
    check(out.rejected_rewards, [0.0 if di else r for r, di in zip(rewards, desirable)], dtype)
    assert torch.isfinite(out.loss)
    assert not out.chosen_rewards.requires_grad


def test_kto_literal_and_kl_handling():
    p = torch.tensor([-2.0, -2.0], dtype=torch.float64)
    d = torch.tensor([True, False])
    assert kto_loss(p, p, d).loss.item() == pytest.approx(0.5, rel=1e-15)
    # apo_zero_unpaired ignores the reference point.
    a = kto_loss(p, p + 1, d, kl=5.0, loss_type="apo_zero_unpaired")
    b = kto_loss(p, p + 1, d, kl=0.0, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(a.losses, b.losses)
    assert not torch.allclose(kto_loss(p, p + 1, d, kl=5.0).losses, kto_loss(p, p + 1, d).losses)
    # A 0-d tensor kl is a constant: no gradient reaches it; shape (1,) (TRL's zeros(1)) is accepted.
    pol = p.clone().requires_grad_()
    kl = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    out = kto_loss(pol, p, d, kl=kl)
    out.loss.backward()
    assert kl.grad is None and pol.grad is not None
    shape_one = torch.tensor([0.25], dtype=torch.float64)
    torch.testing.assert_close(kto_loss(p, p, d, kl=shape_one).losses, out.losses.detach())
    torch.testing.assert_close(kto_loss(p, p, d, kl=0.25).losses, out.losses.detach())


def test_kto_reductions_and_gradcheck():
    p, q = rand_logps(6, seed=3, count=2)
    d = torch.tensor([True, False, False, True, True, False])
    out = kto_loss(p, q, d, reduction="sum")
    torch.testing.assert_close(out.loss, out.losses.sum())
    assert kto_loss(p, q, d, reduction="none").loss.shape == (6,)
    for kind in KTO_LOSS_TYPES:
        assert torch.autograd.gradcheck(
            lambda a, b: kto_loss(a, b, d, kl=0.2, beta=0.3, desirable_weight=1.3, loss_type=kind).loss, (p, q)
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_kto_extremes_finite(dtype):
    p = torch.tensor([1e5, -1e5, 1e5, -1e5], dtype=dtype, requires_grad=True)
    q = torch.zeros(4, dtype=dtype)
    d = torch.tensor([True, True, False, False])
    for kind in KTO_LOSS_TYPES:
        p.grad = None
        out = kto_loss(p, q, d, kl=1e4, loss_type=kind)
        out.loss.backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_kto_kl_mean_clamp_and_no_grad(dtype):
    p = torch.tensor([-3.0, -1.0, -2.0], dtype=dtype, requires_grad=True)
    q = torch.tensor([-4.0, -1.5, -2.0], dtype=dtype)
    kl = kto_kl(p, q)
    assert kl.shape == () and kl.dtype == dtype and not kl.requires_grad
    assert kl.item() == pytest.approx(0.5, rel=1e-6)
    clamped = kto_kl(q, p)  # mean is -0.5
    assert clamped.item() == 0.0 and not clamped.requires_grad


def test_kto_kl_averages_across_the_group(monkeypatch):
    # Simulated two-rank group: the other rank holds 3 examples summing to -0.3.
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    calls = []

    def fake_all_reduce(tensor, op=None, group=None):
        calls.append((op, group))
        tensor.add_(torch.tensor([-0.3, 3.0], dtype=tensor.dtype))

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    p = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    q = torch.tensor([-1.5, -2.5], dtype=torch.float64)
    group = object()
    assert kto_kl(p, q, process_group=group).item() == pytest.approx((1.0 - 0.3) / 5, rel=1e-12)
    assert calls == [(dist.ReduceOp.SUM, group)]
    # Without a group the estimate stays local.
    assert kto_kl(p, q).item() == pytest.approx(0.5, rel=1e-12)
    assert len(calls) == 1


def test_kto_kl_real_single_rank_group():
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no default group already set up")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        p = torch.tensor([-1.0, -2.0])
        q = torch.tensor([-1.5, -2.25])
        assert kto_kl(p, q, process_group=dist.group.WORLD).item() == pytest.approx(0.375)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# CPO and SimPO.
# ----------------------------------------------------------------------------------------------


def expected_cpo(kind, beta, eps=0.0, gamma=0.5):
    out = []
    for i in range(4):
        c, r = (PC[i] / LC[i], PR[i] / LR[i]) if kind in ("ipo", "simpo") else (PC[i], PR[i])
        h = c - r
        if kind == "sigmoid":
            out.append(cdpo(beta * h, eps))
        elif kind == "hinge":
            out.append(max(0.0, 1 - beta * h))
        elif kind == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        elif kind == "simpo":
            out.append(cdpo(beta * h - gamma, eps))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", CPO_LOSS_TYPES)
def test_cpo_matches_hand_formula(kind, dtype):
    pc, pr = tensors(dtype, PC, PR)
    lengths = {"chosen_lengths": torch.tensor(LC), "rejected_lengths": torch.tensor(LR)}
    eps = EPS if kind in ("sigmoid", "simpo") else 0.0
    # Without the NLL term.
    out = cpo_loss(pc, pr, beta=0.2, loss_type=kind, label_smoothing=eps, simpo_gamma=0.3, cpo_alpha=0.0, **lengths)
    pref = expected_cpo(kind, 0.2, eps, 0.3)
    check(out.losses, pref, dtype)
    avg = kind in ("ipo", "simpo")
    check(out.chosen_rewards, [0.2 * PC[i] / (LC[i] if avg else 1) for i in range(4)], dtype)
    check(out.rejected_rewards, [0.2 * PR[i] / (LR[i] if avg else 1) for i in range(4)], dtype)
    # With it: TRL's mean preference loss + α · token-mean NLL over the chosen completions.
    out = cpo_loss(pc, pr, beta=0.2, loss_type=kind, label_smoothing=eps, simpo_gamma=0.3, cpo_alpha=0.7, **lengths)
    nll = -sum(PC) / sum(LC)
    check(out.loss, sum(pref) / 4 + 0.7 * nll, dtype)
    check(out.losses, [pref[i] - 0.7 * 4 * PC[i] / sum(LC) for i in range(4)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simpo(dtype):
    pc, pr = tensors(dtype, PC, PR)
    lc, lr = torch.tensor(LC), torch.tensor(LR)
    out = simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5, label_smoothing=EPS)
    expected = [cdpo(2.0 * (PC[i] / LC[i] - PR[i] / LR[i]) - 0.5, EPS) for i in range(4)]
    check(out.losses, expected, dtype)
    check(out.chosen_rewards, [2.0 * PC[i] / LC[i] for i in range(4)], dtype)
    same = cpo_loss(pc, pr, beta=2.0, loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0, label_smoothing=EPS,
                    chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(same.losses, out.losses)
    # γ is the margin in loss units: at equal per-token log-probs the loss is -logσ(-γ).
    one = torch.tensor([-4.0], dtype=dtype)
    assert simpo_loss(one, one, torch.tensor([2]), torch.tensor([2]), gamma=1.5).loss.item() == pytest.approx(
        math.log1p(math.exp(1.5)), rel=1e-6
    )


def test_cpo_simpo_gradcheck():
    pc, pr = rand_logps(5, seed=11, count=2)
    lc, lr = torch.tensor([3, 1, 4, 1, 5]), torch.tensor([9, 2, 6, 5, 3])
    for kind in CPO_LOSS_TYPES:
        assert torch.autograd.gradcheck(
            lambda a, b: cpo_loss(a, b, loss_type=kind, label_smoothing=0.0 if kind in ("hinge", "ipo") else 0.05,
                                  chosen_lengths=lc, rejected_lengths=lr).loss,
            (pc, pr),
        )
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, lc, lr).loss, (pc, pr))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpo_simpo_extremes_finite(dtype):
    pc = torch.tensor([-1e5, -1e-3], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1e-3, -1e5], dtype=dtype, requires_grad=True)
    lengths = torch.ones(2, dtype=torch.int64)
    for kind in CPO_LOSS_TYPES:
        pc.grad = pr.grad = None
        out = cpo_loss(pc, pr, loss_type=kind, chosen_lengths=lengths, rejected_lengths=lengths)
        out.loss.backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


# ----------------------------------------------------------------------------------------------
# ORPO.
# ----------------------------------------------------------------------------------------------


def log_odds(x: float) -> float:
    p = math.exp(x)
    return math.log(p / (1 - p))


@pytest.mark.parametrize("dtype", DTYPES)
def test_orpo_matches_hand_formula(dtype):
    c = [-0.2, -1.5, -0.05, -3.0]
    r = [-0.9, -0.4, -2.0, -3.5]
    pc, pr = tensors(dtype, c, r)
    out = orpo_loss(pc, pr, beta=0.25)
    expected = [-c[i] - 0.25 * logsig(log_odds(c[i]) - log_odds(r[i])) for i in range(4)]
    check(out.losses, expected, dtype)
    check(out.chosen_rewards, [0.25 * x for x in c], dtype)
    # TRL's form: a batch NLL (0-d) minus the mean of λ·logσ(log-odds ratio).
    nll = torch.tensor(1.25, dtype=dtype)
    out = orpo_loss(pc, pr, beta=0.25, chosen_nll=nll)
    check(out.loss, 1.25 - 0.25 * sum(logsig(log_odds(c[i]) - log_odds(r[i])) for i in range(4)) / 4, dtype)
    per_pair = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    check(orpo_loss(pc, pr, beta=0.25, chosen_nll=per_pair).losses,
          [1.0 + i - 0.25 * logsig(log_odds(c[i]) - log_odds(r[i])) for i in range(4)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_orpo_log_odds_stable_near_zero(dtype):
    # log(1 - e^x) = log(-x) + x/2 + O(x²) as x → 0⁻. In the inputs' precision the naive
    # log1p(-exp(x)) is off by percents here (float32 at 1e-6, float64 at 1e-12), or -inf closer in.
    scale = 1e-6 if dtype == torch.float32 else 1e-12
    c, r = -scale, -100 * scale
    out = orpo_loss(torch.tensor([c], dtype=dtype), torch.tensor([r], dtype=dtype), beta=1.0)
    lo = (c - (math.log(-c) + c / 2)) - (r - (math.log(-r) + r / 2))
    assert lo == pytest.approx(math.log(100), rel=1e-4)
    assert out.losses.item() == pytest.approx(-c - logsig(lo), rel=1e-5 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_orpo_extremes_finite(dtype):
    c = torch.tensor([0.0, -1e-30, -1e-8, -0.69, -0.7, -1e4, -3.0], dtype=dtype, requires_grad=True)
    r = torch.tensor([-3.0, -1e-3, -1e4, -0.7, 0.0, -1e-30, -1e4], dtype=dtype, requires_grad=True)
    out = orpo_loss(c, r)
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()


def test_orpo_gradcheck():
    g = torch.Generator().manual_seed(5)
    c = (-3 * torch.rand(6, generator=g, dtype=torch.float64) - 0.01).requires_grad_()
    r = (-3 * torch.rand(6, generator=g, dtype=torch.float64) - 0.01).requires_grad_()
    nll = torch.rand(6, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, n: orpo_loss(a, b, beta=0.3, chosen_nll=n).loss, (c, r, nll))
    assert torch.autograd.gradcheck(lambda a, b: orpo_loss(a, b).loss, (c, r))


# ----------------------------------------------------------------------------------------------
# Traceability: no host sync and no graph break.
# ----------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    pc, pr, rc, rr = [t.detach() for t in rand_logps(4, seed=1, dtype=torch.float32)]
    lc, lr = torch.tensor([3, 4, 5, 2]), torch.tensor([2, 4, 6, 3])
    margin = torch.tensor(MARGIN)
    d = torch.tensor([True, False, True, True])

    def step(pc, pr, rc, rr):
        a = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "ipo", "sigmoid_norm", "discopop"],
                     loss_weights=[1.0, 0.1, 0.5, 0.2], margin=margin, chosen_lengths=lc, rejected_lengths=lr)
        b = dpo_loss(pc, pr, rc, rr, loss_type=["aot", "bco_pair", "exo_pair"], label_smoothing=0.1,
                     bco_delta=torch.tensor(0.1))
        kl = kto_kl(pc, rc)
        c = kto_loss(pc, rc, d, kl=kl)
        e = cpo_loss(pc, pr, loss_type="simpo", chosen_lengths=lc, rejected_lengths=lr)
        f = orpo_loss(pc / lc, pr / lr)
        return a.loss + b.loss + c.loss + e.loss + f.loss, c.chosen_rewards

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    expected = step(pc, pr, rc, rr)
    actual = compiled(pc, pr, rc, rr)
    torch.testing.assert_close(actual, expected)


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    dev = "cuda"
    pc, pr, rc, rr = [t.detach().float().to(dev).requires_grad_() for t in rand_logps(8, seed=2)]
    lc = torch.arange(1, 9, device=dev)
    d = torch.arange(8, device=dev) % 3 == 0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = dpo_loss(pc, pr, rc, rr, loss_type=list(DPO_LOSS_TYPES[:4]) + ["aot", "discopop", "sigmoid_norm"],
                         label_smoothing=0.1, chosen_lengths=lc, rejected_lengths=lc).loss
        total = total + kto_loss(pc, rc, d, kl=kto_kl(pr, rr)).loss
        total = total + cpo_loss(pc, pr, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lc).loss
        total = total + orpo_loss(pc / lc, pr / lc).loss
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total).item()


# ----------------------------------------------------------------------------------------------
# Bad input: every error names the argument.
# ----------------------------------------------------------------------------------------------


def _four(n=4, dtype=torch.float32):
    return [torch.full((n,), -1.0, dtype=dtype) for _ in range(4)]


def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError, match="loss_type") as info:
        dpo_loss(*_four(), loss_type="dpo")
    assert all(k in str(info.value) for k in DPO_LOSS_TYPES)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*_four(), loss_type=["sigmoid", "kto"])
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*_four(), loss_type=[])
    with pytest.raises(ValueError, match="loss_type.*apo_zero_unpaired"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), loss_type="sigmoid")
    with pytest.raises(ValueError, match="loss_type.*simpo"):
        cpo_loss(torch.zeros(2), torch.zeros(2), loss_type="orpo", cpo_alpha=0.0)


@pytest.mark.parametrize(
    "position,name", [(1, "policy_rejected_logps"), (2, "ref_chosen_logps"), (3, "ref_rejected_logps")]
)
def test_mismatched_shapes(position, name):
    args = _four()
    args[position] = torch.zeros(5)
    with pytest.raises(ValueError, match=name):
        dpo_loss(*args)


def test_mismatched_shapes_other_losses():
    with pytest.raises(ValueError, match="ref_logps"):
        kto_loss(torch.zeros(3), torch.zeros(4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="ref_kl_logps"):
        kto_kl(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        orpo_loss(torch.zeros(3) - 1, torch.zeros(2) - 1)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        cpo_loss(torch.zeros(3), torch.zeros(2), cpo_alpha=0.0)


def test_non_1d_inputs():
    args = _four()
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_loss(torch.zeros(2, 2), *args[1:])
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_loss(torch.tensor(-1.0), *args[1:])
    with pytest.raises(ValueError, match="policy_logps"):
        kto_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0))


def test_non_floating_inputs():
    args = _four()
    with pytest.raises(TypeError, match="ref_rejected_logps"):
        dpo_loss(*args[:3], torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="policy_chosen_logps"):
        dpo_loss([-1.0] * 4, *args[1:])
    with pytest.raises(TypeError, match="ref_chosen_logps"):
        dpo_loss(args[0], args[1], args[2].double(), args[3])
    with pytest.raises(TypeError, match="policy_kl_logps"):
        kto_kl(torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*_four(), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2), beta=beta)
    with pytest.raises(ValueError, match="beta"):
        orpo_loss(torch.zeros(2) - 1, torch.zeros(2) - 1, beta=beta)


def test_beta_must_be_a_python_number():
    with pytest.raises(TypeError, match="beta"):
        dpo_loss(*_four(), beta=torch.tensor(0.1))
    with pytest.raises(TypeError, match="beta"):
        dpo_loss(*_four(), beta=True)


@pytest.mark.parametrize(
    "kind,eps",
    [("sigmoid", 0.6), ("sigmoid", -0.01), ("robust", 0.5), ("exo_pair", 0.0), ("exo_pair", 1.0), ("aot", 0.7),
     ("hinge", 1.0), ("ipo", -0.1)],
)
def test_label_smoothing_out_of_range(kind, eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_four(), loss_type=kind, label_smoothing=eps)


def test_label_smoothing_range_of_a_list_is_the_strictest():
    dpo_loss(*_four(), loss_type=["sigmoid", "hinge"], label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing.*robust"):
        dpo_loss(*_four(), loss_type=["sigmoid", "robust"], label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2), label_smoothing=0.75)


def test_lengths_of_the_wrong_shape_or_kind():
    args = _four()
    good = torch.ones(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="chosen_lengths"):
        ipo_loss(*args, chosen_lengths=torch.ones(3, dtype=torch.int64), rejected_lengths=good)
    with pytest.raises(ValueError, match="rejected_lengths"):
        ipo_loss(*args, chosen_lengths=good, rejected_lengths=torch.ones(4, 1))
    with pytest.raises(TypeError, match="chosen_lengths"):
        ipo_loss(*args, chosen_lengths=torch.ones(4, dtype=torch.bool), rejected_lengths=good)
    with pytest.raises(ValueError, match="rejected_lengths"):
        ipo_loss(*args, chosen_lengths=good)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*args, loss_type="sigmoid_norm")
    with pytest.raises(ValueError, match="chosen_lengths"):
        simpo_loss(torch.zeros(4), torch.zeros(4), torch.ones(5), good)
    with pytest.raises(ValueError, match="chosen_lengths"):
        cpo_loss(torch.zeros(4), torch.zeros(4))  # the default NLL term needs them
    with pytest.raises(ValueError, match="rejected_lengths"):
        cpo_loss(torch.zeros(4), torch.zeros(4), loss_type="ipo", cpo_alpha=0.0, chosen_lengths=good)


def test_non_boolean_desirable():
    p = torch.zeros(3)
    with pytest.raises(TypeError, match="desirable"):
        kto_loss(p, p, torch.tensor([1, 0, 1]))
    with pytest.raises(TypeError, match="desirable"):
        kto_loss(p, p, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(TypeError, match="desirable"):
        kto_loss(p, p, [True, False, True])
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(p, p, torch.tensor([True, False]))


def test_loss_weights_mismatch():
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(*_four(), loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(*_four(), loss_type="sigmoid", loss_weights=[1.0, 2.0])
    with pytest.raises(TypeError, match="loss_weights"):
        dpo_loss(*_four(), loss_type=["sigmoid"], loss_weights=1.0)
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(*_four(), loss_type=["sigmoid"], loss_weights=[float("nan")])


def test_mismatched_devices():
    meta = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(*_four()[:3], meta)
    with pytest.raises(ValueError, match="chosen_lengths"):
        ipo_loss(*_four(), chosen_lengths=meta, rejected_lengths=torch.ones(4))
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(torch.zeros(4), torch.zeros(4), torch.ones(4, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="kl"):
        kto_loss(torch.zeros(4), torch.zeros(4), torch.ones(4, dtype=torch.bool), kl=torch.zeros((), device="meta"))


def test_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        dpo_loss(*_four(), reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), reduction=None)
    with pytest.raises(ValueError, match="reduction"):
        orpo_loss(torch.zeros(2) - 1, torch.zeros(2) - 1, reduction="batchmean")


def test_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        dpo_loss(*_four(), margin=torch.zeros(3))
    with pytest.raises(TypeError, match="margin"):
        dpo_loss(*_four(), margin=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="margin.*nca_pair"):
        dpo_loss(*_four(), loss_type=["sigmoid", "nca_pair"], margin=torch.zeros(4))


def test_bad_scalars():
    d = torch.tensor([True, False])
    with pytest.raises(ValueError, match="kl"):
        kto_loss(torch.zeros(2), torch.zeros(2), d, kl=torch.zeros(2))
    with pytest.raises(TypeError, match="kl"):
        kto_loss(torch.zeros(2), torch.zeros(2), d, kl=torch.tensor(1))
    with pytest.raises(ValueError, match="undesirable_weight"):
        kto_loss(torch.zeros(2), torch.zeros(2), d, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="bco_delta"):
        dpo_loss(*_four(), loss_type="bco_pair", bco_delta=torch.zeros(3))
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo_loss(*_four(), loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match="gamma"):
        simpo_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2), gamma=float("inf"))
    with pytest.raises(ValueError, match="chosen_nll"):
        orpo_loss(torch.zeros(2) - 1, torch.zeros(2) - 1, chosen_nll=torch.zeros(3))
    with pytest.raises(TypeError, match="chosen_nll"):
        orpo_loss(torch.zeros(2) - 1, torch.zeros(2) - 1, chosen_nll=torch.tensor(1.0, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# TRL 1.16's DPO and CPO options: bad values name the argument (values are pinned against TRL in
# tests/test_trl_parity.py).
# ----------------------------------------------------------------------------------------------


def test_trl_option_errors_name_the_argument():
    pc, pr, rc, rr = rand_logps(3, seed=90)
    lengths = {"chosen_lengths": torch.tensor([1, 2, 3]), "rejected_lengths": torch.tensor([2, 2, 2])}
    weights = torch.rand(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        dpo_loss(pc, pr, rc, rr, f_divergence_type="kl")
    with pytest.raises(ValueError, match="f_alpha_divergence_coef must be finite"):
        dpo_loss(pc, pr, rc, rr, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=math.inf)
    with pytest.raises(ValueError, match=r"f_divergence_type='forward_kl' is only defined for .*\['nca_pair'\]"):
        dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "nca_pair"], f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths are required by loss_type 'sft'"):
        dpo_loss(pc, pr, rc, rr, loss_type="sft")
    with pytest.raises(ValueError, match="rejected_weights must be given together"):
        dpo_loss(pc, pr, rc, rr, chosen_weights=weights)
    with pytest.raises(ValueError, match="chosen_weights must have shape"):
        dpo_loss(pc, pr, rc, rr, chosen_weights=weights[:2], rejected_weights=weights)
    with pytest.raises(ValueError, match=r"chosen_weights \(WPO\) cannot weigh loss_type \['aot'\]"):
        dpo_loss(pc, pr, rc, rr, loss_type="aot", chosen_weights=weights, rejected_weights=weights)
    with pytest.raises(ValueError, match=r"chosen_weights \(WPO\) cannot weigh loss_type 'sft'"):
        dpo_loss(pc, pr, rc, rr, loss_type="sft", chosen_weights=weights, rejected_weights=weights, **lengths)
    with pytest.raises(ValueError, match="sft_chosen_logps is only read by loss_type 'sft'"):
        dpo_loss(pc, pr, rc, rr, sft_chosen_logps=pc.detach())
    with pytest.raises(TypeError, match="alpha must be a real Python number"):
        cpo_loss(pc, pr, alpha="0.1", chosen_lengths=lengths["chosen_lengths"])
    with pytest.raises(ValueError, match="alpha must be finite"):
        cpo_loss(pc, pr, alpha=math.nan, chosen_lengths=lengths["chosen_lengths"])


def test_sft_reads_sft_chosen_logps_when_given():
    pc, pr, rc, rr = rand_logps(3, seed=91)
    plain = pc.detach() * 0.5
    lengths = {"chosen_lengths": torch.tensor([1, 2, 3]), "rejected_lengths": torch.tensor([2, 2, 2])}
    out = dpo_loss(pc, pr, rc, rr, loss_type="sft", sft_chosen_logps=plain, **lengths)
    torch.testing.assert_close(out.losses, torch.full((3,), -plain.sum().item() / 6, dtype=torch.float64))


def test_wpo_weights_multiply_every_type_before_loss_weights():
    pc, pr, rc, rr = rand_logps(4, seed=92)
    chosen_weights = torch.rand(4, dtype=torch.float64)
    rejected_weights = torch.rand(4, dtype=torch.float64)
    types, loss_weights = ["sigmoid", "hinge"], [0.3, 1.7]
    weighted = dpo_loss(pc, pr, rc, rr, loss_type=types, loss_weights=loss_weights, chosen_weights=chosen_weights,
                        rejected_weights=rejected_weights)
    plain = dpo_loss(pc, pr, rc, rr, loss_type=types, loss_weights=loss_weights)
    torch.testing.assert_close(weighted.losses, plain.losses * chosen_weights * rejected_weights)
    # The weights are constants of the loss.
    weights = chosen_weights.clone().requires_grad_()
    dpo_loss(pc, pr, rc, rr, chosen_weights=weights, rejected_weights=rejected_weights).loss.backward()
    assert weights.grad is None
