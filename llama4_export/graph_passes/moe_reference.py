"""Semantics of the fused `Llama4MoE` op, defined once in numpy: the reference every lowering and kernel is tested against.

Weights in checkpoint layout: router [E, H]; gate_up [E, H, 2I] (gate = first I columns), down [E, I, H] used as x @ W;
shared expert gate/up [I, H] and down [H, I] in nn.Linear layout (y = x @ W.T).
"""

from __future__ import annotations

import numpy as np
from .errors import GraphPassError


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def route_top1(x: np.ndarray, router: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 routing: (expert index [N], sigmoid of the selected logit [N])."""
    logits = x @ router.T
    index = logits.argmax(axis=-1)
    top = np.take_along_axis(logits, index[:, None], axis=-1)[:, 0]
    return index, 1.0 / (1.0 + np.exp(-top))


def llama4_moe(
    x: np.ndarray,
    router: np.ndarray,
    gate_up: np.ndarray,
    down: np.ndarray,
    shared_gate: np.ndarray,
    shared_up: np.ndarray,
    shared_down: np.ndarray,
) -> np.ndarray:
    """out = shared(x) + expert_e(x * sigmoid(logit_e)), e = argmax(x @ router.T). x: [N, H] → [N, H]."""
    x = np.asarray(x, dtype=np.float64)
    index, score = route_top1(x, router)
    routed_in = x * score[:, None]
    inter = gate_up.shape[-1] // 2
    gu = np.einsum("nh,nhk->nk", routed_in, gate_up[index])
    routed = np.einsum("ni,nih->nh", _silu(gu[:, :inter]) * gu[:, inter:], down[index])
    shared = (_silu(x @ shared_gate.T) * (x @ shared_up.T)) @ shared_down.T
    return shared + routed


def llama4_moe_node(
    x: np.ndarray,
    router: np.ndarray,
    gate_up: np.ndarray,
    down: np.ndarray,
    shared_gate: np.ndarray,
    shared_up: np.ndarray,
    shared_down: np.ndarray,
    *,
    num_experts: int,
    top_k: int = 1,
    activation: str = "swiglu",
) -> np.ndarray:
    """The `Llama4MoE` node (ops.py) and the TensorRT plugin node: attributes checked, output in x's dtype."""
    if (num_experts, top_k, activation) != (router.shape[0], 1, "swiglu"):
        raise GraphPassError(
            f"Llama4MoE node: num_experts={num_experts}, top_k={top_k}, activation={activation!r} but the router has "
            f"{router.shape[0]} experts; only top_k=1 and 'swiglu' exist in Llama 4 (re-run the graph passes)"
        )
    return llama4_moe(x, router, gate_up, down, shared_gate, shared_up, shared_down).astype(x.dtype)
