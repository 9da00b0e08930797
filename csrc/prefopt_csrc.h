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

/* Element type of the logits (and of the gradient, which is written in the logits' dtype), and of
 * the log-probs of the preference losses. The integer types are for token counts only. */
typedef enum prefopt_dtype {
  PREFOPT_FLOAT32 = 0,
  PREFOPT_FLOAT16 = 1,
  PREFOPT_BFLOAT16 = 2,
  PREFOPT_FLOAT64 = 3,
  PREFOPT_INT32 = 4,
  PREFOPT_INT64 = 5
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
 *   lse_residual: float32 [rows] or NULL: (m + log s) - lse, exact, for the backward's
 *   p = exp((z - lse) - lse_residual), precise at large |z|.
 *   entropy, mean_logits, log_sum_sq_probs: float32 [rows] or NULL; is_top1: bool (1 byte) [rows]
 *   or NULL (the label is the first maximal logit).
 *   workspace: prefopt_token_stats_forward_workspace_bytes(rows, splits) bytes of device memory
 *   when splits > 1 (may be NULL when splits == 1). */
cudaError_t prefopt_token_stats_forward(
    const void* logits, int dtype, int64_t outer, int64_t inner, int64_t vocab_size,
    int64_t stride_outer, int64_t stride_inner,
    const void* labels, int labels_are_int64, int64_t ignore_index,
    float inv_temperature, float softcap,
    float* logps, float* lse, float* lse_residual, float* entropy, float* mean_logits,
    float* log_sum_sq_probs, uint8_t* is_top1,
    void* workspace, int splits, cudaStream_t stream);

/* Gradient of sum_r (g_logp[r] logp[r] + g_entropy[r] entropy[r] + g_mean[r] mean[r]
 * + g_sum_sq[r] log_sum_sq_probs[r]) with respect to the raw logits, written once in the logits'
 * dtype through the [outer, inner, vocab] view grad_logits (strides grad_stride_*), which may be
 * the logits themselves (in-place backward: every element is read before it is overwritten, by
 * the same thread).
 *   lse, grad_logps: float32 [rows], required; lse_residual: the forward's, or NULL (lse taken
 *   as exact). grad_entropy needs entropy, grad_log_sum_sq_probs
 *   needs log_sum_sq_probs; an upstream gradient that is NULL contributes nothing.
 *   The view may be one tile of columns of each row: columns [column_offset, column_offset +
 *   vocab_size) of a softmax over softmax_size columns, whose statistics (lse, entropy, ...) and
 *   labels are those of the whole row. A whole row is column_offset = 0, softmax_size = vocab_size. */
cudaError_t prefopt_token_stats_backward(
    const void* logits, void* grad_logits, int dtype, int64_t outer, int64_t inner,
    int64_t vocab_size, int64_t column_offset, int64_t softmax_size, int64_t stride_outer, int64_t stride_inner,
    int64_t grad_stride_outer, int64_t grad_stride_inner,
    const void* labels, int labels_are_int64, int64_t ignore_index,
    float inv_temperature, float softcap,
    const float* lse, const float* lse_residual, const float* entropy, const float* log_sum_sq_probs,
    const float* grad_logps, const float* grad_entropy, const float* grad_mean_logits,
    const float* grad_log_sum_sq_probs,
    int multiprocessors, cudaStream_t stream);

/* ---------------------------------------------------------------------------------------------
 * Fused preference-loss reductions (csrc/preference_loss.cu), on per-sequence log-probs [n].
 *
 * One launch computes, for a whole batch, the per-example losses, the reduced loss, the rewards and
 * the batch metrics; one launch computes the gradients of (grad_loss * loss + sum_i grad_losses[i]
 * losses[i]) with respect to every log-prob input, recomputed from the inputs. The formulas are
 * those of prefopt/losses.py. One block walks the batch in a fixed order and sums in a fixed tree:
 * the results are deterministic, and nothing synchronizes with the host. Math runs in float32, or
 * in float64 for float64 log-probs; every floating input and output is in `dtype`, contiguous.
 * --------------------------------------------------------------------------------------------- */

typedef enum prefopt_loss_family {
  PREFOPT_FAMILY_DPO = 0,  /* pairs: any weighted list of the DPO loss types */
  PREFOPT_FAMILY_KTO = 1,  /* unpaired examples, desirable or not: PREFOPT_LOSS_KTO or PREFOPT_LOSS_APO_ZERO_UNPAIRED */
  PREFOPT_FAMILY_CPO = 2,  /* reference-free pairs: sigmoid, hinge, ipo or simpo, plus an optional NLL term */
  PREFOPT_FAMILY_ORPO = 3  /* reference-free pairs: NLL plus the odds-ratio term; no loss type */
} prefopt_loss_family;

/* loss_type names of prefopt.losses; the DPO family takes 0-11, CPO 0, 2, 3 and 12, KTO 13-14. */
typedef enum prefopt_loss_type {
  PREFOPT_LOSS_SIGMOID = 0,
  PREFOPT_LOSS_ROBUST = 1,
  PREFOPT_LOSS_HINGE = 2,
  PREFOPT_LOSS_IPO = 3,
  PREFOPT_LOSS_EXO_PAIR = 4,
  PREFOPT_LOSS_NCA_PAIR = 5,
  PREFOPT_LOSS_BCO_PAIR = 6,
  PREFOPT_LOSS_SPPO_HARD = 7,
  PREFOPT_LOSS_APO_ZERO = 8,
  PREFOPT_LOSS_APO_DOWN = 9,
  PREFOPT_LOSS_DISCOPOP = 10,
  PREFOPT_LOSS_SIGMOID_NORM = 11,
  PREFOPT_LOSS_SIMPO = 12,
  PREFOPT_LOSS_KTO = 13,
  PREFOPT_LOSS_APO_ZERO_UNPAIRED = 14
} prefopt_loss_type;

#define PREFOPT_MAX_LOSS_TYPES 16

/* The per-example tensors of a loss: [n] in the launch's `dtype` unless said otherwise; NULL
 * where absent. "chosen" is KTO's policy log-probs of every example, "ref_chosen" its reference. */
typedef struct prefopt_preference_inputs {
  const void* chosen;            /* policy log-probs, required */
  const void* rejected;          /* DPO, CPO, ORPO */
  const void* ref_chosen;        /* DPO, KTO */
  const void* ref_rejected;      /* DPO */
  const void* margin;            /* DPO, optional: subtracted from beta * (chosen - rejected log-ratio) */
  const void* chosen_lengths;    /* completion token counts in lengths_dtype (any prefopt_dtype), or NULL */
  const void* rejected_lengths;
  int lengths_dtype;
  const uint8_t* desirable;      /* KTO: bool [n] */
  const void* offset;            /* 0-d: bco_pair's delta (DPO) or the KL reference point (KTO); NULL: offset_value */
  const void* nll;               /* ORPO, optional: 0-d (one NLL for the batch) or [n] (nll_is_vector) */
  int nll_is_vector;
  const void* pair_weights;      /* DPO, optional: WPO's per-pair weights, constants multiplying each loss */
} prefopt_preference_inputs;

/* The constants of a loss, as prefopt.losses names them. `mean`: the reduced loss is the mean of
 * the losses, else their sum. */
typedef struct prefopt_preference_config {
  int family;
  int num_loss_types;
  int loss_types[PREFOPT_MAX_LOSS_TYPES];
  double loss_weights[PREFOPT_MAX_LOSS_TYPES];
  double beta;
  double label_smoothing;
  double discopop_tau;
  double simpo_gamma;
  double cpo_alpha;
  double desirable_weight;
  double undesirable_weight;
  double offset_value;
  int mean;
  int f_divergence;                /* DPO: index in prefopt._codes.F_DIVERGENCE_TYPES (0: reverse KL, plain DPO) */
  double f_alpha_divergence_coef;  /* DPO with f_divergence 3 (alpha_divergence) */
  double alpha;                    /* CPO: AlphaPO's alpha, 0 for plain log-probs */
} prefopt_preference_config;

/* How many batch metrics the forward writes for `family` (prefopt._codes.METRIC_NAMES);
 * 0 for an unknown family. */
int prefopt_preference_loss_metric_count(int family);

/* loss: 0-d; losses, chosen_rewards, rejected_rewards: [n]; metrics: [metric_count(family)];
 * all required, in `dtype`. n >= 1. */
cudaError_t prefopt_preference_loss_forward(
    int dtype, int64_t n, const prefopt_preference_inputs* inputs, const prefopt_preference_config* config,
    void* loss, void* losses, void* chosen_rewards, void* rejected_rewards, void* metrics, cudaStream_t stream);

/* grad_loss: 0-d and grad_losses: [n], the upstream gradients, required. Each gradient is written
 * shaped like its input (grad_nll 0-d for a 0-d nll) iff its pointer is non-null; a gradient of
 * an absent input is an argument error. */
cudaError_t prefopt_preference_loss_backward(
    int dtype, int64_t n, const prefopt_preference_inputs* inputs, const prefopt_preference_config* config,
    const void* grad_loss, const void* grad_losses, void* grad_chosen, void* grad_rejected,
    void* grad_ref_chosen, void* grad_ref_rejected, void* grad_margin, void* grad_nll, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* PREFOPT_CSRC_H_ */
