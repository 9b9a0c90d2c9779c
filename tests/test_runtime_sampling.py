"""Sampling against transformers' logits processors and plain numpy, and the Generator's stop/length rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation import (RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor, TopKLogitsWarper,
                                     TopPLogitsWarper)

from llama4_export.weights import from_preset
from llama4_export.runtime import GenerationError, Generator, Sampler, SamplingParams, Tokenizer
from llama4_export.evaluation.torch_backend import TorchBackend
from llama4_export.runtime.sampling import (StopStrings, apply_frequency_presence_penalties, apply_logit_bias,
                                             apply_repetition_penalty, filter_top_k, filter_top_p, token_logprobs)


@pytest.fixture(scope="module")
def gen():
    return Generator(TorchBackend(from_preset("scout-tiny", seed=5)), window=128)


def logits_row(vocab: int = 64, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * 3).astype(np.float32)


def test_repetition_penalty_matches_the_formula_and_transformers():
    logits = logits_row()
    previous = np.array([3, 7, 7, 11, 40, 3, 63])
    ours = apply_repetition_penalty(logits, previous, 1.3)
    by_hand = logits.copy()
    for t in set(previous.tolist()):
        by_hand[t] = logits[t] / 1.3 if logits[t] > 0 else logits[t] * 1.3
    np.testing.assert_array_equal(ours, by_hand)
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(previous)[None], torch.from_numpy(logits)[None])
    np.testing.assert_allclose(ours, hf[0].numpy(), rtol=1e-6)
    assert np.any(ours != logits)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_keeps_what_transformers_keeps(k):
    logits = logits_row(seed=k)
    hf = TopKLogitsWarper(k)(None, torch.from_numpy(logits)[None])[0].numpy()
    np.testing.assert_array_equal(np.isfinite(filter_top_k(logits, k)), np.isfinite(hf))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_what_transformers_keeps(p):
    logits = logits_row(seed=int(p * 1000))
    hf = TopPLogitsWarper(p)(None, torch.from_numpy(logits)[None])[0].numpy()
    np.testing.assert_array_equal(np.isfinite(filter_top_p(logits, p)), np.isfinite(hf))


def test_draws_follow_the_tempered_top_k_distribution():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    sampler = Sampler(SamplingParams(temperature=0.7, top_k=4, seed=11))
    draws = np.array([sampler(logits, np.array([], np.int64), np.array([], np.int64)) for _ in range(20000)])
    expected = np.exp(logits[:4] / 0.7) / np.exp(logits[:4] / 0.7).sum()
    observed = np.bincount(draws, minlength=6) / draws.size
    assert observed[4:].sum() == 0
    np.testing.assert_allclose(observed[:4], expected, atol=0.015)


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-300])
def test_a_vanishing_temperature_samples_the_top_token_and_a_huge_one_the_uniform_distribution(temperature, recwarn):
    """scores / 1e-38 overflowed float32 to inf, and softmax's inf − inf made the probabilities NaN: a traceback
    ("Probabilities contain NaN"); 1e308 overflowed with a RuntimeWarning."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)
    none = np.array([], np.int64)
    cold = Sampler(SamplingParams(temperature=temperature, seed=1))
    assert {cold(logits, none, none) for _ in range(200)} == {0}
    hot = Sampler(SamplingParams(temperature=1e308, seed=1))
    observed = np.bincount([hot(logits, none, none) for _ in range(6000)], minlength=6) / 6000
    np.testing.assert_allclose(observed, np.full(6, 1 / 6), atol=0.03)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_seeded_sampling_is_reproducible(gen):
    prompt = [1, 2, 3, 4, 5]
    opts = dict(max_new_tokens=20, temperature=1.0, top_p=0.95, stop_tokens=[])
    a = gen.generate(prompt, seed=7, **opts).token_ids
    assert gen.generate(prompt, seed=7, **opts).token_ids == a
    assert gen.generate(prompt, seed=8, **opts).token_ids != a


def test_top_k_1_equals_greedy(gen):
    prompt = [9, 8, 7]
    greedy = gen.generate(prompt, max_new_tokens=20, stop_tokens=[]).token_ids
    assert gen.generate(prompt, max_new_tokens=20, temperature=1.5, top_k=1, seed=3, stop_tokens=[]).token_ids == greedy


def penalized_greedy_reference(model, prompt: list[int], penalty: float, ours: list[int]) -> list[int]:
    """The token penalized greedy picks at each of our steps, given the tokens before it: the repetition penalty
    applied by hand to every id seen so far, argmax. A causal model's logits at a position depend only on the tokens
    up to it, so one forward over prompt + ours[:-1] gives every step's logits (per-step forwards cost O(n^2)); equal
    to ours at every step means ours is the penalized greedy sequence."""
    seq = list(prompt) + list(ours)
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]]))[0].numpy()
    picks, seen = [], set(prompt)
    for i in range(len(ours)):
        row = logits[len(prompt) - 1 + i].copy()
        for t in seen:
            row[t] = row[t] / penalty if row[t] > 0 else row[t] * penalty
        picks.append(int(np.argmax(row)))
        seen.add(ours[i])
    return picks


def test_repetition_penalty_steers_greedy_as_the_formula_says(gen):
    prompt, penalty = [5, 6, 7, 5, 6], 1.8
    ours = gen.generate(prompt, max_new_tokens=15, repetition_penalty=penalty, stop_tokens=[]).token_ids
    assert len(ours) == 15 and ours == penalized_greedy_reference(gen.backend.model, prompt, penalty, ours)
    assert ours != gen.generate(prompt, max_new_tokens=15, stop_tokens=[]).token_ids


def test_stop_tokens_stop_and_max_new_tokens_bounds(gen):
    prompt = [11, 12, 13]
    free = gen.generate(prompt, max_new_tokens=12, stop_tokens=[])
    assert len(free.token_ids) == 12 and free.stop_reason == "length"
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    stopped = gen.generate(prompt, max_new_tokens=12, stop_tokens=[stop])
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.stop_reason == "stop"
    assert gen.generate(prompt, max_new_tokens=0).token_ids == []


def test_default_stop_tokens_are_the_config_eos(gen):
    assert gen.eos_token_ids == gen.config.eos_token_id == (257,)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_k=-2), "top_k=-2"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
        (dict(max_new_tokens=-1), "max_new_tokens=-1"),
        # a wrong type is named, not a TypeError from a comparison inside
        (dict(max_new_tokens=None), "max_new_tokens=None: expected an integer"),
        (dict(max_new_tokens=2.5), "max_new_tokens=2.5: expected an integer"),
        (dict(temperature="0.5"), "temperature='0.5': expected a number"),
        (dict(seed=None, temperature=0.5), "seed=None: expected an integer"),
        (dict(top_k=1.5), "top_k=1.5: expected an integer"),
        (dict(temperature=True), "temperature=True: expected a number"),  # True was taken for 1
        (dict(top_k=True), "top_k=True: expected an integer"),
    ],
)
def test_bad_sampling_options_raise_one_line(gen, options, message):
    with pytest.raises(GenerationError, match=message) as err:
        gen.generate([1, 2], **options)
    assert "\n" not in str(err.value)


def test_frequency_and_presence_penalties_count_the_generated_tokens_only():
    logits = np.zeros(5, np.float32)
    out = apply_frequency_presence_penalties(logits, np.array([1, 1, 2]), frequency=0.5, presence=0.3)
    np.testing.assert_allclose(out, [0, -(2 * 0.5 + 0.3), -(0.5 + 0.3), 0, 0])
    with pytest.raises(GenerationError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=2.5)


def test_stop_strings_hold_back_a_possible_prefix_and_cut_before_the_stop():
    stops = StopStrings(("STOP", "\n\n"))
    assert stops.push("ab") == ("ab", False)
    assert stops.push("cS") == ("c", False)  # "S" may begin "STOP": held back
    assert stops.push("Tx") == ("STx", False)  # it did not
    assert stops.push("yST") == ("y", False)
    assert stops.push("OP and more") == ("", True)
    tail = StopStrings(("STOP",))
    assert tail.push("abST") == ("ab", False) and tail.flush() == "ST"


def test_token_logprobs_are_the_log_softmax_of_the_raw_logits():
    logits = np.array([2.0, 0.5, -1.0, 3.0], np.float32)
    expected = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    got = token_logprobs(logits, 1, top=2)
    assert got.logprob == pytest.approx(expected[1])
    assert [t for t, _ in got.top] == [3, 0] and got.top[0][1] == pytest.approx(expected[3])


def test_logit_bias_adds_what_transformers_sequence_bias_adds():
    logits = logits_row()
    bias = {3: 5.0, 17: -100.0, 40: 0.5}
    ours = apply_logit_bias(logits, SamplingParams(logit_bias=bias).logit_bias)
    processor = SequenceBiasLogitsProcessor([[[token], value] for token, value in bias.items()])
    reference = processor(torch.zeros(1, 1, dtype=torch.long), torch.from_numpy(logits)[None])[0].numpy()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_logit_bias_forces_and_bans_tokens_in_generation(gen):
    prompt = [1, 2, 3, 4]
    greedy = gen.generate(prompt, max_new_tokens=6, stop_tokens=[]).token_ids
    forced = next(t for t in range(10, 20) if t not in greedy)
    assert [e.token_id for e in gen.stream(prompt, 6, logit_bias={forced: 100}, stop_tokens=[])] == [forced] * 6
    assert gen.generate(prompt, 6, logit_bias={forced: 100}, stop_tokens=[]).token_ids == [forced] * 6
    with pytest.raises(GenerationError, match="unknown generation option 'logit_bais'"):
        gen.generate(prompt, 6, logit_bais={forced: 100})
    banned = [e.token_id for e in gen.stream(prompt, 6, logit_bias={greedy[0]: -100}, stop_tokens=[])]
    assert banned[0] != greedy[0] and greedy[0] not in banned


@pytest.mark.parametrize("bias, message", [({5: 100.5}, "outside \\[-100, 100\\]"), ({-1: 1.0}, "negative"),
                                           ((("7", 1.0), (7, 2.0)), "token 7 is given more than once"),
                                           ({10**6: 1.0}, "outside the vocabulary of")])
def test_bad_logit_bias_raises_one_line(gen, bias, message):
    with pytest.raises(GenerationError, match=f"^logit_bias: .*{message}"):
        list(gen.stream([1, 2], 2, logit_bias=bias))


@pytest.mark.parametrize("prompt", [[[1, 2, 3]], np.array([[1, 2, 3]]), [1.0, 2.0], None],
                         ids=["nested-list", "2d-array", "floats", "none"])
def test_a_prompt_that_is_not_text_or_flat_ids_raises_one_line(gen, prompt):
    with pytest.raises(GenerationError, match="^the prompt must be text or one flat sequence of integer token ids"):
        gen.generate(prompt, max_new_tokens=2)
    assert gen.generate(np.array([1, 2, 3]), max_new_tokens=2).token_ids == gen.generate([1, 2, 3], 2).token_ids


@pytest.mark.parametrize("messages, message", [
    ("hello", "^messages: expected a list"),
    (["hello"], r"^messages\[0\]: expected \{'role'"),
    ([{"content": "hi"}], r"^messages\[0\]: expected \{'role'"),
    ([{"role": "user"}], r"^messages\[0\]: no 'content'"),
    ([], "^messages: the conversation is empty"),  # was the template's "list object has no element 0"
    # each rendered as an empty user turn
    ([{"role": "user", "content": {"text": "hi"}}], r"^messages\[0\]\.content: expected text or a list of parts"),
    ([{"role": "user", "content": ["hi"]}], r"^messages\[0\]\.content\[0\]: expected \{'type': 'text'"),
    ([{"role": "user", "content": [{"type": "text", "content": "hi"}]}], r"^messages\[0\]\.content\[0\]: expected"),
])
def test_malformed_chat_messages_raise_one_line(tmp_path, messages, message):
    from llama4_export.export.tokenizer_files import write_byte_level_tokenizer

    model = from_preset("scout-tiny", seed=5)
    write_byte_level_tokenizer(model.config, tmp_path)
    chat = Generator(TorchBackend(model), Tokenizer.load(tmp_path), window=128)
    with pytest.raises(GenerationError, match=message):
        chat.chat(messages, max_new_tokens=2)
    with pytest.raises(GenerationError, match="^tools: expected a list of OpenAI function definitions"):  # was taken
        chat.chat([{"role": "user", "content": "hi"}], tools="get_weather", max_new_tokens=2)
    # an assistant turn of tool calls alone passes the check; this template cannot render it, and says so in a line
    calls = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    with pytest.raises(GenerationError, match="^the chat template cannot render this conversation: TypeError"):
        chat.chat(calls, max_new_tokens=2)
    assert chat.chat_prompt([{"role": "user", "content": "hi"}]) == chat.tokenizer.encode(
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nhi<|eot|><|header_start|>assistant<|header_end|>\n\n", add_special_tokens=False)


def test_threads_sharing_a_generator_each_get_their_own_run_and_a_second_stream_is_refused(gen):
    """The KV cache is the Generator's: threads that share one (a web app's worker pool) take turns and each gets
    exactly its single run's tokens; a second stream in the thread of an unfinished one is refused in one line."""
    import threading

    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [11, 12, 13, 14], [20, 21]]
    expected = [gen.generate(p, max_new_tokens=16, stop_tokens=[]).token_ids for p in prompts]
    got, errors = [None] * len(prompts), []

    def run(i):
        try:
            got[i] = gen.generate(prompts[i], max_new_tokens=16, stop_tokens=[]).token_ids
        except Exception as exc:  # noqa: BLE001 — reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and got == expected
    first, second = gen.stream(prompts[0], max_new_tokens=4, stop_tokens=[]), gen.stream(prompts[1], max_new_tokens=4)
    assert next(first).token_id == expected[0][0]
    with pytest.raises(GenerationError, match="already generating in this thread"):
        next(second)
    first.close()  # a closed stream frees the cache for the next one
    assert [e.token_id for e in gen.stream(prompts[1], max_new_tokens=4, stop_tokens=[])] == expected[1][:4]

    # A stream handed to another thread belongs to it: a generation there beside it waited for itself for ever.
    handed = gen.stream(prompts[0], max_new_tokens=4, stop_tokens=[])
    assert next(handed).token_id == expected[0][0]
    outcome = []

    def continue_it_then_generate():
        outcome.append(next(handed).token_id)
        try:
            gen.generate(prompts[1], max_new_tokens=2)
        except GenerationError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=continue_it_then_generate, daemon=True)  # a regression must not hang the run
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "deadlocked: the generation waited for the stream its own thread holds"
    assert outcome[0] == expected[0][1] and "already generating in this thread" in outcome[1], outcome
    assert [e.token_id for e in handed] == expected[0][2:4]  # back in this thread, it goes on


def test_a_huge_max_new_tokens_allocates_nothing_up_front_and_penalties_see_every_token(gen):
    """max_new_tokens=10^7 ("until a stop token") allocated the penalty history for 10^7 tokens before the first
    step (80 MB a row; 10^9 would not fit in memory); the history now grows as tokens come. Past its first size
    (256 new tokens) the repetition penalty still sees every token so far: 270 greedy tokens equal the reference
    (the model's logits, penalty applied by hand)."""
    import tracemalloc

    free = gen.generate([1, 2, 3], max_new_tokens=8, stop_tokens=[]).token_ids
    tracemalloc.start()
    stopped = gen.generate([1, 2, 3], max_new_tokens=10**7, stop_tokens=[free[3]])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stopped.token_ids == free[:free.index(free[3]) + 1] and peak < 20e6, peak

    whole = Generator(TorchBackend(gen.backend.model), window=512)  # no token slides out: the reference sees all
    prompt, penalty = [5, 6, 7, 5, 6], 1.3
    ours = whole.generate(prompt, max_new_tokens=270, repetition_penalty=penalty, stop_tokens=[]).token_ids
    assert len(ours) == 270 and ours == penalized_greedy_reference(whole.backend.model, prompt, penalty, ours)
