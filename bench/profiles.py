"""Parameter-shape profiles for the benchmarks, generated in code (no torchvision, no downloads).

docs/DESIGN.md section 8 fixes the profiles because the fused kernels win for different reasons on each:
ResNet-50 has many small BatchNorm vectors next to large convs, ViT-B/16 has few large matrices (pure bandwidth), and
"many_small" (2000 x 2048) is where per-tensor Python and launch overhead dominates. "tiny" is for smoke tests.
Shapes follow torchvision's parameter order and names, so a row can be traced back to a real layer.
"""

from __future__ import annotations

import math

import torch

Shape = tuple[int, ...]
NamedShapes = list[tuple[str, Shape]]
Tensors = list[torch.Tensor]


def _conv_bn(out: NamedShapes, conv: str, bn: str, cout: int, cin: int, kernel: int) -> None:
    out.append((f"{conv}.weight", (cout, cin, kernel, kernel)))  # torchvision's ResNet convs have no bias
    out.append((f"{bn}.weight", (cout,)))
    out.append((f"{bn}.bias", (cout,)))


def resnet50_shapes(blocks: tuple[int, ...] = (3, 4, 6, 3), classes: int = 1000) -> NamedShapes:
    """torchvision resnet50: 7x7 stem, 4 stages of bottlenecks (1x1, 3x3, 1x1 with 4x expansion), fc."""
    out: NamedShapes = []
    _conv_bn(out, "conv1", "bn1", 64, 3, 7)
    inplanes = 64
    for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(depth):
            name = f"layer{stage}.{b}"
            _conv_bn(out, f"{name}.conv1", f"{name}.bn1", width, inplanes, 1)
            _conv_bn(out, f"{name}.conv2", f"{name}.bn2", width, width, 3)
            _conv_bn(out, f"{name}.conv3", f"{name}.bn3", width * 4, width, 1)
            if b == 0:  # the first block of a stage changes the channel count: projection shortcut
                _conv_bn(out, f"{name}.downsample.0", f"{name}.downsample.1", width * 4, inplanes, 1)
            inplanes = width * 4
    out += [("fc.weight", (classes, inplanes)), ("fc.bias", (classes,))]
    return out


def vit_b16_shapes(dim: int = 768, depth: int = 12, mlp: int = 3072, patch: int = 16, image: int = 224,
                   classes: int = 1000) -> NamedShapes:
    """torchvision vit_b_16: patch-embedding conv, class token, position embedding, pre-LN blocks, head."""
    tokens = (image // patch) ** 2 + 1  # 196 patches + the class token
    out: NamedShapes = [
        ("class_token", (1, 1, dim)),
        ("conv_proj.weight", (dim, 3, patch, patch)),
        ("conv_proj.bias", (dim,)),
        ("encoder.pos_embedding", (1, tokens, dim)),
    ]
    for i in range(depth):
        name = f"encoder.layers.encoder_layer_{i}"
        out += [
            (f"{name}.ln_1.weight", (dim,)),
            (f"{name}.ln_1.bias", (dim,)),
            (f"{name}.self_attention.in_proj_weight", (3 * dim, dim)),  # q, k, v stacked
            (f"{name}.self_attention.in_proj_bias", (3 * dim,)),
            (f"{name}.self_attention.out_proj.weight", (dim, dim)),
            (f"{name}.self_attention.out_proj.bias", (dim,)),
            (f"{name}.ln_2.weight", (dim,)),
            (f"{name}.ln_2.bias", (dim,)),
            (f"{name}.mlp.0.weight", (mlp, dim)),
            (f"{name}.mlp.0.bias", (mlp,)),
            (f"{name}.mlp.3.weight", (dim, mlp)),
            (f"{name}.mlp.3.bias", (dim,)),
        ]
    out += [("encoder.ln.weight", (dim,)), ("encoder.ln.bias", (dim,)),
            ("heads.head.weight", (classes, dim)), ("heads.head.bias", (classes,))]
    return out


def many_small_shapes(count: int = 2000, numel: int = 2048) -> NamedShapes:
    return [(f"t{i}", (numel,)) for i in range(count)]


def tiny_shapes() -> NamedShapes:
    """A few mixed shapes (4-d, 2-d, odd sizes, a scalar-like vector): enough to exercise every code path fast."""
    return [("conv.weight", (8, 3, 3, 3)), ("bn.weight", (8,)), ("bn.bias", (8,)), ("proj.weight", (10, 8, 1, 1)),
            ("fc.weight", (7, 13)), ("fc.bias", (7,)), ("scale", (1,)), ("emb", (3, 5, 11))]


PROFILES = {"resnet50": resnet50_shapes, "vit_b16": vit_b16_shapes, "many_small": many_small_shapes,
            "tiny": tiny_shapes}

# (tensors, parameters) of the real models: a wrong shape anywhere would change one of these numbers.
EXPECTED = {"resnet50": (161, 25_557_032), "vit_b16": (152, 86_567_656), "many_small": (2000, 4_096_000)}


def numel(shapes: NamedShapes) -> int:
    return sum(math.prod(shape) for _, shape in shapes)


def shapes(name: str) -> NamedShapes:
    """The named shapes of profile `name`, checked against the real model's tensor and parameter counts."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
    out = PROFILES[name]()
    if name in EXPECTED:
        got = (len(out), numel(out))
        assert got == EXPECTED[name], f"profile {name}: {got} (tensors, params), expected {EXPECTED[name]}"
    return out


def materialize(named: NamedShapes, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> tuple[Tensors, Tensors, Tensors]:
    """(params, grads, backups): random weights and gradients, backups a valid copy of the weights.

    Generated on the target device (no host-to-device copy of ~1 GB for ViT-B). Backups start equal to the weights so
    that restore_ timed on its own puts back a real state.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=gen, device=device, dtype=dtype) for _, s in named]
    grads = [torch.randn(s, generator=gen, device=device, dtype=dtype).mul_(1e-2) for _, s in named]
    backups = [p.clone() for p in params]
    return params, grads, backups
