"""Shared set-up: where the fused backends run, and the float64 oracle to compare them with.

Without a CUDA GPU the Triton kernels run through Triton's interpreter, which must be chosen
before they are first imported; hence the environment is set here, before prefopt is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cuda_simulator import cuda_on_cpu, simulator, simulator_library  # noqa: E402, F401 (fixtures)

import prefopt  # noqa: E402
from prefopt.backends import unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Without a GPU, "cuda-sim" runs backend="cuda" on the kernels' source compiled for the CPU
# (tests/cuda_simulator.py); with one, "cuda" runs the compiled kernels.
CUDA = "cuda" if DEVICE.type == "cuda" else "cuda-sim"
FUSED_BACKENDS = ("triton", CUDA, "torch")
ALL_STATS = ("entropy", "mean_logits", "log_sum_sq_probs", "is_top1")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def available_backend(name: str) -> str:
    """``name``, or skip the test with the reason that backend cannot run here."""
    reason = unavailable_reason(name, DEVICE)
    if reason is not None:
        pytest.skip(f"backend {name!r}: {reason}")
    return name


def fixture_backend(request) -> str:
    """The backend a ``backend`` fixture's parameter stands for: "cuda" with the simulated
    kernels in place for "cuda-sim", else the parameter, skipped where it cannot run."""
    if request.param == "cuda-sim":
        request.getfixturevalue("cuda_on_cpu")
        return "cuda"
    return available_backend(request.param)


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request) -> str:
    return fixture_backend(request)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64; exact zeros are required where ref is all zero."""
    out, ref = out.detach().double(), ref.detach().double()
    scale = ref.norm()
    if scale == 0:
        return float((out - ref).norm())
    return float((out - ref).norm() / scale)


def random_logits(shape, dtype, scale: float = 4.0, generator=None) -> torch.Tensor:
    """Fresh random logits with a spread typical of language models (never zeros)."""
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * scale).to(dtype).to(DEVICE)


def random_labels(shape, vocab_size: int, ignored_fraction: float = 0.3, ignore_index: int = -100,
                  generator=None) -> torch.Tensor:
    labels = torch.randint(0, vocab_size, shape, generator=generator)
    ignored = torch.rand(shape, generator=generator) < ignored_fraction
    return torch.where(ignored, ignore_index, labels).to(DEVICE)


def reference_stats(logits: torch.Tensor, labels: torch.Tensor, **kwargs) -> prefopt.TokenStats:
    """The float64 oracle on the same values, differentiable when ``logits`` is."""
    return prefopt.token_stats(logits.double().cpu(), labels.cpu(), backend="reference", **kwargs)
