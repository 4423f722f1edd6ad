"""Per-layer math of the exact fast mSAM path (sam_fused.msam_fast): small functions with shape comments.

Notation: the batch of n examples is split along dim 0 into k micro-batches B_1..B_k of equal size; a layer input
with leading dims [n, ...] is viewed as [k, r, f], r = rows of one micro-batch (examples x positions), f = features.
For micro-batch j, x_j [r, in] are a linear layer's inputs and delta_j [r, out] the gradients of L_{B_j} at its
outputs; g_j(W) = delta_j^T x_j and g_j(b) = colsum(delta_j). With s_j the micro-batch's scale (rho / (||g_j|| + eps),
or rho unnormalized), the perturbed weight is W + s_j delta_j^T x_j, so for any input rows h_j:

    h_j (W + s_j delta_j^T x_j)^T = h_j W^T + (h_j x_j^T) (s_j delta_j)          (low rank: r columns)
    ||delta_j^T x_j||_F^2 = <x_j x_j^T, delta_j delta_j^T>_F                       ("ghost" norm)

For an embedding table, g_j is nonzero only on the rows of the token ids in B_j (row v: the sum of delta_j over the
tokens with id v), so (W + E_j)[idx] = W[idx] + E_j[idx] needs only those (micro-batch, id) rows, ASAM's T^2 included
(it is elementwise, so it keeps the sparsity). When T^2 breaks the low rank of a linear layer's g_j (ASAM), or r is
large, g_j is materialized per micro-batch ([k, out, in]) and the second pass runs a batched GEMM.

All of these are identities, not approximations: the fast path is exact up to floating-point rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function

# -- rows of micro-batches ----------------------------------------------------------------------------------------


def split_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """[n, ..., f] -> [k, r, f]: micro-batch j's rows (all its examples and positions) in slice j.

    Valid because micro-batches are consecutive blocks along dim 0 (torch.chunk) and dims are row-major.
    """
    return t.reshape(k, -1, t.shape[-1])


def join_calls(parts: list[torch.Tensor]) -> torch.Tensor:
    """A layer called several times in one forward: its gradient sums over calls, i.e. the rows concatenate.

    parts: [k, r_c, f] per call -> [k, sum r_c, f].
    """
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


# -- linear layers ------------------------------------------------------------------------------------------------


def ghost_sumsq(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||delta_j^T x_j||_F^2 per micro-batch without forming the [out, in] gradient. x [k, r, in], delta [k, r, out]
    -> fp32 [k]. Costs k r^2 (in + out) multiply-adds instead of k r in out."""
    x, delta = x.float(), delta.float()
    xx = torch.bmm(x, x.transpose(1, 2))  # [k, r, r]
    dd = torch.bmm(delta, delta.transpose(1, 2))  # [k, r, r]
    return (xx * dd).sum(dim=(1, 2))


def weight_grads(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-micro-batch weight gradients g_j = delta_j^T x_j: x [k, r, in], delta [k, r, out] -> [k, out, in]."""
    return torch.bmm(delta.transpose(1, 2), x)


def bias_grads(delta: torch.Tensor) -> torch.Tensor:
    """Per-micro-batch bias gradients colsum(delta_j): delta [k, r, out] -> [k, out]."""
    return delta.sum(dim=1)


def at_perturbed(param: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """The value `perturbed` ([k, *p], w + e_j for each j, a constant), with the gradient routed to `param` ([*p]).

    perturbed + (w - w) is perturbed exactly (w - w is 0 for finite w), and its gradient with respect to w is the sum
    over j of the gradients of the k copies: the gradient at w + e_j, accumulated into w, as SAM's second pass does.
    """
    return perturbed + (param - param.detach())


def low_rank_linear(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, delta_scaled: torch.Tensor,
    bias_k: torch.Tensor | None,
) -> torch.Tensor:
    """y_j = h_j W^T + bias + (h_j x_j^T)(s_j delta_j) + bias_k[j]: micro-batch j's rows through W + s_j delta_j^T x_j.

    h [n, ..., in]; weight [out, in]; bias [out] or None (the unperturbed bias, if any, added to every row);
    x [k, r, in] and delta_scaled [k, r, out] (s_j delta_j, constants) from the first pass, or None when the weight
    is not perturbed; bias_k [k, out] or None (a per-micro-batch bias, used when the bias is perturbed).
    One full-batch GEMM plus two thin batched GEMMs of width r; the weight's gradient comes from the full GEMM only.
    """
    y = F.linear(h, weight, bias)  # [n, ..., out]
    k = (x if x is not None else bias_k).shape[0]
    y3 = y.view(k, -1, y.shape[-1])  # [k, R, out]
    if x is not None:
        h3 = split_rows(h, k)  # [k, R, in]
        y3 = torch.baddbmm(y3, torch.bmm(h3, x.transpose(1, 2)), delta_scaled)  # + [k, R, r] @ [k, r, out]
    if bias_k is not None:
        y3 = y3 + bias_k.unsqueeze(1)
    return y3.view(y.shape)


class MaterializedLinear(Function):
    """Micro-batch j's rows through its own weights: y_j = h_j W_j^T + b_j, W_j = W + E_j, b_j = b + e_j (constants).

    The gradient with respect to W is sum_j delta'_j^T h_j = delta'^T h over all rows: one full-batch GEMM, so no
    per-micro-batch weight gradient ([k, out, in]) is formed or reduced; the input gradient is delta'_j W_j (a batched
    GEMM). h [n, ..., in]; weight [out, in] and bias [out] or None receive the gradients; weight_k [k, out, in] and
    bias_k [k, out] (or None: the unperturbed bias) are the values used.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_k: torch.Tensor,
                bias_k: torch.Tensor | None) -> torch.Tensor:
        k, d_out = weight_k.shape[0], weight_k.shape[1]
        h3 = split_rows(h, k)  # [k, R, in]
        wt = weight_k.transpose(1, 2)  # [k, in, out]
        # Written through a view into a tensor of the output's shape: the output must not be a view (ReLU inplace).
        y = h.new_empty(*h.shape[:-1], d_out)
        y3 = y.view(k, -1, d_out)  # [k, R, out]
        if bias_k is not None:
            torch.baddbmm(bias_k.unsqueeze(1), h3, wt, out=y3)
        elif bias is not None:
            torch.baddbmm(bias.view(1, 1, d_out), h3, wt, out=y3)
        else:
            torch.bmm(h3, wt, out=y3)
        ctx.save_for_backward(h, weight_k)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        h, weight_k = ctx.saved_tensors
        k, d_out, d_in = weight_k.shape
        dy2 = dy.reshape(-1, d_out)  # [N, out]
        dh = dw = db = None
        if ctx.needs_input_grad[0]:
            dh = torch.bmm(dy2.view(k, -1, d_out), weight_k).view(h.shape)  # [k, R, out] @ [k, out, in]
        if ctx.needs_input_grad[1]:
            dw = dy2.t() @ h.reshape(-1, d_in)  # [out, N] @ [N, in]: the full-batch weight gradient
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(dim=0)
        return dh, dw, db, None, None


# -- elementwise-parameter layers (LayerNorm, RMSNorm) -------------------------------------------------------------


def batched_affine(x_hat: torch.Tensor, weight_k: torch.Tensor | None, bias_k: torch.Tensor | None) -> torch.Tensor:
    """Micro-batch j's rows scaled by weight_k[j] and shifted by bias_k[j]. x_hat [n, ..., *shape] (normalized),
    weight_k / bias_k [k, *shape] or None -> [n, ..., *shape]."""
    ref = weight_k if weight_k is not None else bias_k
    if ref is None:
        return x_hat
    k, features = ref.shape[0], ref[0].numel()
    y = x_hat.reshape(k, -1, features)  # [k, R, F]
    if weight_k is not None:
        y = y * weight_k.reshape(k, 1, features)
    if bias_k is not None:
        y = y + bias_k.reshape(k, 1, features)
    return y.reshape(x_hat.shape)


# -- embeddings ---------------------------------------------------------------------------------------------------


def embedding_keys(idx: torch.Tensor, k: int, num_rows: int) -> torch.Tensor:
    """(micro-batch, table row) pairs as one int64 key j * V + row: idx [k, r] -> [k, r]."""
    offsets = torch.arange(k, device=idx.device, dtype=torch.int64).unsqueeze(1) * num_rows
    return idx.to(torch.int64) + offsets


def embedding_segments(
    idx: torch.Tensor, delta: torch.Tensor, num_rows: int, padding_idx: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nonzero rows of every micro-batch's table gradient: (keys [U] sorted, rows [U, d]).

    idx [k, r] token ids, delta [k, r, d] gradients at the embedding outputs. g_j[v] = sum of delta_j over the tokens
    of micro-batch j with id v; one segment per distinct (j, v) pair, so the sparse perturbation is exact. The padding
    row gets no gradient (as in F.embedding's backward).
    """
    k, d = delta.shape[0], delta.shape[-1]
    if padding_idx is not None:
        delta = delta.masked_fill((idx == padding_idx).unsqueeze(-1), 0.0)
    keys, inverse = torch.unique(embedding_keys(idx, k, num_rows).reshape(-1), sorted=True, return_inverse=True)
    rows = torch.zeros(keys.numel(), d, dtype=delta.dtype, device=delta.device)
    rows.index_add_(0, inverse, delta.reshape(-1, d))  # [U, d]
    return keys, rows


def embedding_lookup(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """values[u] where keys[u] == query, zero rows where the key is absent. keys [U] sorted, values [U, d],
    query [...] -> [..., d]."""
    pos = torch.searchsorted(keys, query).clamp_(max=max(keys.numel() - 1, 0))
    found = keys[pos] == query
    return values[pos] * found.unsqueeze(-1).to(values.dtype)


# -- first-pass autograd functions: record the gradient at a layer's outputs, compute no weight gradient ------------


class LinearRecordingOutputGrad(Function):
    """y = x W^T + b whose backward stores dL/dy in `slot["delta"]` and returns only dL/dx (no weight GEMM).

    A custom function rather than a tensor hook: its output is a fresh tensor, so a later in-place op on it (ReLU
    with inplace=True) does not change which gradient is recorded. `anchor` is a scalar leaf shared by every recording
    function; asking autograd for its gradient makes every recording backward run.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, anchor: torch.Tensor,
                slot: dict) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.slot = slot
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        ctx.slot["delta"] = dy
        (weight,) = ctx.saved_tensors
        dx = dy @ weight if ctx.needs_input_grad[0] else None  # [n, ..., out] @ [out, in]
        return dx, None, None, None, None


class EmbeddingRecordingOutputGrad(Function):
    """y = W[idx] whose backward stores dL/dy in `slot["delta"]` (the indices have no gradient)."""

    @staticmethod
    def forward(ctx: Any, idx: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, anchor: torch.Tensor,
                slot: dict) -> torch.Tensor:
        ctx.slot = slot
        return F.embedding(idx, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        ctx.slot["delta"] = dy
        return None, None, None, None, None
