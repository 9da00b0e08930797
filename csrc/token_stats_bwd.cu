// Backward: the gradient of the per-token outputs with respect to the raw logits, written once
// (the CUDA twin of kernels/token_stats_bwd.py; the results must agree).
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
// so one formula serves every combination of statistics (an absent gradient is a zero
// coefficient) and the per-element work is one exp and four FMAs. Then dx_j = dz_j * dz/dx with
// dz/dx = (1 - tanh^2(x / c)) / T under a softcap, 1 / T without.
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
// exact zeros. Offsets are 64-bit.
#include <climits>

#include "token_stats_common.cuh"

namespace prefopt {
namespace {

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
  float inv_softcap;
  const float* lse;
  const float* lse_residual;
  const float* entropy;
  const float* log_sum_sq_probs;
  const float* grad_logps;
  const float* grad_entropy;
  const float* grad_mean_logits;
  const float* grad_log_sum_sq_probs;
};

// The per-row constants of dL/dz_j; all zero for an ignored row, whose gradient is exactly 0.
struct RowCoefficients {
  float lse, lse_residual, g, a, b, c, d;
  int64_t label;
};

template <bool kSoftcap>
__device__ __forceinline__ float logit_gradient(const BackwardParams& p, const RowCoefficients& k, float x,
                                                int column) {
  float z, dz_dx;
  if constexpr (kSoftcap) {
    const float th = tanhf(x * p.inv_softcap);
    z = p.softcap * th * p.inv_temperature;
    dz_dx = (1.f - th * th) * p.inv_temperature;
  } else {
    z = x * p.inv_temperature;
    dz_dx = p.inv_temperature;
  }
  // z - lse is exact where p_j matters (Sterbenz); the residual makes it z - m - log s.
  const float log_p = (z - k.lse) - k.lse_residual;
  const float prob = __expf(log_p);  // argument <= 0 (up to rounding): the approximation is ~2 ulp
  // p_j = 0 (a -inf logit) has log p_j = -inf: its whole p-term is 0, selected, not multiplied.
  const float q = prob > 0.f ? fmaf(k.d, log_p, fmaf(k.c, prob, k.b)) : 0.f;
  float dz = fmaf(prob, q, k.a);
  if (column == k.label) dz += k.g;
  return dz * dz_dx;
}

template <typename T, bool kSoftcap>
__global__ void __launch_bounds__(kThreads, kResidentBlocksPerSm) token_stats_backward_kernel(const BackwardParams p) {
  constexpr int kVector = Element<T>::kVector;
  constexpr int kStep = kUnroll * kThreads;
  const int64_t row = blockIdx.x;
  const int chunk = blockIdx.y;
  const int tid = threadIdx.x;
  const bool last_chunk = chunk == p.chunks - 1;

  RowCoefficients k = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, -1};
  const int64_t label = load_label(p.labels, p.labels_are_int64, row);
  const bool scored = label != p.ignore_index;
  if (scored) {
    k.label = label - p.column_offset;  // outside [0, vocab_size) when another tile holds the label
    k.lse = p.lse[row];
    k.lse_residual = p.lse_residual ? p.lse_residual[row] : 0.f;
    k.g = p.grad_logps[row];
    k.b = -k.g;
    if (p.grad_entropy != nullptr) {
      const float g_entropy = p.grad_entropy[row];
      k.b -= g_entropy * p.entropy[row];
      k.d = -g_entropy;
    }
    if (p.grad_mean_logits != nullptr) k.a = p.grad_mean_logits[row] / p.softmax_size;
    if (p.grad_log_sum_sq_probs != nullptr) {
      const float g_sum_sq = p.grad_log_sum_sq_probs[row];
      k.b -= 2.f * g_sum_sq;
      k.c = 2.f * g_sum_sq / expf(p.log_sum_sq_probs[row]);
    }
  }
  // Ignored rows: never read, gradient exactly 0 (also for a -inf or NaN logit).
  auto gradient = [&](const T* address, int column) -> float {
    return scored ? logit_gradient<kSoftcap>(p, k, load_scalar(address), column) : 0.f;
  };

  const T* x = row_address<T>(p.logits, row, p.inner, p.stride_outer, p.stride_inner);
  T* grad = const_cast<T*>(row_address<T>(p.grad, row, p.inner, p.grad_stride_outer, p.grad_stride_inner));
  const bool same_alignment = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(grad)) & 15u) == 0;

  if (!same_alignment) {
    // Scalar path over this chunk's element range, kUnroll elements per thread per step.
    const int64_t chunk_elements = static_cast<int64_t>(p.chunk_vectors) * kVector;
    const int64_t vocab_size = p.vocab_size;
    const int begin = static_cast<int>(min(vocab_size, chunk * chunk_elements));
    const int end = last_chunk ? p.vocab_size : static_cast<int>(min(vocab_size, begin + chunk_elements));
    for (int base = begin + tid; base < end; base += kStep) {
      float out[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int column = base + u * kThreads;
        out[u] = column < end ? gradient(x + column, column) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int column = base + u * kThreads;
        if (column < end) grad[column] = Element<T>::from_float(out[u]);
      }
    }
    return;
  }

  const RowGeometry geometry = row_geometry(x, p.vocab_size);
  const int vectors = static_cast<int>(geometry.vectors);
  const int begin = min(vectors, chunk * p.chunk_vectors);
  const int end = min(vectors, begin + p.chunk_vectors);
  const T* body = x + geometry.head;
  T* grad_body = grad + geometry.head;

  if (chunk == 0 && tid < geometry.head) grad[tid] = Element<T>::from_float(gradient(x + tid, tid));
  int v = begin;
  for (; v + kStep <= end; v += kStep) {
    Vector<T> in[kUnroll];
    if (scored) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) in[u] = load_vector(body + static_cast<int64_t>(v + u * kThreads + tid) * kVector);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int column = geometry.head + (v + u * kThreads + tid) * kVector;
      Vector<T> out;
#pragma unroll
      for (int e = 0; e < kVector; ++e) {
        out.v[e] = Element<T>::from_float(
            scored ? logit_gradient<kSoftcap>(p, k, Element<T>::to_float(in[u].v[e]), column + e) : 0.f);
      }
      store_vector(grad_body + static_cast<int64_t>(v + u * kThreads + tid) * kVector, out);
    }
  }
  for (int w = v + tid; w < end; w += kThreads) {
    Vector<T> in;
    if (scored) in = load_vector(body + static_cast<int64_t>(w) * kVector);
    const int column = geometry.head + w * kVector;
    Vector<T> out;
#pragma unroll
    for (int e = 0; e < kVector; ++e) {
      out.v[e] = Element<T>::from_float(
          scored ? logit_gradient<kSoftcap>(p, k, Element<T>::to_float(in.v[e]), column + e) : 0.f);
    }
    store_vector(grad_body + static_cast<int64_t>(w) * kVector, out);
  }
  if (last_chunk) {
    const int column = geometry.head + vectors * kVector + tid;  // fewer than kVector remain
    if (column < p.vocab_size) grad[column] = Element<T>::from_float(gradient(x + column, column));
  }
}

template <typename T>
void launch_backward(const BackwardParams& p, int64_t rows, bool softcap, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(p.chunks));
  const auto kernel = softcap ? &token_stats_backward_kernel<T, true> : &token_stats_backward_kernel<T, false>;
  PREFOPT_LAUNCH(kernel, grid, kThreads, stream, p);
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
  p.inv_softcap = softcap > 0.f ? 1.f / softcap : 0.f;
  p.lse = lse;
  p.lse_residual = lse_residual;
  p.entropy = entropy;
  p.log_sum_sq_probs = log_sum_sq_probs;
  p.grad_logps = grad_logps;
  p.grad_entropy = grad_entropy;
  p.grad_mean_logits = grad_mean_logits;
  p.grad_log_sum_sq_probs = grad_log_sum_sq_probs;

  const bool with_softcap = softcap > 0.f;
  switch (dtype) {
    case PREFOPT_FLOAT32: launch_backward<float>(p, rows, with_softcap, stream); break;
    case PREFOPT_FLOAT16: launch_backward<__half>(p, rows, with_softcap, stream); break;
    case PREFOPT_BFLOAT16: launch_backward<__nv_bfloat16>(p, rows, with_softcap, stream); break;
    default: launch_backward<double>(p, rows, with_softcap, stream); break;
  }
  return cudaGetLastError();
}
