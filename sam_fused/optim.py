"""SAM-family optimizers: SAM / ASAM / unnormalized SAM (``SAM``) and Friendly-SAM (``FriendlySAM``).

Drop-in for the most used PyTorch SAM port (same constructor, ``first_step`` / ``second_step`` / ``step(closure)``,
``base_optimizer``, shared ``param_groups``), with the optimizer-side work done by the fused op layer
(``sam_fused.ops``), plus what the port lacks: checkpointing of the base optimizer's state, GradScaler support,
explicit ``restore()``, weights restored when the closure raises, and ``msam_step`` (micro-batch SAM).

Equations (docs/DESIGN.md section 1), with the global norm taken over every parameter that has a gradient:
    SAM   e = rho * g / (||g|| + 1e-12)
    ASAM  e = rho * T^2 * g / (||T * g|| + 1e-12),  T = |w| + eta        (per group: adaptive=True, eta)
    unnormalized SAM  e = rho * g                                        (per group: normalize=False)
    F-SAM as SAM/ASAM with g replaced by d = g - sigma * m, m an EMA of g
"""

from __future__ import annotations

import operator
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.optim.optimizer as _optimizer_module
from torch.distributed.tensor import DTensor

from . import msam_dispatch, ops
from .param_slices import EPS, GroupSlice, group_slices, local_tensor

# Gradients are multiplied by this (an exact power of two) when an fp64 sum of squares overflows (norm > ~1.3e154):
# e = rho * g / ||g|| is unchanged by the rescale, and the rescaled sum fits in fp64 (see SAM._perturb).
FP64_RESCALE_EXP = 600


@dataclass
class _BackupSet:
    """One slot's backups and what they were made for: the group, its parameters (held, so that their ids stay
    theirs), their ids and data pointers; whether any is fp64 (only fp64 gradients can overflow an fp64 sum)."""

    group: dict[str, Any]
    params: list[torch.Tensor]
    ids: tuple[int, ...]
    ptrs: tuple[int, ...]
    backups: list[torch.Tensor]
    fp64: bool = False


def _backup_like(p: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """`old` if it still fits `p` (shape, dtype, device and strides), else a new tensor in p's layout (empty_like
    keeps the strides of a dense tensor, e.g. channels_last)."""
    if (old is not None and old.shape == p.shape and old.dtype == p.dtype and old.device == p.device
            and old.stride() == p.stride()):
        return old
    return torch.empty_like(p)


def _check_distinct(groups: list[dict[str, Any]]) -> None:
    """Refuse parameters that SAM would perturb (and back up) twice: one listed twice (torch only warns), or two
    overlapping views of one buffer. Restoring either from its backup would undo part of the other's update."""
    seen: dict[int, tuple[int, int]] = {}
    spans: dict[int, list[tuple[int, int, str]]] = defaultdict(list)  # storage -> (start, end, name) in bytes
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            name = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
            if id(p) in seen:
                raise ValueError(f"{name} is listed twice (first at param_groups[{seen[id(p)][0]}]['params']"
                                 f"[{seen[id(p)][1]}]); SAM would perturb it twice: pass each parameter once")
            seen[id(p)] = (gi, pi)
            if isinstance(p, DTensor) or p.layout != torch.strided or p.device.type == "meta" or p.numel() == 0:
                continue  # no plain storage to compare (sharded, sparse, not materialized) or nothing to overlap
            extent = 1 + sum((n - 1) * abs(st) for n, st in zip(p.shape, p.stride()))
            start = p.storage_offset() * p.element_size()
            spans[p.untyped_storage().data_ptr()].append((start, start + extent * p.element_size(), name))
    for views in spans.values():
        views.sort()
        for (_, end, first), (start, _, second) in zip(views, views[1:]):
            if start < end:
                raise ValueError(f"{second} overlaps the memory of {first}; SAM backs up and restores each "
                                 "parameter on its own, so parameters must not share elements")


def _add(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total + part.to(total.device, non_blocking=True)


@dataclass(frozen=True)
class Range:
    """The values a numeric hyperparameter may take (bounds included), and how an error message says so."""

    low: float
    high: float
    rule: str

    def admits(self, value: object) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and self.low <= value <= self.high


# rho, eta and F-SAM's sigma reach the kernels as fp32 scalars.
FP32_NON_NEGATIVE = Range(0.0, ops.FP32_MAX, f"a finite number >= 0 (at most {ops.FP32_MAX:.4g}, the fp32 range)")
FP32_FINITE = Range(-ops.FP32_MAX, ops.FP32_MAX, "a finite number")


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around any base optimizer.

    Args:
        params: parameters or param groups (groups may set their own rho / adaptive / eta / normalize).
        base_optimizer: an optimizer class (built here over the same param groups with ``**base_kwargs``) or an
            optimizer instance already built over the same parameters.
        rho: neighbourhood radius. adaptive: ASAM (T = |w| + eta). eta: ASAM's offset.
        normalize: False gives unnormalized SAM, e = rho * T^2 * g.
        backend: op-layer backend ("auto", "torch", "cpu", "triton", "cuda").
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        normalize: bool = True,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        # A subclass passes its own hyperparameters (F-SAM's sigma, lmbda) here too; the rest go to the base optimizer.
        own = {key: base_kwargs.pop(key) for key in self.hyperparameters() if key in base_kwargs}
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, normalize=normalize, **own)
        defaults.update(base_kwargs)
        super().__init__(params, defaults)
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise TypeError(f"base optimizer keyword arguments {sorted(base_kwargs)} given with an optimizer "
                                "instance; set them on the instance instead")
            self._adopt(base_optimizer)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class or instance, got {base_optimizer!r}")
        self.param_groups = self.base_optimizer.param_groups  # shared: LR schedulers work on either object
        self.defaults.update(self.base_optimizer.defaults)
        self.backend = backend
        # Backups per (param group, shard group), reused every step while they fit (_backups_for); never
        # checkpointed.
        self._backups: dict[tuple[int, Any], _BackupSet] = {}
        self._perturbed: list[tuple[GroupSlice, list[torch.Tensor]]] = []  # (slot, its backups) since first_step
        self.fused_second_step = True  # restore + torch.optim.SGD update in one pass where exact (_fused_sgd_plan)
        self.last_grad_norm: torch.Tensor | None = None
        # msam_step(method="auto"): per model, per shape_key, whether the fast path was proven (True) or disproved
        self._msam_proofs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # This class's own per-group hyperparameters (the rest of a group is the base optimizer's) and the values each
    # may take (None: a flag, not range-checked). A subclass declares only its additions: hyperparameters() merges
    # the declarations along the MRO, and every check (_check_group) reads that.
    HYPERPARAMETERS: ClassVar[dict[str, Range | None]] = {
        "rho": FP32_NON_NEGATIVE, "adaptive": None, "eta": FP32_NON_NEGATIVE, "normalize": None,
    }

    @classmethod
    def hyperparameters(cls) -> dict[str, Range | None]:
        """Every hyperparameter this optimizer owns, with its range: the HYPERPARAMETERS of each class in the MRO."""
        merged: dict[str, Range | None] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("HYPERPARAMETERS", {}))
        return merged

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        """A ValueError naming the first hyperparameter of `group` outside its declared range (what the kernels
        could not use exactly)."""
        for key, allowed in self.hyperparameters().items():
            if allowed is not None and not allowed.admits(group[key]):
                raise ValueError(f"{where}: {key} must be {allowed.rule}, got {group[key]!r}")

    def _adopt(self, base: torch.optim.Optimizer) -> None:
        """Use an existing optimizer over the same parameters; copy each SAM group's settings into its group."""
        owner = {p: g for g in self.param_groups for p in g["params"]}
        for bg in base.param_groups:
            sam_groups = {id(owner[p]) for p in bg["params"] if p in owner}
            if len(sam_groups) != 1 or any(p not in owner for p in bg["params"]):
                raise ValueError("base_optimizer instance must be built over the same parameters (and groups) as SAM")
            sg = owner[bg["params"][0]]
            for key in self.hyperparameters():
                bg[key] = sg[key]
        if sum(len(g["params"]) for g in base.param_groups) != len(owner):
            raise ValueError("base_optimizer instance must be built over the same parameters as SAM")
        self.base_optimizer = base

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, refused (and nothing added) when a SAM hyperparameter is invalid or a parameter
        would be updated twice (listed twice, or overlapping the memory of another parameter)."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}]")
            _check_distinct(self.param_groups)
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_groups(self) -> None:
        """Every group's hyperparameters, each step: they may have been edited through param_groups."""
        for i, group in enumerate(self.param_groups):
            self._check_group(group, f"param_groups[{i}]")

    # -- perturbation ---------------------------------------------------------------------------------------------

    @property
    def is_perturbed(self) -> bool:
        """True between first_step() and second_step()/restore(): the weights are w + e, not w."""
        return bool(self._perturbed)

    def _slots(self) -> list[GroupSlice]:
        """This step's slots: the parameters that have a gradient. The op layer validates the gradients (dense,
        real floating point); _check_grads() names a bad one when it refuses them."""
        slots = []
        for group in self.param_groups:
            params = group["params"]
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                params = [p for p, g in zip(params, grads) if g is not None]
                grads = [g for g in grads if g is not None]
            slots.extend(group_slices(group, params, grads))
        return slots

    def _check_grads(self) -> None:
        """Raise a TypeError naming the first parameter whose gradient SAM cannot use (sparse or complex)."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                g, where = p.grad, f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
                if g is not None and g.layout != torch.strided:
                    raise TypeError(f"{where} has a sparse gradient; SAM needs dense gradients")
                if g is not None and g.is_complex():
                    raise TypeError(f"{where} is complex; sam_fused supports real floating-point parameters only")

    def _direction_sumsq(
        self, slots: list[GroupSlice], slot_sumsq: Callable[[GroupSlice], torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """The global sum of (T * direction)^2 over all slots: fp64 [1] on the first slot's device. `slot_sumsq`
        defaults to this optimizer's (F-SAM's turns the gradients into its direction first)."""
        total, sharded = None, {}
        for s in slots:
            part = (slot_sumsq or self._slot_sumsq)(s)
            if s.shard_group is None:
                total = _add(total, part)
            else:
                sharded[s.shard_group] = _add(sharded.get(s.shard_group), part)
        for pg, part in sharded.items():
            dist.all_reduce(part, group=pg)  # every rank holds one shard: sum the squares, then take the root
            total = _add(total, part)
        return total

    def _slot_sumsq(self, s: GroupSlice) -> torch.Tensor:
        """Sum of (T * direction)^2 over one slot. SAM's direction is g itself."""
        return self._grad_sumsq(s)

    def _grad_sumsq(self, s: GroupSlice) -> torch.Tensor:
        """Sum of (T * g)^2 over one slot's gradients as they are."""
        return ops.grad_sumsq(s.grads, s.params if s.group["adaptive"] else None, s.group["eta"], backend=self.backend)

    @staticmethod
    def _fp64_overflow(backup_sets: list[_BackupSet], sumsq: torch.Tensor) -> bool:
        """True when fp64 gradients' sum of squares overflowed fp64 (norm > ~1.3e154): finite fp32/bf16/fp16
        gradients cannot do that (their squares are summed in fp64), an inf gradient gives inf again after the
        rescale. Only models with fp64 parameters (whose gradients perturb_ requires to be fp64 too; cached with the
        backups) pay the host read it takes; under CUDA-graph capture it cannot be read, and such a step is skipped
        as if non-finite (docs/DESIGN.md section 5)."""
        if not any(b.fp64 for b in backup_sets):
            return False
        if sumsq.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        return bool(torch.isinf(sumsq).any())

    def _backups_for(self, s: GroupSlice, fresh: bool = False) -> list[torch.Tensor]:
        return self._backup_set(s, fresh).backups

    def _backup_set(self, s: GroupSlice, fresh: bool = False) -> _BackupSet:
        """The backups of one slot's parameters, laid out like them (a channels_last weight gets a channels_last
        backup, which the kernels write in place; a contiguous one would be staged through a copy every step).

        The list is reused while the slot holds the same tensors in the same memory: comparing ids and data pointers
        takes ~0.3 ms for 2000 tensors, where a dict lookup and a shape/dtype/device test per tensor took ~1.2 ms. A
        change these miss (a parameter reshaped in place) makes the op's own shape check fail: `fresh` then rebuilds
        them (_perturb_slot)."""
        key = (id(s.group), s.shard_group)
        ids, ptrs = tuple(map(id, s.params)), tuple(map(torch.Tensor.data_ptr, s.params))
        entry = self._backups.get(key)
        if fresh or entry is None or entry.group is not s.group or entry.ids != ids or entry.ptrs != ptrs:
            old = {} if entry is None or fresh else dict(zip(entry.ids, entry.backups))
            backups = [_backup_like(p, old.get(id(p))) for p in s.params]
            fp64 = any(b.dtype == torch.float64 for b in backups)
            entry = self._backups[key] = _BackupSet(s.group, list(s.params), ids, ptrs, backups, fp64)
        return entry

    @torch.no_grad()
    def _perturb(self, slots: list[GroupSlice]) -> torch.Tensor | None:
        """w <- w + e for every slot, with one global norm; returns the norm (a 0-dim device tensor, no host sync)."""
        if self._perturbed:
            raise RuntimeError("weights are already perturbed: call second_step() or restore() before first_step()")
        sumsq = self._direction_sumsq(slots)
        if sumsq is None:
            return None
        backup_sets = [self._backup_set(s) for s in slots]
        exp = 0
        if self._fp64_overflow(backup_sets, sumsq):  # the same e from gradients scaled by 2^-600 (exact), on copies
            exp = FP64_RESCALE_EXP
            slots = [replace(s, grads=torch._foreach_mul(s.grads, 2.0 ** -exp)) for s in slots]
            sumsq = self._direction_sumsq(slots, self._grad_sumsq)  # F-SAM's direction is already in s.grads
        for s, b in zip(slots, backup_sets):
            self._perturbed.append((s, self._perturb_slot(s, sumsq, b.backups)))
        return (sumsq.sqrt() * 2.0 ** exp).reshape(())  # 0-dim, like torch.nn.utils.clip_grad_norm_

    def _perturb_slot(self, s: GroupSlice, sumsq: torch.Tensor, backups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Perturb one slot with its cached backups; returns the backups used. The op validates every list before
        writing anything, so when it refuses reused backups (a parameter changed shape in place) it can run again
        with new ones."""
        g = s.group
        args = (sumsq, g["rho"], EPS, g["adaptive"], g["eta"], g["normalize"])
        try:
            ops.perturb_(s.params, s.grads, backups, *args, backend=self.backend)
        except ValueError:
            backups = self._backups_for(s, fresh=True)
            ops.perturb_(s.params, s.grads, backups, *args, backend=self.backend)
        return backups

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None
    ) -> torch.Tensor | None:
        """Perturb the weights along the current gradients: w <- w + e.

        With ``grad_scaler`` the gradients are unscaled in place first, and non-finite gradients (the overflow the
        scaler will skip) leave the weights unperturbed and advance nothing (F-SAM's EMA stays as it was); telling
        them apart costs one host sync, like GradScaler.step. Returns the global norm of the perturbation direction as a
        0-dim fp64 device tensor, like ``torch.nn.utils.clip_grad_norm_`` (inf/nan when the perturbation was skipped;
        reading it synchronizes, so only read if needed), or None when no parameter has a gradient.
        """
        self._check_groups()
        slots, already_perturbed = self._slots(), self.is_perturbed
        try:
            found_inf = None
            if grad_scaler is not None and grad_scaler.is_enabled():
                found_inf = self._unscale(slots, grad_scaler)
            if found_inf is not None and bool(found_inf):  # a host sync, as GradScaler.step makes one
                # The step the scaler will skip: no perturbation and nothing else advanced (F-SAM's EMA).
                self.last_grad_norm = torch.full((), float("inf"), dtype=torch.float64, device=found_inf.device)
            else:
                self.last_grad_norm = self._perturb(slots)
        except Exception:
            if not already_perturbed:  # (then _perturb refused to start) never leave part of the weights perturbed
                self.restore()
            self._check_grads()  # a sparse or complex gradient: say which one
            raise
        if zero_grad:
            self.zero_grad()
        return self.last_grad_norm

    @staticmethod
    def _unscale(slots: list[GroupSlice], grad_scaler: torch.amp.GradScaler) -> torch.Tensor | None:
        """Unscale the gradients in place and return how many were non-finite (a device tensor; None without
        gradients), in the one fused pass torch's GradScaler uses. Sharded slots add up their ranks' counts."""
        scale = getattr(grad_scaler, "_scale", None)  # device tensor; get_scale() would sync with the host
        if scale is None:
            raise RuntimeError("grad_scaler has no scale yet: call grad_scaler.scale(loss).backward() first")
        inv = scale.double().reciprocal().float()
        total = None
        for s in slots:
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for g in s.grads:
                buckets.setdefault((g.device, g.dtype), []).append(g)
            found_in_slot = None
            for (device, _), grads in buckets.items():
                found = torch.zeros(1, dtype=torch.float32, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv.to(device, non_blocking=True))
                found_in_slot = _add(found_in_slot, found)
            if found_in_slot is not None and s.shard_group is not None:
                dist.all_reduce(found_in_slot, group=s.shard_group)  # every rank skips, or none
            if found_in_slot is not None:
                total = _add(total, found_in_slot)
        return total

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by first_step (bit-exact). A no-op when not perturbed."""
        for slot, backups in self._perturbed:
            ops.restore_(slot.params, backups, backend=self.backend)
        self._perturbed.clear()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore w, then take the base optimizer's step with the gradients computed at w + e.

        With ``grad_scaler``, the scaler unscales those gradients and skips the step if they are not finite; the
        weights are restored first either way. Call ``grad_scaler.update()`` afterwards as usual.
        With torch.optim.SGD as the base optimizer the restore and the update run as one pass where that gives
        torch's bits exactly (see _fused_sgd_plan; ``fused_second_step = False`` turns it off).
        """
        plan = self._fused_sgd_plan() if grad_scaler is None and self.fused_second_step else None
        if plan is not None and self._fused_sgd_step(plan):
            self.base_optimizer._opt_called = True  # as its step() would record for an LR scheduler
        else:
            self.restore()
            if grad_scaler is not None:
                grad_scaler.step(self.base_optimizer)
            else:
                self.base_optimizer.step()
        self._opt_called = True  # what an LR scheduler's wrapper of step() records: the optimizer has stepped
        if zero_grad:
            self.zero_grad()

    def _fused_sgd_step(self, plan: list[tuple]) -> bool:
        """Run the plan of _fused_sgd_plan. False when its first call refused its inputs (every backend validates
        before writing, so nothing changed): second_step then runs restore() + step(), as torch would."""
        for n, (g, slot, backups, grads, bufs) in enumerate(plan):
            try:
                ops.restore_sgd_(slot.params, backups, grads, bufs, g["lr"], g["weight_decay"], g["momentum"],
                                 g["dampening"], g["nesterov"], backend=self.backend)
            except (TypeError, ValueError):
                if n == 0:
                    return False
                stepped = {id(item[1]) for item in plan[:n]}
                self._perturbed = [entry for entry in self._perturbed if id(entry[0]) not in stepped]
                self.restore()  # the groups not stepped yet: never leave weights perturbed
                raise
        self._perturbed.clear()
        return True

    def _fused_sgd_plan(self) -> list[tuple] | None:
        """(group, slot, backups, grads, momentum buffers) per perturbed slot for ops.restore_sgd_, which gives
        bit-for-bit what restore() and torch.optim.SGD.step() give; None when second_step must run those two instead:
        the base optimizer is not exactly torch.optim.SGD (its single- or multi-tensor path: no maximize, fused,
        differentiable or tensor hyperparameters, no step hooks or patched step), a tensor is not fp32 on the CPU,
        the parameters with a gradient are not the perturbed ones, or a momentum buffer does not exist yet (torch's
        first step creates it by cloning the gradient)."""
        base = self.base_optimizer
        if type(base) is not torch.optim.SGD or not self._perturbed or getattr(base, "grad_scale", None) is not None:
            return None
        step = vars(base).get("step")
        if step is not None and not getattr(step, "_wrapped_by_lr_sched", False):
            return None
        if (base._optimizer_step_pre_hooks or base._optimizer_step_post_hooks
                or _optimizer_module._global_optimizer_pre_hooks or _optimizer_module._global_optimizer_post_hooks):
            return None
        perturbed = {id(slot.group): (slot, backups) for slot, backups in self._perturbed}
        if len(perturbed) != len(self._perturbed) or any(s.params is not s.owners for s, _ in self._perturbed):
            return None  # DTensors: local shards in several slots
        plan = []
        for g in self.param_groups:
            hyper = (g["lr"], g["weight_decay"], g["momentum"], g["dampening"])
            if g["maximize"] or g.get("fused") or g.get("differentiable") or any(map(torch.is_tensor, hyper)):
                return None
            slot, backups = perturbed.pop(id(g), (None, []))
            params = [p for p in g["params"] if p.grad is not None]
            perturbed_params = [] if slot is None else slot.owners
            if len(params) != len(perturbed_params) or not all(map(operator.is_, params, perturbed_params)):
                return None
            if not params:
                continue
            grads = [p.grad for p in params]
            if not all(p.is_cpu and p.dtype == torch.float32 and gr.dtype == torch.float32
                       for p, gr in zip(params, grads)):
                return None
            bufs = [base.state[p].get("momentum_buffer") for p in params] if g["momentum"] != 0 else []
            if any(b is None for b in bufs):
                return None
            plan.append((g, slot, backups, grads, bufs))
        return plan if not perturbed else None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step. The caller has already run the first forward/backward; `closure` re-runs it (at w + e).

        Returns the closure's loss. If the closure raises, the weights are restored before the error propagates.
        """
        if closure is None:
            raise ValueError("SAM.step() needs a closure that recomputes the loss and calls backward(); "
                             "or call first_step() and second_step() yourself")
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    def msam_step(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        targets: torch.Tensor | tuple[torch.Tensor, ...],
        micro_batches: int = 1,
        method: str = "auto",
    ) -> torch.Tensor:
        """mSAM: split the batch into `micro_batches` (k) disjoint micro-batches, perturb with each one's own
        gradient, average the gradients at the k perturbed points and take the base step. k=1 is SAM.

        `loss_fn(model(*inputs_j), *targets_j)` must return the mean loss of micro-batch j. Existing gradients are
        discarded. Returns the mean unperturbed loss (a detached tensor).

        `method`:
          * "sequential": 2k micro-batch passes (sam_fused.msam), any model, DDP included.
          * "fast": the exact two-pass form (sam_fused.msam_fast), about the cost of one SAM step: models built from
            nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm and parameter-free modules, whose examples do not
            interact (no BatchNorm, no dropout in training mode). Raises ValueError with the reason otherwise.
          * "auto" (default): "fast" when k > 1, the model is supported and not DDP-wrapped, else "sequential"
            (k = 1 is plain SAM, which the sequential path already runs in two passes). The fast path's module
            checks cannot see what a forward does (examples mixed across the batch, a batch dim other than 0), so
            on first use per model and input shapes the step computes G both ways and keeps the fast path only if
            they agree (msam_fast.msam_proven); otherwise one RuntimeWarning, and that model stays sequential.
        Every call checks that loss_fn returns a 0-dim loss and that the batch is not empty (ValueError).
        Which one ran is recorded in ``self.last_msam_info``: {"method": ..., "reason": ...} and, for the fast path,
        "layers": {module name: how it was handled} (e.g. "linear low-rank", "linear materialized (ASAM)").
        The choice, and the first-use proofs (kept per optimizer in ``self._msam_proofs``), are made in
        sam_fused.msam_dispatch.
        """
        return msam_dispatch.msam_step(self, model, loss_fn, inputs, targets, micro_batches, method)

    # -- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._perturbed:
            raise RuntimeError("state_dict() while the weights are perturbed would save w + e: call second_step() "
                               "or restore() first")
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict of this class, or a checkpoint of the common per-parameter-loop SAM port (no
        'base_optimizer' entry; its per-parameter state holds only 'old_p' weight copies, which are stale and
        dropped). The port never saved its base optimizer's state, so from such a checkpoint that state starts empty
        (momentum, Adam moments rebuilt from the next step on), with a warning saying so."""
        state_dict = dict(state_dict)
        base_state = state_dict.pop("base_optimizer", None)
        if base_state is None:
            state_dict = self._from_port(state_dict)
        # Keys this class has and the checkpoint lacks (eta / normalize from the port, sigma / lmbda from a SAM
        # checkpoint loaded into FriendlySAM) keep their current values instead of vanishing from the groups. The
        # groups are checked before anything changes.
        saved_groups = [dict(g) for g in state_dict["param_groups"]]
        for saved, current in zip(saved_groups, self.param_groups):
            for key, value in current.items():
                saved.setdefault(key, value)
        for i, group in enumerate(saved_groups):
            self._check_group(group, f"the state_dict's param_groups[{i}]")
        self.restore()
        self._backups.clear()  # kept per group: the groups are replaced below
        if base_state is not None:
            self.base_optimizer.load_state_dict(base_state)
        super().load_state_dict({**state_dict, "param_groups": saved_groups})
        self.base_optimizer.param_groups = self.param_groups  # load_state_dict made new group dicts: share again
        if base_state is None:
            self.base_optimizer.state.clear()
            warnings.warn(
                "load_state_dict: this checkpoint has no 'base_optimizer' entry (the format of the per-parameter-loop "
                "SAM port, which does not save its base optimizer): the param groups (lr, rho, ...) were loaded, but "
                f"{type(self.base_optimizer).__name__}'s state (momentum, moments) starts empty", UserWarning,
                stacklevel=2)

    _STATE_KEYS: tuple[str, ...] = ()  # per-parameter state of SAM's own (F-SAM: its EMA)

    def _from_port(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint of the per-parameter-loop port, as a SAM state_dict without base optimizer state."""
        if "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups' entries")
        state = {}
        for idx, entry in state_dict["state"].items():
            foreign = sorted(set(entry) - {"old_p", *self._STATE_KEYS})
            if foreign:
                raise ValueError(
                    f"not a sam_fused state_dict nor a SAM port's: the state of parameter {idx} holds {foreign} and "
                    "there is no 'base_optimizer' entry (a base optimizer's own state_dict? load it with "
                    "opt.base_optimizer.load_state_dict)")
            kept = {k: v for k, v in entry.items() if k != "old_p"}  # old_p: the port's stale copy of the weights
            if kept:
                state[idx] = kept
        return {**state_dict, "state": state}


class FriendlySAM(SAM):
    """Friendly-SAM (F-SAM, Li et al. CVPR 2024): perturb along d = g - sigma * m, where m is an EMA of gradients.

    First step: m = g, d = g. Later: d = g - sigma * m_prev; m = lmbda * m_prev + (1 - lmbda) * g (the official order).
    sigma=0 is SAM. The EMA lives in ``state[p]["fsam_ema"]`` and is checkpointed.
    """

    HYPERPARAMETERS: ClassVar[dict[str, Range | None]] = {
        "sigma": FP32_FINITE, "lmbda": Range(0.0, 1.0, "a number in [0, 1]"),
    }
    _STATE_KEYS = ("fsam_ema",)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        eta: float = 0.0,
        normalize: bool = True,
        backend: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho, adaptive, eta, normalize, backend, sigma=sigma, lmbda=lmbda,
                         **base_kwargs)

    def _slot_sumsq(self, s: GroupSlice) -> torch.Tensor:
        """grads <- d in place (and the EMA advanced); returns the sum of (T * d)^2."""
        g, total = s.group, None
        # Parameters seen for the first time start their EMA (first=True); split them from the others.
        new = [("fsam_ema" not in self.state[p]) for p in s.owners]
        for first in (True, False):
            idx = [i for i, is_new in enumerate(new) if is_new == first]
            if not idx:
                continue
            params = [s.params[i] for i in idx]
            if first:  # the EMA is laid out like its parameter (a DTensor for a sharded one), for checkpoints
                for i in idx:
                    self.state[s.owners[i]]["fsam_ema"] = torch.empty_like(s.owners[i])
            ema = [local_tensor(self.state[s.owners[i]]["fsam_ema"])[0] for i in idx]
            part = ops.fsam_direction_([s.grads[i] for i in idx], ema, g["sigma"], g["lmbda"], first,
                                       params if g["adaptive"] else None, g["eta"], backend=self.backend)
            total = _add(total, part)
        return total

    def msam_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError("msam_step is defined for SAM/ASAM; F-SAM's EMA has no micro-batch form here")
