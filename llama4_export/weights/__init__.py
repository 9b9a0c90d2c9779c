"""Weight sources (stage 2): where an export, a calibration or a reference model reads its weights from — a model in
memory, a Hugging Face checkpoint read slice by slice, or a preset's seeded random weights. The source decides
laziness; everything downstream reads through `WeightSource.chunks`."""

from pathlib import Path

import torch

from .checkpoint import CheckpointWeights, VisionWeights, check_matches_preset
from .memory import ModelWeights, in_memory
from .random import FULL_SIZE_SOURCES, RandomWeights, from_config, from_preset, full_size_weights_hint
from .recorded import check_as_recorded, recorded_source
from .source import CHUNK_BYTES, WeightSource, expert_by_expert, materialize, read_tensor, slices
from .vision import load_vision, vision_from_config


def load(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A Llama 4 text model from a HF checkpoint directory, every tensor's name and shape checked first."""
    return materialize(CheckpointWeights(checkpoint_dir), dtype)


__all__ = [
    "CHUNK_BYTES", "FULL_SIZE_SOURCES", "CheckpointWeights", "ModelWeights", "RandomWeights", "WeightSource",
    "check_as_recorded", "check_matches_preset", "expert_by_expert", "from_config", "from_preset", "full_size_weights_hint", "in_memory",
    "load", "load_vision", "materialize", "read_tensor", "recorded_source", "slices", "VisionWeights", "vision_from_config",
]
