"""llama4-serve over HTTP on 127.0.0.1: the real command line as a subprocess (started once for the module), driven
with the official `openai` client (completions and chat, non-streaming and streaming) and with raw HTTP (httpx)
for malformed requests, backpressure, disconnects and SIGTERM. Expected tokens come from Generator running the same
artifact one request at a time, in this process."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install .[serve])")
openai = pytest.importorskip("openai", reason="the serve extra is not installed (pip install .[serve])")

from llama4_export import api  # noqa: E402
from llama4_export.runtime import Generator  # noqa: E402

from .conftest import llama4_serve  # noqa: E402

MODEL = "tiny"
MAX_BATCH, MAX_QUEUE = 2, 2
MAX_REQUEST_BYTES = 1_000_000
PROMPT = "The history of"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / MODEL
    api.export_model(out, model="scout-tiny", precision="fp32", target="onnxruntime", layers=4, random_weights=True,
                     show_progress=False, quant=api.QuantOptions(report=False))  # served, its report.json is never read
    return out


@pytest.fixture(scope="module")
def generator(artifact):
    return Generator.load(artifact, threads=1)


@pytest.fixture(scope="module")
def server(artifact):
    """(base URL, process): `llama4-serve` on a free loopback port, until the module ends (or SIGTERM's test)."""
    with llama4_serve(artifact, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--threads", "1",
                      "--model-name", MODEL, "--max-request-bytes", str(MAX_REQUEST_BYTES)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def _alone(generator, prompt, max_tokens):
    return generator.generate(prompt, max_new_tokens=max_tokens)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")
    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"
    text = httpx.get(f"{server[0]}/metrics").text
    for name in ("llama4_queue_depth", "llama4_running_sequences", "llama4_generation_tokens_per_second",
                 "llama4_time_to_first_token_seconds_bucket", "llama4_time_per_output_token_seconds_bucket"):
        assert name in text


def test_a_wrong_method_gets_405_with_allow_and_head_answers_every_get_route(server):
    """A 405 came without the Allow header HTTP requires of it, and HEAD (how monitors probe /health) got 405."""
    response = httpx.get(f"{server[0]}/v1/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST", response.headers
    assert response.json()["error"]["message"]
    for path in ("/health", "/metrics", "/v1/models", f"/v1/models/{MODEL}"):
        head, get = httpx.head(f"{server[0]}{path}"), httpx.get(f"{server[0]}{path}")
        assert head.status_code == get.status_code == 200 and head.content == b"", (path, head.status_code)
        assert head.headers["content-type"] == get.headers["content-type"], path


def test_request_metrics_are_labelled_by_route_not_by_the_clients_path(server):
    """A scanner's paths must not each become a time series of /metrics: requests no route takes count as "other",
    a route with a parameter under its template."""
    from prometheus_client.parser import text_string_to_metric_families

    for i in range(30):
        httpx.get(f"{server[0]}/scan/{i}")
        httpx.get(f"{server[0]}/v1/models/missing-{i}")
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server[0]}/metrics").text)}
    counts = {(s.labels["endpoint"], s.labels["status"]): s.value for s in families["llama4_requests"].samples
              if s.name == "llama4_requests_total"}
    assert {endpoint for endpoint, _ in counts} <= {"other", "/health", "/metrics", "/v1/models",
                                                     "/v1/models/{name:path}", "/v1/completions",
                                                     "/v1/chat/completions"}, sorted(counts)
    assert counts[("other", "404")] >= 30 and counts[("/v1/models/{name:path}", "404")] >= 30


def test_request_metrics_count_the_get_routes_answers_not_only_their_errors(server, client):
    """GET /v1/models/{id} counted its 404s but none of its 200s (a 100% error ratio on a dashboard): every answer
    of the GET routes counts, by its status."""
    base = server[0]
    routes = ("/health", "/metrics", "/v1/models", "/v1/models/{name:path}")
    before = {r: _requests_total(base, r, "200") for r in routes}  # this scrape itself counts once /metrics is read
    client.models.list()
    client.models.retrieve(MODEL)
    httpx.head(f"{base}/v1/models/{MODEL}")
    httpx.get(f"{base}/health")
    after = {r: _requests_total(base, r, "200") for r in routes}
    assert {r: after[r] - before[r] for r in routes} == {"/health": 1, "/metrics": 4, "/v1/models": 1,
                                                         "/v1/models/{name:path}": 2}


def test_completion_equals_generator(client, generator):
    expected = _alone(generator, PROMPT, 12)
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12)
    choice = response.choices[0]
    assert choice.text == expected.text and choice.finish_reason == expected.stop_reason
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(expected.prompt_ids),
                                                                                 len(expected.token_ids))
    # token ids as the prompt give the same continuation
    by_ids = client.completions.create(model=MODEL, prompt=expected.prompt_ids, max_tokens=12)
    assert by_ids.choices[0].text == expected.text


def test_streaming_completion_equals_generator(client, generator):
    expected = _alone(generator, PROMPT, 20)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.stop_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_chat_equals_generator_plain_and_streamed(client, generator):
    expected = _alone(generator, generator.chat_prompt(MESSAGES), 16)
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(expected.prompt_ids)
    both = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, max_completion_tokens=16)
    assert both.choices[0].message.content == expected.text  # the deprecated name beside the new, agreeing
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, stream=True)
    streamed = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected.text
    assert streamed[-1].choices[0].finish_reason == expected.stop_reason


def test_a_repeated_prompt_start_is_taken_over_and_reported_as_cached(server, client, generator):
    """The second request with a long prompt continues from the K/V the first left in its row: usage reports all but
    the last prompt token as cached (as OpenAI reports its prompt cache), /metrics counts them, the text is unchanged."""
    chunk = generator.config.attention_chunk_size
    words = [f"item{i}" for i in range(40)]
    while len(generator.encode(" ".join(words))) % chunk == 0:  # the prompt's end shares its chunk with the row's end
        words.append("more")
    prompt = " ".join(words)
    length = len(generator.encode(prompt))
    assert length > 33  # past the server's default reuse threshold of 32 tokens
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)  # the row then holds the prompt alone
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == length - 1
    assert again.choices[0].text == _alone(generator, prompt, 12).text
    metrics = httpx.get(f"{server[0]}/metrics").text
    reused = next(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("llama4_prompt_tokens_reused_total "))
    assert reused >= length - 1


def test_concurrent_requests_are_batched_and_each_equals_its_single_run(client, generator):
    """Five requests of different lengths at once through 2 rows: queued, admitted as rows free, all correct."""
    prompts = [PROMPT, "A", "Once upon a time in a land far away", "xyz", "The cat sat"]
    lengths = [30, 8, 17, 25, 11]
    expected = [_alone(generator, p, n).text for p, n in zip(prompts, lengths)]

    def stream(args):
        prompt, n = args
        return "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, stream=True))

    with ThreadPoolExecutor(3) as pool:  # 3 in flight: 2 rows + 1 waiting (within --max-queue)
        assert list(pool.map(stream, zip(prompts, lengths))) == expected


def test_sampling_parameters_logprobs_and_stop(client, generator):
    sampled = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.9, seed=5,
                   frequency_penalty=0.5, presence_penalty=0.2, extra_body={"top_k": 40, "repetition_penalty": 1.2})
    first = client.completions.create(**sampled).choices[0].text
    assert client.completions.create(**sampled).choices[0].text == first  # seeded: reproducible
    expected = generator.stream(PROMPT, 16, temperature=0.9, top_p=0.9, seed=5, frequency_penalty=0.5,
                                presence_penalty=0.2, top_k=40, repetition_penalty=1.2)
    assert first == generator.tokenizer.decode([e.token_id for e in expected if not e.stop])

    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=3).choices[0]
    logprobs = greedy.logprobs
    assert len(logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in logprobs.token_logprobs)
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        # keyed by token text, so tokens decoding alike (partial UTF-8) share an entry; greedy picks the most likely
        assert 1 <= len(top) <= 3 and max(top.values()) <= chosen + 1e-9

    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for c in content:
        assert len(c.top_logprobs) == 2 and c.logprob == c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob

    full = _alone(generator, PROMPT, 24).text
    stop = full[6:9]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, stop=[stop]).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


def _sampled(generator, prompt, max_tokens, **options):
    """(text, tokens generated) of the Generator's run, alone."""
    events = list(generator.stream(prompt, max_tokens, **options))
    return generator.tokenizer.decode([e.token_id for e in events if not e.stop]), len(events)


def test_n_choices_sample_with_seed_plus_their_index_plain_and_streamed(client, generator):
    """n=3 (more than the 2 rows: one choice waits in the queue): choice i is the Generator's run with seed 7 + i."""
    options = dict(temperature=1.0, top_p=0.95)
    runs = [_sampled(generator, PROMPT, 10, seed=7 + i, **options) for i in range(3)]
    expected = [text for text, _ in runs]
    assert len(set(expected)) > 1  # the choices differ, or this would show nothing
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, n=3, seed=7, **options)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == expected
    assert response.usage.prompt_tokens == len(generator.encode(PROMPT))  # the prompt counts once
    assert response.usage.completion_tokens == sum(count for _, count in runs)

    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, n=3, seed=7, stream=True,
                                           **options):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == dict(enumerate(expected))

    prompt_ids = generator.chat_prompt(MESSAGES)
    chat_expected = [_sampled(generator, prompt_ids, 8, seed=3 + i, **options)[0] for i in range(2)]
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, n=2, seed=3, **options)
    assert [c.message.content for c in chat.choices] == chat_expected
    deltas, roles = {}, []
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, n=2, seed=3, stream=True,
                                                **options):
        for c in chunk.choices:
            deltas[c.index] = deltas.get(c.index, "") + (c.delta.content or "")
            roles += [c.index] if c.delta.role == "assistant" else []
    assert deltas == dict(enumerate(chat_expected)) and sorted(roles) == [0, 1]


def test_a_batch_of_prompts_gets_n_choices_each_indexed_prompt_times_n_plus_i(client, generator):
    """A list of prompts (texts, or token-id lists): prompt k's choice i is index k × n + i and is the Generator's
    run of that prompt with seed + i (2 prompts × n=2: more than the 2 rows, so two choices wait in the queue)."""
    options = dict(temperature=1.0, top_p=0.95)
    prompts = [PROMPT, "Once upon a time"]
    runs = [_sampled(generator, prompt, 6, seed=3 + i, **options) for prompt in prompts for i in range(2)]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, seed=3, **options)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.text for c in response.choices] == [text for text, _ in runs]
    assert response.usage.prompt_tokens == sum(len(generator.encode(p)) for p in prompts)  # each prompt once
    assert response.usage.completion_tokens == sum(count for _, count in runs)

    ids = [generator.encode(p) for p in prompts]
    greedy = [_alone(generator, p, 5).text for p in ids]
    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt=ids, max_tokens=5, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == dict(enumerate(greedy))


def test_null_optional_fields_mean_not_given(server, generator):
    """OpenAI's API takes null for an optional field as its default (clients send them): every optional field null
    gives the defaults' answer (greedy, 16 tokens for a completion)."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
                           "logit_bias", "stream", "stream_options", "user", "logprobs"])
    completion = httpx.post(f"{server[0]}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": None, "best_of": None, "echo": None, "suffix": None, **nulls})
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"] == _alone(generator, PROMPT, 16).text
    messages = [{**m, "name": None, "tool_calls": None, "tool_call_id": None} for m in MESSAGES]
    chat = httpx.post(f"{server[0]}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": messages, "max_tokens": 8, "max_completion_tokens": None, "tools": None,
        "tool_choice": None, "response_format": None, "top_logprobs": None, "parallel_tool_calls": None, **nulls})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == _alone(generator, generator.chat_prompt(MESSAGES), 8).text


def test_an_answer_dumped_back_into_the_conversation_is_taken(client, generator):
    """`messages.append(response.choices[0].message.model_dump())` carries the client's null refusal, audio,
    function_call and annotations: the next turn is the one with a plain assistant message; a refusal is its text."""
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6).choices[0].message
    dumped = first.model_dump()
    assert {"refusal", "audio", "function_call", "annotations"} <= set(dumped)
    follow_up = {"role": "user", "content": "Another."}
    plain = [*MESSAGES, {"role": "assistant", "content": first.content}, follow_up]
    expected = _alone(generator, generator.chat_prompt(plain), 6).text
    answer = client.chat.completions.create(model=MODEL, messages=[*MESSAGES, dumped, follow_up], max_tokens=6)
    assert answer.choices[0].message.content == expected
    refused = [*MESSAGES, {"role": "assistant", "content": None, "refusal": "I cannot."}, follow_up]
    as_text = [*MESSAGES, {"role": "assistant", "content": "I cannot."}, follow_up]
    answer = client.chat.completions.create(model=MODEL, messages=refused, max_tokens=6)
    assert answer.choices[0].message.content == _alone(generator, generator.chat_prompt(as_text), 6).text
    refusal_part = [*MESSAGES, {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
                    follow_up]  # OpenAI's content part for it (was a 400 "type 'refusal' is not supported")
    answer = client.chat.completions.create(model=MODEL, messages=refusal_part, max_tokens=6)
    assert answer.choices[0].message.content == _alone(generator, generator.chat_prompt(as_text), 6).text


def test_echo_scores_the_prompt_as_the_pytorch_model_does(client, generator):
    """echo + logprobs (how evaluation harnesses score text): every prompt token after the first gets its
    log-probability under the model; reference: log-softmax of the PyTorch model's logits on the same weights. A
    600-token prompt is fed in two prefill pieces across 16-token chunks; max_tokens=0 scores without generating."""
    import numpy as np
    import torch

    from llama4_export.model import get_preset
    from llama4_export.weights import from_config

    model = from_config(get_preset("scout-tiny", 4), seed=0)
    long = [int(t) for t in np.random.default_rng(4).integers(3, 500, 600)]
    short = generator.encode(PROMPT)
    response = client.completions.create(model=MODEL, prompt=[long, short], max_tokens=0, echo=True, logprobs=1)
    for ids, choice in zip([long, short], response.choices):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).double()[0]
        reference = torch.log_softmax(logits, -1)
        expected = [float(reference[j, ids[j + 1]]) for j in range(len(ids) - 1)]
        scored = choice.logprobs
        assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None
        np.testing.assert_allclose(scored.token_logprobs[1:], expected, rtol=0, atol=2e-4)
        np.testing.assert_allclose([max(top.values()) for top in scored.top_logprobs[1:]],
                                   reference[:-1].max(-1).values.numpy(), rtol=0, atol=2e-4)
        assert len(scored.tokens) == len(ids) and choice.finish_reason == "length"
        assert b"".join(map(_token_bytes, scored.tokens)).decode("utf-8", "replace") == choice.text
        for token, offset in zip(scored.tokens, scored.text_offset):  # bytes not UTF-8 among them: U+FFFD's
            assert token.startswith("bytes:") or choice.text[offset:offset + len(token)] == token
        assert choice.text == generator.tokenizer.decode(ids, skip_special_tokens=False)
    assert response.usage.prompt_tokens == len(long) + len(short) and response.usage.completion_tokens == 0
    # again: a row holding the same prompt is not taken over (its positions' logits would be missing)
    again = client.completions.create(model=MODEL, prompt=long, max_tokens=0, echo=True, logprobs=1).choices[0]
    assert again.logprobs.token_logprobs == response.choices[0].logprobs.token_logprobs

    # with new tokens: the prompt's text, then the completion; its scores after the prompt's, as without echo
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=1).choices[0]
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=1, echo=True).choices[0]
    assert echoed.text == PROMPT + plain.text
    assert echoed.logprobs.token_logprobs[len(short):] == plain.logprobs.token_logprobs
    np.testing.assert_allclose(echoed.logprobs.token_logprobs[1:len(short)], [
        float(torch.log_softmax(model(torch.tensor([short])).double()[0], -1)[j, short[j + 1]])
        for j in range(len(short) - 1)], rtol=0, atol=2e-4)
    # streamed: the prompt's chunk (with its scores) first, then the tokens' chunks; together the same answer
    chunks = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=1,
                                                               echo=True, stream=True) if c.choices]
    assert chunks[0].text == PROMPT and "".join(c.text for c in chunks) == echoed.text
    assert [lp for c in chunks for lp in c.logprobs.token_logprobs] == echoed.logprobs.token_logprobs


def test_echo_scores_a_prompt_that_fills_the_context(client, generator):
    """Scoring alone (echo, max_tokens 0) needs no room after the prompt: a prompt of exactly the context's tokens is
    scored as the PyTorch model scores it (it was a 400 "shorten it", which an evaluation harness's full windows hit;
    OpenAI's legacy API took it); one token more is a 400."""
    import numpy as np
    import torch

    from llama4_export.model import get_preset
    from llama4_export.weights import from_config

    context = generator.config.max_position_embeddings
    ids = [int(t) for t in np.random.default_rng(5).integers(3, 500, context)]
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1).choices[0]
    with torch.no_grad():
        logits = from_config(get_preset("scout-tiny", 4), seed=0)(torch.tensor([ids])).double()[0]
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(scored.logprobs.token_logprobs[1:], expected, rtol=0, atol=2e-4)
    for body in ({"max_tokens": 0, "echo": True, "logprobs": 1, "prompt": ids + [3]}, {"max_tokens": 1, "prompt": ids}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, **body)
        assert refused.value.code == "context_length_exceeded" and refused.value.param == "prompt"


def test_echo_with_max_tokens_0_and_no_logprobs_answers_the_prompt(client):
    """OpenAI's legacy echo: max_tokens 0 echoes the prompt, nothing generated (it was a 400 naming the engine's
    max_new_tokens and prompt_logprobs, which the API does not have), plain and streamed."""
    response = client.completions.create(model=MODEL, prompt=[PROMPT, "Once"], max_tokens=0, echo=True, n=2)
    assert [c.text for c in response.choices] == [PROMPT, PROMPT, "Once", "Once"]
    assert {(c.finish_reason, c.logprobs) for c in response.choices} == {("length", None)}
    assert response.usage.completion_tokens == 0
    chunks = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True,
                                                               stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == PROMPT and chunks[-1].finish_reason == "length"


def _token_bytes(token: str) -> bytes:
    """A logprobs token's bytes: OpenAI writes a token holding part of a character as `bytes:\\xNN…`."""
    if token.startswith("bytes:"):
        return bytes.fromhex(token.removeprefix("bytes:").replace("\\x", ""))
    return token.encode()


def test_logprobs_give_every_tokens_bytes_and_where_it_starts_in_the_text(client, generator):
    """Byte-level BPE splits a non-ASCII character over tokens (scout-tiny's tokenizer: a token per byte). A token's
    bytes must be recoverable from its logprobs entry (joined, they are the text), text_offset must index the text
    returned after the prompt (echoed or not, as OpenAI's; the echoed prompt's <|begin_of_text|> is not in it), and
    a streamed choice must score every token the plain one does; reference: Python's UTF-8 codec."""
    prompt = "café — 東京 ok"
    body = dict(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    scored = client.completions.create(**body).choices[0]
    assert scored.text == prompt and scored.logprobs.tokens[0] == "<|begin_of_text|>"
    data = prompt.encode()
    pieces = [_token_bytes(t) for t in scored.logprobs.tokens[1:]]
    assert b"".join(pieces) == data and "bytes:\\xe6" in scored.logprobs.tokens  # 東 is 3 tokens
    starts = [0, *itertools.accumulate(map(len, pieces))][:-1]  # each token's first byte in the text
    assert scored.logprobs.text_offset == [0, *(len(data[:b].decode("utf-8", "ignore")) for b in starts)]
    assert not any("\ufffd" in t for top in scored.logprobs.top_logprobs[1:] for t in top)  # alternatives too

    # the same offsets over a stream's chunks, the generated tokens' after the prompt's
    plain = client.completions.create(**{**body, "max_tokens": 12}).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**{**body, "max_tokens": 12}, stream=True) if c.choices]
    assert [o for c in chunks for o in c.logprobs.text_offset] == plain.logprobs.text_offset
    assert plain.logprobs.text_offset[:len(starts) + 1] == scored.logprobs.text_offset
    # not echoed, offsets still count the prompt's characters first, as OpenAI's
    unechoed = {**body, "max_tokens": 12, "echo": False}
    offsets = client.completions.create(**unechoed).choices[0].logprobs.text_offset
    assert offsets == plain.logprobs.text_offset[len(starts) + 1:]
    streamed = client.completions.create(**unechoed, stream=True)
    assert [o for c in streamed if c.choices and c.choices[0].logprobs
            for o in c.choices[0].logprobs.text_offset] == offsets

    messages = [{"role": "user", "content": "Écris 東京 en hiragana: とうきょう"}]
    chat = dict(model=MODEL, messages=messages, max_tokens=24, logprobs=True, top_logprobs=2)
    reply = client.chat.completions.create(**chat).choices[0]
    entries = reply.logprobs.content
    assert len(entries) == 24 and any(len(e.bytes) == 1 and e.bytes[0] >= 0x80 for e in entries)  # partial ones
    assert all(e.token.encode() == bytes(e.bytes) or e.token.startswith("bytes:") for e in entries)
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == reply.message.content
    eos = generator.eos_token_ids[0]  # a reply ended by its end token: scored, with no bytes (it adds no text)
    ended = client.chat.completions.create(**chat, logit_bias={str(eos): 100}).choices[0]
    assert ended.finish_reason == "stop" and ended.message.content == ""
    assert [(e.token, e.bytes) for e in ended.logprobs.content] == [(generator.tokenizer.decode([eos], False), None)]
    streamed = [c.choices[0] for c in client.chat.completions.create(**chat, stream=True) if c.choices]
    assert [e for c in streamed if c.logprobs for e in c.logprobs.content] == entries
    assert "".join(c.delta.content or "" for c in streamed) == reply.message.content


def test_a_negative_seed_is_a_seed(client, generator):
    """OpenAI's seeds are signed 64-bit integers: seed -1 samples reproducibly, choice i with seed − 1 + i, as the
    Generator does with those seeds (it was a 500: numpy's generator takes non-negative seeds only)."""
    expected = [_sampled(generator, PROMPT, 6, seed=seed, temperature=1.0)[0] for seed in (-1, 0)]
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=2, seed=-1, temperature=1.0)
    assert [c.text for c in response.choices] == expected


def test_top_p_0_keeps_the_most_likely_token_alone(client, generator):
    """OpenAI takes top_p in [0, 1] (it was a 400 "greater than 0"): 0 keeps the top token, whatever the temperature."""
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.5, top_p=0, seed=3)
    assert response.choices[0].text == _alone(generator, PROMPT, 8).text


def test_without_a_seed_each_request_samples_afresh(client, generator):
    """As OpenAI's: a request without a seed is not seed 0 every time (four identical "random" texts before); a seed
    still reproduces (test_sampling_parameters_logprobs_and_stop)."""
    texts = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0).choices[0].text
             for _ in range(3)]
    assert len(set(texts)) == 3, texts


def test_logit_bias_forces_and_bans_tokens(client, generator):
    forced = generator.tokenizer.encode("hello", add_special_tokens=False)[-1]
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logit_bias={str(forced): 100})
    assert response.choices[0].text == generator.tokenizer.decode([forced] * 5)
    greedy = _alone(generator, PROMPT, 6)
    banned = {str(greedy.token_ids[0]): -100}
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logit_bias=banned)
    assert response.choices[0].text == _sampled(generator, PROMPT, 6, logit_bias={greedy.token_ids[0]: -100})[0]
    assert response.choices[0].text != greedy.text


MALFORMED = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "x",', 400, None),  # not JSON
    ("/v1/completions", b'[1, 2]', 400, None),  # not an object
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),  # missing
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),  # wrong type
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),  # 0: echo only
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),  # > 4
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": MAX_BATCH + MAX_QUEUE + 1}, 400, "n"),  # never fits
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"1": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 2}, 400, "best_of"),  # not implemented
    ("/v1/completions", {"model": MODEL, "prompt": "x", "best_of": 1, "n": 2}, 400, "best_of"),  # OpenAI: >= n
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),  # without stream: true (was ignored)
    ("/v1/completions", {"model": MODEL, "prompt": "x", "mirostat": 1}, 400, "mirostat"),  # unknown
    ("/v1/completions", {"model": MODEL, "prompt": "x", "mirostat": None}, 400, "mirostat"),  # unknown, even if null
    ("/v1/completions", {"model": None, "prompt": "x"}, 400, "model"),  # required, not null
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}]},
     400, "messages[0].audio"),  # no audio
    ("/v1/completions", {"model": MODEL, "prompt": [999999]}, 400, "prompt"),  # outside the vocabulary
    ("/v1/completions", {"model": MODEL, "prompt": ["x", [999999]]}, 400, "prompt"),  # texts and ids mixed
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1], []]}, 400, "prompt"),  # an empty prompt in the batch
    ("/v1/completions", {"model": MODEL, "prompt": [[1], [999999]]}, 400, "prompt[1]"),
    ("/v1/completions", {"model": MODEL, "prompt": ["x", "x " * 5000]}, 400, "prompt[1]"),  # beyond the context
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 3, "n": 2}, 400, "prompt"),  # 6 choices never fit
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 5000}, 400, "prompt"),  # longer than the context
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),  # beyond it
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    # a message without its content was rendered as empty text and answered
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}, {"role": "assistant"},
                                                           {"role": "user", "content": "y"}]}, 400, "messages[1].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, 400, "tools"),  # the template renders no tools
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}, 400, "messages"),  # text-only
    # the part the client got wrong is named, not the union's first branch ("content: should be a valid string")
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content[1].image_url.url"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, 400, "messages[0].content[0]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "messages[0].content[0].text"),
    ("/v1/nothing", {}, 404, None),
    # a field whose name starts with "str" was taken for a union branch's type and left out of param
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": 1}, 400, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}},
     400, "stream_options.include_usage"),
    # named max_tokens, which the client did not send
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 5000}, 400,
     "max_completion_tokens"),
    # about tools, so refused without them (as OpenAI's) rather than ignored
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tool_choice": "auto"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "parallel_tool_calls": False}, 400,
     "parallel_tool_calls"),
    # max_tokens was ignored beside max_completion_tokens
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 3}, 400,
     "max_tokens"),
    # OpenAI's seeds are int64: 2**64 sampled as seed 0 did
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": -2**63 - 1}, 400, "seed"),
    # a tool message answers an earlier assistant tool call by its id (both were rendered as an orphan reply)
    ("/v1/chat/completions", {"model": MODEL, "messages": [*MESSAGES, {"role": "tool", "content": "sunny"}]}, 400,
     "messages[2].tool_call_id"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}]}, 400, "messages[3].tool_call_id"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "refusal", "refusal": "no"}]}]}, 400, "messages[0].content"),  # an assistant's part only
    # accepted (and overflowed in the sampler): Python's JSON reader and pydantic's take Infinity
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": 1, "repetition_penalty": Infinity}', 400,
     "repetition_penalty"),
]


@pytest.mark.parametrize("path, body, status, param", MALFORMED, ids=[f"{i}" for i in range(len(MALFORMED))])
def test_malformed_request_gets_an_openai_error_and_the_next_request_succeeds(server, client, path, body, status,
                                                                              param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server[0]}{path}", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].finish_reason


def test_a_nan_sampling_value_is_called_not_finite(server):
    """NaN fails every bound, so pydantic answered "temperature: Input should be less than or equal to 2"."""
    body = b'{"model": "tiny", "prompt": "x", "temperature": NaN}'
    response = httpx.post(f"{server[0]}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"
    assert "finite" in response.json()["error"]["message"], response.text


def test_a_lone_surrogate_escape_is_named_as_such(server, client):
    """`"\\ud800"` alone is grammatical JSON but no character; the parser's "unexpected end of hex escape" sent the
    client looking for a cut-off escape."""
    body = b'{"model": "tiny", "prompt": "ab\\ud800cd"}'
    response = httpx.post(f"{server[0]}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("the request body holds a \\uD800-\\uDFFF escape outside a surrogate pair at line 1 "
                              "column ") and message.endswith(": it is not a character; send the text as UTF-8, or "
                                                              "the pair's two escapes"), message
    paired = b'{"model": "tiny", "prompt": "ab\\ud83d\\ude00cd", "max_tokens": 2}'
    assert httpx.post(f"{server[0]}/v1/completions", content=paired,
                      headers={"Content-Type": "application/json"}).status_code == 200


def _completion_body_of(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (JSON whitespace before its closing brace)."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_a_body_over_the_size_limit_gets_413_declared_or_chunked_and_one_at_the_limit_is_served(server, client):
    """Without a limit the server held, parsed and tokenized any body: a 50 MB prompt cost ~30 s of a core and GBs
    of memory everyone shares before it was refused as longer than the context. A declared length over the limit is
    refused before the body is read; a chunked body (no length) once it passes the limit."""
    url, headers = f"{server[0]}/v1/completions", {"Content-Type": "application/json"}
    at_limit = httpx.post(url, content=_completion_body_of(MAX_REQUEST_BYTES), headers=headers)
    assert at_limit.status_code == 200 and at_limit.json()["usage"]["completion_tokens"] == 2, at_limit.text

    declared = httpx.post(url, content=_completion_body_of(MAX_REQUEST_BYTES + 1), headers=headers)
    assert declared.status_code == 413, declared.text
    error = declared.json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert f"is {MAX_REQUEST_BYTES + 1} bytes, over this server's limit of {MAX_REQUEST_BYTES}" in error["message"]
    assert "--max-request-bytes" in error["message"]

    big = _completion_body_of(5 * MAX_REQUEST_BYTES)
    chunked = httpx.post(url, content=(big[i:i + 65536] for i in range(0, len(big), 65536)), headers=headers)
    assert chunked.request.headers["transfer-encoding"] == "chunked" and chunked.status_code == 413, chunked.text
    assert f"longer than this server's limit of {MAX_REQUEST_BYTES}" in chunked.json()["error"]["message"]

    with pytest.raises(openai.APIStatusError, match="over this server's limit") as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * MAX_REQUEST_BYTES}])
    assert raised.value.status_code == 413
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].finish_reason


def test_a_compressed_body_gets_415_naming_its_encoding(server, client):
    """A gzip body was parsed as JSON and refused as "not valid JSON", which sent its client looking for a typo."""
    import gzip

    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).encode()
    response = httpx.post(f"{server[0]}/v1/completions", content=gzip.compress(body),
                          headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_content_encoding" and "Content-Encoding 'gzip'" in error["message"]
    plain = httpx.post(f"{server[0]}/v1/completions", content=body,
                       headers={"Content-Type": "application/json", "Content-Encoding": "identity"})
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 2, plain.text


def test_a_body_starting_with_a_byte_order_mark_is_read(server):
    """A UTF-8 byte-order mark before the JSON (Windows PowerShell 5.1's UTF8 encoding writes one) was refused as "not
    valid JSON" (Python's json.loads refuses it too); RFC 8259 lets a parser ignore it, as it now is."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).encode()
    response = httpx.post(f"{server[0]}/v1/completions", content=b"\xef\xbb\xbf" + body,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2, response.text
    twice = httpx.post(f"{server[0]}/v1/completions", content=b"\xef\xbb\xbf" * 2 + body,
                       headers={"Content-Type": "application/json"})
    assert twice.status_code == 400 and "not valid JSON" in twice.json()["error"]["message"], twice.text


def _stream_lines(base, body):
    return httpx.stream("POST", f"{base}/v1/completions", json={"model": MODEL, "stream": True, **body}, timeout=60)


def test_full_queue_answers_429_with_retry_after(server, client):
    """2 rows + a queue of 2 held by long streams: the next request gets 429 and Retry-After; later ones succeed."""
    base = server[0]
    streams = [_stream_lines(base, {"prompt": PROMPT, "max_tokens": 3000}) for _ in range(MAX_BATCH + MAX_QUEUE)]
    opened = [s.__enter__() for s in streams]
    try:
        assert all(r.status_code == 200 for r in opened)
        refused = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["type"] == "rate_limit_error"
    finally:
        for s in streams:
            s.__exit__(None, None, None)  # disconnect: the rows are freed at the next step
    _wait_idle(base)
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].text is not None


def _wait_idle(base, seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        health = httpx.get(f"{base}/health").json()
        if health["running"] == 0 and health["queued"] == 0:
            return
        assert time.monotonic() < deadline, health
        time.sleep(0.1)


def _requests_total(base, endpoint, status):
    return _metric(base, f'llama4_requests_total{{endpoint="{endpoint}",status="{status}"}}', missing=0.0)


def test_client_disconnect_frees_its_row(server):
    """... and counts in /metrics as nginx's 499 (client closed request), not as a 200."""
    base = server[0]
    _wait_idle(base)
    closed, served = (_requests_total(base, "/v1/completions", s) for s in ("499", "200"))
    with _stream_lines(base, {"prompt": PROMPT, "max_tokens": 3000}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.get(f"{base}/health").json()["running"] == 1
    _wait_idle(base)
    assert _requests_total(base, "/v1/completions", "499") == closed + 1
    assert _requests_total(base, "/v1/completions", "200") == served


def _metric(base, name, missing=None):
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    if missing is not None:  # a labelled series appears with its first count
        return missing
    raise AssertionError(f"{name} is not in /metrics")


def test_a_non_streaming_client_that_disconnects_while_tokens_flow_frees_its_row(server):
    """The disconnect was only checked when no token came for 0.5 s: a client gone while its tokens flowed held its
    row to the end (here 3,000 tokens, eos ignored)."""
    base = server[0]
    _wait_idle(base)
    before = _metric(base, "llama4_generation_tokens_total")
    closed, served = (_requests_total(base, "/v1/completions", s) for s in ("499", "200"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", timeout=0.5,
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True})
    _wait_idle(base)
    assert _metric(base, "llama4_generation_tokens_total") - before < 3000
    deadline = time.monotonic() + 5  # the handler notices at its next poll, after the row is freed
    while _requests_total(base, "/v1/completions", "499") == closed and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _requests_total(base, "/v1/completions", "499") == closed + 1  # was counted as a 200
    assert _requests_total(base, "/v1/completions", "200") == served


def test_metrics_count_prompt_tokens_as_usage_does_and_a_usage_stream_carries_null_usage(server, client):
    """n choices prefill their prompt n times, but a request's prompt counts once in /metrics, as in its usage (it was
    n times); a stream asked for its usage has usage: null in every chunk before the last, as OpenAI's."""
    base = server[0]
    _wait_idle(base)
    before = _metric(base, "llama4_prompt_tokens_total")
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=2, temperature=1.0, seed=1)
    assert _metric(base, "llama4_prompt_tokens_total") - before == response.usage.prompt_tokens
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})):
        with httpx.stream("POST", f"{base}{path}", timeout=60, json={
                "model": MODEL, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}, **body}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["total_tokens"]


def test_tokens_per_second_holds_only_its_window_between_scrapes():
    """Every generated token's time was kept until the next scrape of /metrics: a server nobody scraped grew by
    ~40 bytes a token for ever. Here 200,000 tokens over 200 s, unscraped, then the rate of the last 10 s."""
    import tracemalloc

    from llama4_export.serving.metrics import RATE_WINDOW_S, TokenRate

    rate, start = TokenRate(), time.monotonic() - 200
    tracemalloc.start()
    try:
        for i in range(200_000):
            rate.add(start + i / 1000)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 1_000_000, held  # the window's 10,000 times, not all 200,000 (~8 MB)
    tokens_per_second = rate.value()
    late = time.monotonic() - (start + 200)  # the window ends this much after the last token
    assert 1000 * (1 - late / RATE_WINDOW_S) - 1 <= tokens_per_second <= 1000 + 1


def test_time_to_first_token_counts_from_before_the_prompt_is_tokenized(artifact):
    """The histogram's clock started after the request's prompts were tokenized and its images encoded (seconds for
    a chat with images): that wait was missing from it. Here the server's tokenizer takes 1.5 s on one prompt."""
    slow = ("import time\nfrom llama4_export.runtime import Generator\nencode = Generator.encode\n"
            "def slow_encode(self, prompt):\n"
            "    time.sleep(1.5 if prompt == 'slow to tokenize' else 0)\n"
            "    return encode(self, prompt)\n"
            "Generator.encode = slow_encode")
    with llama4_serve(artifact, "--threads", "1", "--model-name", MODEL, prelude=slow) as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        client.completions.create(model=MODEL, prompt="slow to tokenize", max_tokens=2)
        assert _metric(base, "llama4_time_to_first_token_seconds_count") == 1
        assert _metric(base, "llama4_time_to_first_token_seconds_sum") >= 1.5


def test_a_body_still_arriving_at_the_request_timeout_gets_408(artifact):
    """A client that declares 1,000 bytes and sends 10 held its connection (and a task) for ever: --request-timeout
    counted from the body's end."""
    with llama4_serve(artifact, "--threads", "1", "--model-name", MODEL, "--request-timeout", "2") as (base, _):
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"model\": ")
            started = time.monotonic()
            reply = conn.recv(65536)
            waited = time.monotonic() - started
            while not reply.endswith(b"}") and (more := conn.recv(65536)):  # the body may come in a packet of its own
                reply += more
        head, body = reply.decode().split("\r\n\r\n", 1)
        assert head.startswith("HTTP/1.1 408 ") and 1.5 < waited < 10, reply
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert httpx.get(f"{base}/health").status_code == 200


def test_an_api_key_guards_the_v1_routes(artifact, generator, monkeypatch):
    """LLAMA4_SERVE_API_KEY (or --api-key): /v1/ answers only `Authorization: Bearer <key>` (the openai client's
    api_key), a missing or wrong key gets OpenAI's 401; /health and /metrics stay open for probes and scrapers."""
    monkeypatch.setenv("LLAMA4_SERVE_API_KEY", "s3cret")
    with llama4_serve(artifact, "--threads", "1", "--model-name", MODEL) as (base, serving):
        keyed = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert keyed.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices[0].text == \
            _alone(generator, PROMPT, 4).text
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="guess", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            wrong.models.list()
        bare = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
        assert bare.headers["x-served-by"].endswith(f"/{serving.pid}")  # answered before the routes, still named
        assert httpx.get(f"{base}/health").status_code == 200 and httpx.get(f"{base}/metrics").status_code == 200


def test_allowed_origins_get_cors_headers_and_preflights_need_no_key(server, artifact, monkeypatch):
    """A browser page calls the API only when the answer names its origin (CORS): without it a web UI on another port
    could not use the server at all. --allow-origin lists the origins; a preflight (OPTIONS, no Authorization: browsers
    never send it there) is answered before the key is asked for, and errors carry the header too, so the page can
    read them. Other origins get no header; by default there is none (the module's server)."""
    page, other = "http://localhost:3000", "http://elsewhere.example"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    default = httpx.options(f"{server[0]}/v1/completions", headers={"Origin": page, **preflight})
    assert default.status_code == 405 and "access-control-allow-origin" not in default.headers
    monkeypatch.setenv("LLAMA4_SERVE_API_KEY", "s3cret")
    with llama4_serve(artifact, "--threads", "1", "--model-name", MODEL, "--allow-origin", "https://app.example",
                      "--allow-origin", page) as (base, _):
        allowed = httpx.options(f"{base}/v1/completions", headers={"Origin": page, **preflight})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == page
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        assert "x-served-by" in allowed.headers
        refused = httpx.options(f"{base}/v1/completions", headers={"Origin": other, **preflight})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        assert refused.json()["error"]["code"] == "cors_preflight_refused"  # was plain text: curl users read it
        assert f"{other!r} is not one of llama4-serve's --allow-origin origins" in refused.json()["error"]["message"]
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        keyed = httpx.post(f"{base}/v1/completions", json=body, timeout=60,
                           headers={"Origin": page, "Authorization": "Bearer s3cret"})
        assert keyed.status_code == 200 and keyed.headers["access-control-allow-origin"] == page
        assert "x-served-by" in keyed.headers["access-control-expose-headers"].lower()
        unkeyed = httpx.post(f"{base}/v1/completions", json=body, headers={"Origin": page})
        assert unkeyed.status_code == 401 and unkeyed.headers["access-control-allow-origin"] == page
        foreign = httpx.post(f"{base}/v1/completions", json=body, timeout=60,
                             headers={"Origin": other, "Authorization": "Bearer s3cret"})
        assert foreign.status_code == 200 and "access-control-allow-origin" not in foreign.headers


def test_an_unexpected_error_gets_an_openai_500_naming_the_replica_and_ends_a_stream_with_its_error(artifact,
                                                                                                    generator):
    """A bug's 500 (the catch-all handler's) was sent by Starlette's ServerErrorMiddleware, outside every middleware
    of the app: without X-Served-By (which replica failed?) and without the CORS header (a browser page could not read
    the error). A bug past a stream's headers cut the stream with no error event. Here the server's tokenizer fails on
    one prompt and its log-probabilities on every call, as a bug would; the server logs both and serves on."""
    failing = ("from llama4_export.runtime import Generator\nencode = Generator.encode\n"
               "def failing_encode(self, prompt):\n"
               "    if prompt == 'fail here':\n"
               "        raise RuntimeError('a bug')\n"
               "    return encode(self, prompt)\n"
               "Generator.encode = failing_encode\n"
               "from llama4_export.serving import app\n"
               "def failing_logprobs(*args):\n"
               "    raise ValueError('a bug in a stream')\n"
               "app._TokenText.completion_logprobs = failing_logprobs")
    page = "http://localhost:3000"
    with llama4_serve(artifact, "--threads", "1", "--model-name", MODEL, "--allow-origin", page,
                      prelude=failing) as (base, serving):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60,
                               default_headers={"Origin": page})
        with pytest.raises(openai.InternalServerError, match="internal error: RuntimeError: a bug") as failed:
            client.completions.create(model=MODEL, prompt="fail here", max_tokens=2)
        reply = failed.value.response
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
        assert reply.headers["x-served-by"].endswith(f"/{serving.pid}")
        assert reply.headers["access-control-allow-origin"] == page
        assert reply.headers["connection"] == "close"  # uvicorn closes it: a client reusing it got "Connection error"
        with pytest.raises(openai.APIError, match="internal error: ValueError: a bug in a stream"):
            for _ in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=1, stream=True):
                pass
        assert _requests_total(base, "/v1/completions", "500") == 2
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices[0].text == \
            _alone(generator, PROMPT, 4).text
        serving.terminate()
        log = serving.communicate(timeout=60)[0]
    assert "RuntimeError: a bug" in log and "ValueError: a bug in a stream" in log  # the operator sees both
    assert log.startswith(f"serving {MODEL} on {base}/v1 (max batch 8)\n")  # W is the context: nothing slides


def test_a_window_under_the_context_is_said_at_start_and_longer_prompts_slide_as_the_generator_does(artifact):
    """Prompts between the KV window W and the context are served on the sliding cache (only past the context is a
    400), and an operator who gave a small --window, or whose W was capped to fit memory, was not told."""
    windowed = Generator.load(artifact, threads=1, window=64)
    prompt = " ".join(["the history of"] * 40)
    assert 64 < len(windowed.encode(prompt)) < windowed.config.max_position_embeddings
    with llama4_serve(artifact, "--threads", "1", "--model-name", MODEL, "--window", "64") as (base, serving):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6).choices[0].text
        serving.terminate()
        said = serving.communicate(timeout=60)[0].splitlines()[0]
    assert said == (f"serving {MODEL} on {base}/v1 (max batch 8; KV window 64 of the "
                    f"{windowed.config.max_position_embeddings:,}-token context: longer sequences slide)")
    assert reply == _alone(windowed, prompt, 6).text


@pytest.mark.parametrize("flags, expected", [
    (["--port", "70000"], "port 70000: must be in 1..65535"),
    (["--port", "0"], "port 0: must be in 1..65535"),
    (["--host", "no-such-host.invalid"], "host 'no-such-host.invalid': "),
    (["--request-timeout", "-5"], "--request-timeout -5.0: must be >= 0 (0 = no limit)"),
    (["--max-batch", "0"], "max_batch=0: must be >= 1"),
    (["--threads", "-1"], "threads=-1: must be in 1..1024"),
    (["--max-request-bytes", "-1"], "--max-request-bytes -1: must be >= 0 (0 = no limit)"),
    (["--max-image-pixels", "0"], "max_image_pixels=0: must be an integer >= 1 (--max-image-pixels N)"),
    (["--max-image-pixels", "-5"], "max_image_pixels=-5: must be an integer >= 1 (--max-image-pixels N)"),
    (["--max-images", "0"], "max_images=0: must be an integer >= 1 (--max-images N)"),
    # the engine's message named llama4-run's --sinks, which llama4-serve does not have
    (["--window", "0"], "window=0 with sinks=4: the global window needs at least sinks + 1 = 5 slots (S sinks plus "
                        "a ring of at least one recent token); give a window of at least 5"),
    # Ray would retry an unreachable cluster for minutes, printing warnings, before giving up
    (["--ray", "--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: cannot connect"),
    # served one engine under the directory's name, ignoring them
    (["--replicas", "2"], "--replicas applies to a Ray Serve deployment: add --ray, or drop it"),
    (["--gpus-per-replica", "1"], "--gpus-per-replica applies to a Ray Serve deployment"),
    (["--model-name", " "], "model_name=' ': give the model id clients send (--model-name)"),
    # numpy's MemoryError traceback
    (["--max-batch", "100000000"], "max_batch=100000000: the KV cache of that many rows does not fit in memory"),
    (["--ray", "--gpus-per-replica", "-1"], "--gpus-per-replica -1.0: must be >= 0"),  # Ray's ValueError traceback
    (["--ray", "--threads", "-1"], "threads=-1: must be in 1..1024"),  # checked with 1 thread, then Ray's traceback
    # a trailing slash matches no browser's Origin: every call from the page would fail its CORS check
    (["--allow-origin", "http://localhost:3000/"], "allowed origin 'http://localhost:3000/': give '*' or "
                                                    "scheme://host[:port] with no path"),
], ids=["port-above-65535", "port-0", "unresolvable-host", "negative-timeout", "no-rows", "negative-threads",
        "negative-body-limit", "zero-image-pixels", "negative-image-pixels", "zero-images",
        "zero-window", "unreachable-ray-cluster", "replicas-without-ray", "gpus-without-ray",
        "blank-model-name", "rows-beyond-memory", "negative-ray-gpus", "negative-ray-threads",
        "origin-with-a-path"])
def test_bad_flags_get_one_line_and_exit_2_before_anything_listens(artifact, flags, expected):
    """Checked before the artifact loads (or, for --threads, while it does): uvicorn would bind a wrapped-around port
    for 70000 and report a bad host only after the load. A server that starts anyway is killed and fails the test."""
    command = [sys.executable, "-c", "from llama4_export.cli.serve import main; main()", str(artifact), *flags]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"llama4-serve {' '.join(flags)} started serving instead of refusing")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr


def test_a_port_in_use_is_refused_in_one_line_before_the_artifact_loads(artifact, server):
    """The module's server holds its port: a second llama4-serve on it said "serving … on" after loading the artifact,
    then printed uvicorn's bind error and exited 3. The socket is now bound before the load."""
    port = server[0].rsplit(":", 1)[1]
    command = [sys.executable, "-c", "from llama4_export.cli.serve import main; main()", str(artifact), "--port", port]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"127.0.0.1:{port}: cannot listen there (Address already in use)" in lines[0]
    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"  # the first server is untouched


def test_sigterm_answers_the_queue_503_and_ends_streams_left_at_the_grace_with_their_error(artifact):
    """uvicorn waited the grace for every connection, then cancelled their tasks: a queued request waited the whole
    grace for nothing, a stream still running was cut mid-body (no error event, no [DONE]) and the log got a traceback
    each. Now the queue gets 503 at once and a stream still running near the grace's end ends with its error event."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from llama4_export.serving import ServeSettings\n"
            "from llama4_export.serving.server import load_engine, serve\n"
            "from llama4_export.runtime.batching import EngineOptions\n"
            f"serve(load_engine({str(artifact)!r}, EngineOptions(max_batch=1, max_queue=1), threads=1), "
            f"ServeSettings({MODEL!r}), port={port}, graceful_s=4)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
                time.sleep(0.2)
        with ThreadPoolExecutor(1) as pool, _stream_lines(
                base, {"prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the row is taken: the next request waits in the queue
            queued = pool.submit(httpx.post, f"{base}/v1/completions", timeout=60,
                                 json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5})
            while httpx.get(f"{base}/health").json()["queued"] < 1:
                time.sleep(0.05)
            signalled = time.monotonic()
            os.kill(process.pid, signal.SIGTERM)
            answer = queued.result()
            assert answer.status_code == 503 and time.monotonic() - signalled < 2, answer.text
            rest = [line for line in lines if line]
        assert json.loads(rest[-1][len("data: "):])["error"]["code"] == "cancelled", rest[-3:]  # the stream's last
        assert len(rest) < 3000  # it was cut short, not finished
        assert process.wait(timeout=60) == 0
        log = process.communicate()[0]
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    finally:
        if process.poll() is None:
            process.kill()


def test_sigterm_finishes_running_streams_and_exits_0(server):
    """Last in the module: it ends the server."""
    base, process = server
    with _stream_lines(base, {"prompt": PROMPT, "max_tokens": 200}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(process.pid, signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    assert process.wait(timeout=60) == 0
