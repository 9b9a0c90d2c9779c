"""A preset's seeded random weights as a weight source: the one random-weight scheme of every export and test.

The scheme: parameters in sorted-name order, each drawn whole from ONE torch generator seeded with `seed`,
normal(0, 0.02) (HF's initializer range); norms are ones. `from_preset` materializes it; a streamed export draws the
same numbers tensor by tensor, slice by slice, without holding the model: torch's CPU normal sampler fills whole
blocks of 16 values from 16 uniform draws, so drawing a tensor in pieces whose sizes are multiples of 16 gives the
whole draw's numbers and leaves the generator where the whole draw would (tests/test_weights.py checks both); a tensor
whose pieces are not all multiples of 16 is drawn whole. The generator state at the start of every tensor reached so
far is kept (5 KB each), so a tensor read again, or out of order, is redrawn from its own start.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from ..model.config import Llama4Config, get_preset
from ..model.summary import parameter_counts, weight_bytes
from ..model.modeling import Llama4ForCausalLM
from .source import WeightSource, materialize, slice_shape, slices

INIT_STD = 0.02
# Torch's CPU normal sampler works in blocks of this many values (see the module docstring).
NORMAL_BLOCK = 16
# Where the real weights come from (license-gated: accept Meta's license on the model page first).
FULL_SIZE_SOURCES = {
    "scout": "meta-llama/Llama-4-Scout-17B-16E or meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "maverick": "meta-llama/Llama-4-Maverick-17B-128E or meta-llama/Llama-4-Maverick-17B-128E-Instruct",
}


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


class RandomWeights(WeightSource):
    """A preset (or a config) with seeded random weights; layers: only the preset's first N decoder layers."""

    def __init__(self, preset: str | Llama4Config, seed: int = 0, layers: int | None = None):
        if isinstance(preset, Llama4Config):
            self.preset, self.config = None, preset if layers is None else preset.first_layers(layers)
        else:
            self.preset, self.config = preset, get_preset(preset, layers)
        self.seed, self.layers = seed, layers
        self._drawn = [name for name in sorted(self.shapes) if not _is_norm(name)]
        self._position = {name: k for k, name in enumerate(self._drawn)}
        self._states: dict[int, torch.Tensor] = {0: torch.Generator().manual_seed(seed).get_state()}

    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        shape = self.shapes[name]
        if _is_norm(name):
            yield torch.ones(shape, dtype=dtype)
            return
        k = self._position[name]
        generator = self._generator_at(k)
        for piece in self._draw(generator, shape):
            yield (piece * INIT_STD).to(dtype)
        self._states.setdefault(k + 1, generator.get_state())

    def _generator_at(self, k: int) -> torch.Generator:
        """A generator in the state the one-generator draw has at the start of drawn tensor k."""
        known = max(j for j in self._states if j <= k)
        generator = torch.Generator()
        generator.set_state(self._states[known])
        for j in range(known, k):  # draw (and drop) the tensors in between, recording where each one starts
            for _ in self._draw(generator, self.shapes[self._drawn[j]]):
                pass
            self._states.setdefault(j + 1, generator.get_state())
        return generator

    @staticmethod
    def _draw(generator: torch.Generator, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        """The numbers torch.randn(shape, generator) gives, as `slices(shape)` pieces."""
        pieces = slices(shape)
        if all(int(np.prod(slice_shape(index, shape))) % NORMAL_BLOCK == 0 for index in pieces):
            for index in pieces:
                yield torch.randn(slice_shape(index, shape), generator=generator)
            return
        whole = torch.randn(shape, generator=generator)
        for index in pieces:
            yield whole[index]

    def describe(self) -> str:
        layers = f", first {self.layers} layers" if self.layers else ""
        what = f"preset {self.preset}" if self.preset else f"config {self.config.name}"
        return f"{what} (random weights, seed {self.seed}{layers})"

    def manifest_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"preset": self.preset or self.config.name, "seed": self.seed}
        if self.layers is not None:
            entry["layers"] = self.layers
        return entry


def from_preset(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Llama4ForCausalLM:
    """A preset's architecture with deterministic random weights (same seed ⇒ identical weights)."""
    return materialize(RandomWeights(name, seed), dtype)


def from_config(config: Llama4Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> Llama4ForCausalLM:
    return materialize(RandomWeights(config, seed), dtype)


def full_size_weights_hint(preset: str) -> str:
    """Where a full-size preset's weights come from and how big they are (bf16)."""
    config = get_preset(preset)
    size = weight_bytes(config)["bf16"]
    return (f"preset {preset} has {parameter_counts(config).total / 1e9:.0f} B parameters ({size / 1e9:.0f} GB in bf16): "
            f"pass --checkpoint DIR with {FULL_SIZE_SOURCES[preset]} downloaded from Hugging Face (license-gated: "
            "accept Meta's license on the model page first), or --random-weights [--layers N] for a shape-faithful dry run")
