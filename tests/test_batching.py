"""Continuous batching on ONNX Runtime (in_place KV layout): requests of different lengths arrive at different steps,
newcomers' prompts are fed in pieces between batched decode steps (short ones together), finished rows are reused — and every request's
tokens equal the same request run alone through Generator (the independent reference: one sequence, its own cache)."""

from __future__ import annotations

import numpy as np
import pytest

from llama4_export import api
from llama4_export.runtime import Generator
from llama4_export.runtime.batching import BatchEngine, EngineClosed, EngineOptions, QueueFull, SequenceRequest
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
                     random_weights=True, show_progress=False, quant=api.QuantOptions(report=False))  # run, not scored
    return Generator.load(out, threads=2, max_prefill_tokens=PREFILL)


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, length).tolist() for length, _, _ in ARRIVALS]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_staggered_requests_equal_single_runs(generator, sampling):
    prompts = _prompts(generator.config.vocab_size)
    alone = [[e.token_id for e in generator.stream(p, new, stop_tokens=[], **vars(sampling))]
             for p, (_, new, _) in zip(prompts, ARRIVALS)]

    engine = BatchEngine(generator, EngineOptions(max_batch=3, max_queue=8))
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
    engine = BatchEngine(generator, EngineOptions(max_batch=2, max_queue=1))
    with pytest.raises(GenerationError, match="max_new_tokens=0"):
        engine.submit(SequenceRequest(prompts[0], 0))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.submit(SequenceRequest([generator.config.vocab_size], 4))
    # not started: 2 rows + a queue of one hold 3 requests, the 4th is refused; a group is queued all or none
    with pytest.raises(GenerationError, match="4 sequences at once"):
        engine.submit_all([(SequenceRequest(prompts[0], 4), None)] * 4)
    held = engine.submit_all([(SequenceRequest(prompts[0], 12, stop_tokens=frozenset()), None)] * 2)
    with pytest.raises(QueueFull):
        engine.submit_all([(SequenceRequest(prompts[1], 4), None)] * 2)
    assert engine.queue_depth == 2
    held.append(engine.submit(SequenceRequest(prompts[0], 12, stop_tokens=frozenset())))
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


def test_requests_take_over_a_freed_rows_prompt_start(generator, monkeypatch):
    """A shared system prompt, a conversation's next turn and a repeated prompt continue from the K/V a finished
    sequence left in its row (prefilling only the rest); a shared start that lies before its row's current chunk
    (scout-tiny: 16 tokens) is taken back to a chunk boundary, or not at all below the first. Every request's tokens
    equal its run alone."""
    chunk = generator.config.attention_chunk_size
    rng = np.random.default_rng(1)
    system = rng.integers(0, 256, 21).tolist()  # crosses the first chunk boundary

    def tail(n):
        return rng.integers(0, 256, n).tolist()

    prefilled = []  # prompt tokens the engine's prefill calls feed (decode calls pass no logits index)
    forward = generator.backend.forward

    def counting(input_ids, positions, cache, logits_index=None, image_features=None):
        if logits_index is not None:
            prefilled.append(int((positions >= 0).sum()))
        return forward(input_ids, positions, cache, logits_index, image_features)

    monkeypatch.setattr(generator.backend, "forward", counting)
    engine = BatchEngine(generator, EngineOptions(max_batch=2, max_queue=4, reuse_prefix_tokens=4))

    def run(*requests):
        sequences = [engine.submit(SequenceRequest(prompt, new, stop_tokens=frozenset())) for prompt, new in requests]
        prefilled.clear()
        while not all(s.done.is_set() for s in sequences):
            engine.step()
        fed = sum(prefilled)
        for seq, (prompt, new) in zip(sequences, requests):
            assert seq.result().token_ids == [e.token_id for e in generator.stream(prompt, new, stop_tokens=[])]
        return sequences, fed

    unrelated, first = (tail(10), 3), (system + tail(5), 4)
    (x, a), _ = run(unrelated, first)
    assert (x.row, a.row, x.reused, a.reused) == (0, 1, 0, 0)

    second = (system + tail(6), 4)
    (b,), fed = run(second)
    assert (b.row, b.reused, fed) == (1, len(system), len(second[0]) - len(system))  # the matching row, not the lowest

    # the next turn: B's prompt, its reply, a new message; the row holds B's prompt and the first 3 reply tokens
    turn = (second[0] + b.token_ids + tail(3), 3)
    (d,), fed = run(turn)
    assert (d.row, d.reused, fed) == (1, len(second[0]) + 3, len(turn[0]) - len(second[0]) - 3)

    # the row now holds 36 tokens: its chunked layers hold only positions 32.. — the system prompt's first 10 are gone
    held = len(turn[0]) + 2
    assert held // chunk * chunk > 10
    (c,), fed = run((system[:10] + tail(8), 3))
    assert (c.row, c.reused, fed) == (0, 0, 18)

    (e,), fed = run(turn)  # the same prompt again: all but its last token, whose logits are sampled
    assert (e.row, e.reused, fed) == (1, len(turn[0]) - 1, 1)

    # 20 shared tokens, but the row's chunked layers hold only positions 32..: back to the chunk boundary at 16
    (f,), fed = run((system[:20] + tail(5), 3))
    assert (f.row, f.reused, fed) == (1, chunk, 25 - chunk)
    assert engine.reused_prompt_tokens == b.reused + d.reused + e.reused + f.reused


def test_prefill_budget_bounds_the_prompt_tokens_of_a_step_while_others_decode(generator, monkeypatch):
    """With prefill_budget=3, no step that starts with rows decoding feeds more than 3 prompt tokens (steps that keep
    nobody waiting feed whole pieces); the tokens still equal each request run alone."""
    steps = []  # per engine step: [prompt tokens fed, whether rows were decoding when it began]
    forward = generator.backend.forward

    def recording(input_ids, positions, cache, logits_index=None, image_features=None):
        if logits_index is not None:  # prefill calls ask for the logits they need; decode calls for every row's
            steps[-1][0] += int((positions >= 0).sum())
        return forward(input_ids, positions, cache, logits_index, image_features)

    monkeypatch.setattr(generator.backend, "forward", recording)
    prompts = _prompts(generator.config.vocab_size)
    engine = BatchEngine(generator, EngineOptions(max_batch=3, max_queue=8, prefill_budget=3))
    sequences = []
    for step in range(400):
        sequences += [engine.submit(SequenceRequest(p, new, stop_tokens=frozenset()))
                      for p, (_, new, arrival) in zip(prompts, ARRIVALS) if arrival == step]
        steps.append([0, any(s.pending is not None for s in sequences)])
        engine.step()
        if step > 4 and all(s.done.is_set() for s in sequences):
            break
    monkeypatch.undo()
    assert max(fed for fed, decoding in steps if decoding) == 3
    assert max(fed for fed, decoding in steps if not decoding) > 3  # nobody waits: a whole piece
    alone = [generator.generate(p, new, stop_tokens=[]).token_ids for p, (_, new, _) in zip(prompts, ARRIVALS)]
    assert [s.result().token_ids for s in sequences] == alone
    with pytest.raises(GenerationError, match="prefill_budget=0"):
        EngineOptions(prefill_budget=0)


@pytest.mark.parametrize("field, value", [
    ("logprobs", 2.5), ("prompt_logprobs", 1.5),  # failed in the step, ending every running sequence with it
    ("prompt_ids", "Hello"),  # tokenized by the check, then lost in the step: result() waited for ever
    ("max_new_tokens", 2.5),  # never equal to a count of tokens: generated past the context
    ("max_new_tokens", None), ("max_new_tokens", "8"), ("timeout", "1"), ("stop_tokens", 5), ("sampling", None),
    ("stop_tokens", [10**9]),  # out of the vocabulary: Generator refuses it
    ("stop_strings", "o@@NEVER@@"),  # split into one-character stops
    ("stop_strings", (None,)),
])
def test_a_request_the_engine_cannot_run_is_refused_at_submit_and_the_running_go_on(generator, field, value):
    """BatchEngine.check compared values without checking their kinds: what got past it failed in the step (ending
    every running sequence with "error"), was lost, or ran on; others were TypeErrors, not GenerationError."""
    engine = BatchEngine(generator, EngineOptions(max_batch=2, max_queue=2))
    engine.start()
    try:
        running = engine.submit(SequenceRequest([5, 6, 7], 12, stop_tokens=frozenset()))
        fields = {"prompt_ids": [1, 2, 3], "max_new_tokens": 4, field: value}
        with pytest.raises(GenerationError, match=field):
            engine.submit(SequenceRequest(**fields))
        done = running.result(timeout=60)
        assert done.finish_reason == "length" and len(done.token_ids) == 12
    finally:
        engine.stop()


def test_an_engine_used_as_a_context_runs_its_thread_inside_and_leaves_nothing_running(generator):
    """An engine dropped without stop() kept its thread waiting for work (and its KV cache) to the process's end."""
    with BatchEngine(generator, EngineOptions(max_batch=1, max_queue=2)) as engine:
        done = engine.submit(SequenceRequest([5, 6, 7], 3, stop_tokens=frozenset())).result(timeout=60)
        assert done.finish_reason == "length" and len(done.token_ids) == 3
        left_running = engine.submit(SequenceRequest([5, 6, 7], 4_000, stop_tokens=frozenset()))
        queued = engine.submit(SequenceRequest([1, 2, 3], 4, stop_tokens=frozenset()))
        thread = engine._thread
    assert not thread.is_alive()
    assert [left_running.finish_reason, queued.finish_reason] == ["cancelled", "cancelled"]
    with pytest.raises(EngineClosed):
        engine.submit(SequenceRequest([1, 2, 3], 4))


def test_a_sequence_failing_at_admission_ends_with_its_error_and_a_listener_may_stop_the_engine(generator,
                                                                                            monkeypatch):
    """A sequence whose admission raised was out of the queue and in no row: never finished. stop() called from a
    listener (the engine's own thread) failed to join itself, and no sequence got its last event."""
    engine = BatchEngine(generator, EngineOptions(max_batch=2, max_queue=2))
    admit = engine._admit

    def admit_failing_once(seq):
        monkeypatch.setattr(engine, "_admit", admit)
        raise RuntimeError("no row for you")

    monkeypatch.setattr(engine, "_admit", admit_failing_once)
    engine.start()
    failed = engine.submit(SequenceRequest([1, 2, 3], 4))
    assert failed.result(timeout=60).finish_reason == "error" and "no row for you" in failed.result().error
    first = []

    def stop_on_the_first_token(event):
        if not first:
            first.append(event)
            engine.stop()

    stopping = engine.submit(SequenceRequest([1, 2, 3], 50, stop_tokens=frozenset()), stop_on_the_first_token)
    other = engine.submit(SequenceRequest([4, 5, 6], 50, stop_tokens=frozenset()))
    assert stopping.result(timeout=60).finish_reason == "cancelled"
    assert other.result(timeout=60).finish_reason == "cancelled"
