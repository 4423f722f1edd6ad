"""The demo (python -m sam_fused.demo --quick, as CI runs it) produces its table and its plot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from sam_fused.demo import METHODS, flip_labels

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_writes_table_and_plot(tmp_path: Path) -> None:
    plot, table = tmp_path / "acc.png", tmp_path / "table.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "sam_fused.demo", "--quick", "--plot", str(plot), "--table", str(table)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SMOKE TEST" in proc.stdout and "too short to compare" in proc.stdout  # no accuracy claims from 3 epochs
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == list(METHODS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        acc, spread = (float(v) for v in re.match(r"([\d.]+) ± ([\d.]+)", cells[1]).groups())
        assert 0 <= acc <= 100 and spread == 0  # one seed in quick mode
        assert all(float(c) > 0 for c in cells[2:6])  # train loss, lambda_max, trace, m-sharpness
        assert cells[6].endswith("x")
    assert table.read_text().strip() == "\n".join(
        line for line in proc.stdout.splitlines() if line.startswith("|")).strip()


def test_symmetric_label_noise_flips_the_requested_fraction() -> None:
    labels = torch.arange(1000) % 10
    noisy = flip_labels(labels, 0.2, seed=0)
    assert int((noisy != labels).sum()) == 200  # every chosen label moves to another class
    assert noisy.min() >= 0 and noisy.max() <= 9
    assert torch.equal(flip_labels(labels, 0.2, seed=0), noisy)  # seeded
    assert torch.equal(flip_labels(labels, 0.0, seed=0), labels)


def test_demo_without_its_extra_says_what_to_install() -> None:
    code = ("import sys\nsys.modules['sklearn'] = sys.modules['tqdm'] = None  # as if not installed\n"
            "import sam_fused.demo\nsys.exit(sam_fused.demo.main(['--quick']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the demo needs tqdm, scikit-learn: pip install 'sam_fused[demo]'" in proc.stderr
    assert "Traceback" not in proc.stderr
