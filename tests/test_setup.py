"""setup.py's decisions, without building: the computed package list and how the CUDA toolkit is found or skipped."""

from __future__ import annotations

import os
import runpy
import stat
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py() -> dict:
    """setup.py's namespace, with setuptools.setup() replaced by a recorder (nothing is built)."""
    calls = []
    real, setuptools.setup = setuptools.setup, lambda **kw: calls.append(kw)
    cwd, env = os.getcwd(), dict(os.environ)  # setup.py may set CUDA_HOME / TORCH_CUDA_ARCH_LIST: keep them out
    try:
        os.chdir(ROOT)
        ns = runpy.run_path(str(ROOT / "setup.py"))
    finally:
        setuptools.setup = real
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
    ns["setup_kwargs"] = calls[0]
    return ns


def test_every_package_folder_is_in_the_package_list(setup_py: dict) -> None:
    kwargs = setup_py["setup_kwargs"]
    expected = set()
    for name, src in kwargs["package_dir"].items():
        for init in (ROOT / src).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / src).parts
            expected.add(".".join((name, *rel)))
    assert "sam_fused.diagnostics" in expected
    assert set(kwargs["packages"]) == expected


def _fake_nvcc(folder: Path, toolkit: Path) -> None:
    """A wrapper script called nvcc whose dry run names `toolkit` as its TOP, like the real nvcc does."""
    folder.mkdir(parents=True)
    nvcc = folder / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "#$ TOP={toolkit}/bin/.."\n')
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)


def test_a_wrapper_nvcc_leads_to_its_toolkit(setup_py: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch would guess CUDA_HOME = the folder above the wrapper (here tmp/wrapper), which has no headers."""
    toolkit = tmp_path / "cuda-99.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    _fake_nvcc(tmp_path / "wrapper" / "bin", toolkit)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "wrapper" / "bin"))
    monkeypatch.setitem(setup_py["find_cuda_home"].__globals__, "TOOLKIT_GUESSES", ())
    assert setup_py["find_cuda_home"]() == (os.path.realpath(toolkit), "")


def test_no_toolkit_headers_is_a_reason_not_an_error(setup_py: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_nvcc(tmp_path / "bin", tmp_path / "headerless")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setitem(setup_py["find_cuda_home"].__globals__, "TOOLKIT_GUESSES", ())
    home, why = setup_py["find_cuda_home"]()
    assert home is None
    assert "no CUDA toolkit with its headers (include/cuda_runtime_api.h)" in why and "headerless" in why
