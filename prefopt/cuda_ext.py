"""The CUDA C++ backend: the kernels of ``csrc/``, built with ``torch.utils.cpp_extension`` (ninja)
and registered as the torch operators ``prefopt::cuda_token_stats_forward``,
``prefopt::cuda_token_stats_backward``, ``prefopt::cuda_preference_loss_forward`` and
``prefopt::cuda_preference_loss_backward`` by ``csrc/binding.cpp``.

- Built lazily the first time ``backend="cuda"`` runs, or ahead of time with
  ``python -m prefopt build``, into a cache directory per (torch, CUDA, Python, sources):
  ``$PREFOPT_CACHE_DIR``, else ``$TORCH_EXTENSIONS_DIR/prefopt``, else ``~/.cache/prefopt``.
- Machine code for sm_80 (A100; also runs on sm_86 and sm_89) and sm_90 (H100, H200), each
  compiled for its own architecture rather than JIT-compiled from an older target's PTX; plus
  compute_90 PTX, which only GPUs newer than Hopper use.
- ``unavailable_reason()`` says why the backend cannot run here (torch without CUDA, no GPU, no
  nvcc, no ninja, a failed build and where its log is), so that importing prefopt never fails.
- ``token_stats_forward`` / ``token_stats_backward`` have exactly the signature and contract of
  ``prefopt.kernels.token_stats_forward`` / ``token_stats_backward`` (the Triton launchers):
  logits as [outer, inner, V] views with a contiguous last dimension, flat [rows] outputs.
- ``preference_loss`` is one launch of the fused loss reduction of a family, forward or backward,
  on the arguments of the operators of ``prefopt.losses.fused``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import threading
import traceback
from pathlib import Path

import torch

from .backends import BackendUnavailableError
from ._codes import F_DIVERGENCE_TYPES, LOSS_FAMILY_CODES, LOSS_TYPE_CODES

EXTENSION_NAME = "prefopt_cuda"
SOURCES = ("binding.cpp", "token_stats_fwd.cu", "token_stats_bwd.cu", "preference_loss.cu")
HEADERS = ("prefopt_csrc.h", "token_stats_common.cuh")
ARCHITECTURES = ("80", "90")
# -O3 with IEEE-accurate math: no --use_fast_math. The kernels call __expf where an approximate
# exponential is intended (arguments z - max <= 0, whose error stays far inside the tests'
# tolerances); log1pf, tanhf and the divisions must stay accurate (log1p of a tiny r is the
# log-prob of a peaked row, and fast-math division would cost relative precision there).
NVCC_FLAGS = (
    "-O3",
    *(f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in ARCHITECTURES),
    "-gencode=arch=compute_90,code=compute_90",
)
CXX_FLAGS = ("-O3",)

# Token counts the loss kernels read in their own dtype (both lengths in one of them).
_TOKEN_COUNT_DTYPES = (torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64)

_lock = threading.Lock()
_loaded_library: str | None = None
_build_failure: str | None = None


def source_directory() -> Path | None:
    """Where csrc/ is: installed as package data ``prefopt/csrc``, or next to the package in a
    source checkout (editable install)."""
    candidates = []
    try:
        spec = importlib.util.find_spec("prefopt.csrc")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(location) for location in spec.submodule_search_locations)
    here = Path(__file__).resolve().parent
    candidates += [here / "csrc", here.parent / "csrc"]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in (*SOURCES, *HEADERS)):
            return candidate
    return None


def _sources_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((directory / name).read_bytes())
    digest.update(" ".join((*NVCC_FLAGS, *CXX_FLAGS)).encode())
    return digest.hexdigest()[:12]


def cache_directory() -> Path:
    """The build directory of this torch, CUDA, Python and these sources (a change to any of them
    gets a fresh directory, so a stale build is never loaded)."""
    if os.environ.get("PREFOPT_CACHE_DIR"):
        root = Path(os.environ["PREFOPT_CACHE_DIR"])
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "prefopt"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefopt"
    sources = source_directory()
    key = (f"{EXTENSION_NAME}-torch{torch.__version__}-cuda{torch.version.cuda}"
           f"-py{sys.version_info.major}{sys.version_info.minor}"
           f"-{_sources_digest(sources) if sources is not None else 'nosources'}")
    return root / re.sub(r"[^A-Za-z0-9._-]", "_", key)


# Where CUDA toolkits are installed when nvcc on PATH does not lead to one; the newest version first.
STANDARD_TOOLKIT_PLACES = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")


def _is_cuda_toolkit(directory: Path) -> bool:
    return (directory / "bin" / "nvcc").is_file() and (directory / "include" / "cuda_runtime.h").is_file()


def _toolkit_version_key(directory: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", directory.name))


@functools.cache  # a fact about this machine; asked by every build and every dispatch to "cuda"
def find_cuda_toolkit() -> tuple[Path | None, str | None]:
    """The CUDA toolkit's root (the directory holding bin/nvcc and include/cuda_runtime.h), or
    None and what to do about it.

    ``CUDA_HOME`` (or ``CUDA_PATH``) wins when set. Otherwise the toolkit is looked for where
    torch does not look: torch takes the parent of the directory of the first ``nvcc`` on PATH,
    which is wrong when that nvcc is a wrapper or a link (``/usr/local/bin/nvcc`` gives
    ``/usr/local``, which has no ``cuda_runtime.h``, and the build then fails on a missing header).
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(variable)
        if value:
            if _is_cuda_toolkit(Path(value)):
                return Path(value), None
            return None, (f"{variable}={value} is not a CUDA toolkit (it needs bin/nvcc and include/cuda_runtime.h): "
                          f"set {variable} to the toolkit's root, e.g. /usr/local/cuda")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates += [Path(nvcc).parent.parent, Path(os.path.realpath(nvcc)).parent.parent]
    for pattern in STANDARD_TOOLKIT_PLACES:
        candidates += sorted((Path(p) for p in glob.glob(pattern)), key=_toolkit_version_key, reverse=True)
    for candidate in candidates:
        if _is_cuda_toolkit(candidate):
            return candidate, None
    found = f" (the nvcc on PATH, {nvcc}, has no include/cuda_runtime.h beside it)" if nvcc else ""
    return None, f"no CUDA toolkit was found{found}: install it, or set CUDA_HOME to its root"


@functools.cache  # facts about this installation; asked on every dispatch to backend="cuda"
def build_unavailable_reason() -> str | None:
    """Why the extension cannot be compiled here (None if it can). A GPU is not needed to build."""
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) was built without CUDA; the extension needs a "
                "CUDA build of torch")
    if source_directory() is None:
        return "the CUDA sources (csrc/) are not installed with this copy of prefopt"
    toolkit, missing = find_cuda_toolkit()
    if toolkit is None:
        return missing
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja was not found (pip install ninja)"
    return None


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why ``backend="cuda"`` cannot run on tensors of ``device`` (None if it can, or if it only
    needs building, which happens on first use). Never builds anything itself."""
    if _loaded_library is None:
        reason = build_unavailable_reason()
        if reason is not None:
            return reason
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    if device is not None and device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got {device.type} ones"
    major, minor = torch.cuda.get_device_capability(device if device is not None and device.type == "cuda" else None)
    if major < 8:
        return f"the GPU is sm_{major}{minor}; the CUDA kernels are built for sm_80 and newer"
    return _build_failure


def _write_log(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "build.log"
    log.write_text(text)
    return log


def _compile_and_load(verbose: bool) -> str:
    from torch.utils import cpp_extension

    sources = source_directory()
    directory = cache_directory()
    directory.mkdir(parents=True, exist_ok=True)
    toolkit, _ = find_cuda_toolkit()
    if toolkit is not None:
        # torch's own guess at import time may be wrong (see find_cuda_toolkit); the build reads
        # this module global for nvcc and the toolkit's headers.
        cpp_extension.CUDA_HOME = str(toolkit)
    # is_python_module=False: the library is loaded with torch.ops.load_library, and its
    # TORCH_LIBRARY_FRAGMENT registers the operators; there is no Python module to import.
    library = cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(sources / name) for name in SOURCES],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        extra_include_paths=[str(sources)],
        build_directory=str(directory),
        verbose=verbose,
        is_python_module=False,
    )
    return str(library)


def load(verbose: bool = False) -> str:
    """Build the extension if needed and load it (once per process); returns the library path.
    Raises ``BackendUnavailableError`` saying why when it cannot be built or loaded."""
    global _loaded_library, _build_failure
    if _loaded_library is not None:
        return _loaded_library
    with _lock:
        if _loaded_library is not None:
            return _loaded_library
        reason = build_unavailable_reason() or _build_failure
        if reason is not None:
            raise BackendUnavailableError(f"the CUDA C++ extension cannot be built: {reason}")
        try:
            _loaded_library = _compile_and_load(verbose)
        except Exception as error:  # a compiler error, a link error, a failed dlopen
            log = _write_log(cache_directory(), "".join(traceback.format_exception(error)))
            _build_failure = f"building or loading the CUDA C++ extension failed; see {log}"
            raise BackendUnavailableError(_build_failure) from None
    return _loaded_library


def build(verbose: bool = True) -> str:
    """Compile ahead of time (``python -m prefopt build``); returns the library path."""
    return load(verbose=verbose)


def describe() -> str:
    """One line for ``python -m prefopt info``."""
    if _loaded_library is not None:
        return f"loaded from {_loaded_library}"
    reason = build_unavailable_reason()
    if reason is not None:
        return f"cannot be built here: {reason}"
    if _build_failure is not None:
        return _build_failure
    directory = cache_directory()
    if (directory / f"{EXTENSION_NAME}.so").is_file():
        return f"built in {directory}"
    return f"not built yet: compiled on first use, or ahead of time with `python -m prefopt build` (into {directory})"


def _ops():
    # The registered operators (a seam for tests/test_csrc.py, which runs the same calls against
    # a CPU simulation of the kernels).
    return torch.ops.prefopt


def token_stats_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    logps: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    mean_logits: torch.Tensor | None,
    log_sum_sq_probs: torch.Tensor | None,
    is_top1: torch.Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    lse_residual: torch.Tensor | None = None,
) -> None:
    """Fill the per-row outputs for one block of rows (contract of
    ``prefopt.kernels.token_stats_forward``): logits [outer, inner, V]; labels and outputs flat
    [outer * inner]; a statistic passed as None is not computed, nor lse_residual."""
    outer, inner, _ = logits.shape
    if outer * inner == 0:
        return
    load()
    _ops().cuda_token_stats_forward(
        logits, labels, logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1,
        int(ignore_index), float(temperature), None if softcap is None else float(softcap), lse_residual,
    )


def token_stats_backward(
    logits: torch.Tensor,
    grad_logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    log_sum_sq_probs: torch.Tensor | None,
    grad_logps: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    grad_mean_logits: torch.Tensor | None,
    grad_log_sum_sq_probs: torch.Tensor | None,
    *,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    column_offset: int = 0,
    softmax_size: int | None = None,
    lse_residual: torch.Tensor | None = None,
) -> None:
    """Write the logits gradient for one block of rows (contract of
    ``prefopt.kernels.token_stats_backward``); ``grad_logits`` may be ``logits`` itself.

    The logits may be one tile of columns of each row: columns [column_offset, column_offset + V)
    of a softmax over ``softmax_size`` columns (default V: whole rows), with labels and per-row
    statistics of the whole rows."""
    outer, inner, vocab_size = logits.shape
    if outer * inner == 0:
        return
    load()
    _ops().cuda_token_stats_backward(
        logits, grad_logits, labels, lse, entropy, log_sum_sq_probs, grad_logps, grad_entropy,
        grad_mean_logits, grad_log_sum_sq_probs, int(ignore_index), float(temperature),
        None if softcap is None else float(softcap), int(column_offset),
        vocab_size if softmax_size is None else int(softmax_size), lse_residual,
    )


def _token_counts(
    chosen_lengths: torch.Tensor | None, rejected_lengths: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The lengths as the kernels read them: as they are when both share a dtype the kernels take,
    else in float64, which holds every count of any integer or floating dtype as the kernels
    would round it (an extra elementwise op, only for such unusual inputs)."""
    present = [t for t in (chosen_lengths, rejected_lengths) if t is not None]
    if len({t.dtype for t in present}) <= 1 and all(t.dtype in _TOKEN_COUNT_DTYPES for t in present):
        return chosen_lengths, rejected_lengths
    return tuple(None if t is None else t.to(torch.float64) for t in (chosen_lengths, rejected_lengths))


def preference_loss(call, outputs, grads) -> None:
    """One launch of the fused loss reduction for ``call`` (a ``prefopt.losses.fused.LossCall``):
    forward when ``outputs`` (a ``LossOutputs``: loss 0-d, losses, chosen_rewards,
    rejected_rewards [B], metrics) is given; backward when ``grads`` (a ``LossGrads``: grad_loss
    0-d, grad_losses [B], then the gradient of chosen, rejected, ref_chosen, ref_rejected, margin
    and nll, each shaped like its input, or None where it is not wanted) is.
    """
    chosen_lengths, rejected_lengths = _token_counts(call.chosen_lengths, call.rejected_lengths)
    codes = [LOSS_TYPE_CODES[kind] for kind in call.loss_types]
    # Only the DPO family weighs its types; the others have one type (or none) of weight 1.
    weights = list(call.loss_weights) if call.family == "dpo" else [1.0] * len(codes)
    arguments = (
        call.chosen, call.rejected, call.ref_chosen, call.ref_rejected, call.margin, chosen_lengths,
        rejected_lengths, call.desirable, call.offset, call.nll, call.pair_weights,
        LOSS_FAMILY_CODES[call.family], codes, weights,
        call.beta, call.label_smoothing, call.discopop_tau, call.simpo_gamma, call.cpo_alpha,
        call.desirable_weight, call.undesirable_weight, call.offset_value,
        F_DIVERGENCE_TYPES.index(call.f_divergence), call.f_alpha_divergence_coef, call.alpha, call.mean,
    )
    load()
    if grads is None:
        _ops().cuda_preference_loss_forward(*arguments, *outputs)
    else:
        _ops().cuda_preference_loss_backward(*arguments, *grads)
