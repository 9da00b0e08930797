// Registers the C-ABI launchers of csrc/*.cu as torch operators in the `prefopt` namespace:
//
//   prefopt::cuda_token_stats_forward   (fills logps, lse and the asked-for statistics)
//   prefopt::cuda_token_stats_backward  (writes the logits gradient; in place when grad_logits is
//                                        the logits tensor itself)
//
// They have the contract of the Triton launchers in kernels/ (see prefopt/cuda_ext.py, which calls
// them from the Python custom operators of prefopt/ops.py): logits is a [outer, inner, V] view
// with a contiguous last dimension, the per-row tensors are flat [outer * inner] and contiguous.
// The work is enqueued on the current CUDA stream; nothing synchronizes with the host.
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

int dtype_code(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return PREFOPT_FLOAT32;
    case at::kHalf: return PREFOPT_FLOAT16;
    case at::kBFloat16: return PREFOPT_BFLOAT16;
    case at::kDouble: return PREFOPT_FLOAT64;
    default: TORCH_CHECK(false, "prefopt: logits must be float32, float16, bfloat16 or float64, got ", logits.scalar_type());
  }
  return -1;
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
                              std::optional<double> softcap) {
  check_logits(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0) * logits.size(1);
  const int64_t vocab_size = logits.size(2);
  const int dtype = dtype_code(logits);
  check_rows(labels, logits, rows, "labels", {at::kLong, at::kInt});
  check_rows(logps, logits, rows, "logps", {at::kFloat});
  check_rows(lse, logits, rows, "lse", {at::kFloat});
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
      softcap_value(softcap), logps.data_ptr<float>(), lse.data_ptr<float>(), entropy_ptr, mean_ptr, sum_sq_ptr,
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
                               double temperature, std::optional<double> softcap) {
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
  const float* entropy_ptr = optional_rows<const float>(entropy, logits, rows, "entropy", at::kFloat);
  const float* sum_sq_ptr = optional_rows<const float>(log_sum_sq_probs, logits, rows, "log_sum_sq_probs", at::kFloat);
  const float* grad_entropy_ptr = optional_rows<const float>(grad_entropy, logits, rows, "grad_entropy", at::kFloat);
  const float* grad_mean_ptr = optional_rows<const float>(grad_mean_logits, logits, rows, "grad_mean_logits", at::kFloat);
  const float* grad_sum_sq_ptr =
      optional_rows<const float>(grad_log_sum_sq_probs, logits, rows, "grad_log_sum_sq_probs", at::kFloat);
  TORCH_CHECK(grad_entropy_ptr == nullptr || entropy_ptr != nullptr, "prefopt: grad_entropy needs entropy");
  TORCH_CHECK(grad_sum_sq_ptr == nullptr || sum_sq_ptr != nullptr, "prefopt: grad_log_sum_sq_probs needs log_sum_sq_probs");
  if (rows == 0) return;

  const cudaError_t status = prefopt_token_stats_backward(
      logits.data_ptr(), grad_logits.data_ptr(), dtype_code(logits), logits.size(0), logits.size(1), logits.size(2),
      logits.stride(0), logits.stride(1), grad_logits.stride(0), grad_logits.stride(1), labels.data_ptr(),
      labels.scalar_type() == at::kLong, ignore_index, inverse_temperature(temperature), softcap_value(softcap),
      lse.data_ptr<float>(), entropy_ptr, sum_sq_ptr, grad_logps.data_ptr<float>(), grad_entropy_ptr, grad_mean_ptr,
      grad_sum_sq_ptr, multiprocessors(logits), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "prefopt: the CUDA token-stats backward failed to launch: ",
              cudaGetErrorString(status));
}

}  // namespace

// A fragment: the Python custom operators of prefopt/ops.py live in the same namespace.
TORCH_LIBRARY_FRAGMENT(prefopt, m) {
  m.def(
      "cuda_token_stats_forward(Tensor logits, Tensor labels, Tensor(a!) logps, Tensor(b!) lse, "
      "Tensor(c!)? entropy, Tensor(d!)? mean_logits, Tensor(e!)? log_sum_sq_probs, Tensor(f!)? is_top1, "
      "int ignore_index, float temperature, float? softcap) -> ()");
  m.def(
      "cuda_token_stats_backward(Tensor logits, Tensor(a!) grad_logits, Tensor labels, Tensor lse, "
      "Tensor? entropy, Tensor? log_sum_sq_probs, Tensor grad_logps, Tensor? grad_entropy, "
      "Tensor? grad_mean_logits, Tensor? grad_log_sum_sq_probs, int ignore_index, float temperature, "
      "float? softcap) -> ()");
}

TORCH_LIBRARY_IMPL(prefopt, CUDA, m) {
  m.impl("cuda_token_stats_forward", &cuda_token_stats_forward);
  m.impl("cuda_token_stats_backward", &cuda_token_stats_backward);
}
