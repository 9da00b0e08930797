// Backward: the gradient of the per-token outputs with respect to the raw logits, written once
// (the CUDA twin of prefopt/kernels/token_stats_bwd.py; the results must agree).
//
// With p = softmax(z), the saved lse (so log p_j = z_j - lse), and the upstream gradients
// g (log p_y), g_H (entropy H), g_mu (mean logit), g_S (log S, S = sum p^2):
//
//     d log p_y / dz_j      = 1[j = y] - p_j
//     d H / dz_j            = -p_j (log p_j + H)
//     d mean / dz_j         = 1 / V
//     d log S / dz_j        = 2 p_j^2 / S - 2 p_j
//
// Collected by powers of p_j, with per-row coefficients computed once per block:
//
//     dL/dz_j = 1[j = y] g + A + p_j (B + D log p_j + C p_j)
//     A = g_mu / V,   B = -g - g_H H - 2 g_S,   C = 2 g_S / S,   D = -g_H
//
// A term whose gradient is absent is compiled out rather than multiplied by a zero coefficient
// per element: the launcher picks a template level from the gradients given (A + B p_j for the
// log-prob and the mean logit; + D p_j log p_j with the entropy; + C p_j^2 with log S, D then
// zero unless the entropy is given too). Then dx_j = dz_j * dz/dx with
// dz/dx = (1 - tanh^2(x / c)) / T under a softcap, 1 / T without; the 1 / T is folded into the
// coefficients once per row. Per element:
//
//     v = fma(x, 1 / T, -lse)  (z - lse: exact where p_j matters, Sterbenz)
//     u = fma(v, log2 e, -residual log2 e) = log2 p_j      p_j = 2^u (one ex2.approx)
//     dx = fma(p_j, fma(D ln 2, max(u, -256), fma(C, p_j, B)), A)
//
// three FMAs and one MUFU for the log-prob alone, up to five FMAs, one MUFU and one clamp (a
// -inf logit: p_j = 0 times a finite term) with every statistic; with the element's unpacking
// (one instruction for bf16, a shift or a mask) and its share of the pack, the loads, the stores
// and one pointer step, the hot loop is 6 / 8 / 9 SASS instructions per bf16 element at the three
// levels (sm_90, nvcc 13.0). The label's 1[j = y] g is not tested per element: the thread that
// writes the label's column computes that element with A + g in place of A before its loops
// and rewrites it after them. log2(e) multiplies z - lse, never z itself: a scaled z would round
// at the scale of |z|. Under a softcap tanh is prefopt/kernels/token_stats_fwd.py's exp2 + rcp.approx
// form: seven instructions, with 1 - tanh^2 and the product by dz/dx nine more per element.
//
// A launch may cover one tile of columns of each row, [column_offset, column_offset + vocab_size)
// of a softmax over softmax_size columns (the fused linear path, which builds its logits a
// vocabulary tile at a time): labels are columns of the whole row, so the label term lands in the
// tile that holds the label, and A divides by the whole row's size.
//
// Layout: grid (rows, chunks): each block writes one contiguous chunk of one row. Chunks are
// sized so that a few long rows still spread over every SM, and thousands of rows do not pay for
// tiny blocks. 16-byte vector loads and stores when the logits row and the gradient row share
// their offset from a 16-byte boundary (always for the in-place backward; for a fresh gradient of
// a view such as logits[:, :-1] with an odd vocabulary they may not, and that row is done with
// scalar, still coalesced, accesses). In place, every element is read before it is overwritten,
// by the same thread. A row whose label is ignore_index is not read: its gradient is written as
// exact zeros, by a copy of the loops that only stores. Offsets are 64-bit.
#include <climits>

#include "token_stats_common.cuh"

namespace prefopt {
namespace {

constexpr float kLog2E = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct BackwardParams {
  const void* logits;
  void* grad;
  const void* labels;
  int64_t inner;
  int64_t stride_outer;
  int64_t stride_inner;
  int64_t grad_stride_outer;
  int64_t grad_stride_inner;
  int64_t ignore_index;
  int64_t column_offset;  // the first column of the row this launch covers
  float softmax_size;     // columns of the whole row, for A = g_mu / V
  int vocab_size;         // columns this launch covers
  int labels_are_int64;
  int chunks;         // blocks per row (gridDim.y)
  int chunk_vectors;  // 16-byte vectors per chunk; the last chunk also takes the tail
  float inv_temperature;
  float softcap;
  float z_scale;     // c / T with a softcap (z = c tanh(x / c) / T)
  float tanh_scale;  // 2 log2(e) / c

  const float* lse;
  const float* lse_residual;
  const float* entropy;
  const float* log_sum_sq_probs;
  const float* grad_logps;
  const float* grad_entropy;
  const float* grad_mean_logits;
  const float* grad_log_sum_sq_probs;
};

// Which terms of dx_j an instance computes (see the top of the file): a term whose gradient is
// absent is compiled out rather than multiplied by a zero coefficient per element.
//   kLogpTerms: A + B p_j (log-prob, mean logit); kEntropyTerms: + D p_j log p_j;
//   kAllTerms: + C p_j^2 as well (log sum p^2, with or without the entropy's D).
enum GradientTerms { kLogpTerms = 0, kEntropyTerms = 1, kAllTerms = 2 };

// The per-row constants of dx_j, the factor 1 / T folded in (see the top of the file).
struct RowCoefficients {
  float lse, residual2, g, a, b, c, d;
  int label;  // the label's column in this launch's tile, -1 when another tile (or none) holds it
};

// dx_j without the label term; `a` is A, or A + g for the label's column.
template <int kTerms, bool kSoftcap>
__device__ __forceinline__ float logit_gradient(const BackwardParams& p, const RowCoefficients& k, float x,
                                                float a) {
  float v, dz_dx = 1.f;
  if constexpr (kSoftcap) {
    const float th = softcap_tanh(x, p.tanh_scale);
    v = fmaf(th, p.z_scale, -k.lse);
    dz_dx = fmaf(-th, th, 1.f);  // dz/dx = (1 - tanh^2(x / c)) / T, the 1 / T folded
  } else {
    v = fmaf(x, p.inv_temperature, -k.lse);
  }
  // z - lse is exact where p_j matters (Sterbenz) and is scaled to log2 units after the
  // subtraction, never before (a scaled z would round at the scale of |z|); the residual makes
  // it z - m - log s. One ex2.approx: relative error ~2^-22, terms below 2^-126 are 0.
  const float log2_p = fmaf(v, kLog2E, -k.residual2);
  const float prob = fast_exp2(log2_p);
  float q = k.b;
  if constexpr (kTerms == kAllTerms) q = fmaf(k.c, prob, q);
  // A -inf logit has p_j = 0 and log p_j = -inf: clamped, its p-term is 0 * finite = 0.
  if constexpr (kTerms != kLogpTerms) q = fmaf(k.d, fmaxf(log2_p, -256.f), q);
  float dx = fmaf(prob, q, a);
  if constexpr (kSoftcap) dx *= dz_dx;
  return dx;
}

// One row's chunk. kScored = false (an ignored row): nothing is read, zeros are written.
//
// The label term is not tested per element: every element gets A + p_j (...), and the thread
// that writes the label's column also computes its gradient with A + g, from the logit it reads
// before any of its own writes (in place, no other thread writes that element), and rewrites
// the element after its loops.
template <typename T, int kTerms, bool kSoftcap, bool kScored>
__device__ __forceinline__ void backward_chunk(const BackwardParams& p, const RowCoefficients& k, const T* x,
                                               T* grad, int chunk) {
  constexpr int kVector = Element<T>::kVector;
  constexpr int kStep = kUnroll * kThreads;
  const int tid = threadIdx.x;
  const bool last_chunk = chunk == p.chunks - 1;
  auto gradient = [&](const T* address) -> float {
    if constexpr (kScored) return logit_gradient<kTerms, kSoftcap>(p, k, load_scalar(address), k.a);
    return 0.f;
  };
  const bool same_alignment = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(grad)) & 15u) == 0;
  float label_gradient = 0.f;
  bool label_owner = false;
  auto own_label = [&](bool owner) {
    if constexpr (kScored) {
      label_owner = owner;
      if (owner) label_gradient = logit_gradient<kTerms, kSoftcap>(p, k, load_scalar(x + k.label), k.a + k.g);
    }
  };
  auto write_label = [&]() {
    if constexpr (kScored) {
      if (label_owner) grad[k.label] = Element<T>::from_float(label_gradient);
    }
  };

  if (!same_alignment) {
    // Scalar path over this chunk's element range, kUnroll elements per thread per step.
    const int64_t chunk_elements = static_cast<int64_t>(p.chunk_vectors) * kVector;
    const int64_t vocab_size = p.vocab_size;
    const int begin = static_cast<int>(min(vocab_size, chunk * chunk_elements));
    const int end = last_chunk ? p.vocab_size : static_cast<int>(min(vocab_size, begin + chunk_elements));
    own_label(k.label >= begin && k.label < end && (k.label - begin) % kThreads == tid);
    for (int base = begin + tid; base < end; base += kStep) {
      float out[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int column = base + u * kThreads;
        out[u] = column < end ? gradient(x + column) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int column = base + u * kThreads;
        if (column < end) grad[column] = Element<T>::from_float(out[u]);
      }
    }
    write_label();
    return;
  }

  const RowGeometry geometry = row_geometry(x, p.vocab_size);
  const int vectors = static_cast<int>(geometry.vectors);
  const int begin = min(vectors, chunk * p.chunk_vectors);
  const int end = min(vectors, begin + p.chunk_vectors);
  const int tail = geometry.head + vectors * kVector;
  // Who writes the label's column: in the head thread `column` of chunk 0, in the body thread
  // (w - begin) mod kThreads of the chunk holding vector w, in the tail the last chunk's.
  if (k.label >= tail) {
    own_label(last_chunk && k.label - tail == tid);
  } else if (k.label >= geometry.head) {
    const int w = (k.label - geometry.head) / kVector;
    own_label(w >= begin && w < end && (w - begin) % kThreads == tid);
  } else {
    own_label(chunk == 0 && k.label == tid);  // also k.label = -1: nobody
  }

  auto vector_gradient = [&](const Vector<T>& in) {
    Vector<T> out;
    float x_e[kVector];
    if constexpr (kScored) vector_to_floats(in, x_e);
#pragma unroll
    for (int e = 0; e < kVector; ++e) {
      float dx = 0.f;
      if constexpr (kScored) dx = logit_gradient<kTerms, kSoftcap>(p, k, x_e[e], k.a);
      out.v[e] = Element<T>::from_float(dx);
    }
    return out;
  };

  // The scalar head and tail before the vector loops: only the label's gradient and address stay
  // live across them (with the tail after them, sm_80 spills for half with a softcap).
  if (chunk == 0 && tid < geometry.head) grad[tid] = Element<T>::from_float(gradient(x + tid));
  if (last_chunk && tail + tid < p.vocab_size) grad[tail + tid] = Element<T>::from_float(gradient(x + tail + tid));
  // One running pointer: the kUnroll vectors of a step are at constant offsets from it, and the
  // gradient at a constant distance in bytes (one 64-bit add per step, not an index to scale).
  const T* in = x + geometry.head + static_cast<int64_t>(begin + tid) * kVector;
  const intptr_t to_grad = reinterpret_cast<intptr_t>(grad) - reinterpret_cast<intptr_t>(x);
  auto grad_at = [to_grad](const T* logit) { return reinterpret_cast<T*>(reinterpret_cast<intptr_t>(logit) + to_grad); };
  int v = begin;
#pragma unroll 1
  for (; v + kStep <= end; v += kStep, in += kStep * kVector) {
    Vector<T> x_u[kUnroll];
    if constexpr (kScored) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) x_u[u] = load_vector(in + u * kThreads * kVector);
    }
    T* out = grad_at(in);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store_vector(out + u * kThreads * kVector, vector_gradient(x_u[u]));
  }
  for (int w = v + tid; w < end; w += kThreads, in += kThreads * kVector) {
    Vector<T> x_w;
    if constexpr (kScored) x_w = load_vector(in);
    store_vector(grad_at(in), vector_gradient(x_w));
  }
  write_label();
}

template <typename T, int kTerms, bool kSoftcap>
__global__ void __launch_bounds__(kThreads, kResidentBlocksPerSm) token_stats_backward_kernel(const BackwardParams p) {
  const int64_t row = blockIdx.x;
  const int chunk = blockIdx.y;

  const T* x = row_address<T>(p.logits, row, p.inner, p.stride_outer, p.stride_inner);
  T* grad = const_cast<T*>(row_address<T>(p.grad, row, p.inner, p.grad_stride_outer, p.grad_stride_inner));
  RowCoefficients k = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, -1};
  const int64_t label = load_label(p.labels, p.labels_are_int64, row);
  if (label == p.ignore_index) {
    // Ignored rows: never read, gradient exactly 0 (also for a -inf or NaN logit).
    backward_chunk<T, kTerms, kSoftcap, false>(p, k, x, grad, chunk);
    return;
  }
  const int64_t local = label - p.column_offset;
  k.label = local >= 0 && local < p.vocab_size ? static_cast<int>(local) : -1;
  k.lse = p.lse[row];
  k.residual2 = (p.lse_residual ? p.lse_residual[row] : 0.f) * kLog2E;
  // dL/dz_j = 1[j = y] g + A + p_j (B + D log p_j + C p_j), times 1 / T here, log p_j = ln 2 log2 p_j.
  const float g = p.grad_logps[row];
  float b = -g, c = 0.f, d = 0.f, a = 0.f;
  if (p.grad_entropy != nullptr) {
    const float g_entropy = p.grad_entropy[row];
    b -= g_entropy * p.entropy[row];
    d = -g_entropy;
  }
  if (p.grad_mean_logits != nullptr) a = p.grad_mean_logits[row] / p.softmax_size;
  if (p.grad_log_sum_sq_probs != nullptr) {
    const float g_sum_sq = p.grad_log_sum_sq_probs[row];
    b -= 2.f * g_sum_sq;
    c = 2.f * g_sum_sq / expf(p.log_sum_sq_probs[row]);
  }
  const float inv_t = p.inv_temperature;
  k.g = g * inv_t;
  k.a = a * inv_t;
  k.b = b * inv_t;
  k.c = c * inv_t;
  k.d = d * inv_t * kLn2;
  backward_chunk<T, kTerms, kSoftcap, true>(p, k, x, grad, chunk);
}

template <typename T, int kTerms>
void launch_backward(const BackwardParams& p, int64_t rows, bool softcap, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(p.chunks));
  const auto kernel =
      softcap ? &token_stats_backward_kernel<T, kTerms, true> : &token_stats_backward_kernel<T, kTerms, false>;
  PREFOPT_LAUNCH(kernel, grid, kThreads, stream, p);
}

template <typename T>
void launch_backward(const BackwardParams& p, int64_t rows, int terms, bool softcap, cudaStream_t stream) {
  switch (terms) {
    case kLogpTerms: launch_backward<T, kLogpTerms>(p, rows, softcap, stream); break;
    case kEntropyTerms: launch_backward<T, kEntropyTerms>(p, rows, softcap, stream); break;
    default: launch_backward<T, kAllTerms>(p, rows, softcap, stream); break;
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

}  // namespace
}  // namespace prefopt

using namespace prefopt;

extern "C" cudaError_t prefopt_token_stats_backward(
    const void* logits, void* grad_logits, int dtype, int64_t outer, int64_t inner,
    int64_t vocab_size, int64_t column_offset, int64_t softmax_size, int64_t stride_outer, int64_t stride_inner,
    int64_t grad_stride_outer, int64_t grad_stride_inner,
    const void* labels, int labels_are_int64, int64_t ignore_index,
    float inv_temperature, float softcap,
    const float* lse, const float* lse_residual, const float* entropy, const float* log_sum_sq_probs,
    const float* grad_logps, const float* grad_entropy, const float* grad_mean_logits,
    const float* grad_log_sum_sq_probs,
    int multiprocessors, cudaStream_t stream) {
  // Argument errors are reported before anything is launched (and without touching the device).
  const int width = vector_width(dtype);
  if (width == 0 || outer < 0 || inner < 0 || vocab_size < 1 || vocab_size > INT_MAX) return cudaErrorInvalidValue;
  if (column_offset < 0 || softmax_size < vocab_size || column_offset > softmax_size - vocab_size) {
    return cudaErrorInvalidValue;
  }
  if (!(inv_temperature > 0.f) || !(softcap >= 0.f)) return cudaErrorInvalidValue;
  const int64_t rows = outer * inner;
  if (rows == 0) return cudaSuccess;
  if (rows > INT_MAX || logits == nullptr || grad_logits == nullptr || labels == nullptr || lse == nullptr ||
      grad_logps == nullptr) {
    return cudaErrorInvalidValue;
  }
  if ((grad_entropy != nullptr && entropy == nullptr) ||
      (grad_log_sum_sq_probs != nullptr && log_sum_sq_probs == nullptr)) {
    return cudaErrorInvalidValue;
  }

  // Chunks per row: at most 4 block steps of work each (64 KiB of bf16), and with few rows more
  // of them, down to one step each, until the blocks fill every SM's resident slots.
  const int64_t row_vectors = vocab_size / width;
  const int64_t step = static_cast<int64_t>(kUnroll) * kThreads;
  int64_t chunks = (row_vectors + 4 * step - 1) / (4 * step);
  if (multiprocessors > 0) {
    const int64_t slots = static_cast<int64_t>(multiprocessors) * kResidentBlocksPerSm;
    int64_t wanted = (slots + rows - 1) / rows;
    const int64_t most = (row_vectors + step - 1) / step;
    if (wanted > most) wanted = most;
    if (chunks < wanted) chunks = wanted;
  }
  if (chunks < 1) chunks = 1;
  if (chunks > 65535) chunks = 65535;
  // Whole block steps per chunk (all but the last chunk never fall back to single vectors).
  int64_t chunk_vectors = (row_vectors + chunks - 1) / chunks;
  chunk_vectors = (chunk_vectors + step - 1) / step * step;
  if (chunk_vectors > 0) chunks = (row_vectors + chunk_vectors - 1) / chunk_vectors;
  if (chunks < 1) chunks = 1;

  BackwardParams p;
  p.logits = logits;
  p.grad = grad_logits;
  p.labels = labels;
  p.inner = inner;
  p.stride_outer = stride_outer;
  p.stride_inner = stride_inner;
  p.grad_stride_outer = grad_stride_outer;
  p.grad_stride_inner = grad_stride_inner;
  p.ignore_index = ignore_index;
  p.column_offset = column_offset;
  p.softmax_size = static_cast<float>(softmax_size);
  p.vocab_size = static_cast<int>(vocab_size);
  p.labels_are_int64 = labels_are_int64 ? 1 : 0;
  p.chunks = static_cast<int>(chunks);
  p.chunk_vectors = static_cast<int>(chunk_vectors);
  p.inv_temperature = inv_temperature;
  p.softcap = softcap;
  p.z_scale = softcap * inv_temperature;
  p.tanh_scale = softcap > 0.f ? 2.f * kLog2E / softcap : 0.f;
  p.lse = lse;
  p.lse_residual = lse_residual;
  p.entropy = entropy;
  p.log_sum_sq_probs = log_sum_sq_probs;
  p.grad_logps = grad_logps;
  p.grad_entropy = grad_entropy;
  p.grad_mean_logits = grad_mean_logits;
  p.grad_log_sum_sq_probs = grad_log_sum_sq_probs;

  const bool with_softcap = softcap > 0.f;
  const int terms = grad_log_sum_sq_probs != nullptr ? kAllTerms
                    : grad_entropy != nullptr        ? kEntropyTerms
                                                     : kLogpTerms;
  switch (dtype) {
    case PREFOPT_FLOAT32: launch_backward<float>(p, rows, terms, with_softcap, stream); break;
    case PREFOPT_FLOAT16: launch_backward<__half>(p, rows, terms, with_softcap, stream); break;
    case PREFOPT_BFLOAT16: launch_backward<__nv_bfloat16>(p, rows, terms, with_softcap, stream); break;
    default: launch_backward<double>(p, rows, terms, with_softcap, stream); break;
  }
  return cudaGetLastError();
}
