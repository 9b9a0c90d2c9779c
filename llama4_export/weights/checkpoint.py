"""A Hugging Face checkpoint as a weight source: validated from its safetensors headers first, then each tensor read
from its memory-mapped shard one slice at a time (the shard mapped only while a slice is copied, so pages read do not
stay resident). A multimodal checkpoint's vision tensors are read the same way (`VisionWeights`)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from ..artifact import sha256_file
from ..errors import CheckpointError
from ..model.config import Llama4Config, Llama4VisionConfig, get_preset
from ..model.loader import INDEX_FILE, CheckpointIndex, check_checkpoint
from ..model.vision import Llama4VisionEncoder, vision_rope_tables
from .source import WeightSource, converted, slices

# Fields that decide tensor shapes and layer kinds: a checkpoint given with --model PRESET must match them.
SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_local_experts", "moe_layers", "no_rope_layers", "use_qk_norm",
    "tie_word_embeddings",
)


class CheckpointWeights(WeightSource):
    """preset: check the checkpoint's shapes against this preset (cut to `layers`) before anything is read."""

    def __init__(self, directory: str | Path, preset: str | None = None, layers: int | None = None):
        self.index = check_checkpoint(directory)
        self.config = self.index.config
        self.checkpoint = self.index.directory
        self.vision = VisionWeights(self.index) if self.index.vision is not None else None
        if preset is not None:
            check_matches_preset(self.config, preset, layers, self.index.directory / "config.json")

    def _location(self, name: str) -> tuple[str, Path]:
        if name not in self.index.files and name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        try:
            return self.index.files[name]
        except KeyError:
            raise CheckpointError(f"{self.index.directory}: tensor {name!r} is missing from the checkpoint") from None

    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        key, path = self._location(name)
        for index in slices(self.shapes[name]):
            yield converted(self._read(key, path, index), dtype, f"{path}: tensor {key!r}")

    def lossless_dtype(self, name: str) -> torch.dtype:
        key, path = self._location(name)
        with safe_open(str(path), framework="pt") as f:
            stored = f.get_slice(key).get_dtype()
        return {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)

    @staticmethod
    def _read(key: str, path: Path, index: tuple) -> torch.Tensor:
        try:
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_slice(key)[index]
        except Exception as exc:  # safetensors raises its own types for corrupt data
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({exc}); the shard is damaged, re-download it") from None
        # one NaN exported with exit 0 and generated one token over and over (its logits are all NaN)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {key!r} holds NaN or infinite values; the shard is damaged "
                                  "(re-download it) or was saved from a diverged model")
        return tensor

    def describe(self) -> str:
        return f"checkpoint {self.index.directory}"

    def manifest_entry(self) -> dict[str, Any]:
        return self._identity

    @functools.cached_property
    def _identity(self) -> dict[str, Any]:
        """The checkpoint's name and the sha256 of the files read: its directory's name only, not its path, so the same
        checkpoint gives the same manifest on any machine. Hashed once (a full-size checkpoint is 200+ GB)."""
        ckpt = self.index.directory
        index = [ckpt / INDEX_FILE] if (ckpt / INDEX_FILE).is_file() else []
        files = [ckpt / "config.json", *index, *sorted(ckpt.glob("*.safetensors"))]
        # the name of `.` or `..` is that of the directory they stand for (not resolved: a symlink's name is kept)
        return {"checkpoint": Path(os.path.abspath(ckpt)).name, "files": {f.name: sha256_file(f) for f in files}}


class VisionWeights:
    """The tensors of a checkpoint's vision graph by parameter name, as row-major slices (what the writer reads from
    a WeightSource), and the RoPE tables the graph holds, computed from the config."""

    def __init__(self, index: CheckpointIndex):
        self.index = index
        self.config: Llama4VisionConfig = index.vision

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            return {name: tuple(p.shape) for name, p in Llama4VisionEncoder(self.config).named_parameters()}

    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        if name in ROPE_TABLES:
            yield vision_rope_tables(self.config)[ROPE_TABLES.index(name)].to(dtype)
            return
        key, path = self.index.vision_files[name]
        for index in slices(self.shapes[name]):
            yield converted(CheckpointWeights._read(key, path, index), dtype, f"{path}: tensor {key!r}")


ROPE_TABLES = ("vision_model.rope_cos", "vision_model.rope_sin")  # vision_rope_tables' order


def check_matches_preset(config: Llama4Config, preset: str, layers: int | None, config_path: Path) -> None:
    """Raise naming the first shape field where a checkpoint's config differs from the preset (cut to `layers`)."""
    expected = get_preset(preset, layers)
    for field in SHAPE_FIELDS:
        got, want = getattr(config, field), getattr(expected, field)
        if field == "no_rope_layers":
            got, want = got[:config.num_hidden_layers], want[:expected.num_hidden_layers]
        if got != want:
            hint = " (pass --layers N for a checkpoint with fewer layers)" if field == "num_hidden_layers" else ""
            raise CheckpointError(f"{config_path}: {field} is {_short(got)} but preset {preset} has {_short(want)}; "
                                  f"this checkpoint is not {preset}-shaped{hint}")


def _short(value: Any) -> str:
    text = str(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 60 else text[:57] + "..."
