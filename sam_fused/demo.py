"""Demo: SGD vs SAM, ASAM, mSAM and F-SAM on noisy-label digits, with sharpness diagnostics.

    python -m sam_fused.demo            # default budget: a few minutes on 2 CPU cores
    python -m sam_fused.demo --quick    # smoke test: tiny budget, 1 seed (what CI runs); compares nothing

A small CNN learns scikit-learn's bundled 8x8 digits (1797 images, no download) after a fraction of the training
labels (default 20%) has been replaced by a different class drawn uniformly (symmetric label noise). Memorizing the
wrong labels costs clean test accuracy, which is where sharpness-aware training is expected to help. Every method
gets the same seeds (initial weights, noisy labels, batch order), the same base optimizer (SGD with momentum, cosine
learning rate) and the same number of steps. At the end, for each method: clean test accuracy (mean +- std over
seeds), the final training loss (on the noisy labels), lambda_max and trace of the Hessian and the m-sharpness of
the training loss (sam_fused.diagnostics, on a fixed subset of the training set), and the wall time per step
relative to SGD. A PNG plot shows test accuracy per epoch.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sam_fused
from sam_fused import diagnostics

METHODS = ("SGD", "SAM", "ASAM", "mSAM", "F-SAM")


# -- data ------------------------------------------------------------------------------------------------------------


@dataclass
class Digits:
    x_train: torch.Tensor  # [n_train, 1, 8, 8], in [0, 1]
    y_train: torch.Tensor  # [n_train], with label noise
    y_train_clean: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor  # clean


def load_digits(seed: int, noise: float, test_size: int = 500) -> Digits:
    """The bundled digits, split (stratified) by `seed`, with round(noise * n_train) training labels flipped."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    images, labels = sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=test_size, random_state=seed, stratify=labels)
    as_images = lambda a: torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0  # noqa: E731
    y_clean = torch.tensor(y_tr, dtype=torch.long)
    return Digits(as_images(x_tr), flip_labels(y_clean, noise, seed), y_clean, as_images(x_te),
                  torch.tensor(y_te, dtype=torch.long))


def flip_labels(labels: torch.Tensor, noise: float, seed: int, num_classes: int = 10) -> torch.Tensor:
    """Symmetric label noise: exactly round(noise * n) labels, chosen at random, move to another class."""
    gen = torch.Generator().manual_seed(seed + 10_000)
    noisy = labels.clone()
    chosen = torch.randperm(len(labels), generator=gen)[: round(noise * len(labels))]
    shift = torch.randint(1, num_classes, (len(chosen),), generator=gen)  # never 0: the class always changes
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    return noisy


# -- model and optimizers --------------------------------------------------------------------------------------------


def make_cnn() -> nn.Module:
    """About 38k parameters; no BatchNorm or dropout, so every method sees the same deterministic function."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 32, 4, 4]
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


@dataclass
class Config:
    epochs: int = 40
    seeds: int = 3
    noise: float = 0.2
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 0.1  # SAM, mSAM, F-SAM
    asam_rho: float = 1.0  # ASAM's rho is on a different scale (T = |w| shrinks the perturbation)
    micro_batches: int = 4  # mSAM's k (the number of micro-batches)
    fsam_sigma: float = 1.0
    fsam_lmbda: float = 0.6
    diag_examples: int = 512  # training examples the diagnostics are measured on
    diag_micro_batch_size: int = 16  # m-sharpness micro-batch SIZE
    diag_rho: float = 0.05
    lanczos_iters: int = 30
    trace_samples: int = 50
    methods: tuple[str, ...] = METHODS


def make_optimizer(method: str, model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    base = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    params = model.parameters()
    if method == "SGD":
        return torch.optim.SGD(params, **base)
    if method in ("SAM", "mSAM"):
        return sam_fused.SAM(params, torch.optim.SGD, rho=cfg.rho, **base)
    if method == "ASAM":
        return sam_fused.SAM(params, torch.optim.SGD, rho=cfg.asam_rho, adaptive=True, **base)
    if method == "F-SAM":
        return sam_fused.FriendlySAM(params, torch.optim.SGD, rho=cfg.rho, sigma=cfg.fsam_sigma,
                                     lmbda=cfg.fsam_lmbda, **base)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def train_step(method: str, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               k: int) -> float:
    """One optimizer step; returns the (unperturbed) mini-batch loss."""
    if method == "mSAM":
        return float(opt.msam_step(model, F.cross_entropy, x, y, micro_batches=k))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if method == "SGD":
        opt.step()
    else:
        opt.first_step(zero_grad=True)
        with sam_fused.running_stats_disabled(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# -- one run ---------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    test_acc: list[float] = field(default_factory=list)  # clean test accuracy after each epoch
    train_loss: float = math.nan  # mean loss over the last epoch (noisy labels)
    seconds_per_step: float = math.nan  # median wall time of one training step
    lambda_max: float = math.nan
    trace: float = math.nan
    m_sharpness: float = math.nan


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def train(method: str, seed: int, data: Digits, cfg: Config, tick: Callable[[], None]) -> RunResult:
    torch.manual_seed(seed)  # same initial weights for every method
    model = make_cnn()
    opt = make_optimizer(method, model, cfg)
    n = len(data.y_train)
    steps_per_epoch = n // cfg.batch_size  # drop the last partial batch: mSAM's k must divide the batch
    # On the base optimizer (same param_groups): its step() is the one every method calls, msam_step included.
    base = getattr(opt, "base_optimizer", opt)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, cfg.epochs * steps_per_epoch)
    order_gen = torch.Generator().manual_seed(seed)  # same batch order for every method
    result, step_seconds = RunResult(), []
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=order_gen)
        losses = []
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            start = time.perf_counter()
            losses.append(train_step(method, model, opt, data.x_train[idx], data.y_train[idx], cfg.micro_batches))
            sched.step()
            step_seconds.append(time.perf_counter() - start)
        model.eval()
        result.test_acc.append(accuracy(model, data.x_test, data.y_test))
        result.train_loss = sum(losses) / len(losses)
        tick()
    # The median: the machine may be shared, and a burst of someone else's work should not count as this step's.
    result.seconds_per_step = float(torch.tensor(step_seconds).median())
    measure_sharpness(model, data, cfg, result)
    return result


def measure_sharpness(model: nn.Module, data: Digits, cfg: Config, result: RunResult) -> None:
    """lambda_max, tr(H) and m-sharpness of the training loss (noisy labels) on the first diag_examples examples."""
    model.eval()
    x, y = data.x_train[: cfg.diag_examples], data.y_train[: cfg.diag_examples]
    top = diagnostics.hessian_eigenvalues(model, F.cross_entropy, x, y, k=1, max_iter=cfg.lanczos_iters, tol=1e-3)
    trace = diagnostics.hessian_trace(model, F.cross_entropy, x, y, max_samples=cfg.trace_samples,
                                      min_samples=min(10, cfg.trace_samples), rtol=0.02)
    sharp = diagnostics.m_sharpness(model, F.cross_entropy, x, y, rho=cfg.diag_rho,
                                    micro_batch_size=cfg.diag_micro_batch_size, ascent_steps=3)
    result.lambda_max, result.trace, result.m_sharpness = top.eigenvalues[0], trace.trace, sharp.value


# -- report ----------------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(values) > 1 else 0.0)


def _column_mean(runs: list[RunResult]) -> Callable[[str], float]:
    return lambda attr: mean_std([getattr(r, attr) for r in runs])[0]


def table(results: dict[str, list[RunResult]], cfg: Config) -> str:
    sgd_time = mean_std([r.seconds_per_step for r in results["SGD"]])[0] if "SGD" in results else math.nan
    header = (f"| method | clean test acc % (mean ± std, {cfg.seeds} seed{'s' * (cfg.seeds > 1)}) | final train loss | "
              "λ_max(H) | tr(H) | m-sharpness | time/step vs SGD |")
    lines = [header, "|" + "---|" * 7]
    for method, runs in results.items():
        acc_mean, acc_std = mean_std([100 * r.test_acc[-1] for r in runs])
        col = _column_mean(runs)
        lines.append(f"| {method} | {acc_mean:.2f} ± {acc_std:.2f} | {col('train_loss'):.4f} | "
                     f"{col('lambda_max'):.3f} | {col('trace'):.2f} | {col('m_sharpness'):.4f} | "
                     f"{col('seconds_per_step') / sgd_time:.2f}x |")
    return "\n".join(lines)


def plot(results: dict[str, list[RunResult]], cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    epochs = torch.arange(1, cfg.epochs + 1)
    for method, runs in results.items():
        acc = 100 * torch.tensor([r.test_acc for r in runs])  # [seeds, epochs]
        mean = acc.mean(0)
        ax.plot(epochs, mean, label=method)
        if len(runs) > 1:
            std = acc.std(0)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title(f"digits, {100 * cfg.noise:.0f}% symmetric label noise, mean ± std over {cfg.seeds} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


QUICK_CAVEAT = (
    "SMOKE TEST (--quick: {epochs} epochs, {seeds} seed): this checks that every method, the diagnostics and the plot "
    "run; it is far too short to compare them (SAM-family methods trail SGD early in training). For the comparison "
    "run `python -m sam_fused.demo` ({full_epochs} epochs x {full_seeds} seeds; README.md shows a measured table).")


# -- command line ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    defaults = Config()
    p = argparse.ArgumentParser(prog="python -m sam_fused.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test (CI): 3 epochs, 1 seed, small diagnostics; too short to compare methods")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {defaults.epochs})")
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per method (default {defaults.seeds})")
    p.add_argument("--noise", type=float, default=defaults.noise, help="fraction of training labels flipped")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--rho", type=float, default=defaults.rho, help="rho of SAM, mSAM and F-SAM")
    p.add_argument("--asam-rho", type=float, default=defaults.asam_rho)
    p.add_argument("--micro-batches", type=int, default=defaults.micro_batches, help="mSAM's k (a number)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--plot", type=Path, default=Path("sam_fused_demo.png"), help="where to save the PNG plot")
    p.add_argument("--table", type=Path, default=None, help="also write the table (markdown) to this file")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: this model is too small to gain from more, and on a shared "
                        "machine a second thread that waits for a busy core makes every step slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    cfg = Config(noise=args.noise, batch_size=args.batch_size, lr=args.lr, rho=args.rho, asam_rho=args.asam_rho,
                 micro_batches=args.micro_batches, methods=methods)
    if args.quick:
        cfg.epochs, cfg.seeds = 3, 1
        cfg.diag_examples, cfg.lanczos_iters, cfg.trace_samples = 128, 10, 10
    cfg.epochs = args.epochs or cfg.epochs
    cfg.seeds = args.seeds or cfg.seeds
    if cfg.batch_size % cfg.micro_batches:
        p.error(f"--micro-batches {cfg.micro_batches} must divide --batch-size {cfg.batch_size}")
    return cfg, args


DEMO_DEPS = {"tqdm": "tqdm", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}  # module: package


def missing_deps() -> list[str]:
    """The packages of the [demo] extra that are not installed."""
    missing = []
    for module, package in DEMO_DEPS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # a module set to None in sys.modules
            found = False
        if not found:
            missing.append(package)
    return missing


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    missing = missing_deps()
    if missing:
        print(f"python -m sam_fused.demo: error: the demo needs {', '.join(missing)}: "
              "pip install 'sam_fused[demo]' (or pip install " + " ".join(missing) + ")", file=sys.stderr)
        return 2
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    results: dict[str, list[RunResult]] = {m: [] for m in cfg.methods}
    datasets = [load_digits(seed, cfg.noise) for seed in range(cfg.seeds)]
    bar = tqdm(total=len(cfg.methods) * cfg.seeds * cfg.epochs, unit="epoch", disable=args.no_progress,
               file=sys.stderr)
    for seed, data in enumerate(datasets):
        for method in cfg.methods:
            bar.set_description(f"{method} seed {seed}")
            results[method].append(train(method, seed, data, cfg, lambda: bar.update(1)))
    bar.close()
    text = table(results, cfg)
    n_train = len(datasets[0].y_train)
    print(f"digits: {n_train} train ({cfg.noise:.0%} labels flipped) / {len(datasets[0].y_test)} clean test, "
          f"{cfg.epochs} epochs x {n_train // cfg.batch_size} steps of batch {cfg.batch_size}, lr {cfg.lr} cosine, "
          f"rho {cfg.rho} (ASAM {cfg.asam_rho}), mSAM k={cfg.micro_batches}; diagnostics on {cfg.diag_examples} "
          f"training examples (m-sharpness: micro-batch size {cfg.diag_micro_batch_size}, rho {cfg.diag_rho})")
    if args.quick:
        full = Config()
        print(QUICK_CAVEAT.format(epochs=cfg.epochs, seeds=cfg.seeds, full_epochs=full.epochs, full_seeds=full.seeds))
    print(text)
    plot(results, cfg, args.plot)
    print(f"plot: {args.plot}")
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
