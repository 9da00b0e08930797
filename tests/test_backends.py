"""Dispatch, PREFOPT_BACKEND, clear errors for backends that cannot run, and the CLI."""

import os
import subprocess
import sys

import pytest
import torch

import prefopt
from prefopt.backends import BackendUnavailableError, resolve_backend


def test_auto_on_cpu_is_the_chunked_fallback(monkeypatch):
    monkeypatch.delenv("PREFOPT_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("PREFOPT_BACKEND", "reference")
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    # The reference keeps float64: the override really chose it.
    logps = prefopt.token_logprobs(torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2]))
    assert logps.dtype == torch.float64
    # A backend named in the call is not overridden.
    assert resolve_backend("torch", torch.device("cpu")) == "torch"


def test_bad_environment_value(monkeypatch):
    monkeypatch.setenv("PREFOPT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PREFOPT_BACKEND: expected one of"):
        prefopt.token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]))


def test_cuda_backend_says_why_it_cannot_run():
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot run on cpu: .*no CUDA C\\+\\+ extension"):
        prefopt.token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so Triton can run")
def test_triton_on_cpu_without_the_interpreter_says_why():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = (
        "import torch, prefopt\n"
        "try:\n"
        "    prefopt.token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]), backend='triton')\n"
        "except prefopt.BackendUnavailableError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True)
    assert "need a CUDA tensor" in result.stdout and "TRITON_INTERPRET=1" in result.stdout


def test_import_does_not_load_the_compiler():
    """`import prefopt` stays cheap: torch._dynamo (over a second to import) is not loaded by it."""
    script = "import sys, prefopt, prefopt.nn, prefopt.losses\nprint('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_backend_availability_is_a_constant_to_the_compiler():
    """unavailable_reason carries the marker torch.compiler.assume_constant_result sets, without
    the import of torch._dynamo that calling it costs."""
    from prefopt.backends import unavailable_reason

    def probe():
        pass

    marked = torch.compiler.assume_constant_result(probe)
    markers = {name for name in vars(marked) if name.startswith("_dynamo")}
    assert markers and all(getattr(unavailable_reason, name, None) == getattr(marked, name) for name in markers)


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    """The CLI as a user starts it: without the TRITON_INTERPRET that these tests set."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "prefopt", *arguments], env=environment, capture_output=True, text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so Triton is compiled")
def test_interpreter_chosen_after_triton_was_imported_says_why():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = (
        "import os, torch, triton, prefopt\n"  # as torch.compile would have imported Triton
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    prefopt.token_logprobs(torch.randn(3, 5), torch.tensor([0, 1, 2]), backend='triton')\n"
        "except prefopt.BackendUnavailableError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True)
    assert "TRITON_INTERPRET changed after Triton was imported" in result.stdout


def test_cli_info_lists_every_backend():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for backend in ("triton", "cuda", "torch", "reference"):
        assert f"  {backend} " in result.stdout
    assert "backends for cpu tensors (auto -> " in result.stdout


def test_cli_check_passes():
    result = run_cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    assert "triton   float32" in result.stdout and "torch    float32" in result.stdout
    assert "FAIL" not in result.stdout


def test_cli_check_of_named_backends_only():
    # Started without TRITON_INTERPRET, check re-executes itself with it: the names must survive that.
    result = run_cli("check", "--backend", "torch")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch    float32" in result.stdout
    assert "triton" not in result.stdout and "cuda" not in result.stdout
    assert run_cli("check", "--backend", "reference").returncode == 2


@pytest.mark.parametrize(("triton_version", "numpy_version", "conflict"), [
    ("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.1", False), ("3.9.0+git1a2b", "2.5.0", False)])
def test_triton_interpreter_and_numpy_versions(monkeypatch, triton_version, numpy_version, conflict):
    import numpy
    import triton

    from prefopt import backends

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    backends.interpreter_numpy_conflict.cache_clear()
    try:
        reason = backends.interpreter_numpy_conflict()
    finally:
        backends.interpreter_numpy_conflict.cache_clear()
    assert (reason is not None) == conflict
    if conflict:
        assert f"Triton {triton_version}" in reason and "pip install 'numpy<2.4'" in reason
