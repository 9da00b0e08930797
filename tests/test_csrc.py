"""The CUDA C++ backend (csrc/) where no GPU may be present.

- Every csrc/*.cu compiles with nvcc for sm_80 and sm_90, with the extension's own flags, and
  ptxas reports no register spills in any kernel (skipped, with the reason, without nvcc).
- The C ABI links into a plain C++ program, whose launchers reject bad arguments with
  cudaErrorInvalidValue before touching a device, and plan split-V layouts as intended; the loss
  codes of prefopt_csrc.h are the ones prefopt.cuda_ext sends.
- csrc/binding.cpp compiles (syntax and types) against the installed torch headers.
- The kernels' own source on the CPU (tests/cuda_simulator.py, which every test taking the
  ``backend`` fixture also runs under, as ``"cuda-sim"``): what the suite does not reach, such as
  forced split counts, ties across splits, alignment and the loss token-count dtypes.
"""

import concurrent.futures
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cuda_simulator import (CSRC, KERNEL_SOURCES, MAX_LOSS_TYPES, TOOLKIT, TOOLKIT_MISSING,
                            cuda_include_flags)

import prefopt
from prefopt import cuda_ext
from prefopt._codes import METRIC_NAMES

NVCC = None if TOOLKIT is None else str(TOOLKIT / "bin" / "nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason=f"nvcc cannot be used: {TOOLKIT_MISSING}")


def nvcc_flags() -> list[str]:
    """The flags the extension is built with (torch's own nvcc defines included), for sm_80 and
    sm_90 in one call."""
    from torch.utils import cpp_extension

    return [*cpp_extension.COMMON_NVCC_FLAGS, *cuda_ext.NVCC_FLAGS, "-std=c++17", f"-I{CSRC}"]


# ptxas -v, per kernel and architecture:
#   ptxas info    : Compiling entry function '_Z...' for 'sm_90'
#   ptxas info    : Function properties for _Z...
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 64 registers, used 1 barriers, 192 bytes smem
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(output: str) -> dict[tuple[str, str], dict[str, int]]:
    kernels: dict[tuple[str, str], dict[str, int]] = {}
    current = None
    for line in output.splitlines():
        if match := ENTRY.search(line):
            current = (match.group(1), match.group(2))
            kernels[current] = {}
        elif current is not None and (match := SPILLS.search(line)):
            kernels[current]["spill_stores"] = int(match.group(1))
            kernels[current]["spill_loads"] = int(match.group(2))
        elif current is not None and (match := REGISTERS.search(line)):
            kernels[current]["registers"] = int(match.group(1))
    return kernels


def demangled(name: str) -> str:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None:
        return name
    return subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every csrc/*.cu compiled to an object for sm_80 + sm_90, the files in parallel:
    {name: (returncode, nvcc output, object path)}."""
    directory = tmp_path_factory.mktemp("csrc_objects")

    def compile_one(source: Path):
        obj = directory / (source.stem + ".o")
        command = [NVCC, *nvcc_flags(), "-Xptxas", "-v", "-c", str(source), "-o", str(obj)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        return source.name, (result.returncode, result.stdout + result.stderr, obj)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, len(KERNEL_SOURCES))) as pool:
        return dict(pool.map(compile_one, KERNEL_SOURCES))


def test_there_are_kernel_sources():
    assert {source.name for source in KERNEL_SOURCES} >= {"token_stats_fwd.cu", "token_stats_bwd.cu",
                                                         "preference_loss.cu"}


# The log-prob kernels, whose layouts count on four resident blocks per SM. The loss kernels run
# as one block per launch and may use every register they need.
RESIDENT_BLOCKS_SOURCES = ("token_stats_fwd.cu", "token_stats_bwd.cu")


@needs_nvcc
@pytest.mark.parametrize("source", [source.name for source in KERNEL_SOURCES])
def test_compiles_for_sm80_and_sm90_without_register_spills(compiled, source):
    returncode, output, _ = compiled[source]
    assert returncode == 0, output
    assert "warning" not in output.lower(), output
    kernels = parse_ptxas(output)
    assert kernels, f"no kernels reported by ptxas -v:\n{output}"
    names = {name for name, _ in kernels}
    for name in names:
        assert {arch for kernel, arch in kernels if kernel == name} == {"sm_80", "sm_90"}, name
    report = "\n".join(
        f"  {arch}  {info.get('registers', '?'):>3} registers  "
        f"spills {info.get('spill_stores')}/{info.get('spill_loads')} B  {demangled(name)}"
        for (name, arch), info in sorted(kernels.items(), key=lambda item: (item[0][1], item[0][0])))
    print(f"\n{source}:\n{report}")
    for (name, arch), info in kernels.items():
        spills = (info.get("spill_stores"), info.get("spill_loads"))
        assert spills == (0, 0), f"{demangled(name)} on {arch} spills:\n{report}"
        if source in RESIDENT_BLOCKS_SOURCES:
            # __launch_bounds__(256, 4): four blocks resident per SM, which the split plans assume.
            assert info.get("registers", 0) <= 64, f"{demangled(name)} on {arch}:\n{report}"


ABI_DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <cuda_runtime_api.h>
#include "prefopt_csrc.h"

static int failures = 0;
#define EXPECT(condition) \
  do { if (!(condition)) { std::printf("FAILED line %d: %s\n", __LINE__, #condition); ++failures; } } while (0)

int main() {
  // Device-looking pointers that are never dereferenced: every call below must be refused, or be
  // a no-op, before anything is launched.
  char* fake = reinterpret_cast<char*>(0x1000);
  float* out = reinterpret_cast<float*>(fake);
  const cudaError_t invalid = cudaErrorInvalidValue;

  // forward(logits, dtype, outer, inner, V, stride_outer, stride_inner, labels, int64, ignore,
  //         inv_T, softcap, logps, lse, lse_residual, entropy, mean, sum_sq, top1, workspace, splits, stream)
  EXPECT(prefopt_token_stats_forward(fake, PREFOPT_BFLOAT16, 0, 5, 7, 35, 7, fake, 1, -100, 1.f, 0.f,
                                     out, out, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, nullptr) == cudaSuccess);
  EXPECT(prefopt_token_stats_forward(fake, 17, 1, 5, 7, 35, 7, fake, 1, -100, 1.f, 0.f,
                                     out, out, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, nullptr) == invalid);
  EXPECT(prefopt_token_stats_forward(fake, PREFOPT_FLOAT32, 1, 5, 0, 35, 7, fake, 1, -100, 1.f, 0.f,
                                     out, out, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, nullptr) == invalid);
  EXPECT(prefopt_token_stats_forward(fake, PREFOPT_FLOAT32, 1, 5, 7, 35, 7, fake, 1, -100, 1.f, 0.f,
                                     nullptr, out, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, nullptr) == invalid);
  EXPECT(prefopt_token_stats_forward(fake, PREFOPT_FLOAT32, 1, 5, 7, 35, 7, fake, 1, -100, 0.f, 0.f,
                                     out, out, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, nullptr) == invalid);
  EXPECT(prefopt_token_stats_forward(fake, PREFOPT_FLOAT32, 1, 5, 7, 35, 7, fake, 1, -100, 1.f, -1.f,
                                     out, out, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, nullptr) == invalid);
  EXPECT(prefopt_token_stats_forward(fake, PREFOPT_FLOAT32, 1, 5, 7, 35, 7, fake, 1, -100, 1.f, 0.f,
                                     out, out, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 2, nullptr) == invalid);
  EXPECT(prefopt_token_stats_forward(fake, PREFOPT_FLOAT32, 1, 5, 7, 35, 7, fake, 1, -100, 1.f, 0.f,
                                     out, out, nullptr, nullptr, nullptr, nullptr, nullptr, fake, PREFOPT_MAX_FORWARD_SPLITS + 1,
                                     nullptr) == invalid);
  EXPECT(prefopt_token_stats_forward(fake, PREFOPT_FLOAT32, 1, 5, (1LL << 31), 35, 7, fake, 1, -100, 1.f, 0.f,
                                     out, out, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, nullptr) == invalid);

  // backward(logits, grad, dtype, outer, inner, V, column_offset, softmax_size, so, si, gso, gsi, labels,
  //          int64, ignore, inv_T, softcap, lse, lse_residual, entropy, sum_sq, g_logps, g_entropy, g_mean, g_sum_sq, SMs, stream)
  EXPECT(prefopt_token_stats_backward(fake, fake, PREFOPT_FLOAT16, 3, 0, 9, 0, 9, 9, 9, 9, 9, fake, 0, -100, 1.f, 0.f,
                                      out, nullptr, nullptr, nullptr, out, nullptr, nullptr, nullptr, 132,
                                      nullptr) == cudaSuccess);
  EXPECT(prefopt_token_stats_backward(fake, fake, PREFOPT_FLOAT16, 3, 1, 9, 0, 9, 9, 9, 9, 9, fake, 0, -100, 1.f, 0.f,
                                      out, nullptr, nullptr, nullptr, out, out, nullptr, nullptr, 132, nullptr) == invalid);
  EXPECT(prefopt_token_stats_backward(fake, fake, PREFOPT_FLOAT16, 3, 1, 9, 0, 9, 9, 9, 9, 9, fake, 0, -100, 1.f, 0.f,
                                      out, nullptr, nullptr, nullptr, out, nullptr, nullptr, out, 132, nullptr) == invalid);
  EXPECT(prefopt_token_stats_backward(fake, nullptr, PREFOPT_FLOAT16, 3, 1, 9, 0, 9, 9, 9, 9, 9, fake, 0, -100, 1.f, 0.f,
                                      out, nullptr, nullptr, nullptr, out, nullptr, nullptr, nullptr, 132, nullptr) == invalid);
  EXPECT(prefopt_token_stats_backward(fake, fake, -1, 3, 1, 9, 0, 9, 9, 9, 9, 9, fake, 0, -100, 1.f, 0.f,
                                      out, nullptr, nullptr, nullptr, out, nullptr, nullptr, nullptr, 132, nullptr) == invalid);
  // A tile of columns must lie inside its softmax: [column_offset, column_offset + V) within softmax_size.
  EXPECT(prefopt_token_stats_backward(fake, fake, PREFOPT_FLOAT16, 3, 0, 9, 4, 13, 9, 9, 9, 9, fake, 0, -100, 1.f,
                                      0.f, out, nullptr, nullptr, nullptr, out, nullptr, nullptr, nullptr, 132,
                                      nullptr) == cudaSuccess);
  EXPECT(prefopt_token_stats_backward(fake, fake, PREFOPT_FLOAT16, 3, 1, 9, 5, 13, 9, 9, 9, 9, fake, 0, -100, 1.f,
                                      0.f, out, nullptr, nullptr, nullptr, out, nullptr, nullptr, nullptr, 132,
                                      nullptr) == invalid);
  EXPECT(prefopt_token_stats_backward(fake, fake, PREFOPT_FLOAT16, 3, 1, 9, -1, 13, 9, 9, 9, 9, fake, 0, -100, 1.f,
                                      0.f, out, nullptr, nullptr, nullptr, out, nullptr, nullptr, nullptr, 132,
                                      nullptr) == invalid);

  // Split-V plans on an H200 (132 SMs): thousands of rows are never split; a few rows of a
  // 262144 vocabulary are; tiny vocabularies cannot be.
  EXPECT(prefopt_token_stats_forward_splits(16384, 128256, PREFOPT_BFLOAT16, 132) == 1);
  EXPECT(prefopt_token_stats_forward_splits(8192, 262144, PREFOPT_BFLOAT16, 132) == 1);
  const int few = prefopt_token_stats_forward_splits(8, 262144, PREFOPT_BFLOAT16, 132);
  EXPECT(few > 1 && few <= PREFOPT_MAX_FORWARD_SPLITS);
  EXPECT(prefopt_token_stats_forward_splits(1, 262144, PREFOPT_BFLOAT16, 132) >= few);
  EXPECT(prefopt_token_stats_forward_splits(4, 7, PREFOPT_FLOAT32, 132) == 1);
  EXPECT(prefopt_token_stats_forward_splits(4, 262144, 99, 132) == 1);
  EXPECT(prefopt_token_stats_forward_workspace_bytes(8, 1) == 0);
  EXPECT(prefopt_token_stats_forward_workspace_bytes(8, few) == 8u * few * 32u);

  // Preference losses: well-formed calls of each family, then one defect at a time.
  prefopt_preference_inputs dpo{};
  dpo.chosen = dpo.rejected = dpo.ref_chosen = dpo.ref_rejected = fake;
  prefopt_preference_config dpo_config{};
  dpo_config.family = PREFOPT_FAMILY_DPO;
  dpo_config.num_loss_types = 1;
  dpo_config.loss_types[0] = PREFOPT_LOSS_SIGMOID;
  dpo_config.loss_weights[0] = 1.0;
  dpo_config.beta = 0.1;
  dpo_config.discopop_tau = 0.05;
  prefopt_preference_inputs kto{};
  kto.chosen = kto.ref_chosen = fake;
  kto.desirable = reinterpret_cast<const uint8_t*>(fake);
  prefopt_preference_config kto_config = dpo_config;
  kto_config.family = PREFOPT_FAMILY_KTO;
  kto_config.loss_types[0] = PREFOPT_LOSS_KTO;
  prefopt_preference_inputs cpo{};
  cpo.chosen = cpo.rejected = cpo.chosen_lengths = cpo.rejected_lengths = fake;
  cpo.lengths_dtype = PREFOPT_INT64;
  prefopt_preference_config cpo_config = dpo_config;
  cpo_config.family = PREFOPT_FAMILY_CPO;
  cpo_config.loss_types[0] = PREFOPT_LOSS_SIMPO;
  cpo_config.cpo_alpha = 1.0;
  prefopt_preference_inputs orpo{};
  orpo.chosen = orpo.rejected = orpo.nll = fake;
  prefopt_preference_config orpo_config = dpo_config;
  orpo_config.family = PREFOPT_FAMILY_ORPO;
  orpo_config.num_loss_types = 0;

  auto forward = [&](int dtype, int64_t n, const prefopt_preference_inputs* in, const prefopt_preference_config* k) {
    return prefopt_preference_loss_forward(dtype, n, in, k, fake, fake, fake, fake, fake, nullptr);
  };
  auto backward = [&](const prefopt_preference_inputs& in, const prefopt_preference_config& k, void* grad_margin,
                      void* grad_nll) {
    return prefopt_preference_loss_backward(PREFOPT_FLOAT32, 8, &in, &k, fake, fake, fake, nullptr, nullptr, nullptr,
                                            grad_margin, grad_nll, nullptr);
  };
  // Is the call refused once `change` is applied to a copy of the well-formed (in, k)?
  auto refused = [&](const prefopt_preference_inputs& in, const prefopt_preference_config& k, auto change) {
    prefopt_preference_inputs bad_in = in;
    prefopt_preference_config bad_k = k;
    change(bad_in, bad_k);
    return forward(PREFOPT_FLOAT32, 8, &bad_in, &bad_k) == invalid;
  };
  using I = prefopt_preference_inputs;
  using K = prefopt_preference_config;
  EXPECT(forward(PREFOPT_INT64, 8, &dpo, &dpo_config) == invalid);
  EXPECT(forward(17, 8, &dpo, &dpo_config) == invalid);
  EXPECT(forward(PREFOPT_FLOAT32, 0, &dpo, &dpo_config) == invalid);
  EXPECT(forward(PREFOPT_FLOAT32, 8, nullptr, &dpo_config) == invalid);
  EXPECT(forward(PREFOPT_FLOAT32, 8, &dpo, nullptr) == invalid);
  EXPECT(prefopt_preference_loss_forward(PREFOPT_FLOAT32, 8, &dpo, &dpo_config, fake, nullptr, fake, fake, fake,
                                         nullptr) == invalid);
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.beta = 0.0; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.beta = std::nan(""); }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.family = 4; }));
  EXPECT(refused(dpo, dpo_config, [](I& in, K&) { in.chosen = nullptr; }));
  EXPECT(refused(dpo, dpo_config, [](I& in, K&) { in.ref_rejected = nullptr; }));
  EXPECT(refused(dpo, dpo_config, [&](I& in, K&) { in.desirable = kto.desirable; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.num_loss_types = 0; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.num_loss_types = PREFOPT_MAX_LOSS_TYPES + 1; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.loss_types[0] = PREFOPT_LOSS_SIMPO; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.loss_types[0] = -1; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.loss_weights[0] = INFINITY; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.loss_types[0] = PREFOPT_LOSS_ROBUST; k.label_smoothing = 0.5; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.loss_types[0] = PREFOPT_LOSS_EXO_PAIR; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.loss_types[0] = PREFOPT_LOSS_DISCOPOP; k.discopop_tau = 0.0; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.loss_types[0] = PREFOPT_LOSS_SIGMOID_NORM; }));
  EXPECT(refused(dpo, dpo_config, [&](I& in, K&) { in.chosen_lengths = fake; in.lengths_dtype = PREFOPT_INT64; }));
  EXPECT(refused(dpo, dpo_config, [&](I& in, K&) { in.chosen_lengths = in.rejected_lengths = fake; in.lengths_dtype = 9; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.f_divergence = 4; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.f_divergence = 1; k.loss_types[0] = PREFOPT_LOSS_NCA_PAIR; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.f_divergence = 3; k.f_alpha_divergence_coef = NAN; }));
  EXPECT(refused(dpo, dpo_config, [](I&, K& k) { k.alpha = 0.5; }));
  EXPECT(refused(kto, kto_config, [&](I& in, K&) { in.pair_weights = fake; }));
  EXPECT(refused(cpo, cpo_config, [](I&, K& k) { k.alpha = INFINITY; }));
  EXPECT(refused(kto, kto_config, [&](I& in, K&) { in.rejected = fake; }));
  EXPECT(refused(kto, kto_config, [](I& in, K&) { in.desirable = nullptr; }));
  EXPECT(refused(kto, kto_config, [&](I& in, K&) { in.margin = fake; }));
  EXPECT(refused(kto, kto_config, [](I&, K& k) { k.loss_types[0] = PREFOPT_LOSS_SIGMOID; }));
  EXPECT(refused(cpo, cpo_config, [](I& in, K&) { in.chosen_lengths = nullptr; }));
  EXPECT(refused(cpo, cpo_config, [](I& in, K&) { in.rejected_lengths = nullptr; }));
  EXPECT(refused(cpo, cpo_config, [&](I& in, K&) { in.ref_chosen = fake; }));
  EXPECT(refused(cpo, cpo_config, [](I&, K& k) { k.loss_types[0] = PREFOPT_LOSS_ROBUST; }));
  EXPECT(refused(orpo, orpo_config, [](I&, K& k) { k.num_loss_types = 1; }));
  EXPECT(refused(orpo, orpo_config, [](I& in, K&) { in.nll = nullptr; in.nll_is_vector = 1; }));
  EXPECT(backward(dpo, dpo_config, fake, nullptr) == invalid);  // a margin gradient without a margin
  EXPECT(backward(dpo, dpo_config, nullptr, fake) == invalid);  // an NLL gradient without an NLL
  EXPECT(prefopt_preference_loss_backward(PREFOPT_FLOAT32, 8, &dpo, &dpo_config, nullptr, fake, fake, nullptr, nullptr,
                                          nullptr, nullptr, nullptr, nullptr) == invalid);
  EXPECT(prefopt_preference_loss_metric_count(PREFOPT_FAMILY_ORPO) == 9);
  EXPECT(prefopt_preference_loss_metric_count(4) == 0);

  // A well-formed launch on a machine without a usable GPU returns an error, never crashes.
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    // Past the argument checks, only the launch itself fails.
    auto launch_failed = [&](cudaError_t status) { return status != cudaSuccess && status != invalid; };
    EXPECT(launch_failed(forward(PREFOPT_FLOAT32, 8, &dpo, &dpo_config)));
    EXPECT(launch_failed(forward(PREFOPT_BFLOAT16, 8, &kto, &kto_config)));
    EXPECT(launch_failed(forward(PREFOPT_FLOAT64, 8, &cpo, &cpo_config)));
    EXPECT(launch_failed(forward(PREFOPT_FLOAT16, 8, &orpo, &orpo_config)));
    EXPECT(launch_failed(backward(orpo, orpo_config, nullptr, fake)));
    EXPECT(prefopt_token_stats_forward(fake, PREFOPT_FLOAT32, 1, 5, 7, 35, 7, fake, 1, -100, 1.f, 0.f,
                                       out, out, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1,
                                       nullptr) != cudaSuccess);
    EXPECT(prefopt_token_stats_backward(fake, fake, PREFOPT_FLOAT16, 3, 1, 9, 0, 9, 9, 9, 9, 9, fake, 0, -100, 1.f, 0.f,
                                        out, nullptr, nullptr, nullptr, out, nullptr, nullptr, nullptr, 132,
                                        nullptr) != cudaSuccess);
  }
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
"""


@needs_nvcc
def test_c_abi_links_into_a_plain_program_and_rejects_bad_arguments(compiled, tmp_path):
    objects = []
    for source in ("token_stats_fwd.cu", "token_stats_bwd.cu", "preference_loss.cu"):
        returncode, output, obj = compiled[source]
        assert returncode == 0, output
        objects.append(str(obj))
    driver = tmp_path / "abi_check.cpp"
    driver.write_text(ABI_DRIVER)
    executable = tmp_path / "abi_check"
    build = subprocess.run([NVCC, "-std=c++17", f"-I{CSRC}", str(driver), *objects, "-o", str(executable)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    symbols = subprocess.run(["nm", "-g", str(executable)], capture_output=True, text=True).stdout
    for symbol in ("prefopt_token_stats_forward", "prefopt_token_stats_backward",
                   "prefopt_token_stats_forward_splits", "prefopt_token_stats_forward_workspace_bytes",
                   "prefopt_preference_loss_forward", "prefopt_preference_loss_backward",
                   "prefopt_preference_loss_metric_count"):
        assert re.search(rf"\bT {symbol}$", symbols, re.M), f"{symbol} is not an exported C symbol"
    run = subprocess.run([str(executable)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def torch_include_directories() -> list[Path]:
    root = Path(torch.__file__).parent / "include"
    return [root, root / "torch" / "csrc" / "api" / "include"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++) is installed")
@pytest.mark.skipif(cuda_include_flags() is None, reason="the CUDA toolkit headers are not installed")
def test_binding_compiles_against_the_torch_headers(tmp_path):
    """A syntax and type check of csrc/binding.cpp against this torch's headers (it is only built
    for real where torch has CUDA). A CPU build of torch lacks one CMake-generated header of
    c10/cuda; an empty stand-in is enough for the check."""
    include = torch_include_directories()
    if not (include[0] / "torch" / "library.h").is_file():
        pytest.skip("this torch installs no C++ headers")
    flags = []
    if not (include[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        flags.append(f"-I{tmp_path}")
    command = ["g++", "-fsyntax-only", "-std=c++20", *flags, *(f"-I{path}" for path in include),
               *cuda_include_flags(), f"-I{CSRC}", str(CSRC / "binding.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def reference(logits, labels, **kwargs):
    return prefopt.token_stats(logits.double(), labels, backend="reference", **kwargs)


def test_loss_codes_are_those_of_the_header():
    header = (CSRC / "prefopt_csrc.h").read_text()
    families = {name.lower(): int(code) for name, code in re.findall(r"PREFOPT_FAMILY_(\w+) = (\d+)", header)}
    types = {name.lower(): int(code) for name, code in re.findall(r"PREFOPT_LOSS_(\w+) = (\d+)", header)}
    assert families == cuda_ext.LOSS_FAMILY_CODES
    assert types == cuda_ext.LOSS_TYPE_CODES
    assert f"#define PREFOPT_MAX_LOSS_TYPES {MAX_LOSS_TYPES}" in header


def test_loss_metric_counts_are_those_of_the_python_names(simulator_library):
    for family, code in cuda_ext.LOSS_FAMILY_CODES.items():
        assert simulator_library.prefopt_preference_loss_metric_count(code) == len(METRIC_NAMES[family]), family


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float32, torch.bfloat16, torch.float64])
def test_loss_token_counts_of_every_dtype(cuda_on_cpu, dtype):
    """Lengths of any dtype (the fused-loss suite uses int64), read as they are or converted once;
    mixed dtypes too. Zeros count as one token."""
    generator = torch.Generator().manual_seed(5)
    chosen, rejected, ref_chosen, ref_rejected = (-6 * torch.rand(9, 4, generator=generator, dtype=torch.float64)).T
    counts = torch.randint(0, 40, (2, 9), generator=generator)
    chosen_lengths, rejected_lengths = counts[0].to(dtype), counts[1]

    def losses_of(backend):
        dpo = prefopt.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=["ipo", "sigmoid_norm"],
                               chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths.to(dtype),
                               backend=backend)
        cpo = prefopt.cpo_loss(chosen, rejected, loss_type="simpo", chosen_lengths=chosen_lengths,
                               rejected_lengths=rejected_lengths, cpo_alpha=0.5, backend=backend)
        return dpo.losses, cpo.losses

    for fused, expected in zip(losses_of("cuda"), losses_of("reference")):
        torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)


def test_every_output_is_written_and_ignored_rows_are_exact_zeros(cuda_on_cpu):
    vocab_size = 1003
    logits = torch.randn(4, vocab_size).bfloat16()
    labels = torch.tensor([-100, 5, -100, 1002])
    block = logits.view(1, 4, vocab_size)
    outputs = [torch.full((4,), float("nan")) for _ in range(5)]
    is_top1 = torch.ones(4, dtype=torch.bool)
    cuda_ext.token_stats_forward(block, labels, *outputs, is_top1, ignore_index=-100, temperature=1.0, softcap=None)
    for output in outputs:
        assert torch.isfinite(output).all()
        assert (output[labels == -100] == 0).all()
    assert not is_top1[labels == -100].any()
    grad = torch.full_like(logits, float("nan"))
    upstream = [torch.randn(4) for _ in range(4)]
    _, lse, entropy, _, log_sum_sq = outputs
    cuda_ext.token_stats_backward(block, grad.view(1, 4, vocab_size), labels, lse, entropy, log_sum_sq, *upstream,
                                  ignore_index=-100, temperature=1.0, softcap=None)
    assert torch.isfinite(grad).all()
    assert (grad[labels == -100] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_split_count_agrees(cuda_on_cpu, dtype):
    """Split-V with 1 to 64 slices per row (the plan only ever picks some of them)."""
    forward = cuda_on_cpu
    rows, vocab_size = 3, 20011
    logits = (torch.randn(rows, vocab_size) * 4).to(dtype)
    logits[1, 7] = logits[1, 9000] = 40.0  # a tie for the argmax across slices
    labels = torch.tensor([17, 9000, 20010])
    expected = reference(logits, labels, stats=("entropy", "mean_logits", "log_sum_sq_probs", "is_top1"))
    for splits in (1, 2, 3, 7, 16, 64):
        out = [torch.full((rows,), float("nan")) for _ in range(5)]
        is_top1 = torch.zeros(rows, dtype=torch.bool)
        forward(logits.view(1, rows, vocab_size), labels, *out, is_top1, -100, 1.0, None, splits=splits)
        logps, _, entropy, mean_logits, log_sum_sq = out
        for name, value in [("logps", logps), ("entropy", entropy), ("mean_logits", mean_logits),
                            ("log_sum_sq_probs", log_sum_sq)]:
            error = float((value.double() - getattr(expected, name)).norm() / getattr(expected, name).norm())
            assert error <= 1e-5, (splits, name, error)
        assert is_top1.tolist() == [bool(v) for v in expected.is_top1] and not is_top1[1], splits


@pytest.mark.parametrize("splits", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_is_top1_ties_go_to_the_earlier_token_wherever_they_are(cuda_on_cpu, dtype, splits):
    """Tied maxima inside one vector, inside one thread's unrolled step, across threads, across
    split-V slices and into the tail: the earlier column is the argmax."""
    forward = cuda_on_cpu
    vector = 16 // torch.empty((), dtype=dtype).element_size()
    vocab_size = 4 * 1024 * vector + 3  # four full block steps and a tail of 3
    pairs = [(1, 2), (vector + 1, vector + 1 + 256 * vector), (3, 3 * vector + 1), (2, vocab_size - 3 * vector),
             (0, vocab_size - 1), (vocab_size - 3, vocab_size - 2)]
    logits = torch.randn(2 * len(pairs) + 2, vocab_size).to(dtype)
    labels = []
    for row, (first, second) in enumerate(pairs):
        for copy in (2 * row, 2 * row + 1):
            logits[copy, first] = logits[copy, second] = 50.0
        labels += [first, second]
    logits[-2:] = 1.5  # every column tied
    labels += [0, 5]
    labels = torch.tensor(labels)
    rows = len(labels)
    outputs = [torch.empty(rows) for _ in range(5)]
    is_top1 = torch.zeros(rows, dtype=torch.bool)
    forward(logits.view(1, rows, vocab_size), labels, *outputs, is_top1, -100, 1.0, None, splits=splits)
    assert is_top1.tolist() == [True, False] * (len(pairs) + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_results_do_not_depend_on_where_rows_lie(cuda_on_cpu, dtype):
    """Rows at every offset from a 16-byte boundary (vector and scalar loads, and the backward's
    head/body/tail) give bitwise the results of a contiguous copy, and match the reference."""
    vocab_size = 45  # 5 whole bf16 vectors and a tail of 5; 11 fp32 vectors and a tail of 1
    storage = torch.randn(16 + 6 * vocab_size + 16).to(dtype) * 3
    labels = torch.tensor([0, 44, -100, 8, 31, 7])
    for offset in range(9):
        view = storage[offset:offset + 6 * vocab_size].view(6, vocab_size).requires_grad_(True)
        stats = prefopt.token_stats(view, labels, stats=("entropy", "is_top1"), backend="cuda")
        (grad,) = torch.autograd.grad(stats.logps.sum() + stats.entropy.sum(), view)
        contiguous = view.detach().clone().requires_grad_(True)
        copy_stats = prefopt.token_stats(contiguous, labels, stats=("entropy", "is_top1"), backend="cuda")
        (copy_grad,) = torch.autograd.grad(copy_stats.logps.sum() + copy_stats.entropy.sum(), contiguous)
        assert torch.equal(stats.logps, copy_stats.logps) and torch.equal(stats.entropy, copy_stats.entropy)
        assert torch.equal(grad, copy_grad)
        expected = reference(view.detach(), labels, stats=("entropy", "is_top1"))
        tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
        assert float((stats.logps.detach().double() - expected.logps).norm() / expected.logps.norm()) <= tolerance
        assert torch.equal(stats.is_top1, expected.is_top1)


def test_gradient_view_with_a_different_alignment_than_the_logits(cuda_on_cpu):
    """A fresh gradient of logits[:, :-1] with an odd vocabulary: logits and gradient rows sit at
    different offsets from a 16-byte boundary, so the backward takes its scalar path."""
    full = (torch.randn(2, 5, 1001) * 3).bfloat16()
    view = full[:, :-1]
    labels = torch.randint(0, 1001, (2, 4))
    leaf = full.clone().requires_grad_(True)
    logps = prefopt.token_logprobs(leaf[:, :-1], labels, backend="cuda")
    (grad,) = torch.autograd.grad(logps.sum(), leaf)
    exact = view.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(prefopt.token_logprobs(exact, labels, backend="reference").sum(), exact)
    assert float((grad[:, :-1].double() - expected).norm() / expected.norm()) <= 1e-2
    assert (grad[:, -1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_backward_of_column_tiles_is_that_of_whole_rows(simulator, dtype, softcap):
    """The gradient of each tile of columns, launched alone with its column_offset and the whole
    row's softmax_size, is bitwise that tile of the whole rows' gradient: the label term lands in
    the tile that holds the label, the mean-logit term divides by the whole row."""
    rows, vocab_size = 6, 1003
    logits = (torch.randn(1, rows, vocab_size) * 3).to(dtype)
    labels = torch.tensor([0, 1002, -100, 500, 333, 334])
    logps, lse, entropy, log_sum_sq_probs, lse_residual = (torch.empty(rows) for _ in range(5))
    simulator(logits, labels, logps, lse, entropy, None, log_sum_sq_probs, None, -100, 0.7, softcap, lse_residual)
    upstream = [torch.randn(rows) for _ in range(4)]
    arguments = (labels, lse, entropy, log_sum_sq_probs, *upstream, -100, 0.7, softcap)
    whole = torch.empty_like(logits)
    torch.ops.prefopt_sim.cuda_token_stats_backward(logits, whole, *arguments, 0, vocab_size, lse_residual)
    for start, stop in ((0, 256), (256, 333), (333, 334), (334, 1003)):
        tile = logits[:, :, start:stop].contiguous()
        torch.ops.prefopt_sim.cuda_token_stats_backward(tile, tile, *arguments, start, vocab_size, lse_residual)
        assert torch.equal(tile, whole[:, :, start:stop]), (start, stop)


@pytest.fixture
def fresh_extension_state(monkeypatch, tmp_path):
    """cuda_ext as in a new process that could build, with torch's compiler call replaced."""
    from torch.utils import cpp_extension

    calls = []
    monkeypatch.setattr(cuda_ext, "_loaded_library", None)
    monkeypatch.setattr(cuda_ext, "_build_failure", None)
    monkeypatch.setattr(cuda_ext, "build_unavailable_reason", lambda: None)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)  # the build sets it
    monkeypatch.setenv("PREFOPT_CACHE_DIR", str(tmp_path))
    return calls, lambda fake: monkeypatch.setattr(cpp_extension, "load", fake)


def test_lazy_build_compiles_the_sources_for_sm80_and_sm90_once(fresh_extension_state, tmp_path):
    calls, patch_load = fresh_extension_state

    def fake_load(**kwargs):
        calls.append(kwargs)
        return str(Path(kwargs["build_directory"]) / "prefopt_cuda.so")

    patch_load(fake_load)
    library = cuda_ext.load()
    assert cuda_ext.load() == library and len(calls) == 1
    kwargs = calls[0]
    assert Path(kwargs["build_directory"]).parent == tmp_path
    assert [Path(source).name for source in kwargs["sources"]] == list(cuda_ext.SOURCES)
    assert all(Path(source).is_file() for source in kwargs["sources"])
    flags = kwargs["extra_cuda_cflags"]
    for arch in ("80", "90"):
        assert f"-gencode=arch=compute_{arch},code=sm_{arch}" in flags
    assert "-O3" in flags and "--use_fast_math" not in flags
    assert kwargs["is_python_module"] is False  # the library registers torch operators, no module
    assert "loaded from" in cuda_ext.describe()


def test_failed_build_is_reported_with_its_log_and_not_retried(fresh_extension_state):
    calls, patch_load = fresh_extension_state

    def failing_load(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("Error building extension 'prefopt_cuda': nvcc fatal: something")

    patch_load(failing_load)
    for _ in range(2):
        with pytest.raises(prefopt.BackendUnavailableError, match="see .*build.log") as error:
            cuda_ext.load()
    assert len(calls) == 1
    log = Path(re.search(r"see (\S+build\.log)", str(error.value)).group(1))
    assert "nvcc fatal: something" in log.read_text()
    assert str(log) in cuda_ext.describe()


def test_cuda_backend_on_cpu_is_refused_without_the_simulator():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(prefopt.BackendUnavailableError, match="no CUDA C\\+\\+ extension available"):
        prefopt.token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="cuda")


def test_cli_build_fails_with_a_clear_message_where_it_cannot_build():
    if cuda_ext.build_unavailable_reason() is None:
        pytest.skip("the extension can be built here")
    result = subprocess.run([sys.executable, "-m", "prefopt", "build"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "the CUDA C++ extension cannot be built: " + cuda_ext.build_unavailable_reason() in result.stderr


def make_toolkit(root: Path, headers: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


@pytest.fixture
def no_toolkit_set(monkeypatch, tmp_path):
    """find_cuda_toolkit as on a machine whose only toolkits are the ones a test makes."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(cuda_ext, "STANDARD_TOOLKIT_PLACES", (str(tmp_path / "usr-local" / "cuda-*"),))
    cuda_ext.find_cuda_toolkit.cache_clear()
    yield monkeypatch
    cuda_ext.find_cuda_toolkit.cache_clear()


def test_toolkit_behind_a_wrapper_nvcc_is_found_where_toolkits_live(no_toolkit_set, tmp_path):
    # /usr/local/bin/nvcc as a shell wrapper: torch would take /usr/local, which has no headers.
    wrapper = make_toolkit(tmp_path / "wrapper", headers=False)
    make_toolkit(tmp_path / "usr-local" / "cuda-9.2")
    newest = make_toolkit(tmp_path / "usr-local" / "cuda-13.0")
    no_toolkit_set.setenv("PATH", str(wrapper / "bin"))
    assert cuda_ext.find_cuda_toolkit() == (newest, None)


def test_toolkit_behind_a_linked_nvcc_is_its_target(no_toolkit_set, tmp_path):
    toolkit = make_toolkit(tmp_path / "cuda-12.8")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    no_toolkit_set.setenv("PATH", str(tmp_path / "links"))
    assert cuda_ext.find_cuda_toolkit() == (toolkit, None)


def test_cuda_home_wins_and_a_wrong_one_is_named(no_toolkit_set, tmp_path):
    toolkit = make_toolkit(tmp_path / "chosen")
    make_toolkit(tmp_path / "usr-local" / "cuda-13.0")
    no_toolkit_set.setenv("CUDA_HOME", str(toolkit))
    assert cuda_ext.find_cuda_toolkit() == (toolkit, None)
    cuda_ext.find_cuda_toolkit.cache_clear()
    no_toolkit_set.setenv("CUDA_HOME", str(tmp_path))
    root, missing = cuda_ext.find_cuda_toolkit()
    assert root is None and f"CUDA_HOME={tmp_path} is not a CUDA toolkit" in missing


def test_no_toolkit_says_which_variable_to_set(no_toolkit_set, tmp_path):
    wrapper = make_toolkit(tmp_path / "wrapper", headers=False)
    no_toolkit_set.setenv("PATH", str(wrapper / "bin"))
    root, missing = cuda_ext.find_cuda_toolkit()
    assert root is None
    assert str(wrapper / "bin" / "nvcc") in missing and "set CUDA_HOME" in missing


def test_kernel_microbenchmark_drives_the_cuda_launchers(cuda_on_cpu):
    # benches/kernel_bench.py calls the launchers directly, so only a run shows its arguments in
    # the launchers' order: here through the simulated kernels, as on a GPU.
    spec = importlib.util.spec_from_file_location("kernel_bench", CSRC.parent / "benches" / "kernel_bench.py")
    kernel_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_bench)
    rows = kernel_bench.measure_shape("cuda", 5, 300, torch.device("cpu"), calls=1, copy_bandwidth=None)
    assert [(row["kernel"], row["variant"]) for row in rows] == [
        ("forward", "bf16,logps"), ("forward", "bf16,entropy"), ("forward", "bf16,all"),
        ("forward", "bf16,entropy,softcap"), ("backward", "bf16,logps"), ("backward", "bf16,entropy")]
    assert all(row["backend"] == "cuda" and row["median_s"] > 0 and row["bytes"] > 0 for row in rows)
