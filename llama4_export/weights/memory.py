"""A PyTorch model already in memory as a weight source: its parameters handed out slice by slice."""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Iterator

import torch

from ..model.modeling import Llama4ForCausalLM
from .source import WeightSource, converted, materialize, slices


class ModelWeights(WeightSource):
    """`model`'s weights (e.g. loaded, then edited by the caller). identity: its manifest entry; default: the
    sha256 of every parameter's bytes, so a manifest still says which weights it holds."""

    def __init__(self, model: Llama4ForCausalLM, identity: dict[str, Any] | None = None, described: str | None = None,
                 checkpoint=None, vision=None):
        self.model, self.config, self.checkpoint, self.vision = model, model.config, checkpoint, vision
        self._given_identity, self._described = identity, described
        self._params = dict(model.named_parameters())

    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        if name not in self._params and name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        tensor = self._params[name].detach()
        for index in slices(tuple(tensor.shape)):
            yield converted(tensor[index], dtype, f"{self.describe()}: tensor {name!r}")

    def lossless_dtype(self, name: str) -> torch.dtype:
        dtype = self._params[name].dtype
        return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32

    def describe(self) -> str:
        return self._described or f"in-memory model {self.config.name}"

    def manifest_entry(self) -> dict[str, Any]:
        return self._given_identity if self._given_identity is not None else self._identity

    @functools.cached_property
    def _identity(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for name in sorted(self._params):
            digest.update(name.encode())
            digest.update(self._params[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
        return {"model": self.config.name, "sha256": digest.hexdigest()}


def in_memory(source: WeightSource, dtype: torch.dtype = torch.float32) -> ModelWeights:
    """`source`'s text model read into memory once (faster for repeated reads; needs the whole model in RAM), same
    identity; a vision tower stays where it is (read once by the export anyway)."""
    return ModelWeights(materialize(source, dtype), source.manifest_entry(), f"{source.describe()}, in memory",
                        source.checkpoint, source.vision)
