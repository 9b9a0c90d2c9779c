"""Continuous batching: many sequences at once, each at its own position in its own row of one KV cache, admitted
while others decode and freed the moment they end.

    with BatchEngine(Generator.load("out/scout-int4"), EngineOptions(max_batch=8)) as engine:  # start() .. stop()
        seq = engine.submit(SequenceRequest(engine.generator.encode("Hello"), max_new_tokens=32))
        print(seq.result().text)

One step (step()): requests waiting in the bounded queue take free rows (lowest first; the row is emptied for them —
unless a free row still holds at least `reuse_prefix_tokens` of the request's first prompt tokens from the sequence
that used it last, in an in-place cache: the request takes that row over, cut back to those tokens, and prefills only
the rest (a shared system prompt, a conversation's next turn); images' rows are never reused, since equal placeholder
ids hide different features); then prefill: when several newcomers' whole prompts each fit one piece (in place: the
chunk and the prefill graph's limit) and together one piece's token budget, they run together in one call, in the rows
of an empty staging cache whose rows then move into theirs (GroupQueryAttention takes a step of several tokens over
many rows only when none has past tokens); otherwise the oldest sequence still reading its prompt gets one prefill
piece in its row alone (the pieces Generator feeds: at most the backend's max_prefill_tokens, cut at chunk boundaries;
with a prefill_budget, at most that many while other rows decode), so a long prompt is spread over several steps
instead of stalling everyone's tokens. Then one decode call advances every decoding row by one token, each at its own
position (the others are padding, position −1), over rows 0..the highest decoding row (rows are taken lowest first; an
in-place cache's first rows are a view). A sequence that ends (stop token, stop string, max_new_tokens, timeout,
cancel) frees its row for the next request at once. A request with images (SequenceRequest.image_features, from
Generator.chat_inputs) hands each prefill piece the feature rows of the `<|patch|>` tokens in it, as Generator's
prefill does. Every sequence has its own sampler and seed, so its tokens do not depend on what else runs: greedy
tokens equal the same request run alone through Generator.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from ..errors import INTEGER, NONE, NUMBER, check_types, shown
from .backends import KVCacheState
from .errors import GenerationError
from .generator import Generator, check_stop_tokens
from .sampling import Sampler, SamplingParams, StopStrings, TokenLogprobs, token_logprobs
from .tokenizer import StreamDecoder

FinishReason = Literal["stop", "length", "timeout", "cancelled", "error"]
# A request reuses a free row's prompt start only from this many tokens: a row above the lowest free one widens every
# decode step (rows 0..the highest decoding one run), which a short prefix's saved prefill does not repay.
DEFAULT_REUSE_PREFIX_TOKENS = 32
_NOTHING_HELD = np.empty(0, np.int64)


class QueueFull(GenerationError):
    """The bounded queue of waiting requests is full; try again later."""


class EngineClosed(GenerationError):
    """The engine is shutting down and accepts no new requests."""


@dataclass(frozen=True)
class SequenceRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_tokens: frozenset[int] | None = None  # None: the generator's eos tokens
    stop_strings: tuple[str, ...] = ()  # generation ends before the first of these appears in the text
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely tokens'
    timeout: float | None = None  # seconds from submit() until the sequence ends with finish_reason "timeout"
    # the feature rows of the prompt's image placeholder tokens, in order (Generator.chat_inputs); None: text only
    image_features: np.ndarray | None = field(default=None, compare=False)
    # None: none; k: every prompt token's log-probability after the first (and the k most likely tokens') from the
    # prefill's logits at every position — the sequence is prefilled alone, from its first token; max_new_tokens may
    # then be 0 (score the prompt only)
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class SequenceEvent:
    token_id: int | None  # None on a last event that carries no token (timeout, cancel, error)
    text: str | None  # text this token makes final ("" while held back); None without a tokenizer
    logprobs: TokenLogprobs | None
    finish_reason: FinishReason | None = None  # set on a sequence's last event
    error: str | None = None  # with finish_reason "error"


@dataclass
class SequenceResult:
    token_ids: list[int]
    text: str | None
    finish_reason: FinishReason
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One request in the engine. Events go to `listener` (called on the engine's thread: keep it short) and are
    collected here; result() waits for the last one."""

    request: SequenceRequest
    listener: Callable[[SequenceEvent], None] | None
    stop_tokens: frozenset[int]
    sampler: Sampler
    decoder: StreamDecoder | None
    stops: StopStrings
    submitted: float = field(default_factory=time.monotonic)
    row: int | None = None
    fed: int = 0  # prompt tokens in the cache
    reused: int = 0  # of them, taken over from the row's previous sequence instead of prefilled
    pending: int | None = None  # the sampled token the next decode step feeds
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1.. (with prompt_logprobs)
    finish_reason: FinishReason | None = None
    error: str | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    def expired(self, now: float) -> bool:
        timeout = self.request.timeout
        return timeout is not None and now >= self.submitted + timeout

    def result(self, timeout: float | None = None) -> SequenceResult:
        if not self.done.wait(timeout):
            raise TimeoutError(f"the sequence did not finish within {timeout} s")
        text = "".join(self.text) if self.decoder is not None else None
        return SequenceResult(self.token_ids, text, self.finish_reason, self.error)


@dataclass(frozen=True)
class EngineOptions:
    """How a BatchEngine schedules. max_batch: sequences in the cache at once (its rows); max_queue: requests waiting
    for a row while every row is taken, beyond which submit() raises QueueFull (so at most max_batch + max_queue
    requests are held); reuse_prefix_tokens: the fewest first prompt tokens a request takes over from a free row's
    previous sequence instead of prefilling them (0: never); prefill_budget: the most prompt tokens a step feeds while
    other rows are decoding (their next token waits for it: a smaller budget smooths their streams, but newcomers join
    the batch later and throughput drops); None: the backend's max_prefill_tokens."""

    max_batch: int = 8
    max_queue: int = 64
    reuse_prefix_tokens: int = DEFAULT_REUSE_PREFIX_TOKENS
    prefill_budget: int | None = None

    def __post_init__(self):
        check_types("EngineOptions", {"max_batch": (INTEGER, "an integer"), "max_queue": (INTEGER, "an integer"),
                                      "reuse_prefix_tokens": (INTEGER, "an integer"),
                                      "prefill_budget": (INTEGER + NONE, "an integer or None")}, vars(self),
                    GenerationError)
        for name, value in (("max_batch", self.max_batch), ("max_queue", self.max_queue),
                            ("prefill_budget", self.prefill_budget)):
            if value is not None and value < 1:
                raise GenerationError(f"{name}={value}: must be >= 1")
        if self.reuse_prefix_tokens < 0:
            raise GenerationError(f"reuse_prefix_tokens={self.reuse_prefix_tokens}: must be >= 0 (0 turns reuse off)")


class BatchEngine:
    def __init__(self, generator: Generator, options: EngineOptions = EngineOptions()):
        self.generator, self.backend, self.config = generator, generator.backend, generator.config
        max_batch = self.max_batch = options.max_batch
        self.max_queue = options.max_queue
        pad = self.config.pad_token_id
        self._pad = pad if pad is not None and 0 <= pad < self.config.vocab_size else 0  # masked: any id works
        encoder = generator.image_encoder
        self._image_token = None if encoder is None else encoder.config.image_token_id
        self.cache = self.backend.make_cache(max_batch, generator.window, generator.sinks)
        # Newcomers whose prompts fit one piece are prefilled together in this empty cache of the same kind (it grows
        # only as far as one piece), then their rows move into the main cache: GroupQueryAttention runs a step of
        # several tokens over many rows only when none has past tokens.
        self._staging = (self.backend.make_cache(max_batch, generator.window, generator.sinks)
                         if self.cache.layout == "in_place" else None)
        self._one_piece = self.backend.max_prefill_tokens if self._staging is None else self._staging.piece_limit(0)
        self.prefill_budget = options.prefill_budget
        self._views: dict[int, KVCacheState] = {}  # first_rows views of the cache, by row count
        self._views_of = self.cache.reallocations  # the buffers those views are of
        self._rows: list[Sequence | None] = [None] * max_batch
        # per free row: the tokens its cache slots hold from the sequence that ended there (positions 0..)
        self._held: list[np.ndarray] = [_NOTHING_HELD] * max_batch
        self.reuse_prefix_tokens = options.reuse_prefix_tokens if self.cache.layout == "in_place" else 0
        self.reused_prompt_tokens = 0  # in all, since the engine started
        self._waiting: deque[Sequence] = deque()
        self._lock = threading.Condition()
        self._closed = False  # no new requests (draining or stopped)
        self._stopped = False
        self._thread: threading.Thread | None = None

    # --- any thread ------------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        """No new requests are accepted (draining or stopped)."""
        return self._closed

    @property
    def running(self) -> int:
        return sum(seq is not None for seq in self._rows)

    @property
    def capacity(self) -> int:
        """Sequences the engine holds at once: its rows and its queue places."""
        return self.max_batch + self.max_queue

    def check(self, request: SequenceRequest) -> None:
        """Raise GenerationError naming what the engine cannot run in `request` (before it is queued): a value of the
        wrong kind got past here and failed in the engine's step, ending every running sequence with it."""
        if not isinstance(request, SequenceRequest):
            raise GenerationError(f"{type(request).__name__}: submit a SequenceRequest")
        check_types("SequenceRequest", {  # a str prompt was tokenized here, then lost in the step
            "prompt_ids": ((list, tuple, np.ndarray), "a list of token ids"),
            "max_new_tokens": (INTEGER, "an integer"), "sampling": ((SamplingParams,), "SamplingParams"),
            "stop_tokens": ((set, frozenset, list, tuple) + NONE, "token ids, or None for the eos tokens"),
            "stop_strings": ((list, tuple), "a tuple of strings"),  # a str was split into one-character stops
            "logprobs": (INTEGER + NONE, "an integer or None"), "prompt_logprobs": (INTEGER + NONE, "an integer or None"),
            "timeout": (NUMBER + NONE, "seconds or None"), "image_features": ((np.ndarray,) + NONE, "an array or None"),
        }, vars(request), GenerationError)
        if request.stop_tokens is not None:
            check_stop_tokens(request.stop_tokens, self.config.vocab_size)
        if not all(isinstance(text, str) and text for text in request.stop_strings):
            raise GenerationError(f"stop_strings={shown(request.stop_strings)}: give non-empty strings")
        self.generator.encode(request.prompt_ids)  # non-empty, ids inside the vocabulary
        if request.max_new_tokens < (0 if request.prompt_logprobs is not None else 1):
            raise GenerationError(f"max_new_tokens={request.max_new_tokens}: must be >= 1 (0 only when scoring the "
                                  "prompt: prompt_logprobs)")
        context = self.config.max_position_embeddings
        if len(request.prompt_ids) + request.max_new_tokens > context:
            raise GenerationError(
                f"the prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) exceeds "
                f"the model's context of {context} tokens; shorten the prompt or lower max_new_tokens")
        request.sampling.check_vocabulary(self.config.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(request, name)
            if k is not None and not 0 <= k <= self.config.vocab_size:
                raise GenerationError(f"{name}={k}: must be between 0 and the vocabulary size")
        if request.timeout is not None and not request.timeout > 0:
            raise GenerationError(f"timeout={request.timeout}: must be > 0 seconds")
        if request.image_features is not None:
            placeholders = request.prompt_ids.count(self._image_token)
            if request.image_features.shape[0] != placeholders:
                raise GenerationError(f"the prompt has {placeholders} image placeholder token(s) but "
                                      f"{request.image_features.shape[0]} image feature row(s); expand it with its "
                                      "images (Generator.chat_inputs)")

    def submit(self, request: SequenceRequest, listener: Callable[[SequenceEvent], None] | None = None) -> Sequence:
        """Queue a request; raises GenerationError on bad input, QueueFull, or EngineClosed while shutting down."""
        return self.submit_all([(request, listener)])[0]

    def submit_all(self, requests: list[tuple[SequenceRequest, Callable[[SequenceEvent], None] | None]],
                   ) -> list[Sequence]:
        """Queue several requests (one request's n choices) all or none: each is checked, and the queue must hold
        them all."""
        tokenizer = self.generator.tokenizer
        group = []
        for request, listener in requests:
            self.check(request)
            stops = self.generator.eos_token_ids if request.stop_tokens is None else request.stop_tokens
            group.append(Sequence(request, listener, frozenset(stops), Sampler(request.sampling),
                                  StreamDecoder(tokenizer) if tokenizer else None, StopStrings(request.stop_strings)))
        if len(group) > self.capacity:
            raise GenerationError(f"{len(group)} sequences at once: more than this engine's {self.max_batch} rows + "
                                  f"{self.max_queue} queue places; ask for fewer")
        with self._lock:
            if self._closed:
                raise EngineClosed("the server is shutting down and accepts no new requests")
            # rows freed since the last step are taken by the waiting requests at the next one: count them as taken
            if len(self._waiting) + self.running + len(group) > self.capacity:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for one of {self.max_batch} rows")
            self._waiting.extend(group)
            self._lock.notify()
        return group

    def cancel(self, seq: Sequence) -> None:
        """End `seq` (finish_reason "cancelled") at the next step, freeing its row."""
        with self._lock:
            seq.cancelled = True
            self._lock.notify()

    def start(self) -> None:
        """Run step() on a thread of its own while there is work (ONNX Runtime releases the GIL while it computes)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llama4-batch-engine", daemon=True)
            self._thread.start()

    def __enter__(self) -> BatchEngine:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        # without stop() a dropped engine's thread (a daemon) went on waiting for work, holding the KV cache
        self.stop()

    def drain(self) -> None:
        """Accept no new requests and end the queued ones (finish_reason "cancelled": a client told at once can go to
        another server); the running ones go on to their end."""
        with self._lock:
            self._closed = True
            for seq in self._waiting:
                seq.cancelled = True
            self._lock.notify()

    def cancel_running(self) -> None:
        """End every running sequence at the next step (finish_reason "cancelled")."""
        with self._lock:
            for seq in self._rows:
                if seq is not None:
                    seq.cancelled = True
            self._lock.notify()

    def stop(self) -> None:
        """Stop the thread and end every sequence still queued or running (finish_reason "cancelled")."""
        with self._lock:
            self._closed = self._stopped = True
            self._lock.notify()
        if self._thread is None:
            self._cancel_all()
        elif self._thread is not threading.current_thread():  # a listener may stop it: the loop then ends its step
            self._thread.join()

    def _cancel_all(self) -> None:
        for seq in [*self._waiting, *(s for s in self._rows if s is not None)]:
            self._finish(seq, "cancelled")
        self._waiting.clear()

    # --- the engine's thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._waiting and self.running == 0:
                    self._lock.wait()
                if self._stopped:
                    break
            try:
                self.step()
            except Exception as exc:  # a failing step must not take the server down: end what ran, serve the next
                message = f"{type(exc).__name__}: {exc}"
                for seq in self._rows:
                    if seq is not None:
                        self._finish(seq, "error", error=message)
        self._cancel_all()

    def step(self) -> bool:
        """One iteration: admit, end cancelled/expired sequences, one prefill piece, one decode step. Returns whether
        any sequence was worked on."""
        now = time.monotonic()
        with self._lock:
            for seq in [s for s in self._waiting if s.cancelled or s.expired(now)]:
                self._waiting.remove(seq)
                self._finish(seq, "cancelled" if seq.cancelled else "timeout")
            while self._waiting and None in self._rows:
                seq = self._waiting.popleft()
                try:
                    self._admit(seq)
                except Exception as exc:  # out of the queue and in no row yet: it would never be finished
                    self._finish(seq, "error", error=f"{type(exc).__name__}: {exc}")
        for seq in list(self._rows):
            if seq is not None and (seq.cancelled or seq.expired(now)):
                self._finish(seq, "cancelled" if seq.cancelled else "timeout")
        reading = [s for s in self._rows if s is not None and s.fed < len(s.request.prompt_ids)]
        budget = self.backend.max_prefill_tokens
        if self.prefill_budget and any(s is not None and s.pending is not None for s in self._rows):
            budget = min(budget, self.prefill_budget)
        together = self._newcomers_together(reading, budget)
        if len(together) > 1:
            self._prefill_together(together)
        elif reading:
            self._prefill(min(reading, key=lambda s: s.submitted), budget)
        decoding = [s for s in self._rows if s is not None and s.pending is not None]
        if decoding:
            self._decode(decoding)
        return bool(reading or decoding)

    def _admit(self, seq: Sequence) -> None:
        """Give seq a free row: the one whose held tokens share the longest start with its prompt that the row can
        be cut back to (at least reuse_prefix_tokens; at most all but the last prompt token, whose logits are
        sampled), cut back to it; else the lowest, emptied."""
        free = [row for row, occupant in enumerate(self._rows) if occupant is None]
        row, reused = free[0], 0
        prompt = np.asarray(seq.request.prompt_ids, np.int64)
        if self.reuse_prefix_tokens and seq.request.image_features is None and seq.request.prompt_logprobs is None:
            for candidate in free:
                shared = min(_common_prefix(self._held[candidate], prompt), prompt.size - 1)
                kept = self.cache.longest_kept_prefix(candidate, shared)
                if kept >= max(self.reuse_prefix_tokens, reused + 1):
                    row, reused = candidate, kept
        seq.row, self._rows[row], self._held[row] = row, seq, _NOTHING_HELD
        if reused:
            self.cache.keep_prefix(row, reused)
            seq.fed = seq.reused = reused
            self.reused_prompt_tokens += reused
        else:
            self.cache.reset_row(row)

    def _prefill(self, seq: Sequence, budget: int) -> None:
        """Feed seq's next prompt piece in its row alone (the other rows are padding: the backend runs the row by
        itself) with the image features of its placeholders, as Generator's prefill hands them; sample the first
        token after the last piece."""
        prompt, start = seq.request.prompt_ids, seq.fed
        n = min(budget, len(prompt) - start)
        ids = np.full((self.max_batch, n), self._pad, np.int64)
        positions = np.full((self.max_batch, n), -1, np.int64)
        ids[seq.row] = prompt[start:start + n]
        positions[seq.row] = np.arange(start, start + n)
        scoring = seq.request.prompt_logprobs is not None
        wanted = np.zeros((self.max_batch, n if scoring else 1), np.int64)
        wanted[seq.row] = np.arange(n) if scoring else n - 1
        features = seq.request.image_features
        if features is None:
            logits = self.backend.forward(ids, positions, self.cache, wanted)
        else:  # the feature rows of this piece's placeholders (a piece may cut an image: count those before it)
            before = prompt[:start].count(self._image_token)
            features = features[before: before + prompt[start:start + n].count(self._image_token)]
            logits = self.backend.forward(ids, positions, self.cache, wanted, image_features=features)
        if scoring:  # position p's logits score prompt token p + 1
            seq.prompt_logprobs += [token_logprobs(logits[seq.row, j], prompt[start + j + 1], seq.request.prompt_logprobs)
                                    for j in range(n) if start + j + 1 < len(prompt)]
        seq.fed += n
        if seq.fed == len(prompt):
            if seq.request.max_new_tokens == 0:
                self._finish(seq, "length")
            else:
                self._sampled(seq, logits[seq.row, -1])

    def _newcomers_together(self, reading: list[Sequence], budget: int) -> list[Sequence]:
        """The oldest newcomers whose whole prompts fit one piece each and, padded to the longest, the step's prompt
        token budget together (max_prefill_tokens, what bounds the prefill's activation memory; less while others
        decode with a prefill_budget)."""
        if self._staging is None:
            return []
        chosen: list[Sequence] = []
        longest = 0
        for seq in sorted(reading, key=lambda s: s.submitted):
            length = len(seq.request.prompt_ids)
            if seq.fed == 0 and length <= self._one_piece and seq.request.prompt_logprobs is None \
                    and (len(chosen) + 1) * max(longest, length) <= budget:
                chosen.append(seq)
                longest = max(longest, length)
        return chosen

    def _prefill_together(self, newcomers: list[Sequence]) -> None:
        """Prefill whole prompts of several newcomers in one step (Generator.prefill), in rows 0.. of the staging cache;
        move each row into the sequence's row; sample first tokens."""
        staging = self._staging
        staging.reset()
        staging.reserve(slice(None), max(len(seq.request.prompt_ids) for seq in newcomers))  # a view cannot grow
        view = staging.first_rows(len(newcomers)) if len(newcomers) < staging.batch else staging
        logits = self.generator.prefill([seq.request.prompt_ids for seq in newcomers], view, self._pad,
                                        [seq.request.image_features for seq in newcomers])
        for j, seq in enumerate(newcomers):
            self.cache.adopt_row(seq.row, staging, j)
            seq.fed = len(seq.request.prompt_ids)
            self._sampled(seq, logits[j])

    def _decode(self, decoding: list[Sequence]) -> None:
        """One token for every decoding row, over rows 0..the highest decoding one (rows are taken lowest first, so
        with few sequences the idle rows above are not computed)."""
        cache = self._rows_up_to(max(seq.row for seq in decoding) + 1)
        ids = np.full((cache.batch, 1), self._pad, np.int64)
        positions = np.full((cache.batch, 1), -1, np.int64)
        for seq in decoding:
            ids[seq.row, 0], positions[seq.row, 0] = seq.pending, self.cache.lengths[seq.row]
            seq.pending = None
        logits = self.backend.forward(ids, positions, cache)
        for seq in decoding:
            self._sampled(seq, logits[seq.row, 0])

    def _rows_up_to(self, count: int) -> KVCacheState:
        """The cache's first `count` rows with room for one more token: a view of an in-place cache (kept per count
        until the buffers grow, so the backend's bindings stay valid), the whole cache otherwise."""
        if self.cache.layout != "in_place" or count == self.max_batch:
            return self.cache
        self.cache.reserve(slice(0, count), 1)
        if self._views_of != self.cache.reallocations:
            self._views, self._views_of = {}, self.cache.reallocations
        if count not in self._views:
            self._views[count] = self.cache.first_rows(count)
        return self._views[count]

    def _sampled(self, seq: Sequence, logits: np.ndarray) -> None:
        """Choose the next token from its logits, emit it, and end the sequence or queue the token for decode."""
        request = seq.request
        output = np.asarray(seq.token_ids, np.int64)
        token = seq.sampler(logits, np.concatenate([np.asarray(request.prompt_ids, np.int64), output]), output)
        logprobs = None if request.logprobs is None else token_logprobs(logits, token, request.logprobs)
        seq.token_ids.append(token)
        stop_token = token in seq.stop_tokens
        last = stop_token or len(seq.token_ids) == request.max_new_tokens
        piece = ""
        if seq.decoder is not None:  # a stop token adds no text; the last token releases what the decoder held back
            piece = ("" if stop_token else seq.decoder.push(token)) + (seq.decoder.flush() if last else "")
        text, hit = seq.stops.push(piece)
        finish: FinishReason | None = "stop" if hit or stop_token else "length" if last else None
        if finish is not None and not hit:
            text += seq.stops.flush()
        self._emit(seq, SequenceEvent(token, text if seq.decoder else None, logprobs, finish))
        if finish is None:
            seq.pending = token

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End `seq` without a token (cancel, timeout, error, a scored prompt with no new tokens): free its row, tell
        its listener."""
        self._emit(seq, SequenceEvent(None, seq.stops.flush() if seq.decoder else None, None, reason, error))

    def _tokens_held(self, seq: Sequence) -> np.ndarray:
        """The tokens seq leaves in its row's slots (its prompt and the generated tokens fed back), for the next
        request to take over; none after an engine error (the slots may be half-written) or with images."""
        if not self.reuse_prefix_tokens or seq.finish_reason == "error" or seq.request.image_features is not None:
            return _NOTHING_HELD
        fed = np.asarray([*seq.request.prompt_ids, *seq.token_ids], np.int64)
        return fed[: int(self.cache.lengths[seq.row])]

    def _emit(self, seq: Sequence, event: SequenceEvent) -> None:
        if event.text:
            seq.text.append(event.text)
        if event.finish_reason is not None:
            seq.finish_reason, seq.error = event.finish_reason, event.error
            if seq.row is not None and self._rows[seq.row] is seq:
                self._rows[seq.row] = None
                self._held[seq.row] = self._tokens_held(seq)
        if seq.listener is not None:
            try:
                seq.listener(event)
            except Exception:  # a listener that fails (its client is gone) ends its own sequence only
                seq.cancelled = True
        if event.finish_reason is not None:
            seq.done.set()


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens a and b share."""
    n = min(a.size, b.size)
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
