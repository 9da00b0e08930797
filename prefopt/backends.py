"""Which backend runs a call, and why another one cannot: the one place a backend is chosen.

Backends: ``"triton"`` (the fused kernels in ``prefopt.kernels``), ``"cuda"`` (the CUDA C++
extension), ``"torch"`` (the chunked PyTorch fallback, any device), ``"reference"`` (plain
PyTorch, the float64-capable oracle). ``"auto"`` takes the fastest that can run on the tensor's
device; the ``PREFOPT_BACKEND`` environment variable, when set, replaces ``"auto"``.

Each operator family asks :func:`resolve` with its own name (:data:`OPS`): the per-token
statistics of logits (``"token_stats"``; ``"selective"`` with TRL's dtype rule), of hidden
states and an LM head (``"linear"``), and the preference losses (``"loss"``, which have fused
kernels and the reference only).
"""

import functools
import importlib
import os
import re
from collections.abc import Callable
from types import ModuleType

import torch

from ._codes import FUSED_BACKENDS

BACKENDS = ("triton", "cuda", "torch", "reference")
BACKEND_CHOICES = ("auto", *BACKENDS)
OPS = ("token_stats", "selective", "linear", "loss")
# The LM-head path's second Triton implementation (statistics inside the GEMM), chosen by name
# until GPU measurements decide between it and "triton" (cuBLAS products and the row kernels).
LINEAR_FUSED = "triton-fused"
LOSS_BACKEND_CHOICES = ("auto", *FUSED_BACKENDS, "reference")
# The dtypes the fused loss kernels read and write; float16 and bfloat16 are computed in float32.
LOSS_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ENV_VARIABLE = "PREFOPT_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name and cannot run here; the message says why."""


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("prefopt.kernels")
    except ImportError as error:
        return f"Triton cannot be imported ({error}); install it with `pip install triton`"
    return None


def _interpreted(function) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(function, InterpretedFunction)


def triton_interpreting() -> bool:
    """Whether the Triton kernels run through Triton's CPU interpreter: TRITON_INTERPRET=1 was
    set before Triton was first imported."""
    if _triton_import_error() is not None:
        return False
    import triton.language as tl

    from .kernels.token_stats_fwd import _token_stats_fwd_kernel

    return _interpreted(_token_stats_fwd_kernel) and _interpreted(tl.cdiv)


def _release(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


@functools.cache
def interpreter_numpy_conflict() -> str | None:
    """Why Triton's interpreter cannot run prefopt's kernels with the installed NumPy, or None.

    Triton 3.6's interpreter turns a loop bound held in a 1-element array into a Python int with
    ``int(array)``, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"); Triton 3.7 squeezes the array first. Compiled kernels do not use NumPy.
    """
    import numpy
    import triton

    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run with NumPy {numpy.__version__} (it needs "
                "NumPy < 2.4, or Triton >= 3.7): pip install 'numpy<2.4'")
    return None


def _mixed_interpreter_state() -> bool:
    """TRITON_INTERPRET=1 was set after Triton was imported (torch.compile imports it) but before
    prefopt's kernels were: they are interpreted, Triton's own library functions are not, and
    the kernels would fail inside the interpreter."""
    import triton.language as tl

    from .kernels.token_stats_fwd import _token_stats_fwd_kernel

    return _interpreted(_token_stats_fwd_kernel) != _interpreted(tl.cdiv)


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on tensors of ``device``, else the reason it cannot."""
    if backend in ("torch", "reference"):
        return None
    if backend == "cuda":
        from . import cuda_ext

        reason = cuda_ext.unavailable_reason(device)
        return None if reason is None else f"no CUDA C++ extension available: {reason}"
    if backend == "triton":
        import_error = _triton_import_error()
        if import_error is not None:
            return import_error
        if _mixed_interpreter_state():
            return (
                "TRITON_INTERPRET changed after Triton was imported, so prefopt's kernels and "
                "Triton's own library were built for different modes; set it in the environment "
                "before Python starts"
            )
        if triton_interpreting():
            return interpreter_numpy_conflict()
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            reason = "the Triton kernels need a CUDA tensor and got a CPU one"
            if not torch.cuda.is_available():
                reason += " (no CUDA GPU is visible to PyTorch)"
            return reason + "; set TRITON_INTERPRET=1 in the environment before Python starts to run them on CPU"
        return f"the Triton kernels run on CUDA devices, not on {device.type}"
    raise ValueError(f"backend: expected one of {BACKEND_CHOICES}, got {backend!r}")


# A fact about this process, not about the traced values: torch.compile evaluates it once while
# tracing instead of tracing into the import machinery. This is what
# torch.compiler.assume_constant_result does, but calling it imports torch._dynamo, which would add
# over a second to every `import prefopt`; tests/test_backends.py checks that both agree.
unavailable_reason._dynamo_marked_constant = True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for a call on ``device``: checks a named one, chooses for "auto"."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend: expected one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get(ENV_VARIABLE, "auto")
        if override not in BACKEND_CHOICES:
            raise ValueError(f"{ENV_VARIABLE}: expected one of {BACKEND_CHOICES}, got {override!r}")
        backend = override
    if backend == "auto":
        # Triton stays the choice on CUDA tensors even where the CUDA C++ extension could run:
        # "cuda" becomes the default only once GPU benchmarks (benches/) show it faster there.
        if device.type == "cuda" and unavailable_reason("triton", device) is None:
            return "triton"
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} cannot run on {device.type}: {reason}")
    return backend


def resolve(op: str, backend: object, device: torch.device, dtype: torch.dtype, *,
            unfused: str | None = None) -> str:
    """The concrete backend that runs operator family ``op`` (one of :data:`OPS`) on tensors of
    ``device`` and ``dtype``: checks a named backend, chooses for ``"auto"``.

    - ``"token_stats"``: any of :data:`BACKENDS`.
    - ``"selective"``: TRL's ``selective_log_softmax`` semantics: ``"reference"``, the backend
      that computes in float64, for float64 logits (as TRL does, materializing the
      log-softmax); else as ``"token_stats"``.
    - ``"linear"``: the same, and :data:`LINEAR_FUSED`; the fused kernels read bf16/fp16/fp32
      hidden states, so ``"auto"`` on float64 takes ``"torch"`` and a named fused backend raises
      ``TypeError``.
    - ``"loss"``: :data:`LOSS_BACKEND_CHOICES`; ``"auto"`` takes the fused kernel of the backend
      ``"token_stats"`` would pick when that kernel can run, else ``"reference"``. ``unfused``
      says why no fused kernel can compute this particular call (None when one can).

    Raises ``ValueError`` for an unknown ``op`` or ``backend`` and ``BackendUnavailableError``
    for a named backend that cannot run here, saying why.
    """
    if op == "token_stats":
        return resolve_backend(backend, device)
    if op == "selective":
        if dtype == torch.float64:
            if backend not in BACKEND_CHOICES:
                raise ValueError(f"backend: expected one of {BACKEND_CHOICES}, got {backend!r}")
            return "reference"
        return resolve_backend(backend, device)
    if op == "linear":
        if backend == LINEAR_FUSED:
            resolve_backend("triton", device)  # raises, saying why, where Triton cannot run
            resolved = LINEAR_FUSED
        else:
            resolved = resolve_backend(backend, device)
        if resolved in (*FUSED_BACKENDS, LINEAR_FUSED) and dtype == torch.float64:
            if backend == "auto":
                return "torch"
            raise TypeError(f"hidden: backend={resolved!r} takes bfloat16, float16 or float32, got torch.float64; "
                            "use backend='torch' or 'reference'")
        return resolved
    if op == "loss":
        if not isinstance(backend, str) or backend not in LOSS_BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {list(LOSS_BACKEND_CHOICES)} for the losses, got {backend!r}")
        if backend == "reference":
            return backend
        if unfused is None and dtype not in LOSS_FUSED_DTYPES:
            unfused = f"the fused kernel reads {[str(d) for d in LOSS_FUSED_DTYPES]}, got {dtype}"
        if backend == "auto":
            chosen = resolve_backend("auto", device)
            fusable = chosen in FUSED_BACKENDS and unfused is None and unavailable_reason(chosen, device) is None
            return chosen if fusable else "reference"
        reason = unfused if unfused is not None else unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"backend={backend!r} cannot compute this loss on {device.type}: {reason}")
        return backend
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


def row_kernels(backend: str) -> ModuleType:
    """The module whose ``token_stats_forward`` / ``token_stats_backward`` run the per-row
    statistics on ``backend`` ("triton", "cuda" or "torch", already resolved). The CUDA
    extension is compiled on first use; it raises ``BackendUnavailableError`` saying why not."""
    if backend == "triton":
        from . import kernels

        return kernels
    if backend == "cuda":
        from . import cuda_ext

        cuda_ext.load()
        return cuda_ext
    if backend == "torch":
        from .logprobs import torch_backend

        return torch_backend
    raise ValueError(f"backend: the fused operators run 'triton', 'cuda' or 'torch', got {backend!r}")


def loss_kernel(backend: str) -> Callable:
    """The launcher ``(call, outputs, grads)`` of the fused loss kernel of ``backend`` ("triton" or
    "cuda", already resolved; see ``prefopt.losses.fused``)."""
    if backend == "triton":
        from .kernels import preference_loss

        return preference_loss.launch
    if backend == "cuda":
        from . import cuda_ext

        return cuda_ext.preference_loss
    raise ValueError(f"backend: the fused loss kernels run {FUSED_BACKENDS}, got {backend!r}")
