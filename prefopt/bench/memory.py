"""Peak extra host memory of one forward+backward on a CPU, measured in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .workloads import LinearWorkload, Workload

# The scripts measuring CPU memory in a fresh process, per path, next to the package in a source
# checkout: each takes the arguments of Implementation.memory_script_args, then the shape.
_BENCHES = Path(__file__).resolve().parents[2] / "benches"
MEMORY_SCRIPTS = {"logits": _BENCHES / "measure_memory.py", "linear": _BENCHES / "measure_linear_memory.py"}


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
