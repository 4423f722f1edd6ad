# register.py — makes the Triton kernels the implementations of the sam_fused_triton::<op> ops.
#
# The schemas (with their mutated lists declared, Tensor(a!)[]) and the fake impls are defined in
# sam_fused/_registry.py; here the Python wrappers of grad_sumsq.py, perturb.py and fsam_direction.py are registered
# for the CUDA dispatch key, and additionally for CPU when TRITON_INTERPRET=1 was set at import: then the kernels are
# executed by the Triton interpreter on CPU tensors, which is how they are tested on machines without a GPU.
from __future__ import annotations

import torch

from sam_fused import _registry  # defines the sam_fused_triton namespace and its schemas

from .checks import INTERPRET
from .fsam_direction import fsam_direction_
from .grad_sumsq import grad_sumsq
from .perturb import perturb_, perturb_batched, restore_

IMPLS = {
    "grad_sumsq": grad_sumsq,
    "perturb_": perturb_,
    "perturb_batched": perturb_batched,
    "restore_": restore_,
    "fsam_direction_": fsam_direction_,
}
assert set(IMPLS) == set(_registry.OPS), "every op of sam_fused/_registry.py needs a Triton implementation"

DISPATCH_KEYS: tuple[str, ...] = ("CUDA", "CPU") if INTERPRET else ("CUDA",)

_lib = torch.library.Library("sam_fused_triton", "IMPL")  # module-level: dropping it would unregister the kernels
for _name, _fn in IMPLS.items():
    for _key in DISPATCH_KEYS:
        _lib.impl(_name, _fn, _key)
