"""Sequential layer-wise calibration (issue 9): calib.stats.collect_statistics' sites, one decoder layer at a time.

The model is a skeleton on PyTorch's meta device; only the layer being run holds real weights (with the embedding
for the first, the final norm + lm_head for the last), read from a WeightSource (export/streaming.py) and dropped
back to meta afterwards. The hidden states of every calibration sample at the current layer boundary ([samples, seq_len,
hidden] fp32) are the only other large state. collect_statistics itself runs each stage: its hooks sit on every layer
of the skeleton, fire only on the one that runs, and name sites by layer index, so the statistics are the in-memory
calibration's (same ops on the same inputs, accumulated in the same sample order).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..export.partitions import PartIO
from ..model.modeling import Llama4ForCausalLM, rope_inverse_frequencies
from .stats import collect_statistics


class _Stage(nn.Module):
    """What collect_statistics runs: `model(ids)` where ids [1, 1] holds a sample index; the sample's hidden states
    (token ids for the embedding stage) go through PartIO's layer range and replace the stored ones."""

    def __init__(self, skeleton: Llama4ForCausalLM, layers: range, states: list[torch.Tensor], positions: torch.Tensor):
        super().__init__()
        self.model, self.lm_head = skeleton.model, skeleton.lm_head  # what collect_statistics hooks
        self.part = PartIO(skeleton, layers)
        self.states, self.positions = states, positions

    def forward(self, sample: torch.Tensor) -> None:
        k = int(sample.reshape(-1)[0])
        config = self.part.model.config
        empty_kv = torch.zeros(1, config.num_key_value_heads, 0, config.head_dim)
        empty_positions = torch.zeros(1, 0, dtype=torch.int64)
        past = [empty_kv] * (2 * len(self.part.layers))
        self.states[k] = self.part(self.states[k], self.positions, empty_positions, empty_positions, *past)[0]


def _materialize(module: nn.Module, prefix: str, source) -> None:
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(torch.cat(list(source.chunks(prefix + name, torch.float32))))


@torch.no_grad()
def streamed_statistics(source, samples: np.ndarray, progress=None) -> dict[str, np.ndarray]:
    """collect_statistics(model, samples) for the fp32 model `source` describes, one layer in memory at a time."""
    config = source.config
    with torch.device("meta"):
        skeleton = Llama4ForCausalLM(config)
    skeleton.rope_inv_freq = rope_inverse_frequencies(config)
    skeleton.eval().requires_grad_(False)
    n = config.num_hidden_layers
    states = [torch.from_numpy(np.asarray(row[None], dtype=np.int64)) for row in samples]
    positions = torch.arange(samples.shape[1])[None]
    indices = np.arange(len(samples))[:, None]
    stats: dict[str, np.ndarray] = {}
    for i in range(n):
        # PartIO embeds before layer 0 and applies the final norm + lm_head after the last layer.
        modules = [(skeleton.model.layers[i], f"model.layers.{i}.")]
        if i == 0:
            modules.append((skeleton.model.embed_tokens, "model.embed_tokens."))
        if i == n - 1:
            modules += [(skeleton.model.norm, "model.norm."), (skeleton.lm_head, "lm_head.")]
        for module, prefix in modules:
            _materialize(module, prefix, source)
        stats.update(collect_statistics(_Stage(skeleton, range(i, i + 1), states, positions), indices))
        for module, _ in modules:
            module.to("meta")  # frees this layer's weights
        if progress is not None:
            progress(i + 1, n)
    return stats
