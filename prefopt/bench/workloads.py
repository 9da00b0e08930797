"""The problems the benchmarks measure: :class:`Workload` (the logits path) and
:class:`LinearWorkload` (the fused linear path), the sweeps and default subsets of them, and their
inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
# "fwd": with the autograd graph (a policy's forward); "fwd-nograd": under torch.no_grad, inputs
# without gradients (a reference model's forward).
LINEAR_DIRECTIONS = ("fwd+bwd", "fwd", "fwd-nograd")
# The matrix products of the fused linear path, on n scored rows: logits [n, H] @ [H, V],
# grad_hidden [n, V] @ [V, H], grad_weight [V, n] @ [n, H].
GEMM_PRODUCTS = ("logits", "grad_hidden", "grad_weight")
IGNORE_INDEX = -100


class _Rows:
    """What the workloads of both paths share: ``tokens`` rows of labels, the leading
    ``ignored_fraction`` of them ignored, over a vocabulary of ``vocab`` in ``dtype``."""

    @property
    def ignored_rows(self) -> int:
        return int(self.tokens * self.ignored_fraction)

    @property
    def scored_rows(self) -> int:
        return self.tokens - self.ignored_rows

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def logits_bytes(self) -> int:
        """Bytes of one [tokens, vocab] logits tensor (for the fused linear path, the one an
        explicit implementation materializes)."""
        return self.tokens * self.vocab * self.element_size


@dataclasses.dataclass(frozen=True)
class Workload(_Rows):
    """One problem of the logits path: ``tokens`` rows of ``vocab`` logits of ``dtype``.

    ``ignored_fraction`` of the rows (the leading ones, like a prompt) carry the ignore label;
    ``direction`` is what is timed: ``"fwd"``, ``"bwd"`` or ``"fwd+bwd"``.
    """

    tokens: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16
    ignored_fraction: float = 0.0
    direction: str = "fwd+bwd"
    path: ClassVar[str] = "logits"

    def __post_init__(self) -> None:
        _check_workload(self, DIRECTIONS, tokens=self.tokens, vocab=self.vocab)

    @property
    def input_bytes(self) -> int:
        """Bytes of one input set (the logits), what the rotation must exceed the cache with."""
        return self.logits_bytes

    def floor_bytes(self) -> int:
        """Bytes the direction must move at least: each pass reads the scored rows once; the
        backward writes the whole gradient (zeros included) once."""
        scored = self.scored_rows * self.vocab * self.element_size
        reads = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[self.direction]
        writes = 0 if self.direction == "fwd" else self.logits_bytes
        return reads * scored + writes

    def name(self) -> str:
        return (f"{self.direction} {self.tokens}x{self.vocab} {dtype_name(self.dtype)}"
                f" ignored={self.ignored_fraction:.0%}")


@dataclasses.dataclass(frozen=True)
class LinearWorkload(_Rows):
    """One problem of the fused linear path: the log-probs of ``tokens`` labels from hidden states
    [tokens, hidden] and an LM-head weight [vocab, hidden], both of ``dtype``.

    ``ignored_fraction`` of the rows (the leading ones, like a prompt) carry the ignore label;
    ``direction`` is what is timed: ``"fwd+bwd"`` (gradients of hidden and weight), ``"fwd"``
    (with the autograd graph, a policy's forward) or ``"fwd-nograd"`` (under torch.no_grad, the
    inputs without gradients: a reference model's forward).
    """

    tokens: int
    hidden: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16
    ignored_fraction: float = 0.0
    direction: str = "fwd+bwd"
    path: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _check_workload(self, LINEAR_DIRECTIONS, tokens=self.tokens, hidden=self.hidden, vocab=self.vocab)

    @property
    def input_bytes(self) -> int:
        """Bytes of one input set: hidden [tokens, hidden] and weight [vocab, hidden]."""
        return (self.tokens + self.vocab) * self.hidden * self.element_size

    def products(self) -> tuple[str, ...]:
        """The matrix products (names in GEMM_PRODUCTS) the direction needs at least: the
        logits, and for a backward the hidden and weight gradients; their cuBLAS time is the
        floor."""
        return GEMM_PRODUCTS if self.direction == "fwd+bwd" else ("logits",)

    def name(self) -> str:
        return (f"{self.direction} {self.tokens}x{self.hidden}x{self.vocab} {dtype_name(self.dtype)}"
                f" ignored={self.ignored_fraction:.0%}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_workload(workload: Workload | LinearWorkload, directions: Sequence[str], **sizes: int) -> None:
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    if not 0.0 <= workload.ignored_fraction < 1.0:
        raise ValueError(f"ignored_fraction must be in [0, 1), got {workload.ignored_fraction}")
    if workload.direction not in directions:
        raise ValueError(f"direction must be one of {directions}, got {workload.direction!r}")


def sweep(tokens: Sequence[int], vocabs: Sequence[int], pivot_tokens: int, pivot_vocab: int, *,
          dtype: torch.dtype, ignored_fraction: float = 0.0, direction: str = "fwd+bwd",
          hidden: int | None = None) -> list[Workload] | list[LinearWorkload]:
    """Every token count at ``pivot_vocab`` and every vocabulary size at ``pivot_tokens``, without
    repeats: the two axes of the plots. Logits-path workloads, or with ``hidden`` fused linear
    ones at that hidden size."""
    shapes = [(t, pivot_vocab) for t in tokens] + [(pivot_tokens, v) for v in vocabs]
    unique = sorted(set(shapes), key=shapes.index)
    if hidden is None:
        return [Workload(t, v, dtype, ignored_fraction, direction) for t, v in unique]
    return [LinearWorkload(t, hidden, v, dtype, ignored_fraction, direction) for t, v in unique]


def default_workloads(device: torch.device, quick: bool = False) -> list[Workload | LinearWorkload]:
    """The representative subset ``python -m prefopt bench`` runs, forward+backward: the logits
    path's workloads, then the fused linear path's.

    CPU: float32 (what the CPU path is for), a quarter of the rows ignored (the memory process's
    prompt); 512 tokens x V 128256, and 1024 tokens x H 256 x V 32000. One workload per path:
    each row's memory figure costs a fresh process (about 4 s of CPU, mostly importing torch), and
    the whole CPU run stays near half a minute.

    GPU: bf16; 4096-16384 tokens at V 128256 and V 32000-262144 at 8192 tokens; H 4096 at 4096
    and 16384 tokens x V 128256 and at 16384 tokens x V 262144 (one hidden size, so that the three
    lie on the plots' two axes), and 16384 x 4096 x 128256 with half of the rows ignored.

    ``quick``: one small workload of the logits path, a smoke test of the machinery (a fused
    linear one would add two fresh memory processes on a CPU, 40% of its time, and the peers'
    kernel compilations on a GPU).
    """
    if device.type == "cuda":
        if quick:
            return [Workload(4096, 32000, torch.bfloat16)]
        return [*sweep((4096, 8192, 16384), (32000, 128256, 151936, 262144), 8192, 128256, dtype=torch.bfloat16),
                *sweep((4096, 16384), (128256, 262144), 16384, 128256, dtype=torch.bfloat16, hidden=4096),
                LinearWorkload(16384, 4096, 128256, torch.bfloat16, 0.5)]
    if quick:
        return [Workload(256, 32000, torch.float32, 0.25)]
    return [Workload(512, 128256, torch.float32, 0.25), LinearWorkload(1024, 256, 32000, torch.float32, 0.25)]


def make_inputs(workload: Workload | LinearWorkload, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One input set of ``workload``, never zeros, with labels [tokens] whose first
    ``ignored_rows`` are the ignore label.

    Logits path: (logits [tokens, vocab], labels), the logits normal with scale 4, like a
    language model's, and requiring gradients. Fused linear path: (hidden [tokens, hidden],
    weight [vocab, hidden], labels), hidden standard normal and weight scaled so that the logits
    have that same spread; both require gradients unless the direction is "fwd-nograd".
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, workload.vocab, (workload.tokens,), device=device, generator=generator)
    labels[: workload.ignored_rows] = IGNORE_INDEX
    if isinstance(workload, Workload):
        logits = torch.randn(workload.tokens, workload.vocab, device=device, generator=generator) * 4
        return logits.to(workload.dtype).requires_grad_(True), labels
    differentiable = workload.direction != "fwd-nograd"
    hidden = torch.randn(workload.tokens, workload.hidden, device=device, generator=generator)
    weight = torch.randn(workload.vocab, workload.hidden, device=device, generator=generator)
    weight *= 4 / workload.hidden**0.5
    return (hidden.to(workload.dtype).requires_grad_(differentiable),
            weight.to(workload.dtype).requires_grad_(differentiable), labels)
