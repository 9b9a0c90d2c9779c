"""Stage 7: the runtime — a Generator over a backend (ONNX Runtime, TensorRT), the sliding KV cache, sampling and the
tokenizer. It imports neither torch nor the exporter: an application that only runs artifacts needs neither."""

from ..model.io_spec import DEFAULT_SINKS
from ..plan import default_window
from .backends import Backend
from .errors import GenerationError
from .generator import GenerationResult, Generator, TokenEvent
from .kv_cache import InPlaceKVCache, SlidingKVCache
from .ort_backend import OrtBackend
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_SINKS", "Backend", "GenerationError", "GenerationResult", "Generator", "InPlaceKVCache", "OrtBackend",
    "Sampler", "SamplingParams", "SlidingKVCache", "TokenEvent", "Tokenizer", "default_window",
]
