"""Benchmarks: time, peak extra memory and fraction of the floor, for the logits path and the
fused linear path.

``python -m prefopt bench`` (see :func:`run`, both paths) and ``pytest benches`` share this
module: the workloads (:class:`Workload`, :class:`LinearWorkload`), the implementations measured
(prefopt's backends, the plain-PyTorch reference, ``torch.compile`` of it, and the peers where
they import), the timers, the floors, the checks of issue 5 and the plots.

How each figure is measured:

- time: the median over repeated calls of one direction (``"fwd"``, ``"bwd"`` or ``"fwd+bwd"``),
  after warm-up calls. On a GPU each call is timed with CUDA events and the calls rotate over
  enough copies of the inputs that together exceed twice the L2 cache, so no call finds its
  inputs cached; on a CPU with ``time.perf_counter`` (the inputs, at least tens of MB, already
  exceed the CPU caches). A backward is timed alone: its forward runs untimed before each call.
- peak extra memory: on a GPU ``torch.cuda.max_memory_allocated`` above what was allocated just
  before the timed part of each call (inputs, and for ``"bwd"`` the forward's saved tensors),
  the maximum over the calls. On a CPU the peak resident memory of one forward+backward in a
  fresh process (``benches/measure_memory.py`` for the logits path,
  ``benches/measure_linear_memory.py`` for the fused linear path, run with
  ``MALLOC_MMAP_THRESHOLD_`` so glibc returns freed blocks), which needs a source checkout.
- floor of the logits path (GPU): the bytes a direction must move (read the scored rows of the
  logits once per pass, write the whole gradient once) over the copy bandwidth of the same GPU,
  measured in the same run by :func:`copy_bandwidth`.
- floor of the fused linear path: the time torch.mm (cuBLAS on a GPU) takes for the matrix
  products the direction needs on the scored rows (the logits for a forward; the logits, the
  hidden gradient and the weight gradient for forward+backward), measured in the same run by
  :func:`gemm_seconds`. prefopt's own backends declare the products they actually perform (the
  Triton backward recomputes the logits in each of its two kernels), whose cuBLAS time is the
  bound issue 5 sets (:func:`linear_checks`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import ClassVar, TextIO

import torch

from .backends import unavailable_reason

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
# "fwd": with the autograd graph (a policy's forward); "fwd-nograd": under torch.no_grad, inputs
# without gradients (a reference model's forward).
LINEAR_DIRECTIONS = ("fwd+bwd", "fwd", "fwd-nograd")
# The matrix products of the fused linear path, on n scored rows: logits [n, H] @ [H, V],
# grad_hidden [n, V] @ [V, H], grad_weight [V, n] @ [n, H].
GEMM_PRODUCTS = ("logits", "grad_hidden", "grad_weight")
IGNORE_INDEX = -100
REFERENCE = "reference"
# The scripts measuring CPU memory in a fresh process, per path, next to the package in a source
# checkout: each takes the arguments of Implementation.memory_script_args, then the shape.
_BENCHES = Path(__file__).resolve().parents[1] / "benches"
MEMORY_SCRIPTS = {"logits": _BENCHES / "measure_memory.py", "linear": _BENCHES / "measure_linear_memory.py"}

# A function of one input set, (logits [N, V], labels [N]) for the logits path or (hidden [N, H],
# weight [V, H], labels [N]) for the fused linear path, giving a per-token [N] tensor whose sum
# is what the backward differentiates.
Candidate = Callable[..., torch.Tensor]


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
        return (f"{self.direction} {self.tokens}x{self.vocab} {_dtype_name(self.dtype)}"
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
        return (f"{self.direction} {self.tokens}x{self.hidden}x{self.vocab} {_dtype_name(self.dtype)}"
                f" ignored={self.ignored_fraction:.0%}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_workload(workload: Workload | LinearWorkload, directions: Sequence[str], **sizes: int) -> None:
    for name, size in sizes.items():
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    if not 0.0 <= workload.ignored_fraction < 1.0:
        raise ValueError(f"ignored_fraction must be in [0, 1), got {workload.ignored_fraction}")
    if workload.direction not in directions:
        raise ValueError(f"direction must be one of {directions}, got {workload.direction!r}")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A way to compute per-token log-probs; ``build`` makes the callable (compiling or loading
    a peer happens there, once). Implementations that write the gradient over their logits
    ("-inplace", Liger) are safe to time: every measurement makes its own inputs."""

    name: str
    build: Callable[[], Candidate]
    unavailable: str | None = None
    # For CPU memory, the arguments its path's memory script (MEMORY_SCRIPTS) takes before the
    # shape: BACKEND INPLACE for the logits path, BACKEND for the fused linear path.
    memory_script_args: tuple[str, ...] | None = None
    # Fused linear path: the matrix products (names in GEMM_PRODUCTS, on the scored rows) it
    # performs per direction, declared for prefopt's own backends only: a peer's internals are
    # not ours to state.
    gemm_products: Mapping[str, tuple[str, ...]] | None = None


@dataclasses.dataclass
class Measurement:
    """The figures of one implementation on one workload. Times in seconds, memory in bytes;
    ``skipped`` holds the reason when it did not run (the figures are then None)."""

    implementation: str
    workload: Workload | LinearWorkload
    device: str
    median_s: float | None = None
    times_s: list[float] = dataclasses.field(default_factory=list)
    peak_extra_bytes: int | None = None
    memory_method: str | None = None
    floor_bytes: int | None = None
    floor_s: float | None = None
    fraction_of_floor: float | None = None
    # Fused linear path, prefopt's backends: the cuBLAS time of the products it performs.
    method_gemm_s: float | None = None
    speedup_vs_reference: float | None = None
    # Interleaved runs (measure_interleaved): [lowest, highest] ratio of the reference's call to
    # this one's within one round, the spread of the speed-up.
    speedup_range: list[float] | None = None
    skipped: str | None = None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict: the workload's path and fields inline, the dtype as its name."""
        figures = dataclasses.asdict(self)
        workload = figures.pop("workload")
        workload["dtype"] = _dtype_name(self.workload.dtype)
        return {"path": self.workload.path, **workload, **figures, "logits_bytes": self.workload.logits_bytes}

    @classmethod
    def from_json(cls, row: Mapping[str, object]) -> Measurement:
        """The measurement a :meth:`to_json` dict describes (keys it does not know are ignored)."""
        workload_type = {"logits": Workload, "linear": LinearWorkload}[str(row["path"])]
        workload_fields = {f.name for f in dataclasses.fields(workload_type)}
        workload = workload_type(**{k: row[k] for k in workload_fields if k != "dtype"},
                                 dtype=getattr(torch, str(row["dtype"])))
        own_fields = {f.name for f in dataclasses.fields(cls)} - {"workload"}
        return cls(workload=workload, **{k: row[k] for k in own_fields if k in row})


# ----------------------------------------------------------------------------------------------
# Implementations


def _reference_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """prefopt's plain-PyTorch definition (prefopt.reference), uncompiled, for torch.compile."""
    from .reference import reference_token_stats

    return reference_token_stats(logits, labels, ignore_index=IGNORE_INDEX, temperature=1.0, softcap=None,
                                 stats=frozenset()).logps


def _prefopt(backend: str, inplace: bool = False, entropy: bool = False) -> Callable[[], Candidate]:
    def build() -> Candidate:
        from .logprobs import token_logprobs

        def candidate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            out = token_logprobs(logits, labels, backend=backend, inplace_backward=inplace, return_entropy=entropy)
            return out[0] + out[1] if entropy else out

        return candidate

    return build


def _compiled(function: Candidate) -> Candidate:
    """torch.compile of ``function`` with one specialized graph per shape (dynamic=False), as a
    trainer with fixed shapes gets it. A sweep compiles more graphs of one function than
    Dynamo's default recompile limit (8), past which it would silently run the function
    uncompiled under the compiled row's name: the limit is raised for this process."""
    import torch._dynamo.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(function, dynamic=False)


def _compiled_reference() -> Candidate:
    return _compiled(_reference_logprobs)


def load_trl_logprob_module() -> ModuleType | None:
    """TRL's ``trl.kernels.logprob_entropy`` module, imported by package or, when TRL's package
    import needs what is missing here (datasets, transformers), loaded by its file path alone;
    None when TRL is not installed."""
    name = "trl.kernels.logprob_entropy"
    try:
        return importlib.import_module(name)
    except ImportError:
        spec = importlib.util.find_spec("trl")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0]) / "kernels" / "logprob_entropy.py"
        file_spec = importlib.util.spec_from_file_location("trl_logprob_entropy", path)
        if file_spec is None or file_spec.loader is None:
            return None
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except (ImportError, FileNotFoundError):
            return None
        return module


def _trl() -> Candidate:
    module = load_trl_logprob_module()
    assert module is not None, "checked by implementations()"

    def candidate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # TRL's kernel has no ignore label: ignored rows are masked out by row_mask instead.
        scored = labels != IGNORE_INDEX
        logps, entropy = module.selective_log_softmax_and_entropy(logits, labels.clamp(min=0), row_mask=scored)
        return logps + entropy

    return candidate


def _liger() -> Candidate:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    # reduction="sum" is -(sum of the log-probs); Liger computes the gradient during the forward
    # and writes it over the logits.
    loss = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

    def candidate(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss(logits, labels)

    return candidate


_NOT_INSTALLED = {
    "trl": "TRL is not installed (pip install trl, or carry its wheel: benches/fetch_peer_wheels.sh)",
    "liger_kernel": "Liger-Kernel is not installed (pip install liger-kernel, or carry its wheel: "
                    "benches/fetch_peer_wheels.sh)",
    "cut_cross_entropy": "Cut Cross-Entropy is not installed (pip install cut-cross-entropy, or carry its wheel: "
                         "benches/fetch_peer_wheels.sh)",
}


def _peer_missing(module: str) -> str | None:
    """Why the peer package ``module`` cannot be used (not installed), None when it is there."""
    return _NOT_INSTALLED[module] if importlib.util.find_spec(module) is None else None


_COMPILE_ON_CPU = "GPU only (compiling takes longer than the whole CPU run)"


def implementations(device: torch.device) -> list[Implementation]:
    """Every implementation this module knows, each with the reason it cannot run on tensors
    of ``device`` (None when it can): prefopt's backends, the reference, torch.compile of the
    reference, TRL's Triton kernel (log-probs + entropy) and Liger's cross entropy."""
    on_gpu = device.type == "cuda"
    gpu_only = None if on_gpu else "GPU only"
    # On a CPU the kernels could only run through Triton's interpreter: a correctness tool.
    triton = unavailable_reason("triton", device) if on_gpu else "GPU only"
    trl_reason = gpu_only
    if trl_reason is None and load_trl_logprob_module() is None:
        trl_reason = _NOT_INSTALLED["trl"]
    liger_reason = gpu_only or _peer_missing("liger_kernel")
    compile_reason = None if on_gpu else _COMPILE_ON_CPU
    return [
        Implementation(REFERENCE, lambda: _reference_logprobs, memory_script_args=("reference", "0")),
        Implementation("torch.compile(reference)", _compiled_reference, unavailable=compile_reason),
        Implementation("prefopt-triton", _prefopt("triton"), unavailable=triton),
        Implementation("prefopt-triton-inplace", _prefopt("triton", inplace=True), unavailable=triton),
        Implementation("prefopt-triton-entropy", _prefopt("triton", entropy=True), unavailable=triton),
        Implementation("prefopt-cuda", _prefopt("cuda"), unavailable=unavailable_reason("cuda", device)),
        Implementation("prefopt-torch", _prefopt("torch"), memory_script_args=("torch", "0")),
        Implementation("prefopt-torch-inplace", _prefopt("torch", inplace=True),
                       memory_script_args=("torch", "1")),
        Implementation("trl-selective_log_softmax_and_entropy", _trl, unavailable=trl_reason),
        Implementation("liger-cross_entropy", _liger, unavailable=liger_reason),
    ]


IMPLEMENTATION_NAMES: tuple[str, ...] = tuple(i.name for i in implementations(torch.device("cpu")))

# ----------------------------------------------------------------------------------------------
# Implementations of the fused linear path: (hidden [N, H], weight [V, H], labels [N]) -> [N]


def _explicit_logits_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a trainer does without a fused head: the logits ``hidden @ weight.T`` in the inputs'
    dtype, then the reference log-probs (float32 log-softmax, gather at the labels)."""
    return _reference_logprobs(hidden @ weight.T, labels)


def _prefopt_linear(backend: str) -> Callable[[], Candidate]:
    def build() -> Candidate:
        from .linear import linear_token_logprobs

        def candidate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return linear_token_logprobs(hidden, weight, labels, backend=backend)

        return candidate

    return build


def _trl_chunked() -> Candidate:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    # The backward imports trl.trainer.utils (TRL's trainer stack: datasets, accelerate,
    # transformers): importing it here makes a missing package fail the build, not a timed call.
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    def candidate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # As TRL's fused LM head calls it on a GPU: only the scored rows, scattered back.
        scored = labels != IGNORE_INDEX
        logps = ChunkedLogProbFunction.apply(hidden[scored], weight, None, labels[scored], 1.0,
                                             _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0]
        return logps.new_zeros(labels.shape).masked_scatter(scored, logps)

    return candidate


def _liger_linear() -> Candidate:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def candidate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Per-token losses (-log-prob, 0 where ignored): the backward takes a per-token upstream
        # gradient, which Liger handles by recomputing the logits there.
        return liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="none")

    return candidate


def _liger_linear_dpo() -> Candidate:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # Policy-only DPO (no reference model): its loss needs the policy's sequence log-probs of the
    # chosen and rejected halves, which is the fused linear path's work; Liger computes the
    # gradients during the forward, one compiled chunk (a pair of sequences) at a time.
    loss = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, use_ref_model=False, compiled=True)

    def candidate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tokens = labels.shape[0]
        if tokens % 2:
            raise ValueError(f"Liger's DPO loss takes pairs of sequences: {tokens} tokens is odd")
        # Sequences of LIGER_DPO_SEQUENCE tokens where they divide into pairs, else one pair.
        length = LIGER_DPO_SEQUENCE if tokens % (2 * LIGER_DPO_SEQUENCE) == 0 else tokens // 2
        return loss(weight, hidden.view(-1, length, hidden.shape[-1]), labels.view(-1, length))[0]

    return candidate


def _cut_cross_entropy(filter_eps: str | None, impl: str = "cce") -> Callable[[], Candidate]:
    def build() -> Candidate:
        from cut_cross_entropy import linear_cross_entropy

        def candidate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="none",
                                        filter_eps=filter_eps, impl=impl)

        return candidate

    return build


_FORWARD_PRODUCTS = dict.fromkeys(("fwd", "fwd-nograd"), ("logits",))
# prefopt's backward recomputes the logits once, tile by tile, for its two gradient products.
PREFOPT_LINEAR_PRODUCTS = {**_FORWARD_PRODUCTS, "fwd+bwd": ("logits", "logits", "grad_hidden", "grad_weight")}
CCE = "cce-linear_cross_entropy"
CCE_EXACT = "cce-linear_cross_entropy-exact"
TRL_CHUNKED = "trl-chunked_logprob"
LIGER_LINEAR = "liger-fused_linear_cross_entropy"
# The peers that also run on a CPU: CCE's torch.compile implementation (no filter, 25.1.1 has
# none there) and Liger's fused linear DPO loss (torch.compile inside).
CCE_COMPILE = "cce-linear_cross_entropy-torch_compile"
LIGER_DPO = "liger-fused_linear_dpo"
LINEAR_PEERS = (CCE, CCE_EXACT, TRL_CHUNKED, LIGER_LINEAR, CCE_COMPILE, LIGER_DPO)
# Liger's DPO candidate splits the tokens into sequences of this length (pairs of them).
LIGER_DPO_SEQUENCE = 512
# Why CCE's default (Triton) implementation and Liger's cross entropy do not run on a CPU, as
# they fail there: Triton finds no GPU driver.
_TRITON_PEER_ON_CPU = "GPU only (Triton kernels: on a CPU it fails with \"0 active drivers\")"


def linear_implementations(device: torch.device) -> list[Implementation]:
    """The implementations of the fused linear path, each with the reason it cannot run on
    tensors of ``device`` (None when it can): prefopt's triton, cuda and torch backends, the
    explicit-logits reference and torch.compile of it, TRL's
    chunked log-prob function (what its DPO and KTO trainers use; its torch fallback on a CPU),
    Liger-Kernel's fused linear cross entropy (reduction="none") and its fused linear DPO loss
    (policy only, compiled), and Apple's Cut Cross-Entropy (reduction="none"; its default filters
    small gradient entries, "-exact" does not, "-torch_compile" is its compiled PyTorch
    implementation). TRL's function, CCE's torch_compile and Liger's DPO loss run on a CPU too.

    Ordered by what a run cut short needs first: prefopt-triton and the peers it is checked
    against (:func:`linear_checks`), prefopt-cuda (checked too), then the rest.
    """
    on_gpu = device.type == "cuda"
    triton_peer = None if on_gpu else _TRITON_PEER_ON_CPU
    triton = unavailable_reason("triton", device) if on_gpu else "GPU only"
    cce_reason = triton_peer or _peer_missing("cut_cross_entropy")
    return [
        Implementation("prefopt-triton", _prefopt_linear("triton"), unavailable=triton,
                       gemm_products=PREFOPT_LINEAR_PRODUCTS),
        Implementation(CCE, _cut_cross_entropy("high"), unavailable=cce_reason),
        # TRL's function runs its torch fallback on a CPU (cuBLAS tiles and Triton on a GPU).
        Implementation(TRL_CHUNKED, _trl_chunked, unavailable=_peer_missing("trl")),
        Implementation(LIGER_LINEAR, _liger_linear, unavailable=triton_peer or _peer_missing("liger_kernel")),
        Implementation(CCE_EXACT, _cut_cross_entropy(None), unavailable=cce_reason),
        Implementation(CCE_COMPILE, _cut_cross_entropy(None, "torch_compile"),
                       unavailable=_peer_missing("cut_cross_entropy")),
        Implementation(LIGER_DPO, _liger_linear_dpo, unavailable=_peer_missing("liger_kernel")),
        Implementation("prefopt-cuda", _prefopt_linear("cuda"), gemm_products=PREFOPT_LINEAR_PRODUCTS,
                       unavailable=unavailable_reason("cuda", device) if on_gpu else "GPU only"),
        # The statistics inside the GEMM: its forward is one tl.dot product, its backward one more
        # (recomputing the tiles) and the two gradient products.
        Implementation("prefopt-triton-fused", _prefopt_linear("triton-fused"), unavailable=triton,
                       gemm_products=PREFOPT_LINEAR_PRODUCTS),
        # The memory script's "reference" backend computes the same explicit logits (float32 on
        # a CPU, the only dtype CPU memory is measured in).
        Implementation(REFERENCE, lambda: _explicit_logits_logprobs, memory_script_args=("reference",)),
        Implementation("prefopt-torch", _prefopt_linear("torch"), gemm_products=PREFOPT_LINEAR_PRODUCTS,
                       memory_script_args=("torch",)),
        Implementation("torch.compile(reference)", lambda: _compiled(_explicit_logits_logprobs),
                       unavailable=None if on_gpu else _COMPILE_ON_CPU),
    ]


LINEAR_IMPLEMENTATION_NAMES: tuple[str, ...] = tuple(i.name for i in linear_implementations(torch.device("cpu")))
# What --impl accepts: the names of both paths (some name an implementation of each).
ALL_IMPLEMENTATION_NAMES: tuple[str, ...] = tuple(dict.fromkeys((*IMPLEMENTATION_NAMES, *LINEAR_IMPLEMENTATION_NAMES)))


# ----------------------------------------------------------------------------------------------
# Workloads


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

    CPU: float32 (what the CPU path is for), a quarter of the rows ignored (the memory scripts'
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


# ----------------------------------------------------------------------------------------------
# Timers and ceilings


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to rotate over so that together they exceed twice the L2 cache (GPU);
    1 on a CPU."""
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, math.ceil(2 * l2 / max(bytes_per_set, 1)) + 1)


def time_calls(prepare: Callable[[int], object], timed: Callable[[int, object], object], *, calls: int,
               warmup: int, device: torch.device) -> tuple[list[float], int | None]:
    """Run ``prepare(i)`` untimed then ``timed(i, prepared)`` timed, for i in range(warmup + calls).

    Returns the seconds of the last ``calls`` timed parts (CUDA events on a GPU, perf_counter on
    a CPU) and, on a GPU, the largest ``max_memory_allocated`` of a timed part above what was
    allocated as it began (bytes); None on a CPU.
    """
    seconds: list[float] = []
    peak_extra: int | None = 0 if device.type == "cuda" else None
    for i in range(warmup + calls):
        prepared = prepare(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = timed(i, prepared)
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end) / 1e3
            peak_extra = max(peak_extra or 0, torch.cuda.max_memory_allocated(device) - before)
        else:
            begin = time.perf_counter()
            result = timed(i, prepared)
            elapsed = time.perf_counter() - begin
        del result, prepared
        if i >= warmup:
            seconds.append(elapsed)
    return seconds, peak_extra


def copy_bandwidth(device: torch.device, size_bytes: int = 2**30, calls: int = 20) -> float:
    """Bytes per second of a device-to-device copy of ``size_bytes`` (read + write counted),
    the practical memory-bandwidth ceiling of a GPU. Measured, never assumed."""
    source = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    seconds, _ = time_calls(lambda i: None, lambda i, _: target.copy_(source), calls=calls, warmup=3, device=device)
    return 2 * source.numel() * source.element_size() / statistics.median(seconds)


def gemm_seconds(workload: LinearWorkload, device: torch.device, *, calls: int = 5, warmup: int = 2,
                 seed: int = 0) -> dict[str, float]:
    """Median seconds of each matrix product of the fused linear path (GEMM_PRODUCTS) through
    torch.mm (cuBLAS on a GPU) on ``workload``'s scored rows n, in its dtype, on random data and
    rotating operand sets like :func:`measure`: "logits" [n, H] @ [H, V], "grad_hidden" [n, V] @
    [V, H] and "grad_weight" [V, n] @ [n, H], each written into a preallocated output. The floor
    of a fused linear measurement and the ceiling of what prefopt's kernels can reach."""
    n, hidden_size, vocab = workload.scored_rows, workload.hidden, workload.vocab
    operand_bytes = (n * hidden_size + vocab * hidden_size + n * vocab) * workload.element_size
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=generator).to(workload.dtype)

    sets = [(normal(n, hidden_size), normal(vocab, hidden_size), normal(n, vocab))
            for _ in range(rotation_count(operand_bytes, device))]
    outputs = {"logits": torch.empty(n, vocab, device=device, dtype=workload.dtype),
               "grad_hidden": torch.empty(n, hidden_size, device=device, dtype=workload.dtype),
               "grad_weight": torch.empty(vocab, hidden_size, device=device, dtype=workload.dtype)}

    def product(name: str, rows: torch.Tensor, weight: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
        if name == "logits":
            return torch.mm(rows, weight.T, out=outputs[name])
        if name == "grad_hidden":
            return torch.mm(grad_logits, weight, out=outputs[name])
        return torch.mm(grad_logits.T, rows, out=outputs[name])

    medians = {}
    for name in GEMM_PRODUCTS:
        seconds, _ = time_calls(lambda i: None, lambda i, _, name=name: product(name, *sets[i % len(sets)]),
                                calls=calls, warmup=warmup, device=device)
        medians[name] = statistics.median(seconds)
    return medians


def measure_cpu_memory(workload: Workload | LinearWorkload, script_args: Sequence[str]) -> int:
    """Peak extra resident bytes of one float32 forward+backward of ``workload``'s shape, in a
    fresh process by its path's memory script (MEMORY_SCRIPTS; a quarter of the rows ignored
    there) given ``script_args`` (Implementation.memory_script_args), then the shape."""
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    shape = ((workload.tokens, workload.vocab) if isinstance(workload, Workload)
             else (workload.tokens, workload.hidden, workload.vocab))
    arguments = [sys.executable, str(MEMORY_SCRIPTS[workload.path]), *script_args, *map(str, shape)]
    result = subprocess.run(arguments, env=environment, capture_output=True, text=True, check=True)
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def cpu_memory_unavailable(workload: Workload | LinearWorkload) -> str | None:
    """Why the CPU memory figure of ``workload`` cannot be measured (None when it can): the
    scripts measure float32 fwd+bwd with a quarter of the rows ignored, from a source checkout."""
    script = MEMORY_SCRIPTS[workload.path]
    if not script.is_file():
        return f"{script} not found (CPU memory needs a source checkout)"
    if (workload.dtype, workload.direction, workload.ignored_fraction) != (torch.float32, "fwd+bwd", 0.25):
        return "CPU memory is measured for float32 fwd+bwd with 25% ignored rows only"
    return None


# ----------------------------------------------------------------------------------------------
# Measuring


def measure(implementation: Implementation, workload: Workload | LinearWorkload, device: torch.device, *,
            calls: int, warmup: int = 2, candidate: Candidate | None = None, bandwidth: float | None = None,
            gemms: Mapping[str, float] | None = None, seed: int = 0) -> Measurement:
    """Time ``implementation`` on ``workload`` (and on a GPU its peak extra memory and floor).

    ``candidate``: the built callable, to reuse one across workloads (built here otherwise).
    ``bandwidth``: the copy bandwidth in bytes/s from :func:`copy_bandwidth`, for the floor of
    the logits path. ``gemms``: the seconds of each matrix product from :func:`gemm_seconds` on
    the same workload, for the floor of the fused linear path (and, for prefopt's backends, the
    cuBLAS time of the products they perform). A GPU out-of-memory error gives a skipped
    measurement, not an exception.
    """
    result = Measurement(implementation.name, workload, str(device))
    if implementation.unavailable is not None:
        result.skipped = implementation.unavailable
        return result
    run = candidate if candidate is not None else implementation.build()
    sets: list[tuple[torch.Tensor, ...]] = []
    try:
        sets = [make_inputs(workload, device, seed + k) for k in range(rotation_count(workload.input_bytes, device))]
        prepare, timed = _call_steps(run, workload, sets)
        seconds, peak = time_calls(prepare, timed, calls=calls, warmup=warmup, device=device)
    except torch.cuda.OutOfMemoryError as error:
        result.skipped = f"out of GPU memory: {str(error).splitlines()[0]}"
        return result
    finally:
        del sets
    result.times_s = seconds
    result.median_s = statistics.median(seconds)
    if peak is not None:
        result.peak_extra_bytes, result.memory_method = peak, "torch.cuda.max_memory_allocated above the inputs"
    _fill_floor(result, implementation, bandwidth, gemms)
    return result


def _call_steps(run: Candidate, workload: Workload | LinearWorkload, sets: Sequence[tuple[torch.Tensor, ...]]
                ) -> tuple[Callable[[int], object], Callable[[int, object], object]]:
    """The (prepare, timed) pair :func:`time_calls` takes for call i of ``run`` on input set
    ``i % len(sets)``: a forward; a backward after an untimed forward; or both, timed together."""
    grad_mode = torch.no_grad if workload.direction == "fwd-nograd" else contextlib.nullcontext

    def forward(i: int) -> torch.Tensor:
        with grad_mode():
            return run(*sets[i % len(sets)])

    def backward(i: int, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        differentiable = [tensor for tensor in sets[i % len(sets)] if tensor.requires_grad]
        return torch.autograd.grad(output, differentiable, torch.ones_like(output))

    if workload.direction in ("fwd", "fwd-nograd"):
        return lambda i: None, lambda i, _: forward(i)
    if workload.direction == "bwd":
        return forward, backward
    return lambda i: None, lambda i, _: backward(i, forward(i))


def _fill_floor(result: Measurement, implementation: Implementation, bandwidth: float | None,
                gemms: Mapping[str, float] | None) -> None:
    """Set the floor of a timed ``result`` and its fraction (see :func:`measure`)."""
    workload = result.workload
    if isinstance(workload, LinearWorkload):
        if gemms is not None:
            result.floor_s = sum(gemms[name] for name in workload.products())
            result.fraction_of_floor = result.floor_s / result.median_s
            performed = (implementation.gemm_products or {}).get(workload.direction)
            if performed is not None:
                result.method_gemm_s = sum(gemms[name] for name in performed)
    elif bandwidth is not None:
        result.floor_bytes = workload.floor_bytes()
        result.floor_s = result.floor_bytes / bandwidth
        result.fraction_of_floor = result.floor_s / result.median_s


def _failure(workload: Workload | LinearWorkload, error: Exception) -> str:
    """The reason a measurement records when its implementation raised ``error``."""
    first_line = str(error).splitlines()[0] if str(error) else ""
    return f"failed at {workload.name()}: {type(error).__name__}: {first_line}"


def measure_interleaved(chosen: Sequence[tuple[Implementation, Candidate]], workload: Workload | LinearWorkload,
                        device: torch.device, *, min_calls: int, max_calls: int, budget_s: float, warmup: int = 1,
                        seed: int = 0) -> list[Measurement]:
    """Time every implementation of ``chosen`` (each with its built callable) on ``workload`` in
    rounds: a round calls each of them once, starting one further along each round, so that a
    change of machine load falls on all of them alike rather than on whichever ran then.

    After ``warmup`` rounds, rounds go on until every implementation has ``min_calls`` timed
    calls and the timed calls of all of them together took ``budget_s`` seconds, or until each
    has ``max_calls``: the run time is bounded, and a fast machine gets more calls. Each
    implementation has its own input set (``make_inputs`` with ``seed``), so one that writes
    its gradient over the logits leaves the others' inputs alone. One that raises is recorded
    as failed and leaves the rounds. Returns one measurement per implementation, in the order of
    ``chosen``, with ``times_s`` in round order; when the reference is among them, each other's
    ``speedup_range`` holds the lowest and highest per-round ratio of the reference's time to its
    own. Floors are not set (a CPU has none here).
    """
    if not 1 <= min_calls <= max_calls:
        raise ValueError(f"min_calls and max_calls must satisfy 1 <= min_calls <= max_calls, got {min_calls}, {max_calls}")
    results = {i.name: Measurement(i.name, workload, str(device)) for i, _ in chosen}
    steps = {}
    for implementation, run in chosen:
        sets = [make_inputs(workload, device, seed + k) for k in range(rotation_count(workload.input_bytes, device))]
        steps[implementation.name] = _call_steps(run, workload, sets)
    active = list(steps)
    timed_s = 0.0
    for round_index in range(warmup + max_calls):
        timed_rounds = round_index - warmup
        if not active or (timed_rounds >= min_calls and timed_s >= budget_s):
            break
        start = round_index % len(active)
        for name in active[start:] + active[:start]:
            prepare, timed = steps[name]
            try:
                (seconds,), _ = time_calls(lambda _, i=round_index: prepare(i), lambda _, p, i=round_index: timed(i, p),
                                           calls=1, warmup=0, device=device)
            except Exception as error:  # noqa: BLE001 - one failing implementation must not end the others' rounds
                results[name].skipped = _failure(workload, error)
                active.remove(name)
                del steps[name]  # frees its inputs
                continue
            if timed_rounds >= 0:
                results[name].times_s.append(seconds)
                timed_s += seconds
    for r in results.values():
        if r.skipped is None:
            r.median_s = statistics.median(r.times_s)
    reference = results.get(REFERENCE)
    for r in results.values():
        if r is not reference and reference is not None and r.skipped is None and reference.times_s:
            # Rounds are aligned: every implementation started in the first one, and one that
            # failed stopped for good, so the shorter list is a prefix of the rounds.
            ratios = [base / own for base, own in zip(reference.times_s, r.times_s)]
            r.speedup_range = [min(ratios), max(ratios)]
    return list(results.values())


def fill_speedups(results: Sequence[Measurement]) -> None:
    """Set each measurement's speed-up: the reference's median time over its own, same workload."""
    reference = {r.workload: r.median_s for r in results if r.implementation == REFERENCE and r.median_s}
    for r in results:
        base = reference.get(r.workload)
        if base is not None and r.median_s:
            r.speedup_vs_reference = base / r.median_s


# The two problems issue 5 names for the fused linear path: (tokens, hidden, vocab), bf16.
ISSUE5_SHAPES = ((16384, 4096, 128256), (16384, 2048, 248320))
# prefopt's GPU backends of the fused linear path, each held to issue 5's targets.
CHECKED = ("prefopt-triton", "prefopt-cuda")


def linear_checks(results: Sequence[Measurement]) -> list[dict[str, object]]:
    """Issue 5's targets for prefopt-triton and prefopt-cuda (``CHECKED``), on every fused linear
    forward+backward measured:
    time at most Cut Cross-Entropy's (default and exact, each a check), at most TRL's chunked
    log-prob function's, at most 0.4x Liger's fused linear cross entropy; peak extra memory at
    most the lowest peer's; time at most 1.25x the cuBLAS time of the products it performs; and
    with half the rows ignored, time at most 0.55x that of the same shape with every row valid.

    Returns one dict per check: the implementation, the workload, the check, ``value`` and ``bound`` (seconds or
    bytes) and ``passed`` (None, with ``note`` saying why, when a figure is missing). Timing
    targets are recorded here, never asserted: they belong in benchmarks, not in tests.
    """
    measured = {(r.workload, r.implementation): r for r in results
                if isinstance(r.workload, LinearWorkload) and r.median_s is not None}
    checks: list[dict[str, object]] = []
    for (workload, name), subject in measured.items():
        if name not in CHECKED or workload.direction != "fwd+bwd":
            continue

        def add(check: str, value: float | int | None, bound: float | None, missing: str) -> None:
            known = value is not None and bound is not None
            checks.append({
                "implementation": name, "workload": workload.name(), "tokens": workload.tokens, "hidden": workload.hidden,
                "vocab": workload.vocab, "ignored_fraction": workload.ignored_fraction,
                "issue5_shape": (workload.tokens, workload.hidden, workload.vocab) in ISSUE5_SHAPES,
                "check": check, "value": value, "bound": bound, "passed": value <= bound if known else None,
                "note": None if known else missing,
            })

        for peer, factor, check in ((CCE, 1.0, "time <= Cut Cross-Entropy's (default: filters small gradients)"),
                                    (CCE_EXACT, 1.0, "time <= Cut Cross-Entropy's without filtering"),
                                    (TRL_CHUNKED, 1.0, "time <= TRL's chunked log-prob function's"),
                                    (LIGER_LINEAR, 0.4, "time <= 0.4 x Liger-Kernel's fused linear cross entropy")):
            other = measured.get((workload, peer))
            add(check, subject.median_s, None if other is None else factor * other.median_s, f"{peer} not measured")
        peaks = [other.peak_extra_bytes for peer in LINEAR_PEERS
                 if (other := measured.get((workload, peer))) is not None and other.peak_extra_bytes is not None]
        add("peak extra memory <= the lowest peer's", subject.peak_extra_bytes, min(peaks) if peaks else None,
            "no peer's peak memory measured")
        add("time <= 1.25 x cuBLAS time of the products it performs", subject.median_s,
            None if subject.method_gemm_s is None else 1.25 * subject.method_gemm_s, "no cuBLAS timing in this run")
        if workload.ignored_fraction == 0.5:
            all_valid = measured.get((dataclasses.replace(workload, ignored_fraction=0.0), name))
            add("time with half the rows ignored <= 0.55 x all rows valid", subject.median_s,
                None if all_valid is None else 0.55 * all_valid.median_s, "the all-valid workload was not measured")
    return checks


# ----------------------------------------------------------------------------------------------
# Report: table, JSON, plots


def _format_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 2**20:,.1f} MiB" if count < 2**30 else f"{count / 2**30:,.2f} GiB"


PATH_TITLES = {
    "logits": "logits path: per-token log-probs from logits [tokens, V]",
    "linear": "fused linear path: per-token log-probs from hidden [tokens, H] and LM-head weight [V, H]; "
              "reference: logits = hidden @ weight.T, then log-softmax",
}


def _time_cell(r: Measurement) -> str:
    if r.median_s is None:
        return "-"
    cell = f"{r.median_s * 1e3:,.1f} ms"
    if len(r.times_s) > 1:
        cell += f" ({min(r.times_s) * 1e3:,.1f}-{max(r.times_s) * 1e3:,.1f})"
    return cell


def _speedup_cell(r: Measurement) -> str:
    if r.speedup_vs_reference is None:
        return "-"
    cell = f"{r.speedup_vs_reference:.2f}x"
    if r.speedup_range is not None:
        cell += f" ({r.speedup_range[0]:.2f}-{r.speedup_range[1]:.2f})"
    return cell


def format_table(results: Sequence[Measurement]) -> str:
    """The measurements as fixed-width text, one table per path (logits, fused linear) under its
    title, one row per implementation and workload: timed calls, median time with the (min-max)
    of the calls, peak extra memory, % of the floor (a column only when some row has a floor) and
    speed-up over the reference, with the (min-max) of its per-round ratio when the calls were
    interleaved. Each path's skipped implementations are listed once each under its table with
    the reason."""
    with_floor = any(r.fraction_of_floor is not None for r in results)
    header = ("implementation", "workload", "calls", "median time (min-max)", "peak extra memory",
              *(("% of floor",) if with_floor else ()), "speed-up (min-max)")
    tables: dict[str, list[tuple[str, ...]]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for r in results:
        path = r.workload.path
        tables.setdefault(path, [])
        if r.skipped is not None:
            skipped.setdefault(path, {}).setdefault(r.implementation, r.skipped)
            continue
        floor = f"{r.fraction_of_floor:.1%}" if r.fraction_of_floor is not None else "-"
        tables[path].append((
            r.implementation,
            r.workload.name(),
            str(len(r.times_s)) if r.times_s else "-",
            _time_cell(r),
            _format_bytes(r.peak_extra_bytes),
            *((floor,) if with_floor else ()),
            _speedup_cell(r),
        ))
    # One set of widths for every table, so that the paths' columns line up.
    widths = [max(len(row[k]) for row in (header, *(row for rows in tables.values() for row in rows)))
              for k in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if k < 2 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths)))

    blocks = []
    for path in sorted(tables, key=list(PATH_TITLES).index):
        lines = [PATH_TITLES[path], line(header), "-" * len(line(header)), *map(line, tables[path])]
        lines += [f"not run: {name}: {reason}" for name, reason in skipped.get(path, {}).items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, command: str) -> dict[str, object]:
    """Where and how the figures were measured: device name, driver, versions, date, command."""
    from . import __version__

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    driver = None
    if device.type == "cuda":
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, check=True, timeout=30)
            driver = query.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": device_name,
        "driver": driver,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "prefopt": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def results_stem(env: Mapping[str, object]) -> str:
    """``<date>-<device>`` naming a results set (benches/results/README.md) from an
    :func:`environment`: the UTC date and the device's name in lower case without the vendor,
    e.g. ``2026-12-01-h200`` for an 'NVIDIA H200'."""
    words = str(env["device_name"]).lower().replace("nvidia", " ").split()
    device = "-".join("".join(c if c.isalnum() else "-" for c in word).strip("-") for word in words)
    return f"{str(env['date'])[:10]}-{device or 'unknown'}"


def write_json(path: Path, results: Sequence[Measurement], env: dict[str, object],
               bandwidth: float | None) -> None:
    """Write the environment, the measured copy bandwidth (bytes/s, GPU) and every measurement."""
    document = {**env, "copy_bandwidth_bytes_per_s": bandwidth, "results": [r.to_json() for r in results]}
    path.write_text(json.dumps(document, indent=2) + "\n")


class MissingExtraError(RuntimeError):
    """An optional dependency is missing; the message names the extra that installs it."""


def _pyplot() -> ModuleType:
    """matplotlib.pyplot drawing to files (Agg), or MissingExtraError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise MissingExtraError(
            f"--plot needs matplotlib ({error}): pip install 'prefopt[bench]' (or pip install matplotlib)"
        ) from error
    return plt


def _plot_group(workload: Workload | LinearWorkload) -> tuple[str, str, torch.dtype, float, int | None]:
    """What one figure holds fixed besides its axes: path, direction, dtype, ignored fraction
    and (fused linear path) the hidden size."""
    return (workload.path, workload.direction, workload.dtype, workload.ignored_fraction,
            getattr(workload, "hidden", None))


def write_plots(directory: Path, results: Sequence[Measurement], title: str) -> list[Path]:
    """PNG plots of median time and peak extra memory against tokens (one figure per vocabulary
    with at least two token counts) and against vocabulary size (one per token count with at
    least two vocabularies), one line per implementation and the floor dashed, for each path,
    direction, dtype, ignored fraction and hidden size measured; and for each workload that lies
    on no such line (a CPU run measures one per path), one bar chart of its implementations'
    median time (min-max as error bars) and peak extra memory. ``directory`` is created only
    when there is something to draw. Returns the files written."""
    plt = _pyplot()
    measured = [r for r in results if r.median_s is not None]
    if measured:
        directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    on_a_line: set[Workload | LinearWorkload] = set()
    for key in sorted({_plot_group(r.workload) for r in measured}, key=str):
        path_name, direction, dtype, ignored, hidden_size = key
        group = [r for r in measured if _plot_group(r.workload) == key]
        for axis, fixed in (("tokens", "vocab"), ("vocab", "tokens")):
            for value in sorted({getattr(r.workload, fixed) for r in group}):
                line_points = [r for r in group if getattr(r.workload, fixed) == value]
                if len({getattr(r.workload, axis) for r in line_points}) < 2:
                    continue
                on_a_line.update(r.workload for r in line_points)
                figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
                for name in dict.fromkeys(r.implementation for r in line_points):
                    points = sorted((getattr(r.workload, axis), r) for r in line_points if r.implementation == name)
                    xs = [x for x, _ in points]
                    time_axes.plot(xs, [r.median_s * 1e3 for _, r in points], marker="o", label=name)
                    memory = [(x, r.peak_extra_bytes / 2**20) for x, r in points if r.peak_extra_bytes is not None]
                    if memory:
                        memory_axes.plot(*zip(*memory), marker="o", label=name)
                floors = sorted({(getattr(r.workload, axis), r.floor_s) for r in line_points if r.floor_s is not None})
                if floors:
                    floor_label = "floor (cuBLAS GEMMs)" if path_name == "linear" else "floor (bytes / copy bandwidth)"
                    time_axes.plot([x for x, _ in floors], [f * 1e3 for _, f in floors], "k--", label=floor_label)
                for axes, ylabel in ((time_axes, "median time (ms)"), (memory_axes, "peak extra memory (MiB)")):
                    axes.set_xlabel("tokens" if axis == "tokens" else "vocabulary size")
                    axes.set_ylabel(ylabel)
                    axes.grid(True, alpha=0.3)
                time_axes.legend(fontsize="small")
                hidden_text = "" if hidden_size is None else f"H {hidden_size}, "
                figure.suptitle(f"{title}: {path_name} path, {direction}, {_dtype_name(dtype)}, {hidden_text}"
                                f"{fixed} {value}, ignored {ignored:.0%}")
                figure.tight_layout()
                hidden_part = "" if hidden_size is None else f"-H{hidden_size}"
                path = directory / (f"{path_name}-{direction.replace('+', '_')}-{_dtype_name(dtype)}{hidden_part}"
                                    f"-ignored{round(ignored * 100)}-vs_{axis}-{fixed}{value}.png")
                figure.savefig(path, dpi=120)
                plt.close(figure)
                written.append(path)
    for workload in dict.fromkeys(r.workload for r in measured if r.workload not in on_a_line):
        written.append(_bar_chart(plt, directory, [r for r in measured if r.workload == workload], title))
    return written


def _bar_chart(plt: ModuleType, directory: Path, rows: Sequence[Measurement], title: str) -> Path:
    """One workload's implementations side by side: median time with (min-max) error bars, and
    peak extra memory (where measured). Returns the file written."""
    workload = rows[0].workload
    names = [r.implementation for r in rows]
    medians = [r.median_s * 1e3 for r in rows]
    below = [m - min(r.times_s or [r.median_s]) * 1e3 for m, r in zip(medians, rows)]
    above = [max(r.times_s or [r.median_s]) * 1e3 - m for m, r in zip(medians, rows)]
    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    time_axes.bar(names, medians, yerr=[below, above], capsize=4)
    time_axes.set_ylabel("median time (ms), min-max of the calls")
    memory_axes.bar(names, [0 if r.peak_extra_bytes is None else r.peak_extra_bytes / 2**20 for r in rows])
    memory_axes.set_ylabel("peak extra memory (MiB)")
    for axes in (time_axes, memory_axes):
        axes.tick_params(axis="x", labelrotation=20)
        axes.grid(True, axis="y", alpha=0.3)
    figure.suptitle(f"{title}: {workload.path} path, {workload.name()}")
    figure.tight_layout()
    shape = "x".join(str(size) for size in (workload.tokens, getattr(workload, "hidden", None), workload.vocab)
                     if size is not None)
    path = directory / (f"{workload.path}-{workload.direction.replace('+', '_')}-{_dtype_name(workload.dtype)}"
                        f"-{shape}-ignored{round(workload.ignored_fraction * 100)}-bars.png")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------
# The main job


# Left out of the default run on a GPU, measured when --impl names them: (path, name) -> why.
DEFAULT_RUN_LEAVES_OUT = {
    ("linear", "torch.compile(reference)"): "left out of the default run (it compiles one graph per shape, minutes "
                                            "in all); --impl 'torch.compile(reference)' measures it",
}


def chosen_implementations(device: torch.device, names: Sequence[str] | None = None) -> dict[str, list[Implementation]]:
    """Per path ("logits", "linear"), the implementations :func:`run` measures on ``device``.

    By default every one, those in DEFAULT_RUN_LEAVES_OUT marked unavailable with the reason.
    With ``names``, those named and the reference (what the speed-ups are relative to), on each
    path where any of them is named; a path none of them belongs to is left out.
    """
    chosen = {}
    for path, candidates in (("logits", implementations(device)), ("linear", linear_implementations(device))):
        if names is None:
            chosen[path] = [dataclasses.replace(i, unavailable=DEFAULT_RUN_LEAVES_OUT[(path, i.name)])
                            if i.unavailable is None and (path, i.name) in DEFAULT_RUN_LEAVES_OUT else i
                            for i in candidates]
        elif any(i.name in names for i in candidates):
            chosen[path] = [i for i in candidates if i.name in names or i.name == REFERENCE]
    return chosen


@dataclasses.dataclass(frozen=True)
class CallBudget:
    """How long a CPU run times one workload (:func:`measure_interleaved`): rounds until every
    implementation has ``min_calls`` timed calls and the timed calls took ``seconds`` in all, or
    until each has ``max_calls``."""

    min_calls: int
    max_calls: int
    seconds: float


# About 10 s per workload on an idle 2-core machine (7-8 rounds there); on a loaded one, 5 rounds
# however long they take.
CPU_CALLS = CallBudget(min_calls=5, max_calls=50, seconds=10.0)
# --quick: a smoke test of the machinery, not a measurement.
CPU_QUICK_CALLS = CallBudget(min_calls=3, max_calls=10, seconds=1.0)


def _load_average() -> float | None:
    """The one-minute load average (None where the OS has none): how busy the machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run(*, device: torch.device | None = None, quick: bool = False, names: Sequence[str] | None = None,
        calls: int | None = None, json_path: Path | None = None, plot_dir: Path | None = None,
        command: str | None = None, progress: TextIO | None = None, out: TextIO | None = None) -> list[Measurement]:
    """``python -m prefopt bench``: measure the default subset of both paths on ``device`` (the
    GPU when there is one), print the table to ``out`` and progress to ``progress``, and write
    ``json_path`` and the plots under ``plot_dir`` when given (``out``/``progress`` default to
    the current sys.stdout/sys.stderr). ``names`` restricts the implementations
    (:func:`chosen_implementations`).

    On a GPU each implementation is timed alone, ``calls`` times (default 10) with CUDA events,
    which measure the device and not the host's load. On a CPU the implementations of each
    workload are timed in interleaved rounds (:func:`measure_interleaved`), so that machine load
    falls on all of them alike: ``calls`` rounds when given, else rounds within CPU_CALLS's
    budget (CPU_QUICK_CALLS with ``quick``). Progress lists only what runs here; what cannot is
    listed once per path, with the reason, under the tables.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out, progress = out or sys.stdout, progress or sys.stderr
    if plot_dir is not None:
        _pyplot()  # fail before measuring, not after
    on_gpu = device.type == "cuda"
    load_before = _load_average()
    chosen = chosen_implementations(device, names)
    workloads = [w for w in default_workloads(device, quick) if w.path in chosen]
    runnable = sum(i.unavailable is None for w in workloads for i in chosen[w.path])
    not_here = sorted({i.name for w in workloads for i in chosen[w.path] if i.unavailable is not None})
    print(f"{runnable} measurements run here"
          + (f"; not run here, each with its reason under the tables: {', '.join(not_here)}" if not_here else ""),
          file=progress, flush=True)
    bandwidth = None
    if on_gpu:
        results, bandwidth = _run_gpu(chosen, workloads, device, calls or 10, progress)
    else:
        budget = CPU_QUICK_CALLS if quick else CPU_CALLS
        if calls is not None:
            budget = CallBudget(min_calls=calls, max_calls=calls, seconds=0.0)
        results = _run_cpu(chosen, workloads, device, budget, progress)
        _add_cpu_memory(results, chosen, progress)
    fill_speedups(results)
    print(format_table(results), file=out)
    env = environment(device, command or shlex.join([sys.executable, "-m", "prefopt", "bench"]))
    env["load_average_before"], env["load_average_after"] = load_before, _load_average()
    if not on_gpu:
        print("time: perf_counter; each round calls every implementation of a workload once, in turn, starting one "
              "further along each round; median and (min-max) over the timed calls. speed-up: the reference's "
              "median over this one's, (min-max) of the same ratio within one round. peak extra memory: resident "
              "memory of one fwd+bwd above its inputs, in a fresh process (benches/measure_memory.py, "
              "benches/measure_linear_memory.py). Floors are measured on GPUs only.", file=out)
        load = ("" if load_before is None else
                f"; one-minute load average {load_before:.2f} before the run, {env['load_average_after']:.2f} after")
        print(f"machine: {env['device_name']}, {os.cpu_count()} logical CPUs{load}", file=out)
    else:
        floors = []
        if bandwidth is not None:
            floors.append(f"logits path, bytes / measured copy bandwidth {bandwidth / 1e12:.2f} TB/s")
        if any(isinstance(r.workload, LinearWorkload) and r.floor_s is not None for r in results):
            floors.append("fused linear path, cuBLAS time of the products the direction needs on the scored rows "
                          "(logits, hidden and weight gradients), measured in this run")
        print("time: median and (min-max) of CUDA events over calls on rotating inputs; memory: max_memory_allocated "
              f"above the inputs; floor: {'; '.join(floors) or 'none measured'}", file=out)
    if json_path is not None:
        write_json(json_path, results, env, bandwidth)
        print(f"wrote {json_path}", file=out)
    if plot_dir is not None:
        written = write_plots(plot_dir, results, str(env["device_name"]))
        for path in written:
            print(f"wrote {path}", file=out)
        if not written:
            print(f"no plots written: nothing was measured, so {plot_dir} was not created", file=out)
    return results


def _build(implementation: Implementation, workload: Workload | LinearWorkload,
           built: dict[tuple[str, str], Candidate | Exception]) -> Candidate | Exception:
    """The implementation's callable, built (compiled, loaded) once per path, or the error its
    build raised (then reported as that implementation's failure on every workload)."""
    key = (workload.path, implementation.name)
    if key not in built:
        try:
            built[key] = implementation.build()
        except Exception as error:  # noqa: BLE001 - one peer that does not load must not end the run
            built[key] = error
    return built[key]


def _run_gpu(chosen: Mapping[str, Sequence[Implementation]], workloads: Sequence[Workload | LinearWorkload],
             device: torch.device, calls: int, progress: TextIO) -> tuple[list[Measurement], float | None]:
    """Each implementation alone on each workload, ``calls`` timed calls after two warm-ups, with
    the floors measured in the same run; rows that cannot run here are recorded without a line
    of progress. Returns the measurements and the copy bandwidth (bytes/s) when measured."""
    plan = [(implementation, workload) for path, candidates in chosen.items() for implementation in candidates
            for workload in workloads if workload.path == path]
    runnable = sum(implementation.unavailable is None for implementation, _ in plan)
    bandwidth = None
    if "logits" in chosen:
        print("measuring the copy bandwidth (the logits path's floor) ...", file=progress, flush=True)
        bandwidth = copy_bandwidth(device)
        print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)", file=progress, flush=True)
    gemms: dict[LinearWorkload, dict[str, float]] = {}  # the fused linear path's floors
    results: list[Measurement] = []
    built: dict[tuple[str, str], Candidate | Exception] = {}
    k = 0
    for implementation, workload in plan:
        if implementation.unavailable is not None:
            results.append(measure(implementation, workload, device, calls=calls))
            continue
        if isinstance(workload, LinearWorkload) and workload not in gemms:
            print(f"measuring the cuBLAS time of the products of {workload.name()} (its floor) ...",
                  file=progress, flush=True)
            gemms[workload] = gemm_seconds(workload, device)
            torch.cuda.empty_cache()
        k += 1
        print(f"[{k:>3}/{runnable}] {workload.path:<6} {implementation.name:<40} {workload.name()}",
              file=progress, flush=True)
        candidate = _build(implementation, workload, built)
        try:
            if isinstance(candidate, Exception):
                raise candidate
            results.append(measure(implementation, workload, device, calls=calls, warmup=2, candidate=candidate,
                                   bandwidth=bandwidth, gemms=gemms.get(workload)))
        except Exception as error:  # noqa: BLE001 - one failing peer must not end the run; it is reported
            results.append(Measurement(implementation.name, workload, str(device), skipped=_failure(workload, error)))
        torch.cuda.empty_cache()  # the next row may need the memory this one's allocator kept
    return results, bandwidth


def _run_cpu(chosen: Mapping[str, Sequence[Implementation]], workloads: Sequence[Workload | LinearWorkload],
             device: torch.device, budget: CallBudget, progress: TextIO) -> list[Measurement]:
    """Per workload, the implementations that run here in interleaved rounds within ``budget``,
    one warm-up round first (it warms the thread pools and
    the allocator); the others recorded as not run, with the reason."""
    results: list[Measurement] = []
    built: dict[tuple[str, str], Candidate | Exception] = {}
    for k, workload in enumerate(workloads, start=1):
        candidates = chosen[workload.path]
        group, by_name = [], {}
        for implementation in candidates:
            candidate = None if implementation.unavailable else _build(implementation, workload, built)
            if implementation.unavailable is not None:
                by_name[implementation.name] = measure(implementation, workload, device, calls=1)
            elif isinstance(candidate, Exception):
                by_name[implementation.name] = Measurement(implementation.name, workload, str(device),
                                                           skipped=_failure(workload, candidate))
            else:
                group.append((implementation, candidate))
        print(f"[{k:>3}/{len(workloads)}] {workload.path:<6} {workload.name()}: "
              f"{', '.join(i.name for i, _ in group)}, in interleaved rounds ...", file=progress, flush=True)
        begin = time.perf_counter()
        measured = measure_interleaved(group, workload, device, warmup=1, min_calls=budget.min_calls,
                                       max_calls=budget.max_calls, budget_s=budget.seconds)
        by_name.update((m.implementation, m) for m in measured)
        print(f"          {max((len(m.times_s) for m in measured), default=0)} timed rounds in "
              f"{time.perf_counter() - begin:.1f} s", file=progress, flush=True)
        results += [by_name[i.name] for i in candidates]
    return results


def _add_cpu_memory(results: Sequence[Measurement], chosen: Mapping[str, Sequence[Implementation]],
                    progress: TextIO) -> None:
    """Fill the CPU memory figures, two fresh processes at a time (after the timings, so the
    processes do not share the cores with a timed call)."""
    scripts = {(path, i.name): i.memory_script_args for path, candidates in chosen.items() for i in candidates}
    jobs = []
    for r in results:
        args = scripts.get((r.workload.path, r.implementation))
        if r.skipped is None and args is not None:
            reason = cpu_memory_unavailable(r.workload)
            if reason is None:
                jobs.append((r, args))
            elif r.memory_method is None:
                r.memory_method = f"not measured: {reason}"
    if not jobs:
        return
    print(f"measuring peak memory in {len(jobs)} fresh processes ...", file=progress, flush=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        peaks = list(pool.map(lambda job: measure_cpu_memory(*job), ((r.workload, args) for r, args in jobs)))
    for (r, _), peak in zip(jobs, peaks):
        r.peak_extra_bytes, r.memory_method = peak, "peak resident memory (VmHWM) above the inputs, fresh process"
