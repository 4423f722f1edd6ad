"""The docs hold: README's quick-start loops run and agree, and every reference to docs/DESIGN.md resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"


def _quick_start_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _run_block(code: str, seed: int) -> torch.nn.Module:
    """Run a README loop on a small BatchNorm model (so running_stats_disabled matters) for 20 steps."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    loader = [(torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(20)]
    exec(code, {"model": model, "loader": loader, "loss_fn": torch.nn.functional.cross_entropy})
    return model


def test_readme_quick_start_loops_agree() -> None:
    """The explicit two-step loop and the closure loop of the README give the same weights and BatchNorm statistics
    (without the closure loop's zero_grad() the second gradient leaks into the next step and they differ)."""
    explicit, closure = _quick_start_blocks()[:2]
    assert "opt.zero_grad()" in closure and "running_stats_disabled" in closure
    setup = explicit.split("for x, y in loader:")[0]  # the imports and the optimizer
    a = _run_block(explicit, seed=0)
    b = _run_block(setup + closure, seed=0)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def _design_references() -> list[tuple[str, str]]:
    """(file:line, cited section) for every "docs/DESIGN.md section(s) ..." in the tracked files."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    refs = []
    for name in files:
        path = ROOT / name
        if not path.is_file() or path.suffix not in {".py", ".md", ".sh", ".h", ".cpp", ".cu", ".cuh", ".toml"}:
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in re.finditer(r"DESIGN\.md sections? (\d+(?:\.\d+)?(?:\s*(?:,|-|and)\s*\d+(?:\.\d+)?)*)", line):
                for part in re.split(r",|\band\b", m.group(1)):
                    lo, _, hi = part.strip().partition("-")
                    numbers = [lo] if not hi else [str(n) for n in range(int(lo), int(hi) + 1)]
                    refs += [(f"{name}:{lineno}", n) for n in numbers]
    return refs


def test_every_design_reference_resolves() -> None:
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", DESIGN.read_text(), flags=re.M))
    refs = _design_references()
    assert len(refs) > 30  # the code cites the design throughout
    missing = [(where, n) for where, n in refs if n not in headings]
    assert not missing, f"cited sections missing from docs/DESIGN.md: {missing}"


def test_no_reference_to_a_design_file_outside_the_repo() -> None:
    files = subprocess.run(["git", "grep", "-n", "-I", "DESIGN"], cwd=ROOT, capture_output=True, text=True).stdout
    stray = [line for line in files.splitlines()
             if not line.startswith(("docs/DESIGN.md:", "tests/test_docs.py:"))
             and re.search(r"(?<!docs/)DESIGN(?!\.md section|\.md\b)|(?<!docs/)DESIGN\.md", line)]
    assert not stray, stray


def test_recipes_name_files_that_exist() -> None:
    """docs/RECIPES.md tells a newcomer which files a change touches: every path it names must exist."""
    text = (ROOT / "docs" / "RECIPES.md").read_text()
    paths = set(re.findall(r"`((?:sam_fused|csrc|kernels|tests|bench|docs)/[\w./]+\.(?:py|h|cpp|cu|md))`", text))
    assert len(paths) > 20
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"docs/RECIPES.md names files that do not exist: {missing}"
