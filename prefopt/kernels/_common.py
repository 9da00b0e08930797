"""Pieces shared by the log-prob kernels: the logit transform and its derivative, and the one-MUFU
exponential, reciprocal and tanh they are computed with.

A kernel sees raw logits x and works on the logits the softmax is taken over,

    z = softcap(x) / T,        softcap(x) = c * tanh(x / c)     (Gemma-style; identity if off)

so that temperature and soft-capping cost no extra pass and no extra memory.
"""

import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
# A jit function reads a global only as a constexpr (the interpreter does not enforce it).
_TWO_LOG2_E = tl.constexpr(2.0 * LOG2_E)


@triton.jit
def exp2(x, APPROX: tl.constexpr):
    """2^x: ``ex2.approx.ftz.f32`` (one MUFU instruction, no denormal fix-up: results below 2^-126
    are 0, relative error ~2^-22) when APPROX; ``tl.exp2`` otherwise, which is what runs under the
    interpreter (it cannot run inline PTX), so that the launchers set APPROX off there."""
    if APPROX:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.exp2(x)


@triton.jit
def reciprocal(x, APPROX: tl.constexpr):
    """1 / x: ``rcp.approx.ftz.f32`` (one MUFU instruction, 1 ulp) when APPROX, a division otherwise."""
    if APPROX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return 1.0 / x


@triton.jit
def tanh_scaled(x, tanh_scale, APPROX: tl.constexpr):
    """tanh(x / c) = sign(x) (1 - e) / (1 + e), e = 2^(-2 log2(e) |x| / c) (tanh_scale = 2 log2(e) /
    c): two MUFU instructions and five others. e is in [0, 1], so nothing overflows and 1 - e is
    exact for e >= 1/2: the error is that of e, an absolute ~3e-8 near 0; a -inf logit gives -1.
    Without APPROX (the interpreter, and the fused linear path's transform) it is exact exp2 and
    division: libdevice's tanh is not available under TRITON_INTERPRET."""
    e = exp2(-(tl.abs(x) * tanh_scale), APPROX)
    magnitude = (1.0 - e) * reciprocal(1.0 + e, APPROX)
    # The sign of x put on the magnitude: one bitwise instruction.
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    return (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def log1p(x):
    """log(1 + x), accurate for small x: the rounding of u = 1 + x is undone by x / (u - 1)
    (Goldberg's method; there is no log1p in triton.language or under the interpreter)."""
    u = 1.0 + x
    rounded = u - 1.0
    return tl.where(rounded == 0.0, x, tl.log(u) * (x / tl.where(rounded == 0.0, 1.0, rounded)))


@triton.jit
def transform_logits(x, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(x) / T, in float32."""
    if HAS_SOFTCAP:
        x = softcap * tanh_scaled(x, _TWO_LOG2_E / softcap, False)
    return x * inv_temperature


@triton.jit
def transform_logits_derivative(x, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """dz/dx = (1 - tanh(x / c)^2) / T."""
    if HAS_SOFTCAP:
        t = tanh_scaled(x, _TWO_LOG2_E / softcap, False)
        return (1.0 - t * t) * inv_temperature
    return tl.zeros_like(x) + inv_temperature


@triton.jit
def lse_and_residual(m, log_s):
    """(lse, residual): lse = m + log s rounded to float32 and residual = (m + log s) - lse, exact
    (Fast2Sum, the larger magnitude first). A non-finite lse (no finite logit, a NaN or an inf)
    has residual 0, so the backward sees that lse unchanged."""
    lse = m + log_s
    m_larger = tl.abs(m) >= tl.abs(log_s)
    larger = tl.where(m_larger, m, log_s)
    smaller = tl.where(m_larger, log_s, m)
    residual = smaller - (lse - larger)
    return lse, tl.where(tl.abs(lse) < float("inf"), residual, 0.0)
