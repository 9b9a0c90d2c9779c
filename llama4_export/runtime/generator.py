"""Generator: a backend + the sliding KV cache + sampling + the tokenizer.

    gen = Generator.load("out/scout-fp32")                 # verifies manifest.json, loads tokenizer.json if present
    result = gen.generate("The cat", max_new_tokens=32)     # greedy by default
    for event in gen.stream("The cat", temperature=0.8):   # token by token
        print(event.text, end="")
    gen.generate("<|image|>Describe it.", images=["cat.png"])  # an artifact exported from a multimodal checkpoint
    gen.chat([{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "Describe it."}]}])

Prompts longer than the prefill graph's limit (manifest graphs.prefill.max_new_tokens) are fed in pieces of at most
that many tokens; one-token steps go to the decode graph. Batches (generate_batch) put every prompt in its own row;
rows are padded on the right within a step with position −1, which the graph masks and the cache never stores, so
rows of any lengths run together and each gets exactly the tokens it would get alone.

Images: each `<|image|>` of a text prompt is expanded as Llama4Processor expands it (runtime/images.py), the images'
tiles go through the vision graph once, and every prefill piece hands the graph the feature rows of its own
`<|patch|>` tokens (early fusion, model/io_spec.py); decoding is as for text. Every image is read and checked, and
every prompt's length, before anything runs.
"""

from __future__ import annotations

import contextlib
import json
import operator
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
from PIL import Image

from ..artifact import MANIFEST, part_of_partitioned, read_manifest
from ..errors import FLAG, INTEGER, NONE, PATH, TEXT, ConfigError, check_types, is_integer, needs_exporter, shown
from ..model.config import Llama4Config
from ..model.io_spec import DEFAULT_SINKS
from ..plan import FLOAT_DTYPES, cuda_memory_bytes, planned_window
from .backends import Backend, KVCacheState
from .errors import GenerationError, ImageError
from .image_encoder import ImageEncoder, ImageInput
from .images import decode_data_url
from .ort_backend import OrtBackend
from .sampling import Sampler, SamplingParams, StopStrings
from .tokenizer import StreamDecoder, Tokenizer, undecodable_at

GENERATION_CONFIG_FILE = "generation_config.json"
BACKENDS = ("onnxruntime", "tensorrt")
Prompt = str | Sequence[int]
PrefillProgress = Callable[[int, int], None]  # (prompt positions fed so far, prompt length)


@dataclass(frozen=True)
class TokenEvent:
    row: int  # index of the prompt in the batch (0 for generate/stream)
    token_id: int
    # the new text this token completes ("" while a UTF-8 character is incomplete; a row's last event, a stop token's
    # too, also carries what was held back, so the texts join to the result's); None without a tokenizer
    text: str | None
    stop: bool  # this token is a stop token (it ends the row and adds no text of its own)
    # the text reached one of the `stop` strings: the row ends here, its text cut before the stop string
    stop_string: bool = False


@dataclass(frozen=True)
class Stops:
    """What ends a row besides max_new_tokens: one of these token ids, or one of these strings in its text."""
    tokens: frozenset[int]
    strings: tuple[str, ...] = ()


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    # the new tokens; a stop token that ended generation is the last one (for a stop string: the token completing it)
    token_ids: list[int]
    stop_reason: Literal["stop", "length"]
    text: str | None = None  # the new tokens decoded (stop token excluded, cut before a stop string) with a tokenizer


class Generator:
    """One generation at a time: the cache is allocated once per batch size and reused by the next call. Threads may
    share one Generator (a web app's worker pool): their calls take turns — a call waits while another runs, and a
    stream() holds the Generator from its first next() until it is exhausted, close()d or dropped — and each gets the
    tokens it gets alone. To run concurrent requests together, batched, use runtime.batching.BatchEngine."""

    def __init__(
        self, backend: Backend, tokenizer: Tokenizer | None = None, window: int | None = None,
        sinks: int = DEFAULT_SINKS, eos_token_ids: Sequence[int] | None = None, precision: str | None = None,
        image_encoder: ImageEncoder | None = None, max_image_pixels: int | None = None,
    ):
        """eos_token_ids: the default stop tokens (None = the config's eos_token_id). precision: the artifact's
        weights (manifest), for the memory planner's default window on a GPU (None = the cache's float dtype).
        image_encoder: the artifact's vision graph (None: text only). max_image_pixels: an image of more pixels is
        refused from its header, before it is decoded (None: Pillow's decompression-bomb limit alone, ~179 MP)."""
        self.backend, self.tokenizer, self.sinks, self.image_encoder = backend, tokenizer, sinks, image_encoder
        self.max_image_pixels = check_max_image_pixels(max_image_pixels)
        self.config: Llama4Config = backend.config
        self.eos_token_ids = tuple(self.config.eos_token_id if eos_token_ids is None else eos_token_ids)
        self.window = _window_for(backend, window, precision, sinks, image_encoder)
        self._cache: KVCacheState | None = None
        self._cache_lock, self._cache_user = threading.Lock(), None  # see _events
        # Fail at load, not at the first prompt, on a window the cache cannot hold or a graph it does not fit.
        cache = self._cache_for(1)
        self.window = cache.window  # the resolved W (the default when None was given)
        for kind, slots in backend.required_slots.items():
            if cache.slots(kind) != slots:
                raise GenerationError(
                    f"the graphs expect {slots} {kind} cache slots but this config needs {cache.slots(kind)}; re-run the export"
                )

    @classmethod
    def load(
        cls, directory: str | Path, backend: str = "onnxruntime", window: int | None = None, sinks: int = DEFAULT_SINKS,
        threads: int | None = None, providers: list[str] | None = None, verify: bool = True,
        max_prefill_tokens: int | None = None, max_image_pixels: int | None = None,
    ) -> "Generator":
        """An exported artifact (manifest.json; hashes verified) on ONNX Runtime or TensorRT.

        max_prefill_tokens lowers the prefill piece size below the graph's limit (bounds prefill activation memory).
        max_image_pixels: refuse larger images before decoding them (None: Pillow's limit alone).
        """
        optional_integer = (INTEGER + NONE, "an integer or None")
        check_types("Generator.load", {
            "directory": (PATH, "an artifact directory"), "backend": (TEXT, "a str"), "window": optional_integer,
            "sinks": (INTEGER, "an integer"), "threads": optional_integer, "verify": (FLAG, "True or False"),
            "max_prefill_tokens": optional_integer, "max_image_pixels": optional_integer}, locals(), GenerationError)
        check_max_image_pixels(max_image_pixels)  # before the graphs load
        directory = Path(directory)
        if backend not in BACKENDS:
            raise GenerationError(f"backend {backend!r} is unknown; choose one of: {', '.join(BACKENDS)}")
        manifest = read_manifest(directory, verify=verify)
        # ONNX Runtime and tokenizers take paths as UTF-8 text: a name with other bytes failed as a broken file
        if undecodable_at(str(directory)) is not None:
            raise GenerationError(f"{directory}: the path is not UTF-8 (it has an undecodable byte), which ONNX Runtime "
                                  "cannot open; rename the directory, link it under a UTF-8 name, or run it from "
                                  "inside (`.`)")
        if (part := part_of_partitioned(directory, manifest)) is not None:
            raise GenerationError(f"{part}; run the artifact directory holding it ({directory.resolve().parent})")
        config = Llama4Config.from_manifest(manifest, str(directory / MANIFEST))
        if backend == "tensorrt":
            with needs_exporter("the TensorRT backend needs {extra}, as well as TensorRT, torch with CUDA and a GPU"):
                from .trt_backend import TrtBackend  # its TensorRT plugin spec pulls in onnx_ir: only when asked for

            runner: Backend = TrtBackend.from_artifact(directory, manifest, config)
        else:
            runner = OrtBackend.from_artifact(directory, manifest, config, threads, providers)
        images = ImageEncoder.from_artifact(directory, manifest, threads, providers) if backend == "onnxruntime" else None
        return cls.for_backend(runner, directory, window, sinks, manifest.get("precision"), max_prefill_tokens, images,
                               max_image_pixels)

    @classmethod
    def for_backend(cls, runner: Backend, directory: Path, window: int | None = None, sinks: int = DEFAULT_SINKS,
                    precision: str | None = None, max_prefill_tokens: int | None = None,
                    image_encoder: ImageEncoder | None = None, max_image_pixels: int | None = None) -> "Generator":
        """A generator over `runner` with the tokenizer and stop tokens of `directory` (an artifact or a checkpoint)."""
        if max_prefill_tokens is not None:
            if max_prefill_tokens < 1:
                raise GenerationError(f"max_prefill_tokens={max_prefill_tokens}: must be >= 1")
            runner.max_prefill_tokens = min(runner.max_prefill_tokens, max_prefill_tokens)
        eos = list(runner.config.eos_token_id) + _generation_config_eos(directory)
        return cls(runner, Tokenizer.load(directory), window, sinks, eos_token_ids=sorted(set(eos)), precision=precision,
                   image_encoder=image_encoder, max_image_pixels=max_image_pixels)

    # --- prompts -------------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Text through the tokenizer (with its special tokens, e.g. BOS), or token ids checked against the vocabulary."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError("the prompt is text but the artifact has no tokenizer.json; pass token ids instead (--ids)")
            if not prompt:
                raise GenerationError("the prompt is empty; give at least one token")
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                if isinstance(prompt, (bytes, bytearray)) or any(isinstance(t, (bool, np.bool_)) for t in prompt):
                    raise TypeError  # bytes ran as ids (b"Hi": 72, 105, no BOS), True as id 1
                ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise GenerationError(f"the prompt must be text or one flat sequence of integer token ids, not "
                                      f"{type(prompt).__name__} {shown(prompt)}; several prompts go to generate_batch"
                                      ) from None
        if not ids:
            raise GenerationError("the prompt is empty; give at least one token")
        vocab = self.config.vocab_size
        bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab]
        if bad:
            i, t = bad[0]
            raise GenerationError(f"prompt token {i} is id {t}, outside the vocabulary 0..{vocab - 1}; check the ids")
        return ids

    def _with_images(self, prompt: Prompt, images: Sequence[ImageInput]) -> tuple[list[int], np.ndarray | None]:
        """The prompt's ids with each `<|image|>` expanded for its image's tile grid, and the images' features."""
        # one image, not a list of them (a PIL image or an array failed as a list, bytes were read as one per byte)
        if isinstance(images, (str, Path, bytes, bytearray, memoryview, np.ndarray, Image.Image)) or \
                hasattr(images, "read"):
            images = [images]
        if not images:
            return self.encode(prompt), None
        self._require_vision()
        if not isinstance(prompt, str):
            raise ImageError("images need a text prompt: its <|image|> placeholders say where each image goes")
        return self._expanded(prompt, images, add_special_tokens=True, max_pixels=self.max_image_pixels)

    def _require_vision(self, where: str = "") -> None:
        if self.image_encoder is None:
            raise ImageError(f"{where}images need a vision graph run by the onnxruntime backend: this artifact has "
                             "none (a text-only checkpoint, or exported --text-only) or its backend (tensorrt, "
                             "torch) runs text only; export a multimodal checkpoint without --text-only and load it "
                             "with --backend onnxruntime")

    def _expanded(self, text: str, images: Sequence[ImageInput], add_special_tokens: bool,
                  names: Sequence[str] | None = None, max_pixels: int | None = None) -> tuple[list[int], np.ndarray]:
        """Every image read and tiled, its placeholder expanded, the length checked; then the vision graph."""
        processed = self.image_encoder.preprocess(images, names, max_pixels)
        expanded = self.image_encoder.processor.expand_prompt(text, [image.grid for image in processed])
        ids = self.encode(self.tokenizer.encode(expanded, add_special_tokens) if self.tokenizer else expanded)
        context = self.config.max_position_embeddings
        if len(ids) > context:
            tiles = sum(image.pixel_values.shape[0] for image in processed)
            raise ImageError(f"the prompt is {len(ids):,} tokens with its images ({tiles} tiles × "
                             f"{self.image_encoder.processor.config.tokens_per_tile} tokens) but the model's context is "
                             f"{context:,}; give fewer or smaller images")
        return ids, self.image_encoder.encode(processed)

    def chat_inputs(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    max_image_pixels: int | None = None) -> tuple[list[int], np.ndarray | None]:
        """A conversation through the chat template, ready for the reply: its token ids, and the feature rows of its
        images (None without images). A message's content is text or a list of parts: {"type": "text", "text": ...}
        and images, as {"type": "image", "image": any form images.open_image takes} or {"type": "image", "url": ...} or
        OpenAI's {"type": "image_url", "image_url": {"url": ...}} — URLs must be data URLs (nothing is fetched). The template
        sees each image part as {"type": "image"} and writes its `<|image|>` placeholder there, as Llama4Processor's
        apply_chat_template has it; the placeholders are then expanded as generate(images=) expands them.
        tools: OpenAI function definitions, for a template that renders them. max_image_pixels: this call's limit on
        an image's pixels (None: the generator's max_image_pixels); a larger image is refused (ImageTooLarge) from its
        header, before it is decoded."""
        limit = self.max_image_pixels if max_image_pixels is None else check_max_image_pixels(max_image_pixels)
        if self.tokenizer is None:
            raise GenerationError("chat needs a tokenizer but the artifact has no tokenizer.json")
        if not isinstance(messages, (list, tuple)):
            raise GenerationError(f"messages: expected a list of {{'role': ..., 'content': ...}}, not "
                                  f"{type(messages).__name__}")
        if not messages:
            raise GenerationError("messages: the conversation is empty; give at least one "
                                  "{'role': 'user', 'content': ...}")
        if tools is not None and not (isinstance(tools, (list, tuple)) and all(isinstance(t, dict) for t in tools)):
            raise GenerationError(f"tools: expected a list of OpenAI function definitions (dicts), not {shown(tools)}")
        rendered, sources = [], []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise GenerationError(f"messages[{i}]: expected {{'role': ..., 'content': ...}}, not {shown(message)}")
            content = message.get("content")
            if content is None and not message.get("tool_calls"):  # an assistant's tool calls may stand alone
                raise GenerationError(f"messages[{i}]: no 'content'; give text or a list of parts")
            # the template dropped what it could not read: content {"a": 1}, a part "hi", a text part without text
            if content is not None and not isinstance(content, (str, list, tuple)):
                raise GenerationError(f"messages[{i}].content: expected text or a list of parts, not {shown(content)}")
            if isinstance(content, (list, tuple)):
                parts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") == "text" and not isinstance(part.get("text"), str):
                        raise GenerationError(f"messages[{i}].content[{j}]: expected {{'type': 'text', 'text': ...}} "
                                              f"or an image part, not {shown(part)}")
                    source = _image_source(part, f"messages[{i}].content[{j}]")
                    if source is not None:
                        self._require_vision(f"messages[{i}].content[{j}]: an image, but ")
                        sources.append(source)
                    parts.append({"type": "image"} if source is not None else part)
                message = {**message, "content": parts}
            rendered.append(message)
        text = self.tokenizer.render_chat(rendered, tools)
        if not sources:
            return self.encode(self.tokenizer.encode(text, add_special_tokens=False)), None
        placeholder = self.image_encoder.processor.config.placeholder
        if text.count(placeholder) != len(sources):  # said here, where the cause is known, not as a bare count
            raise ImageError(f"messages: the chat template wrote {text.count(placeholder)} {placeholder} "
                             f"placeholder(s) for the conversation's {len(sources)} image part(s): templates drop "
                             f"images from some messages (Llama 4's keeps only a system message's text), and a text "
                             f"part may not hold {placeholder} itself; put images in user messages")
        images = [decode_data_url(url, where, limit) if url is not None else image for image, url, where in sources]
        return self._expanded(text, images, add_special_tokens=False, names=[where for _, _, where in sources],
                              max_pixels=limit)

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The token ids of a text-only conversation (chat_inputs for one with images)."""
        ids, features = self.chat_inputs(messages, tools)
        if features is not None:
            raise ImageError("the conversation has images: use chat() or chat_inputs(), which give their features")
        return ids

    # --- generation ----------------------------------------------------------------------------------------
    def generate(
        self, prompt: Prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        repetition_penalty: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
        stream: Callable[[TokenEvent], None] | None = None, images: Sequence[ImageInput] = (),
        on_prefill: PrefillProgress | None = None, **penalties,
    ) -> GenerationResult:
        """Continue one prompt; `stream` is called with every new token as it is chosen. images: the images (any
        form images.open_image takes; one may be given alone) for the prompt's `<|image|>` placeholders, in order.
        penalties: frequency_penalty, presence_penalty, logit_bias (SamplingParams), and stop: a string or a list of
        them that ends the generation where its text first holds one (cut before it, stop_reason "stop"; streamed text
        that may begin one waits until it cannot).
        on_prefill(done, total) is called after each prefill piece with the prompt tokens fed so far; an exception
        raised from it (or from `stream`) cancels the generation, reaches the caller unchanged, and leaves the
        Generator ready for the next one."""
        return self.generate_batch(
            [prompt], max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop_tokens, stream, [images],
            on_prefill, **penalties,
        )[0]

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, images: Sequence[ImageInput] = (),
               on_prefill: PrefillProgress | None = None, **options) -> Iterator[TokenEvent]:
        """The same as generate, as an iterator of TokenEvents (bad input raises here, not at the first next(); the
        prompt is fed at the first next(), with on_prefill's calls). From then until it is exhausted, close()d or
        dropped it holds the Generator: other threads' calls wait for it, so close() one abandoned half-way."""
        ids, features = self._with_images(prompt, images)
        params, stops = self._options(max_new_tokens, options)
        _check_callbacks(on_prefill=on_prefill)
        return self._events([ids], max_new_tokens, params, stops, [features], on_prefill)

    def generate_batch(
        self, prompts: Sequence[Prompt], max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None,
        stream: Callable[[TokenEvent], None] | None = None, images: Sequence[Sequence[ImageInput]] | None = None,
        on_prefill: PrefillProgress | None = None, **penalties,
    ) -> list[GenerationResult]:
        """Several prompts of any lengths at once; sampled rows draw from one seeded generator, in row order.
        images: one sequence of images per prompt (None: text only); on_prefill and penalties as for generate()
        (on_prefill counts the positions of the longest prompt: the rows are fed side by side)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):  # a str ran per character
            raise GenerationError(f"prompts: a {type(prompts).__name__}; generate_batch takes a list of prompts "
                                  "(generate takes one)")
        prompts = list(prompts)
        if images is not None and not isinstance(images, (list, tuple)):  # images=5 was len()'s TypeError
            raise ImageError(f"images={shown(images)}: give one list of images per prompt, or None")
        if images is not None and len(images) != len(prompts):
            raise ImageError(f"{len(prompts)} prompt(s) but {len(images)} image list(s); give one list per prompt")
        prepared = [self._with_images(p, images[k] if images is not None else ()) for k, p in enumerate(prompts)]
        if not prepared:
            raise GenerationError("no prompts given")
        params, stops = self._options(max_new_tokens, dict(
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
            stop_tokens=stop_tokens, **penalties,
        ))
        return self._collect(prepared, max_new_tokens, params, stops, stream, on_prefill)

    def chat(self, messages: list[dict[str, Any]], max_new_tokens: int = 64, tools: list[dict[str, Any]] | None = None,
             stream: Callable[[TokenEvent], None] | None = None, on_prefill: PrefillProgress | None = None,
             **options) -> GenerationResult:
        """The reply to a conversation (chat_inputs: text and image parts, tools); options as for stream()."""
        ids, features = self.chat_inputs(messages, tools)
        params, stops = self._options(max_new_tokens, options)
        return self._collect([(ids, features)], max_new_tokens, params, stops, stream, on_prefill)[0]

    def _collect(self, prepared: list[tuple[list[int], np.ndarray | None]], max_new_tokens: int,
                 params: SamplingParams, stops: Stops, stream: Callable[[TokenEvent], None] | None,
                 on_prefill: PrefillProgress | None) -> list[GenerationResult]:
        _check_callbacks(stream=stream, on_prefill=on_prefill)
        batch, features = [ids for ids, _ in prepared], [f for _, f in prepared]
        new: list[list[int]] = [[] for _ in batch]
        pieces: list[list[str]] = [[] for _ in batch]
        stopped, cut = [False] * len(batch), [False] * len(batch)
        for event in self._events(batch, max_new_tokens, params, stops, features, on_prefill):
            new[event.row].append(event.token_id)
            pieces[event.row].append(event.text or "")
            stopped[event.row], cut[event.row] = event.stop, event.stop_string
            if stream is not None:
                stream(event)
        results = []
        for row, (ids, tokens) in enumerate(zip(batch, new)):
            text = None
            if self.tokenizer is not None:  # cut before a stop string, the pieces are the text; else one decode
                text = "".join(pieces[row]) if stops.strings else self.tokenizer.decode(tokens[:-1] if stopped[row]
                                                                                      else tokens)
            results.append(GenerationResult(ids, tokens, "stop" if stopped[row] or cut[row] else "length", text))
        return results

    def _options(self, max_new_tokens: int, options: dict) -> tuple[SamplingParams, Stops]:
        if not is_integer(max_new_tokens):
            raise GenerationError(f"max_new_tokens={max_new_tokens!r}: expected an integer")
        if max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens={max_new_tokens}: must be >= 0")
        stop_tokens = options.pop("stop_tokens", None)
        stop = options.pop("stop", None)
        # a value that is neither a string nor a list of them is one bad entry (stop=5 iterated into a TypeError)
        strings = tuple(stop or ()) if isinstance(stop, (list, tuple, type(None))) else (stop,)
        if not all(isinstance(s, str) and s for s in strings):
            raise GenerationError(f"stop={stop!r}: give a non-empty string or a list of them")
        if strings and self.tokenizer is None:
            raise GenerationError("stop strings need the artifact's tokenizer (tokenizer.json); give stop_tokens ids")
        unknown = sorted(set(options) - {"temperature", "top_k", "top_p", "repetition_penalty", "seed",
                                         "frequency_penalty", "presence_penalty", "logit_bias"})
        if unknown:
            raise GenerationError(f"unknown generation option {unknown[0]!r}")
        if stop_tokens is not None:
            listed = isinstance(stop_tokens, Iterable) and not isinstance(stop_tokens, (str, bytes))
            stop_tokens = list(stop_tokens) if listed else stop_tokens  # an iterator is read once
            if not listed:
                raise GenerationError(f"stop_tokens={shown(stop_tokens)}: give a list of token ids in "
                                      f"0..{self.config.vocab_size - 1}")
            check_stop_tokens(stop_tokens, self.config.vocab_size)
        tokens = frozenset(self.eos_token_ids if stop_tokens is None else (int(t) for t in stop_tokens))
        params = SamplingParams(**options)
        params.check_vocabulary(self.config.vocab_size)
        return params, Stops(tokens, strings)

    def _cache_for(self, batch: int) -> KVCacheState:
        if self._cache is None or self._cache.batch != batch:
            self._cache = None  # free the old buffers before allocating new ones
            self._cache = self.backend.make_cache(batch, self.window, self.sinks)
        else:
            self._cache.reset()
        return self._cache

    def _events(
        self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams, stops: Stops,
        features: list[np.ndarray | None] | None = None, on_prefill: PrefillProgress | None = None,
    ) -> Iterator[TokenEvent]:
        """One generation at a time, as the KV cache is the Generator's: another thread's waits for it; a second one
        in the thread iterating an unfinished stream() is refused rather than left to wait for itself. That thread is
        the one that last resumed the stream (a stream may be handed to another thread), held as the Thread object
        (a thread id is reused once its thread ends)."""
        if self._cache_user is threading.current_thread():
            raise GenerationError("this Generator is already generating in this thread (an unfinished stream()): "
                                  "finish or close() it first; generate_batch runs several prompts at once, and concurrent "
                                  "requests in one thread (an asyncio app's) go to runtime.batching.BatchEngine or "
                                  "each to a thread of its own")
        with self._cache_lock:
            self._cache_user = threading.current_thread()
            try:
                with contextlib.closing(self._generation(prompts, max_new_tokens, params, stops, features,
                                                         on_prefill)) as events:
                    for event in events:
                        yield event
                        self._cache_user = threading.current_thread()
            finally:
                self._cache_user = None

    def _generation(
        self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams, stops: Stops,
        features: list[np.ndarray | None] | None, on_prefill: PrefillProgress | None,
    ) -> Iterator[TokenEvent]:
        if max_new_tokens == 0:
            return
        rows = len(prompts)
        cache = self._cache_for(rows)
        pad = self.config.pad_token_id
        pad = pad if pad is not None and 0 <= pad < self.config.vocab_size else 0  # any id works: padding is masked
        sampler = Sampler(params)
        # prompt + new tokens per row, for the repetition penalty; doubled as it fills, since max_new_tokens may be far
        # more than will come (10^8 "until the stop token" allocated 1.6 GB up front)
        history = [np.concatenate([p, np.zeros(min(max_new_tokens, 256), np.int64)]).astype(np.int64) for p in prompts]
        decoders = [StreamDecoder(self.tokenizer) if self.tokenizer else None for _ in prompts]
        cutters = [StopStrings(stops.strings) if stops.strings else None for _ in prompts]

        last_logits = self.prefill(prompts, cache, pad, features or [None] * rows, on_prefill)
        produced = [0] * rows
        active = [True] * rows
        while True:
            ids = np.full((rows, 1), pad, np.int64)
            positions = np.full((rows, 1), -1, np.int64)
            for b in range(rows):
                if not active[b]:
                    continue
                seen = len(prompts[b]) + produced[b]
                if seen == history[b].size:
                    history[b] = np.concatenate([history[b], np.zeros(history[b].size, np.int64)])
                token = sampler(last_logits[b], history[b][:seen], history[b][len(prompts[b]):seen])
                history[b][seen] = token
                produced[b] += 1
                stop = token in stops.tokens
                last = stop or produced[b] == max_new_tokens
                # the last piece carries what was held back, so the pieces join to the result's text
                text = None if decoders[b] is None else (
                    ("" if stop else decoders[b].push(token)) + (decoders[b].flush() if last else ""))
                hit = False
                if cutters[b] is not None:  # text that may begin a stop string waits until it cannot
                    text, hit = cutters[b].push(text)
                    text += "" if hit or not last else cutters[b].flush()
                    last = last or hit
                yield TokenEvent(b, token, text, stop, hit)
                if last:
                    active[b] = False
                else:
                    ids[b, 0], positions[b, 0] = token, cache.lengths[b]
            if not any(active):
                return
            last_logits = self.backend.forward(ids, positions, cache)[:, -1]

    def prefill(self, prompts: list[list[int]], cache: KVCacheState, pad: int,
                features: list[np.ndarray | None], on_prefill: PrefillProgress | None = None) -> np.ndarray:
        """Feed every prompt in pieces of at most max_prefill_tokens; return each row's last-token logits [B, V]. Each
        piece asks for one column of logits per row — the row's last prompt token when it is in the piece — and
        takes the image feature rows of its placeholder tokens (row by row: model/io_spec.py)."""
        piece = self.backend.max_prefill_tokens
        rows, longest = len(prompts), max(len(p) for p in prompts)
        last = np.empty((rows, self.config.vocab_size), np.float32)
        for start in range(0, longest, piece):
            width = min(piece, longest - start)
            ids = np.full((rows, width), pad, np.int64)
            positions = np.full((rows, width), -1, np.int64)
            wanted = np.zeros((rows, 1), np.int64)
            piece_features = []
            for b, prompt in enumerate(prompts):
                part = prompt[start : start + width]
                ids[b, : len(part)] = part
                positions[b, : len(part)] = np.arange(start, start + len(part))
                wanted[b, 0] = max(len(part) - 1, 0)
                if features[b] is not None:
                    token = self.image_encoder.config.image_token_id
                    before = sum(t == token for t in prompt[:start])
                    piece_features.append(features[b][before: before + sum(t == token for t in part)])
            if piece_features:
                logits = self.backend.forward(ids, positions, cache, wanted, image_features=np.concatenate(piece_features))
            else:
                logits = self.backend.forward(ids, positions, cache, wanted)
            for b, prompt in enumerate(prompts):
                if start < len(prompt) <= start + width:
                    last[b] = logits[b, 0]
            if on_prefill is not None:
                on_prefill(start + width, longest)
        return last


def _window_for(backend: Backend, window: int | None, precision: str | None, sinks: int,
                image_encoder: ImageEncoder | None = None) -> int | None:
    """A graph with a static global-window dimension fixes W; otherwise the caller's W. By default: on a GPU of known
    memory the memory planner's largest W for one sequence (plan.planned_window, what `llama4-export plan` prints
    for this GPU, precision, prefill size, the cache's dtype and the vision graph if any); on the CPU None
    (kv_cache.default_window)."""
    required = backend.required_slots.get("global")
    if required is None and window is None:
        memory = _gpu_memory_bytes(backend)
        if memory is None:
            return None
        precision = precision or FLOAT_DTYPES.get(backend.cache_dtype.itemsize, "fp32")
        try:
            return planned_window(backend.config, precision, memory, backend.cache_dtype.itemsize,
                                  max_prefill=backend.max_prefill_tokens, sinks=sinks,
                                  vision=image_encoder and image_encoder.config,
                                  vision_precision=image_encoder and image_encoder.precision)
        except ConfigError as exc:
            raise GenerationError(f"{exc}; or pass --window W to choose the global KV window yourself") from None
    if required is None or window is None:
        return window if required is None else required
    if window != required:
        raise GenerationError(
            f"window={window}: this artifact's graphs were exported with a fixed global window of {required} slots; "
            f"use --window {required} or re-export with dynamic cache shapes"
        )
    return window


def _gpu_memory_bytes(backend: Backend) -> int | None:
    """Memory of the GPU the backend computes on; None on the CPU. A backend may state it (device_memory_bytes);
    ONNX Runtime's CUDA execution provider is asked for its device (the cache is copied there every step)."""
    stated = getattr(backend, "device_memory_bytes", None)
    if stated is not None:
        return int(stated)
    if isinstance(backend, OrtBackend) and backend.decode.get_providers()[0] == "CUDAExecutionProvider":
        options = backend.decode.get_provider_options().get("CUDAExecutionProvider", {})
        return cuda_memory_bytes(int(options.get("device_id", 0)))
    return None


def _generation_config_eos(directory: Path) -> list[int]:
    path = directory / GENERATION_CONFIG_FILE
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise GenerationError(f"{path}: not a valid generation config ({exc}); re-copy it from the checkpoint") from None
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


def _image_source(part: Any, where: str) -> tuple[ImageInput | None, str | None, str] | None:
    """An image content part as (image, data URL, where it is) — exactly one of the first two set; None for a part
    that is not an image."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
    elif kind == "image":
        url = part.get("url")
        if url is None:
            image = part.get("image", part.get("path"))
            if image is None:
                raise ImageError(f"{where}: an image part needs \"image\" (a file, its bytes, a PIL image or an RGB "
                                 "array), \"path\" or \"url\"")
            return image, None, where
    else:
        return None
    if not isinstance(url, str):
        raise ImageError(f"{where}: the image part has no URL string; give {{\"url\": \"data:image/png;base64,...\"}}")
    return None, url, where


def check_max_image_pixels(value: Any) -> int | None:
    """A pixel limit: an integer >= 1, or None (Pillow's limit alone)."""
    if value is not None and not (is_integer(value) and value >= 1):
        raise GenerationError(f"max_image_pixels={value!r}: must be an integer >= 1 (or None: Pillow's limit alone)")
    return value


def check_stop_tokens(stop_tokens: Iterable, vocab_size: int) -> None:
    """GenerationError unless every stop token is an id of the vocabulary (Generator's options, BatchEngine's requests)."""
    if not all(is_integer(t) and 0 <= t < vocab_size for t in stop_tokens):
        raise GenerationError(f"stop_tokens={shown(stop_tokens)}: give a list of token ids in 0..{vocab_size - 1}")


def _check_callbacks(**callbacks: Any) -> None:
    """A callback that is not callable failed only once the prompt had been fed (TypeError: not callable)."""
    for name, callback in callbacks.items():
        if callback is not None and not callable(callback):
            raise GenerationError(f"{name}={callback!r}: give a function, or None")
