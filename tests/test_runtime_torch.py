"""Generator + TorchBackend through the sliding cache against the PyTorch model's full forward (no cache at all).

Within the window the sliding cache is exact, so greedy tokens must equal argmax of a full forward over the whole
sequence, across chunk boundaries and prefill pieces. Past the window the reference is an independent emulation:
an unbounded cache whose evicted global-layer positions are masked (set to −1) instead of overwritten.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama4_export.model.modeling import KVCache
from llama4_export.weights import from_preset, load
from llama4_export.runtime import Generator
from llama4_export.evaluation.torch_backend import TorchBackend, torch_generator


@pytest.fixture(scope="module")
def tiny():
    return from_preset("scout-tiny", seed=3)  # chunk 16, global layers 3 and 7


@pytest.fixture(scope="module")
def scoutlike(scoutlike_dir):
    return load(scoutlike_dir)


def full_forward_argmax(model, prompt: list[int], tokens: list[int]) -> list[int]:
    """Argmax of one full forward (no cache) over prompt + tokens: entry k is the greedy pick after tokens[:k].

    So `tokens == full_forward_argmax(model, prompt, tokens)` holds exactly when tokens are the greedy continuation.
    """
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(tokens[:-1])]))[0, len(prompt) - 1 :]
    return logits.argmax(-1).tolist()


def sink_masked_greedy(model, prompt: list[int], n: int, window: int, sinks: int) -> list[int]:
    """Token-by-token greedy with an unbounded cache; global layers only see the sinks + the W − S most recent."""
    cfg = model.config
    cache = KVCache.empty(cfg, 1, torch.float32)
    seq, out = list(prompt), []
    with torch.no_grad():
        for p in range(len(prompt) + n - 1):
            visible = []
            for i, pos in enumerate(cache.positions):
                if not cfg.uses_rope(i):
                    evicted = (pos >= sinks) & (pos < p - (window - sinks))
                    pos = pos.masked_fill(evicted, -1)
                visible.append(pos)
            positions = torch.tensor([[p]])
            logits, new = model(torch.tensor([[seq[p]]]), positions, KVCache(cache.keys, cache.values, visible))
            cache = cache.append(new, positions)
            if p >= len(prompt) - 1:
                seq.append(int(logits[0, -1].argmax()))
                out.append(seq[-1])
    return out


def random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, length).tolist()


def test_tiny_greedy_equals_full_forward_across_chunks_and_prefill_pieces(tiny):
    prompt = random_prompt(tiny.config.vocab_size, 20, seed=0)
    gen = Generator(TorchBackend(tiny, max_prefill_tokens=7), window=64, sinks=4)  # pieces 7+7+6
    result = gen.generate(prompt, max_new_tokens=40, stop_tokens=[])  # positions 20..59 cross 32 and 48
    assert result.token_ids == full_forward_argmax(tiny, prompt, result.token_ids)
    assert result.stop_reason == "length" and result.text is None


class Cancelled(Exception):
    pass


def test_prefill_progress_is_reported_per_piece_and_raising_from_it_cancels(tiny):
    prompt = random_prompt(tiny.config.vocab_size, 20, seed=0)
    gen = Generator(TorchBackend(tiny, max_prefill_tokens=7), window=64, sinks=4)
    seen = []
    result = gen.generate(prompt, max_new_tokens=5, stop_tokens=[], on_prefill=lambda *p: seen.append(p))
    assert seen == [(7, 20), (14, 20), (20, 20)]
    assert result.token_ids == full_forward_argmax(tiny, prompt, result.token_ids)

    def cancel_after_first_piece(done, total):
        seen.append((done, total))
        raise Cancelled

    seen.clear()
    with pytest.raises(Cancelled):  # the caller's own exception, unchanged
        gen.generate(prompt, max_new_tokens=5, stop_tokens=[], on_prefill=cancel_after_first_piece)
    events = gen.stream(prompt, max_new_tokens=5, stop_tokens=[], on_prefill=cancel_after_first_piece)
    with pytest.raises(Cancelled):  # a stream feeds its prompt at the first next()
        next(events)
    assert seen == [(7, 20), (7, 20)]
    # the cancelled runs left nothing behind: the next generation (batched: progress of the longest row) is exact
    seen.clear()
    short = prompt[:9]
    rows = gen.generate_batch([short, prompt], max_new_tokens=5, stop_tokens=[], on_prefill=lambda *p: seen.append(p))
    assert seen == [(7, 20), (14, 20), (20, 20)]
    assert [r.token_ids for r in rows] == [gen.generate(p, max_new_tokens=5, stop_tokens=[]).token_ids
                                           for p in (short, prompt)] and rows[1].token_ids == result.token_ids


def test_scoutlike_greedy_equals_full_forward(scoutlike, heldout_text, scoutlike_dir):
    gen = torch_generator(scoutlike_dir)  # a plain HF checkpoint dir: tokenizer + eos from it
    prompt = gen.encode(heldout_text[:2000])[:100]
    result = gen.generate(prompt, max_new_tokens=70, stop_tokens=[])  # 100 + 70 crosses chunk 64 twice
    assert result.token_ids == full_forward_argmax(scoutlike, prompt, result.token_ids)
    assert result.text == gen.tokenizer.decode(result.token_ids)


def test_window_smaller_than_sequence(tiny):
    window, sinks = 24, 4
    prompt = random_prompt(tiny.config.vocab_size, 10, seed=1)
    gen = Generator(TorchBackend(tiny), window=window, sinks=sinks)
    tokens = gen.generate(prompt, max_new_tokens=40, stop_tokens=[]).token_ids  # the sequence reaches 50 > W
    assert len(tokens) == 40
    exact = window - len(prompt) + 1  # new tokens at positions <= W saw every past token
    assert tokens[:exact] == full_forward_argmax(tiny, prompt, tokens[:exact])
    assert tokens == sink_masked_greedy(tiny, prompt, 40, window, sinks)
    assert tokens != full_forward_argmax(tiny, prompt, tokens)  # the window really dropped tokens


def test_batch_rows_of_different_lengths_equal_single_runs(tiny):
    prompts = [random_prompt(tiny.config.vocab_size, n, seed=n) for n in (5, 17, 9)]
    gen = Generator(TorchBackend(tiny, max_prefill_tokens=6), window=20, sinks=2)
    alone = [gen.generate(p, max_new_tokens=25, stop_tokens=[]).token_ids for p in prompts]
    stop = alone[0][3]  # row 0 stops early at its 4th token; the others continue past the window
    together = gen.generate_batch(prompts, max_new_tokens=25, stop_tokens=[stop])
    for solo, row in zip(alone, together):
        cut = solo.index(stop) + 1 if stop in solo else len(solo)
        assert row.token_ids == solo[:cut]
    assert together[0].stop_reason == "stop" and len(together[0].token_ids) == 4


def test_stream_yields_the_generated_tokens_and_text(scoutlike_dir):
    gen = torch_generator(scoutlike_dir)
    events = list(gen.stream("The history of the city", max_new_tokens=12, stop_tokens=[]))
    result = gen.generate("The history of the city", max_new_tokens=12, stop_tokens=[])
    assert [e.token_id for e in events] == result.token_ids
    assert "".join(e.text for e in events) == result.text
