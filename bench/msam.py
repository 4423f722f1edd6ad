"""mSAM step time relative to a SAM step: the exact fast path (sam_fused.msam_fast) vs the sequential one.

    python -m sam_fused.bench.msam [--repeats 7] [--ks 2 4 8 16 32] [--models mlp transformer] [--threads N]

For each model: one SAM step (first_step / second_step on the whole batch) is the unit; every mSAM variant is timed
in the same run, interleaved with the SAM step (these machines are noisy; each timed call follows an untimed call of
the same variant), and the table reports medians, the ratio to SAM's median and the ratio of the best samples.
Models: a 784-1024-1024-10 MLP with batch 256 (cross-entropy), and a small transformer (2 pre-norm blocks, d=128,
4 heads, sequence 32, vocabulary 256, batch 64, token cross-entropy).
This is a benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import sam_fused

from . import timing


class Block(nn.Module):
    """Pre-norm transformer block: causal attention from nn.Linear q/k/v/o + a 4x MLP, each with a residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (lin(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, heads, t, d/heads]
        return self.o(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 128, heads: int = 4, seq: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(blocks)))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device).expand(b, t))
        return self.head(self.ln_f(self.blocks(x)))


def token_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        return model, torch.randn(256, 784), torch.randint(0, 10, (256,)), F.cross_entropy
    if name == "transformer":
        idx = torch.randint(0, 256, (64, 33))
        return Transformer(), idx[:, :-1], idx[:, 1:], token_cross_entropy
    raise ValueError(f"unknown model {name!r} (mlp, transformer)")


def sam_step(opt: sam_fused.SAM, model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> None:
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each function, timed round-robin so that load changes hit all of them alike.

    Each timed call follows an untimed call of the same function, as in a training loop that repeats one kind of
    step: right after a different kind of step, the allocator's cache holds other block sizes and the first call
    pays for fresh pages (about 0.1 of a step here, whichever variant comes second).
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def summarize_plan(layers: dict[str, str]) -> str:
    """"linear low-rank x5, embedding sparse rows x2, ..." from msam_step's per-layer report."""
    counts: dict[str, int] = {}
    for mode in layers.values():
        counts[mode] = counts.get(mode, 0) + 1
    return ", ".join(f"{mode} x{n}" for mode, n in counts.items())


def bench_model(name: str, ks: list[int], repeats: int) -> list[dict]:
    model, x, y, loss_fn = make_case(name)
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=1e-4, momentum=0.9)
    rows = []
    for k in ks:
        fns = {
            "sam": lambda: sam_step(opt, model, loss_fn, x, y),
            "fast": lambda k=k: opt.msam_step(model, loss_fn, x, y, micro_batches=k, method="fast"),
            "sequential": lambda k=k: opt.msam_step(model, loss_fn, x, y, micro_batches=k, method="sequential"),
        }
        samples = interleaved_times(fns, repeats)
        ms = {key: statistics.median(v) for key, v in samples.items()}
        best = {f"{key}_min": min(v) for key, v in samples.items()}
        opt.msam_step(model, loss_fn, x, y, micro_batches=k, method="fast")
        plan = summarize_plan(opt.last_msam_info["layers"])
        rows.append({"model": name, "k": k, **ms, **best, "plan": plan})
        print(f"  {name} k={k}: SAM {ms['sam']:.1f} ms, fast {ms['fast']:.1f} ms ({ms['fast'] / ms['sam']:.2f}x), "
              f"sequential {ms['sequential']:.1f} ms ({ms['sequential'] / ms['sam']:.2f}x)", flush=True)
    return rows


def load_average() -> str:
    """The 1/5/15-minute load averages: a shared machine's benchmark means little without them."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def table(rows: list[dict]) -> str:
    """Medians, their ratios to SAM's median, and (in brackets) the ratio of the best samples, less load-sensitive."""
    head = ("| model | k | SAM step (ms) | fast mSAM (ms) | fast / SAM [best] | sequential mSAM (ms) | "
            "sequential / SAM [best] | fast path: linear layers |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        linear = ", ".join(part for part in r["plan"].split(", ") if part.startswith("linear"))
        fast, seq = r["fast"] / r["sam"], r["sequential"] / r["sam"]
        fast_best, seq_best = r["fast_min"] / r["sam_min"], r["sequential_min"] / r["sam_min"]
        lines.append(f"| {r['model']} | {r['k']} | {r['sam']:.1f} | {r['fast']:.1f} | {fast:.2f} [{fast_best:.2f}] | "
                     f"{r['sequential']:.1f} | {seq:.2f} [{seq_best:.2f}] | {linear} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sam_fused.bench.msam", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"],
                        help="models to time (default: both)")
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8, 16, 32],
                        help="numbers of micro-batches k (default 2 4 8 16 32)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed repeats (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = timing.device_name(torch.device("cpu"))
    print(f"mSAM vs SAM step time: {cpu} ({platform.machine()}, {os.cpu_count()} CPUs), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats} interleaved "
          f"repeats, load average before: {load_average()}", flush=True)
    rows = [row for name in args.models for row in bench_model(name, args.ks, args.repeats)]
    print()
    print(table(rows))
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
