"""tokenizer.json through `tokenizers`, the chat template, and incremental detokenization for streaming."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ..byte_level import SYMBOL_BYTES
from .errors import GenerationError
from .images import IMAGE_TOKEN

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers saves the template; it takes priority over the config's


CHAT_FORMAT_TOKENS = ("<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>")


def llama4_chat_format(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Llama 4's header format, used when the tokenizer config carries no chat template (or jinja2 is missing).
    Content is text or a list of parts: text parts as they are, an image part as its `<|image|>` placeholder."""
    text = "<|begin_of_text|>"
    for m in messages:
        content = m.get("content") or ""  # None beside an assistant's tool_calls
        if not isinstance(content, str):
            content = "".join(IMAGE_TOKEN if part.get("type") == "image" else part.get("text", "") for part in content)
        text += f"<|header_start|>{m['role']}<|header_end|>\n\n{content.strip()}<|eot|>"
    if add_generation_prompt:
        text += "<|header_start|>assistant<|header_end|>\n\n"
    return text


def undecodable_at(text: str) -> int | None:
    """The index of the first lone surrogate in `text` (an undecodable byte, as surrogateescape decodes one), or
    None when it encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_utf8(what: str, text: str) -> None:
    """A text holding lone surrogates (undecodable bytes) refused in one line naming `what`."""
    if (at := undecodable_at(text)) is not None:
        raise GenerationError(f"{what}: not UTF-8 text (character {at} is an undecodable byte); give UTF-8 text")


class Tokenizer:
    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = directory / TOKENIZER_FILE
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise GenerationError(f"{path}: cannot load the tokenizer ({exc}); re-copy it from the checkpoint") from None
        self.config: dict[str, Any] = {}
        config_path = directory / TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            try:
                self.config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise GenerationError(f"{config_path}: not valid JSON ({exc}); re-copy it from the checkpoint") from None
        template_path = directory / CHAT_TEMPLATE_FILE
        self._template_file = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
        self._added = self._tok.get_added_tokens_decoder()
        self._byte_level = self._tok.decoder is not None and b"ByteLevel" in self._tok.decoder.__getstate__()
        self._compiled = None  # _compiled_chat_template's

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer | None":
        """The directory's tokenizer, or None when it has no tokenizer.json (then prompts must be token ids)."""
        directory = Path(directory)
        return cls(directory) if (directory / TOKENIZER_FILE).is_file() else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens applies the tokenizer's post-processor (e.g. a leading <|begin_of_text|>)."""
        # encode_batch releases the GIL (encode holds it: a server's other requests and streams stop while a long
        # prompt is tokenized — 27 s for a 20 MB one); same pipeline, same ids
        try:
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except TypeError:
            if isinstance(text, str):  # bytes that were not UTF-8 reach Python as lone surrogates (argv, a file read
                check_utf8("the prompt", text)  # with errors="surrogateescape"): tokenizers' TypeError said nothing
            raise

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        """Whether decode() leaves the token out (skip_special_tokens)."""
        added = self._added.get(token_id)
        return added is not None and added.special

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes the token adds to decoded text. A byte-level token may hold part of a character (its text alone
        is U+FFFD); clients join such tokens' bytes (OpenAI's logprobs `bytes`)."""
        added = self._added.get(token_id)
        token = self._tok.id_to_token(token_id)
        if added is None and token is not None and self._byte_level and all(s in SYMBOL_BYTES for s in token):
            return bytes(SYMBOL_BYTES[symbol] for symbol in token)
        return self.decode([token_id], skip_special_tokens=False).encode()  # whole characters, or the text as shown

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation followed by the assistant header, ready to generate the reply."""
        return self.encode(self.render_chat(messages, tools), add_special_tokens=False)

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders tool definitions (it refers to `tools`)."""
        template = self._chat_template()
        return template is not None and "tools" in template

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """tools (OpenAI's function definitions) go to the template as `tools`; only a template that supports_tools
        can take them."""
        if tools and not self.supports_tools:
            raise GenerationError(f"{TOKENIZER_CONFIG_FILE}: the chat template does not render tools; use a "
                                  "checkpoint whose template does, or call without tools")
        compiled = self._compiled_chat_template()
        if compiled is None:
            return self._llama4_chat_format(messages)
        from jinja2 import TemplateError

        try:
            # a special token as a string, or as older transformers save it: {"__type": "AddedToken", "content": ...}
            special = {k: text for k, v in self.config.items() if k.endswith("_token")
                       and isinstance(text := v.get("content") if isinstance(v, dict) else v, str)}
            extra = {"tools": tools} if tools else {}
            return compiled.render(messages=messages, add_generation_prompt=True, **extra, **special)
        except (TemplateError, TypeError, KeyError, AttributeError) as exc:  # e.g. a None content it adds to a string
            raise GenerationError(f"the chat template cannot render this conversation: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}; check the messages' roles and "
                                  "content") from None

    def _compiled_chat_template(self):
        """The chat template as a jinja2 Template, compiled on first use and kept: compiling Llama 4's took ~16 ms
        and rendering it 0.02 ms, and a server compiled it again for every chat request. None without a template, or
        without jinja2 (then Llama 4's own format is written). A template that does not compile raises each time."""
        if self._compiled is not None:
            return self._compiled
        template = self._chat_template()
        if template is None:
            return None
        try:  # imported here: the runtime's processes (a benchmark's, measured for RSS) load it only for chat
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            return None

        def raise_exception(message: str) -> None:
            raise GenerationError(f"{TOKENIZER_CONFIG_FILE}: chat template refused the conversation: {message}")

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
                   sort_keys: bool = False) -> str:
            # transformers' filter: keys in the caller's order, nothing HTML-escaped (jinja2's own sorts and escapes)
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = tojson
        # transformers' global (Llama 3.x-style templates write today's date): the caller's local time, as there
        env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        try:
            self._compiled = env.from_string(template)  # threads racing here compile the same template twice, harmlessly
        except TemplateError as exc:
            where = CHAT_TEMPLATE_FILE if self._template_file is not None else TOKENIZER_CONFIG_FILE
            raise GenerationError(f"{where}: the chat template does not compile ({type(exc).__name__}: {exc}); fix "
                                  "it or re-copy it from the checkpoint") from None
        return self._compiled

    def _llama4_chat_format(self, messages: list[dict[str, Any]]) -> str:
        # a vocabulary without Llama 4's chat tokens would spell the markers out in bytes: a prompt the model was never
        # trained on, whose turn it cannot end
        missing = [token for token in CHAT_FORMAT_TOKENS if self._tok.token_to_id(token) is None]
        if missing:
            raise GenerationError(f"{TOKENIZER_CONFIG_FILE}: no chat template, and the vocabulary lacks Llama 4's chat "
                                  f"tokens ({', '.join(missing)}); give the prompt as text (a completion), or add the "
                                  "checkpoint's chat_template")
        return llama4_chat_format(messages)

    def _chat_template(self) -> str | None:
        if self._template_file is not None:
            return self._template_file
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None


class StreamDecoder:
    """Turns tokens into text pieces as they arrive; holds back an incomplete UTF-8 character (byte-level BPE).

    Each push decodes only the tokens since the last piece plus that piece's tokens as left context (a decoder may
    treat a text's first token differently, e.g. strip its leading space), so a long stream costs the same per token
    at its end as at its start — decoding every token so far made it quadratic (1 ms a token at 16k tokens)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.context = 0  # ids[context:emitted] are the last piece's tokens, decoded again as context
        self.emitted = 0  # ids[:emitted] have been given out as text

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._piece(final=False)

    def flush(self) -> str:
        """At the end of the text: what is held back (an incomplete character decodes as U+FFFD, as a full decode
        of the tokens gives it)."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        given = self.tokenizer.decode(self.ids[self.context:self.emitted])
        text = self.tokenizer.decode(self.ids[self.context:])
        if not final and (len(text) <= len(given) or text.endswith("\ufffd")):
            return ""
        self.context, self.emitted = self.emitted, len(self.ids)
        return text[len(given):]
