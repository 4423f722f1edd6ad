"""The exact fast mSAM path (sam_fused.msam_fast) against the sequential reference (sam_fused.msam).

Equal within 1e-5 relative (fp32) for an MLP and a small transformer (token + position embeddings, attention from
nn.Linear q/k/v/o, softmax, MLP, LayerNorm, RMSNorm), k in {1, 2, 4, 8}, SAM / ASAM (eta 0 and 0.01) / unnormalized
SAM, both forms of the perturbed linear layers, over several SGD-momentum steps (errors would accumulate). Plus:
k=1 is a plain SAM step, and models outside the fast path fall back ("auto") or raise ("fast").
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sam_fused
from sam_fused.msam_fast import FastPathUnsupported, fast_path_support, msam_fast

STEPS, LR, MOMENTUM, RTOL = 3, 0.1, 0.9, 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread avoids OpenMP hand-offs that dominate here (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Attention(nn.Module):
    """Causal self-attention from four nn.Linear layers and functional softmax/matmul."""

    def __init__(self, d: int, heads: int, seq: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.register_buffer("causal", torch.ones(seq, seq).tril().bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (lin(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) / (d // self.heads) ** 0.5  # [b, heads, t, t]
        att = att.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 16, heads: int = 2, seq: int = 8) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d, padding_idx=0), nn.Embedding(seq, d)
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, heads, seq), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.ln_f, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t).expand(b, t))  # positions per example: batch along dim 0
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(self.ln_f(x))


def token_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def mlp_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(inplace=True), nn.LayerNorm(12), nn.Linear(12, 12), nn.Tanh(),
                          nn.Linear(12, 3))
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen), F.cross_entropy


def transformer_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, object]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (16, 8), generator=gen)  # repeated tokens (and padding id 0) inside micro-batches
    return TinyTransformer(), x, torch.randint(0, 11, (16, 8), generator=gen), token_ce


CASES = {"mlp": mlp_case, "transformer": transformer_case}
VARIANTS = {  # name: (SAM keyword arguments, linear_mode of the fast path)
    "sam-low-rank": ({}, "low_rank"),
    "sam-materialized": ({}, "materialized"),
    "asam-eta0": ({"adaptive": True, "rho": 0.5}, "auto"),
    "asam-eta0.01": ({"adaptive": True, "eta": 0.01, "rho": 0.5}, "auto"),
    "unnormalized": ({"normalize": False}, "low_rank"),
}


def run(model: nn.Module, x, y, loss_fn, k: int, fast: bool, linear_mode: str = "auto", steps: int = STEPS,
        **sam_kwargs) -> tuple[nn.Module, list[list[torch.Tensor]], list[torch.Tensor]]:
    """`steps` mSAM steps on a copy of `model`: (model, .grad (= G) of every step, losses)."""
    model = copy.deepcopy(model)
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, **sam_kwargs)
    grads, losses = [], []
    for _ in range(steps):
        if fast:
            losses.append(msam_fast(opt, model, loss_fn, x, y, k, linear_mode=linear_mode))
        else:
            losses.append(opt.msam_step(model, loss_fn, x, y, micro_batches=k, method="sequential"))
        grads.append([p.grad.clone() for p in model.parameters()])
        assert not opt.is_perturbed
    return model, grads, losses


def assert_rel_close(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL,
                     scale: float = 0.0) -> None:
    """||got - expected|| <= rtol * max(||expected||, scale): relative in the L2 norm of the tensor, or of `scale`
    for tensors that are ~0 in exact arithmetic (attention's key bias has a zero gradient: softmax ignores it)."""
    err = (got - expected).norm() / max(expected.norm().item(), scale, 1e-30)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def assert_runs_close(a: tuple, b: tuple) -> None:
    (ma, ga, la), (mb, gb, lb) = a, b
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), rtol=RTOL, atol=0.0)
    names = [n for n, _ in mb.named_parameters()]
    for step, (sa, sb) in enumerate(zip(ga, gb)):
        floor = 1e-3 * torch.cat([g.flatten() for g in sb]).norm().item()  # 1e-3 of the global norm of G
        for name, g1, g2 in zip(names, sa, sb):
            assert_rel_close(g1, g2, f"step {step} grad {name}", scale=floor)
    for (name, p1), p2 in zip(ma.named_parameters(), mb.parameters()):
        assert_rel_close(p1.detach(), p2.detach(), f"weights {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_matches_sequential(case: str, k: int, variant: str) -> None:
    model, x, y, loss_fn = CASES[case]()
    sam_kwargs, linear_mode = VARIANTS[variant]
    fast = run(model, x, y, loss_fn, k, True, linear_mode, **sam_kwargs)
    assert_runs_close(fast, run(model, x, y, loss_fn, k, False, **sam_kwargs))


def test_the_comparison_can_fail() -> None:
    """The tolerance discriminates: mSAM with k=4 is measurably not mSAM with k=2 (nor SGD)."""
    model, x, y, loss_fn = mlp_case()
    k4, k2 = run(model, x, y, loss_fn, 4, True), run(model, x, y, loss_fn, 2, False)
    sgd = run(model, x, y, loss_fn, 4, False, rho=0.0)
    for other in (k2, sgd):
        err = max(((p - q).norm() / q.norm()).item() for p, q in zip(k4[0].parameters(), other[0].parameters()))
        assert err > 100 * RTOL


@pytest.mark.parametrize("case", list(CASES))
def test_k1_is_a_plain_sam_step(case: str) -> None:
    model, x, y, loss_fn = CASES[case]()
    sam_model = copy.deepcopy(model)
    opt = sam_fused.SAM(sam_model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    grads, losses = [], []
    for _ in range(STEPS):
        loss = loss_fn(sam_model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        loss_fn(sam_model(x), y).backward()
        grads.append([p.grad.clone() for p in sam_model.parameters()])
        losses.append(loss.detach())
        opt.second_step(zero_grad=True)
    assert_runs_close(run(model, x, y, loss_fn, 1, True), (sam_model, grads, losses))


def test_param_groups_keep_their_own_settings() -> None:
    """Matrix weights: ASAM with eta=0.01 and rho=0.5; everything else: unnormalized SAM with rho=0.1."""
    model, x, y, loss_fn = transformer_case()

    def runner(fast: bool) -> nn.Module:
        m = copy.deepcopy(model)
        weights = [p for n, p in m.named_parameters() if n.endswith("weight") and p.dim() == 2]
        others = [p for p in m.parameters() if all(p is not w for w in weights)]
        opt = sam_fused.SAM([{"params": weights, "adaptive": True, "eta": 0.01, "rho": 0.5},
                             {"params": others, "rho": 0.1, "normalize": False}],
                            torch.optim.SGD, lr=LR, momentum=MOMENTUM)
        for _ in range(STEPS):
            opt.msam_step(m, loss_fn, x, y, micro_batches=4, method="fast" if fast else "sequential")
        return m

    for (name, p), q in zip(runner(True).named_parameters(), runner(False).parameters()):
        assert_rel_close(p.detach(), q.detach(), name)


def test_frozen_and_unoptimized_parameters() -> None:
    """A frozen weight is neither perturbed nor updated; a trainable parameter the optimizer does not hold gets .grad
    (at the perturbed points of the others) but no perturbation, as in the sequential path."""
    model, x, y, loss_fn = mlp_case()
    model[0].weight.requires_grad_(False)

    def runner(method: str) -> tuple[nn.Module, torch.Tensor]:
        m = copy.deepcopy(model)
        held = [p for n, p in m.named_parameters() if n != "5.bias"]
        opt = sam_fused.SAM(held, torch.optim.SGD, lr=LR, momentum=MOMENTUM)
        opt.msam_step(m, loss_fn, x, y, micro_batches=4, method=method)
        return m, m[5].bias.grad.clone()

    (fast, g_fast), (seq, g_seq) = runner("fast"), runner("sequential")
    assert_rel_close(g_fast, g_seq, "grad of the parameter outside the optimizer")
    assert fast[0].weight.grad is None and torch.equal(fast[0].weight, model[0].weight)
    for (name, p), q in zip(fast.named_parameters(), seq.parameters()):
        assert_rel_close(p.detach(), q.detach(), name)


class ReusedLinear(nn.Module):
    """One nn.Linear called twice per forward: its gradient sums over both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


@pytest.mark.parametrize("linear_mode", ["low_rank", "materialized"])
def test_module_called_twice(linear_mode: str) -> None:
    _, x, y, loss_fn = mlp_case()
    torch.manual_seed(0)
    model = ReusedLinear()
    assert_runs_close(run(model, x, y, loss_fn, 4, True, linear_mode), run(model, x, y, loss_fn, 4, False))


def test_loss_that_is_not_a_plain_mean() -> None:
    """loss_fn runs on each micro-batch's slice of the output, so a masked mean (ignore_index) stays exact."""
    model, x, y, _ = transformer_case()

    def masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=0)

    y = y.masked_fill(torch.arange(y.shape[0]).unsqueeze(1) % 3 == 0, 0)  # micro-batches with unequal token counts
    assert_runs_close(run(model, x, y, masked_ce, 4, True), run(model, x, y, masked_ce, 4, False))


def test_auto_picks_fast_and_reports_the_plan() -> None:
    model, x, y, loss_fn = transformer_case()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, adaptive=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.msam_step(model, loss_fn, x, y, micro_batches=4)
    info = opt.last_msam_info
    assert info["method"] == "fast"
    assert info["layers"]["attn.q"] == "linear materialized (ASAM)"
    assert info["layers"]["tok"] == "embedding sparse rows"
    assert info["layers"]["ln1"] == "layernorm elementwise copies"
    assert not torch.equal(model.fc1.weight, before["fc1.weight"])  # the base step ran
    opt.msam_step(model, loss_fn, x, y, micro_batches=1)
    assert opt.last_msam_info["method"] == "sequential"  # k=1 is SAM: already two passes


def test_weights_are_never_modified_by_the_fast_path() -> None:
    model, x, y, loss_fn = mlp_case()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    versions = [p._version for p in model.parameters()]
    msam_fast(opt, model, loss_fn, x, y, 4)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert [p._version for p in model.parameters()] == [v + 1 for v in versions]  # the base step's update only
    assert all("forward" not in vars(m) for m in model.modules())


# -- models outside the fast path ---------------------------------------------------------------------------------


def batchnorm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x.view(-1, 1, 4, 4))).flatten(1)[:, :16])


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # uses out.weight outside out's forward
        h = torch.tanh(self.inp(x))
        return self.out(h) + F.linear(h, self.out.weight)


class SequenceFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(6, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the Linear sees the batch along dim 1
        return self.out(self.inp(x.unsqueeze(0)).squeeze(0))


STATIC = {  # model -> a word of fast_path_support's reason
    "batchnorm": (batchnorm_model, "BatchNorm1d"),
    "conv2d": (lambda: (torch.manual_seed(0), ConvNet())[1], "Conv2d"),
    "dropout": (lambda: (torch.manual_seed(0), nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.1), nn.Linear(12, 3)))[1],
                "Dropout"),
    "tied": (lambda: (torch.manual_seed(0), _tied())[1], "shared"),
}
RUNTIME = {"functional-use": (TiedHead, "outside its module"), "batch-not-dim0": (SequenceFirst, "dim 0")}


def _tied() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    model[2].weight = model[0].weight
    return model


@pytest.mark.parametrize("name", list(STATIC) + list(RUNTIME))
def test_unsupported_models_fall_back_on_auto_and_raise_on_fast(name: str) -> None:
    make, word = STATIC[name] if name in STATIC else RUNTIME[name]
    if name in STATIC:
        supported, reason = fast_path_support(make())
        assert not supported and word in reason
    _, x, y, loss_fn = mlp_case()
    if name == "conv2d":
        x = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    model = make() if name in STATIC else (torch.manual_seed(0), make())[1]
    results = []
    for method in ("auto", "sequential"):
        m = copy.deepcopy(model)
        torch.manual_seed(3)  # same dropout masks in both runs
        opt = sam_fused.SAM(m.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM)
        for _ in range(2):
            opt.msam_step(m, loss_fn, x, y, micro_batches=4, method=method)
        assert opt.last_msam_info["method"] == "sequential"
        results.append(m)
    if name in RUNTIME:  # found during the first pass; "auto" recorded why it fell back
        assert word in _auto_reason(model, x, y, loss_fn)
    for p, q in zip(results[0].parameters(), results[1].parameters()):
        assert torch.equal(p, q)  # the fallback is the sequential path itself, untouched by the failed attempt
    m = copy.deepcopy(model)
    opt = sam_fused.SAM(m.parameters(), torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match=word):
        opt.msam_step(m, loss_fn, x, y, micro_batches=4, method="fast")
    assert all(p.grad is None for p in m.parameters())
    assert all("forward" not in vars(mod) for mod in m.modules())


def _auto_reason(model: nn.Module, x, y, loss_fn) -> str:
    m = copy.deepcopy(model)
    opt = sam_fused.SAM(m.parameters(), torch.optim.SGD, lr=LR)
    opt.msam_step(m, loss_fn, x, y, micro_batches=4)
    return opt.last_msam_info["reason"]


def test_asam_beyond_the_memory_cap_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sam_fused.msam_fast.MAX_MATERIALIZED_BYTES", 1024)
    model, x, y, loss_fn = mlp_case()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, adaptive=True)
    opt.msam_step(model, loss_fn, x, y, micro_batches=4)
    assert opt.last_msam_info["method"] == "sequential" and "MiB" in opt.last_msam_info["reason"]
    with pytest.raises(ValueError, match="MiB"):
        opt.msam_step(model, loss_fn, x, y, micro_batches=4, method="fast")


def test_invalid_method_and_split() -> None:
    model, x, y, loss_fn = mlp_case()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR)
    with pytest.raises(ValueError, match="method"):
        opt.msam_step(model, loss_fn, x, y, micro_batches=2, method="parallel")
    with pytest.raises(ValueError, match="does not divide"):
        opt.msam_step(model, loss_fn, x, y, micro_batches=3, method="fast")
    assert issubclass(FastPathUnsupported, ValueError)


# ---- auto never silently wrong: the fast path is proven on first use -------------------------------------------------


class Centered(nn.Module):
    """Parameter-free, but it mixes the examples of the batch: the fast path's module checks cannot see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0)


class SequenceFirst(nn.Module):
    """An nn.Linear fed [T, N, D] (sequence first): with T == N its dim 0 looks like the batch, but is not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, T, D]
        return self.out(torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1).mean(1))


def _mixing_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), Centered(), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("build, x", [(_mixing_mlp, torch.randn(8, 5)), (SequenceFirst, torch.randn(8, 8, 4))],
                         ids=["mixes-the-batch", "sequence-first-T==N"])
def test_auto_disproves_a_wrong_fast_path_and_stays_exact(build, x: torch.Tensor) -> None:
    torch.manual_seed(1)
    model = build()
    y = torch.randn(x.shape[0], 3 if isinstance(model, nn.Sequential) else 2)
    reference = copy.deepcopy(model)
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=LR, momentum=MOMENTUM)
    ref_opt = sam_fused.SAM(reference.parameters(), torch.optim.SGD, rho=0.5, lr=LR, momentum=MOMENTUM)
    assert fast_path_support(model)[0]  # the module checks pass: only running it can tell
    with pytest.warns(RuntimeWarning, match="fast path's gradient differs"):
        opt.msam_step(model, F.mse_loss, x, y, micro_batches=4)
    assert opt.last_msam_info["method"] == "sequential" and opt.last_msam_info["relative_difference"] > 1e-3
    ref_opt.msam_step(reference, F.mse_loss, x, y, micro_batches=4, method="sequential")
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)  # the step used the sequential gradient
    opt.msam_step(model, F.mse_loss, x, y, micro_batches=4)  # no second warning; sequential from now on
    assert opt.last_msam_info["method"] == "sequential" and "disagreed" in opt.last_msam_info["reason"]


def test_auto_proves_a_supported_model_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    import sam_fused.msam_fast as fast

    calls = []
    real = fast.msam_sequential
    monkeypatch.setattr(fast, "msam_sequential", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    opt.msam_step(model, F.mse_loss, x, y, micro_batches=4)
    assert opt.last_msam_info["method"] == "fast" and "proven on first use" in opt.last_msam_info["reason"]
    opt.msam_step(model, F.mse_loss, x, y, micro_batches=4)
    assert "proven" not in opt.last_msam_info["reason"] and len(calls) == 1  # proven once for these shapes
    opt.msam_step(model, F.mse_loss, x[:4], y[:4], micro_batches=4)  # new shapes: proven again
    assert len(calls) == 2


@pytest.mark.parametrize("method", ["auto", "fast", "sequential"])
def test_a_loss_that_is_not_a_scalar_is_refused(method: str) -> None:
    """reduction='none' made the fast path take a k-times larger step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="loss_fn must return a 0-dim tensor"):
        opt.msam_step(model, lambda out, t: F.mse_loss(out, t, reduction="none"), torch.randn(8, 5),
                      torch.randn(8, 3), micro_batches=4, method=method)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not opt.is_perturbed


def test_fp64_norm_overflow_takes_the_sequential_path() -> None:
    """An fp64 micro-batch norm above fp64's sum of squares: the fast path hands the step to the sequential one, whose
    rescale perturbs exactly (issue 13, item 2); the fast path used to skip the perturbation silently."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.full((4, 3), 1e200, dtype=torch.float64)  # the gradient of mean(w . x) is 1e200 per element
    y = torch.zeros(4, 1, dtype=torch.float64)

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (out - t).mean()

    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.0, backend="torch")
    w = model.weight.detach().clone()
    with pytest.raises(FastPathUnsupported, match="overflows fp64"):
        msam_fast(opt, model, loss_fn, x, y, 2)
    assert model.weight.grad is None and torch.equal(model.weight.detach(), w)  # nothing changed
    opt.msam_step(model, loss_fn, x, y, micro_batches=2)
    assert opt.last_msam_info["method"] == "sequential" and "overflows fp64" in opt.last_msam_info["reason"]
    torch.testing.assert_close(model.weight.grad, torch.full((1, 3), 1e200, dtype=torch.float64), rtol=1e-12, atol=0)
