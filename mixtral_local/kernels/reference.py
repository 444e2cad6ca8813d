"""Pure-torch MoE: the reference every fused kernel is checked against, and the CPU path of the model.

Shapes: M tokens, H hidden, I expert FFN width, E experts.
    hidden        [M, H]
    w13           [E, 2I, H]   gate rows (w1) first, then up rows (w3)
    w2            [E, H, I]    down projection
    router_logits [M, E]
Routing as Mixtral's: softmax over the E logits (in fp32), top-k, renormalise the k weights.

Int8 weight-only experts (``quantize_rows``): w13 and w2 are int8 and ``w13_scale`` [E, 2I] / ``w2_scale``
[E, H] hold each output row's scale, so that row r of expert e is ``w[e, r] * scale[e, r]``. The scale
factors out of the row's dot product, so it is applied to the product, not to the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dequantize_rows", "moe_reference", "quantize_rows", "route", "scale_pair"]

#: largest magnitude of a quantized weight (symmetric: -127..127, so negating a row never overflows)
INT8_MAX = 127


def quantize_rows(weights: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (q int8 shaped like ``weights``, scale [..., rows] in ``scale_dtype``).

    The scale is rounded to ``scale_dtype`` first and the row divided by that rounded scale, so
    ``q * scale`` is the row to within half a step however coarse ``scale_dtype`` is; a row of zeros gets a
    scale of 1.
    """
    w = weights.to(torch.float32, copy=True)  # the one float32 temporary: the rest works in place
    low, high = torch.aminmax(w, dim=-1)
    absmax = torch.maximum(high, low.neg_())
    scale = torch.where(absmax > 0, absmax / INT8_MAX, 1.0).to(scale_dtype)
    q = w.div_(scale.float().unsqueeze(-1)).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def scale_pair(
    w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The row scales of int8 experts as a pair, or None for float weights; one without the other is refused."""
    if w13_scale is None and w2_scale is None:
        return None
    if w13_scale is None or w2_scale is None:
        raise ValueError("int8 experts need both w13_scale and w2_scale (or neither, for float weights)")
    return w13_scale, w2_scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weights that ``quantize_rows`` stands for, in ``dtype``."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: (weights [M, k] fp32 summing to 1 per row, expert ids [M, k] int64)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int = 2,
    *,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """SiLU(x @ w1.T) * (x @ w3.T) @ w2.T per routed expert, weighted by the routing weight and summed.

    With ``w13_scale`` and ``w2_scale`` the weights are int8 (``quantize_rows``): each touched expert's rows
    are widened to hidden's dtype for its product, which is then scaled row by row.
    """
    scale_pair(w13_scale, w2_scale)
    m, h = hidden.shape
    n_experts, two_i, _ = w13.shape
    inter = two_i // 2
    weights, ids = route(router_logits, top_k)  # [M, k], [M, k]
    weights = weights.to(hidden.dtype)
    out = torch.zeros_like(hidden)  # [M, H]
    # one pass per expert that received tokens: gather its tokens, run its FFN, scatter-add back
    hit = torch.zeros(n_experts, dtype=torch.bool, device=ids.device)
    hit[ids.flatten()] = True
    for e in hit.nonzero().flatten().tolist():
        token_idx, slot = (ids == e).nonzero(as_tuple=True)  # which tokens chose e, and in which top-k slot
        x = hidden[token_idx]  # [m_e, H]
        gate_up = expert_linear(x, w13, w13_scale, e)  # [m_e, 2I]
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [m_e, I]
        y = expert_linear(act, w2, w2_scale, e) * weights[token_idx, slot, None]  # [m_e, H]
        out.index_add_(0, token_idx, y)
    return out


def expert_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, e: int) -> torch.Tensor:
    """``x @ w[e].T`` in x's dtype; with ``scale`` (int8 ``w``), each output column times its row's scale."""
    if scale is None:
        return F.linear(x, w[e])
    return F.linear(x, w[e].to(x.dtype)) * scale[e].to(x.dtype)
