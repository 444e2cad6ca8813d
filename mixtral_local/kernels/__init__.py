"""MoE kernels: ``moe_reference`` (pure torch, any device) and ``fused_moe`` (Triton, CUDA).

Importing this package needs torch alone; triton is imported only when ``fused_moe`` is first used.
"""

from __future__ import annotations

from .reference import moe_reference, route

__all__ = ["moe_reference", "route"]
