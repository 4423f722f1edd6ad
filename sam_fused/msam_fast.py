"""mSAM at about the cost of SAM, exactly: two full-batch passes instead of 2k micro-batch passes.

mSAM's gradient is G = (1/k) sum_j grad L_{B_j}(w + e_j), e_j = rho T^2 g_j / (||T g_j|| + eps), g_j = grad L_{B_j}(w)
(docs/DESIGN.md section 1). The sequential form (sam_fused.msam) runs 2k small passes. Here:

First pass, at w: one full-batch forward, the loss of every micro-batch from its slice of the output, one backward of
S = sum_j L_{B_j}. Examples do not interact (see below), so the gradient of S at the rows of micro-batch j is the
gradient of L_{B_j}: every layer sees every delta_j at once. No weight gradient is formed; instead, per layer:
  * nn.Linear (any leading dims): g_j(W) = delta_j^T x_j is kept in factored form (x_j, delta_j); its squared norm is
    the ghost norm <x_j x_j^T, delta_j delta_j^T>. g_j(b) = colsum(delta_j) is formed ([k, out], small).
  * nn.Embedding: g_j is sparse, one row per distinct token of micro-batch j: those rows are formed exactly.
  * nn.LayerNorm / nn.RMSNorm: the affine parameters are given k copies ([k, *shape] leaves), so the backward returns
    their k per-micro-batch gradients directly.
The per-micro-batch global norms are the sums over layers of these pieces (the dense ones through the fused op
sam_fused.ops.grad_sumsq with micro_batches=k), with each param group's T (ASAM) and rho / normalize.

Second pass, micro-batch j at w + e_j, again one full-batch forward and backward of (1/k) sum_j L_{B_j}:
  * Linear:  y_j = h_j W^T + s_j (h_j x_j^T) delta_j + (b + e_b,j): one full GEMM and two thin batched GEMMs of
    width r (rows per micro-batch); W's gradient is the one full GEMM (1/k) sum_j delta'_j^T h_j, and h's gradient
    picks up delta'_j (W + E_j) through autograd. When r is large (long sequences) or under ASAM (T^2 g_j is not of
    low rank) the k perturbed weights are materialized instead: the first pass forms g_j ([k, out, in], one batched
    GEMM), ops.perturb_batched makes W + e_j, the second pass runs a batched GEMM and still takes W's gradient as
    one full-batch GEMM (no [k, out, in] gradient is formed or reduced). A cost model picks the form per layer.
  * Embedding: W[idx] + e_j[idx], the perturbation rows looked up per (micro-batch, token).
  * LayerNorm / RMSNorm and perturbed biases: k perturbed copies from ops.perturb_batched, one per micro-batch.
Every perturbed value is a constant whose gradient is routed to w, which is exactly SAM's "gradient at w + e_j":
so .grad ends up holding G. The weights themselves are never modified.

Cost, in GEMMs of one linear layer's size: SAM 6 (forward, input and weight gradients, twice). Here the first pass
forms no weight gradient: 5 in low-rank form plus 3 r (in + out) / (in out) for the thin products, 6 materialized
plus moving the [k, out, in] tensors. So mSAM costs about a SAM step for any k (python -m sam_fused.bench.msam).

Why it is exact: every step above is an algebraic identity (sums regrouped, low-rank products re-associated); only
floating-point rounding differs from the sequential path. Requirements (checked where possible, else documented):
  * examples are independent: the output rows of example i depend on example i only (no BatchNorm in training mode,
    no dropout in training mode, no mixing along the batch dim); the batch is dim 0 of every layer input and of the
    model output;
  * every parameter lives in one supported module and is used only through that module's forward (so no tied
    weights; a positional table looked up once with positions [T] and broadcast over the batch is not per example);
  * `loss_fn(output_j, *targets_j)` is micro-batch j's loss (the mean loss of the micro-batch, as for msam_step).
    It is called once per micro-batch on that micro-batch's slice of the full-batch output, so the first pass
    backpropagates the sum over micro-batches of their mean losses and the second pass (1/k) times that sum. (Being
    applied per micro-batch, a masked mean such as cross-entropy with ignore_index stays exact too.)
Anything else raises FastPathUnsupported (a ValueError) before any state is changed; msam_step(method="auto") then
runs the sequential path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from . import ops, reference
from .distributed import is_ddp
from .msam import Batch, _as_tuple, check_scalar_loss, msam_sequential, split_micro_batches
from .msam_layers import (
    EmbeddingRecordingOutputGrad,
    LinearRecordingOutputGrad,
    MaterializedLinear,
    at_perturbed,
    batched_affine,
    bias_grads,
    embedding_keys,
    embedding_lookup,
    embedding_segments,
    ghost_sumsq,
    join_calls,
    low_rank_linear,
    split_rows,
    weight_grads,
)
from .param_slices import EPS

if TYPE_CHECKING:  # type hints only: optim imports the mSAM modules
    from .optim import SAM

SUPPORTED = "nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm and parameter-free modules"

# The materialized form writes and reads its k * in * out elements about six times (per-micro-batch gradients, their
# norm, the perturbed copies, the second pass forward and backward); one element moved costs about as much as this many
# multiply-adds on a CPU (measured: the two forms tie on the benchmark transformer at k=32, r=64 rows).
MATERIALIZE_OVERHEAD = 128
# Memory cap on the per-micro-batch weight gradients of materialized layers ([k, out, in] each, about three live
# copies): above it the step raises FastPathUnsupported and msam_step(method="auto") runs the sequential path.
MAX_MATERIALIZED_BYTES = 1 << 30


class FastPathUnsupported(ValueError):
    """The model (or this call) is outside what the exact fast mSAM path handles; the message says why."""


# -- which models are supported -----------------------------------------------------------------------------------


def _layer_class(module: nn.Module) -> type[_Layer] | None:
    for base, cls in _LAYER_CLASSES.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return cls
    return None


def _module_problem(name: str, module: nn.Module) -> str | None:
    label = f"{type(module).__name__} '{name or '<model>'}'"
    if isinstance(module, _BatchNorm):
        return f"{label} couples the micro-batches through batch statistics"
    if isinstance(module, _DropoutNd) and module.training and module.p > 0:
        return (f"{label} in training mode draws new masks in every pass, so no fast path can match the sequential "
                "one (use eval mode or p=0)")
    if "forward" in vars(module):
        return f"{label} has an instance-level forward override"
    own = dict(module.named_parameters(recurse=False))
    if not own:
        return None
    if _layer_class(module) is None:
        return f"no exact fast-path rule for the parameterized module {label} (supported: {SUPPORTED})"
    extra = sorted(set(own) - {"weight", "bias"})
    if extra:
        return f"{label} has extra parameters {extra}"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
        return f"{label} uses max_norm, scale_grad_by_freq or sparse gradients"
    return None


def fast_path_support(model: nn.Module) -> tuple[bool, str]:
    """(True, "supported") if msam_fast handles `model` exactly, else (False, the reason)."""
    if is_ddp(model):
        return False, "DistributedDataParallel models use the sequential path (per-rank no_sync handling)"
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        problem = _module_problem(name, module)
        if problem:
            return False, problem
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if id(p) in owner:
                return False, f"parameter {full} is shared with {owner[id(p)]} (tied weights)"
            owner[id(p)] = full
    return True, "supported"


# -- one step's shared state --------------------------------------------------------------------------------------


class _Step:
    """What the layers of one msam_fast call share: k, n, the optimizer's groups, the norms and the perturbations."""

    def __init__(self, opt: SAM, k: int, n: int, device: torch.device, linear_mode: str) -> None:
        self.opt, self.k, self.n, self.linear_mode = opt, k, n, linear_mode
        # Parameters the sequential path perturbs: the optimizer's, with requires_grad.
        self.group_of = {p: g for g in opt.param_groups for p in g["params"] if p.requires_grad}
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        self.leaves: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, its [k, *p] first-pass leaf)
        self.dense: list[tuple[torch.Tensor, torch.Tensor]] = []  # (param, per-micro-batch gradients [k, *p])
        self.ghost: list[torch.Tensor] = []  # [k] sums of squares computed by the layers themselves
        self.scales: dict[int, torch.Tensor] = {}  # id(group) -> fp32 [k]
        self.perturbed: dict[torch.Tensor, torch.Tensor] = {}  # param -> w + e_j for every j, [k, *p]
        self.materialized_bytes = 0

    def reserve(self, name: str, nbytes: int) -> None:
        """Count the bytes of one materialized [k, out, in] tensor; refuse before allocating past the cap."""
        self.materialized_bytes += nbytes
        if self.materialized_bytes > MAX_MATERIALIZED_BYTES:
            raise FastPathUnsupported(f"materializing the per-micro-batch weights (needed for ASAM, or forced) would "
                                      f"exceed {MAX_MATERIALIZED_BYTES >> 20} MiB at layer '{name}'")

    def perturbable(self, p: torch.Tensor | None) -> bool:
        return p is not None and p in self.group_of

    def group(self, p: torch.Tensor) -> dict[str, Any]:
        return self.group_of[p]

    def check_rows(self, name: str, t: torch.Tensor, min_dim: int = 2) -> None:
        """Micro-batch j's rows of `t` must be block j along dim 0 (and there must be a dim besides the batch's)."""
        if t.dim() < min_dim or t.shape[0] != self.n:
            raise FastPathUnsupported(f"the input of '{name}' has shape {tuple(t.shape)}; the fast path needs the "
                                      f"batch ({self.n} examples) along dim 0 of every layer input")

    def global_sumsq(self) -> torch.Tensor:
        """fp64 [k]: the squared global norm ||T g_j||^2 of every micro-batch, over all groups and layers."""
        total = torch.zeros(self.k, dtype=reference.SUMSQ_DTYPE, device=self.anchor.device)
        for group, params, grads in self._dense_by_group():
            params_for_t = params if group["adaptive"] else None
            if self.k == 1:  # the op's k=1 form takes gradients shaped like their parameters
                grads = [g[0] for g in grads]
            total += ops.grad_sumsq(grads, params_for_t, group["eta"], micro_batches=self.k,
                                    backend=self.opt.backend).to(total.device)
        for part in self.ghost:
            total += part.to(total.device)
        return total

    def perturb(self, sumsq: torch.Tensor) -> None:
        """Per-group scales s_j, and the k perturbed copies of every densely handled parameter (one fused op)."""
        if any(p.dtype == torch.float64 for p in self.group_of) and bool(torch.isinf(sumsq).any()):
            # fp64 gradients past fp64's sum of squares: SAM._perturb's exact rescale lives on the sequential path
            raise FastPathUnsupported("an fp64 micro-batch gradient norm overflows fp64 (above ~1.3e154)")
        for group in self.opt.param_groups:
            self.scales[id(group)] = micro_batch_scales(sumsq, group["rho"], group["normalize"])
        for group, params, grads in self._dense_by_group():
            copies = ops.perturb_batched(params, grads, sumsq, group["rho"], EPS, group["adaptive"], group["eta"],
                                         group["normalize"], backend=self.opt.backend)
            self.perturbed.update(zip(params, copies))

    def scale_of(self, p: torch.Tensor) -> torch.Tensor:
        return self.scales[id(self.group_of[p])]

    def _dense_by_group(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        out: dict[int, tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]] = {}
        for p, g in self.dense:
            group = self.group_of[p]
            entry = out.setdefault(id(group), (group, [], []))
            entry[1].append(p)
            entry[2].append(g)
        return list(out.values())


def micro_batch_scales(sumsq: torch.Tensor, rho: float, normalize: bool) -> torch.Tensor:
    """s_j = rho / (sqrt(sumsq_j) + eps) (rho when not normalized); 0 where sumsq_j is not finite (no perturbation),
    computed in fp64 and rounded to fp32, in the order of operations of the op layer's reference."""
    return reference.perturb_scale(sumsq, rho, EPS, normalize)[0]


# -- layers: first(), collect(), prepare(), second() --------------------------------------------------------------


class _Layer:
    """One supported module during one step. `first`/`second` replace its forward in the two passes."""

    def __init__(self, name: str, module: nn.Module, step: _Step) -> None:
        self.name, self.module, self.step = name, module, step
        self.mode = "unused"

    def begin(self) -> None:
        """Before the first pass."""

    def collect(self) -> None:
        """After the first pass: add this layer's per-micro-batch gradients (or their norms) to the step."""

    def prepare(self) -> None:
        """After the scales and perturbed copies exist: precompute what the second pass needs."""

    def first(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def second(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _prefers_low_rank(rows: int, k: int, d_in: int, d_out: int) -> bool:
    """Multiply-adds beyond SAM's: low rank pays r^2 (in + out) per micro-batch three times (ghost norm, forward,
    input gradient); the materialized form pays the k per-micro-batch gradients (one full GEMM, k r in out) and moves
    its [k, out, in] tensors around (MATERIALIZE_OVERHEAD per element)."""
    low_rank = 3 * k * rows * rows * (d_in + d_out)
    materialized = k * d_in * d_out * (rows + MATERIALIZE_OVERHEAD)
    return low_rank <= materialized


class _Linear(_Layer):
    def __init__(self, name: str, module: nn.Module, step: _Step) -> None:
        super().__init__(name, module, step)
        self.slots: list[dict[str, Any]] = []
        self.weight_perturbed = step.perturbable(module.weight)
        self.bias_perturbed = step.perturbable(module.bias)
        self.x = self.delta = self.delta_scaled = None  # [k, r, in], [k, r, out], [k, r, out]

    def first(self, x: torch.Tensor) -> torch.Tensor:
        self.step.check_rows(self.name, x)
        w, b = self.module.weight.detach(), None if self.module.bias is None else self.module.bias.detach()
        if not (self.weight_perturbed or self.bias_perturbed):
            return F.linear(x, w, b)
        slot = {"x": x.detach(), "version": x._version, "delta": None}
        self.slots.append(slot)
        return LinearRecordingOutputGrad.apply(x, w, b, self.step.anchor, slot)

    def collect(self) -> None:
        slots = [s for s in self.slots if s["delta"] is not None]  # calls whose output reached the loss
        if not slots:
            self.mode = "unused" if self.weight_perturbed or self.bias_perturbed else "frozen"
            return
        if any(s["x"]._version != s["version"] for s in slots):
            raise FastPathUnsupported(f"the input of '{self.name}' was modified in place after the layer used it")
        k, step = self.step.k, self.step
        x = join_calls([split_rows(s["x"], k) for s in slots])  # [k, r, in]
        delta = join_calls([split_rows(s["delta"], k) for s in slots]).to(x.dtype)  # [k, r, out]
        self.slots = []
        if self.bias_perturbed:
            step.dense.append((self.module.bias, bias_grads(delta)))
        if not self.weight_perturbed:
            self.mode = "linear (bias only)"
            return
        adaptive = step.group(self.module.weight)["adaptive"]
        rows, (d_out, d_in) = x.shape[1], self.module.weight.shape
        if adaptive:  # T^2 delta_j^T x_j is not of low rank: ASAM always materializes
            low_rank = False
        elif step.linear_mode == "auto":
            low_rank = _prefers_low_rank(rows, k, d_in, d_out)
        else:
            low_rank = step.linear_mode == "low_rank"
        if low_rank:
            self.mode = "linear low-rank"
            self.x, self.delta = x, delta
            step.ghost.append(ghost_sumsq(x, delta))
        else:
            self.mode = "linear materialized (ASAM)" if adaptive else "linear materialized"
            step.reserve(self.name, k * d_out * d_in * x.element_size())
            step.dense.append((self.module.weight, weight_grads(x, delta)))

    def prepare(self) -> None:
        if self.mode == "linear low-rank":
            scale = self.step.scale_of(self.module.weight)  # [k]
            self.delta_scaled = self.delta * scale.to(self.delta.dtype).view(-1, 1, 1)  # s_j delta_j, [k, r, out]
            self.delta = None

    def second(self, h: torch.Tensor) -> torch.Tensor:
        self.step.check_rows(self.name, h)
        m, perturbed = self.module, self.step.perturbed
        if self.mode in ("unused", "frozen"):
            return F.linear(h, m.weight, m.bias)
        if self.mode.startswith("linear materialized"):
            bias_k = perturbed[m.bias] if self.bias_perturbed else None  # b + e_j, [k, out]
            return MaterializedLinear.apply(h, m.weight, m.bias, perturbed[m.weight], bias_k)
        bias_k = at_perturbed(m.bias, perturbed[m.bias]) if self.bias_perturbed else None  # [k, out]
        return low_rank_linear(h, m.weight, None if self.bias_perturbed else m.bias, self.x, self.delta_scaled,
                               bias_k)


class _Embedding(_Layer):
    def __init__(self, name: str, module: nn.Module, step: _Step) -> None:
        super().__init__(name, module, step)
        self.slots: list[dict[str, Any]] = []
        self.keys = self.rows = self.t = self.e_rows = None  # [U], [U, d], [U, d] or None, [U, d]

    def first(self, idx: torch.Tensor) -> torch.Tensor:
        self.step.check_rows(self.name, idx, min_dim=1)
        m = self.module
        if not self.step.perturbable(m.weight):
            return F.embedding(idx, m.weight.detach(), m.padding_idx)
        slot = {"idx": idx, "delta": None}
        self.slots.append(slot)
        return EmbeddingRecordingOutputGrad.apply(idx, m.weight.detach(), m.padding_idx, self.step.anchor, slot)

    def collect(self) -> None:
        slots = [s for s in self.slots if s["delta"] is not None]
        if not slots:
            self.mode = "unused" if self.step.perturbable(self.module.weight) else "frozen"
            return
        k, m = self.step.k, self.module
        num_rows = m.weight.shape[0]
        idx = torch.cat([s["idx"].reshape(k, -1) for s in slots], dim=1)  # [k, r]
        delta = join_calls([split_rows(s["delta"], k) for s in slots])  # [k, r, d]
        self.slots = []
        self.keys, self.rows = embedding_segments(idx, delta, num_rows, m.padding_idx)  # [U], [U, d]
        group = self.step.group(m.weight)
        direction = self.rows.float()
        if group["adaptive"]:  # T = |w| + eta on the touched rows only: T^2 g stays sparse
            self.t = m.weight.detach()[self.keys % num_rows].float().abs() + group["eta"]
            direction = direction * self.t
        sumsq = torch.zeros(k, dtype=reference.SUMSQ_DTYPE, device=direction.device)  # squared in fp64, like the ops
        sumsq.index_add_(0, self.keys // num_rows, direction.to(sumsq.dtype).square().sum(dim=1))
        self.step.ghost.append(sumsq)
        self.mode = "embedding sparse rows"

    def prepare(self) -> None:
        if self.keys is None:
            return
        scale = self.step.scale_of(self.module.weight)[self.keys // self.module.weight.shape[0]]  # [U]
        direction = self.rows.float() if self.t is None else self.rows.float() * self.t * self.t
        self.e_rows = (scale.unsqueeze(1) * direction).to(self.module.weight.dtype)  # e_j rows, [U, d]

    def second(self, idx: torch.Tensor) -> torch.Tensor:
        self.step.check_rows(self.name, idx, min_dim=1)
        m, k = self.module, self.step.k
        y = F.embedding(idx, m.weight, m.padding_idx)  # [n, ..., d]
        if self.e_rows is None:
            return y
        query = embedding_keys(idx.reshape(k, -1), k, m.weight.shape[0])  # [k, r]
        return y + embedding_lookup(self.keys, self.e_rows, query).view(y.shape)  # a constant: no gradient path


class _Norm(_Layer):
    """LayerNorm / RMSNorm: normalize without the affine part, then scale/shift each micro-batch by its own copy."""

    def __init__(self, name: str, module: nn.Module, step: _Step) -> None:
        super().__init__(name, module, step)
        self.params = {n: getattr(module, n, None) for n in ("weight", "bias")}
        self.leaves: dict[str, torch.Tensor] = {}

    def begin(self) -> None:
        k = self.step.k
        for n, p in self.params.items():
            if self.step.perturbable(p):
                leaf = p.detach().unsqueeze(0).expand(k, *p.shape).requires_grad_(True)  # [k, *p]
                self.leaves[n] = leaf
                self.step.leaves.append((p, leaf))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        return F.rms_norm(x, m.normalized_shape, None, m.eps)

    def _plain(self, p: torch.Tensor | None, detach: bool) -> torch.Tensor | None:
        if p is None:
            return None
        return (p.detach() if detach else p).unsqueeze(0).expand(self.step.k, *p.shape)  # [k, *p]

    def first(self, x: torch.Tensor) -> torch.Tensor:
        self.step.check_rows(self.name, x, min_dim=len(self.module.normalized_shape) + 1)
        self.mode = f"{type(self.module).__name__.lower()} elementwise copies"
        w, b = (self.leaves.get(n, self._plain(p, True)) for n, p in self.params.items())
        return batched_affine(self._normalize(x), w, b)

    def second(self, x: torch.Tensor) -> torch.Tensor:
        self.step.check_rows(self.name, x, min_dim=len(self.module.normalized_shape) + 1)
        perturbed = self.step.perturbed
        w, b = (at_perturbed(p, perturbed[p]) if p is not None and p in perturbed else self._plain(p, False)
                for p in self.params.values())
        return batched_affine(self._normalize(x), w, b)


_LAYER_CLASSES: dict[type[nn.Module], type[_Layer]] = {
    nn.Linear: _Linear, nn.Embedding: _Embedding, nn.LayerNorm: _Norm, nn.RMSNorm: _Norm,
}


@contextlib.contextmanager
def _forwards(layers: list[_Layer], phase: str) -> Iterator[None]:
    """Route each supported module's forward to its layer's `phase` method; always put the class forward back."""
    patched = []
    try:
        for layer in layers:
            layer.module.forward = getattr(layer, phase)
            patched.append(layer.module)
        yield
    finally:
        for module in patched:
            del module.forward


# -- the step -----------------------------------------------------------------------------------------------------


def _split_output(out: Any, k: int, n: int) -> list[Any]:
    """The model output cut into its k micro-batch slices along dim 0 (tensors, and tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != n:
            raise FastPathUnsupported(f"the model output has shape {tuple(out.shape)}; the fast path needs the batch "
                                      f"({n} examples) along its dim 0")
        return list(out.chunk(k))
    if isinstance(out, dict):
        parts = {key: _split_output(v, k, n) for key, v in out.items()}
        return [{key: p[j] for key, p in parts.items()} for j in range(k)]
    if isinstance(out, (tuple, list)):
        parts = [_split_output(v, k, n) if v is not None else [None] * k for v in out]
        rebuild = (lambda xs: type(out)(*xs)) if hasattr(out, "_fields") else type(out)
        return [rebuild([p[j] for p in parts]) for j in range(k)]
    raise FastPathUnsupported(f"cannot split a model output of type {type(out).__name__} into micro-batches")


def _micro_batch_losses(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], xs: tuple, targets: list[tuple], k: int, n: int
) -> list[torch.Tensor]:
    outs = _split_output(model(*xs), k, n)
    return [check_scalar_loss(loss_fn(out_j, *y_j), j) for j, (out_j, y_j) in enumerate(zip(outs, targets))]


def msam_fast(
    opt: SAM,
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    inputs: Batch,
    targets: Batch,
    k: int,
    *,
    linear_mode: str = "auto",
    plan: dict[str, str] | None = None,
    base_step: bool = True,
) -> torch.Tensor:
    """One mSAM step (k micro-batches) in two full-batch passes; same contract as msam_sequential.

    Leaves .grad = G = (1/k) sum_j grad L_{B_j}(w + e_j), takes opt.base_optimizer.step() (if `base_step`) and returns
    the mean unperturbed micro-batch loss (detached). The weights are never modified in place except by the base step.
    `linear_mode`: "auto" (cost model), "low_rank" or "materialized" for the perturbed nn.Linear weights (ASAM groups
    are always materialized). `plan`, if given, is filled with {module name: how it was handled}.
    Raises FastPathUnsupported (a ValueError) before changing any state when the model is not supported.
    """
    if linear_mode not in ("auto", "low_rank", "materialized"):
        raise ValueError(f"linear_mode must be 'auto', 'low_rank' or 'materialized', got {linear_mode!r}")
    batches = split_micro_batches(inputs, targets, k)  # validates k and the batch like the sequential path
    supported, reason = fast_path_support(model)
    if not supported:
        raise FastPathUnsupported(reason)
    xs, n = _as_tuple(inputs), _as_tuple(inputs)[0].shape[0]
    targets_j = [y_j for _, y_j in batches]
    device = next((p.device for p in model.parameters()), xs[0].device)
    step = _Step(opt, k, n, device, linear_mode)
    layers = []
    for name, module in model.named_modules():
        cls = _layer_class(module)
        if cls is not None and next(module.parameters(recurse=False), None) is not None:
            layers.append(cls(name, module, step))
    for layer in layers:
        layer.begin()

    # First pass at w: every micro-batch's output gradients (and its elementwise-parameter gradients) at once.
    with torch.enable_grad(), _forwards(layers, "first"):
        losses = _micro_batch_losses(model, loss_fn, xs, targets_j, k, n)
    trainable = list(step.group_of)
    wanted = [step.anchor] + [leaf for _, leaf in step.leaves] + trainable
    grads = torch.autograd.grad(torch.stack(losses).sum(), wanted, allow_unused=True)
    leaf_grads, direct = grads[1:1 + len(step.leaves)], grads[1 + len(step.leaves):]
    _check_no_direct_use(model, trainable, direct)
    step.dense.extend((p, g) for (p, _), g in zip(step.leaves, leaf_grads) if g is not None)
    with torch.no_grad():  # norms and perturbations are constants of the second pass (as in SAM's first_step)
        for layer in layers:
            layer.collect()
        step.perturb(step.global_sumsq())
        for layer in layers:
            layer.prepare()

    # Second pass: micro-batch j at w + e_j, gradients accumulated into w's .grad with weight 1/k.
    with torch.enable_grad(), _forwards(layers, "second"):
        perturbed_losses = _micro_batch_losses(model, loss_fn, xs, targets_j, k, n)
    opt.zero_grad(set_to_none=True)
    (torch.stack(perturbed_losses).sum() / k).backward()
    if base_step:
        opt.base_optimizer.step()
    if plan is not None:
        plan.update({layer.name: layer.mode for layer in layers})
    return torch.stack([loss.detach() for loss in losses]).mean()


def _check_no_direct_use(model: nn.Module, trainable: list[torch.Tensor], direct: tuple) -> None:
    """The first pass uses detached weights inside the supported modules: a gradient reaching a parameter itself
    means it is also used elsewhere (a functional call, a tied weight), which the fast path cannot see."""
    used = [p for p, g in zip(trainable, direct) if g is not None]
    if used:
        names = {p: name for name, p in model.named_parameters()}
        raise FastPathUnsupported(f"parameter {names.get(used[0], tuple(used[0].shape))} is used outside its module's "
                                  "forward (e.g. a functional call or a tied weight)")


# ---- proof on first use ------------------------------------------------------------------------------------------
# fast_path_support() reads the model's modules, not its forward: a parameter-free step that mixes examples
# (x - x.mean(0)), or an nn.Linear fed sequence-first [T, N, D] with T == N, passes the checks and gives a wrong G.
# So msam_step(method="auto") proves the fast path once per model and input shapes: one step computes G both ways on
# the same batch and keeps the fast path only if they agree; else it warns once and stays sequential for that model.


def shape_key(inputs: Batch, targets: Batch, k: int) -> tuple:
    """What the proof holds for: the input and target shapes and dtypes, and k."""
    return (k, *((tuple(t.shape), t.dtype) for t in (*_as_tuple(inputs), *_as_tuple(targets))))


def relative_difference(fast: list[torch.Tensor | None], sequential: list[torch.Tensor | None]) -> float:
    """||G_fast - G_seq|| / ||G_seq|| over all parameters (a missing gradient counts as zeros)."""
    diff = ref = 0.0
    for a, b in zip(fast, sequential):
        if a is None and b is None:
            continue
        a64 = torch.zeros_like(b, dtype=torch.float64) if a is None else a.double()
        b64 = torch.zeros_like(a, dtype=torch.float64) if b is None else b.double()
        diff += float((a64 - b64).square().sum())
        ref += float(b64.square().sum())
    return (diff / ref) ** 0.5 if ref > 0 else (0.0 if diff == 0 else float("inf"))


def proof_tolerance(params: list[torch.Tensor]) -> float:
    """Both paths are exact up to rounding: 1e-4 relative for fp32 (tests see ~1e-6), more for 16-bit weights."""
    return max([1e-4] + [64 * torch.finfo(p.dtype).eps for p in params if p.is_floating_point()])


def msam_proven(
    opt: SAM, model: nn.Module, loss_fn: Callable[..., torch.Tensor], inputs: Batch, targets: Batch, k: int,
    plan: dict[str, str],
) -> tuple[torch.Tensor, float, float]:
    """One mSAM step that computes G by the fast path and by the sequential path on the same batch, takes the base
    step with the sequential G, and returns (mean loss, relative difference of the two G, tolerance)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    msam_fast(opt, model, loss_fn, inputs, targets, k, plan=plan, base_step=False)
    fast = [None if p.grad is None else p.grad.clone() for p in params]
    loss = msam_sequential(opt, model, loss_fn, inputs, targets, k, base_step=False)
    diff = relative_difference(fast, [p.grad for p in params])
    opt.base_optimizer.step()
    return loss, diff, proof_tolerance(params)
