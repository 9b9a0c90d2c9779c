"""The vision encoder + projector of a multimodal checkpoint as a PyTorch module (`load_vision`; `vision_from_config`
gives seeded random weights for tests). The export reads them slice by slice instead (checkpoint.VisionWeights)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..model.config import Llama4VisionConfig
from ..model.loader import check_checkpoint
from ..model.vision import Llama4VisionEncoder, finish_vision_encoder
from .checkpoint import CheckpointWeights
from .random import INIT_STD
from .source import DTYPES


def load_vision(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> Llama4VisionEncoder:
    """The vision encoder of a Llama4ForConditionalGeneration checkpoint, every tensor's name and shape (text and
    vision) checked from the safetensors headers before any data is read."""
    index = check_checkpoint(checkpoint_dir)
    if index.vision is None:
        raise CheckpointError(f"{index.directory / 'config.json'}: has no vision_config; this text-only checkpoint has "
                              "no vision encoder (images need a Llama4ForConditionalGeneration checkpoint)")
    encoder = _empty_encoder(index.vision, dtype)
    for name, (key, path) in index.vision_files.items():
        _assign(encoder, name, CheckpointWeights._read(key, path, (slice(None),)).to(dtype))
    return finish_vision_encoder(encoder)


def vision_from_config(config: Llama4VisionConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Llama4VisionEncoder:
    """Deterministic random weights in RandomWeights' scheme: parameters in sorted-name order, each drawn whole from
    one torch generator seeded with `seed`, normal(0, 0.02); LayerNorm weights are ones."""
    encoder = _empty_encoder(config, dtype)
    norm_weights = {f"{name}.weight" for name, module in encoder.named_modules() if isinstance(module, nn.LayerNorm)}
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(encoder.named_parameters()):
        if name in norm_weights:
            value = torch.ones(param.shape)
        else:
            value = torch.randn(param.shape, generator=generator) * INIT_STD
        _assign(encoder, name, value.to(dtype))
    return finish_vision_encoder(encoder)


def _empty_encoder(config: Llama4VisionConfig, dtype: torch.dtype) -> Llama4VisionEncoder:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    with torch.device("meta"):
        return Llama4VisionEncoder(config)


def _assign(encoder: Llama4VisionEncoder, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(encoder.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=False))
