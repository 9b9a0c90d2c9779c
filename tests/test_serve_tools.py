"""Tool calls in a reply, parsed back into OpenAI's tool_calls: Llama 4's Python-call and JSON forms; anything else
(prose, unknown tools, positional or non-literal arguments, malformed text) stays content. End to end: our own chat
template renders `tools` as transformers renders it, and llama4-serve turns the reply of a model built to answer a
call (REPLY below) into tool_calls, plain and streamed."""

from __future__ import annotations

import json

import pytest

from llama4_export.serving.tools import may_be_tool_call, parse_tool_calls

TOOLS = {"get_weather", "get_time"}


@pytest.mark.parametrize("reply, expected", [
    ('[get_weather(city="Paris", days=2)]', [("get_weather", {"city": "Paris", "days": 2})]),
    ('<|python_start|>[get_weather(city="Oslo"), get_time(zone="CET")]<|python_end|>',
     [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]),
    ('{"name": "get_time", "parameters": {"zone": "UTC"}}', [("get_time", {"zone": "UTC"})]),
    ('[{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}]', [("get_weather", {"city": "Rome"})]),
])
def test_tool_calls_are_parsed(reply, expected):
    calls = parse_tool_calls(reply, TOOLS)
    assert [(c.name, c.arguments) for c in calls] == expected
    wire = calls[0].openai()
    assert wire["type"] == "function" and json.loads(wire["function"]["arguments"]) == expected[0][1]


@pytest.mark.parametrize("reply", [
    "It is sunny in Paris.", '[send_email(to="x")]', '[get_weather("Paris")]', "[get_weather(city=open('f'))]",
    '{"name": "get_weather", "parameters": [1]}', "[" * 10000, '[get_weather(city={[1]: 2})]', "{not json",
    # literals JSON cannot carry: the reply was a 500 (a set, bytes, a complex number) or invalid JSON arguments
    '[get_weather(city={1, 2})]', '[get_weather(city=b"x")]', "[get_weather(days=1j)]", "[get_weather(days=1e999)]",
    '{"name": "get_time", "parameters": {"zone": NaN}}',
])
def test_anything_else_is_content(reply):
    assert parse_tool_calls(reply, TOOLS) is None


def test_parallel_tool_calls_false_answers_the_first_call_alone():
    """parallel_tool_calls: false was accepted and ignored: a reply of two calls came back as both."""
    from llama4_export.serving.protocol import ChatCompletionRequest, parse

    tools = [{"type": "function", "function": {"name": name}} for name in sorted(TOOLS)]
    reply = '[get_weather(city="Oslo"), get_time(zone="CET")]'
    for parallel, expected in ((None, ["get_weather", "get_time"]), (True, ["get_weather", "get_time"]),
                               (False, ["get_weather"])):
        body = parse(ChatCompletionRequest, json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                        "tools": tools, "parallel_tool_calls": parallel}).encode())
        assert [c.name for c in body.tool_calls(reply)] == expected, parallel


def test_a_reply_is_held_back_only_while_it_may_still_be_a_call():
    assert may_be_tool_call("") and may_be_tool_call("  [get_") and may_be_tool_call("<|python")
    assert may_be_tool_call('[ {"na') and may_be_tool_call('{\n  "name"') and may_be_tool_call("[get_time (zone=")
    assert may_be_tool_call('<|python_start|>[get')
    # a reply opening with "[" or "{" was held back whole although "[[" or a markdown link cannot become a call
    for text in ("Sure, ", "[[", "[Paris](https://", "{x", "[1, 2]", "<|python_start|>Hello"):
        assert not may_be_tool_call(text), text


# --------------------------------------------------------------------------------------- through the real server
# A model whose reply is known by construction, not by mocking: a one-layer Llama 4 whose attention and feed-forward
# outputs are zero (o_proj and every down_proj), so the last hidden state is the last token's embedding, and whose
# lm_head row for byte `b` is the embedding of the byte before it in REPLY: greedy decoding follows REPLY's chain from
# the prompt's last token (the "\n" that ends the assistant header), then <|eot|>. REPLY's characters are all distinct.
REPLY = "[now(tz=0)]"
NOW = [{"type": "function", "function": {"name": "now", "description": "The current time.", "parameters": {
    "type": "object", "properties": {"tz": {"type": "integer"}}, "required": ["tz"]}}}]
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What time is it?"}]
# Our own template in the style of Llama 4's: the tools as JSON in a system block, calls answered as a list.
TOOLS_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}<|header_start|>system<|header_end|>\n\nCall these functions by answering only a list of calls,"
    " [name(argument=value)]:\n{% for tool in tools %}{{ tool.function | tojson }}\n{% endfor %}<|eot|>{% endif %}"
    "{%- for message in messages %}<|header_start|>{{ message.role }}<|header_end|>\n\n"
    "{%- if message.tool_calls %}{% for call in message.tool_calls %}{{ call.function | tojson }}{% endfor %}"
    "{%- else %}{{ message.content }}{% endif %}<|eot|>{% endfor %}"
    "{%- if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """(artifact, checkpoint): the REPLY model saved by transformers with a byte-level tokenizer and TOOLS_TEMPLATE."""
    torch = pytest.importorskip("torch")
    from transformers import Llama4ForCausalLM

    from llama4_export.export.tokenizer_files import write_byte_level_tokenizer
    from llama4_export.model.config import Llama4Config
    from llama4_export.pipeline import QuantOptions, export
    from llama4_export.weights import CheckpointWeights

    from .conftest import small_hf_config

    root = tmp_path_factory.mktemp("tool-model")
    checkpoint, artifact = root / "checkpoint", root / "artifact"
    hf_config = small_hf_config(vocab_size=272, num_hidden_layers=1, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(hf_config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                parameter.zero_()
        embeddings, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        chain = [ord("\n"), *map(ord, REPLY), hf_config.eos_token_id]
        for token, following in zip(chain, chain[1:]):
            head[following] = embeddings[token]
    model.save_pretrained(checkpoint)
    write_byte_level_tokenizer(Llama4Config.from_hf_dict(hf_config.to_dict()), checkpoint)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}))
    export(artifact, CheckpointWeights(checkpoint), "fp32", quant=QuantOptions(report=False), show_progress=False)
    return artifact, checkpoint


@pytest.fixture(scope="module")
def served(tool_model):
    openai = pytest.importorskip("openai", reason="the serve extra is not installed (pip install .[serve])")
    from .conftest import llama4_serve

    with llama4_serve(tool_model[0], "--max-batch", "1", "--threads", "1", "--model-name", "tools") as (base, _):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_prompt_with_tools_is_transformers_and_the_model_replies_a_call(tool_model):
    from transformers import AutoTokenizer

    from llama4_export.runtime import Generator
    from llama4_export.serving.protocol import ChatCompletionRequest, parse

    artifact, checkpoint = tool_model
    generator = Generator.load(artifact, threads=1)
    expected = AutoTokenizer.from_pretrained(checkpoint).apply_chat_template(
        CHAT, tools=NOW, add_generation_prompt=True, tokenize=True, return_dict=False)
    body = json.dumps({"model": "tools", "messages": CHAT, "tools": NOW}).encode()
    assert parse(ChatCompletionRequest, body).engine_request(generator, None).prompt_ids == list(expected)
    assert generator.chat(CHAT, 32, tools=NOW).text == REPLY  # the model's reply, before any parsing


def test_the_server_returns_the_reply_as_tool_calls(served):
    response = served.chat.completions.create(model="tools", messages=CHAT, tools=NOW, max_tokens=32)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "now" and json.loads(call.function.arguments) == {"tz": 0}

    chunks = list(served.chat.completions.create(model="tools", messages=CHAT, tools=NOW, max_tokens=32, stream=True))
    calls = [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("now", {"tz": 0})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


def test_without_the_tool_offered_the_reply_is_content(served):
    for options in ({}, {"tools": NOW, "tool_choice": "none"}, {"tools": [
            {"type": "function", "function": {"name": "later", "parameters": {"type": "object"}}}]}):
        choice = served.chat.completions.create(model="tools", messages=CHAT, max_tokens=32, **options).choices[0]
        assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (REPLY, None, "stop")


def test_a_reply_that_cannot_become_a_call_streams_as_it_comes(served):
    """With tools offered, a reply of "[" tokens (forced by logit_bias) came as one chunk at its end."""
    chunks = list(served.chat.completions.create(model="tools", messages=CHAT, tools=NOW, max_tokens=10, stream=True,
                                                 logit_bias={str(ord("[")): 100}))
    contents = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices[0].delta.content]
    assert "".join(contents) == "[" * 10 and len(contents) >= 9, contents
