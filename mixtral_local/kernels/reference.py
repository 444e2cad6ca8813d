"""Pure-torch MoE: the reference every fused kernel is checked against, and the CPU path of the model.

Shapes: M tokens, H hidden, I expert FFN width, E experts.
    hidden        [M, H]
    w13           [E, 2I, H]   gate rows (w1) first, then up rows (w3)
    w2            [E, H, I]    down projection
    router_logits [M, E]
Routing as Mixtral's: softmax over the E logits (in fp32), top-k, renormalise the k weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["moe_reference", "route"]


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
) -> torch.Tensor:
    """SiLU(x @ w1.T) * (x @ w3.T) @ w2.T per routed expert, weighted by the routing weight and summed."""
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
        gate_up = x @ w13[e].t()  # [m_e, 2I]
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [m_e, I]
        y = (act @ w2[e].t()) * weights[token_idx, slot, None]  # [m_e, H]
        out.index_add_(0, token_idx, y)
    return out
