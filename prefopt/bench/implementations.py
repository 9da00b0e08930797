"""What the benchmarks measure: :class:`Implementation`, and the adapters of prefopt's backends,
the plain-PyTorch reference, ``torch.compile`` of it and the peers, for the logits path
(:func:`implementations`) and the fused linear path (:func:`linear_implementations`)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import torch

from ..backends import unavailable_reason
from .workloads import IGNORE_INDEX

REFERENCE = "reference"

# A function of one input set, (logits [N, V], labels [N]) for the logits path or (hidden [N, H],
# weight [V, H], labels [N]) for the fused linear path, giving a per-token [N] tensor whose sum
# is what the backward differentiates.
Candidate = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A way to compute per-token log-probs; ``build`` makes the callable (compiling or loading
    a peer happens there, once). Implementations that write the gradient over their logits
    ("-inplace", Liger) are safe to time: every measurement makes its own inputs."""

    name: str
    build: Callable[[], Candidate]
    unavailable: str | None = None
    # For CPU memory, the arguments `python -m prefopt.bench.memory PATH` takes before the
    # shape: BACKEND INPLACE for the logits path, BACKEND for the fused linear path.
    memory_script_args: tuple[str, ...] | None = None
    # Fused linear path: the matrix products (names in GEMM_PRODUCTS, on the scored rows) it
    # performs per direction, declared for prefopt's own backends only: a peer's internals are
    # not ours to state.
    gemm_products: Mapping[str, tuple[str, ...]] | None = None


# ----------------------------------------------------------------------------------------------
# Implementations of the logits path: (logits [N, V], labels [N]) -> [N]


def _reference_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """prefopt's plain-PyTorch definition (prefopt.logprobs.reference), uncompiled, for torch.compile."""
    from ..logprobs.reference import reference_token_stats

    return reference_token_stats(logits, labels, ignore_index=IGNORE_INDEX, temperature=1.0, softcap=None,
                                 stats=frozenset()).logps


def _prefopt(backend: str, inplace: bool = False, entropy: bool = False) -> Callable[[], Candidate]:
    def build() -> Candidate:
        from ..logprobs.api import token_logprobs

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


def _prefopt_linear(backend: str, grad_filter_eps: float | None = None) -> Callable[[], Candidate]:
    def build() -> Candidate:
        from ..logprobs.linear import linear_token_logprobs

        def candidate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return linear_token_logprobs(hidden, weight, labels, backend=backend, grad_filter_eps=grad_filter_eps)

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
# prefopt's filtered fused backward: the threshold CCE's default filter uses in bf16 (2^-12).
FILTER_EPS = 2.0**-12
FUSED_FILTERED = "prefopt-triton-fused-filtered"
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
        # Its backward with grad_filter_eps = FILTER_EPS: the gradient tiles below it are left out
        # of the two gradient products (what it gains depends on the logits: see
        # workloads.peaked_profile).
        Implementation(FUSED_FILTERED, _prefopt_linear("triton-fused", FILTER_EPS), unavailable=triton,
                       gemm_products=PREFOPT_LINEAR_PRODUCTS),
        # The memory process's "reference" backend computes the same explicit logits (float32 on
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
