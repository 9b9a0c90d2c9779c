"""The sliding KV cache: preallocated numpy buffers of constant size, written where the sliding policy says.

The graphs return only the new tokens' keys/values (model/io_spec.py); this cache owns every past one:

- chunked (RoPE) layers: one chunk of `attention_chunk_size` slots, slot = position mod chunk. When a sequence's
  last token enters a new chunk, the slots of the old chunk are emptied — chunked attention never looks back past a
  chunk boundary, so this is exact at any length.
- global (NoPE) layers: a window of W slots. The first S positions ("sinks") keep slots 0..S-1 forever; every later
  position p goes to ring slot S + (p − S) mod (W − S), overwriting the oldest non-sink token. Exact while a
  sequence has at most W tokens; after that global layers see the S sinks plus the most recent W − S tokens.

Slot order does not matter to the graph: it masks by the absolute position stored for every slot (−1 = empty).
Both policies fill slots from 0 upwards until they wrap, so a growing cache (grow=True) starts with a few slots per
kind and doubles them when a step needs more, up to the chunk / W: the graph then attends over the slots a short
sequence has used, not over the whole window (graphs with dynamic slot dimensions only; TensorRT engines and CUDA
graphs keep the full size).
Batches: every sequence (row) has its own positions and slot bookkeeping, so rows of different lengths share the
buffers. A row's padding tokens carry position −1 in the graph inputs; they are never written here.
"""

from __future__ import annotations

import numpy as np

from ..model.io_spec import DEFAULT_SINKS, attention_kind
from ..plan import default_window
from ..model.config import Llama4Config
from .errors import GenerationError

INITIAL_SLOTS = 64  # a growing cache's first size per kind; doubled on demand


class ChunkSlots:
    """One chunk of slots; a step keeps only the new tokens inside the chunk of its last token."""

    def __init__(self, chunk: int):
        self.slots = chunk

    def place(self, row: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Empty stale slots of `row` (slot positions, edited in place); return (indices into `new` kept, their slots)."""
        chunk = new[-1] // self.slots
        row[(row >= 0) & (row // self.slots != chunk)] = -1
        keep = np.flatnonzero(new // self.slots == chunk)
        return keep, new[keep] % self.slots


class SinkRingSlots:
    """S sink slots for positions 0..S-1, then a ring of W − S slots for the most recent positions."""

    def __init__(self, window: int, sinks: int):
        self.slots, self.sinks = window, sinks

    def place(self, row: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ring = self.slots - self.sinks
        sink_tokens = np.flatnonzero(new < self.sinks)
        ring_tokens = np.flatnonzero(new >= self.sinks)[-ring:]  # of a long step, only the last W − S survive
        keep = np.concatenate([sink_tokens, ring_tokens])
        p = new[keep]
        return keep, np.where(p < self.sinks, p, self.sinks + (p - self.sinks) % ring)


class SlidingKVCache:
    """Per-layer K/V buffers [batch, kv_heads, slots, head_dim] plus slot positions per attention kind per row."""

    def __init__(
        self, config: Llama4Config, batch: int = 1, window: int | None = None, sinks: int = DEFAULT_SINKS,
        dtype: np.dtype | type = np.float32, grow: bool = False,
    ):
        dtype = np.dtype(dtype)
        window = default_window(config, dtype.itemsize) if window is None else int(window)
        if sinks < 0:
            raise GenerationError(f"sinks={sinks}: the number of sink tokens cannot be negative")
        if window < sinks + 1:
            raise GenerationError(
                f"window={window} with sinks={sinks}: the global window needs at least sinks + 1 = {sinks + 1} slots "
                "(S sinks plus a ring of at least one recent token); raise --window or lower --sinks"
            )
        if batch < 1:
            raise GenerationError(f"batch={batch}: need at least one sequence")
        self.config, self.batch, self.window, self.sinks, self.dtype = config, batch, window, sinks, dtype
        chunk = config.attention_chunk_size
        # Without a chunk size RoPE layers attend globally too, so they slide like the global layers.
        self.policies = {
            "chunked": ChunkSlots(chunk) if chunk else SinkRingSlots(window, sinks),
            "global": SinkRingSlots(window, sinks),
        }
        self.kinds = [attention_kind(config, i) for i in range(config.num_hidden_layers)]
        self._layers_of = {kind: [i for i, k in enumerate(self.kinds) if k == kind] for kind in self.policies}
        kvh, d = config.num_key_value_heads, config.head_dim
        size = {k: min(p.slots, INITIAL_SLOTS) if grow else p.slots for k, p in self.policies.items()}
        self.keys = [np.zeros((batch, kvh, size[k], d), dtype) for k in self.kinds]
        self.values = [np.zeros_like(k) for k in self.keys]
        self.positions = {k: np.full((batch, size[k]), -1, np.int64) for k in self.policies}
        self.lengths = np.zeros(batch, np.int64)  # tokens cached so far per row = the next token's position
        self.reallocations = 0  # bumped whenever the buffers are replaced (a backend holding views rebinds)

    def slots(self, kind: str) -> int:
        return self.policies[kind].slots

    def _reserve(self, kind: str, needed: int) -> None:
        """Grow `kind`'s buffers to hold slot indices below `needed` (doubling, capped at the policy's slots)."""
        size = self.positions[kind].shape[1]
        if needed <= size:
            return
        new_size = min(self.policies[kind].slots, max(needed, 2 * size))
        grown = np.full((self.batch, new_size), -1, np.int64)
        grown[:, :size] = self.positions[kind]
        self.positions[kind] = grown
        for i in self._layers_of[kind]:
            for buffers in (self.keys, self.values):
                old = buffers[i]
                buffers[i] = np.zeros(old.shape[:2] + (new_size,) + old.shape[3:], old.dtype)
                buffers[i][:, :, :size] = old
        self.reallocations += 1

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values) + sum(p.nbytes for p in self.positions.values())

    def reset(self) -> None:
        """Empty every row without reallocating (the buffers' stale contents are masked by position −1)."""
        for p in self.positions.values():
            p.fill(-1)
        self.lengths.fill(0)

    def update(self, positions: np.ndarray, new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> None:
        """Write a step's new K/V ([batch, kv_heads, T, head_dim] per layer) for the tokens with position >= 0.

        Each row's valid positions must continue that row exactly (lengths[b], lengths[b] + 1, ...).
        """
        if positions.shape[0] != self.batch:
            raise ValueError(f"positions has batch {positions.shape[0]}, the cache holds {self.batch} rows")
        for b in range(self.batch):
            columns = np.flatnonzero(positions[b] >= 0)
            if columns.size == 0:
                continue
            new = positions[b, columns]
            expected = np.arange(self.lengths[b], self.lengths[b] + new.size)
            if not np.array_equal(new, expected):
                raise ValueError(f"row {b}: positions {new.tolist()} do not continue the cached {self.lengths[b]} tokens")
            for kind, policy in self.policies.items():
                keep, slots = policy.place(self.positions[kind][b], new)
                if slots.size:
                    self._reserve(kind, int(slots.max()) + 1)
                self.positions[kind][b][slots] = new[keep]
                src = columns[keep]
                for i in self._layers_of[kind]:
                    self.keys[i][b][:, slots] = new_keys[i][b][:, src]
                    self.values[i][b][:, slots] = new_values[i][b][:, src]
            self.lengths[b] += new.size
