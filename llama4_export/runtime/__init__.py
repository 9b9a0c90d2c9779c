"""Stage 6: the Generator — a backend (ONNX Runtime, PyTorch reference), the sliding KV cache, sampling and the tokenizer."""

from .backends import Backend, OrtBackend, StepOutput, TorchBackend
from .errors import GenerationError
from .generator import GenerationResult, Generator, TokenEvent
from .kv_cache import DEFAULT_SINKS, SlidingKVCache, default_window
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_SINKS", "Backend", "GenerationError", "GenerationResult", "Generator", "OrtBackend", "Sampler",
    "SamplingParams", "SlidingKVCache", "StepOutput", "TokenEvent", "Tokenizer", "TorchBackend", "default_window",
]
