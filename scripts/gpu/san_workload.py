"""Small workload for compute-sanitizer (run by gpu_check.sh's optional `sanitize` stage): every op of the cuda and
triton backends on fp32 and bf16 lists whose tensors END at their allocation's end (so a tail overrun is caught even
with the caching allocator off), misaligned starts (scalar path), odd sizes, k = 2 slices, two launches.
Usage: python scripts/gpu/san_workload.py cuda,triton (under compute-sanitizer --tool memcheck / racecheck)."""
import sys

import torch

import sam_fused  # noqa: F401
from sam_fused import ops

dev = torch.device("cuda")
backends = [b for b in sys.argv[1].split(",") if sam_fused.backends()[b].available] if len(sys.argv) > 1 else ["cuda"]
SHAPES = [(1,), (7,), (33, 5), (3, 4, 5, 6), (16384 + 9,), (2 * 16384,)]


def own(shape, dtype, offset, lead=None):
    """A contiguous tensor of `shape` that starts `offset` elements into, and ends exactly at, its own buffer."""
    full = ((lead,) if lead else ()) + tuple(shape)
    n = 1
    for d in full:
        n *= d
    buf = torch.empty(n + offset, dtype=dtype, device=dev)
    v = buf[offset:].view(full)
    v.copy_(torch.randn(full).to(dtype))
    return v


for backend in backends:
    for dtype in (torch.float32, torch.bfloat16):
        for off in (0, 1):
            P = [own(s, dtype, off) for s in SHAPES]
            G = [own(s, dtype, (off + 1) % 2) for s in SHAPES]
            B = [own(s, dtype, off) for s in SHAPES]
            KG = [own(s, dtype, off, lead=2) for s in SHAPES]
            s = ops.grad_sumsq(G, P, 0.01, backend=backend)
            ops.perturb_(P, G, B, s, 0.05, adaptive=True, eta=0.01, backend=backend)
            ops.restore_(P, B, backend=backend)
            sk = ops.grad_sumsq(KG, P, 0.01, 2, backend=backend)
            ops.perturb_batched(P, KG, sk, 0.05, backend=backend)
            ops.fsam_direction_(G, B, 0.7, 0.6, True, P, 0.01, backend=backend)
            ops.fsam_direction_(G, B, 0.7, 0.6, False, None, 0.0, backend=backend)
    many = [own((i % 37 + 1,), torch.float32, i % 3) for i in range(200)]  # several launches (slot limit)
    ops.restore_(many, [m.clone() for m in many], backend=backend)
    ops.grad_sumsq(many, backend=backend)
torch.cuda.synchronize()
print("SAN_WORKLOAD_DONE", backends)
