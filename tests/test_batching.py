"""Continuous batching on ONNX Runtime (in_place KV layout): requests of different lengths arrive at different steps,
newcomers' prompts are fed in pieces between batched decode steps (short ones together), finished rows are reused — and every request's
tokens equal the same request run alone through Generator (the independent reference: one sequence, its own cache)."""

from __future__ import annotations

import numpy as np
import pytest

from llama4_export import api
from llama4_export.runtime import Generator
from llama4_export.runtime.batching import BatchEngine, QueueFull, SequenceRequest
from llama4_export.runtime.errors import GenerationError
from llama4_export.runtime.sampling import SamplingParams

PREFILL = 8  # prefill piece: prompts below take several pieces and cross scout-tiny's 16-token chunks
# (prompt length, new tokens, engine step it arrives at); 3 rows for 6 requests: the last three wait for freed rows;
# the two arriving at step 2 fit one piece together (2 × 4 ≤ PREFILL), so they are prefilled in one call
ARRIVALS = [(21, 14, 0), (4, 20, 2), (3, 12, 2), (37, 9, 3), (12, 11, 4), (3, 17, 4)]
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=7,
                         frequency_penalty=0.5, presence_penalty=0.3)


@pytest.fixture(scope="module", params=["fp32", "int4"])
def generator(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("batching") / request.param
    api.export_model(out, model="scout-tiny", precision=request.param, target="onnxruntime", layers=4,
                     random_weights=True, show_progress=False)
    return Generator.load(out, threads=2, max_prefill_tokens=PREFILL)


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, length).tolist() for length, _, _ in ARRIVALS]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_staggered_requests_equal_single_runs(generator, sampling):
    prompts = _prompts(generator.config.vocab_size)
    alone = [[e.token_id for e in generator.stream(p, new, stop_tokens=[], **vars(sampling))]
             for p, (_, new, _) in zip(prompts, ARRIVALS)]

    engine = BatchEngine(generator, max_batch=3, max_queue=8)
    sequences, interleaved, together = [], False, False
    step = 0
    while step < 5 or any(not s.done.is_set() for s in sequences):
        for prompt, (_, new, arrival) in zip(prompts, ARRIVALS):
            if arrival == step:
                request = SequenceRequest(prompt, new, sampling, stop_tokens=frozenset())
                sequences.append(engine.submit(request))
        decoded_before = [len(s.token_ids) for s in sequences]
        fed_before = [s.fed for s in sequences]
        engine.step()
        prefilled = [s for s, fed in zip(sequences, fed_before) if s.fed > fed and s.fed < len(s.request.prompt_ids)]
        decoded = [s for s, n in zip(sequences, decoded_before) if len(s.token_ids) > n and n > 0]
        interleaved |= bool(prefilled and decoded)
        together |= sum(fed == 0 and s.fed == len(s.request.prompt_ids) for s, fed in zip(sequences, fed_before)) > 1
        step += 1
        assert step < 200

    assert [s.result().token_ids for s in sequences] == alone
    assert all(s.finish_reason == "length" for s in sequences)
    assert interleaved  # a newcomer's prompt piece and others' decode ran in one step
    assert together  # two newcomers' whole prompts in one prefill call
    assert {s.row for s in sequences} == {0, 1, 2} and len(sequences) > engine.max_batch  # freed rows were reused
    assert engine.running == 0 and engine.queue_depth == 0


def test_engine_thread_stop_strings_queue_cancel_and_timeout(generator):
    prompts = _prompts(generator.config.vocab_size)
    engine = BatchEngine(generator, max_batch=2, max_queue=1)
    with pytest.raises(GenerationError, match="max_new_tokens=0"):
        engine.submit(SequenceRequest(prompts[0], 0))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.submit(SequenceRequest([generator.config.vocab_size], 4))
    # not started: 2 rows + a queue of one hold 3 requests, the 4th is refused
    held = [engine.submit(SequenceRequest(prompts[0], 12, stop_tokens=frozenset())) for _ in range(3)]
    with pytest.raises(QueueFull):
        engine.submit(SequenceRequest(prompts[1], 4))
    for seq in held:
        engine.cancel(seq)
    engine.start()
    assert all(s.result(timeout=60).finish_reason == "cancelled" and s.token_ids == [] for s in held)

    full = generator.generate(prompts[1], 20, stop_tokens=[])
    stop = full.text[5:8]
    expected = full.text[: full.text.find(stop)]
    seq = engine.submit(SequenceRequest(prompts[1], 20, stop_tokens=frozenset(), stop_strings=(stop,), logprobs=3))
    result = seq.result(timeout=60)
    assert result.finish_reason == "stop" and result.text == expected
    assert result.token_ids == full.token_ids[: len(result.token_ids)]
    expired = engine.submit(SequenceRequest(prompts[2], 50, timeout=1e-6))  # the per-request timeout
    assert expired.result(timeout=60).finish_reason == "timeout"
    engine.stop()
    assert engine.running == 0
