"""Tool calls in a model's reply, parsed back into OpenAI's `tool_calls`.

Llama 4 answers a tool request in one of two forms, optionally between <|python_start|> and <|python_end|>:
- Python call syntax, a list of calls with keyword arguments: `[get_weather(city="Paris"), get_time(zone="CET")]`;
- JSON: `{"name": "get_weather", "parameters": {"city": "Paris"}}` (or "arguments"), or a list of such objects.
A reply is a tool call only when the whole of it (stripped) is one of these and every name is a tool the request
offered; anything else is ordinary content. Python syntax is read with `ast` (literals only), never evaluated.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

WRAPPERS = (("<|python_start|>", "<|python_end|>"),)


# What a reply's start must look like to become a call: `[name(` (Python form), `[{` or `{"` (JSON form); a prefix of
# one is still undecided
_CALL_STARTS = re.compile(r"\[\s*(\{.*|[A-Za-z_]\w*\s*(\(.*)?)?|\{\s*(\".*)?", re.DOTALL)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: dict[str, Any]  # only values JSON carries (_call)

    def openai(self) -> dict[str, Any]:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}


def may_be_tool_call(text: str) -> bool:
    """Whether a reply that begins with `text` could still turn out to be a tool call (streaming holds it back)."""
    head = text.lstrip()
    for start, _ in WRAPPERS:
        if start.startswith(head):
            return True
        if head.startswith(start):
            head = head[len(start):].lstrip()
    return not head or _CALL_STARTS.fullmatch(head) is not None


def parse_tool_calls(text: str, tool_names: set[str]) -> list[ParsedCall] | None:
    """The calls `text` consists of, or None when it is not (only) tool calls of the offered tools."""
    body = text.strip()
    for start, end in WRAPPERS:
        if body.startswith(start):
            body = body[len(start):].removesuffix(end).strip()
    calls = _python_calls(body) if body.startswith("[") else None
    if calls is None and body.startswith(("{", "[")):
        calls = _json_calls(body)
    if not calls or any(c.name not in tool_names for c in calls):
        return None
    return calls


def _python_calls(body: str) -> list[ParsedCall] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # what a model may write: anything
        return None
    if not isinstance(tree, ast.List):
        return None
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            return None
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None
        if len(arguments) != len(node.keywords):
            return None
        calls.append(_call(node.func.id, arguments))
    return calls if None not in calls else None


def _json_calls(body: str) -> list[ParsedCall] | None:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("parameters", item.get("arguments", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(_call(item["name"], arguments))
    return calls if None not in calls else None


def _call(name: str, arguments: dict[str, Any]) -> ParsedCall | None:
    """None for arguments JSON cannot carry (a set, bytes, a complex number, an infinity or a NaN): not a call."""
    try:
        json.dumps(arguments, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return ParsedCall(name, arguments)
