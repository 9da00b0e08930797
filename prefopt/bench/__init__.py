"""Benchmarks: time, peak extra memory and fraction of the floor, for the logits path and the
fused linear path.

``python -m prefopt bench`` (:func:`run`, both paths) and ``pytest benches`` share this package,
one module per job:

- ``workloads``: the problems (:class:`Workload`, :class:`LinearWorkload`), the sweeps, the
  default subsets and their inputs;
- ``implementations``: what is measured (:class:`Implementation`): prefopt's backends, the
  plain-PyTorch reference, ``torch.compile`` of it and the peers where they import;
- ``timing``: the timers, the ceilings (copy bandwidth, cuBLAS products), :func:`measure`,
  :func:`measure_interleaved` and the :class:`Measurement` they return;
- ``floors``: a measurement against its floor and the reference, and the fused linear path's
  targets (:func:`linear_checks`);
- ``memory``: CPU peak memory, in a fresh process (``python -m prefopt.bench.memory``);
- ``report`` and ``plots``: the table, the environment and the JSON; the PNG plots;
- ``runner``: the main job, :func:`run`.

How each figure is measured:

- time: the median over repeated calls of one direction (``"fwd"``, ``"bwd"`` or ``"fwd+bwd"``),
  after warm-up calls. On a GPU each call is timed with CUDA events and the calls rotate over
  enough copies of the inputs that together exceed twice the L2 cache, so no call finds its
  inputs cached; on a CPU with ``time.perf_counter`` (the inputs, at least tens of MB, already
  exceed the CPU caches). A backward is timed alone: its forward runs untimed before each call.
- peak extra memory: on a GPU ``torch.cuda.max_memory_allocated`` above what was allocated just
  before the timed part of each call (inputs, and for ``"bwd"`` the forward's saved tensors),
  the maximum over the calls. On a CPU the peak resident memory of one forward+backward in a
  fresh process (``python -m prefopt.bench.memory``, run with ``MALLOC_MMAP_THRESHOLD_`` so
  glibc returns freed blocks), which an installed wheel runs as well as a source checkout.
- floor of the logits path (GPU): the bytes a direction must move (read the scored rows of the
  logits once per pass, write the whole gradient once) over the copy bandwidth of the same GPU,
  measured in the same run by :func:`copy_bandwidth`.
- floor of the fused linear path: the time torch.mm (cuBLAS on a GPU) takes for the matrix
  products the direction needs on the scored rows (the logits for a forward; the logits, the
  hidden gradient and the weight gradient for forward+backward), measured in the same run by
  :func:`gemm_seconds`. prefopt's own backends declare the products they actually perform (the
  backward recomputes the logits once, tile by tile, before the two gradient products), and are
  held to 1.10x their cuBLAS time forward+backward and 1.05x forward alone (:func:`linear_checks`).
"""


# One module per job; every name the callers use (tests/, benches/, prefopt/__main__.py) is here.
# prefopt.bench.memory is not imported: it is also the fresh process's `python -m` entry.
from .floors import CHECKED, LINEAR_TARGET_SHAPES, fill_floor, fill_speedups, linear_checks
from .implementations import (ALL_IMPLEMENTATION_NAMES, CCE, CCE_COMPILE, CCE_EXACT, FILTER_EPS, FUSED_FILTERED,
                              IMPLEMENTATION_NAMES, LIGER_DPO,
                              LIGER_LINEAR,
                              LINEAR_IMPLEMENTATION_NAMES, LINEAR_PEERS, PREFOPT_LINEAR_PRODUCTS, REFERENCE,
                              TRL_CHUNKED, Candidate, Implementation, implementations, linear_implementations,
                              load_trl_logprob_module)
from .plots import MissingExtraError, write_plots
from .report import PATH_TITLES, environment, format_table, results_stem, write_json
from .runner import CPU_CALLS, CPU_QUICK_CALLS, DEFAULT_RUN_LEAVES_OUT, CallBudget, chosen_implementations, run
from .timing import Measurement, copy_bandwidth, gemm_seconds, measure, measure_interleaved, rotation_count, time_calls
from .workloads import (DIRECTIONS, GEMM_PRODUCTS, IGNORE_INDEX, LINEAR_DIRECTIONS, LinearWorkload, Workload,
                        default_workloads, make_inputs, peaked_profile, sweep)

__all__ = [
    "ALL_IMPLEMENTATION_NAMES", "CCE", "CCE_COMPILE", "CCE_EXACT", "CHECKED", "CPU_CALLS", "CPU_QUICK_CALLS",
    "DEFAULT_RUN_LEAVES_OUT", "DIRECTIONS", "FILTER_EPS", "FUSED_FILTERED", "GEMM_PRODUCTS", "IGNORE_INDEX",
    "IMPLEMENTATION_NAMES", "LIGER_DPO", "LIGER_LINEAR",
    "LINEAR_DIRECTIONS", "LINEAR_IMPLEMENTATION_NAMES", "LINEAR_PEERS", "LINEAR_TARGET_SHAPES", "PATH_TITLES",
    "PREFOPT_LINEAR_PRODUCTS", "REFERENCE", "TRL_CHUNKED", "CallBudget", "Candidate", "Implementation",
    "LinearWorkload", "Measurement", "MissingExtraError", "Workload", "chosen_implementations", "copy_bandwidth",
    "default_workloads", "environment", "fill_floor", "fill_speedups", "format_table",
    "gemm_seconds", "implementations", "linear_checks", "linear_implementations", "load_trl_logprob_module",
    "make_inputs", "measure", "measure_interleaved", "peaked_profile", "results_stem", "rotation_count", "run",
    "sweep", "time_calls", "write_json", "write_plots",
]
