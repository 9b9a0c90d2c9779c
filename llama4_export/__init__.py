"""llama4-export: Llama 4 from a PyTorch definition to ONNX / TensorRT artifacts, and a runtime for them."""

from .errors import CheckpointError, ConfigError, Llama4ExportError
from .model import Llama4Config, Llama4ForCausalLM, from_preset, load

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Llama4Config", "Llama4ExportError", "Llama4ForCausalLM", "from_preset", "load"]
