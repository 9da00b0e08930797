"""Log-probs and per-token statistics straight from hidden states and an LM-head weight, without
ever materializing the [tokens, V] logits.

The logits are

    x = logit_scale * (hidden @ weight.T + bias)        (bias optional)
    z = softcap(x) / temperature                         (softcap(x) = c * tanh(x / c), optional)

in that order, and every output is that of ``prefopt.token_stats`` on x: the same log-probs,
entropy, mean logit (of z), log sum p^2 and is-top-1 (ties to the earlier token).

- ``hidden`` [..., H]: bfloat16, float16, float32 (float64 too; the "reference" backend then
  computes in float64). Any strides: the fused backends read it as [tokens, H] rows, which for a
  view such as ``hidden[:, :-1]`` is a copy of O(tokens * H) elements, never O(tokens * V).
- ``weight`` [V, H] and optional ``bias`` [V]: the dtype and device of ``hidden``.
- ``labels`` [...] = hidden.shape[:-1], int64/int32, already shifted; ``ignore_index`` marks
  unscored positions, which give exactly 0 and receive exactly 0 gradient.
- Gradients flow to hidden, weight and bias through logps, entropy, mean_logits and
  log_sum_sq_probs. The weight and bias gradients are accumulated in float32 and rounded to the
  parameter dtype once, at the end.
- A DTensor weight or bias (FSDP2, tensor parallelism) is gathered into the full tensor first,
  its gradient averaged back onto the shards (``_full_head``).
- ``process_group``: the weight and bias are this rank's rows of an LM head sharded over the
  vocabulary, hidden and labels are replicated (see ``prefopt.logprobs.distributed``).

Backends:

- "reference": explicit logits (float32; float64 for float64 inputs) and plain autograd. It
  materializes [tokens, V]: the oracle, not for training.
- "torch": chunks of hundreds of scored rows x the whole vocabulary, any device. A chunk's
  [rows, V] buffer (1/8 of the problem's float32 logits, within ``torch_backend``'s bounds; one buffer,
  reused) is written by one product, alpha * (hidden @ weight.T + bias) with logit_scale / T
  folded into alpha, and ``torch_backend.row_stats_`` / ``row_gradient_`` work on it in place (at most
  two more buffers of its size for the entropy and softcap terms): no copies of tiles. bf16/fp16
  weights are upcast a vocabulary tile (``WEIGHT_TILE_BYTES``) at a time; float32 ones are used
  where they lie. The backward recomputes each chunk's logits with the same product (bit for
  bit), turns them into their gradient in place, and accumulates grad_hidden and grad_weight in
  float32 in a fixed order (deterministic). Rows whose label is ignored are dropped before any
  product (one host round trip per call on a GPU, to count them; none while a CUDA graph is
  captured, when every row is multiplied and the ignored ones are zeroed before the gradient).
- "triton" and "cuda" (bf16/fp16/fp32): cuBLAS products, and the token-stats kernels of the
  logits path (Triton's, or the CUDA C++ ones of ``csrc/``) on float32 logits tiles of at most
  ``GEMM_TILE_BYTES`` whatever the number of tokens (bf16/fp16 operands on the tensor cores,
  cuBLAS accumulating and writing float32).
  - Forward: chunks of scored rows x the whole vocabulary, each turned into its rows' statistics.
  - Backward: every scored row x a vocabulary tile, turned into its gradient in place, then the
    two gradient products. Each tile's grad_weight rows come from one product over every scored
    token, so they are summed in float32 by cuBLAS, never across tiles; grad_hidden is summed
    over the tiles in float32. In bf16/fp16 the logits gradient is rounded to that dtype for the
    products (tensor cores). 4 products in all (the logits, their recomputation, the two
    gradients), no atomics: deterministic. The forward and the backward compute the logits with
    the same products, so the backward's probabilities are those of the saved log-sum-exp.
  - logit_scale is folded into the kernels' temperature and softcap, so that the kernels give
    the gradient of hidden @ weight.T + bias directly.
  - Ignored rows are dropped as in "torch": one host round trip per call, to count them, except
    while a CUDA graph is being captured, when every row is multiplied instead.
  - Why not a kernel fused over the products: its forward's tl.dot tiles would need to match
    cuBLAS in the backward bit for bit (or the backward's probabilities drift from the saved
    log-sum-exp), and a fused backward must sum each program's grad_weight (or grad_hidden) slab
    over every tile of the other dimension: a [128, H] float32 slab fits neither registers nor
    shared memory, so it would travel to and from global memory once per tile, about a terabyte
    at 16384 x 4096 x 128256, where cuBLAS reads each operand a few times.
- "triton-fused" (bf16/fp16/fp32; chosen by name while GPU measurements are pending): the
  statistics inside the GEMM. ``prefopt/kernels/linear_stats_fwd.py`` turns each tl.dot logits
  tile into per-(row, vocabulary tile) partials in registers, merged over the tiles in a fixed
  order, so the logits never reach memory; ``prefopt/kernels/linear_stats_bwd.py`` recomputes each tile
  the same way and writes its gradient once in the operands' dtype for the two gradient products
  (cuBLAS, or with ``grad_filter_eps`` the deterministic block-sparse kernels
  ``prefopt/kernels/linear_grad_hidden.py`` and ``linear_grad_weight.py``). The tiles are the
  fastest of a small Hopper-sized set, timed once per shape class on a GPU and kept for the
  process (``tile_config``), the same for a forward and its backward; [64, 64] elsewhere.
- "auto": "triton" on CUDA tensors (PREFOPT_BACKEND as for the logits path, "cuda" included),
  "torch" elsewhere and for float64.
"""

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import _validation, backends
from .._codes import NO_LABEL
from .._types import STAT_NAMES, TokenStats
from . import distributed, torch_backend
from .api import local_token_stats, reduce_sequences
from .op import (dense_upstream, empty_stats_outputs, logps_upstream, lse_label_gradient,
                  shaped_stats)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Partial

Tensor = torch.Tensor

# The statistics inside the GEMM (prefopt/kernels/linear_stats_fwd.py, linear_stats_bwd.py): selectable
# by this name next to "triton" (cuBLAS tiles), until GPU measurements decide between them.
FUSED = backends.LINEAR_FUSED


# ----------------------------------------------------------------------------- validation


def _full_head(name: str, tensor: Tensor | None, process_group: "ProcessGroup | None") -> Tensor | None:
    """The LM head's weight or bias as one plain tensor: a DTensor (an FSDP2 parameter outside its
    module's forward, or a tensor-parallel one) is gathered whole, anything else is returned as is.

    The gathered tensor's gradient goes back to the DTensor averaged over its mesh's ranks
    (``Partial("avg")``), so each shard gets the data-parallel mean FSDP2 gives it (and ranks
    that computed the same gradient, from replicated inputs, keep it). With ``process_group`` the
    weight is already this rank's vocabulary rows: a DTensor is refused there rather than gathered.
    """
    if not (torch.distributed.is_available() and isinstance(tensor, DTensor)):
        return tensor
    if process_group is not None:
        raise TypeError(f"{name}: a DTensor with process_group; pass this rank's rows as a plain tensor "
                        f"({name}.to_local()), or no process_group to gather the whole head")
    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)


def _check_grad_filter_eps(grad_filter_eps: object, backend: str) -> None:
    if grad_filter_eps is None:
        return
    if isinstance(grad_filter_eps, bool) or not isinstance(grad_filter_eps, (int, float)):
        raise TypeError(f"grad_filter_eps: expected a float or None, got {type(grad_filter_eps).__name__}")
    if not (math.isfinite(grad_filter_eps) and grad_filter_eps >= 0):
        raise ValueError(f"grad_filter_eps: expected a finite value >= 0 or None, got {grad_filter_eps}")
    if backend != FUSED:
        raise ValueError(f"grad_filter_eps: only backend={FUSED!r} filters the gradient, got backend={backend!r}")


# ----------------------------------------------------------------------------- torch backend


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# The fused linear path's chunks of rows hold 1/8 of the [tokens, V] float32 logits (within
# torch_backend's bounds): with at most three alive, well within its 0.5x target.
LINEAR_PATH_FRACTION = 8
# bf16/fp16 weights are upcast for the CPU's float32 products a vocabulary tile at a time.
WEIGHT_TILE_BYTES = 8 << 20


def _vocab_tiles(weight: Tensor) -> list[slice]:
    """Vocabulary tiles of the products: the whole vocabulary when the weight is already in the
    compute dtype (no copy), else tiles whose upcast holds at most WEIGHT_TILE_BYTES."""
    vocab_size, hidden_size = weight.shape
    if weight.dtype == _compute_dtype(weight.dtype):
        return [slice(0, vocab_size)]
    step = max(1, WEIGHT_TILE_BYTES // (4 * hidden_size))
    return [slice(start, start + step) for start in range(0, vocab_size, step)]


def _torch_transform(temperature: float, softcap: float | None, logit_scale: float
                     ) -> tuple[float, float, float | None]:
    """(alpha, temperature', softcap') for the torch backend's chunks: the products compute
    alpha * (hidden @ weight.T + bias), which ``torch_backend``'s row functions transform with
    (temperature', softcap'). Without a cap, logit_scale / T folds into alpha (z comes straight
    out of the product, no pass over the chunk); with one, alpha = logit_scale gives x. The
    gradient those functions return, times alpha, is that of y = hidden @ weight.T + bias."""
    if softcap is None:
        return logit_scale / temperature, 1.0, None
    return logit_scale, temperature, softcap


def _chunk_logits_(out: Tensor, hidden_rows: Tensor, weight: Tensor, bias: Tensor | None, alpha: float,
                   tiles: list[slice]) -> Tensor:
    """out [rows, V] = alpha * (hidden_rows @ weight.T + bias) in the compute dtype, written in
    place by the products (a vocabulary tile's columns are a strided view the GEMM writes)."""
    for tile in tiles:
        w = weight[tile].to(hidden_rows.dtype)
        if bias is None:
            torch.addmm(out[:, tile], hidden_rows, w.T, beta=0.0, alpha=alpha, out=out[:, tile])
        else:
            torch.addmm(bias[tile].to(hidden_rows.dtype), hidden_rows, w.T, beta=alpha, alpha=alpha, out=out[:, tile])
    return out


def _capturing(labels: Tensor) -> bool:
    return labels.is_cuda and torch.cuda.is_current_stream_capturing()


def _scored_rows(labels: Tensor, ignore_index: int) -> Tensor:
    """The indices of the rows to multiply: those whose label is scored.

    Ignored rows never reach a matrix product, so a completion-only batch with long prompts pays
    only for its completion tokens. Counting them is one host round trip per call on a GPU, which
    a CUDA graph cannot hold: while one is being captured every row is multiplied instead (the
    kernels give ignored rows their exact zeros), so a step with the fused LM head is capturable.
    """
    if _capturing(labels):
        return torch.arange(labels.numel(), device=labels.device)
    return (labels != ignore_index).nonzero().squeeze(-1)


def _forward_by_row_chunks(hidden_2d, labels, outputs, ignore_index, rows_per_chunk, chunk_stats) -> None:
    """Fill ``outputs`` chunk by chunk of scored rows: ``chunk_stats(hidden_rows, labels, outputs)``
    computes the statistics of one chunk; ignored rows give exact zeros (False for is_top1)."""
    for output in outputs:
        if output is not None:
            output.zero_()
    for rows in _scored_rows(labels, ignore_index).split(rows_per_chunk):
        chunk_outputs = [None if output is None else output.new_empty(rows.shape) for output in outputs]
        chunk_stats(hidden_2d.index_select(0, rows), labels.index_select(0, rows), chunk_outputs)
        for output, chunk_output in zip(outputs, chunk_outputs):
            if output is not None:
                output.index_copy_(0, rows, chunk_output)


def _torch_row_chunks(hidden_2d: Tensor, labels: Tensor, ignore_index: int, vocab_size: int
                      ) -> tuple[Tensor, list[slice] | list[Tensor]]:
    """(one reused [chunk, V] compute-dtype buffer, the chunks of scored rows) of the torch
    backend: slices when every row is multiplied (nothing gathered or scattered), else index
    tensors. The forward and the backward split the rows alike, so that the backward's products
    repeat the forward's bit for bit."""
    rows = _scored_rows(labels, ignore_index)
    count = rows.numel()
    step = torch_backend.rows_per_chunk(max(1, count), vocab_size, LINEAR_PATH_FRACTION)
    buffer = hidden_2d.new_empty(min(step, count), vocab_size, dtype=_compute_dtype(hidden_2d.dtype))
    if count == labels.numel():
        return buffer, [slice(start, start + step) for start in range(0, count, step)]
    return buffer, list(rows.split(step))


def _torch_forward(hidden_2d, weight, bias, labels, outputs, ignore_index, temperature, softcap, logit_scale):
    compute_dtype = _compute_dtype(hidden_2d.dtype)
    tiles = _vocab_tiles(weight)
    alpha, chunk_temperature, chunk_softcap = _torch_transform(temperature, softcap, logit_scale)
    for output in outputs:
        if output is not None:
            output.zero_()
    buffer, chunks = _torch_row_chunks(hidden_2d, labels, ignore_index, weight.shape[0])
    for chunk in chunks:
        gathered = isinstance(chunk, Tensor)
        hidden_rows = hidden_2d[chunk].to(compute_dtype)
        chunk_outputs = [None if o is None else (o.new_empty(chunk.shape) if gathered else o[chunk]) for o in outputs]
        logits = _chunk_logits_(buffer[: hidden_rows.shape[0]], hidden_rows, weight, bias, alpha, tiles)
        torch_backend.row_stats_(logits, labels[chunk], *chunk_outputs, ignore_index=ignore_index,
                           temperature=chunk_temperature, softcap=chunk_softcap)
        if gathered:
            for output, chunk_output in zip(outputs, chunk_outputs):
                if output is not None:
                    output.index_copy_(0, chunk, chunk_output)


def _torch_backward(hidden_2d, weight, bias, labels, lse, entropy, log_sum_sq_probs, grad_logps, grad_lse,
                    grad_entropy, grad_mean_logits, grad_log_sum_sq_probs, ignore_index, temperature, softcap,
                    logit_scale, need_hidden, need_weight, need_bias):
    compute_dtype = _compute_dtype(hidden_2d.dtype)
    tiles = _vocab_tiles(weight)
    alpha, chunk_temperature, chunk_softcap = _torch_transform(temperature, softcap, logit_scale)
    # Ignored rows receive exact zeros and cost nothing.
    grad_hidden = torch.zeros(hidden_2d.shape, dtype=compute_dtype, device=hidden_2d.device) if need_hidden else None
    # float32 accumulators, rounded to the parameter dtype once by the caller: rounding every
    # chunk's product to bf16 before summing would bias training. For float32 parameters they
    # are the gradients returned, no copy.
    grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[0], dtype=compute_dtype, device=weight.device) if need_bias else None
    buffer, chunks = _torch_row_chunks(hidden_2d, labels, ignore_index, weight.shape[0])
    capturing = _capturing(labels)
    for chunk in chunks:
        gathered = isinstance(chunk, Tensor)
        hidden_rows = hidden_2d[chunk].to(compute_dtype)
        logits = _chunk_logits_(buffer[: hidden_rows.shape[0]], hidden_rows, weight, bias, alpha, tiles)
        if capturing:
            # Every row is multiplied: an ignored row's logits, whose saved lse is 0, could
            # overflow exp; zeroed, they give exact zeros.
            torch_backend.copy_scored_rows(logits, logits, labels[chunk] != ignore_index)
        # The logits buffer becomes d(outputs)/d(logits) in place; times alpha, that of y.
        grad_y = torch_backend.row_gradient_(
            logits, labels[chunk], lse[chunk], *(None if t is None else t[chunk] for t in (
                entropy, log_sum_sq_probs, grad_logps, grad_entropy, grad_mean_logits, grad_log_sum_sq_probs)),
            ignore_index=ignore_index, temperature=chunk_temperature, softcap=chunk_softcap)
        if grad_bias is not None:
            grad_bias.add_(grad_y.sum(0), alpha=alpha)
        grad_hidden_rows = None
        if grad_hidden is not None:
            grad_hidden_rows = torch.zeros_like(hidden_rows) if gathered else grad_hidden[chunk]
        for k, tile in enumerate(tiles):
            w = weight[tile].to(compute_dtype)
            if grad_hidden_rows is not None:
                # The first tile writes the rows (beta 0), the others add to them.
                grad_hidden_rows.addmm_(grad_y[:, tile], w, beta=1.0 if k else 0.0, alpha=alpha)
            if grad_weight is not None:
                grad_weight[tile].addmm_(grad_y[:, tile].T, hidden_rows, alpha=alpha)
        if grad_hidden is not None and gathered:
            grad_hidden.index_copy_(0, chunk, grad_hidden_rows)
    if grad_lse is not None:
        _add_lse_label_gradient(hidden_2d, weight, bias, labels, grad_lse, ignore_index, temperature, softcap,
                                logit_scale, grad_hidden, grad_weight, grad_bias)
    return grad_hidden, grad_weight, grad_bias


def _add_lse_label_gradient(hidden_2d: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, grad_lse: Tensor,
                            ignore_index: int, temperature: float, softcap: float | None, logit_scale: float,
                            grad_hidden: Tensor | None, grad_weight: Tensor | None, grad_bias: Tensor | None) -> None:
    """Adds the label-column part of the log-sum-exp's gradient (``prefopt.logprobs.op.lse_label_gradient``)
    to the torch backend's float32 sums: that column's logit gradient c, times logit_scale, reaches
    grad_hidden as c * weight[label], grad_weight[label] as c * hidden and grad_bias[label] as c.
    O(tokens * H) work and memory: one weight row per token."""
    labels = labels.long()
    scored = labels != ignore_index
    columns = torch.where(scored, labels, 0)
    compute_dtype = _compute_dtype(hidden_2d.dtype)
    hidden_rows = hidden_2d.to(compute_dtype)
    weight_rows = weight.index_select(0, columns).to(compute_dtype)
    label_logits = None
    if softcap is not None:
        label_logits = (hidden_rows * weight_rows).sum(-1)
        if bias is not None:
            label_logits = label_logits + bias.index_select(0, columns).to(compute_dtype)
        label_logits = label_logits * logit_scale
    grad_x = lse_label_gradient(grad_lse.to(compute_dtype), scored, label_logits, temperature, softcap) * logit_scale
    if grad_hidden is not None:
        grad_hidden += (grad_x.unsqueeze(-1) * weight_rows).to(grad_hidden.dtype)
    # index_put_ with accumulate sums repeated labels deterministically (index_add_ uses atomics on GPUs).
    if grad_weight is not None:
        grad_weight.index_put_((columns,), grad_x.unsqueeze(-1) * hidden_rows, accumulate=True)
    if grad_bias is not None:
        grad_bias.index_put_((columns,), grad_x, accumulate=True)


# ----------------------------------------------------------------------------- triton and cuda backends

# float32 logits of one tile: a chunk of rows x the vocabulary (forward), or every scored row x a
# vocabulary tile (backward). Large enough that each product keeps the tensor cores busy (at V
# 262144, 512 rows), bounded whatever the number of tokens.
GEMM_TILE_BYTES = 512 << 20
# Chunks of rows (forward) and vocabulary tiles (backward) are multiples of cuBLAS's widest tile
# edge, so that only the last one of a call ends in a partial GEMM tile.
GEMM_TILE_MULTIPLE = 256


def _gemm_tile_extent(other: int) -> int:
    """Rows of a forward chunk (``other`` = V) or columns of a backward tile (``other`` = scored
    rows): the most that keep an [extent, other] float32 tile within GEMM_TILE_BYTES, rounded down
    to a multiple of GEMM_TILE_MULTIPLE, and at least one multiple (so a vocabulary above
    GEMM_TILE_BYTES / 1 KiB, 524288, takes tiles over the budget rather than partial GEMM tiles)."""
    return max(1, GEMM_TILE_BYTES // (4 * other) // GEMM_TILE_MULTIPLE) * GEMM_TILE_MULTIPLE


def _float32_product(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b in float32. bf16/fp16 operands stay in their dtype on a GPU (tensor cores), cuBLAS
    accumulating and writing float32; a CPU has no such product (the kernels reach CPU tensors
    only through Triton's interpreter or the tests' host simulator), so operands are upcast.
    float32 operands follow torch's matmul precision setting (TF32 only where the user allows it)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


@functools.cache
def _cublas_accumulates_in_float32(dtype: torch.dtype) -> bool:
    """Whether this torch's addmm takes a float32 C with bf16/fp16 operands (``out_dtype``): newer
    releases do, earlier ones ask C to be in the operands' dtype. Probed once per dtype on the
    current GPU, with a 1 x 1 product."""
    one = torch.ones(1, 1, dtype=dtype, device="cuda")
    try:
        torch.addmm(torch.zeros(1, 1, device="cuda"), one, one, out_dtype=torch.float32)
    except (RuntimeError, TypeError):  # TypeError: a torch without the out_dtype argument
        return False
    return True


def _add_float32_product_(accumulator: Tensor, a: Tensor, b: Tensor) -> None:
    """accumulator += a @ b, for a float32 accumulator (see ``_float32_product``). On a GPU the
    accumulator is cuBLAS's C (beta 1) where torch allows it: no product written to memory and
    read back by a separate addition (12 bytes per element of the accumulator, per call)."""
    if a.dtype == torch.float32:
        accumulator.addmm_(a, b)
    elif a.is_cuda and _cublas_accumulates_in_float32(a.dtype):
        torch.addmm(accumulator, a, b, out_dtype=torch.float32, out=accumulator)
    else:
        accumulator += _float32_product(a, b)


def _float32_logits(hidden_rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """hidden_rows @ weight.T + bias, [rows, V'] float32 (see ``_float32_product``)."""
    if bias is None:
        return _float32_product(hidden_rows, weight.T)
    if hidden_rows.dtype == torch.float32:
        return torch.addmm(bias, hidden_rows, weight.T)
    if hidden_rows.is_cuda:
        return torch.addmm(bias, hidden_rows, weight.T, out_dtype=torch.float32)
    return torch.addmm(bias.float(), hidden_rows.float(), weight.T.float())


def _kernel_transform(temperature: float, softcap: float | None, logit_scale: float) -> tuple[float, float | None]:
    """The kernels' (temperature, softcap) that give z from y = hidden @ weight.T + bias, with
    logit_scale s folded in: softcap_c(s y) / T = softcap_{c/s}(y) / (T / s), and s y / T = y / (T / s)
    without a cap. The kernels' gradient is then that of y, which the products take."""
    return temperature / logit_scale, None if softcap is None else softcap / logit_scale


def _tiled_forward(token_stats_forward, hidden_2d, weight, bias, labels, outputs, ignore_index, temperature,
                   softcap, logit_scale):
    """The forward of the "triton" and "cuda" backends: cuBLAS float32 logits of a chunk of
    scored rows, turned into their statistics by ``token_stats_forward`` (the logits path's
    launcher of that backend)."""
    kernel_temperature, kernel_softcap = _kernel_transform(temperature, softcap, logit_scale)

    def chunk_stats(hidden_rows, chunk_labels, chunk_outputs):
        logits = _float32_logits(hidden_rows, weight, bias)
        token_stats_forward(logits.unsqueeze(0), chunk_labels, *chunk_outputs, ignore_index=ignore_index,
                            temperature=kernel_temperature, softcap=kernel_softcap)

    _forward_by_row_chunks(hidden_2d, labels, outputs, ignore_index, _gemm_tile_extent(weight.shape[0]), chunk_stats)


def _tiled_backward(token_stats_backward, writes_other_dtype, hidden_2d, weight, bias, labels, lse, entropy,
                    log_sum_sq_probs, grad_logps, grad_lse, grad_entropy, grad_mean_logits, grad_log_sum_sq_probs,
                    ignore_index, temperature, softcap, logit_scale, need_hidden, need_weight, need_bias):
    """The backward of the "triton" and "cuda" backends: cuBLAS float32 logits tiles of every
    scored row x a vocabulary tile, which ``token_stats_backward`` (the logits path's launcher of
    that backend, with its column_offset and softmax_size) turns into their gradient.

    Bytes per logit of a bf16/fp16 tile: cuBLAS writes the float32 logits (4), the kernel reads
    them (4) and writes the gradient once in the operands' dtype (2), which the two gradient
    products read (2 + 2): 14, with no cast pass. The log-sum-exp's label term must be added to a
    float32 gradient before it is rounded (it cancels against the kernel's value at the label),
    so a call with ``grad_lse`` works the tile in place in float32 and casts it (+ 8 bytes).

    grad_weight is written in the weight's dtype: each of its rows is one product over every
    scored token, summed in float32 by cuBLAS and rounded once, so no float32 [V, H] copy is
    needed. grad_hidden is summed over the tiles in float32 by the products themselves
    (``_add_float32_product_``). ``writes_other_dtype``: whether ``token_stats_backward`` can write a
    gradient of another dtype than its logits (Triton's can; the CUDA kernel writes in place)."""
    vocab_size = weight.shape[0]

    def float32_zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=weight.device)

    grad_hidden = float32_zeros(*hidden_2d.shape) if need_hidden else None
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    grad_bias = float32_zeros(vocab_size) if need_bias else None
    rows = _scored_rows(labels, ignore_index)
    if rows.numel() == 0:
        return grad_hidden, grad_weight, grad_bias
    # With every row multiplied (all scored, or a CUDA graph being captured), no row is gathered
    # or scattered; the kernels zero the gradient of ignored rows.
    all_scored = rows.numel() == labels.numel()

    def gathered(tensor):
        return tensor if tensor is None or all_scored else tensor.index_select(0, rows)

    hidden_rows = gathered(hidden_2d)
    row_arguments = [gathered(t) for t in (labels, lse, entropy, log_sum_sq_probs, grad_logps, grad_entropy,
                                           grad_mean_logits, grad_log_sum_sq_probs)]
    kernel_temperature, kernel_softcap = _kernel_transform(temperature, softcap, logit_scale)
    row_labels = row_arguments[0].long()
    label_columns = torch.where(row_labels != ignore_index, row_labels, -1)  # -1: in no tile
    grad_lse_rows = gathered(grad_lse)
    in_place = grad_lse_rows is not None or weight.dtype == torch.float32 or not writes_other_dtype
    grad_hidden_rows = float32_zeros(*hidden_rows.shape) if need_hidden and not all_scored else grad_hidden
    columns = _gemm_tile_extent(rows.numel())
    for start in range(0, vocab_size, columns):
        tile = slice(start, start + columns)
        logits = _float32_logits(hidden_rows, weight[tile], None if bias is None else bias[tile])
        if grad_lse_rows is not None:
            # The label column of the rows whose label is in this tile, read before it becomes a
            # gradient (its logit is needed under a softcap).
            local = label_columns - start
            in_tile = (local >= 0) & (local < logits.shape[1])
            index = torch.where(in_tile, local, 0).unsqueeze(1)
            label_logits = None if softcap is None else logits.gather(1, index).squeeze(1) * logit_scale
        # The products take the gradient in the operands' dtype (tensor cores).
        operand = logits if in_place else torch.empty(logits.shape, dtype=weight.dtype, device=logits.device)
        token_stats_backward(logits.unsqueeze(0), operand.unsqueeze(0), *row_arguments, ignore_index=ignore_index,
                             temperature=kernel_temperature, softcap=kernel_softcap, column_offset=start,
                             softmax_size=vocab_size)
        if grad_lse_rows is not None:
            # One column per row (no collisions): a gather and a scatter, deterministic.
            label_term = lse_label_gradient(grad_lse_rows, in_tile, label_logits, temperature, softcap) * logit_scale
            operand.scatter_(1, index, operand.gather(1, index) + label_term.unsqueeze(1))
        if grad_bias is not None:
            grad_bias[tile] = operand.sum(0, dtype=torch.float32)
        operand = operand.to(weight.dtype)
        if grad_weight is not None:
            torch.mm(operand.T, hidden_rows, out=grad_weight[tile])
        if grad_hidden_rows is not None:
            _add_float32_product_(grad_hidden_rows, operand, weight[tile])
    if grad_hidden is not None and not all_scored:
        grad_hidden.index_copy_(0, rows, grad_hidden_rows)
    return grad_hidden, grad_weight, grad_bias


def _fused_forward(hidden_2d, weight, bias, labels, outputs, ignore_index, temperature, softcap, logit_scale):
    """The forward of "triton-fused": per-(row, vocabulary tile) partials from the tl.dot tiles of
    ``kernels.linear_stats_fwd``, combined in a fixed order. The partials of a chunk of rows
    ([tiles, rows], seven numbers each) hold at most GEMM_TILE_BYTES."""
    from ..kernels.linear_stats_fwd import combine_partials, linear_stats_partials, tile_config

    vocab_size = weight.shape[0]
    names = ("logps", "lse", "entropy", "mean_logits", "log_sum_sq_probs", "is_top1")
    weight = weight.contiguous()
    transform = {"logit_scale": logit_scale, "temperature": temperature, "softcap": softcap}
    tiles = tile_config(hidden_2d, weight, bias, labels, **transform)

    def chunk_stats(hidden_rows, chunk_labels, chunk_outputs):
        partials = linear_stats_partials(hidden_rows.contiguous(), weight, bias, chunk_labels, **transform,
                                         tiles=tiles)
        stats = combine_partials(partials, chunk_labels, ignore_index, vocab_size)
        for output, name in zip(chunk_outputs, names):
            if output is not None:
                output.copy_(stats[name])

    vocab_tiles = -(-vocab_size // tiles.block_n)
    rows_per_chunk = max(tiles.block_m, GEMM_TILE_BYTES // (7 * 4 * vocab_tiles))
    _forward_by_row_chunks(hidden_2d, labels, outputs, ignore_index, rows_per_chunk, chunk_stats)


def _fused_backward(hidden_2d, weight, bias, labels, lse, entropy, log_sum_sq_probs, grad_logps, grad_lse,
                    grad_entropy, grad_mean_logits, grad_log_sum_sq_probs, ignore_index, temperature, softcap,
                    logit_scale, need_hidden, need_weight, need_bias, grad_filter_eps=None):
    """The backward of "triton-fused": every scored row x a vocabulary tile (a multiple of the
    tiles' block_n wide, so its tiles are the forward's, recomputed bit for bit), whose
    gradient ``kernels.linear_stats_bwd`` writes once in the operands' dtype; then the two
    gradient products, summed in float32 (grad_weight per tile by one product over every row,
    grad_hidden over the tiles in a fixed order). The log-sum-exp's label term is added as in
    the torch backend.

    ``grad_filter_eps``: a [block_m, block_n] tile of the logits gradient whose every |entry| is
    below it is left out of the two products (``kernels.linear_grad_hidden`` and
    ``linear_grad_weight``: fixed order, no atomics). With a threshold above 0 every tile goes
    through those kernels, so which kernel runs never depends on values on the device (no host
    synchronization: the step stays capturable in a CUDA graph); 0.0 leaves nothing out (|dy| >= 0)
    and takes the exact products, bit for bit. grad_bias is exact."""
    from ..kernels.linear_grad_hidden import linear_grad_hidden
    from ..kernels.linear_grad_weight import linear_grad_weight
    from ..kernels.linear_stats_bwd import linear_stats_grad_logits
    from ..kernels.linear_stats_fwd import tile_config

    vocab_size = weight.shape[0]
    weight = weight.contiguous()
    filtering = grad_filter_eps is not None and grad_filter_eps > 0

    def float32_zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=weight.device)

    grad_hidden = float32_zeros(*hidden_2d.shape) if need_hidden else None
    grad_weight = float32_zeros(*weight.shape) if need_weight else None
    grad_bias = float32_zeros(vocab_size) if need_bias else None
    rows = _scored_rows(labels, ignore_index)
    if rows.numel() > 0:
        all_scored = rows.numel() == labels.numel()

        def gathered(tensor):
            return tensor if tensor is None or all_scored else tensor.index_select(0, rows)

        hidden_rows = gathered(hidden_2d).contiguous()
        row_labels, row_lse = gathered(labels), gathered(lse)
        coefficients = torch_backend.gradient_coefficients(
            row_labels, *(gathered(t) for t in (entropy, log_sum_sq_probs, grad_logps, grad_entropy,
                                                 grad_mean_logits, grad_log_sum_sq_probs)),
            ignore_index=ignore_index, vocab_size=vocab_size)
        grad_hidden_rows = float32_zeros(*hidden_rows.shape) if need_hidden else None
        transform = {"logit_scale": logit_scale, "temperature": temperature, "softcap": softcap}
        tiles = tile_config(hidden_rows, weight, bias, row_labels, **transform)
        block_n = tiles.block_n
        columns = max(block_n, GEMM_TILE_BYTES // (hidden_rows.element_size() * rows.numel()) // block_n * block_n)
        for start in range(0, vocab_size, columns):
            tile = slice(start, start + columns)
            grad_y, tile_max = linear_stats_grad_logits(
                hidden_rows, weight, bias, row_labels, row_lse, coefficients, tile, ignore_index=ignore_index,
                **transform, tiles=tiles)
            if grad_bias is not None:
                grad_bias[tile] = grad_y.float().sum(0)
            if filtering:
                keep = (tile_max >= grad_filter_eps).to(torch.int32)
                if grad_weight is not None:
                    grad_weight[tile] = linear_grad_weight(grad_y, hidden_rows, keep, tiles=tiles)
                if grad_hidden_rows is not None:
                    linear_grad_hidden(grad_y, weight, keep, start, accumulator=grad_hidden_rows, tiles=tiles)
                continue
            if grad_weight is not None:
                grad_weight[tile] = _float32_product(grad_y.T, hidden_rows)
            if grad_hidden_rows is not None:
                _add_float32_product_(grad_hidden_rows, grad_y, weight[tile])
        if grad_hidden is not None:
            if all_scored:
                grad_hidden = grad_hidden_rows
            else:
                grad_hidden.index_copy_(0, rows, grad_hidden_rows)
    if grad_lse is not None:
        _add_lse_label_gradient(hidden_2d, weight, bias, labels, grad_lse, ignore_index, temperature, softcap,
                                logit_scale, grad_hidden, grad_weight, grad_bias)
    return grad_hidden, grad_weight, grad_bias


def _implementation(backend: str, grad_filter_eps: float | None = None):
    """(forward, backward) of a fused backend. forward(hidden [N, H], weight, bias, labels [N],
    outputs, ...) fills the [N] outputs; backward returns (grad_hidden [N, H], grad_weight
    [V, H], grad_bias [V]), each None where not needed and otherwise summed in float32, to be
    rounded to the input's dtype by the caller (or already rounded once, in that dtype)."""
    if backend == "torch":
        return _torch_forward, _torch_backward
    if backend == FUSED:
        return _fused_forward, functools.partial(_fused_backward, grad_filter_eps=grad_filter_eps)
    if backend in backends.FUSED_BACKENDS:
        row_kernels = backends.row_kernels(backend)
        return (functools.partial(_tiled_forward, row_kernels.token_stats_forward),
                functools.partial(_tiled_backward, row_kernels.token_stats_backward, backend == "triton"))
    raise ValueError(f"backend: the fused linear operators run 'triton', '{FUSED}', 'cuda' or 'torch', "
                     f"got {backend!r}")


# ----------------------------------------------------------------------------- operators


def _rows(hidden: Tensor) -> Tensor:
    # [tokens, H] with a contiguous last dimension: a view when the leading dimensions merge,
    # else a copy of O(tokens * H).
    rows = hidden.reshape(-1, hidden.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


@torch.library.custom_op("prefopt::linear_token_stats", mutates_args=())
def linear_token_stats_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    with_entropy: bool,
    with_mean_logits: bool,
    with_log_sum_sq_probs: bool,
    with_is_top1: bool,
    backend: str,
    grad_filter_eps: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logps, lse, entropy, mean_logits, log_sum_sq_probs, is_top1), each [N] float32 (is_top1
    bool; [0] when not asked for), for hidden [..., H] with N = labels.numel() rows.
    ``grad_filter_eps`` only reaches the backward ("triton-fused")."""
    forward, _ = _implementation(backend)
    outputs = empty_stats_outputs(hidden, labels.numel(), with_entropy, with_mean_logits,
                                  with_log_sum_sq_probs, with_is_top1)
    asked = (True, True, with_entropy, with_mean_logits, with_log_sum_sq_probs, with_is_top1)
    forward(_rows(hidden), weight, bias, labels, [o if a else None for o, a in zip(outputs, asked)],
            ignore_index, temperature, softcap, logit_scale)
    return outputs


@linear_token_stats_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, softcap, logit_scale, with_entropy,
      with_mean_logits, with_log_sum_sq_probs, with_is_top1, backend, grad_filter_eps):
    return empty_stats_outputs(hidden, labels.numel(), with_entropy, with_mean_logits,
                               with_log_sum_sq_probs, with_is_top1)


@torch.library.custom_op("prefopt::linear_token_stats_backward", mutates_args=())
def linear_token_stats_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    log_sum_sq_probs: Tensor | None,
    grad_logps: Tensor,
    grad_lse: Tensor | None,
    grad_entropy: Tensor | None,
    grad_mean_logits: Tensor | None,
    grad_log_sum_sq_probs: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
    grad_filter_eps: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias) in the shapes and dtypes of hidden, weight and bias;
    one not needed (or a missing bias) is an empty tensor. ``grad_logps`` is g_logp - g_lse when
    ``grad_lse`` is given (see ``prefopt.logprobs.op``)."""
    _, backward = _implementation(backend, grad_filter_eps)
    hidden_2d = _rows(hidden)
    grad_hidden, grad_weight, grad_bias = backward(
        hidden_2d, weight, bias, labels, lse, entropy, log_sum_sq_probs, grad_logps, grad_lse, grad_entropy,
        grad_mean_logits, grad_log_sum_sq_probs, ignore_index, temperature, softcap, logit_scale,
        need_hidden, need_weight, need_bias and bias is not None,
    )
    # Outputs of a custom operator may not alias one another: one fresh empty tensor each.
    return (
        hidden.new_empty(0) if grad_hidden is None else grad_hidden.to(hidden.dtype).view(hidden.shape),
        hidden.new_empty(0) if grad_weight is None else grad_weight.to(weight.dtype),
        hidden.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype),
    )


@linear_token_stats_backward_op.register_fake
def _(hidden, weight, bias, labels, lse, entropy, log_sum_sq_probs, grad_logps, grad_lse, grad_entropy,
      grad_mean_logits, grad_log_sum_sq_probs, ignore_index, temperature, softcap, logit_scale, need_hidden,
      need_weight, need_bias, backend, grad_filter_eps):
    return (
        torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else hidden.new_empty(0),
        torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, ignore_index, temperature, softcap, logit_scale, *_, backend, grad_filter_eps = inputs
    _, lse, entropy, _, log_sum_sq_probs, _ = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy, log_sum_sq_probs)
    ctx.hyperparameters = (ignore_index, temperature, softcap, logit_scale)
    ctx.backend = backend
    ctx.grad_filter_eps = grad_filter_eps
    # Outputs nobody differentiated arrive as None: without a gradient for the log-sum-exp the
    # backward does no label-column work.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_logps, grad_lse, grad_entropy, grad_mean_logits, grad_log_sum_sq_probs, grad_is_top1):
    hidden, weight, bias, labels, lse, entropy, log_sum_sq_probs = ctx.saved_tensors
    grad_entropy = dense_upstream(grad_entropy)
    grad_log_sum_sq_probs = dense_upstream(grad_log_sum_sq_probs)
    grad_lse = dense_upstream(grad_lse)
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_hidden, grad_weight, grad_bias = torch.ops.prefopt.linear_token_stats_backward(
        hidden, weight, bias, labels, lse,
        entropy if grad_entropy is not None else None,
        log_sum_sq_probs if grad_log_sum_sq_probs is not None else None,
        logps_upstream(dense_upstream(grad_logps), grad_lse, lse), grad_lse, grad_entropy,
        dense_upstream(grad_mean_logits), grad_log_sum_sq_probs,
        *ctx.hyperparameters, need_hidden, need_weight, need_bias, ctx.backend, ctx.grad_filter_eps,
    )
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, *([None] * 11))


linear_token_stats_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def linear_token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    stats: Sequence[str] = ("entropy",),
    ignore_index: int | None = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    process_group: "ProcessGroup | None" = None,
    grad_filter_eps: float | None = None,
) -> TokenStats:
    """``prefopt.token_stats`` of the logits ``logit_scale * (hidden @ weight.T + bias)``,
    without materializing them.

    Args:
        hidden: [..., H] bfloat16/float16/float32 (float64 for the reference), any strides.
        weight: [V, H], hidden's dtype and device. bias: optional [V], the same. Either may be a
            DTensor (FSDP2, tensor parallelism): it is gathered whole, and its gradient averaged
            over the mesh's ranks onto the shards.
        labels: [...] = hidden.shape[:-1], int64/int32; ``ignore_index`` (None: score every
            position) marks unscored positions.
        stats: any of "entropy", "mean_logits", "log_sum_sq_probs", "is_top1".
        temperature, softcap: z = softcap(x) / temperature, applied after ``logit_scale``.
        logit_scale: finite > 0, multiplies hidden @ weight.T + bias.
        backend: "auto", "triton", "triton-fused", "cuda", "torch" or "reference" (see the module
            docstring).
        process_group: None, or the group whose ranks each hold a contiguous slice of the
            vocabulary (in rank order, sizes may differ): ``weight`` [V_rank, H] and ``bias``
            [V_rank] are this rank's rows, ``labels`` global ids in [0, sum of V_rank), and
            ``hidden`` and ``labels`` are equal on every rank. Every rank gets the same outputs;
            weight and bias receive their rows' gradient, and hidden the gradient through the
            whole vocabulary (the ranks' parts, all-reduced in backward: identity forward,
            all-reduce backward, as Megatron's tensor-parallel input). "is_top1" is not
            available (see ``prefopt.logprobs.distributed``).
        grad_filter_eps: None (exact), or a threshold >= 0 with backend="triton-fused": the
            backward leaves out of the hidden and weight gradient products every tile of the
            logits gradient (the kernels' tiles, 64 to 128 on a side) whose entries are all below
            it in magnitude (deterministic; 0.0 is exact bit for bit). Opt-in: it changes the
            gradients by up to eps per entry left out.

    Returns:
        ``TokenStats(logps, entropy, mean_logits, log_sum_sq_probs, is_top1)``, each of the labels'
        shape, float32 (is_top1 bool; float64 from the reference given float64 inputs); fields not
        in ``stats`` are None. All float fields are differentiable with respect to hidden, weight
        and bias.
    """
    _validation.check_lm_head_inputs(hidden, weight, bias, labels, logit_scale)
    _validation.check_transform(temperature, softcap)
    _validation.check_ignore_index(ignore_index)
    asked = _validation.check_stats(stats, STAT_NAMES)
    backend = backends.resolve("linear", backend, hidden.device, hidden.dtype)
    _check_grad_filter_eps(grad_filter_eps, backend)
    weight, bias = _full_head("weight", weight, process_group), _full_head("bias", bias, process_group)
    options = {"temperature": float(temperature), "softcap": None if softcap is None else float(softcap),
               "logit_scale": float(logit_scale), "backend": backend,
               "grad_filter_eps": None if grad_filter_eps is None else float(grad_filter_eps)}
    if process_group is None:
        labels = _validation.check_label_values(labels, weight.shape[0], ignore_index)
        kernel_ignore_index = NO_LABEL if ignore_index is None else ignore_index
        result, _ = _local_linear_token_stats(hidden, weight, bias, labels, asked, kernel_ignore_index,
                                              with_lse=False, **options)
        return result
    shard = distributed.vocab_shard(process_group, weight.shape[0], labels, ignore_index, asked, hidden.dtype,
                                    what="weight and bias", hidden_size=hidden.shape[-1])
    labels = _validation.check_label_values(labels, shard.vocab_size, ignore_index)
    local, lse = _local_linear_token_stats(
        distributed.replicated(hidden, shard), weight, bias, distributed.local_labels(labels, ignore_index, shard),
        asked, NO_LABEL, with_lse=True, **options)
    return distributed.combine(local, lse, labels, ignore_index, shard)


def _local_linear_token_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                              asked: frozenset[str], ignore_index: int, *, temperature: float,
                              softcap: float | None, logit_scale: float, backend: str,
                              with_lse: bool, grad_filter_eps: float | None = None
                              ) -> tuple[TokenStats, Tensor | None]:
    """(TokenStats, lse) of checked inputs on one device, as ``prefopt.logprobs.local_token_stats``."""
    if backend == "reference":
        compute_dtype = _compute_dtype(hidden.dtype)
        logits = F.linear(hidden.to(compute_dtype), weight.to(compute_dtype),
                          None if bias is None else bias.to(compute_dtype)) * logit_scale
        return local_token_stats(logits, labels, asked, ignore_index, temperature=temperature, softcap=softcap,
                                 inplace_backward=False, backend="reference", with_lse=with_lse)
    outputs = torch.ops.prefopt.linear_token_stats(
        hidden, weight, bias, labels.reshape(-1), ignore_index, temperature, softcap, logit_scale,
        "entropy" in asked, "mean_logits" in asked, "log_sum_sq_probs" in asked, "is_top1" in asked, backend,
        grad_filter_eps,
    )
    result, lse = shaped_stats(outputs, labels.shape, asked)
    return result, lse if with_lse else None


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int | None = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    process_group: "ProcessGroup | None" = None,
    grad_filter_eps: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(z)[label] per position, z = softcap(logit_scale * (hidden @ weight.T + bias)) /
    temperature (see ``linear_token_stats`` for the arguments, ``process_group`` included).

    Returns:
        logps [...] = labels.shape, float32, <= 0 (exactly 0 where the label is ignored); with
        ``return_entropy=True`` also the entropy per position, [...] float32.
    """
    result = linear_token_stats(
        hidden, weight, labels, bias=bias, stats=("entropy",) if return_entropy else (),
        ignore_index=ignore_index, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
        backend=backend, process_group=process_group, grad_filter_eps=grad_filter_eps,
    )
    return (result.logps, result.entropy) if return_entropy else result.logps


def linear_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int | None = -100,
    average: bool = False,
    cu_seqlens: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    process_group: "ProcessGroup | None" = None,
    grad_filter_eps: float | None = None,
) -> Tensor:
    """Per-sequence sum (``average=True``: mean over scored tokens) of the label log-probs, from
    hidden states (see ``linear_token_stats`` for the arguments, ``process_group`` included).

    Args:
        hidden: [..., T, H]; labels: [..., T].
        cu_seqlens: optional [S + 1] int32/int64 offsets of S sequences packed into one row:
            hidden [1, total, H] or [total, H], labels [1, total] or [total].

    Returns:
        float32 [...] (the last dimension reduced), or [S] with ``cu_seqlens``. A sequence with
        no scored token gives 0, never NaN.
    """
    if isinstance(hidden, torch.Tensor):
        if cu_seqlens is not None:
            if not (hidden.dim() == 2 or (hidden.dim() == 3 and hidden.shape[0] == 1)):
                raise ValueError("hidden: with cu_seqlens, expected one packed row [1, total, H] or [total, H], "
                                 f"got shape {tuple(hidden.shape)}")
            _validation.check_cu_seqlens(cu_seqlens, hidden.shape[-2], hidden.device)
        elif hidden.dim() < 2:
            raise ValueError(f"hidden: expected shape [..., T, H], got {tuple(hidden.shape)}")
    logps = linear_token_logprobs(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        logit_scale=logit_scale, backend=backend, process_group=process_group, grad_filter_eps=grad_filter_eps,
    )
    return reduce_sequences(logps, labels, ignore_index, average, cu_seqlens)
