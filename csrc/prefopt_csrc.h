/* prefopt CUDA kernels: the plain C ABI.
 *
 * Everything here needs only the CUDA runtime headers: no torch. csrc/binding.cpp wraps these
 * launchers as torch operators; any other host (a C++ trainer, a test driver) can call them with
 * raw device pointers.
 *
 * Conventions shared by every launcher:
 *   - logits are read through a [outer, inner, vocab] view: element (o, i, v) lives at
 *     logits + o * stride_outer + i * stride_inner + v (strides in elements, 64-bit), so views
 *     such as logits[:, :-1] are read where they lie. Row r is (o, i) = (r / inner, r % inner).
 *   - labels, and every per-row input and output, are flat and contiguous: [outer * inner].
 *   - the softmax is over z = softcap(x) / T with softcap(x) = c * tanh(x / c); pass
 *     inv_temperature = 1 / T and softcap = c, or softcap = 0 for no soft-capping.
 *   - a row whose label equals ignore_index is never read; its outputs (and its gradient) are 0.
 *   - an optional statistic is computed iff its output pointer is non-null: the pointers are the
 *     flags for which statistics to compute.
 *   - launches are asynchronous on `stream`; the return value is the launch status (argument
 *     errors give cudaErrorInvalidValue before anything is launched). Nothing synchronizes.
 */
#ifndef PREFOPT_CSRC_H_
#define PREFOPT_CSRC_H_

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of the logits (and of the gradient, which is written in the logits' dtype). */
typedef enum prefopt_dtype {
  PREFOPT_FLOAT32 = 0,
  PREFOPT_FLOAT16 = 1,
  PREFOPT_BFLOAT16 = 2,
  PREFOPT_FLOAT64 = 3
} prefopt_dtype;

/* The most blocks one row of the forward pass may be split over. */
#define PREFOPT_MAX_FORWARD_SPLITS 64

/* How many blocks should share each row of the forward pass so that `multiprocessors` SMs are
 * kept busy: 1 when there are rows enough, more for a few rows of a very large vocabulary.
 * Pure host arithmetic; the result is what prefopt_token_stats_forward expects in `splits`. */
int prefopt_token_stats_forward_splits(int64_t rows, int64_t vocab_size, int dtype, int multiprocessors);

/* Bytes of device workspace the forward pass needs for `splits` > 1 (0 when splits == 1). */
size_t prefopt_token_stats_forward_workspace_bytes(int64_t rows, int splits);

/* Per-row log-probability of the label and the optional statistics, in one pass over the logits.
 *   logps, lse: float32 [rows], required (lse is what the backward needs).
 *   entropy, mean_logits, log_sum_sq_probs: float32 [rows] or NULL; is_top1: bool (1 byte) [rows]
 *   or NULL (the label is the first maximal logit).
 *   workspace: prefopt_token_stats_forward_workspace_bytes(rows, splits) bytes of device memory
 *   when splits > 1 (may be NULL when splits == 1). */
cudaError_t prefopt_token_stats_forward(
    const void* logits, int dtype, int64_t outer, int64_t inner, int64_t vocab_size,
    int64_t stride_outer, int64_t stride_inner,
    const void* labels, int labels_are_int64, int64_t ignore_index,
    float inv_temperature, float softcap,
    float* logps, float* lse, float* entropy, float* mean_logits, float* log_sum_sq_probs,
    uint8_t* is_top1,
    void* workspace, int splits, cudaStream_t stream);

/* Gradient of sum_r (g_logp[r] logp[r] + g_entropy[r] entropy[r] + g_mean[r] mean[r]
 * + g_sum_sq[r] log_sum_sq_probs[r]) with respect to the raw logits, written once in the logits'
 * dtype through the [outer, inner, vocab] view grad_logits (strides grad_stride_*), which may be
 * the logits themselves (in-place backward: every element is read before it is overwritten, by
 * the same thread).
 *   lse, grad_logps: float32 [rows], required. grad_entropy needs entropy, grad_log_sum_sq_probs
 *   needs log_sum_sq_probs; an upstream gradient that is NULL contributes nothing. */
cudaError_t prefopt_token_stats_backward(
    const void* logits, void* grad_logits, int dtype, int64_t outer, int64_t inner,
    int64_t vocab_size, int64_t stride_outer, int64_t stride_inner,
    int64_t grad_stride_outer, int64_t grad_stride_inner,
    const void* labels, int labels_are_int64, int64_t ignore_index,
    float inv_temperature, float softcap,
    const float* lse, const float* entropy, const float* log_sum_sq_probs,
    const float* grad_logps, const float* grad_entropy, const float* grad_mean_logits,
    const float* grad_log_sum_sq_probs,
    int multiprocessors, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* PREFOPT_CSRC_H_ */
