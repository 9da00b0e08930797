// Registers the C-ABI launchers of csrc/*.cu as torch operators in the `prefopt` namespace:
//
//   prefopt::cuda_token_stats_forward       (fills logps, lse and the asked-for statistics)
//   prefopt::cuda_token_stats_backward      (writes the logits gradient; in place when grad_logits
//                                            is the logits tensor itself; of one tile of columns
//                                            of each row, given column_offset and softmax_size)
//   prefopt::cuda_preference_loss_forward   (fills the loss, losses, rewards and metrics)
//   prefopt::cuda_preference_loss_backward  (writes the gradients of the log-prob inputs)
//
// They have the contract of the Triton launchers in prefopt/kernels/ (see prefopt/cuda_ext.py, which calls
// them from the Python custom operators of prefopt/ops.py and prefopt/losses/fused.py): logits is
// a [outer, inner, V] view with a contiguous last dimension, the per-row tensors are flat
// [outer * inner] and contiguous; the loss inputs are contiguous [B] vectors of one dtype, the
// loss family and types come as the codes of prefopt_csrc.h. The work is enqueued on the current
// CUDA stream; nothing synchronizes with the host.
//
// This is the only file that includes torch; it is compiled only where torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>

#include "prefopt_csrc.h"

namespace {

// The prefopt_dtype of a scalar type, or -1.
int element_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return PREFOPT_FLOAT32;
    case at::kHalf: return PREFOPT_FLOAT16;
    case at::kBFloat16: return PREFOPT_BFLOAT16;
    case at::kDouble: return PREFOPT_FLOAT64;
    case at::kInt: return PREFOPT_INT32;
    case at::kLong: return PREFOPT_INT64;
    default: return -1;
  }
}

int dtype_code(const at::Tensor& tensor, const char* name) {
  const int code = element_code(tensor.scalar_type());
  TORCH_CHECK(code >= PREFOPT_FLOAT32 && code <= PREFOPT_FLOAT64, "prefopt: ", name,
              " must be float32, float16, bfloat16 or float64, got ", tensor.scalar_type());
  return code;
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.is_cuda(), "prefopt: ", name, " must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 3, "prefopt: ", name, " must be a [outer, inner, V] view, got ", logits.dim(), " dimensions");
  TORCH_CHECK(logits.size(2) == 1 || logits.stride(2) == 1, "prefopt: the last dimension of ", name, " must be contiguous");
}

void check_rows(const at::Tensor& tensor, const at::Tensor& logits, int64_t rows, const char* name,
                std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(tensor.device() == logits.device(), "prefopt: ", name, " must be on ", logits.device());
  bool dtype_ok = false;
  for (auto dtype : dtypes) dtype_ok = dtype_ok || tensor.scalar_type() == dtype;
  TORCH_CHECK(dtype_ok, "prefopt: ", name, " has an unexpected dtype ", tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == 1 && tensor.numel() == rows && tensor.is_contiguous(),
              "prefopt: ", name, " must be a contiguous [", rows, "] tensor");
}

template <typename Pointer>
Pointer* optional_rows(const std::optional<at::Tensor>& tensor, const at::Tensor& logits, int64_t rows,
                       const char* name, at::ScalarType dtype) {
  if (!tensor.has_value()) return nullptr;
  check_rows(*tensor, logits, rows, name, {dtype});
  return static_cast<Pointer*>(tensor->data_ptr());
}

float inverse_temperature(double temperature) {
  TORCH_CHECK(temperature > 0, "prefopt: temperature must be > 0, got ", temperature);
  return static_cast<float>(1.0 / temperature);
}

float softcap_value(const std::optional<double>& softcap) {
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "prefopt: softcap must be None or > 0");
  return softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
}

// SMs of the current device (a host-side attribute query: no synchronization).
int multiprocessors(const at::Tensor& logits) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, logits.get_device()) != cudaSuccess) return 0;
  return count;
}

void cuda_token_stats_forward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& logps,
                              const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                              const std::optional<at::Tensor>& mean_logits,
                              const std::optional<at::Tensor>& log_sum_sq_probs,
                              const std::optional<at::Tensor>& is_top1, int64_t ignore_index, double temperature,
                              std::optional<double> softcap, const std::optional<at::Tensor>& lse_residual) {
  check_logits(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0) * logits.size(1);
  const int64_t vocab_size = logits.size(2);
  const int dtype = dtype_code(logits, "logits");
  check_rows(labels, logits, rows, "labels", {at::kLong, at::kInt});
  check_rows(logps, logits, rows, "logps", {at::kFloat});
  check_rows(lse, logits, rows, "lse", {at::kFloat});
  float* residual_ptr = optional_rows<float>(lse_residual, logits, rows, "lse_residual", at::kFloat);
  float* entropy_ptr = optional_rows<float>(entropy, logits, rows, "entropy", at::kFloat);
  float* mean_ptr = optional_rows<float>(mean_logits, logits, rows, "mean_logits", at::kFloat);
  float* sum_sq_ptr = optional_rows<float>(log_sum_sq_probs, logits, rows, "log_sum_sq_probs", at::kFloat);
  uint8_t* top1_ptr = optional_rows<uint8_t>(is_top1, logits, rows, "is_top1", at::kBool);
  if (rows == 0) return;

  // Split-V for a few rows of a large vocabulary; the workspace comes from the caching allocator
  // on the current stream (no synchronization).
  const int splits = prefopt_token_stats_forward_splits(rows, vocab_size, dtype, multiprocessors(logits));
  const size_t workspace_bytes = prefopt_token_stats_forward_workspace_bytes(rows, splits);
  at::Tensor workspace;
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, logits.options().dtype(at::kByte));
  }
  const cudaError_t status = prefopt_token_stats_forward(
      logits.data_ptr(), dtype, logits.size(0), logits.size(1), vocab_size, logits.stride(0), logits.stride(1),
      labels.data_ptr(), labels.scalar_type() == at::kLong, ignore_index, inverse_temperature(temperature),
      softcap_value(softcap), logps.data_ptr<float>(), lse.data_ptr<float>(), residual_ptr, entropy_ptr, mean_ptr, sum_sq_ptr,
      top1_ptr, workspace_bytes > 0 ? workspace.data_ptr() : nullptr, splits, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "prefopt: the CUDA token-stats forward failed to launch: ",
              cudaGetErrorString(status));
}

void cuda_token_stats_backward(const at::Tensor& logits, const at::Tensor& grad_logits, const at::Tensor& labels,
                               const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
                               const std::optional<at::Tensor>& log_sum_sq_probs, const at::Tensor& grad_logps,
                               const std::optional<at::Tensor>& grad_entropy,
                               const std::optional<at::Tensor>& grad_mean_logits,
                               const std::optional<at::Tensor>& grad_log_sum_sq_probs, int64_t ignore_index,
                               double temperature, std::optional<double> softcap, int64_t column_offset,
                               int64_t softmax_size, const std::optional<at::Tensor>& lse_residual) {
  check_logits(logits, "logits");
  check_logits(grad_logits, "grad_logits");
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type() &&
                  grad_logits.device() == logits.device(),
              "prefopt: grad_logits must have the logits' shape, dtype and device");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0) * logits.size(1);
  check_rows(labels, logits, rows, "labels", {at::kLong, at::kInt});
  check_rows(lse, logits, rows, "lse", {at::kFloat});
  check_rows(grad_logps, logits, rows, "grad_logps", {at::kFloat});
  const float* residual_ptr = optional_rows<const float>(lse_residual, logits, rows, "lse_residual", at::kFloat);
  const float* entropy_ptr = optional_rows<const float>(entropy, logits, rows, "entropy", at::kFloat);
  const float* sum_sq_ptr = optional_rows<const float>(log_sum_sq_probs, logits, rows, "log_sum_sq_probs", at::kFloat);
  const float* grad_entropy_ptr = optional_rows<const float>(grad_entropy, logits, rows, "grad_entropy", at::kFloat);
  const float* grad_mean_ptr = optional_rows<const float>(grad_mean_logits, logits, rows, "grad_mean_logits", at::kFloat);
  const float* grad_sum_sq_ptr =
      optional_rows<const float>(grad_log_sum_sq_probs, logits, rows, "grad_log_sum_sq_probs", at::kFloat);
  TORCH_CHECK(grad_entropy_ptr == nullptr || entropy_ptr != nullptr, "prefopt: grad_entropy needs entropy");
  TORCH_CHECK(grad_sum_sq_ptr == nullptr || sum_sq_ptr != nullptr, "prefopt: grad_log_sum_sq_probs needs log_sum_sq_probs");
  TORCH_CHECK(column_offset >= 0 && softmax_size >= column_offset + logits.size(2),
              "prefopt: the logits' columns [", column_offset, ", ", column_offset + logits.size(2),
              ") must lie in a softmax over ", softmax_size, " columns");
  if (rows == 0) return;

  const cudaError_t status = prefopt_token_stats_backward(
      logits.data_ptr(), grad_logits.data_ptr(), dtype_code(logits, "logits"), logits.size(0), logits.size(1), logits.size(2),
      column_offset, softmax_size, logits.stride(0), logits.stride(1), grad_logits.stride(0), grad_logits.stride(1), labels.data_ptr(),
      labels.scalar_type() == at::kLong, ignore_index, inverse_temperature(temperature), softcap_value(softcap),
      lse.data_ptr<float>(), residual_ptr, entropy_ptr, sum_sq_ptr, grad_logps.data_ptr<float>(), grad_entropy_ptr, grad_mean_ptr,
      grad_sum_sq_ptr, multiprocessors(logits), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "prefopt: the CUDA token-stats backward failed to launch: ",
              cudaGetErrorString(status));
}

// ---- Preference losses ----

// An output (or upstream gradient) of the loss: contiguous, of shape `sizes`, in the dtype and on
// the device of `chosen`.
void* loss_tensor(const at::Tensor& tensor, const at::Tensor& chosen, at::IntArrayRef sizes, const char* name) {
  TORCH_CHECK(tensor.device() == chosen.device() && tensor.scalar_type() == chosen.scalar_type() &&
                  tensor.sizes() == sizes && tensor.is_contiguous(),
              "prefopt: ", name, " must be a contiguous ", sizes, " tensor of dtype ", chosen.scalar_type(), " on ",
              chosen.device());
  return tensor.data_ptr();
}

// An optional [B] input of the loss (or 0-d, where `scalar_allowed`).
const void* loss_input(const std::optional<at::Tensor>& tensor, const at::Tensor& chosen, const char* name,
                       bool scalar_allowed = false) {
  if (!tensor.has_value()) return nullptr;
  const bool scalar = scalar_allowed && tensor->dim() == 0;
  return loss_tensor(*tensor, chosen, scalar ? at::IntArrayRef() : chosen.sizes(), name);
}

const void* token_counts(const std::optional<at::Tensor>& lengths, const at::Tensor& chosen, const char* name,
                         int& dtype) {
  if (!lengths.has_value()) return nullptr;
  TORCH_CHECK(lengths->device() == chosen.device(), "prefopt: ", name, " must be on ", chosen.device());
  TORCH_CHECK(lengths->dim() == 1 && lengths->numel() == chosen.numel() && lengths->is_contiguous(),
              "prefopt: ", name, " must be a contiguous [", chosen.numel(), "] tensor");
  const int code = element_code(lengths->scalar_type());
  TORCH_CHECK(code >= 0, "prefopt: ", name, " must be int32, int64 or floating, got ", lengths->scalar_type());
  TORCH_CHECK(dtype < 0 || dtype == code, "prefopt: chosen_lengths and rejected_lengths must have one dtype");
  dtype = code;
  return lengths->data_ptr();
}

struct PreferenceLoss {
  int dtype;
  int64_t n;
  prefopt_preference_inputs inputs;
  prefopt_preference_config config;
};

// The C-ABI description of one loss call, from the operator's arguments (shared by both directions).
PreferenceLoss describe_loss(const at::Tensor& chosen, const std::optional<at::Tensor>& rejected,
                             const std::optional<at::Tensor>& ref_chosen, const std::optional<at::Tensor>& ref_rejected,
                             const std::optional<at::Tensor>& margin, const std::optional<at::Tensor>& chosen_lengths,
                             const std::optional<at::Tensor>& rejected_lengths,
                             const std::optional<at::Tensor>& desirable, const std::optional<at::Tensor>& offset,
                             const std::optional<at::Tensor>& nll, const std::optional<at::Tensor>& pair_weights,
                             int64_t family, at::IntArrayRef loss_types, at::ArrayRef<double> loss_weights, double beta,
                             double label_smoothing, double discopop_tau, double simpo_gamma, double cpo_alpha,
                             double desirable_weight, double undesirable_weight, double offset_value,
                             int64_t f_divergence, double f_alpha_divergence_coef, double alpha, bool mean) {
  TORCH_CHECK(chosen.is_cuda(), "prefopt: chosen must be a CUDA tensor");
  TORCH_CHECK(chosen.dim() == 1 && chosen.numel() >= 1 && chosen.is_contiguous(),
              "prefopt: chosen must be a contiguous [B] tensor with B >= 1");
  TORCH_CHECK(loss_types.size() <= PREFOPT_MAX_LOSS_TYPES && loss_weights.size() == loss_types.size(),
              "prefopt: at most ", PREFOPT_MAX_LOSS_TYPES, " loss types, one weight each");
  PreferenceLoss call{};
  call.dtype = dtype_code(chosen, "chosen");
  call.n = chosen.numel();
  prefopt_preference_inputs& in = call.inputs;
  in.chosen = chosen.data_ptr();
  in.rejected = loss_input(rejected, chosen, "rejected");
  in.ref_chosen = loss_input(ref_chosen, chosen, "ref_chosen");
  in.ref_rejected = loss_input(ref_rejected, chosen, "ref_rejected");
  in.margin = loss_input(margin, chosen, "margin");
  int lengths_dtype = -1;
  in.chosen_lengths = token_counts(chosen_lengths, chosen, "chosen_lengths", lengths_dtype);
  in.rejected_lengths = token_counts(rejected_lengths, chosen, "rejected_lengths", lengths_dtype);
  in.lengths_dtype = lengths_dtype;
  if (desirable.has_value()) {
    TORCH_CHECK(desirable->device() == chosen.device() && desirable->scalar_type() == at::kBool &&
                    desirable->dim() == 1 && desirable->numel() == chosen.numel() && desirable->is_contiguous(),
                "prefopt: desirable must be a contiguous bool [", chosen.numel(), "] tensor on ", chosen.device());
    in.desirable = static_cast<const uint8_t*>(desirable->data_ptr());
  }
  in.offset = offset.has_value() ? loss_tensor(*offset, chosen, {}, "offset") : nullptr;
  in.nll = loss_input(nll, chosen, "nll", true);
  in.nll_is_vector = nll.has_value() && nll->dim() == 1;
  in.pair_weights = loss_input(pair_weights, chosen, "pair_weights");

  prefopt_preference_config& k = call.config;
  k.family = static_cast<int>(family);
  k.num_loss_types = static_cast<int>(loss_types.size());
  for (size_t t = 0; t < loss_types.size(); ++t) {
    k.loss_types[t] = static_cast<int>(loss_types[t]);
    k.loss_weights[t] = loss_weights[t];
  }
  k.beta = beta;
  k.label_smoothing = label_smoothing;
  k.discopop_tau = discopop_tau;
  k.simpo_gamma = simpo_gamma;
  k.cpo_alpha = cpo_alpha;
  k.desirable_weight = desirable_weight;
  k.undesirable_weight = undesirable_weight;
  k.offset_value = offset_value;
  k.mean = mean ? 1 : 0;
  k.f_divergence = static_cast<int>(f_divergence);
  k.f_alpha_divergence_coef = f_alpha_divergence_coef;
  k.alpha = alpha;
  return call;
}

// The gradient of an optional input: null when not asked for; asked for an absent input, an error.
void* gradient_of(const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& input,
                  const at::Tensor& chosen, const char* name) {
  if (!grad.has_value()) return nullptr;
  TORCH_CHECK(input.has_value(), "prefopt: ", name, " was asked for an absent input");
  return loss_tensor(*grad, chosen, input->sizes(), name);
}

void cuda_preference_loss_forward(
    const at::Tensor& chosen, const std::optional<at::Tensor>& rejected, const std::optional<at::Tensor>& ref_chosen,
    const std::optional<at::Tensor>& ref_rejected, const std::optional<at::Tensor>& margin,
    const std::optional<at::Tensor>& chosen_lengths, const std::optional<at::Tensor>& rejected_lengths,
    const std::optional<at::Tensor>& desirable, const std::optional<at::Tensor>& offset,
    const std::optional<at::Tensor>& nll, const std::optional<at::Tensor>& pair_weights, int64_t family,
    at::IntArrayRef loss_types, at::ArrayRef<double> loss_weights, double beta, double label_smoothing,
    double discopop_tau, double simpo_gamma, double cpo_alpha, double desirable_weight, double undesirable_weight,
    double offset_value, int64_t f_divergence, double f_alpha_divergence_coef, double alpha, bool mean,
    const at::Tensor& loss, const at::Tensor& losses, const at::Tensor& chosen_rewards,
    const at::Tensor& rejected_rewards, const at::Tensor& metrics) {
  const c10::cuda::CUDAGuard guard(chosen.device());
  const PreferenceLoss call = describe_loss(chosen, rejected, ref_chosen, ref_rejected, margin, chosen_lengths,
                                            rejected_lengths, desirable, offset, nll, pair_weights, family, loss_types,
                                            loss_weights, beta, label_smoothing, discopop_tau, simpo_gamma, cpo_alpha,
                                            desirable_weight, undesirable_weight, offset_value, f_divergence,
                                            f_alpha_divergence_coef, alpha, mean);
  const int64_t metric_count = prefopt_preference_loss_metric_count(call.config.family);
  TORCH_CHECK(metric_count > 0, "prefopt: unknown loss family ", family);
  const cudaError_t status = prefopt_preference_loss_forward(
      call.dtype, call.n, &call.inputs, &call.config, loss_tensor(loss, chosen, {}, "loss"),
      loss_tensor(losses, chosen, chosen.sizes(), "losses"),
      loss_tensor(chosen_rewards, chosen, chosen.sizes(), "chosen_rewards"),
      loss_tensor(rejected_rewards, chosen, chosen.sizes(), "rejected_rewards"),
      loss_tensor(metrics, chosen, {metric_count}, "metrics"), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "prefopt: the CUDA preference-loss forward was refused or failed to launch: ",
              cudaGetErrorString(status));
}

void cuda_preference_loss_backward(
    const at::Tensor& chosen, const std::optional<at::Tensor>& rejected, const std::optional<at::Tensor>& ref_chosen,
    const std::optional<at::Tensor>& ref_rejected, const std::optional<at::Tensor>& margin,
    const std::optional<at::Tensor>& chosen_lengths, const std::optional<at::Tensor>& rejected_lengths,
    const std::optional<at::Tensor>& desirable, const std::optional<at::Tensor>& offset,
    const std::optional<at::Tensor>& nll, const std::optional<at::Tensor>& pair_weights, int64_t family,
    at::IntArrayRef loss_types, at::ArrayRef<double> loss_weights, double beta, double label_smoothing,
    double discopop_tau, double simpo_gamma, double cpo_alpha, double desirable_weight, double undesirable_weight,
    double offset_value, int64_t f_divergence, double f_alpha_divergence_coef, double alpha, bool mean,
    const at::Tensor& grad_loss, const at::Tensor& grad_losses, const at::Tensor& grad_chosen,
    const std::optional<at::Tensor>& grad_rejected, const std::optional<at::Tensor>& grad_ref_chosen,
    const std::optional<at::Tensor>& grad_ref_rejected, const std::optional<at::Tensor>& grad_margin,
    const std::optional<at::Tensor>& grad_nll) {
  const c10::cuda::CUDAGuard guard(chosen.device());
  const PreferenceLoss call = describe_loss(chosen, rejected, ref_chosen, ref_rejected, margin, chosen_lengths,
                                            rejected_lengths, desirable, offset, nll, pair_weights, family, loss_types,
                                            loss_weights, beta, label_smoothing, discopop_tau, simpo_gamma, cpo_alpha,
                                            desirable_weight, undesirable_weight, offset_value, f_divergence,
                                            f_alpha_divergence_coef, alpha, mean);
  const cudaError_t status = prefopt_preference_loss_backward(
      call.dtype, call.n, &call.inputs, &call.config, loss_tensor(grad_loss, chosen, {}, "grad_loss"),
      loss_tensor(grad_losses, chosen, chosen.sizes(), "grad_losses"),
      loss_tensor(grad_chosen, chosen, chosen.sizes(), "grad_chosen"),
      gradient_of(grad_rejected, rejected, chosen, "grad_rejected"),
      gradient_of(grad_ref_chosen, ref_chosen, chosen, "grad_ref_chosen"),
      gradient_of(grad_ref_rejected, ref_rejected, chosen, "grad_ref_rejected"),
      gradient_of(grad_margin, margin, chosen, "grad_margin"), gradient_of(grad_nll, nll, chosen, "grad_nll"),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "prefopt: the CUDA preference-loss backward was refused or failed to launch: ",
              cudaGetErrorString(status));
}

}  // namespace

// A fragment: the Python custom operators of prefopt/ops.py live in the same namespace.
TORCH_LIBRARY_FRAGMENT(prefopt, m) {
  m.def(
      "cuda_token_stats_forward(Tensor logits, Tensor labels, Tensor(a!) logps, Tensor(b!) lse, "
      "Tensor(c!)? entropy, Tensor(d!)? mean_logits, Tensor(e!)? log_sum_sq_probs, Tensor(f!)? is_top1, "
      "int ignore_index, float temperature, float? softcap, Tensor(g!)? lse_residual) -> ()");
  m.def(
      "cuda_token_stats_backward(Tensor logits, Tensor(a!) grad_logits, Tensor labels, Tensor lse, "
      "Tensor? entropy, Tensor? log_sum_sq_probs, Tensor grad_logps, Tensor? grad_entropy, "
      "Tensor? grad_mean_logits, Tensor? grad_log_sum_sq_probs, int ignore_index, float temperature, "
      "float? softcap, int column_offset, int softmax_size, Tensor? lse_residual) -> ()");
  m.def(
      "cuda_preference_loss_forward(Tensor chosen, Tensor? rejected, Tensor? ref_chosen, Tensor? ref_rejected, "
      "Tensor? margin, Tensor? chosen_lengths, Tensor? rejected_lengths, Tensor? desirable, Tensor? offset, "
      "Tensor? nll, Tensor? pair_weights, int family, int[] loss_types, float[] loss_weights, float beta, "
      "float label_smoothing, float discopop_tau, float simpo_gamma, float cpo_alpha, float desirable_weight, "
      "float undesirable_weight, float offset_value, int f_divergence, float f_alpha_divergence_coef, float alpha, "
      "bool mean, Tensor(a!) loss, Tensor(b!) losses, Tensor(c!) chosen_rewards, "
      "Tensor(d!) rejected_rewards, Tensor(e!) metrics) -> ()");
  m.def(
      "cuda_preference_loss_backward(Tensor chosen, Tensor? rejected, Tensor? ref_chosen, Tensor? ref_rejected, "
      "Tensor? margin, Tensor? chosen_lengths, Tensor? rejected_lengths, Tensor? desirable, Tensor? offset, "
      "Tensor? nll, Tensor? pair_weights, int family, int[] loss_types, float[] loss_weights, float beta, "
      "float label_smoothing, float discopop_tau, float simpo_gamma, float cpo_alpha, float desirable_weight, "
      "float undesirable_weight, float offset_value, int f_divergence, float f_alpha_divergence_coef, float alpha, "
      "bool mean, Tensor grad_loss, Tensor grad_losses, Tensor(a!) grad_chosen, "
      "Tensor(b!)? grad_rejected, Tensor(c!)? grad_ref_chosen, Tensor(d!)? grad_ref_rejected, "
      "Tensor(e!)? grad_margin, Tensor(f!)? grad_nll) -> ()");
}

TORCH_LIBRARY_IMPL(prefopt, CUDA, m) {
  m.impl("cuda_token_stats_forward", &cuda_token_stats_forward);
  m.impl("cuda_token_stats_backward", &cuda_token_stats_backward);
  m.impl("cuda_preference_loss_forward", &cuda_preference_loss_forward);
  m.impl("cuda_preference_loss_backward", &cuda_preference_loss_backward);
}
