"""Test-only C++ built on the fly (never part of an installed extension), cached between runs.

Two builds, each keyed by a hash of its inputs and the torch version, under ~/.cache/sam_fused/<name>/<hash>:
  * planner: csrc/testing/planner_ops.cpp, the CUDA launch planner (csrc/cuda/mta_planner.h, plain C++) as
    torch.ops.sam_fused_planner.plan_chunks / kernel_limits. Needs only a C++ compiler.
  * emu: csrc/testing/emu, the CUDA kernels' own source (csrc/cuda/*.cu) under a CPU emulation, as
    torch.ops.sam_fused_emu.*. Needs the CUDA toolkit's headers too (cuda_bf16.h); the first build takes ~40 s.
Each loads once per process; a missing compiler or missing headers is a skip reason, a compile error a failure.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from sam_fused import _registry

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
LAUNCH = re.compile(r"(\w+(?:<\w+>)?)<<<(.*?)>>>\(")  # kernel<T><<<grid, block, smem, stream>>>(


def build(name: str, sources: list[Path], inputs: list[Path], include_paths: list[str],
          prepare: Callable[[Path], list[Path]] | None = None, cflags: tuple[str, ...] = ()) -> None:
    """Compiles `sources` into a library that registers its ops (torch.utils.cpp_extension.load) and loads it. The
    build folder is keyed by `inputs` (every file the build reads) and the torch version, so an edit rebuilds and an
    unchanged tree reuses it. `prepare(folder)` may write generated files there first; it returns the generated
    sources to compile too."""
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(torch.__version__.encode())
    for path in inputs:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    tag = digest.hexdigest()[:12]
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "sam_fused", name, tag)
    folder.mkdir(parents=True, exist_ok=True)
    if prepare is not None:
        sources = sources + prepare(folder)
    load(f"sam_fused_{name}_{tag}", [str(s) for s in sources], extra_include_paths=[*include_paths, str(folder)],
         extra_cflags=["-O1", "-ffp-contract=off", *cflags], build_directory=str(folder), is_python_module=False)


def compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) to build the test-only ops"


def cuda_include() -> str | None:
    """The include folder of a CUDA toolkit (CUDA_HOME / CUDA_PATH, nvcc's own, the usual places), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc may be a wrapper outside its toolkit: its dry run names the toolkit ("#$ TOP=...")
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp, "probe.cu")
            probe.write_text("")
            run = subprocess.run([nvcc, "-dryrun", "-c", str(probe), "-o", str(probe.with_suffix(".o"))],
                                 capture_output=True, text=True)
            roots += [line.split("=", 1)[1].strip() for line in (run.stdout + run.stderr).splitlines()
                      if line.startswith("#$ TOP=")]
    roots += ["/usr/local/cuda", "/opt/cuda"]
    for root in roots:
        if root and Path(root, "include", "cuda_bf16.h").is_file():
            return str(Path(root, "include").resolve())
    return None


@functools.cache
def emu_missing() -> str | None:
    """Why the kernel emulation cannot be built here, or None."""
    if compiler_missing():
        return compiler_missing()
    if cuda_include() is None:
        return "no CUDA toolkit headers (cuda_bf16.h) found: the kernel emulation needs them"
    return None


@functools.cache
def planner_ops() -> object:
    """torch.ops.sam_fused_planner (plan_chunks, kernel_limits)."""
    source = CSRC / "testing" / "planner_ops.cpp"
    build("planner", [source], [source, CSRC / "cuda" / "mta_planner.h"], [str(CSRC)])
    return torch.ops.sam_fused_planner


@functools.cache
def emu_ops() -> object:
    """torch.ops.sam_fused_emu: the CUDA backend's ops, its host code (csrc/cuda/ops.cpp and csrc/shared/host.cpp,
    validation and staging included) and its kernels (csrc/cuda/*.cu under csrc/testing/emu/cuda_emu.h), on CPU
    tensors. The schemas and fakes are sam_fused's own (_registry.define_ops), so opcheck applies too."""
    cuda, shared = CSRC / "cuda", CSRC / "shared"
    kernel_files = sorted(cuda.glob("*.cu"))
    emu_dir = CSRC / "testing" / "emu"

    def generate(folder: Path) -> list[Path]:
        for cu in kernel_files:  # the launches become emu::launch(kernel, emu::Grid{...}, args)
            text, count = LAUNCH.subn(r"emu::launch(\1, emu::Grid{\2}, ", cu.read_text())
            assert count > 0 and "<<<" not in text, f"{cu.name}: unexpected launch syntax"
            (folder / f"{cu.stem}.inc").write_text(text)
        host = (cuda / "ops.cpp").read_text()  # the shipped host ops, with emu_device.h for c10::cuda
        assert host.count('#include "cuda/device.h"') == 1, "ops.cpp: expected one #include \"cuda/device.h\""
        (folder / "ops.cpp").write_text(host.replace('#include "cuda/device.h"', '#include "emu_device.h"'))
        return [folder / "ops.cpp"]

    inputs = (kernel_files + [cuda / "ops.cpp"] + sorted(cuda.glob("*.h")) + sorted(cuda.glob("*.cuh"))
              + sorted(shared.iterdir()) + sorted(emu_dir.iterdir()))
    if not _emu_library:  # once per process, before the kernels register for it (a failed build may be retried)
        _emu_library.append(_registry.define_ops("sam_fused_emu"))
    build("cuda_emu", [emu_dir / "emu_ops.cpp", shared / "host.cpp"], inputs,
          [str(CSRC), str(emu_dir), cuda_include()], prepare=generate, cflags=("-Wno-attributes",))
    return torch.ops.sam_fused_emu


_emu_library: list = []  # keeps the emulation's op definitions alive
