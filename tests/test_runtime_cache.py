"""SlidingKVCache bookkeeping against set arithmetic: which positions each layer kind must still hold after n tokens.

The reference never computes a slot: it states what must be visible (the chunk of the last token; all tokens while
n <= W, else the S sinks + the W − S most recent) and checks every stored slot holds the K/V given for its position.
"""

from __future__ import annotations

import numpy as np
import pytest

from llama4_export.model import get_preset, io_spec
from llama4_export.runtime import GenerationError, SlidingKVCache
from llama4_export.runtime.kv_cache import InPlaceKVCache

CONFIG = get_preset("scout-tiny").replace(attention_chunk_size=8)  # layers 3 and 7 global, the rest chunked


def expected_positions(kind: str, n: int, chunk: int, window: int, sinks: int) -> set[int]:
    if n == 0:
        return set()
    if kind == "chunked":
        start = (n - 1) // chunk * chunk
        return set(range(start, n))
    if n <= window:
        return set(range(n))
    return set(range(sinks)) | set(range(n - (window - sinks), n))


def marker(layer: int, position: int, value: bool) -> float:
    """A value identifying (layer, position, K or V), written as the token's whole K/V vector."""
    return layer * 10000 + position + (0.5 if value else 0.0)


def step_kv(positions: np.ndarray, layers: int, kvh: int, d: int):
    """New K/V for a step: each token's vectors hold its marker; padding (position −1) holds garbage."""
    b, t = positions.shape
    keys, values = [], []
    for i in range(layers):
        k = np.full((b, kvh, t, d), -7.0, np.float32)
        v = np.full((b, kvh, t, d), -7.0, np.float32)
        for r in range(b):
            for j in range(t):
                if positions[r, j] >= 0:
                    k[r, :, j] = marker(i, positions[r, j], False)
                    v[r, :, j] = marker(i, positions[r, j], True)
        keys.append(k)
        values.append(v)
    return keys, values


def check_cache(cache: SlidingKVCache, lengths: list[int]) -> None:
    cfg = cache.config
    for r, n in enumerate(lengths):
        for kind in ("chunked", "global"):
            row = cache.positions[kind][r]
            held = row[row >= 0]
            assert len(set(held.tolist())) == len(held), f"row {r} {kind}: a position is stored twice: {sorted(held)}"
            want = expected_positions(kind, n, cfg.attention_chunk_size, cache.window, cache.sinks)
            assert set(held.tolist()) == want, f"row {r} {kind} after {n} tokens"
        for i in range(cfg.num_hidden_layers):
            kind = "global" if not cfg.uses_rope(i) else "chunked"
            row = cache.positions[kind][r]
            for slot in np.flatnonzero(row >= 0):
                assert np.all(cache.keys[i][r, :, slot] == marker(i, row[slot], False))
                assert np.all(cache.values[i][r, :, slot] == marker(i, row[slot], True))


def feed(cache: SlidingKVCache, steps: list[list[int]]) -> list[int]:
    """steps[k][r] = tokens row r adds at step k (0 = padding only); returns the lengths after all steps."""
    cfg = cache.config
    lengths = [0] * cache.batch
    for counts in steps:
        t = max(max(counts), 1)
        positions = np.full((cache.batch, t), -1, np.int64)
        for r, c in enumerate(counts):
            positions[r, :c] = np.arange(lengths[r], lengths[r] + c)
        keys, values = step_kv(positions, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        cache.update(positions, keys, values)
        lengths = [n + c for n, c in zip(lengths, counts)]
        check_cache(cache, lengths)
    return lengths


def test_token_by_token_within_and_past_the_window():
    cache = SlidingKVCache(CONFIG, batch=1, window=12, sinks=3)
    feed(cache, [[1]] * 40)  # crosses 5 chunk boundaries and the window by 28 tokens


def test_prefill_pieces_of_mixed_sizes_cross_chunks_and_window():
    cache = SlidingKVCache(CONFIG, batch=1, window=12, sinks=2)
    # a 5-token piece crossing chunk 0→1, a 20-token piece longer than W and than W − S, then decode.
    feed(cache, [[5], [20], [1], [1], [7], [1]])


def test_batch_rows_of_different_lengths_are_independent():
    cache = SlidingKVCache(CONFIG, batch=3, window=10, sinks=4)
    lengths = feed(cache, [[3, 11, 0], [1, 0, 9], [0, 1, 1], [6, 6, 6]] + [[1, 1, 1]] * 9 + [[0, 1, 0]])
    assert cache.lengths.tolist() == lengths == [19, 28, 25]


def test_sink_slots_never_move_and_ring_evicts_oldest_first():
    window, sinks = 7, 2
    cache = SlidingKVCache(CONFIG, batch=1, window=window, sinks=sinks)
    feed(cache, [[window]])
    sink_slots = {int(p): s for s, p in enumerate(cache.positions["global"][0]) if p < sinks}
    for n in range(window, window + 3 * (window - sinks)):
        before = set(cache.positions["global"][0].tolist())
        feed_one(cache, n)
        after = set(cache.positions["global"][0].tolist())
        assert before - after == {n - (window - sinks)}  # the oldest non-sink token, and only it
        assert after - before == {n}
        assert {int(p): s for s, p in enumerate(cache.positions["global"][0]) if p < sinks} == sink_slots


def feed_one(cache: SlidingKVCache, position: int) -> None:
    cfg = cache.config
    positions = np.array([[position]], np.int64)
    keys, values = step_kv(positions, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    cache.update(positions, keys, values)


def test_chunk_buffer_is_emptied_when_a_new_chunk_starts():
    cache = SlidingKVCache(CONFIG, batch=1, window=64, sinks=4)
    feed(cache, [[8]])  # exactly one full chunk
    assert sorted(cache.positions["chunked"][0].tolist()) == list(range(8))
    feed_one(cache, 8)
    assert sorted(cache.positions["chunked"][0].tolist()) == [-1] * 7 + [8]


def test_memory_is_preallocated_and_constant():
    cache = SlidingKVCache(CONFIG, batch=2, window=16, sinks=4)
    kvh, d = CONFIG.num_key_value_heads, CONFIG.head_dim
    per_slot = 2 * kvh * d * 4  # K and V, fp32
    assert cache.nbytes == 2 * (6 * 8 * per_slot + 2 * 16 * per_slot) + 2 * (8 + 16) * 8
    buffers = [a.ctypes.data for a in cache.keys + cache.values]
    feed(cache, [[1, 1]] * 50)
    assert [a.ctypes.data for a in cache.keys + cache.values] == buffers


def test_update_rejects_positions_that_skip_tokens():
    cache = SlidingKVCache(CONFIG, batch=1, window=16, sinks=4)
    feed(cache, [[3]])
    positions = np.array([[4]], np.int64)  # token 3 never given
    keys, values = step_kv(positions, CONFIG.num_hidden_layers, CONFIG.num_key_value_heads, CONFIG.head_dim)
    with pytest.raises(ValueError, match="do not continue"):
        cache.update(positions, keys, values)


@pytest.mark.parametrize("window, sinks", [(4, 4), (0, 0), (3, 5)])
def test_window_must_exceed_sinks(window, sinks):
    with pytest.raises(GenerationError, match=rf"window={window} with sinks={sinks}.*at least sinks \+ 1") as err:
        SlidingKVCache(CONFIG, window=window, sinks=sinks)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("window, sinks, named", [(10**20, 4, "window"), (4, 10**20, "sinks")])
def test_a_window_or_sink_count_beyond_int64_positions_is_refused(window, sinks, named):
    """llama4-run --window 99999999999999999999 was an OverflowError from numpy at the first step."""
    with pytest.raises(GenerationError, match=rf"^{named}={window if named == 'window' else sinks}: at most "):
        SlidingKVCache(CONFIG, window=window, sinks=sinks)


def test_without_chunk_size_rope_layers_slide_like_global_ones():
    config = CONFIG.replace(attention_chunk_size=None)
    cache = SlidingKVCache(config, batch=1, window=9, sinks=2)
    positions = np.arange(20)[None]
    keys, values = step_kv(positions, config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    cache.update(positions, keys, values)
    want = set(range(2)) | set(range(20 - 7, 20))
    assert set(cache.positions["chunked"][0].tolist()) == set(cache.positions["global"][0].tolist()) == want


@pytest.mark.parametrize("steps, batch", [
    ([[1]] * 40, 1),
    ([[5], [20], [1], [1], [7], [1]], 1),
    ([[3, 11, 0], [1, 0, 9], [0, 1, 1], [6, 6, 6]] + [[1, 1, 1]] * 9, 3),
])
def test_growing_cache_holds_the_same_tokens_and_grows_to_the_full_size(monkeypatch, steps, batch):
    """grow=True starts at 2 slots per kind (patched) and doubles on demand: after every step it holds exactly what
    the full-size cache must hold (check_cache), its buffers never exceed the chunk / W, and a sequence longer than W
    fills the whole global window."""
    import llama4_export.runtime.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "INITIAL_SLOTS", 2)
    cache = SlidingKVCache(CONFIG, batch=batch, window=12, sinks=3, grow=True)
    assert cache.positions["global"].shape[1] == 2 and cache.keys[0].shape[2] == 2
    feed(cache, steps)
    assert cache.reallocations > 0
    assert cache.positions["chunked"].shape[1] <= 8 and cache.positions["global"].shape[1] == 12
    assert all(k.shape[2] == cache.positions[kind].shape[1] for k, kind in zip(cache.keys, cache.kinds))


# --- the in_place layout: the graph appends at each row's filled slots, the cache then applies the policy ---------

def graph_writes(cache: InPlaceKVCache, rows: range, positions: np.ndarray) -> None:
    """What GroupQueryAttention does to the buffers: every row of the step gets its T tokens written at slots
    filled.. — markers for real tokens, garbage for padding (a row without tokens gets only garbage)."""
    cfg = cache.config
    cache.reserve(slice(rows.start, rows.stop), positions.shape[1])
    keys, values = step_kv(positions, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    for i, kind in enumerate(cache.kinds):
        for r, row in enumerate(rows):
            start = cache.filled[kind][row]
            cache.keys[i][row][:, start:start + positions.shape[1]] = keys[i][r]
            cache.values[i][row][:, start:start + positions.shape[1]] = values[i][r]


def visible_next(kind: str, n: int, chunk: int, window: int, sinks: int) -> set[int]:
    """What the next token (position n) sees of the past: its own chunk's earlier tokens, or the global window."""
    if kind == "chunked":
        return set(range(n - n % chunk, n))
    return expected_positions("global", n, chunk, window, sinks)


def feed_in_place(cache: InPlaceKVCache, steps: list[list[int]]) -> list[int]:
    """As the ORT backend feeds a step: one-token steps batched, longer ones row by row in pieces of at most
    piece_limit; after every step each row's valid slots hold exactly what its next token must see."""
    cfg = cache.config
    lengths = [0] * cache.batch
    for counts in steps:
        if max(counts) <= 1:
            positions = np.array([[lengths[r] if c else -1] for r, c in enumerate(counts)], np.int64)
            graph_writes(cache, range(cache.batch), positions)
            cache.advance(positions)
        for r, c in enumerate(counts if max(counts) > 1 else []):
            done = 0
            while done < c:
                piece = min(c - done, cache.piece_limit(r))
                positions = np.full((cache.batch, piece), -1, np.int64)
                positions[r] = np.arange(lengths[r] + done, lengths[r] + done + piece)
                graph_writes(cache, range(r, r + 1), positions[r:r + 1])
                cache.advance(positions)
                done += piece
        lengths = [n + c for n, c in zip(lengths, counts)]
        for r, n in enumerate(lengths):
            for i, kind in enumerate(cache.kinds):
                filled = cache.filled[kind][r]
                held = cache.keys[i][r, :, :filled, 0][0] - i * 10000
                want = visible_next(kind, n, cfg.attention_chunk_size, cache.window, cache.sinks)
                assert sorted(held.tolist()) == sorted(want), f"row {r} layer {i} ({kind}) after {n} tokens"
                assert np.array_equal(cache.values[i][r, :, :filled, 0][0] - i * 10000, held + 0.5)
    assert cache.lengths.tolist() == lengths
    return lengths


@pytest.mark.parametrize("steps, batch", [
    ([[1]] * 40, 1),
    ([[5], [20], [1], [1], [7], [1]], 1),
    ([[3, 11, 0], [1, 0, 9], [0, 1, 1], [6, 6, 6]] + [[1, 1, 1]] * 9 + [[0, 1, 0]], 3),
])
def test_in_place_cache_keeps_what_the_sliding_policy_keeps(monkeypatch, steps, batch):
    """Against the set arithmetic of the positions layout's tests: chunks start over, the window keeps its sinks and
    the most recent tokens, other rows' garbage writes never land in valid slots, and buffers grow on demand."""
    import llama4_export.runtime.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "INITIAL_SLOTS", 2)
    cache = InPlaceKVCache(CONFIG, batch=batch, window=12, sinks=3, max_step=20)
    feed_in_place(cache, steps)
    assert cache.reallocations > 0
    scratch = io_spec.decode_scratch_slots(CONFIG)  # a one-row decode step's scratch writes after its token
    assert cache.sizes["chunked"] <= 8 + scratch and cache.sizes["global"] <= 12 + 20 + scratch


def test_in_place_slots_match_the_positions_layout():
    """Position p sits in the same global slot in both layouts (what a graph reads does not depend on the layout)."""
    sliding = SlidingKVCache(CONFIG, batch=1, window=9, sinks=2)
    in_place = InPlaceKVCache(CONFIG, batch=1, window=9, sinks=2, max_step=4)
    feed(sliding, [[1]] * 30)
    feed_in_place(in_place, [[1]] * 30)
    layer = CONFIG.num_hidden_layers - 1  # a global layer
    assert np.array_equal(in_place.keys[layer][0, :, :9], sliding.keys[layer][0])


def test_in_place_steps_stay_in_one_chunk():
    cache = InPlaceKVCache(CONFIG, batch=1, window=64, sinks=4, max_step=16)
    assert cache.piece_limit(0) == 8
    feed_in_place(cache, [[5]])
    assert cache.piece_limit(0) == 3
    positions = np.arange(5, 10)[None]  # crosses the chunk boundary at 8
    scratch = io_spec.decode_scratch_slots(CONFIG)
    with pytest.raises(GenerationError, match=f"{10 + scratch} chunked cache slots needed, {8 + scratch} allocated at most"):
        cache.reserve(0, 5)
    with pytest.raises(ValueError, match="do not continue a chunk"):
        cache.advance(positions)
