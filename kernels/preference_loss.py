"""Fused preference-loss reductions on per-sequence log-probs: one launch per direction.

Each family (DPO and its pairwise relatives, KTO, CPO/SimPO, ORPO) is one kernel, compiled in
two modes. Forward: per-example losses, the reduced loss, the rewards and the batch metrics.
Backward: the gradients of ``losses`` (and of the reduced loss) with respect to every
log-prob input, recomputed from the inputs, so nothing but the inputs is saved. The formulas
are those of ``prefopt.losses`` (the reference every path is tested against); the derivatives
are their closed forms.

A single program walks the batch in blocks of ``BLOCK`` examples in a fixed order, so every
sum is deterministic and no atomics are needed; batches of preference pairs are small (tens to
thousands), so one program is also the fastest launch. Math runs in float32, or in float64 for
float64 inputs. Triton passes Python floats as float32, so the scalar arguments are annotated
float64, and the per-type weights of a combined DPO loss (a tuple, which cannot be annotated)
travel as float32 (hi, lo) pairs whose sum carries 48 bits.

The metrics are written in the order ``prefopt._codes.METRIC_NAMES`` gives for each family.
"""

import torch
import triton
import triton.language as tl

from .._codes import F_DIVERGENCE_TYPES, LOSS_TYPE_CODES
from ._common import log1p

# Loss-type codes, those of prefopt._codes (the CUDA C++ kernels use the same).
_SIGMOID = tl.constexpr(LOSS_TYPE_CODES["sigmoid"])
_ROBUST = tl.constexpr(LOSS_TYPE_CODES["robust"])
_HINGE = tl.constexpr(LOSS_TYPE_CODES["hinge"])
_IPO = tl.constexpr(LOSS_TYPE_CODES["ipo"])
_EXO_PAIR = tl.constexpr(LOSS_TYPE_CODES["exo_pair"])
_NCA_PAIR = tl.constexpr(LOSS_TYPE_CODES["nca_pair"])
_BCO_PAIR = tl.constexpr(LOSS_TYPE_CODES["bco_pair"])
_SPPO_HARD = tl.constexpr(LOSS_TYPE_CODES["sppo_hard"])
_APO_ZERO = tl.constexpr(LOSS_TYPE_CODES["apo_zero"])
_APO_DOWN = tl.constexpr(LOSS_TYPE_CODES["apo_down"])
_DISCOPOP = tl.constexpr(LOSS_TYPE_CODES["discopop"])
_SIGMOID_NORM = tl.constexpr(LOSS_TYPE_CODES["sigmoid_norm"])
_SIMPO = tl.constexpr(LOSS_TYPE_CODES["simpo"])
_FORWARD_KL = tl.constexpr(F_DIVERGENCE_TYPES.index("forward_kl"))
_JS_DIVERGENCE = tl.constexpr(F_DIVERGENCE_TYPES.index("js_divergence"))
_ALPHA_DIVERGENCE = tl.constexpr(F_DIVERGENCE_TYPES.index("alpha_divergence"))

DPO_KINDS = {kind: LOSS_TYPE_CODES[kind] for kind in (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
    "discopop", "sigmoid_norm",
)}
CPO_KINDS = {kind: LOSS_TYPE_CODES[kind] for kind in ("sigmoid", "hinge", "ipo", "simpo")}

_MAX_BLOCK = 1024


# ----------------------------------------------------------------------------------------------
# Scalar functions, stable over the whole real line.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation near 0 (Kahan: the rounding of u = e^x is undone by
    x / log u); there is no expm1 in triton.language or under the interpreter."""
    u = tl.exp(x)
    um1 = u - 1.0
    exact = (um1 == 0.0) | (um1 == -1.0)
    return tl.where(um1 == 0.0, x, tl.where(exact, um1, um1 * x / tl.log(tl.where(exact, 2.0, u))))


@triton.jit
def _log1mexp(x):
    """log(1 - e^x) for x < 0, split at -ln 2 as in prefopt.losses._log1mexp."""
    near_zero = tl.log(-_expm1(tl.maximum(x, -0.6931471805599453)))
    far = log1p(-tl.exp(tl.minimum(x, -0.6931471805599453)))
    return tl.where(x > -0.6931471805599453, near_zero, far)


@triton.jit
def _scalar(x, DTYPE: tl.constexpr):
    """A scalar argument in the compute dtype (a Python number under the interpreter)."""
    return (tl.zeros((), DTYPE) + x).to(DTYPE)


@triton.jit
def _weight(weights_hi, weights_lo, i: tl.constexpr, DTYPE: tl.constexpr):
    return _scalar(weights_hi[i], DTYPE) + _scalar(weights_lo[i], DTYPE)


# ----------------------------------------------------------------------------------------------
# Per-family terms: the loss of each example of a block and its partial derivatives.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dpo_terms(c, r, m, len_c, len_r, beta, eps, tau, delta, weights_hi, weights_lo,
               KINDS: tl.constexpr, HAS_LENGTHS: tl.constexpr, DTYPE: tl.constexpr):
    """c, r: chosen and rejected log-ratios; m: margin. Returns (loss, dL/dc, dL/dr, dL/dm)."""
    z = beta * (c - r) - m
    loss = tl.zeros_like(z)
    dc = tl.zeros_like(z)
    dr = tl.zeros_like(z)
    dm = tl.zeros_like(z)
    for i in tl.static_range(len(KINDS)):
        w = _weight(weights_hi, weights_lo, i, DTYPE)
        if KINDS[i] == _IPO:
            if HAS_LENGTHS:
                h = c / len_c - r / len_r
                t = h - (m + 0.5) / beta
                loss += w * (t * t)
                dc += w * 2.0 * t / len_c
                dr -= w * 2.0 * t / len_r
            else:
                t = (c - r) - (m + 0.5) / beta
                loss += w * (t * t)
                dc += w * 2.0 * t
                dr -= w * 2.0 * t
            dm -= w * 2.0 * t / beta
        elif KINDS[i] == _NCA_PAIR:
            cw = beta * c
            rw = beta * r
            loss += w * (-_log_sigmoid(cw) - 0.5 * _log_sigmoid(-cw) - 0.5 * _log_sigmoid(-rw))
            dc += w * beta * (0.5 * _sigmoid(cw) - _sigmoid(-cw))
            dr += w * beta * 0.5 * _sigmoid(rw)
        elif KINDS[i] == _BCO_PAIR:
            a = beta * c - delta
            b = delta - beta * r
            loss += w * (-_log_sigmoid(a) - _log_sigmoid(b))
            dc -= w * beta * _sigmoid(-a)
            dr += w * beta * _sigmoid(-b)
        elif KINDS[i] == _SPPO_HARD:
            a = c - 0.5 / beta
            b = r + 0.5 / beta
            loss += w * (a * a + b * b)
            dc += w * 2.0 * a
            dr += w * 2.0 * b
        elif KINDS[i] == _APO_ZERO:
            cw = beta * c
            rw = beta * r
            loss += w * (_sigmoid(-cw) + _sigmoid(rw))
            dc -= w * beta * _sigmoid(cw) * _sigmoid(-cw)
            dr += w * beta * _sigmoid(rw) * _sigmoid(-rw)
        elif KINDS[i] == _SIGMOID_NORM:
            zn = beta * (c / len_c - r / len_r) - m
            loss -= w * _log_sigmoid(zn)
            dzn = -w * _sigmoid(-zn)
            dc += beta * dzn / len_c
            dr -= beta * dzn / len_r
            dm -= dzn
        else:
            # The types that see the pair only through z = βΔ - m: their value and dL/dz.
            if KINDS[i] == _SIGMOID:
                value = -(1.0 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
                dz = eps * _sigmoid(z) - (1.0 - eps) * _sigmoid(-z)
            elif KINDS[i] == _ROBUST:
                value = (eps * _log_sigmoid(-z) - (1.0 - eps) * _log_sigmoid(z)) / (1.0 - 2.0 * eps)
                dz = -((1.0 - eps) * _sigmoid(-z) + eps * _sigmoid(z)) / (1.0 - 2.0 * eps)
            elif KINDS[i] == _HINGE:
                value = tl.maximum(1.0 - z, 0.0)
                dz = tl.where(1.0 - z > 0.0, -1.0, 0.0).to(DTYPE)
            elif KINDS[i] == _EXO_PAIR:
                p = _sigmoid(z)
                q = _sigmoid(-z)
                log_ratio = log1p(-eps) - tl.log(eps)
                value = p * (_log_sigmoid(z) - log1p(-eps)) + q * (_log_sigmoid(-z) - tl.log(eps))
                # logσ(z) - logσ(-z) = z, so the derivative is σ(z)σ(-z)(z - log((1-ε)/ε)).
                dz = p * q * (z - log_ratio)
            elif KINDS[i] == _APO_DOWN:
                cw = beta * c
                value = _sigmoid(cw) + _sigmoid(-z)
                dz = -_sigmoid(z) * _sigmoid(-z)
                dc += w * beta * _sigmoid(cw) * _sigmoid(-cw)
            else:
                tl.static_assert(KINDS[i] == _DISCOPOP)
                zt = z / tau
                log_sig = _log_sigmoid(z)
                # exp(-z)·σ(z/τ) formed in log space: exp(-z) alone overflows.
                tail = tl.exp(_log_sigmoid(zt) - z)
                value = -log_sig * _sigmoid(-zt) + tail
                dz = (-_sigmoid(-z) * _sigmoid(-zt) + log_sig * _sigmoid(zt) * _sigmoid(-zt) / tau
                      + tail * (_sigmoid(-zt) / tau - 1.0))
            loss += w * value
            dc += w * beta * dz
            dr -= w * beta * dz
            dm -= w * dz
    return loss, dc, dr, dm


@triton.jit
def _cpo_terms(c, r, beta, eps, gamma, KIND: tl.constexpr, DTYPE: tl.constexpr):
    """c, r: chosen and rejected log-probs (per-token averages for ipo and simpo).
    Returns (preference loss, dL/dh) with h = c - r."""
    h = c - r
    if KIND == _IPO:
        t = h - 0.5 / beta
        return t * t, 2.0 * t
    z = beta * h
    if KIND == _SIMPO:
        z = z - gamma
    if KIND == _HINGE:
        return tl.maximum(1.0 - z, 0.0), beta * tl.where(1.0 - z > 0.0, -1.0, 0.0).to(DTYPE)
    value = -(1.0 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
    return value, beta * (eps * _sigmoid(z) - (1.0 - eps) * _sigmoid(-z))


@triton.jit
def _log_odds(x, tiny):
    """(log-odds of e^x, its derivative), with prefopt.losses.orpo_loss's clamp: x is held at
    -tiny in log(1 - e^x), and where the clamp holds only the plain x term has a gradient."""
    xc = tl.minimum(x, -tiny)
    value = x - _log1mexp(xc)
    derivative = tl.where(x <= -tiny, 1.0 - tl.exp(xc) / _expm1(xc), 1.0)
    return value, derivative


@triton.jit
def _f_score(x, coef, F_DIV: tl.constexpr):
    """(f-divergence score of a log-ratio x, its derivative): prefopt.losses.formulas.f_divergence_scores."""
    if F_DIV == _FORWARD_KL:
        return -_expm1(-x), tl.exp(-x)
    elif F_DIV == _JS_DIVERGENCE:
        return 0.6931471805599453 + _log_sigmoid(x), _sigmoid(-x)
    else:
        tl.static_assert(F_DIV == _ALPHA_DIVERGENCE)
        t = (coef - 1.0) * x
        tc = tl.minimum(t, 80.0)
        # torch.clamp(max=80)'s gradient: through up to and including the bound.
        return _expm1(tc) / (coef - 1.0), tl.where(t <= 80.0, tl.exp(tc), 0.0)


@triton.jit
def _alphapo(x, alpha):
    """(AlphaPO reward -expm1(-αx)/α, its derivative e^(-αx)): prefopt.losses.formulas.alphapo_rewards."""
    return -_expm1(-alpha * x) / alpha, tl.exp(-alpha * x)


# ----------------------------------------------------------------------------------------------
# Kernels. BACKWARD selects the mode; pointers the mode does not use are never touched.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _token_count(lengths_ptr, offs, valid, DTYPE: tl.constexpr):
    """Completion token counts, at least 1 (TRL's clamp: an empty completion counts as one
    token). A NaN stays NaN, as torch.clamp keeps it: tl.maximum would drop it and count 1."""
    count = tl.load(lengths_ptr + offs, mask=valid, other=1).to(DTYPE)
    return tl.where(count < 1.0, 1.0, count)


@triton.jit
def _upstream(grad_loss_ptr, grad_losses_ptr, offs, valid, n, MEAN: tl.constexpr, DTYPE: tl.constexpr):
    """Gradient reaching each example's loss: through ``losses`` and through the reduced loss."""
    g = tl.load(grad_losses_ptr + offs, mask=valid, other=0.0).to(DTYPE)
    grad_loss = tl.load(grad_loss_ptr).to(DTYPE)
    if MEAN:
        grad_loss = grad_loss / _scalar(n, DTYPE)
    return g + grad_loss


@triton.jit(do_not_specialize=["n"])
def _dpo_kernel(
    policy_chosen_ptr, policy_rejected_ptr, ref_chosen_ptr, ref_rejected_ptr,
    margin_ptr, chosen_lengths_ptr, rejected_lengths_ptr, delta_ptr, pair_weights_ptr,
    loss_ptr, losses_ptr, chosen_rewards_ptr, rejected_rewards_ptr, metrics_ptr,
    grad_loss_ptr, grad_losses_ptr,
    grad_policy_chosen_ptr, grad_policy_rejected_ptr, grad_ref_chosen_ptr, grad_ref_rejected_ptr, grad_margin_ptr,
    n, beta: tl.float64, eps: tl.float64, tau: tl.float64, delta_value: tl.float64, f_coef: tl.float64,
    weights_hi, weights_lo,
    KINDS: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_LENGTHS: tl.constexpr, DELTA_IN_TENSOR: tl.constexpr,
    F_DIV: tl.constexpr, HAS_PAIR_WEIGHTS: tl.constexpr,
    MEAN: tl.constexpr, BACKWARD: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    beta = _scalar(beta, DTYPE)
    f_coef = _scalar(f_coef, DTYPE)
    eps = _scalar(eps, DTYPE)
    tau = _scalar(tau, DTYPE)
    if DELTA_IN_TENSOR:
        delta = tl.load(delta_ptr).to(DTYPE)
    else:
        delta = _scalar(delta_value, DTYPE)
    zero = tl.zeros((), DTYPE)
    sum_loss = zero
    sum_chosen = zero
    sum_rejected = zero
    sum_correct = zero
    sum_margin = zero
    sum_policy_chosen = zero
    sum_policy_rejected = zero
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        pc = tl.load(policy_chosen_ptr + offs, mask=valid, other=0.0).to(DTYPE)
        pr = tl.load(policy_rejected_ptr + offs, mask=valid, other=0.0).to(DTYPE)
        c = pc - tl.load(ref_chosen_ptr + offs, mask=valid, other=0.0).to(DTYPE)
        r = pr - tl.load(ref_rejected_ptr + offs, mask=valid, other=0.0).to(DTYPE)
        m = tl.zeros_like(c)
        if HAS_MARGIN:
            m = tl.load(margin_ptr + offs, mask=valid, other=0.0).to(DTYPE)
        len_c = tl.full((BLOCK,), 1.0, DTYPE)
        len_r = tl.full((BLOCK,), 1.0, DTYPE)
        if HAS_LENGTHS:
            len_c = _token_count(chosen_lengths_ptr, offs, valid, DTYPE)
            len_r = _token_count(rejected_lengths_ptr, offs, valid, DTYPE)
        if F_DIV == 0:
            loss, dc, dr, dm = _dpo_terms(c, r, m, len_c, len_r, beta, eps, tau, delta, weights_hi, weights_lo,
                                          KINDS, HAS_LENGTHS, DTYPE)
        else:
            # The types an f-divergence changes see only the scores: the chain rule through them.
            sc, dsc = _f_score(c, f_coef, F_DIV)
            sr, dsr = _f_score(r, f_coef, F_DIV)
            loss, dc, dr, dm = _dpo_terms(sc, sr, m, len_c, len_r, beta, eps, tau, delta, weights_hi, weights_lo,
                                          KINDS, HAS_LENGTHS, DTYPE)
            dc = dc * dsc
            dr = dr * dsr
        if HAS_PAIR_WEIGHTS:
            w = tl.load(pair_weights_ptr + offs, mask=valid, other=0.0).to(DTYPE)
            loss = w * loss
            dc = w * dc
            dr = w * dr
            dm = w * dm
        if BACKWARD:
            g = _upstream(grad_loss_ptr, grad_losses_ptr, offs, valid, n, MEAN, DTYPE)
            tl.store(grad_policy_chosen_ptr + offs, g * dc, mask=valid)
            tl.store(grad_ref_chosen_ptr + offs, -(g * dc), mask=valid)
            tl.store(grad_policy_rejected_ptr + offs, g * dr, mask=valid)
            tl.store(grad_ref_rejected_ptr + offs, -(g * dr), mask=valid)
            if HAS_MARGIN:
                tl.store(grad_margin_ptr + offs, g * dm, mask=valid)
        else:
            chosen_reward = beta * c
            rejected_reward = beta * r
            tl.store(losses_ptr + offs, loss, mask=valid)
            tl.store(chosen_rewards_ptr + offs, chosen_reward, mask=valid)
            tl.store(rejected_rewards_ptr + offs, rejected_reward, mask=valid)
            sum_loss += tl.sum(tl.where(valid, loss, 0.0), 0)
            sum_chosen += tl.sum(tl.where(valid, chosen_reward, 0.0), 0)
            sum_rejected += tl.sum(tl.where(valid, rejected_reward, 0.0), 0)
            sum_correct += tl.sum(tl.where(valid & (chosen_reward > rejected_reward), 1.0, 0.0), 0)
            sum_margin += tl.sum(tl.where(valid, chosen_reward - rejected_reward, 0.0), 0)
            sum_policy_chosen += tl.sum(tl.where(valid, pc, 0.0), 0)
            sum_policy_rejected += tl.sum(tl.where(valid, pr, 0.0), 0)
    if not BACKWARD:
        count = _scalar(n, DTYPE)
        tl.store(loss_ptr, sum_loss / count if MEAN else sum_loss)
        tl.store(metrics_ptr + 0, sum_chosen / count)
        tl.store(metrics_ptr + 1, sum_rejected / count)
        tl.store(metrics_ptr + 2, sum_correct / count)
        tl.store(metrics_ptr + 3, sum_margin / count)
        tl.store(metrics_ptr + 4, sum_policy_chosen / count)
        tl.store(metrics_ptr + 5, sum_policy_rejected / count)


@triton.jit(do_not_specialize=["n"])
def _kto_kernel(
    policy_ptr, ref_ptr, desirable_ptr, kl_ptr,
    loss_ptr, losses_ptr, chosen_rewards_ptr, rejected_rewards_ptr, metrics_ptr,
    grad_loss_ptr, grad_losses_ptr, grad_policy_ptr, grad_ref_ptr,
    n, beta: tl.float64, kl_value: tl.float64, desirable_weight: tl.float64, undesirable_weight: tl.float64,
    USE_KL: tl.constexpr, KL_IN_TENSOR: tl.constexpr,
    MEAN: tl.constexpr, BACKWARD: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    beta = _scalar(beta, DTYPE)
    desirable_weight = _scalar(desirable_weight, DTYPE)
    undesirable_weight = _scalar(undesirable_weight, DTYPE)
    kl = tl.zeros((), DTYPE)
    if USE_KL:
        if KL_IN_TENSOR:
            kl = tl.load(kl_ptr).to(DTYPE)
        else:
            kl = _scalar(kl_value, DTYPE)
    zero = tl.zeros((), DTYPE)
    sum_loss = zero
    sum_chosen = zero
    sum_rejected = zero
    sum_policy_chosen = zero
    sum_policy_rejected = zero
    count_chosen = zero
    count_rejected = zero
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        p = tl.load(policy_ptr + offs, mask=valid, other=0.0).to(DTYPE)
        r = p - tl.load(ref_ptr + offs, mask=valid, other=0.0).to(DTYPE)
        d = tl.load(desirable_ptr + offs, mask=valid, other=0) != 0
        s = beta * (r - kl)
        # Desirable examples lose for a reward below the reference point, the others above it.
        value = _sigmoid(tl.where(d, -s, s))
        weight = tl.where(d, desirable_weight, undesirable_weight)
        if BACKWARD:
            g = _upstream(grad_loss_ptr, grad_losses_ptr, offs, valid, n, MEAN, DTYPE)
            slope = weight * beta * _sigmoid(s) * _sigmoid(-s)
            dr = g * tl.where(d, -slope, slope)
            tl.store(grad_policy_ptr + offs, dr, mask=valid)
            tl.store(grad_ref_ptr + offs, -dr, mask=valid)
        else:
            loss = weight * value
            reward = beta * r
            chosen = valid & d
            rejected = valid & (~d)
            tl.store(losses_ptr + offs, loss, mask=valid)
            tl.store(chosen_rewards_ptr + offs, tl.where(d, reward, 0.0), mask=valid)
            tl.store(rejected_rewards_ptr + offs, tl.where(d, 0.0, reward), mask=valid)
            sum_loss += tl.sum(tl.where(valid, loss, 0.0), 0)
            sum_chosen += tl.sum(tl.where(chosen, reward, 0.0), 0)
            sum_rejected += tl.sum(tl.where(rejected, reward, 0.0), 0)
            sum_policy_chosen += tl.sum(tl.where(chosen, p, 0.0), 0)
            sum_policy_rejected += tl.sum(tl.where(rejected, p, 0.0), 0)
            count_chosen += tl.sum(tl.where(chosen, 1.0, 0.0), 0)
            count_rejected += tl.sum(tl.where(rejected, 1.0, 0.0), 0)
    if not BACKWARD:
        tl.store(loss_ptr, sum_loss / _scalar(n, DTYPE) if MEAN else sum_loss)
        # A class absent from the batch has no mean: 0/0 gives NaN, as a mean of nothing should.
        chosen_mean = sum_chosen / count_chosen
        rejected_mean = sum_rejected / count_rejected
        tl.store(metrics_ptr + 0, chosen_mean)
        tl.store(metrics_ptr + 1, rejected_mean)
        tl.store(metrics_ptr + 2, chosen_mean - rejected_mean)
        tl.store(metrics_ptr + 3, sum_policy_chosen / count_chosen)
        tl.store(metrics_ptr + 4, sum_policy_rejected / count_rejected)
        tl.store(metrics_ptr + 5, count_chosen)
        tl.store(metrics_ptr + 6, count_rejected)


@triton.jit(do_not_specialize=["n"])
def _cpo_kernel(
    policy_chosen_ptr, policy_rejected_ptr, chosen_lengths_ptr, rejected_lengths_ptr,
    loss_ptr, losses_ptr, chosen_rewards_ptr, rejected_rewards_ptr, metrics_ptr,
    grad_loss_ptr, grad_losses_ptr, grad_policy_chosen_ptr, grad_policy_rejected_ptr,
    n, beta: tl.float64, eps: tl.float64, gamma: tl.float64, alpha: tl.float64, alpha_po: tl.float64,
    KIND: tl.constexpr, AVERAGED: tl.constexpr, WITH_NLL: tl.constexpr, ALPHAPO: tl.constexpr,
    MEAN: tl.constexpr, BACKWARD: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    beta = _scalar(beta, DTYPE)
    eps = _scalar(eps, DTYPE)
    gamma = _scalar(gamma, DTYPE)
    alpha = _scalar(alpha, DTYPE)
    alpha_po = _scalar(alpha_po, DTYPE)
    count = _scalar(n, DTYPE)
    # The NLL term is a token mean over the whole batch: its denominator needs a first pass.
    total_tokens = tl.zeros((), DTYPE)
    if WITH_NLL:
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n
            lengths = _token_count(chosen_lengths_ptr, offs, valid, DTYPE)
            total_tokens += tl.sum(tl.where(valid, lengths, 0.0), 0)
    zero = tl.zeros((), DTYPE)
    sum_loss = zero
    sum_chosen = zero
    sum_rejected = zero
    sum_correct = zero
    sum_margin = zero
    sum_policy_chosen = zero
    sum_policy_rejected = zero
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        pc = tl.load(policy_chosen_ptr + offs, mask=valid, other=0.0).to(DTYPE)
        pr = tl.load(policy_rejected_ptr + offs, mask=valid, other=0.0).to(DTYPE)
        c = pc
        r = pr
        len_c = tl.full((BLOCK,), 1.0, DTYPE)
        len_r = tl.full((BLOCK,), 1.0, DTYPE)
        if AVERAGED:
            len_c = _token_count(chosen_lengths_ptr, offs, valid, DTYPE)
            len_r = _token_count(rejected_lengths_ptr, offs, valid, DTYPE)
            c = pc / len_c
            r = pr / len_r
        # d(reward)/d(log-prob) of each side: 1 without AlphaPO.
        dc = tl.full((BLOCK,), 1.0, DTYPE)
        dr = tl.full((BLOCK,), 1.0, DTYPE)
        if ALPHAPO:
            c, dc = _alphapo(c, alpha_po)
            r, dr = _alphapo(r, alpha_po)
        loss, dh = _cpo_terms(c, r, beta, eps, gamma, KIND, DTYPE)
        if BACKWARD:
            g = _upstream(grad_loss_ptr, grad_losses_ptr, offs, valid, n, MEAN, DTYPE)
            grad_chosen = g * dh * dc / len_c
            if WITH_NLL:
                grad_chosen -= g * (alpha * count / total_tokens)
            tl.store(grad_policy_chosen_ptr + offs, grad_chosen, mask=valid)
            tl.store(grad_policy_rejected_ptr + offs, -(g * dh) * dr / len_r, mask=valid)
        else:
            if WITH_NLL:
                loss = loss - alpha * count * pc / total_tokens
            chosen_reward = beta * c
            rejected_reward = beta * r
            tl.store(losses_ptr + offs, loss, mask=valid)
            tl.store(chosen_rewards_ptr + offs, chosen_reward, mask=valid)
            tl.store(rejected_rewards_ptr + offs, rejected_reward, mask=valid)
            sum_loss += tl.sum(tl.where(valid, loss, 0.0), 0)
            sum_chosen += tl.sum(tl.where(valid, chosen_reward, 0.0), 0)
            sum_rejected += tl.sum(tl.where(valid, rejected_reward, 0.0), 0)
            sum_correct += tl.sum(tl.where(valid & (chosen_reward > rejected_reward), 1.0, 0.0), 0)
            sum_margin += tl.sum(tl.where(valid, chosen_reward - rejected_reward, 0.0), 0)
            sum_policy_chosen += tl.sum(tl.where(valid, pc, 0.0), 0)
            sum_policy_rejected += tl.sum(tl.where(valid, pr, 0.0), 0)
    if not BACKWARD:
        tl.store(loss_ptr, sum_loss / count if MEAN else sum_loss)
        tl.store(metrics_ptr + 0, sum_chosen / count)
        tl.store(metrics_ptr + 1, sum_rejected / count)
        tl.store(metrics_ptr + 2, sum_correct / count)
        tl.store(metrics_ptr + 3, sum_margin / count)
        tl.store(metrics_ptr + 4, sum_policy_chosen / count)
        tl.store(metrics_ptr + 5, sum_policy_rejected / count)


@triton.jit(do_not_specialize=["n"])
def _orpo_kernel(
    policy_chosen_ptr, policy_rejected_ptr, nll_ptr,
    loss_ptr, losses_ptr, chosen_rewards_ptr, rejected_rewards_ptr, metrics_ptr,
    grad_loss_ptr, grad_losses_ptr, grad_policy_chosen_ptr, grad_policy_rejected_ptr, grad_nll_ptr,
    n, beta: tl.float64, tiny: tl.float64,
    NLL_MODE: tl.constexpr, MEAN: tl.constexpr, BACKWARD: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # NLL_MODE: 0, the per-pair -policy_chosen_logps; 1, one 0-d NLL for the batch; 2, a [B] NLL.
    beta = _scalar(beta, DTYPE)
    tiny = _scalar(tiny, DTYPE)
    count = _scalar(n, DTYPE)
    zero = tl.zeros((), DTYPE)
    nll_scalar = zero
    if NLL_MODE == 1:
        nll_scalar = tl.load(nll_ptr).to(DTYPE)
    sum_loss = zero
    sum_chosen = zero
    sum_rejected = zero
    sum_correct = zero
    sum_margin = zero
    sum_policy_chosen = zero
    sum_policy_rejected = zero
    sum_ratio = zero
    sum_log_odds = zero
    sum_nll = zero
    grad_nll_sum = zero
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        # Masked lanes read -1, a log-prob whose log-odds are finite.
        c = tl.load(policy_chosen_ptr + offs, mask=valid, other=-1.0).to(DTYPE)
        r = tl.load(policy_rejected_ptr + offs, mask=valid, other=-1.0).to(DTYPE)
        odds_c, d_odds_c = _log_odds(c, tiny)
        odds_r, d_odds_r = _log_odds(r, tiny)
        log_odds = odds_c - odds_r
        if BACKWARD:
            g = _upstream(grad_loss_ptr, grad_losses_ptr, offs, valid, n, MEAN, DTYPE)
            d_log_odds = -beta * _sigmoid(-log_odds)
            grad_chosen = g * d_log_odds * d_odds_c
            if NLL_MODE == 0:
                grad_chosen -= g
            tl.store(grad_policy_chosen_ptr + offs, grad_chosen, mask=valid)
            tl.store(grad_policy_rejected_ptr + offs, -(g * d_log_odds) * d_odds_r, mask=valid)
            if NLL_MODE == 1:
                grad_nll_sum += tl.sum(tl.where(valid, g, 0.0), 0)
            if NLL_MODE == 2:
                tl.store(grad_nll_ptr + offs, g, mask=valid)
        else:
            if NLL_MODE == 0:
                nll = -c
            elif NLL_MODE == 1:
                nll = tl.zeros_like(c) + nll_scalar
            else:
                nll = tl.load(nll_ptr + offs, mask=valid, other=0.0).to(DTYPE)
            ratio = _log_sigmoid(log_odds)
            loss = nll - beta * ratio
            chosen_reward = beta * c
            rejected_reward = beta * r
            tl.store(losses_ptr + offs, loss, mask=valid)
            tl.store(chosen_rewards_ptr + offs, chosen_reward, mask=valid)
            tl.store(rejected_rewards_ptr + offs, rejected_reward, mask=valid)
            sum_loss += tl.sum(tl.where(valid, loss, 0.0), 0)
            sum_chosen += tl.sum(tl.where(valid, chosen_reward, 0.0), 0)
            sum_rejected += tl.sum(tl.where(valid, rejected_reward, 0.0), 0)
            sum_correct += tl.sum(tl.where(valid & (chosen_reward > rejected_reward), 1.0, 0.0), 0)
            sum_margin += tl.sum(tl.where(valid, chosen_reward - rejected_reward, 0.0), 0)
            sum_policy_chosen += tl.sum(tl.where(valid, c, 0.0), 0)
            sum_policy_rejected += tl.sum(tl.where(valid, r, 0.0), 0)
            sum_ratio += tl.sum(tl.where(valid, ratio, 0.0), 0)
            sum_log_odds += tl.sum(tl.where(valid, log_odds, 0.0), 0)
            sum_nll += tl.sum(tl.where(valid, nll, 0.0), 0)
    if BACKWARD:
        if NLL_MODE == 1:
            tl.store(grad_nll_ptr, grad_nll_sum)
    else:
        tl.store(loss_ptr, sum_loss / count if MEAN else sum_loss)
        tl.store(metrics_ptr + 0, sum_chosen / count)
        tl.store(metrics_ptr + 1, sum_rejected / count)
        tl.store(metrics_ptr + 2, sum_correct / count)
        tl.store(metrics_ptr + 3, sum_margin / count)
        tl.store(metrics_ptr + 4, sum_policy_chosen / count)
        tl.store(metrics_ptr + 5, sum_policy_rejected / count)
        tl.store(metrics_ptr + 6, sum_ratio / count)
        tl.store(metrics_ptr + 7, sum_log_odds / count)
        tl.store(metrics_ptr + 8, sum_nll / count)


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs are validated, contiguous [B] tensors of one floating dtype and device.
# ----------------------------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _block(n: int) -> int:
    return min(_MAX_BLOCK, triton.next_power_of_2(max(n, 1)))


def _split_weights(weights: list[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each weight as a float32 pair (hi, lo) with hi + lo = weight to 48 bits."""
    hi = [float(torch.tensor(w, dtype=torch.float32)) for w in weights]
    return tuple(hi), tuple(float(torch.tensor(w - h, dtype=torch.float32)) for w, h in zip(weights, hi))


def _dpo_launch(call, outputs, grads) -> None:
    n = call.chosen.shape[0]
    dummy = call.chosen
    weights_hi, weights_lo = _split_weights(list(call.loss_weights))
    loss, losses, chosen_rewards, rejected_rewards, metrics = outputs or (dummy,) * 5
    grad_loss, grad_losses, g_pc, g_pr, g_rc, g_rr, g_margin, _ = grads or (dummy,) * 8
    _dpo_kernel[(1,)](
        call.chosen, call.rejected, call.ref_chosen, call.ref_rejected,
        _or(call.margin, dummy), _or(call.chosen_lengths, dummy), _or(call.rejected_lengths, dummy),
        _or(call.offset, dummy), _or(call.pair_weights, dummy),
        loss, losses, chosen_rewards, rejected_rewards, metrics,
        grad_loss, grad_losses, g_pc, g_pr, g_rc, g_rr, _or(g_margin, dummy),
        n, call.beta, call.label_smoothing, call.discopop_tau, call.offset_value, call.f_alpha_divergence_coef,
        weights_hi, weights_lo,
        KINDS=tuple(DPO_KINDS[kind] for kind in call.loss_types),
        HAS_MARGIN=call.margin is not None,
        HAS_LENGTHS=call.chosen_lengths is not None,
        DELTA_IN_TENSOR=call.offset is not None,
        F_DIV=F_DIVERGENCE_TYPES.index(call.f_divergence),
        HAS_PAIR_WEIGHTS=call.pair_weights is not None,
        MEAN=call.mean,
        BACKWARD=grads is not None,
        DTYPE=_compute_dtype(call.chosen),
        BLOCK=_block(n),
    )


def _kto_launch(call, outputs, grads) -> None:
    n = call.chosen.shape[0]
    dummy = call.chosen
    loss, losses, chosen_rewards, rejected_rewards, metrics = outputs or (dummy,) * 5
    grad_loss, grad_losses, g_policy, _, g_ref, _, _, _ = grads or (dummy,) * 8
    _kto_kernel[(1,)](
        call.chosen, call.ref_chosen, call.desirable, _or(call.offset, dummy),
        loss, losses, chosen_rewards, rejected_rewards, metrics,
        grad_loss, grad_losses, g_policy, g_ref,
        n, call.beta, call.offset_value, call.desirable_weight, call.undesirable_weight,
        USE_KL=call.loss_types[0] == "kto",
        KL_IN_TENSOR=call.offset is not None,
        MEAN=call.mean,
        BACKWARD=grads is not None,
        DTYPE=_compute_dtype(call.chosen),
        BLOCK=_block(n),
    )


def _cpo_launch(call, outputs, grads) -> None:
    n = call.chosen.shape[0]
    dummy = call.chosen
    loss, losses, chosen_rewards, rejected_rewards, metrics = outputs or (dummy,) * 5
    grad_loss, grad_losses, g_pc, g_pr, _, _, _, _ = grads or (dummy,) * 8
    kind = call.loss_types[0]
    _cpo_kernel[(1,)](
        call.chosen, call.rejected, _or(call.chosen_lengths, dummy), _or(call.rejected_lengths, dummy),
        loss, losses, chosen_rewards, rejected_rewards, metrics,
        grad_loss, grad_losses, g_pc, g_pr,
        n, call.beta, call.label_smoothing, call.simpo_gamma, call.cpo_alpha, call.alpha,
        KIND=CPO_KINDS[kind],
        AVERAGED=kind in ("ipo", "simpo"),
        WITH_NLL=call.cpo_alpha != 0.0,
        ALPHAPO=call.alpha != 0.0,
        MEAN=call.mean,
        BACKWARD=grads is not None,
        DTYPE=_compute_dtype(call.chosen),
        BLOCK=_block(n),
    )


def _orpo_launch(call, outputs, grads) -> None:
    n = call.chosen.shape[0]
    dummy = call.chosen
    loss, losses, chosen_rewards, rejected_rewards, metrics = outputs or (dummy,) * 5
    grad_loss, grad_losses, g_pc, g_pr, _, _, _, g_nll = grads or (dummy,) * 8
    nll = call.nll
    nll_mode = 0 if nll is None else 1 if nll.dim() == 0 else 2
    _orpo_kernel[(1,)](
        call.chosen, call.rejected, _or(nll, dummy),
        loss, losses, chosen_rewards, rejected_rewards, metrics,
        grad_loss, grad_losses, g_pc, g_pr, _or(g_nll, dummy),
        n, call.beta, torch.finfo(call.chosen.dtype if call.chosen.dtype == torch.float64 else torch.float32).tiny,
        NLL_MODE=nll_mode,
        MEAN=call.mean,
        BACKWARD=grads is not None,
        DTYPE=_compute_dtype(call.chosen),
        BLOCK=_block(n),
    )


def _or(t, dummy):
    """A pointer the kernel never reads in this mode (its flag is off) still needs a tensor."""
    return dummy if t is None else t


_LAUNCHERS = {"dpo": _dpo_launch, "kto": _kto_launch, "cpo": _cpo_launch, "orpo": _orpo_launch}


def launch(call, outputs, grads) -> None:
    """One launch of the family's kernel for ``call`` (a ``prefopt.losses.fused.LossCall``):
    forward when ``outputs`` (a ``LossOutputs``) is given, backward when ``grads`` (a
    ``LossGrads``) is; the other is None."""
    _LAUNCHERS[call.family](call, outputs, grads)
