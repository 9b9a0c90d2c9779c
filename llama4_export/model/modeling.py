"""Llama 4 text model in plain PyTorch, written for export and exact against transformers' Llama4ForCausalLM.

Export-friendly by construction: real-valued interleaved-pair RoPE (no complex numbers), masks computed from absolute
positions (no data-dependent Python control flow), and a KV cache passed in and out as tensors. Parameter names match
the Hugging Face checkpoint layout, so a checkpoint's state dict loads 1:1.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Llama4Config

MoEImpl = Literal["auto", "gather", "grouped", "dense"]


class KVCache(NamedTuple):
    """Past keys/values the caller keeps, one entry per layer.

    keys/values: [batch, kv_heads, slots, head_dim] — keys stored after RoPE and QK norm, as attention consumes them.
    positions:   [batch, slots] int64 absolute position of each slot, -1 for an empty slot. Slot order is free: the
                 attention mask is computed from positions, so a ring buffer with sink tokens needs no reordering.
    """

    keys: list[Tensor]
    values: list[Tensor]
    positions: list[Tensor]

    @classmethod
    def empty(cls, config: Llama4Config, batch: int, dtype: torch.dtype, device: torch.device | str = "cpu",
              layers: int | None = None) -> "KVCache":
        shape = (batch, config.num_key_value_heads, 0, config.head_dim)
        n = config.num_hidden_layers if layers is None else layers
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            positions=[torch.zeros((batch, 0), dtype=torch.int64, device=device) for _ in range(n)],
        )

    def append(self, new: "NewKV", positions: Tensor) -> "KVCache":
        """The unbounded cache: every past token kept (the reference the sliding cache is tested against)."""
        return KVCache(
            keys=[torch.cat([k, nk], dim=2) for k, nk in zip(self.keys, new.keys)],
            values=[torch.cat([v, nv], dim=2) for v, nv in zip(self.values, new.values)],
            positions=[torch.cat([p, positions], dim=1) for p in self.positions],
        )


class InPlaceKV(NamedTuple):
    """Cache buffers the model appends to (the in_place layout of model/io_spec.py), one entry per layer.

    keys/values: [batch, kv_heads, capacity, head_dim]; the first lengths[b] slots of row b are valid, in any order
                 (the NoPE global layers' slots need none; a chunked layer's hold its chunk in position order).
    lengths:     [batch] int64 per layer. A step's tokens go to slots lengths[b] .. lengths[b] + T − 1 and attend to
                 every slot before their own.
    """

    keys: list[Tensor]
    values: list[Tensor]
    lengths: list[Tensor]


class NewKV(NamedTuple):
    """Keys/values of the tokens just processed, per layer: [batch, kv_heads, new_tokens, head_dim] — or, from an
    InPlaceKV cache, the whole buffers with them written."""

    keys: list[Tensor]
    values: list[Tensor]


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x²) + eps) in fp32, cast back (HF's Llama4TextRMSNorm without weight, and its L2Norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.eps) * self.weight


def rope_inverse_frequencies(config: Llama4Config) -> Tensor:
    """fp32 inverse frequencies, computed with the same ops as transformers (default and llama3 rope types)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved-pair rotation: (x[2i], x[2i+1]) -> (a·cos − b·sin, a·sin + b·cos), in fp32.

    x: [B, T, heads, D]; cos/sin: [B, T, D/2]. This is HF's complex multiply written with real tensors.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: Llama4Config, layer: int):
        super().__init__()
        self.config = config
        self.use_rope = config.uses_rope(layer)
        self.use_qk_norm = config.use_qk_norm and self.use_rope
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.chunk = config.attention_chunk_size if self.use_rope else None
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)

    def forward(
        self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor, past_index: Tensor,
        in_place: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """past_index: the past slots' positions [B, S] (KVCache), or with in_place the valid lengths [B] (InPlaceKV).
        Returns (output, new K, new V) — or with in_place (output, K buffer, V buffer) with the new tokens written."""
        cfg = self.config
        bsz, t, _ = x.shape
        d, kvh, groups = cfg.head_dim, cfg.num_key_value_heads, cfg.num_kv_groups
        q = self.q_proj(x).view(bsz, t, cfg.num_attention_heads, d)
        k = self.k_proj(x).view(bsz, t, kvh, d)
        v = self.v_proj(x).view(bsz, t, kvh, d)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.use_qk_norm:
            q, k = rms_norm(q, cfg.rms_norm_eps), rms_norm(k, cfg.rms_norm_eps)
        if self.temperature_tuning:
            # Absolute positions (cache length + index), as HF computes them; exactly 1 below floor_scale - 1.
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0
            q = (q * scale[:, :, None, None]).to(q.dtype)
        if in_place and _tracing():  # torch.export under torch.onnx.export (the only exporter of this layout)
            out, keys, values = _group_query_attention(q, k, v, past_k, past_v, past_index, kvh)
            return self.o_proj(out), keys, values
        new_k, new_v = k.transpose(1, 2), v.transpose(1, 2)  # [B, kvh, T, D]
        if in_place:  # what GroupQueryAttention computes: write at lengths.., attend to every slot up to one's own
            slots = past_index[:, None] + torch.arange(t, device=x.device)  # [B, T]
            index = slots[:, None, :, None].expand(-1, kvh, -1, d)
            keys, values = past_k.scatter(2, index, new_k), past_v.scatter(2, index, new_v)
            visible = torch.arange(keys.shape[2], device=x.device)[None, None, :] <= slots[:, :, None]  # [B, T, S]
        else:
            keys = torch.cat([past_k, new_k], dim=2)
            values = torch.cat([past_v, new_v], dim=2)
            key_pos = torch.cat([past_index, positions], dim=1)  # [B, S]
            qp, kp = positions[:, :, None], key_pos[:, None, :]  # [B, T, 1], [B, 1, S]
            visible = (kp >= 0) & (kp <= qp)
            if self.chunk is not None:
                visible = visible & (torch.div(kp, self.chunk, rounding_mode="floor") == torch.div(qp, self.chunk, rounding_mode="floor"))
        # Query heads grouped under their KV head: [B, kvh, groups, T, D] — GQA without repeating K/V.
        qg = q.view(bsz, t, kvh, groups, d).permute(0, 2, 3, 1, 4)
        scores = torch.matmul(qg, keys[:, :, None].transpose(-1, -2)) * (d**-0.5)  # [B, kvh, groups, T, S]
        # A finite fill keeps a fully masked row (padding) from producing NaN.
        scores = scores.float().masked_fill(~visible[:, None, None], torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values[:, :, None])  # [B, kvh, groups, T, D]
        out = out.permute(0, 3, 1, 2, 4).reshape(bsz, t, cfg.num_attention_heads * d)
        if in_place:
            return self.o_proj(out), keys, values
        return self.o_proj(out), new_k, new_v


def _group_query_attention(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, lengths: Tensor,
                           kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """ONNX Runtime's com.microsoft.GroupQueryAttention, emitted as one node while exporting: q [B, T, H, D] and
    k/v [B, T, kvh, D] after RoPE, QK norm and temperature tuning; the buffers [B, kvh, capacity, D] come back with
    the new K/V written at lengths.. (in place when the caller binds each output to its input's memory)."""
    bsz, t, heads, d = q.shape
    seqlens = (lengths + t - 1).to(torch.int32)  # per row: the index of its last new token
    total = (lengths.max() + t).to(torch.int32)
    out, keys, values = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        [q.reshape(bsz, t, heads * d), k.reshape(bsz, t, kv_heads * d), v.reshape(bsz, t, kv_heads * d), past_k, past_v,
         seqlens, total],
        attrs={"num_heads": heads, "kv_num_heads": kv_heads, "scale": d**-0.5},
        dtypes=[q.dtype, past_k.dtype, past_v.dtype], shapes=[(bsz, t, heads * d), past_k.shape, past_v.shape], version=1,
    )
    # The op's fake implementation makes CPU tensors; the graph is traced on the meta device (an Identity in ONNX).
    return out.to(q.device), keys.to(q.device), values.to(q.device)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense FFN and the shared expert."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Routed experts in checkpoint layout: gate_up_proj [E, H, 2I] (gate first), down_proj [E, I, H], used as x @ W."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(e, i, h))


class MoE(nn.Module):
    """Top-1 routing with sigmoid score that scales the routed expert's *input*, plus a shared expert.

    out = shared(x) + expert_e(x * sigmoid(logit_e)), e = argmax(router(x)).

    Three exact implementations of the routed part, chosen by `impl`:
      gather  — index the selected expert's weights per token: reads only those experts (decode, few tokens);
      grouped — tokens grouped by expert, one matmul per used expert (eager prefill; data-dependent, not traceable);
      dense   — every expert on every token with zero-scaled inputs, as transformers does (traceable prefill; E× work).
    `auto` picks gather for a single new token per sequence, grouped in eager mode and dense while tracing.
    """

    def __init__(self, config: Llama4Config):
        super().__init__()
        self.experts = Experts(config)
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.shared_expert = MLP(config.hidden_size, config.intermediate_size)
        self.impl: MoEImpl = "auto"

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.router(x)
        top, index = logits.max(dim=-1)
        return index, torch.sigmoid(top.float()).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        bsz, t, h = x.shape
        flat = x.reshape(-1, h)
        index, score = self.route(flat)
        routed_in = flat * score[:, None]
        impl = self.impl
        if impl == "auto":
            impl = "gather" if t == 1 else ("dense" if _tracing() else "grouped")
        routed = {"gather": self._gather, "grouped": self._grouped, "dense": self._dense}[impl](routed_in, index)
        return (self.shared_expert(flat) + routed).view(bsz, t, h)

    def _gather(self, x: Tensor, index: Tensor) -> Tensor:
        gate_up = torch.bmm(x[:, None], self.experts.gate_up_proj[index])[:, 0]
        gate, up = gate_up.chunk(2, dim=-1)
        return torch.bmm((F.silu(gate) * up)[:, None], self.experts.down_proj[index])[:, 0]

    def _grouped(self, x: Tensor, index: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(index).tolist():
            rows = (index == e).nonzero(as_tuple=True)[0]
            # .to: layer-wise calibration keeps bf16 experts and widens one at a time (exact; a no-op for fp32)
            gate, up = (x[rows] @ self.experts.gate_up_proj[e].to(x.dtype)).chunk(2, dim=-1)
            out[rows] = (F.silu(gate) * up) @ self.experts.down_proj[e].to(x.dtype)
        return out

    def _dense(self, x: Tensor, index: Tensor) -> Tensor:
        num_experts = self.experts.gate_up_proj.shape[0]
        onehot = F.one_hot(index, num_experts).to(x.dtype).t()[:, :, None]  # [E, N, 1]
        gate, up = torch.bmm(onehot * x[None], self.experts.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.experts.down_proj).sum(dim=0)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


class DecoderLayer(nn.Module):
    def __init__(self, config: Llama4Config, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.feed_forward = MoE(config) if config.is_moe_layer(layer) else MLP(config.hidden_size, config.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TextModel(nn.Module):
    def __init__(self, config: Llama4Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Llama4ForCausalLM(nn.Module):
    """`model(input_ids)` → logits; `model(input_ids, positions, kv_cache)` → (logits, NewKV)."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", rope_inverse_frequencies(config), persistent=False)

    def set_moe_impl(self, impl: MoEImpl) -> None:
        for module in self.modules():
            if isinstance(module, MoE):
                module.impl = impl

    def forward(
        self, inputs: Tensor, positions: Tensor | None = None, kv_cache: KVCache | InPlaceKV | None = None,
        layers: range | None = None,
        logits_index: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, NewKV]:
        """inputs: token ids [B, T], or hidden states [B, T, hidden] entering `layers` (a contiguous range of decoder
        layers, default all; kv_cache then holds those layers only). After the last layer: logits — of the tokens
        logits_index [B, L] picks in each row, default all; before it: the hidden states leaving the range."""
        layers = range(self.config.num_hidden_layers) if layers is None else layers
        bsz, t = inputs.shape[:2]
        dtype = self.lm_head.weight.dtype
        cache = kv_cache if kv_cache is not None else KVCache.empty(self.config, bsz, dtype, inputs.device, len(layers))
        in_place = isinstance(cache, InPlaceKV)
        past_index = cache.lengths if in_place else cache.positions
        if positions is None:
            positions = torch.arange(t, device=inputs.device).expand(bsz, t)
        freqs = positions.float()[..., None] * self.rope_inv_freq  # [B, T, D/2], fp32 as in HF
        cos, sin = torch.cos(freqs), torch.sin(freqs)

        x = self.model.embed_tokens(inputs) if not inputs.is_floating_point() else inputs
        new_keys, new_values = [], []
        for j, i in enumerate(layers):
            layer = self.model.layers[i]
            attn, k, v = layer.self_attn(
                layer.input_layernorm(x), positions, cos, sin, cache.keys[j], cache.values[j], past_index[j], in_place
            )
            x = x + attn
            x = x + layer.feed_forward(layer.post_attention_layernorm(x))
            new_keys.append(k)
            new_values.append(v)
        if layers.stop == self.config.num_hidden_layers:
            if logits_index is not None:  # only the positions whose logits are wanted reach the norm and lm_head
                x = torch.gather(x, 1, logits_index[..., None].expand(-1, -1, x.shape[-1]))
            out = self.lm_head(self.model.norm(x))
        else:
            out = x
        if kv_cache is None:
            return out
        return out, NewKV(new_keys, new_values)
