"""Sequential layer-wise calibration: the activation statistics (calib/stats.py sites) of the fp32 model a weight
source describes, one decoder layer at a time.

The model is a skeleton on PyTorch's meta device; only the layer being run holds real weights, read from the source
and dropped back to meta afterwards. The hidden states of every calibration sample at the current layer boundary
([samples, seq_len, hidden] fp32) are the only other large state. Each layer runs the calibration samples in order,
computing exactly what the model's forward computes (same modules, same ops, same shapes):

  attention  per sample: input_layernorm → self_attn (sites attn_in, o_in, new_key, new_value) → residual;
  dense FFN  per sample: post_attention_layernorm (mlp_in) → the MLP (down_in) → residual;
  MoE        per sample the norm, the router and the shared expert (mlp_in, down_in); the routed experts EXPERT-MAJOR:
             expert e is read from the source once (fp32) and applied to the tokens routed to it in every sample, the
             same per-sample matmuls MoE._grouped makes (so the same bits), accumulating its sites (expert_in,
             expert_down_in) as it goes. Only one expert is ever in memory — a Scout layer's 16 are 8 GB in fp32 —
             and with AWQ only one expert's Gram matrices (the rest are on disk, stats.ExpertGrams).

Per site the samples are accumulated in sample order, so the statistics equal a whole-model run's. Never held whole
either: the embedding (the samples' rows are gathered from the table slice by slice) and lm_head (only its input,
site final_in, is needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model.modeling import Experts, KVCache, Llama4ForCausalLM, MoE, rope_inverse_frequencies
from ..weights import WeightSource, expert_by_expert, read_tensor
from .stats import Accumulator, ExpertGrams


class LayerExperts:
    """The routed experts of one MoE layer, read from the source one expert at a time in fp32 (fresh buffers)."""

    def __init__(self, source: WeightSource, layer: int):
        self.source, self.prefix = source, f"model.layers.{layer}.feed_forward.experts."

    def each(self, kind: str) -> Iterator[torch.Tensor]:
        name = self.prefix + kind
        return expert_by_expert(self.source.chunks(name, torch.float32), self.source.shapes[name])


def materialize_module(module: nn.Module, prefix: str, source: WeightSource) -> None:
    """Give `module`'s meta parameters their fp32 weights, except the routed experts (read one at a time)."""
    for name, _ in list(module.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if not isinstance(owner, Experts):
            setattr(owner, leaf, nn.Parameter(read_tensor(source, prefix + name, torch.float32), requires_grad=False))


def embed(source: WeightSource, samples: np.ndarray) -> torch.Tensor:
    """The samples' embedding rows [samples, seq_len, hidden] fp32, read from the table one slice at a time."""
    ids = torch.from_numpy(np.asarray(samples, dtype=np.int64))
    states = torch.empty(*ids.shape, source.config.hidden_size)
    first = 0
    for piece in source.chunks("model.embed_tokens.weight", torch.float32):
        inside = (ids >= first) & (ids < first + piece.shape[0])
        states[inside] = piece[ids[inside] - first]
        first += piece.shape[0]
    return states


def skeleton_model(source: WeightSource) -> Llama4ForCausalLM:
    """The model on the meta device (no weights), with its RoPE frequencies: layers are materialized one at a time."""
    with torch.device("meta"):
        skeleton = Llama4ForCausalLM(source.config)
    skeleton.rope_inv_freq = rope_inverse_frequencies(source.config)
    return skeleton.eval().requires_grad_(False)


def _routed_experts(experts: LayerExperts, routed: torch.Tensor, index: torch.Tensor, mix: torch.Tensor, site: str,
                    expert_stats: dict[str, list] | None, grams: dict[str, ExpertGrams] | None) -> None:
    """Add MoE._grouped's output of every sample [samples, tokens, hidden] to `mix` (the shared expert's output),
    expert-major; every token has exactly one routed expert, so each element gets exactly the one sum the model's
    `shared + routed` makes. With `expert_stats`, the routed-expert sites of `site` (Gram matrices into `grams`, the
    rest into expert_stats[key][e])."""
    for e, (gate_up, down) in enumerate(zip(experts.each("gate_up_proj"), experts.each("down_proj"))):
        one = Accumulator(grams=True) if expert_stats is not None else None
        for x, chosen, out in zip(routed, index, mix):
            rows = (chosen == e).nonzero(as_tuple=True)[0]
            gate, up = (x[rows] @ gate_up).chunk(2, dim=-1)
            hidden = F.silu(gate) * up
            if rows.numel():
                out[rows] += hidden @ down
            if one is not None:
                one.add(f"{site}.expert_in", x[rows], slot=0, slots=1)
                one.add(f"{site}.expert_down_in", hidden, slot=0, slots=1)
        if one is not None:
            for key, value in one.result().items():
                name, _, kind = key.rpartition(".")
                if kind == "gram":
                    grams[name].put(e, value[0])
                else:
                    expert_stats.setdefault(key, []).append(value[0])


class LayerRunner:
    """The model a source describes, run one decoder layer at a time over hidden states held per sample."""

    def __init__(self, source: WeightSource, seq_len: int):
        self.source, self.config = source, source.config
        self.skeleton = skeleton_model(source)
        self.positions = torch.arange(seq_len)[None]
        freqs = self.positions.float()[..., None] * self.skeleton.rope_inv_freq
        self.cos, self.sin = torch.cos(freqs), torch.sin(freqs)
        self.empty = KVCache.empty(self.config, 1, torch.float32, layers=1)

    @torch.no_grad()
    def run(self, i: int, states: torch.Tensor, acc: Accumulator | None = None,
            expert_stats: dict[str, list] | None = None, grams: dict[str, ExpertGrams] | None = None) -> nn.Module:
        """Layer i over every sample's states [samples, seq_len, hidden], in place, its weights materialized (returned:
        the layer, for on_layer; the caller frees it with .to("meta")). With `acc`, the layer's sites are accumulated;
        with `expert_stats` too, its routed-expert sites (Gram matrices into `grams`). An MoE layer holds two more
        buffers of the states' size: the routed experts' input and the FFN output."""
        layer, site = self.skeleton.model.layers[i], f"layers.{i}"
        materialize_module(layer, f"model.layers.{i}.", self.source)
        ff = layer.feed_forward
        moe = isinstance(ff, MoE)
        mlp = ff.shared_expert if moe else ff

        def add(name, x):
            if acc is not None:
                acc.add(f"{site}.{name}", x)

        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: add("o_in", args[0])),
                 mlp.down_proj.register_forward_pre_hook(lambda m, args: add("down_in", args[0]))]
        if moe:
            routed, mix = torch.empty_like(states), torch.empty_like(states)
            index = torch.empty(states.shape[:2], dtype=torch.int64)
        try:
            for k in range(len(states)):
                x = states[k:k + 1]
                normed = layer.input_layernorm(x)
                add("attn_in", normed)
                attn, new_key, new_value = layer.self_attn(normed, self.positions, self.cos, self.sin, self.empty.keys[0],
                                                           self.empty.values[0], self.empty.positions[0])
                add("new_key", new_key)
                add("new_value", new_value)
                x = x + attn
                m = layer.post_attention_layernorm(x)
                add("mlp_in", m)
                if not moe:
                    states[k] = (x + ff(m))[0]
                    continue
                flat = m.reshape(-1, m.shape[-1])
                chosen, score = ff.route(flat)
                states[k], index[k] = x[0], chosen  # the residual; the FFN output is added once every expert has run
                mix[k] = ff.shared_expert(flat)
                routed[k] = flat * score[:, None]
        finally:
            for hook in hooks:
                hook.remove()
        if moe:
            _routed_experts(LayerExperts(self.source, i), routed, index, mix, site, expert_stats, grams)
            del routed
            states += mix
        return layer

    @torch.no_grad()
    def final_norm(self, states: torch.Tensor) -> list[torch.Tensor]:
        """The final norm's output for every sample [1, seq_len, hidden]: lm_head's input."""
        materialize_module(self.skeleton.model.norm, "model.norm.", self.source)
        return [self.skeleton.model.norm(states[k:k + 1]) for k in range(len(states))]


def layerwise_statistics(source: WeightSource, samples: np.ndarray, progress=None, for_awq: bool = True,
                         on_layer: Callable[[int, nn.Module, dict, LayerExperts | None], None] | None = None,
                         gram_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Statistics of every site for the calibration samples [n, seq_len]. for_awq=False leaves out what only AWQ
    reads: the Gram matrices and the routed-expert sites (FP8 quantizes the experts weight-only). With `on_layer`,
    each layer's statistics also go to on_layer(i, layer module, statistics, its experts) while its weights are
    materialized, and the returned dict leaves out the Gram matrices (GBs per layer at Scout's shapes); the routed
    experts' are written under gram_dir (None: kept in memory) and removed after the layer."""
    config = source.config
    runner = LayerRunner(source, samples.shape[1])
    n = config.num_hidden_layers
    states = embed(source, samples)
    stats: dict[str, np.ndarray] = {}
    for i in range(n):
        site = f"layers.{i}"
        acc, expert_stats, grams = Accumulator(grams=for_awq), {}, None
        moe = config.is_moe_layer(i)
        if moe and for_awq:
            directory = None if gram_dir is None else Path(gram_dir) / f"layer{i}"
            grams = {s: ExpertGrams(s, config.num_local_experts, directory) for s in (f"{site}.expert_in", f"{site}.expert_down_in")}
        layer = runner.run(i, states, acc, expert_stats if for_awq else None, grams)
        if i == n - 1:
            for x in runner.final_norm(states):
                acc.add("final_in", x)
        layer_stats = acc.result()
        layer_stats.update((key, np.stack(values)) for key, values in expert_stats.items())
        if grams is not None:
            layer_stats.update((f"{s}.gram", store) for s, store in grams.items())
        if on_layer is None:
            stats.update(layer_stats)
        else:
            on_layer(i, layer, layer_stats, LayerExperts(source, i) if moe else None)
            stats.update((k, v) for k, v in layer_stats.items() if not k.endswith(".gram"))
        del layer_stats, grams
        if gram_dir is not None:
            for path in sorted(Path(gram_dir).glob(f"layer{i}/*.npy")):
                path.unlink()
        layer.to("meta")  # frees this layer's weights
        if progress is not None:
            progress(i + 1, n)
    return stats
