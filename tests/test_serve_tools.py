"""Tool calls in a reply, parsed back into OpenAI's tool_calls: Llama 4's Python-call and JSON forms; anything else
(prose, unknown tools, positional or non-literal arguments, malformed text) stays content."""

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
])
def test_anything_else_is_content(reply):
    assert parse_tool_calls(reply, TOOLS) is None


def test_a_reply_is_held_back_only_while_it_may_still_be_a_call():
    assert may_be_tool_call("") and may_be_tool_call("  [get_") and may_be_tool_call("<|python")
    assert not may_be_tool_call("Sure, ")
