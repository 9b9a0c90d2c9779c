"""The step contract every backend implements (model/io_spec.py): one forward over new tokens of every row, which
advances the backend's own KV cache.

make_cache(batch, window, sinks) → the cache its graphs read (SlidingKVCache or InPlaceKVCache, kv_cache.py);
forward(input_ids [B, T], positions [B, T], cache, logits_index [B, L] | None) → logits [B, L, V] — the tokens
logits_index picks in each row, all T when None; afterwards the cache holds the step's tokens.
Backends: OrtBackend (ort_backend.py: ONNX Runtime over one or more partitions), TrtBackend (trt_backend.py:
TensorRT engines), and the PyTorch reference (evaluation/torch_backend.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..model.config import Llama4Config
from .kv_cache import InPlaceKVCache, SlidingKVCache

KVCacheState = SlidingKVCache | InPlaceKVCache


class Backend(Protocol):
    name: str
    config: Llama4Config
    cache_dtype: np.dtype
    max_prefill_tokens: int  # the most new tokens one forward call takes per row
    required_slots: dict[str, int]  # kind -> slot count a graph with static cache shapes insists on

    def make_cache(self, batch: int, window: int | None, sinks: int) -> KVCacheState: ...

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, cache: KVCacheState,
                logits_index: np.ndarray | None = None) -> np.ndarray: ...
