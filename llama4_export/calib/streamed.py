"""Sequential layer-wise calibration (issue 9): calib.stats.collect_statistics' sites, one decoder layer at a time.

The model is a skeleton on PyTorch's meta device; only the layer being run holds real weights, read from a
WeightSource (export/streaming.py) and dropped back to meta afterwards. The hidden states of every calibration sample
at the current layer boundary ([samples, seq_len, hidden] fp32) are the only other large state. collect_statistics
itself runs each stage: its hooks sit on every layer of the skeleton, fire only on the one that runs, and name sites
by layer index, so the statistics are the in-memory calibration's (same ops on the same inputs, accumulated in the
same sample order).

What is never held whole (at Scout's shapes each is 2–4 GB in fp32):
  embedding  the samples' rows are gathered from the table slice by slice (the same values nn.Embedding returns);
  lm_head    the statistics need only its input (site final_in), so it is not run;
  experts    kept in the checkpoint's own float type (bf16 → half of fp32) and widened one expert at a time by
             MoE._grouped: exact, bf16 → fp32 is lossless.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..export.partitions import PartIO
from ..model.modeling import Experts, Llama4ForCausalLM, rope_inverse_frequencies
from .stats import collect_statistics


class _Stage(nn.Module):
    """What collect_statistics runs: `model(ids)` where ids [1, 1] holds a sample index; the sample's hidden states
    go through PartIO's layer range and replace the stored ones."""

    def __init__(self, skeleton: Llama4ForCausalLM, layers: range, states: list[torch.Tensor], positions: torch.Tensor):
        super().__init__()
        self.model, self.lm_head = skeleton.model, skeleton.lm_head  # what collect_statistics hooks
        self.part = PartIO(skeleton, layers, embed=False)
        self.states, self.positions = states, positions

    def forward(self, sample: torch.Tensor) -> None:
        k = int(sample.reshape(-1)[0])
        config = self.part.model.config
        empty_kv = torch.zeros(1, config.num_key_value_heads, 0, config.head_dim)
        empty_positions = torch.zeros(1, 0, dtype=torch.int64)
        past = [empty_kv] * (2 * len(self.part.layers))
        self.states[k] = self.part(self.states[k], self.positions, empty_positions, empty_positions, *past)[0]


def _read(source, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Tensor `name` assembled from the source's row-major slices into one preallocated tensor (no concatenation copy)."""
    out = torch.empty(shape, dtype=dtype)
    flat, start = out.view(-1), 0
    for piece in source.chunks(name, dtype):
        flat[start:start + piece.numel()] = piece.reshape(-1)
        start += piece.numel()
    return out


def _materialize(module: nn.Module, prefix: str, source) -> None:
    """Give `module`'s meta parameters their weights: fp32, the routed experts in the source's own float type."""
    for name, param in list(module.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        dtype = source.lossless_dtype(prefix + name) if isinstance(owner, Experts) else torch.float32
        setattr(owner, leaf, nn.Parameter(_read(source, prefix + name, param.shape, dtype), requires_grad=False))


def _embed(source, samples: np.ndarray, hidden: int) -> list[torch.Tensor]:
    """Each sample's embedding rows [1, seq_len, hidden] fp32, read from the table one slice at a time."""
    ids = torch.from_numpy(np.asarray(samples, dtype=np.int64))
    states = torch.empty(*ids.shape, hidden)
    first = 0
    for piece in source.chunks("model.embed_tokens.weight", torch.float32):
        inside = (ids >= first) & (ids < first + piece.shape[0])
        states[inside] = piece[ids[inside] - first]
        first += piece.shape[0]
    return [row[None] for row in states]


@torch.no_grad()
def streamed_statistics(source, samples: np.ndarray, progress=None, for_awq: bool = True,
                        on_layer: Callable[[int, nn.Module, dict[str, np.ndarray]], None] | None = None
                        ) -> dict[str, np.ndarray]:
    """collect_statistics(model, samples, for_awq=for_awq) for the fp32 model `source` describes, one layer in
    memory at a time. With `on_layer`, each layer's statistics also go to on_layer(i, layer module, statistics)
    while its weights are still materialized (the routed experts in the source's float type), and the returned dict
    leaves out the Gram matrices: AWQ's are GBs per layer at Scout's shapes, never kept for all layers."""
    config = source.config
    with torch.device("meta"):
        skeleton = Llama4ForCausalLM(config)
    skeleton.rope_inv_freq = rope_inverse_frequencies(config)
    skeleton.lm_head = nn.Identity()  # its input is statistic final_in; its output (logits) is not needed
    skeleton.eval().requires_grad_(False)
    n = config.num_hidden_layers
    states = _embed(source, samples, config.hidden_size)
    positions = torch.arange(samples.shape[1])[None]
    indices = np.arange(len(samples))[:, None]
    stats: dict[str, np.ndarray] = {}
    for i in range(n):
        # PartIO applies the final norm (and the lm_head, here the identity) after the last layer.
        modules = [(skeleton.model.layers[i], f"model.layers.{i}.")]
        if i == n - 1:
            modules.append((skeleton.model.norm, "model.norm."))
        for module, prefix in modules:
            _materialize(module, prefix, source)
        layer_stats = collect_statistics(_Stage(skeleton, range(i, i + 1), states, positions), indices, for_awq=for_awq)
        if on_layer is None:
            stats.update(layer_stats)
        else:
            on_layer(i, skeleton.model.layers[i], layer_stats)
            stats.update((k, v) for k, v in layer_stats.items() if not k.endswith(".gram"))
        del layer_stats
        for module, _ in modules:
            module.to("meta")  # frees this layer's weights
        if progress is not None:
            progress(i + 1, n)
    return stats
