"""The OpenAI wire format this server speaks, validated in one place: request bodies (a field that is unknown,
mistyped, out of range or not implemented gets a 400 naming it), OpenAI-style error bodies, and the engine request
a body becomes.

Sampling defaults differ from OpenAI's in one way: temperature defaults to 0 (greedy, deterministic) rather than 1.
max_tokens defaults to 16 for completions (as OpenAI's) and to the rest of the context for chat. n choices are n
sequences of the engine; choice i samples with seed + i, so each is reproducible on its own; a request without a seed
gets one drawn by the server (ServeSettings.seed), so repeated requests sample differently, as OpenAI's do. A
completion's prompt may be a batch (a list of texts or of token-id lists): n choices each, indexed prompt × n + i.
echo with logprobs scores the prompt (its sequences prefill alone, every position's logits kept).
Extensions beyond OpenAI's fields: top_k, repetition_penalty and ignore_eos (as vLLM and llama-server accept them).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..runtime.batching import SequenceRequest
from ..runtime.errors import GenerationError, ImageError, ImageTooLarge
from ..runtime.generator import Generator
from ..runtime.sampling import SamplingParams
from .tools import ParsedCall, parse_tool_calls

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
MAX_CHOICES = 128  # OpenAI's bound on n; the engine's rows + queue places bound it further


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    # Unknown fields are refused (never silently ignored); JSON types are taken as they are ("10" is not a number).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # NaN: was "less than or equal to 2"

    @model_validator(mode="before")
    @classmethod
    def _null_means_not_given(cls, data: Any) -> Any:
        # OpenAI's API takes null for an optional field as "not given" (clients send "temperature": null): the default
        # applies; a required field sent as null is missing; an unknown one is still refused, null or not
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """Fields both endpoints share. ONLY: fields accepted with these values alone (others are not implemented)."""

    ONLY: ClassVar[dict[str, tuple]] = {}  # each endpoint's own

    model: str
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)  # 0 (OpenAI accepts it): the most likely token alone
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False  # extension (vLLM, llama-server): generate max_tokens whatever the model says
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # OpenAI's int64; the sampler's seeds are taken mod 2^64
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI's) → bias in [-100, 100]
    user: str | None = None  # the caller's end-user id: metadata, nothing to do

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"stop: {len(stops)} stop strings; give at most {MAX_STOP_STRINGS}", "stop")
        if any(not s for s in stops):
            raise APIError(400, "stop: stop strings must not be empty", "stop")
        return tuple(stops)

    def sampling(self) -> SamplingParams:
        top_k, top_p = (1, 1.0) if self.top_p == 0 else (max(self.top_k, 0), self.top_p)
        return SamplingParams(temperature=self.temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=self.repetition_penalty, seed=self.seed or 0,
                              frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                              logit_bias=self._logit_bias())

    def _logit_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not re.fullmatch(r"[0-9]+", key):
                raise APIError(400, f"logit_bias: key {key!r} is not a token id; key the biases by token ids",
                               "logit_bias")
            bias[int(key)] = value
        return bias

    prompt_count: ClassVar[int] = 1

    def choices(self, requests: list[SequenceRequest]) -> list[SequenceRequest]:
        """The engine requests of every prompt's n choices, prompt by prompt (OpenAI's choice index: prompt × n + i);
        choice i samples with seed + i."""
        return [dataclasses.replace(r, sampling=dataclasses.replace(r.sampling, seed=r.sampling.seed + i))
                for r in requests for i in range(self.n)]

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Generation):
    ONLY = {"suffix": (None,), "best_of": (None, 1)}

    # one prompt (text or token ids), or a batch of them, each answered by its own n choices
    prompt: (str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)])
    max_tokens: int = Field(16, ge=0)  # 0: with echo, score the prompt only
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # the prompt before the completion, and with logprobs its tokens' log-probabilities
    suffix: str | None = None
    best_of: int | None = None

    @property
    def prompts(self) -> list[str | list[int]]:
        single = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if single else list(self.prompt)

    @property
    def prompt_count(self) -> int:
        return len(self.prompts)

    def engine_requests(self, generator: Generator, timeout: float | None, max_image_pixels: int | None = None,
                        max_images: int | None = None) -> list[SequenceRequest]:
        """max_image_pixels, max_images: as for ChatCompletionRequest (a completion's prompts have no images)."""
        if self.best_of is not None and self.best_of < self.n:  # best_of candidates, the n best returned
            raise APIError(400, f"best_of={self.best_of}: must be at least n={self.n}; leave best_of out", "best_of")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0: only with echo: true (the prompt scored, nothing generated); ask for at "
                                "least 1 token", "max_tokens")
        # max_tokens 0 echoes the prompt alone (as OpenAI's legacy API): the engine then prefills it to score it,
        # the scores reported only when logprobs asks for them
        scored = (0 if self.max_tokens == 0 and self.logprobs is None else self.logprobs) if self.echo else None
        prompts = self.prompts
        requests = []
        for k, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{k}]"
            try:
                prompt_ids = generator.encode(prompt)
            except GenerationError as exc:
                raise APIError(400, f"{param}: {exc}", param) from None
            request = _sequence_request(self, generator, prompt_ids, param, self.max_tokens, self.logprobs, timeout)
            requests.append(dataclasses.replace(request, prompt_logprobs=scored))
        return requests

    def echoed(self, generator: Generator, k: int) -> str:
        """Prompt k as echo shows it: the text given, or its token ids decoded (nothing without a tokenizer)."""
        prompt = self.prompts[k]
        if isinstance(prompt, str):
            return prompt
        return generator.tokenizer.decode(prompt, skip_special_tokens=False) if generator.tokenizer else ""


class TextPart(_Body):
    type: Literal["text"]
    text: str


class RefusalPart(_Body):  # an assistant's refusal, as OpenAI's client sends it back: its text
    type: Literal["refusal"]
    refusal: str


class ImageURL(_Body):
    url: str  # a data URL (the server fetches nothing)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; Llama 4 tiles every image the same way


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart | RefusalPart, Field(discriminator="type")]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # An assistant message as this server's answer reads once a client dumps it back into the conversation
    # (`message.model_dump()`): its refusal is its text; no audio, no legacy function_call, no annotations.
    refusal: str | None = None
    audio: None = None
    function_call: None = None
    annotations: Annotated[list[Any], Field(max_length=0)] | None = None


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class ResponseFormat(_Body):
    type: str


class ChatCompletionRequest(_Generation):
    ONLY = {"tool_choice": (None, "auto", "none"), "response_format": (None, ResponseFormat(type="text"))}

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        """The conversation as Generator.chat_inputs takes it: the parts of a message with images as they are, other
        messages' text parts joined, tool-call arguments as objects."""
        messages = []
        call_ids: set[str] = set()  # of the assistant messages so far: what a tool message may answer
        for i, m in enumerate(self.messages):
            if m.role == "tool" and m.tool_call_id not in call_ids:
                answered = "answers no tool call of an earlier assistant message" if m.tool_call_id else "is missing"
                raise APIError(400, f"messages[{i}].tool_call_id: {answered}; a tool message gives the id of the "
                                    "assistant's tool call it answers", f"messages[{i}].tool_call_id")
            call_ids.update(c.id for c in m.tool_calls or ())
            if isinstance(m.content, list) and m.role != "assistant" and \
                    any(isinstance(part, RefusalPart) for part in m.content):
                raise APIError(400, f"messages[{i}].content: a refusal part belongs to an assistant message",
                               f"messages[{i}].content")
            if m.content is None and (m.role != "assistant" or not m.tool_calls and m.refusal is None):
                needs = "content or tool_calls" if m.role == "assistant" else "content"
                raise APIError(400, f"messages[{i}].content: a{'n' if m.role == 'assistant' else ''} {m.role} message "
                                    f"needs its {needs}", f"messages[{i}].content")
            if isinstance(m.content, list) and any(isinstance(part, ImagePart) for part in m.content):
                content: Any = [part.model_dump(exclude_none=True) for part in m.content]
            elif isinstance(m.content, list):
                content = "".join(part.refusal if isinstance(part, RefusalPart) else part.text for part in m.content)
            else:
                content = m.content or m.refusal or ""
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.name is not None:
                message["name"] = m.name
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments, f"messages[{i}].tool_calls[{k}]")}}
                    for k, c in enumerate(m.tool_calls)]
            messages.append(message)
        return messages

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools for the template, or None when there are none or tool_choice is "none"."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def tool_names(self) -> set[str]:
        """The names of the tools the template is given (none with tool_choice "none")."""
        return {t["function"]["name"] for t in self.template_tools() or []}

    def tool_calls(self, reply: str) -> list[ParsedCall] | None:
        """The calls of offered tools a reply consists of, or None (it is content). parallel_tool_calls false keeps the
        first alone: OpenAI's answer then holds at most one call, and the model may still write several."""
        calls = parse_tool_calls(reply, self.tool_names())
        return calls[:1] if calls and not self.parallel_tool_calls else calls

    def engine_request(self, generator: Generator, timeout: float | None, max_image_pixels: int | None = None,
                       max_images: int | None = None) -> SequenceRequest:
        """The conversation through the checkpoint's chat template (with the tools, if any). max_image_pixels: an image
        of more pixels is a 400 before it is decoded (None: the generator's limit); max_images: a conversation with
        more images is a 400 before any is decoded (None: no limit)."""
        for name in ("tool_choice", "parallel_tool_calls"):  # as OpenAI's: about tools, so none without them
            if name in self.model_fields_set and not self.tools:
                raise APIError(400, f"{name}: only allowed with tools; give tools or leave {name} out", name)
        given_both = self.max_tokens is not None and self.max_completion_tokens is not None
        if given_both and self.max_tokens != self.max_completion_tokens:  # one would be ignored
            raise APIError(400, f"max_tokens={self.max_tokens} disagrees with max_completion_tokens="
                                f"{self.max_completion_tokens}: give max_completion_tokens alone (max_tokens is its "
                                "deprecated name)", "max_tokens")
        images = sum(isinstance(part, ImagePart) for m in self.messages if isinstance(m.content, list)
                     for part in m.content)
        if max_images is not None and images > max_images:
            raise APIError(400, f"messages: {images} images, over this server's limit of {max_images} per request "
                                "(llama4-serve --max-images); send fewer, or raise llama4-serve --max-images",
                           "messages", code="too_many_images")
        tools = self.template_tools()
        try:
            prompt_ids, features = generator.chat_inputs(self.template_messages(), tools, max_image_pixels)
        except ImageTooLarge as exc:  # the flag that raises it, not the Python parameter
            raise APIError(400, exc.saying("llama4-serve --max-image-pixels"), "messages",
                           code="image_too_large") from None
        except ImageError as exc:
            raise APIError(400, str(exc), "messages") from None
        except GenerationError as exc:
            raise APIError(400, str(exc), "tools" if tools else "messages") from None
        limit_param = "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"
        request = _sequence_request(self, generator, prompt_ids, "messages", getattr(self, limit_param), self.top,
                                    timeout, limit_param)
        return request if features is None else dataclasses.replace(request, image_features=features)

    def engine_requests(self, generator: Generator, timeout: float | None, max_image_pixels: int | None = None,
                        max_images: int | None = None) -> list[SequenceRequest]:
        return [self.engine_request(generator, timeout, max_image_pixels, max_images)]

    @property
    def top(self) -> int | None:
        """Top log-probabilities per token, None when logprobs are off."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


def invalid(exc: GenerationError) -> APIError:
    """A 400 for what the runtime refused; its messages start with the field they are about ("top_p=0: …")."""
    field = re.match(r"([a-z_]+)[=:]", str(exc))
    return APIError(400, str(exc), field.group(1) if field else None)


def _arguments(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"{param}.function.arguments: not valid JSON ({exc})", param) from None


def parse(model: type[_Generation], raw: bytes) -> _Generation:
    """Validate a request body; a problem becomes a 400 naming its field (the most specific one of a union's)."""
    # a UTF-8 byte-order mark (Windows PowerShell 5.1's UTF8 encoding, some editors' saved bodies) was "not valid JSON";
    # RFC 8259 §8.1 lets a parser ignore it
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        body = model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise _first_problem(exc, raw) from None
    if body.stream_options is not None and not body.stream:  # as OpenAI: the options of a stream that is not one
        raise APIError(400, "stream_options: only with stream: true; drop it or stream", "stream_options")
    for name, allowed in body.ONLY.items():
        value = getattr(body, name)
        if value not in allowed:
            shown = value.model_dump() if isinstance(value, BaseModel) else value
            raise APIError(400, f"{name}={json.dumps(shown)} is not supported by this server", name,
                           code="unsupported_parameter")
    return body


def _first_problem(exc: ValidationError, raw: bytes) -> APIError:
    # A union lists every branch's complaint; the deepest is the one about what the client meant
    # (a content part without its url, not "content: should be a valid string").
    errors = exc.errors(include_url=False)
    error = max(errors, key=lambda e: len(e["loc"]))
    if error["type"] == "json_invalid":
        if "hex escape" in error["msg"] and _SURROGATE_ESCAPE.search(raw):  # the parser's words suggest a cut-off escape
            at = error["msg"].find(" at line ")
            where = error["msg"][at:] if at >= 0 else ""
            return APIError(400, f"the request body holds a \\uD800-\\uDFFF escape outside a surrogate pair{where}: it is "
                                 "not a character; send the text as UTF-8, or the pair's two escapes")
        return APIError(400, f"the request body is not valid JSON: {error['msg']}")
    if error["type"] == "model_type" and not error["loc"]:
        return APIError(400, "the request body must be a JSON object")
    param = _field_name(error["loc"])
    if error["type"] == "extra_forbidden":
        return APIError(400, f"{param}: this server does not implement the parameter '{param}'", param,
                        code="unsupported_parameter")
    if error["type"] == "missing":
        return APIError(400, f"{param}: this field is required", param)
    if error["loc"][0] == "prompt":  # the first branch's complaint ("not a valid string") would mislead
        return APIError(400, "prompt: give a string, a list of token ids, a list of strings or a list of token-id "
                             "lists (none of them empty)", "prompt")
    if error["type"] == "union_tag_invalid":
        return APIError(400, f"{param}: type '{error['ctx']['tag']}' is not supported; a part's type is one of "
                             f"{error['ctx']['expected_tags']}", param)
    if error["type"] == "union_tag_not_found":
        return APIError(400, f"{param}: needs its {error['ctx']['discriminator']} field", param)
    if param.endswith("].content") and error["type"] in ("string_type", "list_type"):
        return APIError(400, f"{param}: give a string or a list of content parts", param)
    return APIError(400, f"{param}: {error['msg']}", param)


def _field_name(loc: tuple[int | str, ...]) -> str:
    """messages[0].content[1].image_url.url from pydantic's location, less its union branch names (str, list[int],
    function-after[...]) and a tagged union's tag, which are noise in the field's name."""
    names = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            names.append(f"[{part}]")
            continue
        # a branch's name is a type ("str", "list[int]", "function-after[...]"); a field's is an identifier
        is_branch = part in ("str", "int", "float", "bool") or "[" in part or "-" in part
        is_tag = i >= 2 and isinstance(loc[i - 1], int) and str(loc[i - 2]).startswith("list[tagged-union")
        if not (is_branch or is_tag):
            names.append(f".{part}")
    return "".join(names).lstrip(".")


def _sequence_request(body: _Generation, generator: Generator, prompt_ids: list[int], prompt_param: str,
                      max_tokens: int | None, logprobs: int | None, timeout: float | None,
                      limit_param: str = "max_tokens") -> SequenceRequest:
    """The engine's request: max_tokens defaults to the rest of the context; prompt + max_tokens must fit it.
    limit_param: the field the client gave max_tokens in (chat's max_completion_tokens)."""
    context = generator.config.max_position_embeddings
    # a prompt only scored (echo, max_tokens 0) may fill the context; one to continue needs room for a token
    if len(prompt_ids) > context or len(prompt_ids) == context and max_tokens != 0:
        raise APIError(400, f"{prompt_param}: {len(prompt_ids)} tokens, the model's context is {context} tokens; "
                            "shorten it", prompt_param, code="context_length_exceeded")
    max_new_tokens = context - len(prompt_ids) if max_tokens is None else max_tokens
    if len(prompt_ids) + max_new_tokens > context:
        raise APIError(400, f"{limit_param}={max_new_tokens}: with the prompt's {len(prompt_ids)} tokens it exceeds "
                            f"the model's context of {context} tokens; lower it", limit_param,
                       code="context_length_exceeded")
    try:
        sampling = body.sampling()
    except GenerationError as exc:
        raise invalid(exc) from None
    return SequenceRequest(prompt_ids, max_new_tokens, sampling, frozenset() if body.ignore_eos else None,
                           body.stop_strings(), logprobs, timeout)
