"""Environment and build helpers of scripts/gpu_check.sh.

  python env_report.py                      python, torch, CUDA, GPU, Python packages (the env stage's log), then
                                            the --line line
  python env_report.py --line               one line: torch, CUDA, triton, GPU, CPUs (the env stage's note)
  python env_report.py --import-check SRC   import sam_fused (must come from SRC), print every backend's status and
                                            a NOTE_LINE; exit 4 unless the backends this mode needs are available:
                                            cuda and triton on a GPU run, cpu in a dry run (DRY_RUN=1)
  python env_report.py --merge-build-info DST SRC2
                                            DST's _build_info.json takes SRC2's record of _C_cuda (the two build trees)
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def report() -> int:
    import torch

    print("python", sys.version.split()[0], sys.executable)
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          "devices", torch.cuda.device_count())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, f"cc {p.major}.{p.minor}", "SMs", p.multi_processor_count,
              "mem GiB", round(p.total_memory / 2**30, 1), "L2 MiB", round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    for m in ("triton", "pytest", "xdist", "pytest_timeout", "ninja", "setuptools", "numpy"):
        try:
            mod = importlib.import_module(m)
            print("have", m, getattr(mod, "__version__", ""))
        except Exception as e:  # noqa: BLE001
            print("MISSING", m, e)
    return line()  # last: the env stage's note


def line() -> int:
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, {gpu}, {os.cpu_count()} CPUs")
    return 0


def import_check(src: str) -> int:
    import sam_fused.bench  # noqa: F401
    import sam_fused.kernels  # noqa: F401

    import sam_fused

    where = os.path.realpath(sam_fused.__file__)
    print("sam_fused imported from", where)
    if not where.startswith(os.path.realpath(src) + os.sep):
        print(f"NOTE_LINE sam_fused imported from {where}, not from the built copy {src}")
        return 5
    report = sam_fused.backends()
    for name, status in report.items():
        print(f"backend {name:6s} {status}")
    dry = os.environ.get("DRY_RUN", "0") not in ("", "0")
    need = ["cpu"] if dry else ["cpu", "cuda", "triton"]
    missing = [n for n in need if not report[n].available]
    print("NOTE_LINE " + "; ".join(f"{n}: {str(report[n])[:120]}" for n in ("cpu", "cuda", "triton")))
    return 4 if missing else 0


def merge_build_info(dst: str, other: str) -> int:
    with open(dst) as f:
        info = json.load(f)
    with open(other) as f:
        cuda = json.load(f).get("extensions", {}).get("sam_fused._C_cuda")
    if cuda is not None:
        info.setdefault("extensions", {})["sam_fused._C_cuda"] = cuda
    with open(dst, "w") as f:
        json.dump(info, f, indent=1)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 1:
        return report()
    if argv[1] == "--line":
        return line()
    if argv[1] == "--import-check" and len(argv) == 3:
        return import_check(argv[2])
    if argv[1] == "--merge-build-info" and len(argv) == 4:
        return merge_build_info(argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
