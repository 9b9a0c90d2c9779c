"""A weight source hands out a model's tensors by parameter name, as row-major slices of bounded size.

Every export reads its weights through one (the laziness lives in the source, not in the pipeline): a model already
in memory (`ModelWeights`), a Hugging Face checkpoint read from its memory-mapped shards (`CheckpointWeights`), or a
preset's seeded random weights drawn on demand (`RandomWeights`). `materialize` builds the PyTorch model from any
of them; the pipeline streams them layer by layer, so memory never has to hold the whole model.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..model.config import Llama4Config
from ..model.modeling import Llama4ForCausalLM, rope_inverse_frequencies
from ..model.summary import parameter_counts

# The most bytes of one weight held in memory at once while it is read (a slice along its first axes).
CHUNK_BYTES = 256 << 20
# Refuse to materialize more than this fraction of physical RAM as one model.
MAX_RAM_FRACTION = 0.6


class WeightSource(ABC):
    """Where an export reads weights from, one tensor (in slices) at a time."""

    config: Llama4Config
    checkpoint: Path | None = None  # the checkpoint directory whose tokenizer files the artifact copies, if any
    vision: Any = None  # a multimodal checkpoint's vision tensors (checkpoint.VisionWeights): the artifact gets vision.onnx

    @abstractmethod
    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """Parameter `name` converted to `dtype`, as consecutive row-major slices (`slices`)."""

    def lossless_dtype(self, name: str) -> torch.dtype:
        """The narrowest float type that holds tensor `name` exactly (what calibration may keep it in)."""
        return torch.float32

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def manifest_entry(self) -> dict[str, Any]:
        """What identifies these weights in a manifest (and in the calibration cache's key)."""

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name → shape, for every parameter of the model (the routed experts stacked [E, ...])."""
        return parameter_shapes(self.config)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return read_tensor(self, name, dtype)

    def fp32_bytes(self) -> int:
        return parameter_counts(self.config).total * 4


def parameter_shapes(config: Llama4Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in Llama4ForCausalLM(config).named_parameters()}


def slices(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Consecutive index tuples covering `shape` in row-major order, each at most CHUNK_BYTES in fp32: slices of the
    first axis, or of the second within one first-axis index when a single row is larger (a Scout expert tensor's
    row is 5120 × 16384). Depends on the shape alone, so random draws per slice are reproducible."""
    def step(inner: tuple[int, ...]) -> int:
        return max(1, CHUNK_BYTES // max(4 * int(np.prod(inner, dtype=np.int64)), 1))

    if len(shape) < 2 or step(shape[1:]) > 1 or step(shape[2:]) == 1:
        rows = step(shape[1:])
        return [(slice(start, start + rows),) for start in range(0, shape[0], rows)]
    cols = step(shape[2:])
    return [(slice(row, row + 1), slice(start, start + cols)) for row in range(shape[0]) for start in range(0, shape[1], cols)]


def slice_shape(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)) + shape[len(index):]


def converted(piece: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """`piece` in `dtype`, refused where float16 cannot hold it: a finite weight past ±65504 turned inf, and the fp16
    artifact exported with exit 0 generated one token over and over (its logits all NaN). what: names the tensor."""
    piece = piece.to(dtype)
    if dtype == torch.float16 and not torch.isfinite(piece).all():
        raise CheckpointError(f"{what} holds values beyond float16's range (±65504); export it at --precision bf16 "
                              "or fp32")
    return piece


def read_tensor(source: WeightSource, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Tensor `name` assembled from the source's slices into one preallocated tensor (no concatenation copy)."""
    out = torch.empty(source.shapes[name], dtype=dtype)
    flat, start = out.view(-1), 0
    for piece in source.chunks(name, dtype):
        flat[start:start + piece.numel()] = piece.reshape(-1)
        start += piece.numel()
    return out


def expert_by_expert(pieces: Iterator[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype = torch.float32
                     ) -> Iterator[torch.Tensor]:
    """tensor[0], tensor[1], … of a tensor given as row-major slices of any size, each in a fresh buffer."""
    size = int(np.prod(shape[1:]))
    buffer, filled = torch.empty(size, dtype=dtype), 0
    for piece in pieces:
        flat, used = piece.reshape(-1), 0
        while used < flat.numel():
            take = min(size - filled, flat.numel() - used)
            buffer[filled:filled + take] = flat[used:used + take]
            filled, used = filled + take, used + take
            if filled == size:
                yield buffer.view(shape[1:])
                buffer, filled = torch.empty(size, dtype=dtype), 0


def empty_model(config: Llama4Config) -> Llama4ForCausalLM:
    with torch.device("meta"):
        return Llama4ForCausalLM(config)


def finish_model(model: Llama4ForCausalLM) -> Llama4ForCausalLM:
    """Buffers the checkpoint does not hold (RoPE frequencies, fp32 whatever the weights), tied embeddings, eval mode."""
    config = model.config
    model.rope_inv_freq = rope_inverse_frequencies(config)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def check_fits_in_ram(config: Llama4Config, dtype: torch.dtype, what: str) -> None:
    need = parameter_counts(config).total * torch.empty(0, dtype=dtype).element_size()
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > MAX_RAM_FRACTION * ram:
        raise ConfigError(f"{what}: the model needs {need / 2**30:.0f} GiB in memory but this machine has "
                          f"{ram / 2**30:.0f} GiB of RAM; export it streamed (--stream), or use a -tiny preset")


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def materialize(source: WeightSource, dtype: torch.dtype = torch.float32) -> Llama4ForCausalLM:
    """The PyTorch model with every weight read from `source` (in `dtype`), ready to run."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    check_fits_in_ram(source.config, dtype, source.describe())
    model = empty_model(source.config)
    for name, _ in list(model.named_parameters()):
        if name == "lm_head.weight" and source.config.tie_word_embeddings:
            continue  # finish_model ties it to the embedding
        owner_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner_name), leaf, nn.Parameter(read_tensor(source, name, dtype), requires_grad=False))
    return finish_model(model)
