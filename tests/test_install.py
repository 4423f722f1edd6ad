"""What an installed package tells its user: optional parts skip cleanly, and missing compiled parts say why."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sam_fused
from sam_fused import _backends


def test_triton_backend_without_triton_is_skippable() -> None:
    """Without the triton package, sam_fused.kernels raises ModuleNotFoundError, so pytest.importorskip skips the
    Triton test modules instead of failing their collection, and backends() says what to install."""
    code = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
import pytest
import sam_fused
print("triton:", sam_fused.backends()["triton"])
try:
    import sam_fused.kernels
except ModuleNotFoundError as e:
    print("name:", e.name)
try:
    pytest.importorskip("sam_fused.kernels")
except pytest.skip.Exception:
    print("skipped")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "triton: unavailable: Triton kernels not importable (the Triton backend needs the 'triton' package" \
        in run.stdout, run.stdout
    assert "name: triton" in run.stdout and "skipped" in run.stdout, run.stdout


def test_a_part_the_build_skipped_is_reported_with_the_build_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    why = "no CUDA toolkit with its headers (include/cuda_runtime_api.h) was found (/usr/local/bin/nvcc -> /usr/local)"
    monkeypatch.setattr(_backends, "build_info", lambda: {
        "torch": torch.__version__, "extensions": {"sam_fused._C_cuda": {"built": False, "detail": why}}})
    status = _backends._not_loaded("sam_fused._C_cuda", "CUDA extension", ImportError("No module named x"))
    assert not status.available
    assert str(status) == f"unavailable: CUDA extension sam_fused._C_cuda was not built: {why}"


def test_a_part_built_against_another_torch_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backends, "build_info", lambda: {
        "torch": "1.0.0", "extensions": {"sam_fused._C_cpu": {"built": True, "detail": "vector ISA avx2"}}})
    status = _backends._not_loaded("sam_fused._C_cpu", "C++ CPU extension", ImportError("undefined symbol: _ZN3c10"))
    assert "undefined symbol" in status.detail
    assert (f"built against torch 1.0.0, this is torch {torch.__version__}: reinstall sam_fused with `pip install "
            "--no-build-isolation`") in status.detail


def test_this_build_recorded_what_it_built() -> None:
    """The package under test was built by setup.py, which recorded its torch and each compiled part."""
    info = _backends.build_info()
    assert info["torch"] == torch.__version__
    assert info["extensions"]["sam_fused._C_cpu"]["built"] is sam_fused.backends()["cpu"].available
    cuda = info["extensions"].get("sam_fused._C_cuda")
    if cuda is not None and not cuda["built"]:
        assert cuda["detail"] in sam_fused.backends()["cuda"].detail
