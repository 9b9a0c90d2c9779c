"""llama4-export: Llama 4 from a PyTorch definition to ONNX / TensorRT artifacts, and a runtime for them.

The stages are subpackages with one direction of imports (README "Architecture"); this package file imports nothing
that needs torch, so `import llama4_export.runtime` stays light. The entry points:

    from llama4_export import api                      # export_model, inspect_model, plan_gpu_memory, … (needs torch)
    from llama4_export.runtime import Generator        # run an artifact (ONNX Runtime / TensorRT; no torch)
    from llama4_export.weights import load, from_preset   # the PyTorch model from a checkpoint or a preset
"""

from .errors import CheckpointError, ConfigError, Llama4ExportError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Llama4ExportError", "__version__"]
