"""Static checks of the CUDA kernels' generated code, without a GPU (docs/DESIGN.md section 7).

Compiles each csrc/cuda/*.cu for sm_90 with the nvcc flags setup.py's CUDAExtension uses (nvcc -ptx, then ptxas -v
on that PTX, which is what nvcc itself does) and reads the PTX, ptxas's resource report and, when a cuobjdump is
found (the toolkit's, or the one shipped in triton's backends/nvidia/bin), the SASS. Per kernel it reports:

  ldv4 / stv4   16-byte global loads / stores in the PTX (ld.global[.nc].v4 / st.global.v4): the aligned vector path
  ahead         the most 16-byte loads issued in one basic block before the first store or floating-point/convert
                instruction of that block (PTX; SASS: LDG.E.128 before the first STG/float op): loads in flight
  params        bytes of kernel parameters (the by-value argument struct + scalars); <= 32,764 (CUDA >= 12.1, sm_70+)
  regs, spills  ptxas -v: registers, spill stores + spill loads (bytes), stack frame (bytes)
  local         .local / ld.local / st.local in the PTX; LDL / STL in the SASS
  fma32, approx fma.rn.f32 (contracted a*b+c: the reference rounds every step), .approx instructions
  atomics       atom. / red. instructions (the reductions are deterministic: none)

Used by tests/test_cuda_static.py (which asserts on them) and runnable by hand: python scripts/cuda_static_check.py.
Results are cached under ~/.cache/sam_fused/cuda_static/<hash of sources, flags and nvcc version>.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCH = "sm_90"
# What torch's CUDAExtension passes to nvcc (COMMON_NVCC_FLAGS) plus setup.py's -O3; -std as torch does for nvcc.
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
PARAM_LIMIT = 32764  # bytes of kernel parameters allowed by CUDA >= 12.1 on sm_70+


def find_nvcc() -> tuple[str, str] | None:
    """(nvcc, toolkit root) — nvcc may be a wrapper outside its toolkit: its dry run names the toolkit (#$ TOP=)."""
    cands = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc",
              *sorted(Path("/usr/local").glob("cuda-*/bin/nvcc")), "/opt/cuda/bin/nvcc"]
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.cu")
        probe.write_text("")
        for nvcc in dict.fromkeys(str(c) for c in cands if c):
            if not os.access(nvcc, os.X_OK):
                continue
            run = subprocess.run([nvcc, "-dryrun", "-c", str(probe), "-o", str(probe.with_suffix(".o"))],
                                 capture_output=True, text=True)
            tops = [ln.split("=", 1)[1].strip() for ln in (run.stdout + run.stderr).splitlines()
                    if ln.startswith("#$ TOP=")]
            if tops and Path(tops[0], "include", "cuda_runtime_api.h").is_file():
                return nvcc, str(Path(tops[0]).resolve())
    return None


def find_cuobjdump(toolkit: str) -> str | None:
    """The toolkit's cuobjdump, else the one triton ships (backends/nvidia/bin), else None."""
    cands = [Path(toolkit, "bin", "cuobjdump")]
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        cands.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in cands if os.access(c, os.X_OK)), None)


def _entries(text: str, start: re.Pattern) -> dict[str, str]:
    """Kernel name -> its text, for PTX (.entry) or SASS (Function : name) listings."""
    marks = [(m.start(), m.group(1)) for m in start.finditer(text)]
    return {name: text[pos:(marks[i + 1][0] if i + 1 < len(marks) else len(text))]
            for i, (pos, name) in enumerate(marks)}


def _ahead(blocks: list[str], parse) -> int:
    """The most 16-byte loads one basic block issues before the first instruction that reads a value one of them
    loaded (a true data dependence, so address arithmetic in between does not count as a use). parse(line) gives
    (kind, registers written, registers read), kind "load" (16-byte), "move" or "other", or None for a line that is
    no instruction."""
    best = 0
    for block in blocks:
        loaded: set[str] = set()
        n = 0
        for line in block.splitlines():
            ins = parse(line)
            if ins is None:
                continue
            kind, dests, srcs = ins
            if kind == "move":  # a register move (e.g. PTX unpacking a loaded word into halves) forwards the value
                if loaded & set(srcs):
                    loaded |= set(dests)
                continue
            if loaded & set(srcs):
                break
            if kind == "load":
                n += 1
                loaded |= set(dests)
        best = max(best, n)
    return best


PTX_LDV4 = re.compile(r"\bld\.global(\.\w+)*\.v4\.")
PTX_STV4 = re.compile(r"\bst\.global(\.\w+)*\.v4\.")
PTX_INS = re.compile(r"^\s*(?:@!?(%p\d+)\s+)?([a-z][\w.]*)\s+(.*);")


def _parse_ptx(line: str):
    m = PTX_INS.match(line)
    if m is None:
        return None
    guard, op, operands = m.groups()
    regs = re.findall(r"%\w+", operands)
    guard_regs = [guard] if guard else []
    if op.startswith(("st.", "bra", "ret")):
        return "other", [], regs + guard_regs
    if PTX_LDV4.match(op + "."):
        dests = re.findall(r"%\w+", operands.split("[", 1)[0])
        return "load", dests, re.findall(r"%\w+", operands.split("[", 1)[1]) + guard_regs
    if operands.startswith("{"):  # several destinations: {%a, %b}, ...
        dests = re.findall(r"%\w+", operands.split("}", 1)[0])
        return ("move" if op.startswith("mov.") else "other"), dests, re.findall(r"%\w+", operands.split("}", 1)[1])
    return ("move" if op.startswith("mov.") else "other"), regs[:1], regs[1:] + guard_regs


SASS_INS = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)\s*([^;]*);")


def _sass_regs(text: str) -> list[str]:
    """R<n> operands, a 64-bit pair R<n>.64 as both halves."""
    regs = []
    for num, wide in re.findall(r"\bR(\d+)(\.64)?\b", text):
        regs += [f"R{int(num) + k}" for k in range(2 if wide else 1)]
    return regs


def _parse_sass(line: str):
    m = SASS_INS.search(line)
    if m is None:
        return None
    op, operands = m.groups()
    first, _, rest = operands.partition(",")
    if re.match(r"LDG\.E[\w.]*\.128$", op):
        num = int(re.match(r"\s*R(\d+)", first).group(1))
        return "load", [f"R{num + k}" for k in range(4)], _sass_regs(rest)
    if op.startswith(("ST", "BRA", "EXIT", "RET", "BAR", "ISETP", "FSETP", "DSETP")):
        return "other", [], _sass_regs(operands)
    return ("move" if op == "MOV" else "other"), _sass_regs(first), _sass_regs(rest)


def analyse_ptx(ptx: str) -> dict[str, dict]:
    out = {}
    for name, body in _entries(ptx, re.compile(r"\.entry\s+(\w+)\s*\(")).items():
        params = sum(int(n or 1) * {"b8": 1, "u8": 1, "b16": 2, "u16": 2, "b32": 4, "u32": 4, "f32": 4, "b64": 8,
                                    "u64": 8, "f64": 8}[t]
                     for t, n in re.findall(r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+\w+(?:\[(\d+)\])?", body))
        blocks = re.split(r"^\$L__BB\w+:", body, flags=re.M)
        out[name] = {
            "ldv4": len(PTX_LDV4.findall(body)), "stv4": len(PTX_STV4.findall(body)),
            "ahead": _ahead(blocks, _parse_ptx), "params": params,
            "local": len(re.findall(r"\.local\b", body)), "fma32": len(re.findall(r"\bfma\.\w+\.f32\b", body)),
            "approx": len(re.findall(r"\.approx\b", body)), "atomics": len(re.findall(r"\b(atom|red)\.", body)),
        }
    return out


def analyse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v: 'Compiling entry function 'X'' ... 'N bytes stack frame, S bytes spill stores, L bytes spill loads'
    ... 'Used R registers'."""
    out: dict[str, dict] = {}
    name = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            out[name] = {}
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[name].update(stack=int(m.group(1)), spills=int(m.group(2)) + int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[name]["regs"] = int(m.group(1))
    return out


def analyse_sass(sass: str) -> dict[str, dict]:
    out = {}
    for name, body in _entries(sass, re.compile(r"Function\s*:\s*(\w+)")).items():
        blocks = re.split(r"^\s*\.L_x_\w+:", body, flags=re.M)
        out[name] = {"ldg128": len(re.findall(r"\bLDG\.E[\w.]*\.128\b", body)),
                     "stg128": len(re.findall(r"\bSTG\.E[\w.]*\.128\b", body)),
                     "sass_ahead": _ahead(blocks, _parse_sass),
                     "ldl_stl": len(re.findall(r"\b(LDL|STL)\b", body))}
    return out


def compile_one(nvcc: str, toolkit: str, cu: Path, work: Path, cuobjdump: str | None) -> dict[str, dict]:
    ptx, cubin = work / f"{cu.stem}.ptx", work / f"{cu.stem}.cubin"
    subprocess.run([nvcc, *NVCC_FLAGS, f"-arch={ARCH}", "-I", str(REPO / "csrc"), "-ptx", str(cu), "-o", str(ptx)],
                   check=True, capture_output=True, text=True)
    ptxas = subprocess.run([str(Path(toolkit, "bin", "ptxas")), f"-arch={ARCH}", "-O3", "-v", str(ptx), "-o",
                            str(cubin)], check=True, capture_output=True, text=True)
    kernels = analyse_ptx(ptx.read_text())
    for name, info in analyse_ptxas(ptxas.stdout + ptxas.stderr).items():
        kernels.setdefault(name, {}).update(info)
    if cuobjdump:
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
        for name, info in analyse_sass(sass).items():
            kernels.setdefault(name, {}).update(info)
    return {name: {"file": cu.name, **info} for name, info in kernels.items()}


def check_all(cache_root: Path | None = None) -> dict[str, dict] | None:
    """Kernel (mangled name) -> facts, for every kernel of csrc/cuda/*.cu; None when no nvcc/toolkit is found."""
    found = find_nvcc()
    if found is None:
        return None
    nvcc, toolkit = found
    cuobjdump = find_cuobjdump(toolkit)
    sources = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
    inputs = sources + sorted((REPO / "csrc" / "cuda").glob("*.h")) + sorted((REPO / "csrc" / "cuda").glob("*.cuh"))
    inputs += sorted((REPO / "csrc" / "shared").glob("*.h"))
    digest = hashlib.sha256(" ".join([*NVCC_FLAGS, ARCH, str(cuobjdump)]).encode())
    digest.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    digest.update(Path(__file__).read_bytes())
    for path in inputs:
        digest.update(path.read_bytes())
    root = cache_root or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "sam_fused", "cuda_static")
    result = root / digest.hexdigest()[:16] / "kernels.json"
    if result.is_file():
        return json.loads(result.read_text())
    work = result.parent
    work.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        parts = pool.map(lambda cu: compile_one(nvcc, toolkit, cu, work, cuobjdump), sources)
        kernels = {k: v for part in parts for k, v in part.items()}
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(kernels, indent=1, sort_keys=True))
    tmp.replace(result)
    return kernels


def main() -> int:
    kernels = check_all()
    if kernels is None:
        print("no nvcc / CUDA toolkit found")
        return 0
    cols = ["ldv4", "stv4", "ahead", "ldg128", "stg128", "sass_ahead", "params", "regs", "spills", "stack", "local",
            "ldl_stl", "fma32", "approx", "atomics"]
    demangle = shutil.which("c++filt")
    names = list(kernels)
    pretty = (subprocess.run([demangle], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
              if demangle else names)
    print(f"{'kernel':60s} " + " ".join(f"{c:>7s}" for c in cols))
    for name, shown in sorted(zip(names, pretty), key=lambda p: p[1]):
        shown = re.sub(r"\(.*", "", shown.replace("sam_fused::cuda::(anonymous namespace)::", "")).replace("void ", "")
        print(f"{shown[:60]:60s} " + " ".join(f"{kernels[name].get(c, '-')!s:>7s}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
