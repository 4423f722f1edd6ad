"""scripts/gpu_check.sh, the project's GPU check, as far as a machine without a GPU can check it.

The script's GPU stages cannot run here; these tests check that it parses, that its dry run (every stage that needs no
GPU, on the CPU) passes end to end and reports the GPU stages as SKIP, never PASS, and that the summarizer turns
bench JSON into the table for bench/RESULTS.md. The dry run reuses the CPU extension already built for this checkout
(REUSE_EXTENSIONS_FROM) instead of compiling it again: about 40-60 s on 2 cores instead of 3-4 minutes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
SUMMARIZE = ROOT / "scripts" / "gpu" / "summarize.py"
GPU_STAGES = ["static", "bench", "graphs", "tests_cuda", "tests_triton"]
CPU_STAGES = ["env", "build", "edge_parity", "edge_large", "graphs_eager", "summarize"]


def test_script_parses() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    r = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_python_parts_compile() -> None:
    for path in sorted((ROOT / "scripts" / "gpu").glob("*.py")):
        compile(path.read_text(), str(path), "exec")


def _stage_rows(summary: str) -> dict[str, tuple[str, str]]:
    """stage -> (status, ran on) from the summary's stage table."""
    rows, inside = {}, False
    for line in summary.splitlines():
        if line.startswith("== stages"):
            inside = True
            continue
        if inside:
            if not line.strip() or line.startswith("=="):
                break
            parts = line.split()
            if parts[0] != "stage" and len(parts) >= 4:
                rows[parts[0]] = (parts[1], parts[3])
    return rows


def _built_cpu_extension() -> str | None:
    so = glob.glob(str(ROOT / "sam_fused" / "_C_cpu*.so"))
    return str(ROOT / "sam_fused") if so else None


def test_dry_run(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    prebuilt = _built_cpu_extension()
    if prebuilt is None:
        pytest.skip("the CPU extension is not built in this checkout (scripts/test.sh builds it)")
    env = dict(os.environ, DRY_RUN="1", WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"), PY=sys.executable,
               REUSE_EXTENSIONS_FROM=prebuilt, BUDGET_S="600")
    env.pop("TRITON_INTERPRET", None)  # set by conftest for this process; the script's Python needs no Triton
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    summary_file = tmp_path / "out" / "summary.txt"
    assert summary_file.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    summary = summary_file.read_text()
    assert r.returncode == 0, summary
    assert (tmp_path / "out" / "logs.tar.gz").exists()
    assert "DRY RUN on the CPU: no stage ran on a GPU" in summary
    rows = _stage_rows(summary)
    for stage in GPU_STAGES:
        assert rows.get(stage, ("missing",))[0] == "SKIP", (stage, summary)
    for stage in CPU_STAGES:
        assert rows.get(stage) == ("PASS", "cpu") or (stage == "build" and rows.get(stage) == ("INFO", "cpu")), \
            (stage, summary)
    assert "ran on the GPU: \n" in summary  # nothing
    assert not any(ran_on == "gpu" for _, ran_on in rows.values())
    checks = json.loads((tmp_path / "work" / "logs" / "checks_graphs.json").read_text())
    assert {c["status"] for c in checks if c["check"].startswith("graph ")} == {"SKIP"}
    assert {c["status"] for c in checks if c["check"].startswith("eager ")} == {"PASS"}


def _bench_json(path: Path) -> None:
    rows = []
    for profile in ("resnet50", "many_small"):
        for backend, ms in (("cuda", 0.2), ("triton", 0.25), ("loop", 2.0), ("foreach", 0.8), ("torch", 0.9)):
            rows.append({"profile": profile, "op": "step", "backend": backend, "median_ms": ms, "gbps": 3000.0,
                         "x_roofline": 1.1, "speedup_vs_loop": 2.0 / ms, "speedup_vs_foreach": 0.8 / ms})
    rep = {"machine": {"device_name": "NVIDIA H200", "torch": "2.11.0+cu130", "copy_bandwidth_gbps": 4300.0,
                       "copy_bandwidth_start_gbps": 4250.0, "copy_bandwidth_end_gbps": 4300.0},
           "settings": {"device": "cuda", "dtype": "float32", "adaptive": False, "repeat": 5, "warmup": 2},
           "profiles": {"resnet50": {"tensors": 161, "params": 25557032},
                        "many_small": {"tensors": 2000, "params": 4096000}},
           "skipped": {}, "failures": [], "rows": rows}
    path.write_text(json.dumps(rep))


def test_summarizer_results_table(tmp_path: Path) -> None:
    _bench_json(tmp_path / "bench_fp32.json")
    graphs = [{"group": "graphs", "check": f"graph {b} first_step+restore SAM fp32", "status": "PASS", "secs": 1.0,
               "detail": ""} for b in ("cuda", "triton")]
    (tmp_path / "checks_graphs.json").write_text(json.dumps(graphs))
    rows = tmp_path / "rows.txt"
    rows.write_text("bench\tPASS\t90\tgpu\tbench fp32 rc 0\n")
    r = subprocess.run([sys.executable, str(SUMMARIZE), str(tmp_path), str(rows)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "copy bandwidth (`copy_`, best of start/end): 4300 GB/s" in out
    assert "| ResNet-50 (161 tensors, 25.6 M) | `cuda` | 0.200 | 3000 | 1.10 | 10.00x | 4.00x |" in out
    assert "| many small (2000 tensors, 4.1 M) | `triton` |" in out
    assert "bit-identical to eager: `cuda` 1/1, `triton` 1/1 cases" in out
    assert "bench         PASS       90 gpu" in out
