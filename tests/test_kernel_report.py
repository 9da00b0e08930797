"""benches/kernel_report.py, the static sm_90 kernel report.

- Its pure parts on hand-made inputs: loop finding in SASS, the kernel body without padding,
  load widths and barriers, the cuobjdump / ptxas parsers, occupancy and the HBM budget.
- The report itself, in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it for
  this process, and the interpreter's kernels cannot be compiled), on one Triton forward variant
  and one CUDA kernel: their rows, cubins and figures. Skipped, with the reason, where Triton's
  offline compiler, nvcc or cuobjdump is missing.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benches" / "kernel_report.py"


def _load_report():
    spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


kr = _load_report()

# cuobjdump -sass of a made-up kernel: a scalar loop (0x40-0x60), a vectorised loop with two
# 128-bit loads and a barrier (0x80-0xd0), the exit, the trap branch to itself and padding.
SASS = """
	code for sm_90a
		Function : toy_kernel
	.headerflags	@"EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
                                                                               /* 0x000e220000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                          /* 0x0000000000007919 */
        /*0020*/              @!P0 BRA 0x80 ;                                  /* 0x0000000000008947 */
        /*0030*/                   MOV R2, RZ ;                                /* 0x000000ff00027202 */
        /*0040*/                   LDG.E.U16 R3, desc[UR4][R4.64] ;            /* 0x0000000404037981 */
        /*0050*/                   IADD3 R2, R2, 0x1, RZ ;                     /* 0x0000000102027810 */
        /*0060*/               @P1 BRA 0x40 ;                                  /* 0x0000000000001947 */
        /*0070*/                   MOV R6, RZ ;                                /* 0x000000ff00067202 */
        /*0080*/                   LDG.E.128 R8, desc[UR4][R4.64] ;            /* 0x0000000404087981 */
        /*0090*/               @P2 LDG.E.EF.128 R12, desc[UR4][R4.64+0x10] ;   /* 0x00001004040c2981 */
        /*00a0*/                   FADD R6, R8, R12 ;                          /* 0x0000000c08067221 */
        /*00b0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;               /* 0x0000000000007b1d */
        /*00c0*/                   BSYNC B0 ;                                  /* 0x0000000000007941 */
        /*00d0*/              @!P3 BRA !P4, 0x80 ;                             /* 0xffffffa00000b947 */
        /*00e0*/                   EXIT ;                                      /* 0x000000000000794d */
        /*00f0*/                   BRA 0xf0;                                   /* 0xfffffffc00fc7947 */
        /*0100*/                   NOP;                                        /* 0x0000000000007918 */
        /*0110*/                   NOP;                                        /* 0x0000000000007918 */
		..........
"""


def toy_instructions():
    functions = kr.parse_sass(SASS)
    assert list(functions) == ["toy_kernel"]
    arch, instructions = functions["toy_kernel"]
    assert arch == "sm_90a"
    return instructions


def test_parse_sass_reads_addresses_opcodes_and_operands_without_predicates():
    instructions = toy_instructions()
    assert len(instructions) == 18
    assert [i.address for i in instructions[:3]] == [0x0, 0x10, 0x20]
    assert instructions[2].opcode == "BRA" and instructions[2].operands == "0x80"
    assert instructions[9].opcode == "LDG.E.EF.128"
    assert [kr.branch_target(i) for i in instructions if i.opcode == "BRA"] == [0x80, 0x40, 0x80, 0xF0]


def test_loops_are_backward_branches_and_the_hot_one_has_the_vector_loads():
    instructions = toy_instructions()
    loops = kr.find_loops(instructions)
    # The forward branch (0x20) and the trap branching to itself (0xf0) are no loops.
    assert [(instructions[loop.start].address, instructions[loop.end].address) for loop in loops] == [
        (0x40, 0x60), (0x80, 0xD0)]
    hot = kr.hot_loop(instructions)
    body = instructions[hot.start:hot.end + 1]
    assert len(body) == 6  # from the branch target to the branch, both counted
    assert sum(map(kr.global_load_bytes, body)) == 32
    assert kr.count_barriers(body) == 1  # BAR.SYNC, not the BSYNC convergence marker
    assert kr.hot_loop(instructions[:3]) is None


def test_kernel_body_drops_the_trap_and_the_padding():
    instructions = toy_instructions()
    body = kr.kernel_body(instructions)
    assert body[-1].opcode == "EXIT" and len(body) == len(instructions) - 3


def test_load_widths():
    def load(opcode: str) -> int:
        return kr.global_load_bytes(kr.Instruction(0, opcode, ""))

    assert [load(op) for op in ("LDG.E.128", "LDG.E.EF.128", "LDG.E.64", "LDG.E", "LDG.E.U16", "LDG.E.U8")] == [
        16, 16, 8, 4, 2, 1]
    assert load("STG.E.128") == 0 and load("LDS.128") == 0


def test_parse_res_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _token_stats_fwd_kernel:
  REG:59 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = kr.parse_res_usage(text)["_token_stats_fwd_kernel"]
    assert (usage["REG"], usage["LOCAL"], usage["SHARED"], usage["CONSTANT[0]"]) == (59, 8, 1024, 640)


def test_parse_ptxas_log():
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fwdv' for 'sm_90'
ptxas info    : Function properties for _Z3fwdv
    0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 192 bytes smem
ptxas info    : Compiling entry function '_Z3bwdv' for 'sm_90'
ptxas info    : Function properties for _Z3bwdv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 62 registers, used 0 barriers
"""
    assert kr.parse_ptxas_log(text) == {"_Z3fwdv": kr.Resources(64, 8, 192), "_Z3bwdv": kr.Resources(62, 0, 0)}


@pytest.mark.parametrize(("registers", "warps", "shared", "expected"), [
    (59, 16, 64, (2, 0.5)),      # 59 -> 64 per thread: 2048 per warp, 32 warps by registers
    (64, 8, 192, (4, 0.5)),      # the CUDA kernels' __launch_bounds__(256, 4)
    (48, 8, 0, (5, 0.625)),      # 1536 per warp: 42 warps, 5 blocks of 8
    (36, 8, 0, (6, 0.75)),       # 1152 -> 1280 per warp (units of 256): 51 warps
    (32, 8, 0, (8, 1.0)),        # threads bound: 2048 / 256
    (255, 4, 0, (2, 0.125)),     # 8192 per warp: 8 warps
    (16, 1, 0, (32, 0.5)),       # at most 32 blocks per SM
    (32, 4, 100 * 1024, (2, 0.125)),  # shared memory bound: (100 KB + 1 KB) per block of 228 KB
])
def test_occupancy(registers, warps, shared, expected):
    assert kr.occupancy(registers, warps, shared) == expected


def test_hbm_budget():
    # 132 SMs x 4 schedulers x 1.98 GHz x 32 threads over 4.3 TB/s
    assert kr.budget_per_element(2) == pytest.approx(15.56, abs=0.01)
    assert kr.budget_per_element(4) == pytest.approx(31.12, abs=0.01)


def _available_selection() -> tuple[list[str], list[str]]:
    """(--only patterns of the parts this machine can compile, reasons for the others)."""
    tools = kr.find_tools()
    if tools.cuobjdump is None:
        return [], [tools.missing["cuobjdump"]]
    patterns, reasons = [], []
    triton_reason = kr.triton_unavailable_reason()
    if triton_reason is None:
        patterns.append("triton:_token_stats_fwd_kernel:bf16,logps")
    else:
        reasons.append(triton_reason)
    if tools.nvcc is not None:
        patterns.append("cuda:token_stats_forward_kernel:bf16,logps")
    else:
        reasons.append(tools.missing["nvcc"])
    return patterns, reasons


def test_report_compiles_a_triton_and_a_cuda_kernel(tmp_path):
    patterns, reasons = _available_selection()
    if not patterns:
        pytest.skip("; ".join(reasons))
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cubins, output = tmp_path / "cubins", tmp_path / "report.json"
    command = [sys.executable, str(SCRIPT), "--json", str(output), "--cubin-dir", str(cubins)]
    for pattern in patterns:
        command += ["--only", pattern]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(output.read_text())
    assert sorted(f"{row['backend']}:{row['kernel']}:{row['variant']}" for row in rows) == sorted(patterns)
    cuobjdump = kr.find_tools().cuobjdump
    for row in rows:
        assert row["arch"].startswith("sm_90")
        assert 0 < row["registers"] <= 255 and row["spill_bytes"] == 0
        assert 1 <= row["ctas_per_sm"] <= 32 and 0 < row["occupancy"] <= 1
        # One loop iteration of bf16 logits: its loads are exactly the elements it handles.
        assert row["counted"] == "loop"
        assert row["loop_load_bytes"] == 2 * row["elements_per_loop_iteration"]
        assert row["instructions_per_element"] == pytest.approx(
            row["loop_instructions"] / row["elements_per_loop_iteration"], abs=0.01)
        assert 5 < row["instructions_per_element"] < 200
        assert row["budget_instructions_per_element"] == pytest.approx(15.56, abs=0.01)
        cubin = cubins / row["cubin"]
        assert cubin.is_file()
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
        assert row["function"] in kr.parse_sass(sass)
        # ... and the table on stdout has its line.
        assert any(line.split()[:3] == [row["backend"], row["kernel"], row["variant"]]
                   for line in result.stdout.splitlines())
    by_backend = {row["backend"]: row for row in rows}
    if "triton" in by_backend:
        # BLOCK_V 4096 over 4 warps, 4 vectors of 8 bf16 a thread, at every headline V (they
        # specialise alike).
        triton_row = by_backend["triton"]
        assert (triton_row["warps"], triton_row["elements_per_loop_iteration"]) == (4, 32)
        assert triton_row["vocab"] == list(kr.VOCABS)
    if "cuda" in by_backend:
        # kUnroll 4 x 8 bf16 per 16-byte vector, 256 threads.
        assert (by_backend["cuda"]["warps"], by_backend["cuda"]["elements_per_loop_iteration"]) == (8, 32)
