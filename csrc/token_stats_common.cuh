// Device-side pieces shared by the log-prob kernels: element types and their 16-byte vectors,
// the one-MUFU 2^x and 1/x and the softcap's tanh, the row geometry (where the 16-byte aligned part of a
// row starts), and the block shape.
//
// The math mirrors prefopt/kernels/_common.py (the Triton kernels); the two backends must agree.
#ifndef PREFOPT_TOKEN_STATS_COMMON_CUH_
#define PREFOPT_TOKEN_STATS_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "prefopt_csrc.h"

namespace prefopt {

// One block of 256 threads (8 warps) works on one row (or, split-V, one slice of a row). Each
// thread issues kUnroll independent 16-byte loads before it uses any of them: with 4 blocks
// resident per SM that is 64 KiB of loads in flight per SM, well past what HBM3e latency needs.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;
// Kernels declare __launch_bounds__(kThreads, kResidentBlocksPerSm): at most 64 registers per
// thread, so 4 blocks (1024 threads) stay resident per SM; the split plans count on it.
constexpr int kResidentBlocksPerSm = 4;

// Every kernel is launched through this macro. tests/test_csrc.py compiles the same sources as
// plain C++ with csrc/testing/host_simulator.h, which defines it to run each block's threads on
// CPU threads, so that the kernel code itself is checked against the reference where no GPU is.
#ifndef PREFOPT_LAUNCH
#define PREFOPT_LAUNCH(kernel, grid, block, stream, params) kernel<<<(grid), (block), 0, (stream)>>>(params)
#endif

// (lse, residual) of lse = m + log s rounded to float32: residual = (m + log s) - lse, exact
// (Fast2Sum, the larger magnitude first; IEEE arithmetic, no fast-math). The backward takes
// p_j = exp((z_j - lse) - residual), at float32 rounding of z_j - m however large |m| is; a
// non-finite lse gets residual 0 (prefopt/kernels/_common.py's lse_and_residual).
__device__ __forceinline__ float2 lse_and_residual(float m, float log_s) {
  const float lse = m + log_s;
  const bool m_larger = fabsf(m) >= fabsf(log_s);
  const float larger = m_larger ? m : log_s;
  const float smaller = m_larger ? log_s : m;
  return make_float2(lse, fabsf(lse) < INFINITY ? smaller - (lse - larger) : 0.f);
}

// Bit casts (memcpy: no aliasing questions, and one register move or none).
__device__ __forceinline__ uint32_t float_bits(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return bits;
}

__device__ __forceinline__ float bits_float(uint32_t bits) {
  float x;
  memcpy(&x, &bits, sizeof(x));
  return x;
}

// Element traits: float conversion (explicit intrinsics: torch builds with
// __CUDA_NO_HALF_CONVERSIONS__) and the number of elements in one 16-byte vector.
template <typename T>
struct Element;

template <>
struct Element<float> {
  static constexpr int kVector = 4;
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};

template <>
struct Element<double> {
  static constexpr int kVector = 2;
  __device__ __forceinline__ static float to_float(double x) { return static_cast<float>(x); }
  __device__ __forceinline__ static double from_float(float x) { return static_cast<double>(x); }
};

template <>
struct Element<__half> {
  static constexpr int kVector = 8;
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Element<__nv_bfloat16> {
  static constexpr int kVector = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// 16 bytes of elements, moved as one uint4 (one LDG.128 / STG.128 per thread).
template <typename T>
struct alignas(16) Vector {
  T v[Element<T>::kVector];
};

// Streaming loads and stores (evict-first): a row is touched once per pass and is far larger
// than L2, so keeping it would only evict what others need. Plain (coherent) loads, not the
// read-only path: in the in-place backward the same buffer is written by the same kernel.
template <typename T>
__device__ __forceinline__ Vector<T> load_vector(const T* address) {
  const uint4 bits = __ldcs(reinterpret_cast<const uint4*>(address));
  Vector<T> out;
  *reinterpret_cast<uint4*>(&out) = bits;
  return out;
}

template <typename T>
__device__ __forceinline__ void store_vector(T* address, const Vector<T>& value) {
  __stcs(reinterpret_cast<uint4*>(address), *reinterpret_cast<const uint4*>(&value));
}

// The kVector elements of a vector as float32. bf16 is the upper half of a float32: each 32-bit
// word gives its two elements with one shift and one mask (the generic conversion spends a
// byte permute and a shift on the upper one).
template <typename T>
__device__ __forceinline__ void vector_to_floats(const Vector<T>& in, float (&out)[Element<T>::kVector]) {
#pragma unroll
  for (int e = 0; e < Element<T>::kVector; ++e) out[e] = Element<T>::to_float(in.v[e]);
}

template <>
__device__ __forceinline__ void vector_to_floats<__nv_bfloat16>(const Vector<__nv_bfloat16>& in, float (&out)[8]) {
  uint32_t words[4];
  memcpy(words, &in, sizeof(words));
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    out[2 * w] = bits_float(words[w] << 16);
    out[2 * w + 1] = bits_float(words[w] & 0xffff0000u);
  }
}

template <typename T>
__device__ __forceinline__ float load_scalar(const T* address) {
  return Element<T>::to_float(*address);
}

// 2^x and 1/x as one MUFU instruction each (ex2.approx.ftz.f32, rcp.approx.ftz.f32: no denormal
// fix-up, results below 2^-126 are 0; relative errors ~2^-22 and 1 ulp). The host simulator
// (csrc/testing/host_simulator.h), which cannot run inline PTX, takes exp2f and a division: the CPU
// tests check the formulas, a GPU run the instructions' accuracy.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

__device__ __forceinline__ float fast_reciprocal(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.f / x;
#endif
}

// tanh(x / c) = sign(x) (1 - e) / (1 + e), e = 2^(-2 log2(e) |x| / c) (tanh_scale = 2 log2(e) / c):
// two MUFU instructions and five others (prefopt/kernels/token_stats_fwd.py's _tanh). e is in [0, 1], so
// nothing overflows and 1 - e is exact for e >= 1/2: the error is that of e, an absolute ~3e-8
// near 0; -inf gives -1 and NaN stays NaN.
__device__ __forceinline__ float softcap_tanh(float x, float tanh_scale) {
  const float e = fast_exp2(-(fabsf(x) * tanh_scale));
  const float magnitude = (1.f - e) * fast_reciprocal(1.f + e);
  // The sign of x put on the magnitude: one bitwise instruction.
  return bits_float(float_bits(magnitude) | (float_bits(x) & 0x80000000u));
}

// The backward reads a row as [head | body | tail]: `head` scalar elements up to the first
// 16-byte boundary, then `vectors` whole 16-byte vectors, then the < kVector elements left. A row
// of logits[:, :-1] or of an odd vocabulary starts anywhere, so the aligned body is found per row
// instead of giving up on vector loads for the whole tensor. (The forward, a reduction, deals
// columns to threads by index instead, so that its rounding does not depend on the address.)
struct RowGeometry {
  int head;         // scalar elements before the first 16-byte boundary (< kVector)
  int64_t vectors;  // whole 16-byte vectors after the head
};

template <typename T>
__device__ __forceinline__ RowGeometry row_geometry(const T* row, int64_t vocab_size) {
  constexpr int kVector = Element<T>::kVector;
  const unsigned misalignment = static_cast<unsigned>(reinterpret_cast<uintptr_t>(row) & 15u);
  int head = static_cast<int>(((16u - misalignment) & 15u) / sizeof(T));
  if (head > vocab_size) head = static_cast<int>(vocab_size);
  return {head, (vocab_size - head) / kVector};
}

// Labels are int32 or int64; ignore_index is compared in 64 bits (prefopt passes -2^63 for "no
// position is ignored", which no int32 label can equal).
__device__ __forceinline__ int64_t load_label(const void* labels, int labels_are_int64, int64_t row) {
  return labels_are_int64 ? static_cast<const int64_t*>(labels)[row]
                          : static_cast<int64_t>(static_cast<const int32_t*>(labels)[row]);
}

// 64-bit offsets throughout: rows x vocab passes 2^31 at 16k tokens of a 128k vocabulary.
template <typename T>
__device__ __forceinline__ const T* row_address(const void* base, int64_t row, int64_t inner,
                                                int64_t stride_outer, int64_t stride_inner) {
  return static_cast<const T*>(base) + (row / inner) * stride_outer + (row % inner) * stride_inner;
}

}  // namespace prefopt

#endif  // PREFOPT_TOKEN_STATS_COMMON_CUH_
