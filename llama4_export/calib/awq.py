"""AWQ: activation-aware per-input-channel scales, searched on calibration statistics and folded into the model.

For a group of linears sharing one input x (weights W_j [N_j, K]), scaling input channel k by s_k
(x' = x / s, W'_j = W_j · diag(s)) leaves the float model unchanged but moves quantization error away from the
channels with large activations. s = mean|x|^α (normalized by sqrt(max·min)); α is searched on a grid, minimizing
Σ_j tr(ΔW_j Σ ΔW_jᵀ), the exact output MSE over the calibration tokens (Σ = E[x xᵀ], stats.py), where
ΔW_j = (Q(W'_j) - W'_j) · diag(1/s). α = 0 (s = 1) is RTN itself, so AWQ is never worse than RTN on calibration data.
Then AWQ's clipping search: per output row and block, the fraction (1.0 … 0.5) of the block's amax to quantize with,
minimizing that block's output MSE; the fp32 weights are clipped to it, so the graph's plain blockwise quantizer
(scale = amax / 7) reproduces the searched range. Every quantized linear gets it, o_proj included.

Where s is folded (exact in float arithmetic up to rounding), per layer type:
  q/k/v_proj        one s shared by the three (one input); 1/s into input_layernorm.weight.
  dense MLP / MoE   gate_proj, up_proj (shared expert or dense MLP) and every routed expert's gate_up share the
  gate+up           post_attention_layernorm output: one s, Σ summed over the consumers (routed experts with their own
                    routed-token Σ); 1/s into post_attention_layernorm.weight; the router (unquantized) reads the same
                    norm output, so its weight columns are multiplied by s (exact compensation).
  down_proj         per MLP (and per routed expert): 1/s into the rows of up_proj (the up half of the expert's gate_up)
                    — exact for SwiGLU, silu(g)·(u/s) = (silu(g)·u)/s. Row scaling of up_proj does not change its own
                    blockwise quantization (each row's blocks scale together), so the order of searches is free.
  o_proj            skipped: its input is attention output; folding into v_proj would have to respect GQA grouping
                    (one v head serves several o_proj column groups) — left to RTN.
  lm_head           unquantized by default; when quantized, RTN.
"""

from __future__ import annotations

import numpy as np
import torch

ALPHAS = tuple(i / 20 for i in range(21))
CLIP_RATIOS = tuple(1 - i / 20 for i in range(11))  # 1.0 … 0.5 of each block's amax


def fake_quant_int4(w_nk: torch.Tensor, block: int) -> torch.Tensor:
    """Q(W) for W [..., N, K] in nn.Linear layout, blocks along K: the same values as quantize.int4_blockwise."""
    *lead, k = w_nk.shape
    blocks = -(-k // block)
    padded = torch.zeros(*lead, blocks * block, dtype=torch.float32)
    padded[..., :k] = w_nk
    grouped = padded.reshape(*lead, blocks, block)
    scale = grouped.abs().amax(-1, keepdim=True) / 7
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(grouped / scale), -7, 7) * scale).reshape(*lead, blocks * block)[..., :k]


def _error(weights: list[torch.Tensor], grams: list[torch.Tensor], s: torch.Tensor, block: int) -> float:
    total = 0.0
    for w, gram in zip(weights, grams):
        scaled = w * s
        delta = (fake_quant_int4(scaled, block) - scaled) / s
        total += float(((delta @ gram) * delta).sum())
    return total


def clip_weights(w_nk: torch.Tensor, gram: torch.Tensor, block: int) -> torch.Tensor:
    """AWQ's clipping search: per output row and block, the clip ratio c of the block's amax minimizing that block's
    output MSE Δ Σ_bb Δᵀ (Σ_bb: the block's diagonal block of the Gram matrix); returns W clipped to ±c·amax, so the
    plain blockwise quantizer (scale = amax / 7) then quantizes it with the searched range."""
    n, k = w_nk.shape
    if k % block:
        return w_nk  # a partial block: left to RTN
    groups = k // block
    wb = w_nk.reshape(n, groups, block)
    amax = wb.abs().amax(-1)  # [N, G]
    gram_blocks = torch.stack([gram[g * block:(g + 1) * block, g * block:(g + 1) * block] for g in range(groups)])
    best_err = torch.full((n, groups), float("inf"))
    best_ratio = torch.ones(n, groups)
    for ratio in CLIP_RATIOS:
        scale = (ratio * amax / 7).clamp(min=1e-12)[..., None]
        delta = torch.clamp(torch.round(wb / scale), -7, 7) * scale - wb
        err = torch.einsum("ngb,gbc,ngc->ng", delta, gram_blocks, delta)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    limit = (best_ratio * amax)[..., None]
    return torch.maximum(torch.minimum(wb, limit), -limit).reshape(n, k)


def search_scale(weights: list[torch.Tensor], grams: list[torch.Tensor], mean_abs: torch.Tensor, block: int
                 ) -> tuple[torch.Tensor, float, float, float]:
    """(s, alpha, error at alpha, RTN error) for weights [N_j, K] sharing an input with Gram Σ_j and mean |x|."""
    base = mean_abs.clamp(min=1e-8)
    best = None
    rtn_error = None
    for alpha in ALPHAS:
        s = base ** alpha
        s = s / torch.sqrt(s.max() * s.min())
        err = _error(weights, grams, s, block)
        if alpha == 0:
            rtn_error = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], rtn_error


def _clip(weight: torch.Tensor, gram: torch.Tensor, s: torch.Tensor, block: int, transposed: bool = False) -> None:
    """Clip `weight` in place (nn.Linear layout [N, K], or [K, N] when transposed) for inputs with Gram `gram` that
    were divided by s: the scaled inputs' Gram is Σ / (s sᵀ)."""
    w = weight.T if transposed else weight
    w.copy_(clip_weights(w.float(), gram / (s[:, None] * s[None, :]), block))


@torch.no_grad()
def apply_awq(model, stats: dict[str, np.ndarray], block: int) -> list[dict]:
    """Search and fold AWQ scales, then search clipping ranges, in the fp32 model in place (see the module
    docstring); returns one record per scaled group: {"group", "alpha", "mse", "rtn_mse"} (mse before clipping)."""
    from ..model.modeling import MoE

    def stat(name):
        return torch.from_numpy(np.asarray(stats[name])).to(torch.float32)

    records = []

    def record(group, alpha, err, rtn):
        records.append({"group": group, "alpha": alpha, "mse": err, "rtn_mse": rtn})

    for layer, block_module in enumerate(model.model.layers):
        prefix = f"layers.{layer}"
        attn, ff = block_module.self_attn, block_module.feed_forward
        # q/k/v share input_layernorm's output
        projections = [attn.q_proj, attn.k_proj, attn.v_proj]
        gram = stat(f"{prefix}.attn_in.gram")
        s, alpha, err, rtn = search_scale([p.weight.float() for p in projections], [gram] * 3,
                                          stat(f"{prefix}.attn_in.mean_abs"), block)
        for p in projections:
            p.weight.mul_(s)
            _clip(p.weight, gram, s, block)
        block_module.input_layernorm.weight.div_(s)
        record(f"{prefix}.qkv", alpha, err, rtn)
        o_gram = stat(f"{prefix}.o_in.gram")  # o_proj: no scale (see the module docstring), clipping only
        _clip(attn.o_proj.weight, o_gram, torch.ones(o_gram.shape[0]), block)

        # gate/up consumers of post_attention_layernorm
        mlp = ff.shared_expert if isinstance(ff, MoE) else ff
        mlp_gram = stat(f"{prefix}.mlp_in.gram")
        weights, grams = [mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()], [mlp_gram] * 2
        if isinstance(ff, MoE):
            expert_grams = stat(f"{prefix}.expert_in.gram")
            for e in range(ff.experts.gate_up_proj.shape[0]):
                weights.append(ff.experts.gate_up_proj[e].float().T)  # [2I, H]
                grams.append(expert_grams[e])
        s, alpha, err, rtn = search_scale(weights, grams, stat(f"{prefix}.mlp_in.mean_abs"), block)
        mlp.gate_proj.weight.mul_(s)
        mlp.up_proj.weight.mul_(s)
        block_module.post_attention_layernorm.weight.div_(s)
        if isinstance(ff, MoE):
            ff.experts.gate_up_proj.mul_(s[None, :, None])
            ff.router.weight.mul_(s)  # the router reads the same (now divided) norm output and stays unquantized
        record(f"{prefix}.gate_up", alpha, err, rtn)

        # down_proj: fold into up_proj rows (row scaling leaves up_proj's own blockwise quantization unchanged)
        down_gram = stat(f"{prefix}.down_in.gram")
        s_down, alpha, err, rtn = search_scale([mlp.down_proj.weight.float()], [down_gram],
                                               stat(f"{prefix}.down_in.mean_abs"), block)
        mlp.down_proj.weight.mul_(s_down)
        mlp.up_proj.weight.div_(s_down[:, None])
        record(f"{prefix}.down", alpha, err, rtn)
        _clip(mlp.gate_proj.weight, mlp_gram, s, block)
        _clip(mlp.up_proj.weight, mlp_gram, s, block)
        _clip(mlp.down_proj.weight, down_gram, s_down, block)
        if isinstance(ff, MoE):
            inter = ff.experts.down_proj.shape[1]
            down_grams, means = stat(f"{prefix}.expert_down_in.gram"), stat(f"{prefix}.expert_down_in.mean_abs")
            for e in range(ff.experts.down_proj.shape[0]):
                s_e, alpha, err, rtn = search_scale([ff.experts.down_proj[e].float().T], [down_grams[e]], means[e], block)
                ff.experts.down_proj[e].mul_(s_e[:, None])
                ff.experts.gate_up_proj[e, :, inter:].div_(s_e[None, :])
                record(f"{prefix}.expert{e}.down", alpha, err, rtn)
                _clip(ff.experts.gate_up_proj[e], expert_grams[e], s, block, transposed=True)
                _clip(ff.experts.down_proj[e], down_grams[e], s_e, block, transposed=True)
    return records
