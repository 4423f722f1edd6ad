"""Build sam_fused.

* Always: the pure-Python package (sam_fused/), the Triton kernels (kernels/ -> sam_fused.kernels) and the benchmarks
  (bench/ -> sam_fused.bench).
* Always, when csrc/cpu has sources: the C++ CPU extension sam_fused._C_cpu (needs torch at build time, so install with
  `pip install --no-build-isolation -e .` after torch).
* When torch is a CUDA build and nvcc is found (CUDA_HOME): the CUDA extension sam_fused._C_cuda. No GPU is needed to
  build it. SAM_FUSED_NO_CUDA=1 skips it.
A compiled part that fails to build is reported by sam_fused.backends() at run time; importing never needs it.
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # metadata-only build (e.g. sdist): no compiled parts
    torch = None

if torch is not None:
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/testing/*.cpp"))
    if cpu_sources:
        # Vector ISA of the CPU kernels. The package is compiled on the machine that runs it, so the kernels use that
        # machine's widest ISA that ATen's vec headers support (at::vec::Vectorized picks it from CPU_CAPABILITY_*),
        # after checking the CPU (/proc/cpuinfo) and that the compiler accepts the flags. SAM_FUSED_CPU_CAPABILITY =
        # avx512 | avx2 | default overrides the detection (use "default" for a portable build); the library refuses
        # to load on a CPU without the ISA it was built for, and sam_fused falls back to the torch backend.
        import platform
        import subprocess
        import sys
        import tempfile

        isa_table = {  # name: (compiler flags, /proc/cpuinfo flags needed, ATen CPU_CAPABILITY, probe intrinsic)
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
            if wanted not in ("native", "default", *isa_table):
                raise ValueError(f"SAM_FUSED_CPU_CAPABILITY must be native, default, avx2 or avx512, got {wanted!r}")
            cpu = cpu_isa_flags()
            for name, (flags, needed, _, probe) in isa_table.items():
                if wanted == name or (wanted == "native" and needed <= cpu):
                    if compiler_accepts(flags, probe):
                        return name
                    print(f"sam_fused: the compiler rejects {' '.join(flags)}; building the generic CPU kernels")
                    return "default"
            return "default"

        isa = pick_isa()
        cxx_flags = ["-O3", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                     # the kernels must round exactly like the reference: no fused multiply-add contraction
                     "-ffp-contract=off", "-Wno-unknown-pragmas"]
        if isa in isa_table:
            flags, _, capability, _ = isa_table[isa]
            cxx_flags += flags + [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        else:
            cxx_flags += ["-DCPU_CAPABILITY=DEFAULT"]
        link_flags = []
        if torch._C.has_openmp and sys.platform == "linux":
            # at::parallel_for is an inline OpenMP region when torch uses OpenMP; libgomp resolves to torch's copy.
            cxx_flags.append("-fopenmp")
            link_flags.append("-fopenmp")
        print(f"sam_fused: CPU kernels built for {isa} ({' '.join(cxx_flags)})")
        ext_modules.append(
            CppExtension(
                "sam_fused._C_cpu",
                cpu_sources,
                include_dirs=[os.path.abspath("csrc")],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        )
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    want_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not os.environ.get("SAM_FUSED_NO_CUDA")
    if cuda_sources and want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext_modules.append(
            CUDAExtension(
                "sam_fused._C_cuda",
                cuda_sources,
                include_dirs=[os.path.abspath("csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )
    if ext_modules:
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="sam_fused",
    version="0.1.0",
    description="Fused Sharpness-Aware Minimization (SAM, ASAM, mSAM, Friendly-SAM) for PyTorch",
    python_requires=">=3.10",
    packages=["sam_fused", "sam_fused.kernels", "sam_fused.bench"],
    package_dir={"sam_fused": "sam_fused", "sam_fused.kernels": "kernels", "sam_fused.bench": "bench"},
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest", "ruff"], "bench": ["pytest-benchmark", "tqdm"], "triton": ["triton"]},
    entry_points={"console_scripts": ["sam-fused-bench=sam_fused.bench.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
