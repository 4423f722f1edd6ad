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
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if cpu_sources:
        ext_modules.append(
            CppExtension(
                "sam_fused._C_cpu",
                cpu_sources,
                include_dirs=[os.path.abspath("csrc")],
                extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
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
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
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
