"""Forward: per-token log-probability of the label, and optional softmax statistics, in one pass.

For a row of transformed logits z = k y (y = x without a softcap, y = tanh(x / c) with one, and
k = 1 / T or c / T; see ``_common.transform_logits``) and its label l, the statistics are, with
the row maximum m and d_j = (y_j - y_max) k log2(e) <= 0 (log2 units):

    s  = sum_j 2^d_j = 1 + r                       lse     = m + log1p(r)
    t  = sum_j 2^d_j d_j                           entropy = log1p(r) - ln 2 t / s
    s2 = sum_j 4^d_j = 1 + r2                      log sum_j p_j^2 = log1p(r2) - 2 log1p(r)
    log p_l = (z_l - m) - log1p(r)                 mean logit = sum_j z_j / V
    is_top1 = (first argmax_j z_j) == l

Each thread keeps one online state (maximum m, r, t, r2, sum y, first column of m) per row over
the columns it reads, so the loop has no exchange between threads and no barrier; the states of
a row are merged once, at the end. A tile is 4 sub-tiles [ROWS, LANES, VEC] of 16-byte vectors
(VEC = 8 bf16 or 4 float columns), and a thread folds its 4 vectors, a step of 4 VEC elements
y_j, at once: the step's maximum M = max(m, y_j) (one FMNMX per element), then per element

    a_j = (y_j - M) k log2(e)       e_j = 2^a_j   (one FADD, one FMA, one ex2)

with the maxima (a_j = +0 exactly) and the -inf logits (a_j = -inf) taken out by one integer
minimum on the bits of a_j (-FLT_MAX: e_j = 0 and e_j a_j = 0), and the maxima counted by
their sign bit, ones = #{a_j >= +0}. The sums r_step = sum e_j, t_step = sum e_j a_j, r2_step =
sum e_j^2 are plain additions and FMAs; the state moves to M once per step, with c = 2^((m - M)
k log2(e)) (1 if M = m):

    raised (M > m):  r <- c (1 + r) + r_step + (ones - 1)    t <- c (t + sh (1 + r)) + t_step
    else:            r <- r + r_step + ones                   t <- t + t_step

with sh = (m - M) k log2(e) (r2 as r, with c^2 and e^2). Per element that is, for bf16 logits: the
conversion 1, the maximum 1, a 2, the minimum 1, e 1, r 1, the count ~1.25 (shift-and-adds), t 1,
r2 1, sum y 1, the first column of the maximum 2 (a's bits OR'd with the column, a maximum); the
state update, the loop and the 4 loads are ~1 per element at 32 elements a thread. Products are
summed as an FMA chain across the sub-tiles (Triton 3.9 reduces a thread's elements as a tree of
pairs, which would leave half of them an FMUL and an FADD). The maximum's own term 2^0 = 1 never
enters r or r2 (a state starts empty, r = -1): on a peaked row (p_max ~ 1) r is tiny, and 1 + r in
float32 would lose it, and with it the relative precision of log p, the entropy and log sum p^2;
ties each add their exact 1. The step's maximum propagates NaN, so that a NaN logit makes c, and
every sum, NaN. y - M is exact wherever 2^a is not negligible (Sterbenz), so the sums keep float32
rounding of z - m however large |z| is (scaling y by k log2(e) first would round it at the scale of
|z|). Ignored rows are never read and get 0; a scored row with no finite logit (all -inf) has no
distribution: its log-prob, lse, entropy and log sum p^2 are NaN (its mean logit is -inf), and a
NaN logit makes every statistic of its row NaN, as on every backend.

The main loop reads whole tiles unmasked and one masked tail follows. A vocabulary that fills less
than a tile puts several rows in one program. Few rows of a large vocabulary (fewer than
_SPLIT_PROGRAMS programs, e.g. 512 tokens or less) are cut into slices of whole tiles, one
program each (split-V): each writes its slice's merged state, and a second kernel merges a row's
slices in slice order with the same ``_merge`` as a row's lanes, so the result does not depend on
which program finishes first. Compiled, 2^x is ``ex2.approx.ftz.f32``, the
softcap's reciprocal ``rcp.approx.ftz.f32`` (one MUFU instruction each, no denormal fix-up: terms
below 2^-126 are 0; relative errors ~2^-22 and 1 ulp, inside the float32 tolerance of 1e-5 of the
tests), and a bf16 pair's conversion a shift and a mask; under the interpreter, which cannot run
inline PTX, they are ``tl.exp2``, a division and ``.to(tl.float32)`` (``APPROX`` is off; with a
softcap the conversion stays ``.to(tl.float32)``, whose float result lets ptxas take tanh's |x| as
an operand modifier). The CPU tests therefore check the formulas, not the instructions: the
instructions' accuracy is for the GPU run of the same tests.

The backward pass keeps lse and its rounding residual lse_residual = (m + log s) - lse, exact
(float32, one each per row): p_j = exp((z_j - lse) - lse_residual). At large |z| a float32 lse is
off by up to half an ulp of |m| (2^-9 at |z| = 65536), an error every p_j would inherit; z_j - lse
is exact wherever p_j is not negligible (Sterbenz), so the residual brings p_j back to float32
rounding of z_j - m.
"""

import os

import torch
import triton
import triton.language as tl

from ._common import LOG2_E, exp2, log1p, lse_and_residual, tanh_scaled

_MAX_BLOCK_V = 4096
# Elements per program and tile: a small vocabulary puts several rows in one tile.
_TILE = 4096
# Split-V (see token_stats_forward): about 4 waves of 4 programs on each of an H100/H200's 132 SMs,
# in slices of at least 4 tiles; the combine kernel merges 16 rows a program.
_SPLIT_PROGRAMS = 2048
_MIN_SLICE_TILES = 4
_COMBINE_ROWS = 16


@triton.jit
def _max_nan(a, b):
    """max(a, b), NaN if either is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _to_float(x, SPLIT_BF16: tl.constexpr):
    """Logits as float32. With SPLIT_BF16 (compiled only: inline PTX), a bf16 pair is one 32-bit
    word whose halves are a shift and a mask (the conversion instructions take three for a pair)."""
    if SPLIT_BF16 and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    return x.to(tl.float32)


@triton.jit
def _sum(x):
    """[ROWS, LANES, VEC, 2, 2] -> [ROWS, LANES]: a thread's own elements, no exchange."""
    return tl.sum(tl.sum(tl.sum(x, 2), 2), 2)


@triton.jit
def _sum_products(x, w):
    """sum x w over each thread's elements: an FMA chain across the 4 sub-tiles, then the
    vector's sum (a tree over all of them would leave half of the products unfused)."""
    x_low, x_high = tl.split(x)
    x0, x1 = tl.split(x_low)
    x2, x3 = tl.split(x_high)
    w_low, w_high = tl.split(w)
    w0, w1 = tl.split(w_low)
    w2, w3 = tl.split(w_high)
    return tl.sum(((x0 * w0 + x1 * w1) + x2 * w2) + x3 * w3, 2)


@triton.jit
def _step_max(x):
    """The maximum of each thread's elements, NaN if one is NaN."""
    return tl.reduce(tl.reduce(tl.reduce(x, 2, _max_nan), 2, _max_nan), 2, _max_nan)


@triton.jit
def _absorb(y, rev_column, first_column, m, r, t, r2, best, scale2, WITH_ENTROPY: tl.constexpr,
            WITH_SUM_SQ: tl.constexpr, WITH_TOP1: tl.constexpr, APPROX: tl.constexpr, BLOCK_V: tl.constexpr):
    """A step y [ROWS, LANES, VEC, 2, 2] folded into the [ROWS, LANES] states (see the module
    docstring). rev_column: BLOCK_V minus each element's column relative to its thread's first
    column in the step, first_column [ROWS, LANES]."""
    top = _max_nan(m, _step_max(y))
    # + 0.0 (inside the FMA) makes a tie of -0 with a maximum of +0 give +0 too.
    a = (y - top[:, :, None, None, None]) * scale2 + 0.0
    a_bits = a.to(tl.int32, bitcast=True)
    # The maxima (a = +0: bits 0) and the -inf logits become -FLT_MAX (bits 0xff7fffff), so that
    # e = 0 and e a = 0; every other a is negative, below -FLT_MAX as an integer, and stays.
    kept = tl.minimum(a_bits, -8388609).to(tl.float32, bitcast=True)
    e = exp2(kept, APPROX)
    # The maxima are the elements whose a has a sign bit of 0.
    negative = _sum(a_bits.to(tl.uint32, bitcast=True) >> 31)
    ones = (y.shape[2] * y.shape[3] * y.shape[4]) - negative.to(tl.float32)
    raised = top > m
    # c = 1 where the maximum stays, and NaN where top is (a NaN logit): it poisons every sum.
    shift = (m - top) * scale2
    c = exp2(shift, APPROX)
    # Raised: c (1 + r), else r; then the step's sum and its ties' exact 1s, the maximum's own 1
    # left out.
    extra = tl.where(raised, ones - 1.0, ones)
    r_new = (r * c + tl.where(raised, c, 0.0)) + _sum(e) + extra
    if WITH_ENTROPY:
        # shift is clamped for an empty state (1 + r = 0, shift = -inf).
        t = c * (t + tl.maximum(shift, -1.0e20) * (1.0 + r)) + _sum_products(kept, e)
    if WITH_SUM_SQ:
        c2 = c * c
        r2 = (r2 * c2 + tl.where(raised, c2, 0.0)) + _sum_products(e, e) + extra
    if WITH_TOP1:
        # a's bits | BLOCK_V - column is >= 0 at a maximum only, and largest at its first column.
        key = tl.max(tl.max(tl.max(a_bits | rev_column, 2), 2), 2)
        best = tl.where(raised, first_column + (BLOCK_V - key), best)
    return top, r_new, t, r2, best


@triton.jit
def _load(ptr, column, limit, scored, MASKED: tl.constexpr, SPLIT_BF16: tl.constexpr):
    """A sub-tile [ROWS, LANES, VEC] as float32 (masked: the columns below limit of scored rows)."""
    if MASKED:
        x = tl.load(ptr, mask=scored[:, None, None] & (column < limit), other=0.0)
    else:
        x = tl.load(ptr)
    return _to_float(x, SPLIT_BF16)


@triton.jit
def _load_tile(ptr, column, limit, scored, MASKED: tl.constexpr, SPLIT_BF16: tl.constexpr, STRIDE: tl.constexpr):
    """Four sub-tiles STRIDE columns apart, joined into [ROWS, LANES, VEC, 2, 2]: element
    (.., p, q) is sub-tile 2 q + p. Joined in registers, each thread keeps its own 4 VEC columns
    (one load of 4 sub-tiles as a tensor would let Triton's coalescing order, which versions
    break differently on ties, spread them over threads)."""
    y0 = _load(ptr, column, limit, scored, MASKED, SPLIT_BF16)
    y1 = _load(ptr + STRIDE, column + STRIDE, limit, scored, MASKED, SPLIT_BF16)
    y2 = _load(ptr + 2 * STRIDE, column + 2 * STRIDE, limit, scored, MASKED, SPLIT_BF16)
    y3 = _load(ptr + 3 * STRIDE, column + 3 * STRIDE, limit, scored, MASKED, SPLIT_BF16)
    return tl.join(tl.join(y0, y1), tl.join(y2, y3))


@triton.jit
def _rows(program, labels_ptr, rows, inner_size, stride_outer, stride_inner, logits_ptr, vocab_size, ignore_index,
          ROWS: tl.constexpr):
    """A program's rows: their indices, which exist, their first logit, labels and which are scored."""
    row = program.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = row < rows
    row = tl.where(row_ok, row, 0)
    # 64-bit offsets: rows x vocab passes 2^31 at 16k tokens of a 128k vocabulary.
    row_ptr = logits_ptr + (row // inner_size) * stride_outer + (row % inner_size) * stride_inner
    label = tl.load(labels_ptr + row, mask=row_ok, other=ignore_index).to(tl.int64)
    scored = row_ok & (label != ignore_index)
    return row, row_ok, row_ptr, label, scored


@triton.jit
def _merge(m, r, t, r2, z_sum, column, scale2, WITH_ENTROPY: tl.constexpr, WITH_SUM_SQ: tl.constexpr):
    """[ROWS, N] states merged into one per row, in a fixed order (a tree over axis 1): rescaled to
    the row maximum y_max, each state's own 1 kept out of the sum except for one, so that a peaked
    row keeps r's relative precision. ``column`` is the first column of each state's maximum.
    A state with no element (r = -1, m = -FLT_MAX) weighs 0 against any element, and an all-empty
    row keeps r = -1: no finite logit."""
    y_max = tl.max(m, 1)
    shift = (m - y_max[:, None]) * scale2
    weight = tl.exp2(shift)
    holds_max = m == y_max[:, None]
    maxima = tl.sum(holds_max.to(tl.float32), 1)
    r_row = tl.sum(r * weight, 1) + tl.sum(tl.where(holds_max, 0.0, weight), 1) + (maxima - 1.0)
    if WITH_ENTROPY:
        t_row = tl.sum(tl.where(weight > 0.0, weight * (t + shift * (1.0 + r)), 0.0), 1)
    else:
        t_row = tl.zeros_like(r_row)
    if WITH_SUM_SQ:
        weight2 = weight * weight
        r2_row = tl.sum(r2 * weight2, 1) + tl.sum(tl.where(holds_max, 0.0, weight2), 1) + (maxima - 1.0)
    else:
        r2_row = tl.zeros_like(r_row)
    first = tl.min(tl.where(holds_max, column, 2**31 - 1), 1)
    return y_max, r_row, t_row, r2_row, tl.sum(z_sum, 1), first


@triton.jit
def _finish(row, row_ok, row_ptr, label, scored, y_max, r_row, t_row, r2_row, z_row, first, logps_ptr, lse_ptr,
            lse_residual_ptr, entropy_ptr, mean_logits_ptr, log_sum_sq_ptr, is_top1_ptr, vocab_size, z_scale,
            tanh_scale, HAS_SOFTCAP: tl.constexpr, WITH_RESIDUAL: tl.constexpr, WITH_ENTROPY: tl.constexpr,
            WITH_MEAN: tl.constexpr, WITH_SUM_SQ: tl.constexpr, WITH_TOP1: tl.constexpr, APPROX: tl.constexpr):
    """The statistics of merged rows (the module docstring's formulas), stored; 0 for ignored rows."""
    # Labels were validated before launch; the bounds test only keeps a bad one from reading
    # outside the row.
    in_row = scored & (label >= 0) & (label < vocab_size)
    label_x = tl.load(row_ptr + tl.where(in_row, label, 0), mask=in_row, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        label_x = tanh_scaled(label_x, tanh_scale, APPROX)
    no_logit = r_row == -1.0
    log_s = tl.where(scored, tl.where(no_logit, float("nan"), log1p(r_row)), 0.0)
    m_z = y_max * z_scale
    label_z = label_x * z_scale
    # log1p(r) >= 0 and z_l <= m make every log-prob <= 0 by construction; the min() guards z_l
    # against a last-ulp difference between the scalar and the vector evaluation of the transform.
    logp = tl.minimum(label_z - m_z, 0.0) - log_s
    tl.store(logps_ptr + row, tl.where(scored, logp, 0.0), mask=row_ok)
    lse, lse_residual = lse_and_residual(m_z, log_s)
    tl.store(lse_ptr + row, tl.where(scored, lse, 0.0), mask=row_ok)
    if WITH_RESIDUAL:
        tl.store(lse_residual_ptr + row, tl.where(scored, lse_residual, 0.0), mask=row_ok)
    if WITH_ENTROPY:
        entropy = log_s - 0.6931471805599453 * t_row / (1.0 + r_row)
        tl.store(entropy_ptr + row, tl.where(scored, entropy, 0.0), mask=row_ok)
    if WITH_SUM_SQ:
        tl.store(log_sum_sq_ptr + row, tl.where(scored, log1p(r2_row) - 2.0 * log_s, 0.0), mask=row_ok)
    if WITH_MEAN:
        tl.store(mean_logits_ptr + row, tl.where(scored, z_row * z_scale / vocab_size, 0.0), mask=row_ok)
    if WITH_TOP1:
        tl.store(is_top1_ptr + row, scored & (first == label), mask=row_ok)


@triton.jit
def _token_stats_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logps_ptr,
    lse_ptr,
    lse_residual_ptr,
    entropy_ptr,
    mean_logits_ptr,
    log_sum_sq_ptr,
    is_top1_ptr,
    partial_ptr,
    partial_first_ptr,
    rows,
    inner_size,
    stride_outer,
    stride_inner,
    vocab_size,
    slice_columns,
    ignore_index,
    z_scale,
    scale2,
    tanh_scale,
    HAS_SOFTCAP: tl.constexpr,
    WITH_RESIDUAL: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_MEAN: tl.constexpr,
    WITH_SUM_SQ: tl.constexpr,
    WITH_TOP1: tl.constexpr,
    APPROX: tl.constexpr,
    SPLIT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    LANES: tl.constexpr,
    VEC: tl.constexpr,
):
    row, row_ok, row_ptr, label, scored = _rows(tl.program_id(0), labels_ptr, rows, inner_size, stride_outer,
                                                stride_inner, logits_ptr, vocab_size, ignore_index, ROWS)
    # Split-V: program (p, k) reads slice k of its row, columns [k slice_columns, (k + 1) slice_columns).
    if SPLIT:
        column_start = tl.program_id(1) * slice_columns
        column_end = tl.minimum(column_start + slice_columns, vocab_size)
    else:
        column_start = 0
        column_end = vocab_size

    # A tile is 4 sub-tiles [ROWS, LANES, VEC] of BLOCK_V / 4 columns: every thread holds one
    # vector of VEC columns of each, and one state per row (LANES states a row).
    STRIDE: tl.constexpr = BLOCK_V // 4
    # bf16 pairs split by a shift and a mask, except with a softcap (see the module docstring).
    SPLIT_BF16: tl.constexpr = APPROX and not HAS_SOFTCAP
    column3 = tl.arange(0, LANES)[None, :, None] * VEC + tl.arange(0, VEC)[None, None, :]
    column = tl.join(tl.join(column3, column3 + STRIDE), tl.join(column3 + 2 * STRIDE, column3 + 3 * STRIDE))
    # Relative to a thread's first column, the same in every thread: constants in the code.
    vector = tl.arange(0, VEC)[None, None, :]
    rev_column = BLOCK_V - tl.join(tl.join(vector, vector + STRIDE), tl.join(vector + 2 * STRIDE, vector + 3 * STRIDE))
    lane_column = tl.arange(0, LANES)[None, :] * VEC
    m = tl.full((ROWS, LANES), -3.4028234663852886e38, tl.float32)  # -FLT_MAX: no element yet
    r = tl.full((ROWS, LANES), -1.0, tl.float32)  # s = 1 + r = 0: empty
    t = tl.zeros((ROWS, LANES), tl.float32)
    r2 = tl.full((ROWS, LANES), -1.0, tl.float32)
    z_sum = tl.zeros((ROWS, LANES), tl.float32)
    best = tl.full((ROWS, LANES), 2**31 - 1, tl.int32)  # no column
    row_tile_ptr = row_ptr[:, None, None] + column3
    # The columns a program reads: its slice for a scored row, none for an ignored one.
    read_limit = tl.where(tl.max(scored.to(tl.int32), 0) > 0, column_end, column_start)
    tail_start = column_start
    if ROWS == 1:
        # The main loop: whole tiles, unmasked (an ignored row runs none).
        for tile_start in range(column_start, read_limit - BLOCK_V + 1, BLOCK_V):
            y = _load_tile(row_tile_ptr + tile_start, column3, 0, scored, False, SPLIT_BF16, STRIDE)
            if HAS_SOFTCAP:
                y = tanh_scaled(y, tanh_scale, APPROX)
            m, r, t, r2, best = _absorb(y, rev_column, tile_start + lane_column, m, r, t, r2, best, scale2,
                                        WITH_ENTROPY, WITH_SUM_SQ, WITH_TOP1, APPROX, BLOCK_V)
            if WITH_MEAN:
                z_sum += _sum(y)
        tail_start = column_start + ((read_limit - column_start) // BLOCK_V) * BLOCK_V
    if tail_start < read_limit:
        y = _load_tile(row_tile_ptr + tail_start, column3, column_end - tail_start, scored, True, SPLIT_BF16, STRIDE)
        if HAS_SOFTCAP:
            y = tanh_scaled(y, tanh_scale, APPROX)
        tail = scored[:, None, None, None, None] & (column < column_end - tail_start)
        y = tl.where(tail, y, float("-inf"))  # after the cap, which would map -inf to -1
        m, r, t, r2, best = _absorb(y, rev_column, tail_start + lane_column, m, r, t, r2, best, scale2,
                                    WITH_ENTROPY, WITH_SUM_SQ, WITH_TOP1, APPROX, BLOCK_V)
        if WITH_MEAN:
            z_sum += _sum(tl.where(tail, y, 0.0))

    y_max, r_row, t_row, r2_row, z_row, first = _merge(m, r, t, r2, z_sum, best, scale2, WITH_ENTROPY, WITH_SUM_SQ)
    if SPLIT:
        # The slice's merged state, for _token_stats_combine_kernel: planes m, r, t, r2, sum z of
        # [rows, slices] each, and the first column of the maximum.
        slot = row * tl.num_programs(1) + tl.program_id(1)
        plane = rows * tl.num_programs(1)
        tl.store(partial_ptr + slot, y_max, mask=row_ok)
        tl.store(partial_ptr + plane + slot, r_row, mask=row_ok)
        tl.store(partial_ptr + 2 * plane + slot, t_row, mask=row_ok)
        tl.store(partial_ptr + 3 * plane + slot, r2_row, mask=row_ok)
        tl.store(partial_ptr + 4 * plane + slot, z_row, mask=row_ok)
        tl.store(partial_first_ptr + slot, first, mask=row_ok)
    else:
        _finish(row, row_ok, row_ptr, label, scored, y_max, r_row, t_row, r2_row, z_row, first, logps_ptr, lse_ptr,
                lse_residual_ptr, entropy_ptr, mean_logits_ptr, log_sum_sq_ptr, is_top1_ptr, vocab_size, z_scale,
                tanh_scale, HAS_SOFTCAP, WITH_RESIDUAL, WITH_ENTROPY, WITH_MEAN, WITH_SUM_SQ, WITH_TOP1, APPROX)


@triton.jit
def _token_stats_combine_kernel(
    logits_ptr,
    labels_ptr,
    logps_ptr,
    lse_ptr,
    lse_residual_ptr,
    entropy_ptr,
    mean_logits_ptr,
    log_sum_sq_ptr,
    is_top1_ptr,
    partial_ptr,
    partial_first_ptr,
    rows,
    slices,
    inner_size,
    stride_outer,
    stride_inner,
    vocab_size,
    ignore_index,
    z_scale,
    scale2,
    tanh_scale,
    HAS_SOFTCAP: tl.constexpr,
    WITH_RESIDUAL: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_MEAN: tl.constexpr,
    WITH_SUM_SQ: tl.constexpr,
    WITH_TOP1: tl.constexpr,
    APPROX: tl.constexpr,
    ROWS: tl.constexpr,
    SLICES: tl.constexpr,
):
    """Split-V's second half: the slices' states of each row merged in slice order (the same
    _merge as a row's lanes), then the row's statistics."""
    row, row_ok, row_ptr, label, scored = _rows(tl.program_id(0), labels_ptr, rows, inner_size, stride_outer,
                                                stride_inner, logits_ptr, vocab_size, ignore_index, ROWS)
    slice_index = tl.arange(0, SLICES)
    slot = row[:, None] * slices + slice_index[None, :]
    present = row_ok[:, None] & (slice_index[None, :] < slices)
    plane = rows * slices
    m = tl.load(partial_ptr + slot, mask=present, other=-3.4028234663852886e38)
    r = tl.load(partial_ptr + plane + slot, mask=present, other=-1.0)
    t = tl.load(partial_ptr + 2 * plane + slot, mask=present, other=0.0)
    r2 = tl.load(partial_ptr + 3 * plane + slot, mask=present, other=-1.0)
    z_sum = tl.load(partial_ptr + 4 * plane + slot, mask=present, other=0.0)
    column = tl.load(partial_first_ptr + slot, mask=present, other=2**31 - 1)
    y_max, r_row, t_row, r2_row, z_row, first = _merge(m, r, t, r2, z_sum, column, scale2, WITH_ENTROPY,
                                                       WITH_SUM_SQ)
    _finish(row, row_ok, row_ptr, label, scored, y_max, r_row, t_row, r2_row, z_row, first, logps_ptr, lse_ptr,
            lse_residual_ptr, entropy_ptr, mean_logits_ptr, log_sum_sq_ptr, is_top1_ptr, vocab_size, z_scale,
            tanh_scale, HAS_SOFTCAP, WITH_RESIDUAL, WITH_ENTROPY, WITH_MEAN, WITH_SUM_SQ, WITH_TOP1, APPROX)


def token_stats_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logps: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    mean_logits: torch.Tensor | None,
    log_sum_sq_probs: torch.Tensor | None,
    is_top1: torch.Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    lse_residual: torch.Tensor | None = None,
) -> None:
    """Fill the per-row outputs for one block of rows.

    logits: [outer, inner, V] view (any float dtype, last dimension contiguous, other strides
    free). labels: [outer * inner] int32/int64, contiguous. Outputs: [outer * inner] contiguous,
    float32 (is_top1: bool); a statistic passed as None is not computed. lse_residual, if given
    ([outer * inner] float32), receives (m + log s) - lse, which the backward takes with lse.
    """
    outer, inner, vocab_size = logits.shape
    rows = outer * inner
    if rows == 0:
        return
    block_v = min(_MAX_BLOCK_V, max(4, triton.next_power_of_2(vocab_size)))
    # A thread reads one 16-byte vector of each of a tile's 4 sub-tiles (32 bf16 or 16 float
    # columns at BLOCK_V 4096) and folds them into one state.
    vector = max(1, min(16 // logits.element_size(), block_v // 4))
    lanes = block_v // (4 * vector)
    rows_per_program = max(1, min(_TILE // block_v, triton.next_power_of_2(rows)))
    # Split-V when the rows alone would leave the GPU idle: enough slices for _SPLIT_PROGRAMS
    # programs, none shorter than _MIN_SLICE_TILES tiles (its loop would be mostly prologue).
    slices = 1
    if rows_per_program == 1:
        slices = max(1, min(triton.cdiv(_SPLIT_PROGRAMS, rows), vocab_size // (_MIN_SLICE_TILES * block_v)))
    slice_columns = triton.cdiv(triton.cdiv(vocab_size, slices), block_v) * block_v
    slices = triton.cdiv(vocab_size, slice_columns)
    # z = k y: y = x, k = 1/T without a softcap; y = tanh(x / c), k = c / T with one.
    z_scale = (1.0 if softcap is None else softcap) / temperature
    outputs = (logps, lse, lse if lse_residual is None else lse_residual, lse if entropy is None else entropy,
               lse if mean_logits is None else mean_logits, lse if log_sum_sq_probs is None else log_sum_sq_probs,
               lse if is_top1 is None else is_top1)
    if slices > 1:
        partial = torch.empty((5, rows, slices), dtype=torch.float32, device=logits.device)
        partial_first = torch.empty((rows, slices), dtype=torch.int32, device=logits.device)
    else:
        partial, partial_first = lse, lse  # not read
    scales = (z_scale, z_scale * LOG2_E, 0.0 if softcap is None else 2.0 * LOG2_E / softcap)
    statistics = dict(
        HAS_SOFTCAP=softcap is not None,
        WITH_RESIDUAL=lse_residual is not None,
        WITH_ENTROPY=entropy is not None,
        WITH_MEAN=mean_logits is not None,
        WITH_SUM_SQ=log_sum_sq_probs is not None,
        WITH_TOP1=is_top1 is not None,
        APPROX=os.environ.get("TRITON_INTERPRET") != "1",
    )
    _token_stats_fwd_kernel[(triton.cdiv(rows, rows_per_program), slices)](
        logits,
        labels,
        *outputs,
        partial,
        partial_first,
        rows,
        inner,
        logits.stride(0),
        logits.stride(1),
        vocab_size,
        slice_columns,
        ignore_index,
        *scales,
        **statistics,
        SPLIT=slices > 1,
        ROWS=rows_per_program,
        BLOCK_V=block_v,
        LANES=lanes,
        VEC=vector,
        num_warps=max(1, min(8, lanes // 32)),
    )
    if slices > 1:
        _token_stats_combine_kernel[(triton.cdiv(rows, _COMBINE_ROWS),)](
            logits, labels, *outputs, partial, partial_first, rows, slices, inner, logits.stride(0),
            logits.stride(1), vocab_size, ignore_index, *scales, **statistics, ROWS=_COMBINE_ROWS,
            SLICES=triton.next_power_of_2(slices), num_warps=4,
        )
