"""The problems the benchmarks measure: :class:`Workload` (the logits path) and
:class:`LinearWorkload` (the fused linear path), the sweeps and default subsets of them, and their
inputs."""

from __future__ import annotations

import dataclasses
import math
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
    inputs without gradients: a reference model's forward). ``mean_entropy``: None for logits of
    a random spread (nothing for a gradient filter to leave out), or the mean entropy in nats of
    a trained model's peaked distributions (1.5-3; see :func:`make_inputs`).
    """

    tokens: int
    hidden: int
    vocab: int
    dtype: torch.dtype = torch.bfloat16
    ignored_fraction: float = 0.0
    direction: str = "fwd+bwd"
    mean_entropy: float | None = None
    path: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        _check_workload(self, LINEAR_DIRECTIONS, tokens=self.tokens, hidden=self.hidden, vocab=self.vocab)
        if self.mean_entropy is not None and not 0.0 < self.mean_entropy < math.log(self.vocab):
            raise ValueError(f"mean_entropy must be in (0, log(vocab) = {math.log(self.vocab):.2f}) nats or None, "
                             f"got {self.mean_entropy}")

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
        peaked = "" if self.mean_entropy is None else f" entropy={self.mean_entropy:g}nats"
        return (f"{self.direction} {self.tokens}x{self.hidden}x{self.vocab} {dtype_name(self.dtype)}"
                f" ignored={self.ignored_fraction:.0%}{peaked}")


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
    have that same spread, or with ``mean_entropy`` the peaked head of :func:`peaked_head`; both
    require gradients unless the direction is "fwd-nograd".
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    if isinstance(workload, LinearWorkload) and workload.mean_entropy is not None:
        hidden, weight, labels = peaked_head(workload, device, generator)
    else:
        labels = torch.randint(0, workload.vocab, (workload.tokens,), device=device, generator=generator)
    labels[: workload.ignored_rows] = IGNORE_INDEX
    if isinstance(workload, Workload):
        logits = torch.randn(workload.tokens, workload.vocab, device=device, generator=generator) * 4
        return logits.to(workload.dtype).requires_grad_(True), labels
    if workload.mean_entropy is None:
        hidden = torch.randn(workload.tokens, workload.hidden, device=device, generator=generator)
        weight = torch.randn(workload.vocab, workload.hidden, device=device, generator=generator)
        weight *= 4 / workload.hidden**0.5
    differentiable = workload.direction != "fwd-nograd"
    return (hidden.to(workload.dtype).requires_grad_(differentiable),
            weight.to(workload.dtype).requires_grad_(differentiable), labels)


# The peaked head: logits z_iv = prior_v + CONTEXT_SPREAD g_iv + boost 1[v = y_i], g_iv ~ N(0, 1).
CONTEXT_SPREAD = 2.0
# Rows on which the label boost is fitted to the mean entropy (the fit costs two products of
# this many rows).
_FIT_ROWS = 512


def peaked_head(workload: LinearWorkload, device: torch.device, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 hidden [tokens, H] and weight [V, H] and labels [tokens] whose logits are peaked like
    a trained language model's, at ``workload.mean_entropy`` nats on average:

        z_iv = prior_v + CONTEXT_SPREAD g_iv + boost 1[v = y_i],   prior_v = -log(v + 1)

    a Zipf prior over token ids (frequent ids first, as a BPE vocabulary roughly orders them: the
    probable columns of different rows fall in the same vocabulary tiles, which is what lets a
    gradient filter leave whole tiles out), a context-dependent normal spread, and the label (drawn
    from the prior) raised by the one ``boost`` that gives the mean entropy asked for, fitted by
    bisection on the first rows. Built in coordinates: hidden's column 0 is 1 and weight's is the
    prior; the other columns are a CONTEXT_SPREAD-scaled normal in hidden, a normal / sqrt(H) in
    weight, plus in hidden boost times the label's weight row over its squared norm (which adds
    exactly boost to the label's logit).
    """
    tokens, hidden_size, vocab = workload.tokens, workload.hidden, workload.vocab
    if hidden_size < 2:
        raise ValueError(f"hidden must be >= 2 for peaked logits, got {hidden_size}")
    prior = -torch.arange(1, vocab + 1, device=device, dtype=torch.float32).log()
    labels = torch.multinomial(prior.exp(), tokens, replacement=True, generator=generator)
    weight = torch.randn(vocab, hidden_size, device=device, generator=generator) / hidden_size**0.5
    weight[:, 0] = prior
    context = torch.randn(tokens, hidden_size, device=device, generator=generator) * CONTEXT_SPREAD
    context[:, 0] = 1.0
    # The label's direction, scaled so that it adds 1 to the label's logit (|w_y[1:]|^2 -> 1).
    label_rows = weight[labels].clone()
    label_rows[:, 0] = 0.0
    label_rows /= label_rows.square().sum(1, keepdim=True)
    fit = slice(0, min(tokens, _FIT_ROWS))
    base, per_boost = context[fit] @ weight.T, label_rows[fit] @ weight.T
    low, high = 0.0, 4.0 * math.log(vocab)
    for _ in range(30):
        boost = (low + high) / 2
        log_p = torch.log_softmax(base + boost * per_boost, dim=1)
        if -(log_p.exp() * log_p).sum(1).mean() > workload.mean_entropy:
            low = boost
        else:
            high = boost
    return context + (low + high) / 2 * label_rows, weight, labels


def peaked_profile(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, grad_filter_eps: float,
                   block: tuple[int, int], rows_per_chunk: int = 1024) -> dict[str, float]:
    """What a workload's logits are like for a gradient filter, from its inputs (hidden [N, H],
    weight [V, H], labels [N]): the mean entropy (nats) of the scored rows, and the fraction of
    [block[0], block[1]] tiles of the scored rows' logits gradient (d sum log p / dz = onehot -
    p, the benchmark's upstream gradient of ones) whose every |entry| is below
    ``grad_filter_eps``: the tiles that ``grad_filter_eps`` leaves out of the products."""
    rows = hidden[labels != IGNORE_INDEX]
    scored = labels[labels != IGNORE_INDEX]
    block_rows, block_columns = block
    rows_per_chunk = max(block_rows, rows_per_chunk // block_rows * block_rows)
    entropy_sum, skipped, tiles = 0.0, 0, 0
    for start in range(0, rows.shape[0], rows_per_chunk):
        chunk = slice(start, start + rows_per_chunk)
        log_p = torch.log_softmax((rows[chunk] @ weight.T).float(), dim=1)
        p = log_p.exp()
        entropy_sum += float(-(p * log_p).sum())
        grad = p.neg_().scatter_add_(1, scored[chunk, None], torch.ones_like(log_p[:, :1])).abs_()
        n, v = grad.shape
        padded = torch.nn.functional.pad(grad, (0, -v % block_columns, 0, -n % block_rows))
        tile_max = padded.view(padded.shape[0] // block_rows, block_rows, -1, block_columns).amax(dim=(1, 3))
        skipped += int((tile_max < grad_filter_eps).sum())
        tiles += tile_max.numel()
    return {"mean_entropy": entropy_sum / max(rows.shape[0], 1), "skipped_tile_fraction": skipped / max(tiles, 1)}
