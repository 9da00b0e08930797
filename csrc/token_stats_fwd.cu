// Forward: per-token log-probability of the label, and optional softmax statistics, in one pass
// over the logits (the CUDA twin of kernels/token_stats_fwd.py; the results must agree).
//
// For a row of transformed logits z (z = softcap(x) / T) and its label y, each thread folds the
// elements it reads into a running state relative to its running maximum m:
//
//     s  = sum_j exp(z_j - m) = 1 + r                 lse     = m + log1p(r)
//     t  = sum_j exp(z_j - m) (z_j - m)               entropy = log1p(r) - t / s
//     s2 = sum_j exp(z_j - m)^2 = 1 + r2              log sum_j p_j^2 = log1p(r2) - 2 log1p(r)
//     log p_y = (z_y - m) - log1p(r)                  mean logit = sum_j z_j / V
//     is_top1 = (first argmax_j z_j) == y
//
// The maximum's own term exp(0) = 1 is kept out of r and r2: on a peaked row (p_max ~ 1) r is
// tiny, 1 + r in float32 would lose it, and with it the relative precision of log p, the entropy
// and log sum p^2. So the elements equal to the new maximum are counted, not summed: one of them
// is the implicit 1, the others add exactly 1 each. When a chunk raises the maximum from m to m',
// earlier sums are rescaled by a = exp(m - m'):  s <- a s,  s2 <- a^2 s2,  and
// t <- a (t + s (m - m')) because every earlier z_j - m shifts by m - m'.
//
// Layout. One block of 256 threads per row; each thread reads 4 independent 16-byte vectors per
// step (coalesced: consecutive threads read consecutive vectors), so several loads are in flight
// before the first exp. A thread folds a whole step (32 bf16 elements) at once: one maximum,
// independent exps, at most one rescale. The thread states are merged with warp shuffles, then
// across the 8 warps through shared memory, in a fixed tree: the result is deterministic. Which
// thread folds which column depends on the column index only, never on the row's address, so a
// view and its contiguous copy give bitwise the same results; a row that does not start on a
// 16-byte boundary (an odd vocabulary such as 50257) reads the same vectors element by element.
//
// Split-V. With few rows and a very large vocabulary (8 rows of 262144) one block per row leaves
// most SMs idle, so a row may be cut into `splits` slices, one block each; every block writes its
// partial state (m, r, t, r2, sum z, argmax) to a workspace slot of its own, and a second tiny
// kernel (in this file: it is the second half of the same reduction) merges the slots of a row in
// slice order. No atomics: the result does not depend on which block finishes first.
//
// A row whose label is ignore_index is never read; all its outputs are 0. Offsets are 64-bit.
// __expf is used on purpose, and only on arguments <= 0 (z - m, never z itself): its error is
// relative ~2 ulp plus |z - m| * 2^-24 for the terms that matter (|z - m| small), far inside the
// 1e-5 tolerance; log1pf, tanhf and the divisions stay IEEE-accurate (no --use_fast_math).
#include <climits>

#include "token_stats_common.cuh"

namespace prefopt {
namespace {

// Which statistics a kernel instance accumulates beyond (m, r): each extra costs ALU per element,
// and the plain log-prob pass (DPO training) must stay at the memory roofline.
enum StatsLevel { kLogpOnly = 0, kWithEntropy = 1, kAllStats = 2 };

struct State {
  float m;       // running maximum of z (-inf: nothing with probability mass seen yet)
  float r;       // s - 1, s = sum_j exp(z_j - m): the maximum's own exp(0) = 1 kept out
  float t;       // sum_j exp(z_j - m) (z_j - m)
  float r2;      // s2 - 1, s2 = sum_j exp(z_j - m)^2
  float z_sum;   // sum_j z_j
  int argmax;    // first column with z_j = m
};

// One split-V slice's result; label_z is only meaningful in slice 0, which reads it.
struct Partial {
  State state;
  float label_z;
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
  float inv_softcap;
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

// Fold K transformed logits into the state. Element j sits at column
// first_column + (j / kVector) * vector_step + j % kVector, and columns grow with j, so "first
// index reaching the maximum" is found by scanning j.
template <int kStats, int kVector, int K>
__device__ __forceinline__ void absorb(State& s, const float (&z)[K], int first_column, int vector_step) {
  float chunk_max = z[0];
#pragma unroll
  for (int j = 1; j < K; ++j) chunk_max = fmaxf(chunk_max, z[j]);
  if constexpr (kStats == kAllStats) {
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) sum += z[j];
    s.z_sum += sum;  // -inf logits make the mean -inf, as they should
  }
  const float m = fmaxf(s.m, chunk_max);
  if (m == -INFINITY) return;  // only -inf logits so far: no probability mass to add

  // Rescale first (while z is still whole, for the argmax), so that each z[j] dies as soon as
  // its exp is taken below.
  const bool raised = chunk_max > s.m;
  if (raised) {
    const float a = __expf(s.m - m);  // 0 when nothing was seen before (s.m = -inf)
    const float s_old = 1.f + s.r;
    if constexpr (kStats >= kWithEntropy) s.t = s.m == -INFINITY ? 0.f : a * (s.t + s_old * (s.m - m));
    if constexpr (kStats == kAllStats) {
      s.r2 = a * a * (1.f + s.r2);
      // Strictly greater raised the maximum: on ties an earlier chunk keeps the argmax, and
      // within the chunk the earliest column reaching it wins.
      int first = K - 1;
#pragma unroll
      for (int j = K - 1; j >= 0; --j) first = z[j] == chunk_max ? j : first;
      s.argmax = first_column + (first / kVector) * vector_step + first % kVector;
    }
    s.r = a * s_old;
    s.m = m;
  }

  float r = 0.f, t = 0.f, r2 = 0.f;
  int at_max = 0;
#pragma unroll
  for (int j = 0; j < K; ++j) {
    const float d = z[j] - m;  // <= 0; -inf for a masked (-inf) logit
    const bool is_max = d == 0.f;
    const float e = is_max ? 0.f : __expf(d);
    at_max += is_max;
    r += e;
    // Select, not multiply: a -inf logit has e = 0 and d = -inf.
    if constexpr (kStats >= kWithEntropy) t += e > 0.f ? e * d : 0.f;
    if constexpr (kStats == kAllStats) r2 += e * e;
  }
  // Elements at the maximum add exactly 1 each, except the one that is the implicit 1 of s.
  const float extra = static_cast<float>(at_max - (raised ? 1 : 0));
  s.r += r + extra;
  if constexpr (kStats >= kWithEntropy) s.t += t;
  if constexpr (kStats == kAllStats) s.r2 += r2 + extra;
}

// The state of the union of two disjoint sets of columns: the one with the larger maximum keeps
// its sums, the other is rescaled by a = exp(m_lo - m_hi) (its whole s, its own 1 included).
// Deterministic for a fixed (x, y) order; ties of the maximum take the smaller column.
template <int kStats>
__device__ __forceinline__ State merge(const State& x, const State& y) {
  const bool y_higher = y.m > x.m;
  const float hi_m = y_higher ? y.m : x.m;
  const float lo_m = y_higher ? x.m : y.m;
  const float hi_r = y_higher ? y.r : x.r;
  const float lo_r = y_higher ? x.r : y.r;
  State out;
  out.m = hi_m;
  out.t = 0.f;
  out.r2 = 0.f;
  out.z_sum = 0.f;
  out.argmax = INT_MAX;
  if constexpr (kStats == kAllStats) {
    out.z_sum = x.z_sum + y.z_sum;
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
  const float a = lo_m == hi_m ? 1.f : __expf(lo_m - hi_m);
  const float lo_s = 1.f + lo_r;
  out.r = hi_r + a * lo_s;
  if constexpr (kStats >= kWithEntropy) out.t = hi_t + a * (lo_t + lo_s * (lo_m - hi_m));
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
    out.z_sum = __shfl_down_sync(kAll, s.z_sum, offset);
    out.argmax = __shfl_down_sync(kAll, s.argmax, offset);
  }
  return out;
}

// Merge the 256 thread states: a shuffle tree inside each warp, then the 8 warp results in warp
// 0. The result is valid in thread 0.
template <int kStats>
__device__ __forceinline__ State block_reduce(State s) {
  __shared__ State warp_states[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s = merge<kStats>(s, shuffle_down<kStats>(s, offset));
  if (lane == 0) warp_states[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? warp_states[lane] : empty_state();
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) s = merge<kStats>(s, shuffle_down<kStats>(s, offset));
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
                                         float label_z) {
  // log s = log(1 + r), exact for tiny r. A row with no finite logit (m = -inf) has no
  // distribution: log s = NaN makes its log-prob, lse, entropy and log sum p^2 NaN, where
  // fminf(NaN, 0) = 0 would have read as probability 1 (the same answer as every backend).
  const float log_s = s.m == -INFINITY ? NAN : log1pf(s.r);
  // log1p(r) >= 0 and z_y <= m make every log-prob <= 0 by construction; the fminf keeps it so
  // even if the label's z were a last ulp above the maximum.
  p.logps[row] = fminf(label_z - s.m, 0.f) - log_s;
  const float2 lse = lse_and_residual(s.m, log_s);
  p.lse[row] = lse.x;
  if (p.lse_residual) p.lse_residual[row] = lse.y;
  if (p.entropy) p.entropy[row] = log_s - s.t / (1.f + s.r);
  if (p.log_sum_sq_probs) p.log_sum_sq_probs[row] = log1pf(s.r2) - 2.f * log_s;
  if (p.mean_logits) p.mean_logits[row] = s.z_sum / static_cast<float>(p.vocab_size);
  if (p.is_top1) p.is_top1[row] = s.argmax == label;
}

template <typename T, bool kSoftcap>
__device__ __forceinline__ float label_logit(const ForwardParams& p, const T* row_logits, int64_t label) {
  // Labels were validated before launch; the bounds test only keeps a bad one from reading
  // outside the row.
  if (label < 0 || label >= p.vocab_size) return 0.f;
  return transform_logit<kSoftcap>(load_scalar(row_logits + label), p.inv_temperature, p.softcap, p.inv_softcap);
}

// The kVector elements of column vector `index`: one 16-byte streaming load on an aligned row,
// kVector scalar loads (through L1, which serves the neighbouring ones) otherwise.
template <typename T, bool kAligned>
__device__ __forceinline__ Vector<T> load_columns(const T* row, int index) {
  constexpr int kVector = Element<T>::kVector;
  if constexpr (kAligned) {
    return load_vector(row + static_cast<int64_t>(index) * kVector);
  } else {
    Vector<T> out;
#pragma unroll
    for (int e = 0; e < kVector; ++e) out.v[e] = row[static_cast<int64_t>(index) * kVector + e];
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
  auto z_of = [&](float value) {
    return transform_logit<kSoftcap>(value, p.inv_temperature, p.softcap, p.inv_softcap);
  };
  int v = begin;
#pragma unroll 1
  for (; v + kStep <= end; v += kStep) {
    Vector<T> in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) in[u] = load_columns<T, kAligned>(x, v + u * kThreads + tid);
    float z[kUnroll * kVector];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int e = 0; e < kVector; ++e) z[u * kVector + e] = z_of(Element<T>::to_float(in[u].v[e]));
    }
    absorb<kStats, kVector>(s, z, (v + tid) * kVector, kThreads * kVector);
  }
#pragma unroll 1
  for (int w = v + tid; w < end; w += kThreads) {
    const Vector<T> in = load_columns<T, kAligned>(x, w);
    float z[kVector];
#pragma unroll
    for (int e = 0; e < kVector; ++e) z[e] = z_of(Element<T>::to_float(in.v[e]));
    absorb<kStats, kVector>(s, z, w * kVector, 0);
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
      const float z[1] = {transform_logit<kSoftcap>(load_scalar(x + column), p.inv_temperature, p.softcap,
                                                    p.inv_softcap)};
      absorb<kStats, 1>(s, z, column, 0);
    }
  }

  s = block_reduce<kStats>(s);
  if (tid == 0) {
    const float label_z = split == 0 ? label_logit<T, kSoftcap>(p, x, label) : 0.f;
    if (p.splits == 1) {
      finalize(p, row, label, s, label_z);
    } else {
      p.partials[row * p.splits + split] = {s, label_z, 0};
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
  for (int k = 1; k < p.splits; ++k) s = merge<kAllStats>(s, slices[k].state);
  finalize(p, row, label, s, slices[0].label_z);
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
  p.inv_softcap = softcap > 0.f ? 1.f / softcap : 0.f;
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
