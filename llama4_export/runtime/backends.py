"""The step contract every backend implements (model/io_spec.py): one forward over new tokens of every row, reading
a SlidingKVCache it never writes.

forward(input_ids [B, T], positions [B, T], cache, logits_index [B, L] | None) → StepOutput(logits [B, L, V] — the
tokens logits_index picks in each row, all T when None —, new K/V per layer [B, kvh, T, D]).
The Generator writes the new K/V into the cache. Backends: OrtBackend (ort_backend.py: ONNX Runtime over one or
more partitions), TrtBackend (trt_backend.py: TensorRT engines), and the PyTorch reference
(evaluation/torch_backend.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..model.config import Llama4Config
from .kv_cache import SlidingKVCache


@dataclass
class StepOutput:
    logits: np.ndarray
    new_keys: list[np.ndarray]
    new_values: list[np.ndarray]


class Backend(Protocol):
    name: str
    config: Llama4Config
    cache_dtype: np.dtype
    max_prefill_tokens: int  # the most new tokens one forward call takes per row
    required_slots: dict[str, int]  # kind -> slot count a graph with static cache shapes insists on

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache,
                logits_index: np.ndarray | None = None) -> StepOutput: ...
