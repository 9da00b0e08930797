"""Fused preference-loss reductions on per-sequence log-probs: one launch per direction.

One kernel serves every family (DPO and its pairwise relatives, KTO, CPO/SimPO, ORPO), compiled
in two modes. Forward: per-example losses, the reduced loss, the rewards and the batch metrics.
Backward: the gradients of ``losses`` (and of the reduced loss) with respect to every log-prob
input, recomputed from the inputs, so nothing but the inputs is saved.

Each loss type is written once, as ``prefopt.losses.formulas`` writes it (that module is the
reference and carries each derivation), on forward-mode dual numbers: a tuple
(value, d/dx0, d/dx1, d/dx2) over the example's three variables

    x0 = chosen - ref_chosen,   x1 = rejected - ref_rejected   (an absent reference is 0),
    x2 = margin (DPO) or nll (ORPO), else unused,

so the same line of math gives the value and its exact partial derivatives, and each elementary
function carries its derivative once (``_sigmoid_d`` and its neighbours). The forward reads only
the values: the compiler drops the derivative lanes, which no store uses. ``csrc/preference_loss.cu``
is the same design in C++, function for function.

A single program walks the batch in blocks of ``BLOCK`` examples in a fixed order, so every sum
is deterministic and no atomics are needed; batches of preference pairs are small (tens to
thousands), so one program is also the fastest launch. Math runs in float32, or in float64 for
float64 inputs. Triton passes Python floats as float32, so the scalar arguments are annotated
float64, and the per-type weights of a combined DPO loss (a tuple, which cannot be annotated)
travel as float32 (hi, lo) pairs whose sum carries 48 bits. An absent tensor is passed as None,
which the kernel sees as a constant: its branch is compiled out.

The metrics are written in the order ``prefopt._codes.METRIC_NAMES`` gives for each family.
"""

import torch
import triton
import triton.language as tl

from .._codes import F_DIVERGENCE_TYPES, FAMILIES, LOSS_TYPE_CODES
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
_KTO = tl.constexpr(LOSS_TYPE_CODES["kto"])
_FORWARD_KL = tl.constexpr(F_DIVERGENCE_TYPES.index("forward_kl"))
_JS_DIVERGENCE = tl.constexpr(F_DIVERGENCE_TYPES.index("js_divergence"))
_ALPHA_DIVERGENCE = tl.constexpr(F_DIVERGENCE_TYPES.index("alpha_divergence"))
_DPO = tl.constexpr(FAMILIES.index("dpo"))
_KTO_FAMILY = tl.constexpr(FAMILIES.index("kto"))
_CPO = tl.constexpr(FAMILIES.index("cpo"))
_ORPO = tl.constexpr(FAMILIES.index("orpo"))

_LN2 = tl.constexpr(0.6931471805599453)
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
    """log(1 - e^x) for x < 0, split at -ln 2 as in prefopt.losses.formulas.log1mexp."""
    near_zero = tl.log(-_expm1(tl.maximum(x, -_LN2)))
    far = log1p(-tl.exp(tl.minimum(x, -_LN2)))
    return tl.where(x > -_LN2, near_zero, far)


@triton.jit
def _scalar(x, DTYPE: tl.constexpr):
    """A scalar argument in the compute dtype (a Python number under the interpreter)."""
    return (tl.zeros((), DTYPE) + x).to(DTYPE)


# ----------------------------------------------------------------------------------------------
# Dual numbers (value, d/dx0, d/dx1, d/dx2). A constant k (a scalar or a per-example tensor)
# carries no derivative, so it is never multiplied in as a dual (inf * 0 would be NaN).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _variable(x, INDEX: tl.constexpr):
    zero = tl.zeros_like(x)
    if INDEX == 0:
        return x, zero + 1.0, zero, zero
    elif INDEX == 1:
        return x, zero, zero + 1.0, zero
    else:
        return x, zero, zero, zero + 1.0


@triton.jit
def _constant(x):
    zero = tl.zeros_like(x)
    return x, zero, zero, zero


@triton.jit
def _then(a, value, slope):
    """f(a) by the chain rule, from f(a's value) and f'(a's value)."""
    return value, slope * a[1], slope * a[2], slope * a[3]


@triton.jit
def _add(a, b):
    return a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]


@triton.jit
def _sub(a, b):
    return a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3]


@triton.jit
def _mul(a, b):
    return a[0] * b[0], a[1] * b[0] + a[0] * b[1], a[2] * b[0] + a[0] * b[2], a[3] * b[0] + a[0] * b[3]


@triton.jit
def _scale(k, a):
    return k * a[0], k * a[1], k * a[2], k * a[3]


@triton.jit
def _div(a, k):
    return a[0] / k, a[1] / k, a[2] / k, a[3] / k


@triton.jit
def _shift(a, k):
    return a[0] + k, a[1], a[2], a[3]


@triton.jit
def _neg(a):
    return -a[0], -a[1], -a[2], -a[3]


@triton.jit
def _select(condition, a, b):
    return (tl.where(condition, a[0], b[0]), tl.where(condition, a[1], b[1]), tl.where(condition, a[2], b[2]),
            tl.where(condition, a[3], b[3]))


@triton.jit
def _square(a):
    return _mul(a, a)


@triton.jit
def _sigmoid_d(a):
    s = _sigmoid(a[0])
    return _then(a, s, s * _sigmoid(-a[0]))


@triton.jit
def _log_sigmoid_d(a):
    return _then(a, _log_sigmoid(a[0]), _sigmoid(-a[0]))


@triton.jit
def _exp_d(a):
    e = tl.exp(a[0])
    return _then(a, e, e)


@triton.jit
def _expm1_d(a):
    return _then(a, _expm1(a[0]), tl.exp(a[0]))


@triton.jit
def _log1mexp_d(a):
    # d/dx log(1 - e^x) = e^x / (e^x - 1), finite for every x < 0.
    return _then(a, _log1mexp(a[0]), tl.exp(a[0]) / _expm1(a[0]))


@triton.jit
def _relu_d(a):
    return _then(a, tl.maximum(a[0], 0.0), tl.where(a[0] > 0.0, 1.0, 0.0).to(a[0].dtype))


@triton.jit
def _clamp_max_d(a, bound):
    """min(a, bound) with torch.clamp(max=bound)'s gradient: 1 up to and including the bound."""
    return _then(a, tl.minimum(a[0], bound), tl.where(a[0] <= bound, 1.0, 0.0).to(a[0].dtype))


# ----------------------------------------------------------------------------------------------
# The loss types, one function each, on dual numbers; the derivations are in
# prefopt.losses.formulas. c and r are the chosen and rejected log-ratios (or scores), m the
# margin, z = beta (c - r) - m.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _smoothed_logistic(z, eps):
    return _sub(_scale(-(1.0 - eps), _log_sigmoid_d(z)), _scale(eps, _log_sigmoid_d(_neg(z))))


@triton.jit
def _robust_logistic(z, eps):
    return _div(_add(_scale(-(1.0 - eps), _log_sigmoid_d(z)), _scale(eps, _log_sigmoid_d(_neg(z)))),
                1.0 - 2.0 * eps)


@triton.jit
def _hinge(z):
    return _relu_d(_shift(_neg(z), 1.0))


@triton.jit
def _ipo(h, m, beta):
    return _square(_sub(h, _div(_shift(m, 0.5), beta)))


@triton.jit
def _exo_pair(z, eps):
    return _add(_mul(_sigmoid_d(z), _shift(_log_sigmoid_d(z), -log1p(-eps))),
                _mul(_sigmoid_d(_neg(z)), _shift(_log_sigmoid_d(_neg(z)), -tl.log(eps))))


@triton.jit
def _nca_pair(chosen_reward, rejected_reward):
    return _sub(_sub(_neg(_log_sigmoid_d(chosen_reward)), _scale(0.5, _log_sigmoid_d(_neg(chosen_reward)))),
                _scale(0.5, _log_sigmoid_d(_neg(rejected_reward))))


@triton.jit
def _bco_pair(chosen_reward, rejected_reward, delta):
    return _sub(_neg(_log_sigmoid_d(_shift(chosen_reward, -delta))),
                _log_sigmoid_d(_shift(_neg(rejected_reward), delta)))


@triton.jit
def _sppo_hard(c, r, beta):
    return _add(_square(_shift(c, -0.5 / beta)), _square(_shift(r, 0.5 / beta)))


@triton.jit
def _apo_zero(chosen_reward, rejected_reward):
    return _add(_sigmoid_d(_neg(chosen_reward)), _sigmoid_d(rejected_reward))


@triton.jit
def _apo_down(chosen_reward, z):
    return _add(_sigmoid_d(chosen_reward), _sigmoid_d(_neg(z)))


@triton.jit
def _discopop(z, tau):
    return _add(_neg(_mul(_log_sigmoid_d(z), _sigmoid_d(_neg(_div(z, tau))))),
                _exp_d(_sub(_log_sigmoid_d(_div(z, tau)), z)))


@triton.jit
def _f_divergence_score(x, coef, F_DIV: tl.constexpr):
    """f'(e^x) of a log-ratio x (formulas.f_divergence_scores); reverse KL (0) is x itself."""
    if F_DIV == _FORWARD_KL:
        return _neg(_expm1_d(_neg(x)))
    elif F_DIV == _JS_DIVERGENCE:
        return _shift(_log_sigmoid_d(x), _LN2)
    elif F_DIV == _ALPHA_DIVERGENCE:
        return _div(_expm1_d(_clamp_max_d(_scale(coef - 1.0, x), 80.0)), coef - 1.0)
    else:
        return x


@triton.jit
def _alphapo_reward(x, alpha):
    return _div(_neg(_expm1_d(_scale(-alpha, x))), alpha)


@triton.jit
def _log_odds(x, tiny):
    """log(p / (1 - p)) of p = e^x, with log p = 0 clamped to -tiny (formulas.log1mexp)."""
    return _sub(x, _log1mexp_d(_clamp_max_d(x, -tiny)))


# ----------------------------------------------------------------------------------------------
# The families: one example's loss (a dual), its rewards and ORPO's extra metrics.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _weight(weights_hi, weights_lo, i: tl.constexpr, DTYPE: tl.constexpr):
    return _scalar(weights_hi[i], DTYPE) + _scalar(weights_lo[i], DTYPE)


@triton.jit
def _dpo_type_loss(c, r, m, len_c, len_r, beta, eps, tau, delta, KIND: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    z = _sub(_scale(beta, _sub(c, r)), m)
    if KIND == _SIGMOID:
        return _smoothed_logistic(z, eps)
    elif KIND == _ROBUST:
        return _robust_logistic(z, eps)
    elif KIND == _HINGE:
        return _hinge(z)
    elif KIND == _IPO:
        # On sums (the paper's), or per token when lengths are given (TRL's convention).
        if HAS_LENGTHS:
            return _ipo(_sub(_div(c, len_c), _div(r, len_r)), m, beta)
        else:
            return _ipo(_sub(c, r), m, beta)
    elif KIND == _EXO_PAIR:
        return _exo_pair(z, eps)
    elif KIND == _NCA_PAIR:
        return _nca_pair(_scale(beta, c), _scale(beta, r))
    elif KIND == _BCO_PAIR:
        return _bco_pair(_scale(beta, c), _scale(beta, r), delta)
    elif KIND == _SPPO_HARD:
        return _sppo_hard(c, r, beta)
    elif KIND == _APO_ZERO:
        return _apo_zero(_scale(beta, c), _scale(beta, r))
    elif KIND == _APO_DOWN:
        return _apo_down(_scale(beta, c), z)
    elif KIND == _DISCOPOP:
        return _discopop(z, tau)
    else:
        tl.static_assert(KIND == _SIGMOID_NORM)
        return _neg(_log_sigmoid_d(_sub(_scale(beta, _sub(_div(c, len_c), _div(r, len_r))), m)))


@triton.jit
def _dpo_loss(x, len_c, len_r, beta, eps, tau, delta, f_coef, weights_hi, weights_lo,
              KINDS: tl.constexpr, F_DIV: tl.constexpr, HAS_LENGTHS: tl.constexpr, DTYPE: tl.constexpr):
    """The weighted sum of the listed types, in list order as formulas.dpo_losses sums them.
    Under an f-divergence the types see the scores of the log-ratios."""
    c = _f_divergence_score(x[0], f_coef, F_DIV)
    r = _f_divergence_score(x[1], f_coef, F_DIV)
    loss = _constant(tl.zeros_like(x[0][0]))
    for i in tl.static_range(len(KINDS)):
        term = _dpo_type_loss(c, r, x[2], len_c, len_r, beta, eps, tau, delta, KINDS[i], HAS_LENGTHS)
        loss = _add(loss, _scale(_weight(weights_hi, weights_lo, i, DTYPE), term))
    return loss


@triton.jit
def _kto_loss(x, desirable, beta, reference_point, desirable_weight, undesirable_weight):
    """formulas.kto_losses: the weight times sigma(-s) for a desirable example, sigma(s) otherwise."""
    s = _scale(beta, _shift(x[0], -reference_point))
    return _scale(tl.where(desirable, desirable_weight, undesirable_weight), _sigmoid_d(_select(desirable, _neg(s), s)))


@triton.jit
def _cpo_transform(x, length, alpha, AVERAGED: tl.constexpr, ALPHAPO: tl.constexpr):
    """CPO's view of one side's log-prob: its per-token average for ipo and simpo, then the
    AlphaPO reward when alpha is nonzero."""
    if AVERAGED:
        x = _div(x, length)
    if ALPHAPO:
        x = _alphapo_reward(x, alpha)
    return x


@triton.jit
def _cpo_loss(c, r, x0, beta, eps, gamma, nll_weight, total_tokens, KIND: tl.constexpr, WITH_NLL: tl.constexpr):
    """formulas.cpo_pair_losses on h = c - r, plus formulas.cpo_nll_losses of the chosen x0."""
    h = _sub(c, r)
    if KIND == _IPO:
        loss = _ipo(h, _constant(tl.zeros_like(h[0])), beta)
    elif KIND == _HINGE:
        loss = _hinge(_scale(beta, h))
    elif KIND == _SIMPO:
        loss = _smoothed_logistic(_shift(_scale(beta, h), -gamma), eps)
    else:
        tl.static_assert(KIND == _SIGMOID)
        loss = _smoothed_logistic(_scale(beta, h), eps)
    if WITH_NLL:
        loss = _sub(loss, _div(_scale(nll_weight, x0), total_tokens))
    return loss


# ----------------------------------------------------------------------------------------------
# The kernel. BACKWARD selects the mode; pointers the mode does not use are None.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load(ptr, offs, valid, DTYPE: tl.constexpr):
    """Block ``offs`` of a [B] input in the compute dtype, or 0 where the input is absent."""
    if ptr is None:
        return tl.zeros(offs.shape, DTYPE)
    else:
        return tl.load(ptr + offs, mask=valid, other=0.0).to(DTYPE)


@triton.jit
def _token_count(lengths_ptr, offs, valid, DTYPE: tl.constexpr):
    """Completion token counts, at least 1 (TRL's clamp: an empty completion counts as one
    token; 1 where no lengths are given). A NaN stays NaN, as torch.clamp keeps it: tl.maximum
    would drop it and count 1."""
    if lengths_ptr is None:
        return tl.full(offs.shape, 1.0, DTYPE)
    else:
        count = tl.load(lengths_ptr + offs, mask=valid, other=1).to(DTYPE)
        return tl.where(count < 1.0, 1.0, count)


@triton.jit
def _masked_sum(valid, x):
    return tl.sum(tl.where(valid, x, 0.0), 0)


@triton.jit
def _store_if(ptr, offs, value, valid):
    if ptr is not None:
        tl.store(ptr + offs, value, mask=valid)


@triton.jit(do_not_specialize=["n"])
def _preference_loss_kernel(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, margin_ptr, chosen_lengths_ptr,
    rejected_lengths_ptr, desirable_ptr, offset_ptr, nll_ptr, pair_weights_ptr,
    loss_ptr, losses_ptr, chosen_rewards_ptr, rejected_rewards_ptr, metrics_ptr,
    grad_loss_ptr, grad_losses_ptr, grad_chosen_ptr, grad_rejected_ptr, grad_ref_chosen_ptr,
    grad_ref_rejected_ptr, grad_margin_ptr, grad_nll_ptr,
    n, beta: tl.float64, eps: tl.float64, tau: tl.float64, gamma: tl.float64, cpo_alpha: tl.float64,
    desirable_weight: tl.float64, undesirable_weight: tl.float64, offset_value: tl.float64, f_coef: tl.float64,
    alpha: tl.float64, tiny: tl.float64, weights_hi, weights_lo,
    FAMILY: tl.constexpr, KINDS: tl.constexpr, F_DIV: tl.constexpr, NLL_IS_VECTOR: tl.constexpr,
    CPO_NLL: tl.constexpr, ALPHAPO: tl.constexpr, MEAN: tl.constexpr, BACKWARD: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    beta = _scalar(beta, DTYPE)
    eps = _scalar(eps, DTYPE)
    tau = _scalar(tau, DTYPE)
    gamma = _scalar(gamma, DTYPE)
    f_coef = _scalar(f_coef, DTYPE)
    alpha = _scalar(alpha, DTYPE)
    tiny = _scalar(tiny, DTYPE)
    count = _scalar(n, DTYPE)
    # bco_pair's delta or KTO's KL reference point; apo_zero_unpaired's reference point is 0.
    if offset_ptr is not None:
        offset = tl.load(offset_ptr).to(DTYPE)
    else:
        offset = _scalar(offset_value, DTYPE)
    if FAMILY == _KTO_FAMILY:
        if KINDS[0] != _KTO:
            offset = tl.zeros((), DTYPE)
    # CPO's NLL is a token mean over the whole batch: its denominator needs a first pass.
    nll_weight = _scalar(cpo_alpha, DTYPE) * count
    total_tokens = tl.zeros((), DTYPE)
    if CPO_NLL:
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            total_tokens += _masked_sum(offs < n, _token_count(chosen_lengths_ptr, offs, offs < n, DTYPE))
    grad_each = tl.zeros((), DTYPE)
    if BACKWARD:
        grad_each = tl.load(grad_loss_ptr).to(DTYPE)
        if MEAN:
            grad_each = grad_each / count
    nll_scalar = tl.zeros((), DTYPE)
    if nll_ptr is not None:
        if not NLL_IS_VECTOR:
            nll_scalar = tl.load(nll_ptr).to(DTYPE)
    zero = tl.zeros((), DTYPE)
    # The batch sums behind the reduced loss and the metrics, as in csrc/preference_loss.cu's
    # add_to_sums. Pairs: loss, chosen and rejected rewards, wins, reward margin, chosen and
    # rejected log-probs, ORPO's three extras. KTO: loss, the rewards, the log-probs of each
    # class and the class sizes.
    sum_loss = zero
    sum_chosen_reward = zero
    sum_rejected_reward = zero
    sum_3 = zero
    sum_4 = zero
    sum_5 = zero
    sum_6 = zero
    sum_7 = zero
    sum_8 = zero
    sum_9 = zero
    grad_nll_sum = zero
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        policy_chosen = _load(chosen_ptr, offs, valid, DTYPE)
        policy_rejected = _load(rejected_ptr, offs, valid, DTYPE)
        x0 = policy_chosen - _load(ref_chosen_ptr, offs, valid, DTYPE)
        x1 = policy_rejected - _load(ref_rejected_ptr, offs, valid, DTYPE)
        if nll_ptr is not None:
            if NLL_IS_VECTOR:
                x2 = _load(nll_ptr, offs, valid, DTYPE)
            else:
                x2 = tl.zeros_like(x0) + nll_scalar
        else:
            x2 = _load(margin_ptr, offs, valid, DTYPE)
        x = (_variable(x0, 0), _variable(x1, 1), _variable(x2, 2))
        len_c = _token_count(chosen_lengths_ptr, offs, valid, DTYPE)
        len_r = _token_count(rejected_lengths_ptr, offs, valid, DTYPE)
        extras = (tl.zeros_like(x0), tl.zeros_like(x0), tl.zeros_like(x0))
        desirable = valid
        if FAMILY == _DPO:
            loss = _dpo_loss(x, len_c, len_r, beta, eps, tau, offset, f_coef, weights_hi, weights_lo,
                             KINDS, F_DIV, chosen_lengths_ptr is not None, DTYPE)
            if pair_weights_ptr is not None:
                loss = _scale(_load(pair_weights_ptr, offs, valid, DTYPE), loss)
            chosen_reward = beta * x0
            rejected_reward = beta * x1
        elif FAMILY == _KTO_FAMILY:
            desirable = tl.load(desirable_ptr + offs, mask=valid, other=0) != 0
            loss = _kto_loss(x, desirable, beta, offset, _scalar(desirable_weight, DTYPE),
                             _scalar(undesirable_weight, DTYPE))
            # A reward counts for its own class and is 0 in the other's vector.
            chosen_reward = tl.where(desirable, beta * x0, 0.0)
            rejected_reward = tl.where(desirable, 0.0, beta * x0)
        elif FAMILY == _CPO:
            averaged: tl.constexpr = (KINDS[0] == _IPO) or (KINDS[0] == _SIMPO)
            c = _cpo_transform(x[0], len_c, alpha, averaged, ALPHAPO)
            r = _cpo_transform(x[1], len_r, alpha, averaged, ALPHAPO)
            loss = _cpo_loss(c, r, x[0], beta, eps, gamma, nll_weight, total_tokens, KINDS[0], CPO_NLL)
            chosen_reward = beta * c[0]
            rejected_reward = beta * r[0]
        else:
            # ORPO: the NLL of the chosen plus beta (-log sigma(log-odds ratio)), on per-token
            # average log-probs; the NLL is x2 where given, the pair's -c otherwise.
            log_odds_ratio = _sub(_log_odds(x[0], tiny), _log_odds(x[1], tiny))
            ratio = _log_sigmoid_d(log_odds_ratio)
            if nll_ptr is not None:
                nll = x[2]
            else:
                nll = _neg(x[0])
            loss = _sub(nll, _scale(beta, ratio))
            chosen_reward = beta * x0
            rejected_reward = beta * x1
            extras = (ratio[0], log_odds_ratio[0], nll[0])
        if BACKWARD:
            # Example i's loss receives grad_losses[i] + grad_loss (/ n for the mean).
            g = tl.load(grad_losses_ptr + offs, mask=valid, other=0.0).to(DTYPE) + grad_each
            _store_if(grad_chosen_ptr, offs, g * loss[1], valid)
            _store_if(grad_ref_chosen_ptr, offs, -(g * loss[1]), valid)
            _store_if(grad_rejected_ptr, offs, g * loss[2], valid)
            _store_if(grad_ref_rejected_ptr, offs, -(g * loss[2]), valid)
            _store_if(grad_margin_ptr, offs, g * loss[3], valid)
            if NLL_IS_VECTOR:
                _store_if(grad_nll_ptr, offs, g * loss[3], valid)
            else:
                grad_nll_sum += _masked_sum(valid, g * loss[3])
        else:
            tl.store(losses_ptr + offs, loss[0], mask=valid)
            tl.store(chosen_rewards_ptr + offs, chosen_reward, mask=valid)
            tl.store(rejected_rewards_ptr + offs, rejected_reward, mask=valid)
            sum_loss += _masked_sum(valid, loss[0])
            sum_chosen_reward += _masked_sum(valid, chosen_reward)
            sum_rejected_reward += _masked_sum(valid, rejected_reward)
            if FAMILY == _KTO_FAMILY:
                sum_3 += _masked_sum(valid & desirable, policy_chosen)
                sum_4 += _masked_sum(valid & (~desirable), policy_chosen)
                sum_5 += _masked_sum(valid & desirable, tl.full(offs.shape, 1.0, DTYPE))
                sum_6 += _masked_sum(valid & (~desirable), tl.full(offs.shape, 1.0, DTYPE))
            else:
                # TRL's accuracy: strict wins only.
                sum_3 += _masked_sum(valid & (chosen_reward > rejected_reward), tl.full(offs.shape, 1.0, DTYPE))
                sum_4 += _masked_sum(valid, chosen_reward - rejected_reward)
                sum_5 += _masked_sum(valid, policy_chosen)
                sum_6 += _masked_sum(valid, policy_rejected)
                sum_7 += _masked_sum(valid, extras[0])
                sum_8 += _masked_sum(valid, extras[1])
                sum_9 += _masked_sum(valid, extras[2])
    if BACKWARD:
        # One NLL shared by the batch: its gradient is the sum over the pairs.
        if not NLL_IS_VECTOR:
            if grad_nll_ptr is not None:
                tl.store(grad_nll_ptr, grad_nll_sum)
    else:
        tl.store(loss_ptr, sum_loss / count if MEAN else sum_loss)
        if FAMILY == _KTO_FAMILY:
            # A class absent from the batch has no mean: 0/0 gives NaN, as a mean of nothing should.
            chosen_mean = sum_chosen_reward / sum_5
            rejected_mean = sum_rejected_reward / sum_6
            tl.store(metrics_ptr + 0, chosen_mean)
            tl.store(metrics_ptr + 1, rejected_mean)
            tl.store(metrics_ptr + 2, chosen_mean - rejected_mean)
            tl.store(metrics_ptr + 3, sum_3 / sum_5)
            tl.store(metrics_ptr + 4, sum_4 / sum_6)
            tl.store(metrics_ptr + 5, sum_5)
            tl.store(metrics_ptr + 6, sum_6)
        else:
            tl.store(metrics_ptr + 0, sum_chosen_reward / count)
            tl.store(metrics_ptr + 1, sum_rejected_reward / count)
            tl.store(metrics_ptr + 2, sum_3 / count)
            tl.store(metrics_ptr + 3, sum_4 / count)
            tl.store(metrics_ptr + 4, sum_5 / count)
            tl.store(metrics_ptr + 5, sum_6 / count)
            if FAMILY == _ORPO:
                tl.store(metrics_ptr + 6, sum_7 / count)
                tl.store(metrics_ptr + 7, sum_8 / count)
                tl.store(metrics_ptr + 8, sum_9 / count)


# ----------------------------------------------------------------------------------------------
# The launcher. Inputs are validated, contiguous [B] tensors of one floating dtype and device.
# ----------------------------------------------------------------------------------------------


def _split_weights(weights: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each weight as a float32 pair (hi, lo) with hi + lo = weight to 48 bits."""
    hi = [float(torch.tensor(w, dtype=torch.float32)) for w in weights]
    return tuple(hi), tuple(float(torch.tensor(w - h, dtype=torch.float32)) for w, h in zip(weights, hi))


def launch(call, outputs, grads) -> None:
    """One launch of the kernel for ``call`` (a ``prefopt.losses.fused.LossCall``): forward when
    ``outputs`` (a ``LossOutputs``) is given, backward when ``grads`` (a ``LossGrads``) is; the
    other is None."""
    n = call.chosen.shape[0]
    float64 = call.chosen.dtype == torch.float64
    weights_hi, weights_lo = _split_weights(call.loss_weights or (0.0,))
    _preference_loss_kernel[(1,)](
        call.chosen, call.rejected, call.ref_chosen, call.ref_rejected, call.margin, call.chosen_lengths,
        call.rejected_lengths, call.desirable, call.offset, call.nll, call.pair_weights,
        *(outputs or (None,) * 5),
        *(grads or (None,) * 8),
        n, call.beta, call.label_smoothing, call.discopop_tau, call.simpo_gamma, call.cpo_alpha,
        call.desirable_weight, call.undesirable_weight, call.offset_value, call.f_alpha_divergence_coef,
        call.alpha, torch.finfo(torch.float64 if float64 else torch.float32).tiny, weights_hi, weights_lo,
        FAMILY=FAMILIES.index(call.family),
        KINDS=tuple(LOSS_TYPE_CODES[kind] for kind in call.loss_types) or (0,),
        F_DIV=F_DIVERGENCE_TYPES.index(call.f_divergence),
        NLL_IS_VECTOR=call.nll is not None and call.nll.dim() == 1,
        CPO_NLL=call.family == "cpo" and call.cpo_alpha != 0.0,
        ALPHAPO=call.alpha != 0.0,
        MEAN=call.mean,
        BACKWARD=grads is not None,
        DTYPE=tl.float64 if float64 else tl.float32,
        BLOCK=min(_MAX_BLOCK, triton.next_power_of_2(max(n, 1))),
    )
