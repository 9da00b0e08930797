"""Static kernel report: the GPU kernels compiled for sm_90 (H100/H200) without a GPU, their
resource use, occupancy and SASS instructions per element against the HBM budget.

    python benches/kernel_report.py [--json FILE] [--cubin-dir DIR] [--only PATTERN ...] [--jobs N]

- ``--json FILE``: also write the rows as a JSON list to FILE (default: no JSON, the table only).
- ``--cubin-dir DIR``: where the cubins go, one per Triton kernel variant and one per .cu file
  (default: a new temporary directory, kept, whose path is printed). A row's ``cubin`` is the
  file's name in DIR and ``function`` its kernel's symbol there.
- ``--only PATTERN``: only the rows whose ``backend:kernel:variant`` matches the shell-style
  PATTERN (repeatable), e.g. ``--only 'triton:_token_stats_fwd_kernel:bf16,logps'`` or
  ``--only 'cuda:*'``. A .cu file is compiled only when one of its kernels is selected.
- ``--jobs N``: processes compiling Triton variants at once (default: the CPU count).

The table goes to stdout, one row per kernel variant. A part whose tool is missing (no nvcc, no
Triton with its NVIDIA backend, no cuobjdump) is skipped with the reason printed; the exit status
is non-zero only on a real error (a compile failure, a kernel or loop not found where the sources
say it is). TRITON_INTERPRET is removed from the environment first (the script re-executes itself
without it): under the interpreter ``@triton.jit`` functions cannot be compiled.

What is compiled
----------------
Headline shapes: V 32000, 128256 and 262144; 16384 scored tokens (ignore_index -100, int64
labels); bf16 logits (the logits path) and the fused linear path's float32 logits tiles
(``fp32tile``); each statistic alone and all together, and softcap (30.0) with the log-prob, the
entropy and all statistics.

- Triton (backend ``triton``, and ``trl`` for TRL 1.16's forward kernel when TRL is importable):
  the project's launchers (``token_stats_forward`` / ``token_stats_backward``) are called on
  ``meta`` tensors laid out as ``prefopt.logprobs.op`` (through ``prefopt.logprobs.layout.row_blocks``) and
  ``prefopt.logprobs.linear`` (``[1, rows, V]`` float32 tiles; the backward over vocabulary tiles, with
  ``column_offset`` / ``softmax_size``, into a bf16 gradient tile) pass them, with the kernel swapped for a recorder, so
  BLOCK_V, num_warps and every argument are the launcher's own choice. Each recorded launch is
  then specialised with the JIT's own code (``create_function_from_signature`` and
  ``JITFunction._pack_args``, as ``JITFunction.run`` does): integers equal to 1 become constexpr
  1, pointers and integers divisible by 16 get ``tt.divisibility`` 16, floats are not
  specialised. Assumed: allocations are 16-byte aligned (PyTorch's caching allocator aligns to
  512 bytes), so a pointer's alignment is its view's storage offset; ``debug`` is the JIT's
  default; other options are Triton's defaults (3.9 warns that its default FP fusion, on, will
  change). V values whose launches specialise identically compile to the same kernel and share
  one row (``vocab`` lists them; at V 262144 the bf16 backward's gradient has an outer stride
  of 16384 x 262144, an i64, and the fp32 tiles' forward chunk of 512 rows is divisible by 16:
  other kernels, other rows; ``specialization`` shows each integer's). The compile is
  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, what the JIT does on an
  H100/H200 (Triton emits sm_90a).
- CUDA C++ (backend ``cuda``): ``nvcc -arch=sm_90 -cubin -Xptxas -v -O3 -I csrc`` on
  csrc/token_stats_fwd.cu and csrc/token_stats_bwd.cu (the toolkit only, no torch; the
  extension's own flags add torch's -D defines, which gave the same SASS with nvcc 13.0). The
  templates' instances for bf16 and float are reported; their statistics are template levels
  (forward: log-prob only, + entropy, all; backward: the log-prob's and mean's terms only, + the
  entropy's, all, chosen from the gradients given). V is a run-time argument: one kernel serves
  every V.
- Not reported: prefopt/kernels/preference_loss.py's and csrc/preference_loss.cu's loss reductions. They
  run once per batch on [B] vectors, off the per-token path, and their launchers specialise on
  many loss-type constants, so their variants are not worth compiling here.

What is counted
---------------
- registers, spill_bytes: Triton: ``cuobjdump -res-usage`` REG and LOCAL (local memory per thread,
  which is what Triton itself reports as n_spills); CUDA: ``-Xptxas -v`` registers and spill
  stores. shared_bytes: the kernel's own shared memory (Triton's launch-time dynamic size, or the
  CUDA kernel's static smem), without the 1 KB the hardware reserves per block.
- ctas_per_sm, occupancy: H100/H200 limits per SM: 65536 registers allocated per warp in units
  of 256, 2048 threads (64 warps), 228 KB of shared memory with 1 KB reserved per block (and
  allocated in 128-byte units), 32 blocks; occupancy = resident warps / 64.
- loop_instructions: the SASS of the hot loop (``cuobjdump -sass``): a loop is a backward branch,
  and its instructions are those from the branch target to the branch, inclusive. Every
  instruction in that range counts, including code a forward branch inside the loop may skip
  (e.g. the CUDA forward's rescale when a block does not raise the maximum), so it is the static
  size of one iteration. The hot loop is the one with the most 128-bit global loads (the CUDA
  kernels also have loops for unaligned rows and tails). Triton's backward has no loop, each
  program handling one block of one row: its whole body (up to the trailing branch-to-self)
  counts, once per program, prologue included (``counted: "whole kernel"``).
- elements_per_loop_iteration: per thread (per program for Triton's backward). Triton:
  BLOCK_V / (32 num_warps): forward 4096 / 128 = 32 bf16 (4 vectors of 8) or 4096 / 256 = 16
  float (4 vectors of 4), for every statistic; 4096 / 256 = 16 backward, TRL 1024 / 128 = 8.
  CUDA: kUnroll x kVector, read from csrc/token_stats_common.cuh: every thread issues kUnroll (4)
  independent 16-byte vector loads per step, kVector = 16 / sizeof(T) elements each (8 bf16, 4
  float), so 32 bf16 or 16 float elements per iteration; the report checks that the hot loop has
  exactly kUnroll 128-bit loads. ``loop_load_bytes`` is what the counted range loads from global
  memory per thread (for a loop: elements x element size).
- budget_instructions_per_element: what 132 SMs x 4 schedulers x 1.98 GHz = 1.045e12 warp
  instructions/s = 3.35e13 thread instructions/s can issue while HBM (4.3 TB/s) moves one
  element: 15.6 per bf16 element read (forward), 31.1 per bf16 element read and written
  (backward); a float32 element is twice the bytes, hence twice the time and twice the budget
  (31.1 read, 62.2 read and written in place). instructions_over_budget > 1: instruction issue,
  not HBM, bounds the kernel (at these clocks and that bandwidth).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import importlib
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

CSRC = Path(__file__).resolve().parent.parent / "csrc"

# ----------------------------------------------------------------------------- H100/H200 (sm_90)

REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers, allocated per warp
THREADS_PER_SM = 2048
WARPS_PER_SM = THREADS_PER_SM // 32
SHARED_BYTES_PER_SM = 228 * 1024
RESERVED_SHARED_BYTES_PER_BLOCK = 1024
SHARED_ALLOCATION_UNIT = 128
BLOCKS_PER_SM = 32

MULTIPROCESSORS = 132
SCHEDULERS_PER_SM = 4
CLOCK_HZ = 1.98e9
HBM_BYTES_PER_S = 4.3e12
THREAD_INSTRUCTIONS_PER_S = MULTIPROCESSORS * SCHEDULERS_PER_SM * CLOCK_HZ * 32

# ----------------------------------------------------------------------------- headline shapes

VOCABS = (32000, 128256, 262144)
TOKENS = 16384
IGNORE_INDEX = -100
SOFTCAP = 30.0
TRITON_TARGET = ("cuda", 90, 32)  # GPUTarget(backend, capability, warp size) of an H100/H200
CUDA_ARCH = "sm_90"

FORWARD_STATS = {
    "logps": (),
    "entropy": ("entropy",),
    "mean": ("mean_logits",),
    "sum_sq": ("log_sum_sq_probs",),
    "top1": ("is_top1",),
    "all": ("entropy", "mean_logits", "log_sum_sq_probs", "is_top1"),
}
BACKWARD_STATS = {
    "logps": (),
    "entropy": ("entropy",),
    "mean": ("mean_logits",),
    "sum_sq": ("log_sum_sq_probs",),
    "all": ("entropy", "mean_logits", "log_sum_sq_probs"),
}
SOFTCAP_STATS = ("logps", "entropy", "all")
LAYOUTS = ("bf16", "fp32tile")  # the logits path's bf16 logits, the fused linear path's fp32 tiles

# ----------------------------------------------------------------------------- SASS


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One SASS instruction: its address, its opcode with modifiers (predicate dropped), operands."""

    address: int
    opcode: str
    operands: str


@dataclasses.dataclass(frozen=True)
class Loop:
    """Instructions [start, end] of a function (indices): end is the backward branch to start."""

    start: int
    end: int


_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_ARCH = re.compile(r"code for (sm_\w+)")
# "/*0630*/   @!P3 BRA 0x630 ;" (the encoding lines are "/* 0x... */", with a space)
_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][\w.]*)\s*(.*?)\s*;")
_HEX = re.compile(r"0x([0-9a-f]+)")


def parse_sass(text: str) -> dict[str, tuple[str, list[Instruction]]]:
    """``cuobjdump -sass`` output -> {function: (arch, instructions in address order)}."""
    functions: dict[str, tuple[str, list[Instruction]]] = {}
    arch = ""
    current: list[Instruction] | None = None
    for line in text.splitlines():
        if match := _ARCH.search(line):
            arch = match.group(1)
        elif match := _FUNCTION.match(line):
            current = []
            functions[match.group(1)] = (arch, current)
        elif current is not None and (match := _INSTRUCTION.search(line)):
            current.append(Instruction(int(match.group(1), 16), match.group(2), match.group(3)))
    return functions


def branch_target(instruction: Instruction) -> int | None:
    """The address a direct branch jumps to (its last hex operand), None for other instructions."""
    if instruction.opcode.split(".")[0] != "BRA":
        return None
    targets = _HEX.findall(instruction.operands)
    return int(targets[-1], 16) if targets else None


def find_loops(instructions: Sequence[Instruction]) -> list[Loop]:
    """Every backward branch as a loop. A branch to itself (the trap after a kernel's last EXIT)
    is no loop."""
    index = {instruction.address: i for i, instruction in enumerate(instructions)}
    loops = []
    for i, instruction in enumerate(instructions):
        target = branch_target(instruction)
        if target is not None and target < instruction.address and target in index:
            loops.append(Loop(index[target], i))
    return loops


def global_load_bytes(instruction: Instruction) -> int:
    """Bytes one thread loads from global memory with this instruction (0 if it is no LDG)."""
    parts = instruction.opcode.split(".")
    if parts[0] != "LDG":
        return 0
    for suffix, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if suffix in parts[1:]:
            return size
    return 4


def is_vector_load(instruction: Instruction) -> bool:
    return global_load_bytes(instruction) == 16


def hot_loop(instructions: Sequence[Instruction]) -> Loop | None:
    """The loop with the most 128-bit global loads (then the most bytes loaded, then the longest):
    the vectorised main loop, not the ones for unaligned rows or tails. None without a loop."""
    loops = find_loops(instructions)
    if not loops:
        return None

    def weight(loop: Loop) -> tuple[int, int, int]:
        body = instructions[loop.start:loop.end + 1]
        return (sum(map(is_vector_load, body)), sum(map(global_load_bytes, body)), len(body))

    return max(loops, key=weight)


def kernel_body(instructions: Sequence[Instruction]) -> list[Instruction]:
    """The function without its trailing padding: the NOPs and the branch-to-self trap after the
    last EXIT, which never issue."""
    end = len(instructions)
    while end and instructions[end - 1].opcode == "NOP":
        end -= 1
    if end and branch_target(instructions[end - 1]) == instructions[end - 1].address:
        end -= 1
    return list(instructions[:end])


def count_barriers(instructions: Sequence[Instruction]) -> int:
    """CTA barriers (BAR.SYNC and kin; not the BSSY/BSYNC convergence markers)."""
    return sum(instruction.opcode.split(".")[0] == "BAR" for instruction in instructions)


# ----------------------------------------------------------------------------- resources


@dataclasses.dataclass(frozen=True)
class Resources:
    registers: int
    spill_bytes: int
    shared_bytes: int


_RES_FUNCTION = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_RES_FIELD = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` output -> {function: {"REG": .., "LOCAL": .., "SHARED": .., ...}}.
    Its SHARED includes the 1 KB reserved per block on sm_90."""
    functions: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if match := _RES_FUNCTION.match(line):
            current = match.group(1)
        elif current is not None and "REG:" in line:
            functions[current] = {key: int(value) for key, value in _RES_FIELD.findall(line)}
            current = None
    return functions


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SHARED = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> dict[str, Resources]:
    """``-Xptxas -v`` output -> {function: Resources} (smem: the static shared memory)."""
    found: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if match := _PTXAS_ENTRY.search(line):
            current = found.setdefault(match.group(1), {"spill_bytes": 0, "shared_bytes": 0})
            continue
        if current is None:
            continue
        if match := _PTXAS_SPILLS.search(line):
            current["spill_bytes"] = int(match.group(1))
        if match := _PTXAS_REGISTERS.search(line):
            current["registers"] = int(match.group(1))
            if shared := _PTXAS_SHARED.search(line):
                current["shared_bytes"] = int(shared.group(1))
    return {name: Resources(**fields) for name, fields in found.items() if "registers" in fields}


def occupancy(registers: int, warps: int, shared_bytes: int) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / 64) of a kernel on an H100/H200 SM."""
    registers_per_warp = math.ceil(registers * 32 / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = (REGISTERS_PER_SM // registers_per_warp) // warps if registers_per_warp else BLOCKS_PER_SM
    by_threads = THREADS_PER_SM // (32 * warps)
    shared_per_block = math.ceil((shared_bytes + RESERVED_SHARED_BYTES_PER_BLOCK) / SHARED_ALLOCATION_UNIT)
    by_shared = SHARED_BYTES_PER_SM // (shared_per_block * SHARED_ALLOCATION_UNIT)
    blocks = min(by_registers, by_threads, by_shared, BLOCKS_PER_SM)
    return blocks, blocks * warps / WARPS_PER_SM


def budget_per_element(bytes_per_element: int) -> float:
    """Thread instructions the SMs can issue in the time HBM moves ``bytes_per_element`` bytes."""
    return THREAD_INSTRUCTIONS_PER_S * bytes_per_element / HBM_BYTES_PER_S


# ----------------------------------------------------------------------------- tools


@dataclasses.dataclass(frozen=True)
class Tools:
    cuobjdump: str | None
    nvcc: str | None
    missing: dict[str, str]  # tool -> why it cannot be used


def _triton_bin() -> Path | None:
    """Triton's bundled NVIDIA tools (cuobjdump, nvdisasm, ptxas), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    return directory if directory.is_dir() else None


def find_tools() -> Tools:
    """cuobjdump from Triton's wheel, PATH or the CUDA toolkit; nvcc from the toolkit
    (``prefopt.cuda_ext.find_cuda_toolkit``: CUDA_HOME, then PATH, then the usual places)."""
    from prefopt.cuda_ext import find_cuda_toolkit

    missing = {}
    toolkit, toolkit_missing = find_cuda_toolkit()
    places = [_triton_bin(), None, None if toolkit is None else toolkit / "bin"]
    cuobjdump = None
    for place in places:
        candidate = shutil.which("cuobjdump", path=None if place is None else str(place))
        if candidate is not None:
            cuobjdump = candidate
            break
    if cuobjdump is None:
        missing["cuobjdump"] = "no cuobjdump in Triton's wheel, on PATH or in the CUDA toolkit"
    if toolkit is None:
        missing["nvcc"] = str(toolkit_missing)
    return Tools(cuobjdump, None if toolkit is None else str(toolkit / "bin" / "nvcc"), missing)


def _run(command: Sequence[str]) -> str:
    """stdout of a command that must succeed (stderr carries only cuobjdump's format notices)."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


# ----------------------------------------------------------------------------- rows


def _row(*, backend: str, kernel: str, variant: str, arch: str, resources: Resources, warps: int,
         instructions: Sequence[Instruction], counted: str | None, elements: int | None,
         bytes_per_element: int | None, cubin: str, function: str, compiler: str,
         vocab: list[int] | None, **extra: Any) -> dict[str, Any]:
    """One report row. ``counted`` is the range counted ("loop" or "whole kernel"; None: a kernel
    without per-element work), ``instructions`` that range."""
    ctas, occupied = occupancy(resources.registers, warps, resources.shared_bytes)
    row: dict[str, Any] = {
        "backend": backend, "kernel": kernel, "variant": variant, "arch": arch,
        "registers": resources.registers, "spill_bytes": resources.spill_bytes,
        "shared_bytes": resources.shared_bytes, "warps": warps, "ctas_per_sm": ctas, "occupancy": occupied,
        "loop_instructions": None, "elements_per_loop_iteration": None, "instructions_per_element": None,
        "budget_instructions_per_element": None, "instructions_over_budget": None,
        "barriers_per_loop_iteration": None, "loop_load_bytes": None, "counted": counted,
        "cubin": cubin, "function": function, "compiler": compiler, "vocab": vocab,
    }
    if counted is not None and elements and bytes_per_element:
        per_element = len(instructions) / elements
        budget = budget_per_element(bytes_per_element)
        row.update({
            "loop_instructions": len(instructions), "elements_per_loop_iteration": elements,
            "instructions_per_element": round(per_element, 2),
            "budget_instructions_per_element": round(budget, 2),
            "instructions_over_budget": round(per_element / budget, 2),
            "barriers_per_loop_iteration": count_barriers(instructions),
            "loop_load_bytes": sum(map(global_load_bytes, instructions)),
        })
    row.update(extra)
    return row


# ----------------------------------------------------------------------------- Triton


@dataclasses.dataclass(frozen=True)
class TritonJob:
    """One Triton kernel variant, specialised as the JIT would, ready for triton.compile."""

    backend: str
    module: str
    kernel: str
    variant: str
    vocab: tuple[int, ...]
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]
    elements: int  # per thread per loop iteration (or per program, without a loop)
    bytes_per_element: int  # HBM bytes per element: read, plus written for a backward
    has_loop: bool
    specialization: str

    @property
    def selector(self) -> str:
        return f"{self.backend}:{self.kernel}:{self.variant}"

    @property
    def cubin(self) -> str:
        vocab = "-".join(map(str, self.vocab))
        return f"{self.backend}.{self.kernel}.{self.variant.replace(',', '-')}.V{vocab}.cubin"


class _DevicePointer:
    """What the JIT sees of a tensor argument: its dtype and address. A meta tensor has none, so
    the address is its view's byte offset from a 16-byte aligned allocation."""

    def __init__(self, tensor) -> None:
        self.dtype = tensor.dtype
        self._address = tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel in its module: records each ``kernel[grid](...)``."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.launches.append((args, kwargs))

        return launch


@contextlib.contextmanager
def _recording(module: Any, name: str) -> Iterator[_LaunchRecorder]:
    original = getattr(module, name)
    recorder = _LaunchRecorder()
    setattr(module, name, recorder)
    try:
        yield recorder
    finally:
        setattr(module, name, original)


def _meta(*shape: int, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def _record_forward(layout: str, vocab: int, stats: Sequence[str], softcap: float | None) -> list:
    """The launches of the Triton forward for one workload, as prefopt.logprobs.op (bf16 logits) or
    prefopt.logprobs.linear._tiled_forward (a chunk of float32 logits) make them."""
    import torch

    from prefopt.logprobs import linear
    from prefopt.logprobs.layout import row_blocks
    from prefopt.kernels import token_stats_fwd

    if layout == "bf16":
        logits, rows = _meta(TOKENS, vocab, dtype=torch.bfloat16), TOKENS
        blocks = row_blocks(logits, 2)
    else:
        # linear._tiled_forward: chunks of linear._gemm_tile_extent(V) scored rows, [1, rows, V].
        rows = min(TOKENS, linear._gemm_tile_extent(vocab))
        blocks = [(_meta(rows, vocab, dtype=torch.float32).unsqueeze(0), 0)]

    def output(name: str):
        asked = name in ("logps", "lse") or name in stats
        return _meta(rows, dtype=torch.bool if name == "is_top1" else torch.float32) if asked else None

    # Split-V's combine kernel (few rows: the fp32 tiles at V 128256 and 262144) runs once per row
    # on [rows, slices] states, off the per-logit path: recorded, not reported.
    with _recording(token_stats_fwd, "_token_stats_fwd_kernel") as recorder, \
            _recording(token_stats_fwd, "_token_stats_combine_kernel"):
        for block, first in blocks:
            count = math.prod(block.shape[:-1])
            outputs = [output(name) for name in ("logps", "lse", "entropy", "mean_logits", "log_sum_sq_probs",
                                                 "is_top1")]
            token_stats_fwd.token_stats_forward(
                block, _meta(first + count, dtype=torch.int64)[first:], *outputs,
                ignore_index=IGNORE_INDEX, temperature=1.0, softcap=softcap)
    return recorder.launches


def _record_backward(layout: str, vocab: int, stats: Sequence[str], softcap: float | None) -> list:
    """The launches of the Triton backward for one workload: prefopt.logprobs.op' fresh bf16 gradient,
    or prefopt.logprobs.linear._tiled_backward's float32 logits tiles of every row x a vocabulary tile, whose
    gradient goes to a bf16 tile (the products' operand)."""
    import torch

    from prefopt.logprobs import linear
    from prefopt.logprobs.layout import row_blocks
    from prefopt.kernels import token_stats_bwd

    def row_vector(name: str | None = None):
        return _meta(TOKENS, dtype=torch.float32) if name is None or name in stats else None

    per_row = dict(
        labels=_meta(TOKENS, dtype=torch.int64), lse=row_vector(),
        entropy=row_vector("entropy"), log_sum_sq_probs=row_vector("log_sum_sq_probs"),
        grad_logps=row_vector(), grad_entropy=row_vector("entropy"), grad_mean_logits=row_vector("mean_logits"),
        grad_log_sum_sq_probs=row_vector("log_sum_sq_probs"))
    options = dict(ignore_index=IGNORE_INDEX, temperature=1.0, softcap=softcap)
    with _recording(token_stats_bwd, "_token_stats_bwd_kernel") as recorder:
        if layout == "bf16":
            logits = _meta(TOKENS, vocab, dtype=torch.bfloat16)
            grad_rows = torch.empty_like(logits).view(-1, vocab)
            for block, first in row_blocks(logits, 2):
                rows = slice(first, first + math.prod(block.shape[:-1]))
                sliced = {name: None if t is None else t[rows] for name, t in per_row.items()}
                token_stats_bwd.token_stats_backward(block, grad_rows[rows].view(block.shape), **sliced, **options)
        else:
            # linear._tiled_backward: tiles of linear._gemm_tile_extent(rows) columns.
            columns = linear._gemm_tile_extent(TOKENS)
            for start in range(0, vocab, columns):
                tile = _meta(TOKENS, min(columns, vocab - start), dtype=torch.float32).unsqueeze(0)
                token_stats_bwd.token_stats_backward(tile, torch.empty_like(tile, dtype=torch.bfloat16), **per_row,
                                                     **options, column_offset=start, softmax_size=vocab)
    return recorder.launches


def _record_trl_forward(vocab: int) -> list:
    """The launch of TRL 1.16's selective_log_softmax_and_entropy on [8, 2048, V] bf16 logits."""
    import torch

    module = importlib.import_module("trl.kernels.logprob_entropy")
    with _recording(module, "_forward_kernel") as recorder:
        module.selective_log_softmax_and_entropy(_meta(8, TOKENS // 8, vocab, dtype=torch.bfloat16),
                                                 _meta(8, TOKENS // 8, dtype=torch.int64))
    return recorder.launches


def _specialise(fn: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[dict, dict, dict, dict, str]:
    """(signature, constexprs, attrs, options, summary) of one launch, by the JIT's own code."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget(*TRITON_TARGET))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {**kwargs, "debug": kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug}
    bound, specialization, binder_options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, binder_options)
    summary = []
    for param, (kind, key) in zip(fn.params, specialization):
        if param.is_constexpr or kind.startswith("fp"):
            continue
        if kind == "constexpr":
            summary.append(f"{param.name}={bound[param.name]}")
        elif kind.startswith("*"):
            if key != "D":
                summary.append(f"{param.name}:unaligned")
        else:  # an integer: its type, and whether it is known divisible by 16
            summary.append(f"{param.name}:{kind}" + ("%16" if key == "D" else ""))
    return signature, constexprs, attrs, options.__dict__, " ".join(summary)


@dataclasses.dataclass(frozen=True)
class _TritonPlan:
    """A Triton kernel variant before specialisation: how its launches are made for one V."""

    backend: str
    module: Any
    kernel: str
    variant: str
    record: Callable[[int], list]  # V -> the launcher's [(args, kwargs)]
    vocabs: tuple[int, ...]
    block_arg: str  # the constexpr holding the block of columns one program reads at a time
    grad_arg: str | None  # a backward's gradient pointer (HBM writes), None for a forward
    has_loop: bool

    @property
    def selector(self) -> str:
        return f"{self.backend}:{self.kernel}:{self.variant}"


def _triton_plans(selected: Callable[[str], bool]) -> list[_TritonPlan]:
    """The selected variants, in report order."""
    from prefopt.kernels import token_stats_bwd, token_stats_fwd

    plans = []
    for direction, module, kernel, stats_table, record, grad_arg, has_loop in (
            ("forward", token_stats_fwd, "_token_stats_fwd_kernel", FORWARD_STATS, _record_forward, None, True),
            ("backward", token_stats_bwd, "_token_stats_bwd_kernel", BACKWARD_STATS, _record_backward,
             "grad_ptr", False)):
        for layout in LAYOUTS:
            for stats in [*stats_table, *(f"{s},softcap" for s in SOFTCAP_STATS)]:
                names = stats_table[stats.split(",")[0]]
                softcap = SOFTCAP if stats.endswith(",softcap") else None
                plans.append(_TritonPlan(
                    "triton", module, kernel, f"{layout},{stats}",
                    lambda vocab, record=record, layout=layout, names=names, softcap=softcap:
                    record(layout, vocab, names, softcap), VOCABS, "BLOCK_V", grad_arg, has_loop))
    plans = [plan for plan in plans if selected(plan.selector)]
    trl_kernel, trl_variant = "_forward_kernel", "bf16,logps+entropy"
    if not selected(f"trl:{trl_kernel}:{trl_variant}"):
        return plans  # and TRL's few seconds of imports are saved
    try:
        trl_module = importlib.import_module("trl.kernels.logprob_entropy")
    except ImportError:
        return plans
    # TRL's kernel takes V as a constexpr (a kernel per V): one comparison row, at V 128256.
    plans.append(_TritonPlan("trl", trl_module, trl_kernel, trl_variant, _record_trl_forward, (128256,),
                             "BLOCK_SIZE", None, True))
    return plans


def _element_size(pointer_type: str) -> int:
    return {"*bf16": 2, "*fp16": 2, "*fp32": 4}[pointer_type]


def triton_jobs(selected: Callable[[str], bool]) -> list[TritonJob]:
    """Every selected Triton variant the launchers choose at the headline shapes, one job per
    distinct specialisation (the V values that compile alike merged), in report order."""
    jobs: list[TritonJob] = []
    for plan in _triton_plans(selected):
        fn = getattr(plan.module, plan.kernel)
        groups: dict[str, tuple[list[int], tuple, dict[str, Any]]] = {}
        for vocab in plan.vocabs:
            for args, kwargs in plan.record(vocab):
                specialised = _specialise(fn, args, kwargs)
                key = repr(specialised[:4])  # built in the same order for every launch
                covered, _, _ = groups.setdefault(key, ([], specialised, kwargs))
                if vocab not in covered:
                    covered.append(vocab)
        for covered, (signature, constexprs, attrs, options, summary), kwargs in groups.values():
            moved = _element_size(signature["logits_ptr"])
            if plan.grad_arg is not None:
                moved += _element_size(signature[plan.grad_arg])
            jobs.append(TritonJob(
                backend=plan.backend, module=plan.module.__name__, kernel=plan.kernel, variant=plan.variant,
                vocab=tuple(covered), signature=signature, constexprs=constexprs, attrs=attrs, options=options,
                elements=kwargs[plan.block_arg] // (32 * options["num_warps"]), bytes_per_element=moved,
                has_loop=plan.has_loop, specialization=summary))
    return jobs


def compile_triton(job: TritonJob, cubin_dir: str, cuobjdump: str) -> dict[str, Any]:
    """Compile one variant for sm_90, keep its cubin, and make its row (run in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.kernel)
    compiled = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                              target=GPUTarget(*TRITON_TARGET), options=job.options)
    path = Path(cubin_dir) / job.cubin
    path.write_bytes(compiled.asm["cubin"])
    function = compiled.metadata.name
    usage = parse_res_usage(_run([cuobjdump, "-res-usage", str(path)]))[function]
    arch, instructions = parse_sass(_run([cuobjdump, "-sass", str(path)]))[function]
    if job.has_loop:
        loop = hot_loop(instructions)
        if loop is None:
            raise RuntimeError(f"{job.selector}: no loop in the SASS of {function} ({path})")
        counted, instructions = "loop", instructions[loop.start:loop.end + 1]
    else:
        counted, instructions = "whole kernel", kernel_body(instructions)
    # The ptxas Triton runs for this target (3.9 takes its newer "blackwell" one for sm_90 too).
    compiler = f"triton {triton.__version__}, ptxas {get_ptxas(TRITON_TARGET[1]).version}"
    return _row(
        backend=job.backend, kernel=job.kernel, variant=job.variant, arch=arch,
        resources=Resources(usage["REG"], usage["LOCAL"], compiled.metadata.shared),
        warps=compiled.metadata.num_warps, instructions=instructions, counted=counted, elements=job.elements,
        bytes_per_element=job.bytes_per_element, cubin=job.cubin, function=function, compiler=compiler,
        vocab=list(job.vocab), specialization=job.specialization)


# ----------------------------------------------------------------------------- CUDA C++


@dataclasses.dataclass(frozen=True)
class CudaKernel:
    """One instance of a csrc/ kernel template, found in the cubin by its mangled name."""

    source: str
    kernel: str
    variant: str
    symbol: re.Pattern[str]
    element_bytes: int | None  # None: no per-element work (the split-V combine step)
    bytes_per_element: int | None
    note: str

    @property
    def selector(self) -> str:
        return f"cuda:{self.kernel}:{self.variant}"


# Itanium-mangled template arguments: the element type, then the statistics level / softcap flag.
_MANGLED_TYPE = {"bf16": ("13__nv_bfloat16", 2), "fp32tile": ("f", 4)}
_CUDA_STATS_LEVEL = {"logps": 0, "entropy": 1, "all": 2}  # token_stats_fwd.cu's StatsLevel
_CUDA_GRADIENT_TERMS = {"logps": 0, "entropy": 1, "all": 2}  # token_stats_bwd.cu's GradientTerms


def cuda_kernels() -> list[CudaKernel]:
    """The csrc/ instances the launchers pick for bf16 logits and the fused path's float tiles."""
    kernels = []
    for layout, (mangled, size) in _MANGLED_TYPE.items():
        for stats, level in _CUDA_STATS_LEVEL.items():
            for softcap in (False, True):
                kernels.append(CudaKernel(
                    "token_stats_fwd.cu", "token_stats_forward_kernel",
                    f"{layout},{stats}" + (",softcap" if softcap else ""),
                    re.compile(rf"token_stats_forward_kernelI{mangled}Li{level}ELb{int(softcap)}EE"), size, size,
                    "any V (run-time); 'all': any of mean, sum_sq, top1 (they share one level)"))
    kernels.append(CudaKernel("token_stats_fwd.cu", "token_stats_combine_kernel", "split-V",
                              re.compile(r"token_stats_combine_kernel"), None, None,
                              "merges split-V partial states, one thread per row: no per-element work"))
    for layout, (mangled, size) in _MANGLED_TYPE.items():
        for terms, level in _CUDA_GRADIENT_TERMS.items():
            for softcap in (False, True):
                kernels.append(CudaKernel(
                    "token_stats_bwd.cu", "token_stats_backward_kernel",
                    f"{layout},{terms}" + (",softcap" if softcap else ""),
                    re.compile(rf"token_stats_backward_kernelI{mangled}Li{level}ELb{int(softcap)}EE"), size, 2 * size,
                    "any V (run-time); 'logps': log-prob and mean gradients, 'all': any with log sum p^2"))
    return kernels


def _header_constant(name: str) -> int:
    """A ``constexpr int`` of csrc/token_stats_common.cuh (kThreads, kUnroll)."""
    text = (CSRC / "token_stats_common.cuh").read_text()
    match = re.search(rf"constexpr int {name} = (\d+);", text)
    if match is None:
        raise RuntimeError(f"csrc/token_stats_common.cuh: no 'constexpr int {name} = N;'")
    return int(match.group(1))


def start_nvcc(nvcc: str, source: str, cubin_dir: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start compiling one .cu file to a cubin; (process, cubin, log with the -Xptxas -v output)."""
    cubin = cubin_dir / (Path(source).stem + ".cubin")
    log = cubin_dir / (Path(source).stem + ".ptxas.log")
    command = [nvcc, f"-arch={CUDA_ARCH}", "-cubin", "-Xptxas", "-v", "-O3", "-I", str(CSRC), "-o", str(cubin),
               str(CSRC / source)]
    with log.open("w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    return process, cubin, log


def cuda_rows(kernels: Sequence[CudaKernel], compiled: dict[str, tuple[Path, Path]], cuobjdump: str,
              compiler: str) -> list[dict[str, Any]]:
    """The rows of the selected kernels, from their .cu files' {source: (cubin, ptxas log)}."""
    threads, unroll = _header_constant("kThreads"), _header_constant("kUnroll")
    resources = {source: parse_ptxas_log(log.read_text()) for source, (_, log) in compiled.items()}
    sass = {source: parse_sass(_run([cuobjdump, "-sass", str(cubin)])) for source, (cubin, _) in compiled.items()}
    rows = []
    for kernel in kernels:
        cubin = compiled[kernel.source][0]
        names = [name for name in resources[kernel.source] if kernel.symbol.search(name)]
        if len(names) != 1 or names[0] not in sass[kernel.source]:
            raise RuntimeError(f"{kernel.selector}: expected one function matching {kernel.symbol.pattern} in "
                               f"{cubin}, found {names}")
        function = names[0]
        arch, instructions = sass[kernel.source][function]
        counted, elements = None, None
        if kernel.element_bytes is not None:
            loop = hot_loop(instructions)
            if loop is None:
                raise RuntimeError(f"{kernel.selector}: no loop in the SASS of {function}")
            instructions = instructions[loop.start:loop.end + 1]
            # Each thread loads kUnroll 16-byte vectors per step before using any: kUnroll x
            # (16 / sizeof(T)) elements per iteration (fold_vectors, token_stats_backward_kernel).
            vector_loads = sum(map(is_vector_load, instructions))
            if vector_loads != unroll:
                raise RuntimeError(f"{kernel.selector}: the hot loop of {function} has {vector_loads} 128-bit "
                                   f"loads, the sources say kUnroll = {unroll}")
            counted, elements = "loop", unroll * (16 // kernel.element_bytes)
        rows.append(_row(
            backend="cuda", kernel=kernel.kernel, variant=kernel.variant, arch=arch,
            resources=resources[kernel.source][function], warps=threads // 32, instructions=instructions,
            counted=counted, elements=elements, bytes_per_element=kernel.bytes_per_element, cubin=cubin.name,
            function=function, compiler=compiler, vocab=None, note=kernel.note))
    return rows


def nvcc_version(nvcc: str) -> str:
    match = re.search(r"release [\d.]+, V([\d.]+)", _run([nvcc, "--version"]))
    return f"nvcc {match.group(1) if match else '?'}"


# ----------------------------------------------------------------------------- report


def triton_unavailable_reason() -> str | None:
    """Why Triton's offline compiler for NVIDIA targets cannot be used here (None if it can)."""
    try:
        from triton.backends import backends
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        return f"Triton cannot be imported: {error}"
    if "nvidia" not in backends:
        return "this Triton has no NVIDIA backend"
    return None


_COLUMNS = (  # (title, row field)
    ("backend", "backend"), ("kernel", "kernel"), ("variant", "variant"), ("V", "vocab"),
    ("regs", "registers"), ("spill", "spill_bytes"), ("smem", "shared_bytes"), ("warps", "warps"),
    ("CTA/SM", "ctas_per_sm"), ("occ", "occupancy"), ("counted", "counted"), ("instr", "loop_instructions"),
    ("el/it", "elements_per_loop_iteration"), ("instr/el", "instructions_per_element"),
    ("budget", "budget_instructions_per_element"), ("x budget", "instructions_over_budget"),
    ("bar", "barriers_per_loop_iteration"),
)


def _cell(field: str, value: Any) -> str:
    if value is None:
        return "any" if field == "vocab" else "-"
    if field == "vocab":
        return ",".join(map(str, value))
    if field == "occupancy":
        return f"{value:.0%}"
    if field == "instructions_over_budget":
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a table, one line per kernel variant, columns as wide as their cells."""
    cells = [[title for title, _ in _COLUMNS], *([_cell(field, row[field]) for _, field in _COLUMNS] for row in rows)]
    widths = [max(len(line[column]) for line in cells) for column in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def build_report(cubin_dir: Path, selected: Callable[[str], bool], jobs: int) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, skipped parts with the reason) of every selected kernel."""
    tools = find_tools()
    if tools.cuobjdump is None:
        return [], [f"every kernel (their SASS and resources need cuobjdump): {tools.missing['cuobjdump']}"]

    skipped = []
    selected_cuda = [kernel for kernel in cuda_kernels() if selected(kernel.selector)]
    compiles = []
    if tools.nvcc is None:
        if selected_cuda:
            skipped.append(f"CUDA C++ kernels (no nvcc): {tools.missing['nvcc']}")
    else:
        # nvcc runs while Triton compiles: started first, collected last.
        compiles = [(source, *start_nvcc(tools.nvcc, source, cubin_dir))
                    for source in sorted({kernel.source for kernel in selected_cuda})]

    rows: list[dict[str, Any]] = []
    reason = triton_unavailable_reason()
    if reason is not None:
        skipped.append(f"Triton kernels: {reason}")
    else:
        pending = triton_jobs(selected)
        # fork: the workers inherit the imported kernels (and TRL's), which a fresh interpreter
        # would spend seconds importing again.
        with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(pending))),
                                 mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(compile_triton, job, str(cubin_dir), tools.cuobjdump) for job in pending]
            rows += [future.result() for future in futures]

    if compiles:
        for source, process, _, log in compiles:
            if process.wait() != 0:
                raise RuntimeError(f"nvcc failed on csrc/{source}:\n{log.read_text()}")
        compiled = {source: (cubin, log) for source, _, cubin, log in compiles}
        rows += cuda_rows(selected_cuda, compiled, tools.cuobjdump, nvcc_version(tools.nvcc))
    return rows, skipped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--cubin-dir", type=Path, help="where the cubins go (default: a new temporary directory)")
    parser.add_argument("--only", action="append", metavar="PATTERN",
                        help="only rows whose backend:kernel:variant matches (shell-style; repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="Triton compile processes")
    args = parser.parse_args(argv)

    cubin_dir = args.cubin_dir or Path(tempfile.mkdtemp(prefix="prefopt-cubins-"))
    cubin_dir.mkdir(parents=True, exist_ok=True)

    def selected(selector: str) -> bool:
        return not args.only or any(fnmatch.fnmatchcase(selector, pattern) for pattern in args.only)

    started = time.perf_counter()
    try:
        rows, skipped = build_report(cubin_dir, selected, args.jobs)
    except Exception as error:  # a compile failure, or the SASS not as the sources say
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    for reason in skipped:
        print(f"skipped: {reason}")
    print(format_table(rows))
    print(f"\n{len(rows)} kernel variants in {time.perf_counter() - started:.0f} s; cubins in {cubin_dir}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if "TRITON_INTERPRET" in os.environ:
        # The interpreter's @triton.jit functions cannot be compiled; it must be off before
        # Triton is imported, so the script starts again without it.
        environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, *sys.argv], environment)
    sys.exit(main())
