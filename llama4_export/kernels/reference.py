"""Torch references for the MoE kernels, one per kernel, with the semantics of graph_passes/moe_reference.py.

They touch only the selected experts' weights (a loop over the experts that were picked, dequantizing each once), so
they double as the PyTorch baseline in benchmarks/moe_kernels.py and as the CPU fallback of ``moe_forward``.
``compute_dtype`` is the dtype of the matmuls (fp32 by default; float64 in tests, bf16 for a fair GPU baseline); the
router logits are at least fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import ExpertWeight, MoEWeights


def route_top1(x: torch.Tensor, router: torch.Tensor, compute_dtype: torch.dtype = torch.float32
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], router [E, H] → (expert int64 [T], first maximum on ties; sigmoid of its logit [T], compute_dtype)."""
    logits = x.to(compute_dtype) @ router.to(compute_dtype).T
    index = logits.argmax(dim=-1)
    return index, torch.sigmoid(logits.gather(-1, index[:, None])[:, 0])


def expert_swiglu(x: torch.Tensor, experts: torch.Tensor, row_scale: torch.Tensor | None, gate: ExpertWeight,
                  up: ExpertWeight, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """h[t] = silu(xs[t] @ gate[e_t]) * (xs[t] @ up[e_t]) with xs = x * row_scale[:, None]. x [T, K] → [T, N]."""
    xs = x.to(compute_dtype)
    if row_scale is not None:
        xs = xs * row_scale.to(compute_dtype)[:, None]
    out = torch.empty(x.shape[0], gate.shape[2], dtype=compute_dtype, device=x.device)
    for e in torch.unique(experts).tolist():
        rows = (experts == e).nonzero()[:, 0]
        selected = torch.tensor([e], device=x.device)
        g = xs[rows] @ gate.dequantize(selected, compute_dtype)[0]
        u = xs[rows] @ up.dequantize(selected, compute_dtype)[0]
        out[rows] = F.silu(g) * u
    return out


def expert_matmul(h: torch.Tensor, experts: torch.Tensor, weight: ExpertWeight,
                  compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y[t] = h[t] @ weight[e_t]. h [T, K] → [T, N]."""
    hc = h.to(compute_dtype)
    out = torch.empty(h.shape[0], weight.shape[2], dtype=compute_dtype, device=h.device)
    for e in torch.unique(experts).tolist():
        rows = (experts == e).nonzero()[:, 0]
        out[rows] = hc[rows] @ weight.dequantize(torch.tensor([e], device=h.device), compute_dtype)[0]
    return out


def moe_reference(x: torch.Tensor, weights: MoEWeights, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out = shared(x) + expert_e(x * sigmoid(logit_e)), e = argmax(x @ router.T). x [..., H] → [..., H] in x.dtype."""
    flat = x.reshape(-1, x.shape[-1])
    # Routing is an argmax: never in 16-bit (a bf16 baseline would pick other experts than fp32 logits do).
    experts, score = route_top1(flat, weights.router, torch.promote_types(compute_dtype, torch.float32))
    routed = expert_matmul(expert_swiglu(flat, experts, score, weights.gate, weights.up, compute_dtype),
                           experts, weights.down, compute_dtype)
    everyone = torch.zeros_like(experts)  # the shared expert is one "expert" every token picks, unscaled
    shared = expert_matmul(expert_swiglu(flat, everyone, None, weights.shared_gate, weights.shared_up, compute_dtype),
                           everyone, weights.shared_down, compute_dtype)
    return (shared + routed).to(x.dtype).reshape(x.shape)
