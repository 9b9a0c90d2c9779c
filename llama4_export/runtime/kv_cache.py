"""The sliding KV caches: numpy buffers per layer, kept by the sliding policy below, in the two layouts of
model/io_spec.py — SlidingKVCache (positions: the graphs return the new tokens' K/V and the cache writes them) and
InPlaceKVCache (in_place: the graphs append to the buffers themselves; the cache keeps the lengths and moves a few
slots after a step). Both hold the same tokens in the same slots, so a graph sees the same context in either.

The policy, per attention kind:

- chunked (RoPE) layers: one chunk of `attention_chunk_size` slots, slot = position mod chunk. When a sequence's
  last token enters a new chunk, the slots of the old chunk are emptied — chunked attention never looks back past a
  chunk boundary, so this is exact at any length.
- global (NoPE) layers: a window of W slots. The first S positions ("sinks") keep slots 0..S-1 forever; every later
  position p goes to ring slot S + (p − S) mod (W − S), overwriting the oldest non-sink token. Exact while a
  sequence has at most W tokens; after that global layers see the S sinks plus the most recent W − S tokens.

A step's tokens all see every token the cache holds before the step (and each other causally); the policy is applied
after the step.

Both policies fill slots from 0 upwards until they wrap, so a growing cache (grow=True) starts with a few slots per
kind and doubles them when a step needs more, up to the chunk / W: the graph then attends over the slots a short
sequence has used, not over the whole window (graphs with dynamic slot dimensions only; TensorRT engines and CUDA
graphs keep the full size).
Batches: every sequence (row) has its own bookkeeping, so rows of different lengths share the buffers. A row's
padding tokens carry position −1 in the graph inputs; they are never kept.
"""

from __future__ import annotations

import copy

import numpy as np

from ..model.io_spec import DEFAULT_SINKS, attention_kind, decode_scratch_slots
from ..plan import default_window
from ..model.config import Llama4Config
from .errors import GenerationError

INITIAL_SLOTS = 64  # a growing cache's first size per kind; doubled on demand


class ChunkSlots:
    """One chunk of slots; a step keeps only the new tokens inside the chunk of its last token."""

    def __init__(self, chunk: int):
        self.slots = chunk

    def capacity(self, max_step: int) -> int:
        """Slots a buffer needs; in place, a step's tokens stay in one chunk (piece_limit), so the chunk is enough."""
        return self.slots

    def piece_limit(self, first: int) -> int:
        """The most tokens a step starting at position `first` may have in place: up to the chunk's end."""
        return self.slots - first % self.slots

    def appended(self, filled: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray, int]:
        """In place: the graph wrote positions first.. at slots filled..; return (slot moves (from, to), new filled).
        A chunk's slots hold its positions in order; the row starts over (0 valid slots) when its chunk is complete."""
        if filled != first % self.slots or (first + count - 1) // self.slots != first // self.slots:
            raise ValueError(f"positions {first}..{first + count - 1} do not continue a chunk holding {filled} slots")
        end = (first + count) % self.slots
        return _NO_MOVES, _NO_MOVES, end

    def kept(self, length: int, filled: int, tokens: int) -> int | None:
        """The filled slots of a row of `length` tokens (`filled` of them in slots) cut back to its first `tokens`:
        the current chunk holds every prefix from its start on, and a prefix that ends at a chunk boundary needs no
        slot at all; None for the others (their chunk is gone)."""
        return tokens % self.slots if tokens >= length - filled or tokens % self.slots == 0 else None

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

    def capacity(self, max_step: int) -> int:
        """Slots a buffer needs: W, plus room behind a full window for an in-place step's tokens before they move into
        the ring."""
        return self.slots + max_step

    def piece_limit(self, first: int) -> int:
        return np.iinfo(np.int64).max

    def appended(self, filled: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray, int]:
        """In place: the graph wrote positions first.. at slots filled..; the ones past the window move to their ring
        slots (the slots SlidingKVCache gives them), the last W − S of them surviving."""
        if filled != min(first, self.slots):
            raise ValueError(f"positions from {first} do not continue a window holding {filled} slots")
        if count == 1:  # a decode step's token: stays at its slot until the window is full, then takes its ring slot
            if first < self.slots:
                return _NO_MOVES, _NO_MOVES, filled + 1
            return np.array([filled]), np.array([self.sinks + (first - self.sinks) % (self.slots - self.sinks)]), filled
        positions = first + np.arange(count)
        keep, slots = self.place(np.empty(0, np.int64), positions)
        sources = filled + keep
        moved = sources != slots
        return sources[moved], slots[moved], min(filled + count, self.slots)

    def kept(self, length: int, filled: int, tokens: int) -> int | None:
        """The filled slots of a row of `length` tokens (`filled` of them in slots) cut back to its first `tokens`:
        any prefix until the window has wrapped and overwritten its oldest tokens; None after."""
        return tokens if filled == length else filled if tokens == length else None

    def place(self, row: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ring = self.slots - self.sinks
        sink_tokens = np.flatnonzero(new < self.sinks)
        ring_tokens = np.flatnonzero(new >= self.sinks)[-ring:]  # of a long step, only the last W − S survive
        keep = np.concatenate([sink_tokens, ring_tokens])
        p = new[keep]
        return keep, np.where(p < self.sinks, p, self.sinks + (p - self.sinks) % ring)


_NO_MOVES = np.empty(0, np.int64)


MAX_WINDOW = 2**62


class _Buffers:
    """What both layouts share: the policies, per-layer buffers of a kind-dependent size, per-row lengths."""

    layout: str

    def __init__(self, config: Llama4Config, batch: int, window: int | None, sinks: int, dtype, max_step: int,
                 grow: bool, scratch: int = 0):
        """max_step: the most tokens an in-place step appends (0: the graphs never write the buffers); scratch: the
        slots an in-place step may also write after its tokens, in every buffer."""
        dtype = np.dtype(dtype)
        window = default_window(config, dtype.itemsize) if window is None else int(window)
        if sinks < 0:
            raise GenerationError(f"sinks={sinks}: the number of sink tokens cannot be negative")
        for name, value in (("window", window), ("sinks", sinks)):  # positions are int64 (it was an OverflowError)
            if value > MAX_WINDOW:
                raise GenerationError(f"{name}={value}: at most {MAX_WINDOW} (2^62) tokens")
        if window < sinks + 1:
            raise GenerationError(
                f"window={window} with sinks={sinks}: the global window needs at least sinks + 1 = {sinks + 1} slots "
                f"(S sinks plus a ring of at least one recent token); give a window of at least {sinks + 1}"
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
        self.scratch = scratch
        self.capacity = {kind: policy.capacity(max_step) + scratch for kind, policy in self.policies.items()}
        self.kinds = [attention_kind(config, i) for i in range(config.num_hidden_layers)]
        self._layers_of = {kind: [i for i, k in enumerate(self.kinds) if k == kind] for kind in self.policies}
        kvh, d = config.num_key_value_heads, config.head_dim
        self.sizes = {k: min(c, INITIAL_SLOTS) if grow else c for k, c in self.capacity.items()}  # slots allocated
        self.keys = [np.zeros((batch, kvh, self.sizes[k], d), dtype) for k in self.kinds]
        self.values = [np.zeros_like(k) for k in self.keys]
        self.lengths = np.zeros(batch, np.int64)  # tokens cached so far per row = the next token's position
        self.reallocations = 0  # bumped whenever the buffers are replaced (a backend holding views rebinds)
        self.is_view = False  # a view of another cache's first rows (first_rows), which cannot grow the buffers

    def slots(self, kind: str) -> int:
        """The slots the sliding policy keeps for `kind` (the chunk, or W)."""
        return self.policies[kind].slots

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values)

    def _grow_buffers(self, kind: str, new_size: int) -> None:
        if self.is_view:
            raise GenerationError("a view of a cache's first rows cannot grow the buffers; reserve on the whole cache")
        for i in self._layers_of[kind]:
            for buffers in (self.keys, self.values):
                old = buffers[i]
                buffers[i] = np.zeros(old.shape[:2] + (new_size,) + old.shape[3:], old.dtype)
                buffers[i][:, :, : old.shape[2]] = old
        self.sizes[kind] = new_size
        self.reallocations += 1

    def _new_size(self, kind: str, needed: int) -> int | None:
        """The size to grow `kind` to for slot indices below `needed` (doubling, capped), None when it fits."""
        size = self.sizes[kind]
        if needed <= size:
            return None
        if needed > self.capacity[kind]:
            raise GenerationError(f"{needed} {kind} cache slots needed, {self.capacity[kind]} allocated at most; "
                                  "feed fewer tokens per step")
        return min(self.capacity[kind], max(needed, 2 * size))

    def _check_continues(self, b: int, new: np.ndarray) -> None:
        # a decode step's one token without building arrays: this runs for every row of every step
        continues = new[0] == self.lengths[b] if new.size == 1 else \
            np.array_equal(new, np.arange(self.lengths[b], self.lengths[b] + new.size))
        if not continues:
            raise ValueError(f"row {b}: positions {new.tolist()} do not continue the cached {self.lengths[b]} tokens")


class SlidingKVCache(_Buffers):
    """positions layout: per-layer K/V buffers [batch, kv_heads, slots, head_dim] plus the position each slot holds,
    per attention kind per row; update() writes a step's new K/V."""

    layout = "positions"

    def __init__(
        self, config: Llama4Config, batch: int = 1, window: int | None = None, sinks: int = DEFAULT_SINKS,
        dtype: np.dtype | type = np.float32, grow: bool = False,
    ):
        super().__init__(config, batch, window, sinks, dtype, 0, grow)
        self.positions = {k: np.full((batch, size), -1, np.int64) for k, size in self.sizes.items()}

    def _reserve(self, kind: str, needed: int) -> None:
        """Grow `kind`'s buffers to hold slot indices below `needed`."""
        new_size = self._new_size(kind, needed)
        if new_size is None:
            return
        grown = np.full((self.batch, new_size), -1, np.int64)
        grown[:, : self.sizes[kind]] = self.positions[kind]
        self.positions[kind] = grown
        self._grow_buffers(kind, new_size)

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(p.nbytes for p in self.positions.values())

    def reset(self) -> None:
        """Empty every row without reallocating (the buffers' stale contents are masked by position −1)."""
        for p in self.positions.values():
            p.fill(-1)
        self.lengths.fill(0)

    def reset_row(self, row: int) -> None:
        """Empty one row (a finished sequence's) for the next one, leaving the others untouched."""
        for p in self.positions.values():
            p[row] = -1
        self.lengths[row] = 0

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
            self._check_continues(b, new)
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


class InPlaceKVCache(_Buffers):
    """in_place layout: per-layer buffers [batch, kv_heads, capacity, head_dim] whose first filled[kind][b] slots are
    row b's valid ones. A step's graph writes its tokens at slots filled.. itself; advance() then applies the
    policy: a chunked row starts over when its chunk is complete, a full global window moves the step's tokens into
    their ring slots. A step's tokens must stay in one chunk (piece_limit) and number at most max_step; every buffer
    keeps io_spec.decode_scratch_slots free slots after them (a decode step's scratch writes)."""

    layout = "in_place"

    def __init__(
        self, config: Llama4Config, batch: int = 1, window: int | None = None, sinks: int = DEFAULT_SINKS,
        dtype: np.dtype | type = np.float32, max_step: int = 1, grow: bool = True,
    ):
        super().__init__(config, batch, window, sinks, dtype, max_step, grow, scratch=decode_scratch_slots(config))
        self.max_step = max_step
        self.filled = {kind: np.zeros(batch, np.int64) for kind in self.policies}  # bound as the graphs' past_lengths

    def reset(self) -> None:
        for filled in self.filled.values():
            filled.fill(0)
        self.lengths.fill(0)

    def reset_row(self, row: int) -> None:
        """Empty one row (a finished sequence's) for the next one, leaving the others untouched."""
        for filled in self.filled.values():
            filled[row] = 0
        self.lengths[row] = 0

    def first_rows(self, count: int) -> "InPlaceKVCache":
        """Rows 0..count − 1 as a cache over the same memory (batch is every buffer's leading axis, so these are
        contiguous views): a step over them alone skips the idle rows above (a continuous batch's decode). Steps
        through the view advance this cache; reserve room on this cache first (a view cannot grow the buffers) and
        take a new view once `reallocations` changes."""
        view = copy.copy(self)
        view.batch, view.is_view = count, True
        view.keys = [k[:count] for k in self.keys]
        view.values = [v[:count] for v in self.values]
        view.lengths = self.lengths[:count]
        view.filled = {kind: filled[:count] for kind, filled in self.filled.items()}
        return view

    def piece_limit(self, b: int) -> int:
        """The most tokens row b's next step may have."""
        first = int(self.lengths[b])
        return min([self.max_step] + [policy.piece_limit(first) for policy in self.policies.values()])

    def reserve(self, rows: slice | int, tokens: int) -> None:
        """Room for a step of `tokens` new tokens in `rows` (the others' garbage writes included: rows without new
        tokens still get them written at their filled slots)."""
        for kind, filled in self.filled.items():
            new_size = self._new_size(kind, int(np.max(filled[rows])) + tokens + self.scratch)
            if new_size is not None:
                self._grow_buffers(kind, new_size)

    def longest_kept_prefix(self, row: int, tokens: int) -> int:
        """The most of row's first `tokens` tokens it can be cut back to (keep_prefix): all of them while its
        chunked layers are still in the chunk where they end, else back to a chunk boundary; 0 when none."""
        tokens = min(tokens, int(self.lengths[row]))
        boundaries = [tokens // policy.slots * policy.slots for policy in self.policies.values()
                      if isinstance(policy, ChunkSlots)]
        return next((n for n in [tokens, *boundaries] if n > 0 and self._kept(row, n) is not None), 0)

    def keep_prefix(self, row: int, tokens: int) -> None:
        """Cut row back to its first `tokens` tokens (a new sequence whose prompt starts with them continues from
        there): slots fill in position order until a chunk ends or the window wraps, so only the lengths change."""
        kept = self._kept(row, tokens) if 0 < tokens <= self.lengths[row] else None
        if kept is None:
            raise ValueError(f"row {row} no longer holds its first {tokens} of {self.lengths[row]} tokens alone")
        for kind, filled in kept.items():
            self.filled[kind][row] = filled
        self.lengths[row] = tokens

    def _kept(self, row: int, tokens: int) -> dict[str, int] | None:
        """Each kind's filled slots once row is cut back to its first `tokens` tokens; None if a kind lost them."""
        length = int(self.lengths[row])
        kept = {kind: policy.kept(length, int(self.filled[kind][row]), tokens) for kind, policy in self.policies.items()}
        return None if None in kept.values() else kept

    def adopt_row(self, row: int, source: "InPlaceKVCache", source_row: int) -> None:
        """Empty row `row` takes over `source`'s row `source_row` (a prefill run in another cache joins this one): its
        valid slots are copied as they lie (a slot's place depends only on its position) with its length."""
        if self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} tokens; only an empty row can adopt another")
        for kind in self.policies:
            count = int(source.filled[kind][source_row])
            new_size = self._new_size(kind, count)
            if new_size is not None:
                self._grow_buffers(kind, new_size)
            for i in self._layers_of[kind]:
                self.keys[i][row, :, :count] = source.keys[i][source_row, :, :count]
                self.values[i][row, :, :count] = source.values[i][source_row, :, :count]
            self.filled[kind][row] = count
        self.lengths[row] = source.lengths[source_row]

    def advance(self, positions: np.ndarray) -> None:
        """After a step that wrote positions [batch, T] (−1 = padding, after each row's tokens) in place."""
        if positions.shape[0] != self.batch:
            raise ValueError(f"positions has batch {positions.shape[0]}, the cache holds {self.batch} rows")
        one_token = positions.shape[1] == 1
        for b in range(self.batch):
            count = int(positions[b, 0] >= 0) if one_token else int((positions[b] >= 0).sum())
            if count == 0:
                continue
            self._check_continues(b, positions[b, :count])
            first = int(self.lengths[b])
            for kind, policy in self.policies.items():
                sources, slots, self.filled[kind][b] = policy.appended(int(self.filled[kind][b]), first, count)
                if sources.size:
                    # a decode step's one token moves by plain indexing, not a gather
                    to, source = (int(slots[0]), int(sources[0])) if sources.size == 1 else (slots, sources)
                    for i in self._layers_of[kind]:
                        self.keys[i][b, :, to] = self.keys[i][b, :, source]
                        self.values[i][b, :, to] = self.values[i][b, :, source]
            self.lengths[b] += count
