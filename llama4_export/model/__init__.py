"""Stage 1: the Llama 4 model — config and architecture arithmetic (torch-free, what the runtime reads), the graph
I/O spec, and the PyTorch modules and checkpoint loader (`model.modeling`, `model.loader`: import them by name,
they need torch)."""

from .config import PRESETS, VISION_PRESETS, Llama4Config, Llama4VisionConfig, RopeScaling, get_preset, get_vision_preset
from .summary import kv_bytes_per_token, parameter_counts, summarize, weight_bytes

__all__ = [
    "PRESETS", "VISION_PRESETS", "Llama4Config", "Llama4VisionConfig", "RopeScaling", "get_preset", "get_vision_preset",
    "kv_bytes_per_token", "parameter_counts", "summarize", "weight_bytes",
]
