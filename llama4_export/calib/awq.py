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

The search for one decoder layer yields a plan (`plan_layer`): per weight (per expert for the routed experts), the
ordered elementwise fp32 operations that fold the scales and clip — multiply / divide by a broadcast vector, clip to
±limit per (row, block). `replay` applies them; replaying the same fp32 ops on the same operands gives the same
bits however a weight is sliced, so the plans are applied to the weights as the export streams them, one tensor
(one expert) at a time (calib/awq_plans.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from ..model.modeling import MoE

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


def _term(w: torch.Tensor, gram: torch.Tensor, s: torch.Tensor, block: int) -> float:
    """Output MSE of quantizing `w` [N, K] after scaling its input channels by s: tr(Δ Σ Δᵀ)."""
    scaled = w.float() * s  # widened here, one weight at a time: a bf16 expert never exists whole in fp32
    delta = (fake_quant_int4(scaled, block) - scaled) / s
    return float(((delta @ gram) * delta).sum())


def clip_limits(w_nk: torch.Tensor, gram: torch.Tensor, block: int) -> torch.Tensor | None:
    """AWQ's clipping search: per output row and block, the clip ratio c of the block's amax minimizing that block's
    output MSE Δ Σ_bb Δᵀ (Σ_bb: the block's diagonal block of the Gram matrix); returns the limits c·amax [N, blocks]
    (the plain blockwise quantizer, scale = amax / 7, then quantizes W clipped to ±limit with the searched range), or
    None for a partial last block (left to RTN)."""
    n, k = w_nk.shape
    if k % block:
        return None
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
    return best_ratio * amax


def search_scale(terms: Iterable[tuple[torch.Tensor, torch.Tensor]], mean_abs: torch.Tensor, block: int
                 ) -> tuple[torch.Tensor, float, float, float]:
    """(s, alpha, error at alpha, RTN error) for weights [N_j, K] sharing one input with mean |x| `mean_abs`, given
    as (weight, its input's Gram Σ_j) pairs one at a time: each pair is scored at every α while it is at hand (a
    routed expert's Gram may be read from disk just for this), then the errors are summed term by term per α."""
    base = mean_abs.clamp(min=1e-8)
    candidates = []
    for alpha in ALPHAS:
        s = base ** alpha
        candidates.append((alpha, s / torch.sqrt(s.max() * s.min())))
    errors: list[list[float]] = [[] for _ in candidates]
    for w, gram in terms:
        for row, (_, s) in zip(errors, candidates):
            row.append(_term(w, gram, s, block))
    best = None
    rtn_error = None
    for (alpha, s), row in zip(candidates, errors):
        err = 0.0
        for term in row:  # plain left-to-right sum: the search's result must not depend on the Python version
            err += term
        if alpha == 0:
            rtn_error = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], rtn_error


# ------------------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class Op:
    """One elementwise fp32 operation on a weight (a 2-D or 1-D tensor, or one expert's [K, N] slice).
    mul / div: by the vector operand broadcast along `axis`, on indices start … start + len(vector) of that axis.
    clip: to ±limit per (row, block), blocks of `axis` (K); the operand holds the limits [N, G] for axis 1
    (nn.Linear layout [N, K]) or [G, N] for axis 0 (expert layout [K, N])."""

    kind: str
    operand: str
    axis: int
    start: int = 0


@dataclass
class LayerPlan:
    """ops: (full parameter name, expert index or None) → its operations in order; operands: name → fp32 tensor."""

    ops: dict[tuple[str, int | None], list[Op]] = field(default_factory=dict)
    operands: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, expert: int | None, op: Op) -> None:
        self.ops.setdefault((name, expert), []).append(op)


def replay(tensor: torch.Tensor, ops: list[Op], operands: dict[str, torch.Tensor]) -> None:
    """Apply `ops` to the fp32 `tensor` in place, with the same fp32 operations the search applied."""
    for op in ops:
        operand = operands[op.operand]
        if op.kind == "clip":
            if op.axis == 1:
                limit = operand[..., None]  # [N, G, 1] against [N, G, block]
                blocked = tensor.reshape(tensor.shape[0], operand.shape[1], -1)
            else:
                limit = operand[:, None, :]  # [G, 1, N] against [G, block, N]
                blocked = tensor.reshape(operand.shape[0], -1, tensor.shape[1])
            tensor.copy_(torch.maximum(torch.minimum(blocked, limit), -limit).reshape(tensor.shape))
            continue
        region = tensor.narrow(op.axis, op.start, operand.shape[0])
        vector = operand if op.axis == tensor.dim() - 1 else operand[:, None]
        if op.kind == "mul":
            region.mul_(vector)
        else:
            region.div_(vector)


@torch.no_grad()
def plan_layer(block_module, layer: int, stats: dict[str, np.ndarray], block: int, experts=None
               ) -> tuple[LayerPlan, list[dict]]:
    """The AWQ plan of decoder layer `layer` (module `block_module`, left unchanged) from its statistics, and its
    records {"group", "alpha", "mse", "rtn_mse"} (mse before clipping). experts (MoE layers): `experts.each(kind)`
    iterates the routed experts' fp32 weights [K, N] one expert at a time, kind "gate_up_proj" or "down_proj" (the
    module's own routed experts are never materialized: a Scout layer's are 8 GB in fp32).
    Searches read the unmodified weights; each clip search reads the weight as its earlier ops leave it (fp32 copies,
    one expert at a time)."""
    def stat(site):
        return torch.from_numpy(np.asarray(stats[f"layers.{layer}.{site}"])).to(torch.float32)

    def expert_gram(site, expert):  # one expert's Gram at a time (calib/stats.py ExpertGrams)
        return torch.from_numpy(np.asarray(stats[f"layers.{layer}.{site}.gram"][expert])).to(torch.float32)

    prefix = f"model.layers.{layer}."
    plan, records = LayerPlan(), []

    def scale(name, expert, operand, axis, start=0, divide=False):
        plan.add(prefix + name, expert, Op("div" if divide else "mul", operand, axis, start))

    def clip(name, expert, w_nk, gram, s):
        """Clip search on `w_nk` [N, K] whose inputs were divided by s: the scaled inputs' Gram is Σ / (s sᵀ)."""
        limit = clip_limits(w_nk.float(), gram / (s[:, None] * s[None, :]), block)
        if limit is None:
            return
        axis = 1 if expert is None else 0  # experts are stored [K, N]
        operand = f"{prefix}{name}" + ("" if expert is None else f".{expert}") + ".clip_limit"
        plan.operands[operand] = limit if expert is None else limit.T.contiguous()
        plan.add(prefix + name, expert, Op("clip", operand, axis))

    def record(group, alpha, err, rtn):
        records.append({"group": f"layers.{layer}.{group}", "alpha": alpha, "mse": err, "rtn_mse": rtn})

    attn, ff = block_module.self_attn, block_module.feed_forward
    # q/k/v share input_layernorm's output
    projections = ["q_proj", "k_proj", "v_proj"]
    gram = stat("attn_in.gram")
    s, alpha, err, rtn = search_scale([(getattr(attn, p).weight, gram) for p in projections], stat("attn_in.mean_abs"),
                                      block)
    plan.operands[prefix + "qkv.scale"] = s
    for p in projections:
        scale(f"self_attn.{p}.weight", None, prefix + "qkv.scale", 1)
        clip(f"self_attn.{p}.weight", None, getattr(attn, p).weight.float() * s, gram, s)
    scale("input_layernorm.weight", None, prefix + "qkv.scale", 0, divide=True)
    record("qkv", alpha, err, rtn)
    o_gram = stat("o_in.gram")  # o_proj: no scale (see the module docstring), clipping only
    clip("self_attn.o_proj.weight", None, attn.o_proj.weight, o_gram, torch.ones(o_gram.shape[0]))

    # gate/up consumers of post_attention_layernorm
    moe = isinstance(ff, MoE)
    mlp, mlp_name = (ff.shared_expert, "feed_forward.shared_expert") if moe else (ff, "feed_forward")
    mlp_gram = stat("mlp_in.gram")
    terms = [(mlp.gate_proj.weight, mlp_gram), (mlp.up_proj.weight, mlp_gram)]
    count = ff.experts.gate_up_proj.shape[0] if moe else 0
    expert_terms = ((w.T, expert_gram("expert_in", e)) for e, w in enumerate(experts.each("gate_up_proj") if moe else ()))
    s, alpha, err, rtn = search_scale(itertools.chain(terms, expert_terms), stat("mlp_in.mean_abs"), block)
    gate_up = prefix + "gate_up.scale"
    plan.operands[gate_up] = s
    scale(f"{mlp_name}.gate_proj.weight", None, gate_up, 1)
    scale(f"{mlp_name}.up_proj.weight", None, gate_up, 1)
    scale("post_attention_layernorm.weight", None, gate_up, 0, divide=True)
    if moe:
        for e in range(count):
            scale("feed_forward.experts.gate_up_proj", e, gate_up, 0)
        scale("feed_forward.router.weight", None, gate_up, 1)  # the router reads the same (now divided) norm output
    record("gate_up", alpha, err, rtn)

    # down_proj: fold into up_proj rows (row scaling leaves up_proj's own blockwise quantization unchanged)
    down_gram = stat("down_in.gram")
    s_down, alpha, err, rtn = search_scale([(mlp.down_proj.weight, down_gram)], stat("down_in.mean_abs"), block)
    down = prefix + "down.scale"
    plan.operands[down] = s_down
    scale(f"{mlp_name}.down_proj.weight", None, down, 1)
    scale(f"{mlp_name}.up_proj.weight", None, down, 0, divide=True)
    record("down", alpha, err, rtn)
    clip(f"{mlp_name}.gate_proj.weight", None, mlp.gate_proj.weight.float() * s, mlp_gram, s)
    clip(f"{mlp_name}.up_proj.weight", None, mlp.up_proj.weight.float() * s / s_down[:, None], mlp_gram, s)
    clip(f"{mlp_name}.down_proj.weight", None, mlp.down_proj.weight.float() * s_down, down_gram, s_down)
    if moe:
        inter = ff.experts.down_proj.shape[1]
        means = stat("expert_down_in.mean_abs")
        # expert e's fp32 weights, fresh buffers edited in place below: [K, N] as stored
        for e, (gate_up_e, down_e) in enumerate(zip(experts.each("gate_up_proj"), experts.each("down_proj"))):
            down_gram_e = expert_gram("expert_down_in", e)
            s_e, alpha, err, rtn = search_scale([(down_e.T, down_gram_e)], means[e], block)
            expert_down = f"{prefix}expert{e}.down.scale"
            plan.operands[expert_down] = s_e
            scale("feed_forward.experts.down_proj", e, expert_down, 0)
            scale("feed_forward.experts.gate_up_proj", e, expert_down, 1, start=inter, divide=True)
            record(f"expert{e}.down", alpha, err, rtn)
            # expert e as its ops so far leave it
            replay(gate_up_e, plan.ops[(prefix + "feed_forward.experts.gate_up_proj", e)], plan.operands)
            clip("feed_forward.experts.gate_up_proj", e, gate_up_e.T, expert_gram("expert_in", e), s)
            replay(down_e, plan.ops[(prefix + "feed_forward.experts.down_proj", e)], plan.operands)
            clip("feed_forward.experts.down_proj", e, down_e.T, down_gram_e, s_e)
            del gate_up_e, down_e, down_gram_e
    return plan, records
