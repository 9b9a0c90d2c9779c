"""Stage 1: the Llama 4 text model (config, PyTorch module, checkpoint loading, architecture arithmetic)."""

from .config import PRESETS, Llama4Config, RopeScaling, get_preset
from .loader import from_config, from_preset, load
from .modeling import KVCache, Llama4ForCausalLM, NewKV
from .summary import kv_bytes_per_token, parameter_counts, summarize, weight_bytes

__all__ = [
    "PRESETS", "KVCache", "Llama4Config", "Llama4ForCausalLM", "NewKV", "RopeScaling", "from_config", "from_preset",
    "get_preset", "kv_bytes_per_token", "load", "parameter_counts", "summarize", "weight_bytes",
]
