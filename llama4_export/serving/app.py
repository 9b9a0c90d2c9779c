"""The OpenAI-compatible HTTP app over a BatchEngine (FastAPI): /v1/completions, /v1/chat/completions (non-streaming
or server-sent events ending with `data: [DONE]`), /v1/models (and /v1/models/{id}), /health, /metrics.

Every request becomes one sequence of the engine per choice (n); the engine's thread hands their events, tagged with
the choice's index, to the request's asyncio queue. Errors are OpenAI-style bodies: 400 for a bad field (named), 404
for an unknown model, 413 for a body over the server's size limit, 415 for a compressed body, 429 with Retry-After
when the engine's queue is full, 503 while shutting down, 504 past the per-request timeout. A client that goes away
cancels its sequences, which frees their rows at the engine's next step.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import hmac
import json
import logging
import math
import os
import random
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.routing import Match

from ..errors import ConfigError, is_integer
from ..runtime.batching import BatchEngine, EngineClosed, QueueFull, Sequence, SequenceEvent
from ..runtime.errors import GenerationError
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, invalid, parse
from .tools import may_be_tool_call

# OpenAI's API takes up to 50 MB of images in one request; a text prompt that long is already ~10M tokens
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
# a bigger image is refused from its header: decoding one near Pillow's own limit (179 MP: a 13000 × 13000 PNG of a
# few hundred KB) took ~1.8 GB and ~17 s of CPU, for tiles the model sees at 336 px. 52 MP passes the largest photos
# phones take (50-MP sensors' 8160 × 6144 = 50.1 MP, 48-MP iPhones' 8064 × 6048): ~0.7 GB and ~5 s of CPU each.
DEFAULT_MAX_IMAGE_PIXELS = 52_000_000
# images in one chat request: every one is decoded before the context check, so the per-image cap alone let one 400 KB
# body of six 7200 × 7200 PNGs take 30 s and 0.9 GB (a 64 MB body could carry a thousand). 5 is Meta's guidance for
# Llama 4 (what NVIDIA's NIM serves by default); each image costs up to 17 tiles of context
DEFAULT_MAX_IMAGES = 5
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    request_timeout: float | None = 600.0  # seconds from arrival to the last token; None: no limit
    api_key: str | None = None  # when set, /v1/ requests need `Authorization: Bearer <key>` (health, metrics don't)
    # a bigger body gets 413 before it is held whole: parsing and tokenizing one costs memory everyone shares
    max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES  # None: no limit
    # a request without a seed samples with the next draw of a generator seeded by this: repeated requests differ (as
    # OpenAI's do) and a server's answers are reproducible from its start, given the requests' order
    seed: int = 0
    # origins whose browser pages may call the API (CORS); none by default: which sites may is the deployment's call
    allowed_origins: tuple[str, ...] = ()
    # a chat image of more pixels gets a 400 before it is decoded; None: Pillow's decompression-bomb limit alone
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    # a chat request with more images gets a 400 before any is decoded; None: no limit
    max_images: int | None = DEFAULT_MAX_IMAGES

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not self.model_name.strip():  # "" was served as the directory's name
            raise ConfigError(f"model_name={self.model_name!r}: give the model id clients send (--model-name)")
        if self.request_timeout is not None and not 0 < self.request_timeout < math.inf:
            raise ConfigError(f"request_timeout={self.request_timeout}: must be a number of seconds > 0 "
                                  "(or None: no limit)")
        if self.max_request_bytes is not None and self.max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes={self.max_request_bytes}: must be >= 1 (or None: no limit)")
        for name, flag, unlimited in (("max_image_pixels", "--max-image-pixels", "Pillow's limit alone"),
                                      ("max_images", "--max-images", "no limit")):
            value = getattr(self, name)
            if value is not None and not (is_integer(value) and value >= 1):
                raise ConfigError(f"{name}={value!r}: must be an integer >= 1 ({flag} N), or None for {unlimited}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r}: must be an integer")
        if isinstance(self.allowed_origins, str):  # iterated, a string is its characters
            raise ConfigError(f"allowed_origins={self.allowed_origins!r}: give a tuple of origins")
        object.__setattr__(self, "allowed_origins", tuple(self.allowed_origins))
        for origin in self.allowed_origins:
            _check_origin(origin)

    def __repr__(self) -> str:  # never the key, in a log or a traceback
        return (f"ServeSettings(model_name={self.model_name!r}, request_timeout={self.request_timeout!r}, "
                f"api_key={'set' if self.api_key else None}, max_request_bytes={self.max_request_bytes!r}, "
                f"seed={self.seed!r}, allowed_origins={self.allowed_origins!r}, "
                f"max_image_pixels={self.max_image_pixels!r}, max_images={self.max_images!r})")


def _check_origin(origin: str) -> None:
    """An origin as browsers send it (`Origin: https://app.example:8443`): one given with a path or a trailing slash
    would silently match no request."""
    if origin != "*" and not _is_origin(origin):
        raise ConfigError(f"allowed origin {origin!r}: give '*' or scheme://host[:port] with no path, as a browser "
                          "sends it in Origin (e.g. http://localhost:3000) (--allow-origin)")


def _is_origin(text: str) -> bool:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises on a port that is not a number in 0..65535
    except (TypeError, ValueError, AttributeError):
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.path and not parts.query
            and not parts.fragment and parts.username is None)


class _Run:
    """One request's sequences, one per choice: the engine's events arrive on an asyncio queue as (choice, event);
    metrics are recorded as they pass."""

    def __init__(self, engine: BatchEngine, metrics: ServerMetrics, prompt_lengths: list[int], n: int, arrival: float):
        self.engine, self.metrics, self.prompt_lengths, self.n = engine, metrics, prompt_lengths, n
        self.choices = len(prompt_lengths) * n  # prompt k's choice i is choice k × n + i
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, SequenceEvent]] = asyncio.Queue()
        self.arrival = arrival  # before its prompts were tokenized and its images encoded: part of its wait
        self.last_token: list[float | None] = [None] * self.choices
        self.sequences: list[Sequence] = []
        self.open = set(range(self.choices))  # choices whose last event has not arrived
        self.completion_tokens = 0

    def listener(self, choice: int) -> Callable[[SequenceEvent], None]:
        def on_event(event: SequenceEvent) -> None:  # on the engine's thread
            if event.token_id is not None:
                self.completion_tokens += 1
                self.last_token[choice] = self.metrics.token(self.arrival, self.last_token[choice])
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (choice, event))
        return on_event

    @property
    def finished(self) -> bool:
        return not self.open

    def received(self, choice: int, event: SequenceEvent) -> None:
        if event.finish_reason is not None:
            self.open.discard(choice)

    async def events(self) -> AsyncIterator[tuple[int, SequenceEvent]]:
        while self.open:
            choice, event = await self.queue.get()
            self.received(choice, event)
            yield choice, event

    def cancel(self, choice: int | None = None) -> None:
        """Cancel one choice's sequence, or every unfinished one."""
        for i in self.open if choice is None else {choice} & self.open:
            if i < len(self.sequences):
                self.engine.cancel(self.sequences[i])


def bare_app(settings: ServeSettings, **kwargs) -> FastAPI:
    """A FastAPI app without routes, with what every answer of llama4-serve passes through: X-Served-By and CORS."""
    # outermost: the key's 401, a CORS preflight and a bug's 500 (answered within) say who answered too
    outside = [Middleware(_ServedBy, value=f"{socket.gethostname()}/{os.getpid()}")]
    if settings.allowed_origins:  # outside the key check: a preflight needs no key
        outside.append(Middleware(_Cors, allow_origins=list(settings.allowed_origins), allow_headers=["*"],
                                  allow_methods=["GET", "HEAD", "POST"], expose_headers=["Retry-After", "X-Served-By"]))
    return _App(outside, title="llama4-serve", docs_url=None, redoc_url=None, openapi_url=None, **kwargs)


def health_response(settings: ServeSettings, status: str, running: int | None, queued: int | None,
                    **more) -> JSONResponse:
    """/health's answer, 200 for status "ok" and 503 otherwise: the fields every llama4-serve gives, then `more`."""
    return JSONResponse({"status": status, "model": settings.model_name, "running": running, "queued": queued,
                         "pid": os.getpid(), **more}, status_code=200 if status == "ok" else 503)


def create_app(engine: BatchEngine, settings: ServeSettings) -> FastAPI:
    """The app; its lifespan starts the engine's thread and stops it (cancelling what still runs) at shutdown."""
    metrics = ServerMetrics(engine)
    generator = engine.generator
    created = int(time.time())
    durations = _Durations()
    request_seeds = random.Random(settings.seed)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = bare_app(settings, lifespan=lifespan)
    app.state.metrics = metrics  # each Ray replica reports its registry to the /metrics application

    def route_of(request: Request) -> str:
        """The metrics label of a request: its route's path template, "other" when no route takes it — a label from
        the client's own path would add a time series for every path a scanner tries."""
        route = request.scope.get("route") or next(
            (r for r in app.routes if r.matches(request.scope)[0] != Match.NONE), None)
        return getattr(route, "path", "other")

    def answer(request: Request, error: APIError) -> JSONResponse:
        metrics.requests.labels(route_of(request), str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    if settings.api_key:
        expected = f"Bearer {settings.api_key}".encode()

        @app.middleware("http")
        async def authorize(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if request.url.path.startswith("/v1/") and not hmac.compare_digest(given, expected):
                return answer(request, APIError(
                    401, "a missing or wrong API key: send the server's key as `Authorization: Bearer <key>`",
                    code="invalid_api_key"))
            return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return answer(request, APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        type=kind, headers=exc.headers))  # a 405's Allow (HTTP requires it)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer and uvicorn then closes the connection: a client reusing it would fail
        return answer(request, _internal_error(exc, headers={"Connection": "close"}))

    def too_large(size: int | None) -> APIError:
        told = f"{size} bytes, over" if size is not None else "longer than"
        return APIError(413, f"the request body is {told} this server's limit of {settings.max_request_bytes} bytes "
                             "(llama4-serve --max-request-bytes); send smaller images or a shorter prompt",
                        code="request_too_large")

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) once it passes the limit: at once by its Content-Length, else (chunked) as it
        arrives — never held whole first. A compressed body is refused (415) rather than parsed as broken JSON; one
        still arriving at the per-request timeout gets 408 (a client trickling bytes held a connection for ever)."""
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise APIError(415, f"Content-Encoding {encoding!r}: this server reads uncompressed request bodies only; "
                                "send the body without Content-Encoding", code="unsupported_content_encoding")
        try:
            async with asyncio.timeout(settings.request_timeout):
                return await limited_body(request)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within the server's per-request timeout of "
                                f"{settings.request_timeout:g} s", type="timeout_error", code="request_timeout") from None

    async def limited_body(request: Request) -> bytes:
        limit = settings.max_request_bytes
        if limit is None:
            return await request.body()
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared))
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > limit:
                raise too_large(None)
        return bytes(received)

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{settings.model_name}'",
                           "model", type="not_found_error", code="model_not_found")

    async def start(body: CompletionRequest | ChatCompletionRequest) -> _Run:
        arrival = time.monotonic()
        if body.n * body.prompt_count > engine.capacity:  # before the prompts' encoding (and their images') is spent on them
            asked = f"n={body.n}" if body.prompt_count == 1 else f"n={body.n} × {body.prompt_count} prompts"
            raise APIError(400, f"{asked}: more choices than this server's {engine.max_batch} rows + "
                                f"{engine.max_queue} queue places can hold; ask for at most {engine.capacity}",
                           "n" if body.prompt_count == 1 else "prompt")
        if body.seed is None:
            body = body.model_copy(update={"seed": request_seeds.randrange(2**31)})
        # off the event loop: a chat's images are decoded and run through the vision graph here
        requests = await asyncio.to_thread(body.engine_requests, generator, settings.request_timeout,
                                           settings.max_image_pixels, settings.max_images)
        run = _Run(engine, metrics, [len(r.prompt_ids) for r in requests], body.n, arrival)
        try:
            run.sequences = engine.submit_all([(r, run.listener(i)) for i, r in enumerate(body.choices(requests))])
        except QueueFull as exc:
            retry = durations.retry_after(engine)
            raise APIError(429, f"{exc}; retry in {retry} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(retry)}) from None
        except EngineClosed as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from None
        except GenerationError as exc:
            raise invalid(exc) from None
        metrics.prompt_tokens.inc(sum(run.prompt_lengths))  # as usage counts them: once, whatever n
        return run

    async def collect(request: Request, run: _Run) -> list[list[SequenceEvent]]:
        """Every event of a non-streaming request, per choice; cancels the sequences when the client goes away."""
        events: list[list[SequenceEvent]] = [[] for _ in range(run.choices)]
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while not run.finished:
                try:
                    choice, event = await asyncio.wait_for(run.queue.get(), DISCONNECT_POLL_S)
                    run.received(choice, event)
                    events[choice].append(event)
                except TimeoutError:
                    pass
                # by the clock, not only when tokens pause: a client gone while they flow would hold its rows
                if time.monotonic() >= next_check:
                    if await request.is_disconnected():  # nothing to answer: counted as nginx's 499
                        raise APIError(499, "the client closed the request", code="client_closed_request")
                    next_check = time.monotonic() + DISCONNECT_POLL_S
        except asyncio.CancelledError:  # Ray Serve cancels a replica's handler when its client goes away: a 499 too
            metrics.requests.labels(route_of(request), "499").inc()
            raise
        finally:
            run.cancel()
        for choice in events:
            _raise_unfinished(choice[-1] if choice else None, settings)
        durations.add(time.monotonic() - run.arrival)
        return events

    # --- routes --------------------------------------------------------------------------------------------
    def get(path: str):
        """A GET route that answers HEAD too, as HTTP asks of every GET resource (monitors probe /health so); its
        answers count in /metrics as the API's do (its errors are counted where they are answered)."""
        def route(handler):
            @functools.wraps(handler)  # FastAPI reads the handler's parameters through it
            async def counted(*args, **kwargs):
                response = await handler(*args, **kwargs)
                metrics.requests.labels(path, str(getattr(response, "status_code", 200))).inc()
                return response
            return app.api_route(path, methods=["GET", "HEAD"])(counted)
        return route

    @get("/health")
    async def health() -> JSONResponse:
        return health_response(settings, "shutting down" if engine.closed else "ok", engine.running, engine.queue_depth)

    @get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "llama4-export",
            "max_model_len": generator.config.max_position_embeddings}

    @get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @get("/v1/models/{name:path}")  # a path: model ids may hold slashes ("meta-llama/Llama-4-Scout-…")
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return card

    def _head(body: CompletionRequest | ChatCompletionRequest, prefix: str, kind: str) -> dict[str, Any]:
        """The fields every chunk (or the response) of a request starts with; a stream asked for its usage carries
        usage: null until its last chunk, as OpenAI's does."""
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": settings.model_name, **({"usage": None} if body.stream and body.include_usage else {})}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = parse(CompletionRequest, await read_body(request))
        check_model(body.model)
        run = await start(body)
        head = _head(body, "cmpl", "text_completion")
        def prompt_text(choice: int) -> str:
            return body.echoed(generator, choice // body.n)

        tokens = _TokenText(generator, prompt_text)
        if body.stream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                echoed: set[int] = set()
                async for choice, event in run.events():
                    _raise_unfinished(event, settings)
                    if body.echo and choice not in echoed:  # the prompt first (scored once its prefill is done)
                        echoed.add(choice)
                        scores = tokens.completion_logprobs(choice, [], run.sequences[choice]) \
                            if body.logprobs is not None else None
                        yield {**head, "choices": [{"index": choice, "text": prompt_text(choice), "logprobs": scores,
                                                    "finish_reason": None}]}
                    logprobs = tokens.completion_logprobs(choice, [event]) if body.logprobs is not None else None
                    if event.token_id is not None or event.finish_reason:  # a chunk per token, as llama-server
                        yield {**head, "choices": [{"index": choice, "text": event.text or "", "logprobs": logprobs,
                                                    "finish_reason": event.finish_reason}]}
                if body.include_usage:
                    yield {**head, "choices": [], "usage": _usage(run)}
            return _sse(chunks(), run, metrics, "/v1/completions")
        choices = await collect(request, run)
        metrics.requests.labels("/v1/completions", "200").inc()

        def choice(i: int, events: list[SequenceEvent]) -> dict[str, Any]:
            scored = run.sequences[i] if body.echo else None  # its prompt tokens and their log-probabilities
            return {"index": i, "text": (prompt_text(i) if body.echo else "") + "".join(e.text or "" for e in events),
                    "logprobs": tokens.completion_logprobs(i, events, scored) if body.logprobs is not None else None,
                    "finish_reason": events[-1].finish_reason}

        return JSONResponse({**head, "choices": [choice(i, events) for i, events in enumerate(choices)],
                             "usage": _usage(run)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = parse(ChatCompletionRequest, await read_body(request))
        check_model(body.model)
        run = await start(body)
        top = body.top
        tool_names = body.tool_names()
        head = _head(body, "chatcmpl", "chat.completion.chunk")
        tokens = _TokenText(generator)
        if body.stream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                def chunk(choice: int, delta: dict[str, Any], finish: str | None = None, logprobs=None) -> dict[str, Any]:
                    return {**head, "choices": [{"index": choice, "delta": delta, "logprobs": logprobs,
                                                 "finish_reason": finish}]}

                for choice in range(body.n):
                    yield chunk(choice, {"role": "assistant", "content": ""})
                held: list[list[SequenceEvent]] = [[] for _ in range(body.n)]  # a possible tool call waits for its end
                talking: set[int] = set()  # choices whose reply has begun as content: a call is a whole reply
                answered: set[int] = set()  # choices that ended with their tool calls
                # scored tokens not sent yet: a token holding part of a character (or of a possible tool call) adds no
                # text, so its log-probability goes with the next chunk
                unsent: list[list[SequenceEvent]] = [[] for _ in range(body.n)]

                def scores(choice: int) -> dict[str, Any] | None:
                    if not unsent[choice]:
                        return None
                    logprobs, unsent[choice] = tokens.chat_logprobs(unsent[choice]), []
                    return logprobs

                async for choice, event in run.events():
                    if choice in answered:
                        continue  # its sequence was cancelled once its tool calls were complete
                    _raise_unfinished(event, settings)
                    if top is not None and event.logprobs is not None:
                        unsent[choice].append(event)
                    if tool_names and choice not in talking and (held[choice] or may_be_tool_call(event.text or "")):
                        held[choice].append(event)
                        if not may_be_tool_call("".join(e.text or "" for e in held[choice])):
                            event, held[choice] = _merge(held[choice]), []
                        elif event.finish_reason is None:
                            continue
                        else:
                            event, held[choice] = _merge(held[choice]), []
                            calls = body.tool_calls(event.text or "")
                            if calls:
                                yield chunk(choice, {"tool_calls": [{"index": i, **c.openai()}
                                                                    for i, c in enumerate(calls)]},
                                            logprobs=scores(choice))
                                yield chunk(choice, {}, "tool_calls")
                                answered.add(choice)
                                run.cancel(choice)
                                continue
                    if event.text:
                        talking.add(choice)
                        yield chunk(choice, {"content": event.text}, logprobs=scores(choice))
                    if event.finish_reason:
                        yield chunk(choice, {}, event.finish_reason, logprobs=scores(choice))
                if body.include_usage:
                    yield {**head, "choices": [], "usage": _usage(run)}
            return _sse(chunks(), run, metrics, "/v1/chat/completions")
        choices = await collect(request, run)
        metrics.requests.labels("/v1/chat/completions", "200").inc()

        def reply(index: int, events: list[SequenceEvent]) -> dict[str, Any]:
            text = "".join(e.text or "" for e in events)
            calls = body.tool_calls(text) if tool_names else None
            message: dict[str, Any] = {"role": "assistant", "content": None if calls else text}
            if calls:
                message["tool_calls"] = [c.openai() for c in calls]
            return {"index": index, "message": message,
                    "logprobs": tokens.chat_logprobs(events) if top is not None else None,
                    "finish_reason": "tool_calls" if calls else events[-1].finish_reason}

        return JSONResponse({**head, "object": "chat.completion", "choices": [reply(i, events) for i, events in
                                                                              enumerate(choices)], "usage": _usage(run)})

    return app


class _App(FastAPI):
    """FastAPI with `outside` (outermost first) around its whole stack: Starlette's ServerErrorMiddleware, which sends
    the catch-all handler's 500, sits outside every add_middleware one, so that 500 lacked their headers."""

    def __init__(self, outside: list[Middleware], **kwargs):
        super().__init__(**kwargs)
        self.outside = outside

    def build_middleware_stack(self):
        app = super().build_middleware_stack()
        for cls, args, kwargs in reversed(self.outside):
            app = cls(app, *args, **kwargs)
        return app


class _Cors(CORSMiddleware):
    """Starlette's CORS, whose refused preflight was a plain-text "Disallowed CORS origin": now OpenAI's error body,
    naming the origin and the flag that allows it (browsers hide it from the page; curl and the console show it)."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        origin = request_headers["origin"]
        told = bytes(response.body).decode()
        if not self.is_allowed_origin(origin=origin):
            told += f": {origin!r} is not one of llama4-serve's --allow-origin origins; add it to let its pages call the API"
        error = APIError(400, f"CORS preflight refused: {told}", code="cors_preflight_refused")
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(error.body(), status_code=400, headers=headers)


class _ServedBy:
    """ASGI middleware: every response says which process answered (X-Served-By: host/pid) — behind a load balancer
    or Ray Serve's proxy, which replica served the request."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (b"x-served-by", value.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


class _Durations:
    """Recent request durations, for the Retry-After of a 429: about when a row will be free."""

    def __init__(self):
        self.mean: float | None = None

    def add(self, seconds: float) -> None:
        self.mean = seconds if self.mean is None else 0.9 * self.mean + 0.1 * seconds

    def retry_after(self, engine: BatchEngine) -> int:
        mean = self.mean or 1.0
        return max(1, math.ceil(mean * (engine.queue_depth + 1) / engine.max_batch))


class _TokenText:
    """Tokens as OpenAI's log-probabilities show them, for one request. A token that holds part of a UTF-8 character
    (byte-level BPE splits most non-Latin characters) is shown as `bytes:\\xNN…`, OpenAI's notation; chat entries
    carry every token's exact bytes (none for a special token). text_offset counts the characters before each token
    in the prompt (as echo shows it) followed by the choice's text, echoed or not, as OpenAI's does, across a
    stream's chunks; a special token the text leaves out (the <|begin_of_text|> a text prompt's encoding adds, an
    end token) takes no room."""

    def __init__(self, generator, prompt_text: Callable[[int], str] | None = None):
        self.tokenizer = generator.tokenizer
        self.prompt_text = prompt_text  # choice → its prompt as echo shows it (completions)
        self._characters: dict[int, int] = {}  # choice → characters of its text so far
        self._utf8: dict[int, codecs.IncrementalDecoder] = {}  # choice → its text's bytes so far, decoded

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id) if self.tokenizer else str(token_id).encode()

    def adds_text(self, token_id: int) -> bool:
        """Whether generated text holds the token (its decoding leaves special tokens out)."""
        return self.tokenizer is not None and not self.tokenizer.is_special(token_id)

    def piece(self, token_id: int) -> str:
        data = self.token_bytes(token_id)
        try:
            return data.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def _next_character(self, choice: int) -> int:
        """Where in the choice's text a whole character would come next (after the bytes of an unfinished one, which
        it would end as one U+FFFD)."""
        utf8 = self._utf8.get(choice)
        return self._characters.get(choice, 0) + (1 if utf8 and utf8.getstate()[0] else 0)

    def _offset(self, choice: int, shown: bytes) -> int:
        """Characters of the choice's text before the one holding the first of a token's `shown` bytes (which extend
        the text); bytes that form no character stand as U+FFFD in the text, as Python and the tokenizer decode them."""
        utf8 = self._utf8.setdefault(choice, codecs.getincrementaldecoder("utf-8")("replace"))
        before = self._characters.get(choice, 0)
        if not shown:
            return before
        first = utf8.decode(shown[:1])  # what the first byte ends: an invalid held character, and maybe its own
        held = bool(utf8.getstate()[0])  # the first byte is part of a character still incomplete
        self._characters[choice] = before + len(first) + len(utf8.decode(shown[1:]))
        return before + len(first) - (0 if held else 1)

    def completion_logprobs(self, choice: int, events: list[SequenceEvent], echoed: Sequence | None = None
                            ) -> dict[str, Any]:
        """OpenAI's logprobs of a completion; with `echoed`, its prompt's tokens first (the first one unscored), laid
        over the prompt's text."""
        entries = [] if echoed is None else [(echoed.request.prompt_ids[0], None),
                                             *((s.token_id, s) for s in echoed.prompt_logprobs)]
        first = choice not in self._characters
        prompt = self.prompt_text(choice) if self.prompt_text and (first or echoed) else ""
        if first:  # offsets index the prompt's text, then the choice's: an echoed prompt's tokens are laid over it
            self._characters[choice] = 0 if echoed else len(prompt)
        offsets = []
        for token, _ in entries:  # a special token is in the prompt's text where the text holds it next
            data = self.token_bytes(token)
            shown = self.adds_text(token) or prompt.startswith(data.decode(), self._next_character(choice))
            offsets.append(self._offset(choice, data if shown else b""))
        for event in events:
            if event.logprobs is not None:
                entries.append((event.token_id, event.logprobs))
                shown = self.adds_text(event.token_id)
                offsets.append(self._offset(choice, self.token_bytes(event.token_id) if shown else b""))
        return {"tokens": [self.piece(t) for t, _ in entries],
                "token_logprobs": [None if s is None else s.logprob for _, s in entries],
                "top_logprobs": [None if s is None else {self.piece(t): lp for t, lp in s.top} for _, s in entries],
                "text_offset": offsets}

    def chat_logprobs(self, events: list[SequenceEvent]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            # a special token (the end of turn) adds nothing to the message: no bytes (null), so theirs join to it
            return {"token": self.piece(token_id), "logprob": logprob,
                    "bytes": list(self.token_bytes(token_id)) if self.adds_text(token_id) else None}

        scored = [e for e in events if e.logprobs is not None]
        return {"content": [{**entry(e.token_id, e.logprobs.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in e.logprobs.top]} for e in scored]}


def _merge(events: list[SequenceEvent]) -> SequenceEvent:
    """Held-back events as one (text joined, the last one's token and finish reason)."""
    last = events[-1]
    return SequenceEvent(last.token_id, "".join(e.text or "" for e in events), last.logprobs, last.finish_reason)


def _usage(run: _Run) -> dict[str, Any]:
    # Each prompt counts once, as OpenAI counts it for n choices. cached_tokens: prompt tokens taken over from a row's
    # previous sequence (BatchEngine's prefix reuse), as OpenAI reports its prompt cache's: per prompt, what every one
    # of its choices' rows took over.
    n = run.n
    cached = sum(min(s.reused for s in run.sequences[k * n:(k + 1) * n]) for k in range(len(run.prompt_lengths)))
    prompt_tokens = sum(run.prompt_lengths)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": run.completion_tokens,
            "total_tokens": prompt_tokens + run.completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def _raise_unfinished(event: SequenceEvent | None, settings: ServeSettings) -> None:
    """The API error of a sequence that ended without finishing (timeout, cancel, engine error)."""
    reason = None if event is None else event.finish_reason
    if event is None or reason == "cancelled":
        raise APIError(503, "the request was cancelled (the client went away or the server is shutting down)",
                       type="server_error", code="cancelled")
    if reason == "timeout":
        raise APIError(504, f"the request did not finish within the server's per-request timeout of "
                            f"{settings.request_timeout:g} s", type="timeout_error", code="request_timeout")
    if reason == "error":
        raise APIError(500, f"generation failed: {event.error}", type="server_error")


def _internal_error(exc: Exception, headers: dict[str, str] | None = None) -> APIError:
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", headers=headers)


def _sse(chunks: AsyncIterator[dict[str, Any]], run: _Run, metrics: ServerMetrics, endpoint: str) -> StreamingResponse:
    """Server-sent events in OpenAI's format; an error after the stream started is sent as a last `error` event.
    A client that goes away cancels the sequence (the generator is closed or cancelled)."""

    async def stream() -> AsyncIterator[bytes]:
        status = "499"  # until the stream's end: a client that went away closed it (nginx's "client closed request")
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"
            status = "200"
        except APIError as exc:
            status = str(exc.status)
            yield f"data: {json.dumps(exc.body())}\n\n".encode()
        except Exception as exc:  # a bug: past the headers, the client still gets an error event, not a cut stream
            status = "500"
            logging.getLogger("uvicorn.error").exception("Exception in a stream of %s", endpoint)
            yield f"data: {json.dumps(_internal_error(exc).body())}\n\n".encode()
        finally:
            run.cancel()
            metrics.requests.labels(endpoint, status).inc()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
