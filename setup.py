"""Build sam_fused.

* Always: the pure-Python package (sam_fused/ and its subpackages), the Triton kernels (kernels/ -> sam_fused.kernels)
  and the benchmarks (bench/ -> sam_fused.bench). The package list is computed, not kept by hand.
* When torch is importable at build time (`pip install --no-build-isolation .` after torch, or `pip install .`, whose
  isolated build environment gets torch from pyproject.toml): the C++ CPU extension sam_fused._C_cpu.
* When torch is a CUDA build and a CUDA toolkit with its headers is found: the CUDA extension sam_fused._C_cuda. No GPU
  is needed to build it. SAM_FUSED_NO_CUDA=1 skips it.
The compiled parts are optional: one whose toolkit is missing or that fails to compile is skipped with a message (see
it with `pip install -v`), never aborts the install, and is recorded in sam_fused/_build_info.json, from which
sam_fused.backends() reports why that backend is absent. SAM_FUSED_REQUIRE_EXTENSIONS=1 makes any failure fatal (the
project's scripts and CI set it, so that a compile error fails loudly there).
"""

import glob
import json
import os
import platform
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

# Installed package -> source folder.
PACKAGE_DIRS = {"sam_fused": "sam_fused", "sam_fused.kernels": "kernels", "sam_fused.bench": "bench"}
CPU_EXT, CUDA_EXT = "sam_fused._C_cpu", "sam_fused._C_cuda"
DEMO_DEPS = ["tqdm", "scikit-learn", "matplotlib"]
BUILD_INFO_FILE = os.path.join("sam_fused", "_build_info.json")
STRICT = os.environ.get("SAM_FUSED_REQUIRE_EXTENSIONS", "") not in ("", "0")
build_info: dict = {"torch": None, "extensions": {}}  # written next to the built package by BuildOptional.run


def packages() -> list[str]:
    return [f"{name}.{sub}" if sub else name for name, src in PACKAGE_DIRS.items() for sub in ["", *find_packages(src)]]


def log(msg: str) -> None:
    print(f"sam_fused: {msg}", file=sys.stderr, flush=True)


def record(ext: str, built: bool, detail: str) -> None:
    build_info["extensions"][ext] = {"built": built, "detail": detail}
    if not built:
        log(f"{ext} not built: {detail}")


# ---- CPU extension: vector ISA ---------------------------------------------------------------------------------
# The package is compiled on the machine that runs it, so the kernels use that machine's widest ISA that ATen's vec
# headers support (at::vec::Vectorized picks it from CPU_CAPABILITY_*), after checking the CPU (/proc/cpuinfo) and that
# the compiler accepts the flags. SAM_FUSED_CPU_CAPABILITY = avx512 | avx2 | default overrides the detection (use
# "default" for a portable build); the library refuses to load on a CPU without the ISA it was built for, and sam_fused
# falls back to the torch backend.
ISA_TABLE = {  # name: (compiler flags, /proc/cpuinfo flags needed, ATen CPU_CAPABILITY, probe intrinsic)
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
               {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}, "AVX512",
               "_mm512_add_ps(_mm512_set1_ps(1.f), _mm512_set1_ps(2.f))"),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}, "AVX2",
             "_mm256_fmadd_ps(_mm256_set1_ps(1.f), _mm256_set1_ps(2.f), _mm256_set1_ps(3.f))"),
}


def cpu_isa_flags() -> set:
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def compiler_accepts(flags: list, probe: str) -> bool:
    src = f"#include <immintrin.h>\nvoid sam_fused_probe(float* o) {{ auto v = {probe}; (void)v; o[0] = 0; }}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.cpp")
        with open(path, "w") as f:
            f.write(src)
        cmd = [os.environ.get("CXX", "c++"), *flags, "-c", path, "-o", os.path.join(tmp, "probe.o")]
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


def pick_isa() -> str:
    wanted = os.environ.get("SAM_FUSED_CPU_CAPABILITY", "native").lower()
    if wanted not in ("native", "default", *ISA_TABLE):
        raise ValueError(f"SAM_FUSED_CPU_CAPABILITY must be native, default, avx2 or avx512, got {wanted!r}")
    cpu = cpu_isa_flags()
    for name, (flags, needed, _, probe) in ISA_TABLE.items():
        if wanted == name or (wanted == "native" and needed <= cpu):
            if compiler_accepts(flags, probe):
                return name
            log(f"the compiler rejects {' '.join(flags)}; building the generic CPU kernels")
            return "default"
    return "default"


def cpu_extension(torch):
    from torch.utils.cpp_extension import CppExtension

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/shared/*.cpp"))  # shared: the host layer
    isa = pick_isa()
    cxx_flags = ["-O3", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                 # the kernels must round exactly like the reference: no fused multiply-add contraction
                 "-ffp-contract=off", "-Wno-unknown-pragmas"]
    if isa in ISA_TABLE:
        flags, _, capability, _ = ISA_TABLE[isa]
        cxx_flags += flags + [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    else:
        cxx_flags += ["-DCPU_CAPABILITY=DEFAULT"]
    link_flags = []
    if torch._C.has_openmp and sys.platform == "linux":
        # at::parallel_for is an inline OpenMP region when torch uses OpenMP; libgomp resolves to torch's copy.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    log(f"CPU kernels built for {isa} ({' '.join(cxx_flags)})")
    record(CPU_EXT, True, f"vector ISA {isa}")
    return CppExtension(CPU_EXT, sources, include_dirs=[os.path.abspath("csrc")],
                        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


# ---- CUDA extension: the toolkit -------------------------------------------------------------------------------


TOOLKIT_GUESSES = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")  # after $CUDA_HOME, $CUDA_PATH and PATH


def find_cuda_home() -> tuple[str | None, str]:
    """(a CUDA toolkit folder that has the runtime headers, or None; what was looked at).

    torch guesses CUDA_HOME as the folder above the nvcc on PATH, which is wrong when that nvcc is a wrapper script or
    a link (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc); so each candidate nvcc is asked where its
    toolkit is: a dry run prints "#$ TOP=<toolkit>/bin/..".
    """
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    dirs = [os.path.join(h, "bin") for h in homes if h] + os.environ.get("PATH", "").split(os.pathsep)
    nvccs = [os.path.join(d, "nvcc") for d in dirs if d]
    nvccs += [nvcc for pattern in TOOLKIT_GUESSES for nvcc in sorted(glob.glob(os.path.join(pattern, "bin", "nvcc")))]
    tried = []
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.cu")
        open(probe, "w").close()
        for nvcc in dict.fromkeys(nvccs):  # ordered, without repeats
            if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
                continue
            try:
                out = subprocess.run([nvcc, "-dryrun", "-c", probe, "-o", os.path.join(tmp, "probe.o")],
                                     capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                continue
            top = next((line.split("=", 1)[1].strip() for line in (out.stdout + out.stderr).splitlines()
                        if line.startswith("#$ TOP=")), None)
            home = os.path.realpath(top) if top else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
            if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
                return home, ""
            tried.append(f"{nvcc} -> {home}")
    where = "; ".join(tried) if tried else f"no nvcc in $CUDA_HOME, $CUDA_PATH, PATH, {', '.join(TOOLKIT_GUESSES)}"
    return None, f"no CUDA toolkit with its headers (include/cuda_runtime_api.h) was found ({where})"


def cuda_extension(torch):
    if not sorted(glob.glob("csrc/cuda/*.cu")):
        return None
    if os.environ.get("SAM_FUSED_NO_CUDA", "") not in ("", "0"):
        record(CUDA_EXT, False, "SAM_FUSED_NO_CUDA is set")
        return None
    if torch.version.cuda is None:
        record(CUDA_EXT, False, f"torch {torch.__version__} (at build time) is not a CUDA build")
        return None
    home, why = find_cuda_home()
    if home is None:
        record(CUDA_EXT, False, why)
        return None
    os.environ["CUDA_HOME"] = home
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = home  # it guessed at import time; use the toolkit found above
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    log(f"CUDA kernels built with the toolkit in {home} for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    record(CUDA_EXT, True, f"CUDA toolkit {home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    sources += sorted(glob.glob("csrc/shared/*.cpp"))  # the host layer, also in _C_cpu: hidden, so never shared
    return cpp_extension.CUDAExtension(CUDA_EXT, sources, include_dirs=[os.path.abspath("csrc")],
                                       extra_compile_args={"cxx": ["-O3", "-fvisibility=hidden",
                                                                   "-fvisibility-inlines-hidden"],
                                                           "nvcc": ["-O3"]})


def compiled_parts() -> tuple[list, dict]:
    """(ext_modules, cmdclass)."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:  # metadata-only build (e.g. sdist): no compiled parts
        return [], {}
    build_info["torch"] = torch.__version__
    exts = [cpu_extension(torch) if glob.glob("csrc/cpu/*.cpp") else None, cuda_extension(torch)]
    exts = [e for e in exts if e is not None]

    class BuildOptional(BuildExtension):
        """torch's BuildExtension, where a compiled part that fails is skipped and recorded instead of failing the
        install (unless SAM_FUSED_REQUIRE_EXTENSIONS is set)."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as e:  # a check of torch's over all extensions, e.g. nvcc's CUDA version vs torch's
                cuda = [ext for ext in self.extensions if ext.name == CUDA_EXT]
                if STRICT or not cuda:
                    raise
                self._skip(cuda[0], e)
                self.extensions = [ext for ext in self.extensions if ext is not cuda[0]]
                super().build_extensions()

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as e:
                if STRICT:
                    raise
                self._skip(ext, e)

        def _skip(self, ext, error: Exception) -> None:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            record(ext.name, False, f"the build failed ({type(error).__name__}: {first_line[:300]}); "
                   "reinstall with `pip install -v` to see the compiler's errors")

        def run(self) -> None:
            super().run()
            targets = [os.path.join(self.build_lib, BUILD_INFO_FILE)]
            if self.inplace or getattr(self, "editable_mode", False):
                targets.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), BUILD_INFO_FILE))
            for path in targets:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(build_info, f, indent=1)

    return exts, {"build_ext": BuildOptional.with_options(use_ninja=True)} if exts else {}


ext_modules, cmdclass = compiled_parts()

setup(
    name="sam_fused",
    version="0.1.0",
    description="Fused Sharpness-Aware Minimization (SAM, ASAM, mSAM, Friendly-SAM) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages(),
    package_dir=PACKAGE_DIRS,
    include_package_data=False,
    install_requires=["torch>=2.4"],
    extras_require={
        "demo": DEMO_DEPS,
        "bench": ["pytest-benchmark"],
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", *DEMO_DEPS],  # the suite runs the demo; Triton tests skip without it
    },
    entry_points={"console_scripts": ["sam-fused-bench=sam_fused.bench.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
