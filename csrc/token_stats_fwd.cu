// Forward: per-token log-probability of the label, and optional softmax statistics, in one pass
// over the logits (the CUDA twin of prefopt/kernels/token_stats_fwd.py; the results must agree).
//
// For a row of transformed logits z = k y (y = x without a softcap, y = tanh(x / c) with one;
// k = 1 / T or c / T) and its label l, with the row maximum m of y and s = k log2(e) (so that
// (y_j - m) s <= 0 is z_j - z_max in log2 units):
//
//     s  = sum_j 2^((y_j - m) s) = 1 + r                 lse     = k m + log1p(r)
//     t  = sum_j 2^((y_j - m) s) (y_j - m) s             entropy = log1p(r) - ln 2 t / s
//     s2 = sum_j 4^((y_j - m) s) = 1 + r2                log sum_j p_j^2 = log1p(r2) - 2 log1p(r)
//     log p_l = k (y_l - m) - log1p(r)                   mean logit = k sum_j y_j / V
//     is_top1 = (first argmax_j y_j) == l
//
// The maximum's own term 2^0 = 1 is kept out of r and r2: on a peaked row (p_max ~ 1) r is tiny,
// 1 + r in float32 would lose it, and with it the relative precision of log p, the entropy and
// log sum p^2. Elements equal to the maximum are counted, not summed: each adds exactly 1, except
// the one that is the implicit 1 of s.
//
// Per thread. Each thread keeps one state (m, r, t, r2, sum y, argmax) over all the columns it
// reads, and folds a whole step of 32 bf16 (16 float) elements at once, without a branch: the
// step's maximum M = max(m, y_j) (one FMNMX per element; for bf16 logits without a softcap one
// max.bf16x2 per pair of raw elements, exact), mu = fl(M s), and per element
//
//     a_j = fma(y_j, s, -mu)        e_j = 2^a_j (one ex2.approx: one MUFU, no fix-up)
//     y_j <  M:  r += e_j,  t += e_j a_j,  r2 += e_j^2       y_j >= M: ones += 1
//
// (predicated adds after one compare; a NaN compares false and so poisons r). s is applied
// inside the FMA, not by scaling y first: a_j is y_j s - mu rounded once, at its own magnitude,
// so the terms that matter keep float32 rounding of z_j - z_max however large |z| is. mu is not
// M s exactly but off by eps = fma(M, s, -mu) (exact, |eps| <= ulp(mu) / 2, which is not small at
// |z| ~ 65536): every a_j is (y_j - M) s + eps, so the step's sums are brought to the maximum
// once per step, r <- 2^-eps r and t <- 2^-eps (t - eps r), r2 <- 4^-eps r2. Then the state
// moves to M: with c = 2^((m - M) s) (1 when M = m) and the old s = 1 + r,
//
//     raised (M > m):  r <- c (1 + r) + r_step + (ones - 1)      t <- c (t + (m - M) s (1 + r)) + t_step
//     else:            r <- r + r_step + ones                     t <- t + t_step
//
// ties add their exact 1s last, and the maximum's own 1 stays out. The per-step work is a few
// dozen instructions for 32 elements; per element there is no rescale and no branch. A -inf
// logit has e = 0 and its a = -inf is clamped before the product (no inf * 0); a thread that has
// seen nothing but -inf keeps m = -inf (the step then works against 0, so that nothing is NaN).
//
// Layout. One block of 256 threads per row; each thread reads 4 independent 16-byte vectors per
// step (coalesced: consecutive threads read consecutive vectors), so several loads are in flight
// before the first exp. The thread states are merged with warp shuffles, then across the 8 warps
// through shared memory, in a fixed tree: the result is deterministic. Which thread folds which
// column depends on the column index only, never on the row's address, so a view and its
// contiguous copy give bitwise the same results; a row that does not start on a 16-byte boundary
// (an odd vocabulary such as 50257) reads the same vectors element by element.
//
// Split-V. With few rows and a very large vocabulary (8 rows of 262144) one block per row leaves
// most SMs idle, so a row may be cut into `splits` slices, one block each; every block writes its
// partial state (m, r, t, r2, sum y, argmax) to a workspace slot of its own, and a second tiny
// kernel (in this file: it is the second half of the same reduction) merges the slots of a row in
// slice order. No atomics: the result does not depend on which block finishes first.
//
// A row whose label is ignore_index is never read; all its outputs are 0. A scored row with no
// finite logit (all -inf) has no distribution: its log-prob, lse, entropy and log sum p^2 are NaN
// (its mean logit -inf), and a NaN logit makes its row's statistics NaN. Offsets are 64-bit. The
// approximate 2^x and 1/x (token_stats_common.cuh) are used in the per-element work only, on
// arguments whose error they bound at ~2^-22 relative; log1pf and the final divisions stay
// IEEE-accurate (no --use_fast_math).
#include <cfloat>
#include <climits>
#include <type_traits>

#include "token_stats_common.cuh"

namespace prefopt {
namespace {

// Which statistics a kernel instance accumulates beyond (m, r): each extra costs ALU per element,
// and the plain log-prob pass (DPO training) must stay at the memory roofline.
enum StatsLevel { kLogpOnly = 0, kWithEntropy = 1, kAllStats = 2 };

constexpr float kLog2E = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Relative to the maximum m of y (the logits before the factor k; see the top of the file).
struct State {
  float m;       // running maximum of y (-inf: nothing with probability mass seen yet)
  float r;       // s - 1, s = sum_j 2^((y_j - m) s): the maximum's own 1 kept out
  float t;       // sum_j 2^((y_j - m) s) (y_j - m) s, in log2 units
  float r2;      // s2 - 1, s2 = sum_j 4^((y_j - m) s)
  float y_sum;   // sum_j y_j
  int argmax;    // first column with y_j = m
};

// One split-V slice's result; label_y is only meaningful in slice 0, which reads it.
struct Partial {
  State state;
  float label_y;
  int unused;
};

struct ForwardParams {
  const void* logits;
  const void* labels;
  int64_t rows;
  int64_t inner;
  int64_t stride_outer;
  int64_t stride_inner;
  int64_t ignore_index;
  int vocab_size;
  int labels_are_int64;
  float inv_temperature;
  float softcap;
  float z_scale;     // k: z = k y
  float scale2;      // s = k log2(e)
  float tanh_scale;  // 2 log2(e) / c (softcap only)
  float* logps;
  float* lse;
  float* lse_residual;
  float* entropy;
  float* mean_logits;
  float* log_sum_sq_probs;
  uint8_t* is_top1;
  Partial* partials;
  int splits;
};

__device__ __forceinline__ State empty_state() { return {-INFINITY, 0.f, 0.f, 0.f, 0.f, INT_MAX}; }

// y = x or tanh(x / c): the same code for the streamed elements and the label, so that the
// label's y is bitwise one of the row's.
template <bool kSoftcap>
__device__ __forceinline__ float transform_y(float x, float tanh_scale) {
  if constexpr (kSoftcap) return softcap_tanh(x, tanh_scale);
  return x;
}

// Fold K values y into the state (see the top of the file). Element j sits at column
// first_column + (j / kVector) * kVectorStep + j % kVector, and columns grow with j, so "first
// index reaching the maximum" is found by scanning j.
// The step's maximum max(m, y_j) (NaN is skipped: m is never NaN).
template <int K>
__device__ __forceinline__ float step_max(float m, const float (&y)[K]) {
#pragma unroll
  for (int j = 0; j < K; ++j) m = fmaxf(m, y[j]);
  return m;
}

// The maximum of the bf16 pairs of `words` as a pair (max.bf16x2: one instruction per two
// elements; exact, and a NaN is skipped as fmaxf skips it).
__device__ __forceinline__ uint32_t bf16x2_max(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  uint32_t out;
  asm("max.bf16x2 %0, %1, %2;" : "=r"(out) : "r"(a), "r"(b));
  return out;
#else
  const uint32_t lo = float_bits(fmaxf(bits_float(a << 16), bits_float(b << 16))) >> 16;
  const uint32_t hi = float_bits(fmaxf(bits_float(a & 0xffff0000u), bits_float(b & 0xffff0000u))) & 0xffff0000u;
  return hi | lo;
#endif
}

template <int kVector, int kVectors>
__device__ __forceinline__ float step_max_bf16(float m, const Vector<__nv_bfloat16> (&in)[kVectors]) {
  uint32_t words[kVectors * 4];
  memcpy(words, in, sizeof(words));
  uint32_t pair = words[0];
#pragma unroll
  for (int w = 1; w < kVectors * 4; ++w) pair = bf16x2_max(pair, words[w]);
  return fmaxf(m, fmaxf(bits_float(pair << 16), bits_float(pair & 0xffff0000u)));
}

// top = max(m, y_j), from step_max or an equivalent.
template <int kStats, int kVector, int kVectorStep, int K>
__device__ __forceinline__ void absorb(State& s, const float (&y)[K], float top, int first_column, float scale) {
  // Nothing but -inf (and NaN) so far: work against 0, where every a_j is -inf (or NaN) and no
  // element counts as a maximum.
  const float pivot = top > -INFINITY ? top : 0.f;
  const float mu = pivot * scale;
  float r = 0.f, t = 0.f, r2 = 0.f, ones = 0.f, y_sum = 0.f;
  int best = 0;
  // Last element first, so that the first column at the maximum is the one left in `best`.
#pragma unroll
  for (int j = K - 1; j >= 0; --j) {
    const float a = fmaf(y[j], scale, -mu);  // (y_j - M) s + eps, rounded once
    const float e = fast_exp2(a);
    if (y[j] >= pivot) {
      ones += 1.f;
      if constexpr (kStats == kAllStats) best = (j / kVector) * kVectorStep + j % kVector;
    } else {  // also NaN, which poisons r
      r += e;
      // a -inf logit: e = 0, and its a clamped so that the product is 0, not NaN.
      if constexpr (kStats >= kWithEntropy) t = fmaf(fmaxf(a, -FLT_MAX), e, t);
      if constexpr (kStats == kAllStats) r2 = fmaf(e, e, r2);
    }
    if constexpr (kStats == kAllStats) y_sum += y[j];  // -inf logits make the mean -inf
  }

  // The step's sums brought from mu to the maximum: a_j - eps = (y_j - M) s.
  const float eps = fmaf(pivot, scale, -mu);
  const float unscale = fast_exp2(-eps);
  // Strictly greater raised the maximum: on ties an earlier step keeps the argmax.
  const bool raised = top > s.m;
  // (m - M) s <= 0: 0 when not raised; clamped so that an empty state (m = -inf: 1 + r = 1,
  // c = 0) gives 0 * finite, and so that the product with 1 + r cannot overflow.
  const float shift = fmaxf((s.m - top) * scale, -1e20f);
  const float c = fast_exp2(shift);
  const float old_s = 1.f + s.r;
  // The elements at the maximum add exactly 1 each, last, except the implicit 1 of s.
  const float extra = raised ? ones - 1.f : ones;
  s.r = ((raised ? c * old_s : s.r) + r * unscale) + extra;
  if constexpr (kStats >= kWithEntropy) s.t = c * fmaf(shift, old_s, s.t) + (t - eps * r) * unscale;
  if constexpr (kStats == kAllStats) {
    s.r2 = ((raised ? c * c * (1.f + s.r2) : s.r2) + r2 * (unscale * unscale)) + extra;
    s.y_sum += y_sum;
    s.argmax = raised ? first_column + best : s.argmax;
  }
  s.m = top;
}

// The state of the union of two disjoint sets of columns: the one with the larger maximum keeps
// its sums, the other is rescaled by a = 2^((m_lo - m_hi) s) (its whole s, its own 1 included).
// Deterministic for a fixed (x, y) order; ties of the maximum take the smaller column.
template <int kStats>
__device__ __forceinline__ State merge(const State& x, const State& y, float scale) {
  const bool y_higher = y.m > x.m;
  const float hi_m = y_higher ? y.m : x.m;
  const float lo_m = y_higher ? x.m : y.m;
  const float hi_r = y_higher ? y.r : x.r;
  const float lo_r = y_higher ? x.r : y.r;
  State out;
  out.m = hi_m;
  out.t = 0.f;
  out.r2 = 0.f;
  out.y_sum = 0.f;
  out.argmax = INT_MAX;
  if constexpr (kStats == kAllStats) {
    out.y_sum = x.y_sum + y.y_sum;
    out.argmax = x.m == y.m ? min(x.argmax, y.argmax) : (y_higher ? y.argmax : x.argmax);
  }
  const float hi_t = y_higher ? y.t : x.t;
  const float lo_t = y_higher ? x.t : y.t;
  const float hi_r2 = y_higher ? y.r2 : x.r2;
  const float lo_r2 = y_higher ? x.r2 : y.r2;
  if (lo_m == -INFINITY) {  // the lower one holds no probability mass (or neither does)
    out.r = hi_r;
    if constexpr (kStats >= kWithEntropy) out.t = hi_t;
    if constexpr (kStats == kAllStats) out.r2 = hi_r2;
    return out;
  }
  const float shift = (lo_m - hi_m) * scale;  // <= 0, in log2 units
  const float a = lo_m == hi_m ? 1.f : exp2f(shift);
  const float lo_s = 1.f + lo_r;
  out.r = hi_r + a * lo_s;
  if constexpr (kStats >= kWithEntropy) out.t = hi_t + a * (lo_t + lo_s * shift);
  if constexpr (kStats == kAllStats) out.r2 = hi_r2 + a * a * (1.f + lo_r2);
  return out;
}

template <int kStats>
__device__ __forceinline__ State shuffle_down(const State& s, int offset) {
  constexpr unsigned kAll = 0xffffffffu;
  State out = empty_state();
  out.m = __shfl_down_sync(kAll, s.m, offset);
  out.r = __shfl_down_sync(kAll, s.r, offset);
  if constexpr (kStats >= kWithEntropy) out.t = __shfl_down_sync(kAll, s.t, offset);
  if constexpr (kStats == kAllStats) {
    out.r2 = __shfl_down_sync(kAll, s.r2, offset);
    out.y_sum = __shfl_down_sync(kAll, s.y_sum, offset);
    out.argmax = __shfl_down_sync(kAll, s.argmax, offset);
  }
  return out;
}

// Merge the 256 thread states: a shuffle tree inside each warp, then the 8 warp results in warp
// 0. The result is valid in thread 0.
template <int kStats>
__device__ __forceinline__ State block_reduce(State s, float scale) {
  __shared__ State warp_states[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s = merge<kStats>(s, shuffle_down<kStats>(s, offset), scale);
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? warp_states[lane] : empty_state();
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      s = merge<kStats>(s, shuffle_down<kStats>(s, offset), scale);
    }
  }
  return s;
}

__device__ __forceinline__ void write_ignored(const ForwardParams& p, int64_t row) {
  p.logps[row] = 0.f;
  p.lse[row] = 0.f;
  if (p.lse_residual) p.lse_residual[row] = 0.f;
  if (p.entropy) p.entropy[row] = 0.f;
  if (p.mean_logits) p.mean_logits[row] = 0.f;
  if (p.log_sum_sq_probs) p.log_sum_sq_probs[row] = 0.f;
  if (p.is_top1) p.is_top1[row] = 0;
}

__device__ __forceinline__ void finalize(const ForwardParams& p, int64_t row, int64_t label, const State& s,
                                         float label_y) {
  // log s = log(1 + r), exact for tiny r. A row with no finite logit (m = -inf) has no
  // distribution: log s = NaN makes its log-prob, lse, entropy and log sum p^2 NaN, where
  // fminf(NaN, 0) = 0 would have read as probability 1 (the same answer as every backend).
  const float log_s = s.m == -INFINITY ? NAN : log1pf(s.r);
  // y_l - m is exact where it matters (Sterbenz) and is scaled once. log1p(r) >= 0 and y_l <= m
  // make every log-prob <= 0 by construction; the fminf keeps it so in any case.
  p.logps[row] = fminf((label_y - s.m) * p.z_scale, 0.f) - log_s;
  // z_max rounded as the backward rounds z_j (c tanh, then 1 / T), so that its z_j - lse agrees.
  const float m_z = (p.softcap > 0.f ? p.softcap * s.m : s.m) * p.inv_temperature;
  const float2 lse = lse_and_residual(m_z, log_s);
  p.lse[row] = lse.x;
  if (p.lse_residual) p.lse_residual[row] = lse.y;
  if (p.entropy) p.entropy[row] = log_s - kLn2 * s.t / (1.f + s.r);
  if (p.log_sum_sq_probs) p.log_sum_sq_probs[row] = log1pf(s.r2) - 2.f * log_s;
  if (p.mean_logits) p.mean_logits[row] = s.y_sum * p.z_scale / static_cast<float>(p.vocab_size);
  if (p.is_top1) p.is_top1[row] = s.argmax == label;
}

template <typename T, bool kSoftcap>
__device__ __forceinline__ float label_value(const ForwardParams& p, const T* row_logits, int64_t label) {
  // Labels were validated before launch; the bounds test only keeps a bad one from reading
  // outside the row.
  if (label < 0 || label >= p.vocab_size) return 0.f;
  return transform_y<kSoftcap>(load_scalar(row_logits + label), p.tanh_scale);
}

// The kVector elements of column vector `index`: one 16-byte streaming load on an aligned row,
// kVector scalar loads (through L1, which serves the neighbouring ones) otherwise.
template <typename T, bool kAligned>
__device__ __forceinline__ Vector<T> load_columns(const T* columns) {
  if constexpr (kAligned) {
    return load_vector(columns);
  } else {
    Vector<T> out;
#pragma unroll
    for (int e = 0; e < Element<T>::kVector; ++e) out.v[e] = columns[e];
    return out;
  }
}

// Fold column vectors [begin, end) of a row into this thread's state: steps of kUnroll vectors
// (all loads issued before the first is used), then the remaining single vectors.
template <typename T, int kStats, bool kSoftcap, bool kAligned>
__device__ __forceinline__ void fold_vectors(State& s, const ForwardParams& p, const T* x, int begin, int end) {
  constexpr int kVector = Element<T>::kVector;
  constexpr int kStep = kUnroll * kThreads;  // vectors per block step
  const int tid = threadIdx.x;
  const float scale = p.scale2;
  const float tanh_scale = p.tanh_scale;
  int v = begin;
  // A running pointer: the kUnroll vectors of a step are immediate offsets from it.
  const T* columns = x + static_cast<int64_t>(begin + tid) * kVector;
#pragma unroll 1
  for (; v + kStep <= end; v += kStep, columns += kStep * kVector) {
    Vector<T> in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) in[u] = load_columns<T, kAligned>(columns + u * kThreads * kVector);
    float y[kUnroll * kVector];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float x_u[kVector];
      vector_to_floats(in[u], x_u);
#pragma unroll
      for (int e = 0; e < kVector; ++e) y[u * kVector + e] = transform_y<kSoftcap>(x_u[e], tanh_scale);
    }
    // bf16 logits without a softcap: the maximum of the raw pairs, y = x.
    float top;
    if constexpr (std::is_same_v<T, __nv_bfloat16> && !kSoftcap) {
      top = step_max_bf16<kVector>(s.m, in);
    } else {
      top = step_max(s.m, y);
    }
    absorb<kStats, kVector, kThreads * kVector>(s, y, top, (v + tid) * kVector, scale);
  }
#pragma unroll 1
  for (int w = v + tid; w < end; w += kThreads) {
    const Vector<T> in = load_columns<T, kAligned>(x + static_cast<int64_t>(w) * kVector);
    float y[kVector];
    vector_to_floats(in, y);
#pragma unroll
    for (int e = 0; e < kVector; ++e) y[e] = transform_y<kSoftcap>(y[e], tanh_scale);
    absorb<kStats, kVector, 0>(s, y, step_max(s.m, y), w * kVector, scale);
  }
}

template <typename T, int kStats, bool kSoftcap>
__global__ void __launch_bounds__(kThreads, kResidentBlocksPerSm) token_stats_forward_kernel(const ForwardParams p) {
  constexpr int kVector = Element<T>::kVector;
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int tid = threadIdx.x;

  const int64_t label = load_label(p.labels, p.labels_are_int64, row);
  if (label == p.ignore_index) {
    // Prompt tokens cost nothing: the row is not read. Split rows get their zeros from the
    // combine step.
    if (p.splits == 1 && tid == 0) write_ignored(p, row);
    return;
  }

  const T* x = row_address<T>(p.logits, row, p.inner, p.stride_outer, p.stride_inner);
  // Columns are dealt to threads by their index alone, vector by vector (columns
  // [v kVector, (v + 1) kVector) to one thread), whatever the row's address: so the summation
  // order, and the result bit for bit, do not depend on where a row lies (a view and its
  // contiguous copy agree exactly). A 16-byte aligned row (any vocabulary that is a multiple of
  // 8 bf16 / 4 fp32 elements, views such as logits[:, :-1] included) loads each vector with one
  // 16-byte load; another row (an odd vocabulary such as 50257) loads the same elements one by
  // one, which L1 turns into the same memory traffic.
  const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
  const int vectors = p.vocab_size / kVector;
  const int per_split = (vectors + p.splits - 1) / p.splits;
  const int begin = min(vectors, split * per_split);
  const int end = min(vectors, begin + per_split);

  State s = empty_state();
  if (aligned) {
    fold_vectors<T, kStats, kSoftcap, true>(s, p, x, begin, end);
  } else {
    fold_vectors<T, kStats, kSoftcap, false>(s, p, x, begin, end);
  }
  // The last slice also takes the < kVector columns after the last whole vector; each thread
  // still sees its columns in increasing order.
  if (split == p.splits - 1) {
    const int column = vectors * kVector + tid;
    if (column < p.vocab_size) {
      const float y[1] = {transform_y<kSoftcap>(load_scalar(x + column), p.tanh_scale)};
      absorb<kStats, 1, 0>(s, y, step_max(s.m, y), column, p.scale2);
    }
  }

  s = block_reduce<kStats>(s, p.scale2);
  if (tid == 0) {
    const float label_y = split == 0 ? label_value<T, kSoftcap>(p, x, label) : 0.f;
    if (p.splits == 1) {
      finalize(p, row, label, s, label_y);
    } else {
      p.partials[row * p.splits + split] = {s, label_y, 0};
    }
  }
}

// Split-V, second step: one thread per row merges its slices in slice order.
__global__ void __launch_bounds__(kThreads) token_stats_combine_kernel(const ForwardParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= p.rows) return;
  const int64_t label = load_label(p.labels, p.labels_are_int64, row);
  if (label == p.ignore_index) {
    write_ignored(p, row);
    return;
  }
  const Partial* slices = p.partials + row * p.splits;
  State s = slices[0].state;
  for (int k = 1; k < p.splits; ++k) s = merge<kAllStats>(s, slices[k].state, p.scale2);
  finalize(p, row, label, s, slices[0].label_y);
}

template <typename T, int kStats>
void launch_forward(const ForwardParams& p, bool softcap, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(p.splits));
  const auto kernel = softcap ? &token_stats_forward_kernel<T, kStats, true> : &token_stats_forward_kernel<T, kStats, false>;
  PREFOPT_LAUNCH(kernel, grid, kThreads, stream, p);
}

template <typename T>
void launch_forward(const ForwardParams& p, int stats, bool softcap, cudaStream_t stream) {
  switch (stats) {
    case kLogpOnly: launch_forward<T, kLogpOnly>(p, softcap, stream); break;
    case kWithEntropy: launch_forward<T, kWithEntropy>(p, softcap, stream); break;
    default: launch_forward<T, kAllStats>(p, softcap, stream); break;
  }
}

int vector_width(int dtype) {
  switch (dtype) {
    case PREFOPT_FLOAT32: return Element<float>::kVector;
    case PREFOPT_FLOAT16: return Element<__half>::kVector;
    case PREFOPT_BFLOAT16: return Element<__nv_bfloat16>::kVector;
    case PREFOPT_FLOAT64: return Element<double>::kVector;
    default: return 0;
  }
}

// A slice should be worth a block: at least one full step (4 vectors) of every thread.
constexpr int64_t kMinVectorsPerSplit = static_cast<int64_t>(kUnroll) * kThreads;

}  // namespace
}  // namespace prefopt

using namespace prefopt;

extern "C" int prefopt_token_stats_forward_splits(int64_t rows, int64_t vocab_size, int dtype, int multiprocessors) {
  const int width = vector_width(dtype);
  if (rows <= 0 || vocab_size <= 0 || multiprocessors <= 0 || width == 0) return 1;
  // Choose the fewest slices per row whose blocks fill the last wave of the GPU to >= 90%
  // (rows x splits blocks over multiprocessors x resident slots), within the most slices a row
  // can feed at one full step each. With thousands of rows that is 1: split-V only changes the
  // layout of a few long rows.
  const int64_t slots = static_cast<int64_t>(multiprocessors) * kResidentBlocksPerSm;
  int64_t most = (vocab_size / width) / kMinVectorsPerSplit;
  if (most > PREFOPT_MAX_FORWARD_SPLITS) most = PREFOPT_MAX_FORWARD_SPLITS;
  if (most < 1) most = 1;
  int best = 1;
  double best_fill = 0.0;
  for (int64_t splits = 1; splits <= most; ++splits) {
    const int64_t blocks = rows * splits;
    const int64_t waves = (blocks + slots - 1) / slots;
    const double fill = static_cast<double>(blocks) / static_cast<double>(waves * slots);
    if (fill >= 0.9) return static_cast<int>(splits);
    if (fill > best_fill + 1e-9) {
      best_fill = fill;
      best = static_cast<int>(splits);
    }
  }
  return best;
}

extern "C" size_t prefopt_token_stats_forward_workspace_bytes(int64_t rows, int splits) {
  if (rows <= 0 || splits <= 1) return 0;
  return static_cast<size_t>(rows) * static_cast<size_t>(splits) * sizeof(Partial);
}

extern "C" cudaError_t prefopt_token_stats_forward(
    const void* logits, int dtype, int64_t outer, int64_t inner, int64_t vocab_size,
    int64_t stride_outer, int64_t stride_inner,
    const void* labels, int labels_are_int64, int64_t ignore_index,
    float inv_temperature, float softcap,
    float* logps, float* lse, float* lse_residual, float* entropy, float* mean_logits,
    float* log_sum_sq_probs, uint8_t* is_top1,
    void* workspace, int splits, cudaStream_t stream) {
  // Argument errors are reported before anything is launched (and without touching the device).
  if (vector_width(dtype) == 0 || outer < 0 || inner < 0 || vocab_size < 1 || vocab_size > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  if (!(inv_temperature > 0.f) || !(softcap >= 0.f)) return cudaErrorInvalidValue;
  const int64_t rows = outer * inner;
  if (rows == 0) return cudaSuccess;
  if (rows > INT_MAX || logits == nullptr || labels == nullptr || logps == nullptr || lse == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (splits < 1 || splits > PREFOPT_MAX_FORWARD_SPLITS || (splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  ForwardParams p;
  p.logits = logits;
  p.labels = labels;
  p.rows = rows;
  p.inner = inner;
  p.stride_outer = stride_outer;
  p.stride_inner = stride_inner;
  p.ignore_index = ignore_index;
  p.vocab_size = static_cast<int>(vocab_size);
  p.labels_are_int64 = labels_are_int64 ? 1 : 0;
  p.inv_temperature = inv_temperature;
  p.softcap = softcap;
  // z = k y: y = x, k = 1 / T without a softcap; y = tanh(x / c), k = c / T with one.
  p.z_scale = (softcap > 0.f ? softcap : 1.f) * inv_temperature;
  p.scale2 = p.z_scale * kLog2E;
  p.tanh_scale = softcap > 0.f ? 2.f * kLog2E / softcap : 0.f;
  p.logps = logps;
  p.lse = lse;
  p.lse_residual = lse_residual;
  p.entropy = entropy;
  p.mean_logits = mean_logits;
  p.log_sum_sq_probs = log_sum_sq_probs;
  p.is_top1 = is_top1;
  p.partials = static_cast<Partial*>(workspace);
  p.splits = splits;

  const int stats = (mean_logits || log_sum_sq_probs || is_top1) ? kAllStats : entropy ? kWithEntropy : kLogpOnly;
  const bool with_softcap = softcap > 0.f;
  switch (dtype) {
    case PREFOPT_FLOAT32: launch_forward<float>(p, stats, with_softcap, stream); break;
    case PREFOPT_FLOAT16: launch_forward<__half>(p, stats, with_softcap, stream); break;
    case PREFOPT_BFLOAT16: launch_forward<__nv_bfloat16>(p, stats, with_softcap, stream); break;
    default: launch_forward<double>(p, stats, with_softcap, stream); break;
  }
  if (splits > 1) {
    const unsigned blocks = static_cast<unsigned>((rows + kThreads - 1) / kThreads);
    PREFOPT_LAUNCH(token_stats_combine_kernel, blocks, kThreads, stream, p);
  }
  return cudaGetLastError();
}
