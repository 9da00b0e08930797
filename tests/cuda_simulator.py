"""The CUDA C++ kernels' own source on the CPU: csrc/*.cu compiled as C++ with
csrc/testing/host_simulator.h into a CPU library, behind operators registered with
csrc/binding.cpp's own schemas (namespace prefopt_sim).

tests/conftest.py makes it the ``backend`` fixture's ``"cuda-sim"`` value where no GPU is
present: every test that takes ``backend`` then also runs with backend="cuda" through the real
Python path (prefopt.logprobs.op or the fused losses -> prefopt.cuda_ext -> operators with binding.cpp's
schemas -> C launchers) and the simulated kernels. This checks indexing, split-V, alignment,
ignored rows and the math; it does not replace running the compiled kernels on a GPU, where the
suite runs with backend="cuda".
"""

import ctypes
import functools
import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from prefopt import backends, cuda_ext

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CSRC = Path(__file__).resolve().parent.parent / "csrc"
KERNEL_SOURCES = sorted(CSRC.glob("*.cu"))
H200_MULTIPROCESSORS = 132
TOOLKIT, TOOLKIT_MISSING = cuda_ext.find_cuda_toolkit()


@functools.cache
def cuda_include_flags() -> tuple[str, ...] | None:
    """-I flags for the CUDA toolkit headers when compiling with g++ (the toolkit the extension's
    build uses)."""
    if TOOLKIT is None:
        return None
    include = TOOLKIT / "include"
    flags = [f"-I{include}"]
    if (include / "cccl").is_dir():
        flags.append(f"-I{include / 'cccl'}")
    return tuple(flags)


DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
COUNT_DTYPE_CODES = {**DTYPE_CODES, torch.int32: 4, torch.int64: 5}
SCHEMAS = re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)\)', (CSRC / "binding.cpp").read_text())
MAX_LOSS_TYPES = 16


class PreferenceInputs(ctypes.Structure):
    """prefopt_preference_inputs of csrc/prefopt_csrc.h."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("chosen", "rejected", "ref_chosen", "ref_rejected", "margin",
                                                      "chosen_lengths", "rejected_lengths")] + [
        ("lengths_dtype", ctypes.c_int), ("desirable", ctypes.c_void_p), ("offset", ctypes.c_void_p),
        ("nll", ctypes.c_void_p), ("nll_is_vector", ctypes.c_int), ("pair_weights", ctypes.c_void_p)]


class PreferenceConfig(ctypes.Structure):
    """prefopt_preference_config of csrc/prefopt_csrc.h."""

    _fields_ = [("family", ctypes.c_int), ("num_loss_types", ctypes.c_int),
                ("loss_types", ctypes.c_int * MAX_LOSS_TYPES), ("loss_weights", ctypes.c_double * MAX_LOSS_TYPES)] + [
        (name, ctypes.c_double) for name in ("beta", "label_smoothing", "discopop_tau", "simpo_gamma", "cpo_alpha",
                                             "desirable_weight", "undesirable_weight", "offset_value")] + [
        ("mean", ctypes.c_int), ("f_divergence", ctypes.c_int), ("f_alpha_divergence_coef", ctypes.c_double),
        ("alpha", ctypes.c_double)]


@pytest.fixture(scope="session")
def simulator_library(tmp_path_factory) -> ctypes.CDLL:
    """The kernels of csrc/*.cu built as a CPU library (csrc/testing/host_simulator.h)."""
    if DEVICE.type != "cpu":
        pytest.skip("a GPU is present: the compiled kernels run in the main suite instead")
    include = cuda_include_flags()
    if shutil.which("g++") is None or include is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (cuda_fp16.h, cuda_bf16.h)")
    library_path = tmp_path_factory.mktemp("simulator") / "libprefopt_sim.so"
    command = ["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-Wno-attributes",
               f"-I{CSRC}", *include, "-include", str(CSRC / "testing" / "host_simulator.h"),
               *itertools.chain.from_iterable(("-x", "c++", str(source)) for source in KERNEL_SOURCES),
               "-o", str(library_path), "-lpthread"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lib = ctypes.CDLL(str(library_path))
    c = ctypes
    lib.prefopt_token_stats_forward.restype = c.c_int
    lib.prefopt_token_stats_forward.argtypes = [
        c.c_void_p, c.c_int, *[c.c_int64] * 5, c.c_void_p, c.c_int, c.c_int64, c.c_float, c.c_float,
        *[c.c_void_p] * 7, c.c_void_p, c.c_int, c.c_void_p]
    lib.prefopt_token_stats_backward.restype = c.c_int
    lib.prefopt_token_stats_backward.argtypes = [
        c.c_void_p, c.c_void_p, c.c_int, *[c.c_int64] * 9, c.c_void_p, c.c_int, c.c_int64, c.c_float, c.c_float,
        *[c.c_void_p] * 8, c.c_int, c.c_void_p]
    lib.prefopt_token_stats_forward_splits.restype = c.c_int
    lib.prefopt_token_stats_forward_splits.argtypes = [c.c_int64, c.c_int64, c.c_int, c.c_int]
    lib.prefopt_token_stats_forward_workspace_bytes.restype = c.c_size_t
    lib.prefopt_token_stats_forward_workspace_bytes.argtypes = [c.c_int64, c.c_int]
    loss_call = [c.c_int, c.c_int64, c.POINTER(PreferenceInputs), c.POINTER(PreferenceConfig)]
    lib.prefopt_preference_loss_forward.restype = c.c_int
    lib.prefopt_preference_loss_forward.argtypes = [*loss_call, *[c.c_void_p] * 6]
    lib.prefopt_preference_loss_backward.restype = c.c_int
    lib.prefopt_preference_loss_backward.argtypes = [*loss_call, *[c.c_void_p] * 9]
    lib.prefopt_preference_loss_metric_count.restype = c.c_int
    lib.prefopt_preference_loss_metric_count.argtypes = [c.c_int]
    return lib


def pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def describe_loss(chosen, rejected, ref_chosen, ref_rejected, margin, chosen_lengths, rejected_lengths, desirable,
                  offset, nll, pair_weights, family, loss_types, loss_weights, beta, label_smoothing, discopop_tau,
                  simpo_gamma, cpo_alpha, desirable_weight, undesirable_weight, offset_value, f_divergence,
                  f_alpha_divergence_coef, alpha, mean):
    """The C-ABI description of a loss call, from the operator's arguments (binding.cpp's
    describe_loss, without its checks, which run where torch has CUDA)."""
    lengths = chosen_lengths if chosen_lengths is not None else rejected_lengths
    inputs = PreferenceInputs(
        *map(pointer, (chosen, rejected, ref_chosen, ref_rejected, margin, chosen_lengths, rejected_lengths)),
        -1 if lengths is None else COUNT_DTYPE_CODES[lengths.dtype], pointer(desirable), pointer(offset),
        pointer(nll), int(nll is not None and nll.dim() == 1), pointer(pair_weights))
    config = PreferenceConfig(
        family, len(loss_types), (ctypes.c_int * MAX_LOSS_TYPES)(*loss_types),
        (ctypes.c_double * MAX_LOSS_TYPES)(*loss_weights), beta, label_smoothing, discopop_tau, simpo_gamma,
        cpo_alpha, desirable_weight, undesirable_weight, offset_value, int(mean), f_divergence,
        f_alpha_divergence_coef, alpha)
    return DTYPE_CODES[chosen.dtype], chosen.numel(), inputs, config


LOSS_ARGUMENTS = 26  # the operators' arguments before their outputs (or upstream gradients)


@pytest.fixture(scope="session")
def simulator(simulator_library):
    """The operators of binding.cpp registered under the namespace prefopt_sim, implemented as
    binding.cpp implements them, on CPU tensors, with the simulated kernels. Yields the token-stats
    forward (with an optional `splits`)."""
    lib = simulator_library

    def forward(logits, labels, logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1, ignore_index,
                temperature, softcap, lse_residual=None, splits=None):
        outer, inner, vocab_size = logits.shape
        rows = outer * inner
        dtype = DTYPE_CODES[logits.dtype]
        if splits is None:
            splits = lib.prefopt_token_stats_forward_splits(rows, vocab_size, dtype, H200_MULTIPROCESSORS)
        workspace = torch.empty(lib.prefopt_token_stats_forward_workspace_bytes(rows, splits), dtype=torch.uint8)
        status = lib.prefopt_token_stats_forward(
            logits.data_ptr(), dtype, outer, inner, vocab_size, logits.stride(0), logits.stride(1),
            labels.data_ptr(), labels.dtype == torch.int64, ignore_index, 1.0 / temperature,
            0.0 if softcap is None else softcap, logps.data_ptr(), lse.data_ptr(), pointer(lse_residual),
            pointer(entropy), pointer(mean_logits), pointer(log_sum_sq_probs), pointer(is_top1),
            workspace.data_ptr() if workspace.numel() else None, splits, None)
        assert status == 0, f"cudaError {status}"

    def backward(logits, grad_logits, labels, lse, entropy, log_sum_sq_probs, grad_logps, grad_entropy,
                 grad_mean_logits, grad_log_sum_sq_probs, ignore_index, temperature, softcap, column_offset,
                 softmax_size, lse_residual):
        outer, inner, vocab_size = logits.shape
        status = lib.prefopt_token_stats_backward(
            logits.data_ptr(), grad_logits.data_ptr(), DTYPE_CODES[logits.dtype], outer, inner, vocab_size,
            column_offset, softmax_size, logits.stride(0), logits.stride(1), grad_logits.stride(0), grad_logits.stride(1), labels.data_ptr(),
            labels.dtype == torch.int64, ignore_index, 1.0 / temperature, 0.0 if softcap is None else softcap,
            lse.data_ptr(), pointer(lse_residual), pointer(entropy), pointer(log_sum_sq_probs), grad_logps.data_ptr(),
            pointer(grad_entropy), pointer(grad_mean_logits), pointer(grad_log_sum_sq_probs),
            H200_MULTIPROCESSORS, None)
        assert status == 0, f"cudaError {status}"

    def loss_forward(*arguments):
        dtype, n, inputs, config = describe_loss(*arguments[:LOSS_ARGUMENTS])
        status = lib.prefopt_preference_loss_forward(dtype, n, inputs, config,
                                                     *map(pointer, arguments[LOSS_ARGUMENTS:]), None)
        assert status == 0, f"cudaError {status}"

    def loss_backward(*arguments):
        dtype, n, inputs, config = describe_loss(*arguments[:LOSS_ARGUMENTS])
        status = lib.prefopt_preference_loss_backward(dtype, n, inputs, config,
                                                      *map(pointer, arguments[LOSS_ARGUMENTS:]), None)
        assert status == 0, f"cudaError {status}"

    # binding.cpp's own schema strings: the Python launchers of cuda_ext must call them correctly.
    library = torch.library.Library("prefopt_sim", "FRAGMENT")
    assert len(SCHEMAS) == 4, SCHEMAS
    for schema in SCHEMAS:
        library.define("".join(re.findall(r'"([^"]*)"', schema)))
    library.impl("cuda_token_stats_forward", forward, "CPU")
    library.impl("cuda_token_stats_backward", backward, "CPU")
    library.impl("cuda_preference_loss_forward", loss_forward, "CPU")
    library.impl("cuda_preference_loss_backward", loss_backward, "CPU")
    yield forward
    library._destroy()


@pytest.fixture
def cuda_on_cpu(simulator, monkeypatch):
    """backend="cuda" on CPU tensors, served by the simulated kernels."""
    monkeypatch.setattr(cuda_ext, "_ops", lambda: torch.ops.prefopt_sim)
    monkeypatch.setattr(cuda_ext, "load", lambda verbose=False: "simulated")
    real_reason = backends.unavailable_reason

    def reason(backend, device):
        return None if backend == "cuda" else real_reason(backend, device)

    monkeypatch.setattr(backends, "unavailable_reason", reason)
    return simulator
