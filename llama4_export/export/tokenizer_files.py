"""Tokenizer files of an artifact: copied from the checkpoint, or a byte-level tokenizer written for presets.

A preset has random weights and no tokenizer, but the runtime needs one to turn text into ids. The byte-level
tokenizer maps every UTF-8 byte to the id of the same value (0..255), so any text round-trips, and puts Llama 4's
special tokens at the config's bos/eos/pad ids, followed by the chat-format markers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from ..artifact import write_json
from ..errors import CheckpointError, ConfigError
from ..model.config import Llama4Config

# chat_template.jinja: where transformers saves a checkpoint's chat template (it overrides tokenizer_config.json's)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", CHAT_TEMPLATE_FILE)
BYTE_TOKENS = 256
BOS, EOT, PAD = "<|begin_of_text|>", "<|eot|>", "<|pad|>"
# Placed at the first ids after bos/eos/pad: what the chat template and a base model's end of text need.
CHAT_TOKENS = ("<|header_start|>", "<|header_end|>", "<|end_of_text|>")

# Llama 4's chat format: each message is `<|header_start|>role<|header_end|>\n\ncontent<|eot|>`.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' + message['content'] + '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}"
    "{%- endif %}"
)


def check_tokenizer_files(checkpoint_dir: Path) -> None:
    """Raise naming the first file the export would copy that the runtime could not read: tokenizer.json must load as
    a tokenizer, the JSON files must hold JSON objects (and a chat template must compile)."""
    for name in TOKENIZER_FILES:
        path = Path(checkpoint_dir) / name
        if not path.is_file():
            continue
        try:
            if name == "tokenizer.json":
                Tokenizer.from_file(str(path))
                continue
            text = path.read_text(encoding="utf-8")
            content = {"chat_template": text} if name == CHAT_TEMPLATE_FILE else json.loads(text)
        except Exception as exc:  # tokenizers raises plain Exception subclasses for a malformed file
            raise CheckpointError(f"{path}: not a valid {name} ({_first_line(exc)}); re-download it from the model's "
                                  "repository, or remove it to export without it") from None
        if not isinstance(content, dict):
            raise CheckpointError(f"{path}: holds a JSON {type(content).__name__}, not an object; re-download it")
        template = content.get("chat_template") if name in ("tokenizer_config.json", CHAT_TEMPLATE_FILE) else None
        if isinstance(template, str):
            try:
                ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).from_string(template)
            except TemplateError as exc:
                raise CheckpointError(f"{path}: its chat_template does not compile ({_first_line(exc)}); fix or remove "
                                      "it") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def copy_tokenizer_files(checkpoint_dir: Path, directory: Path) -> list[str]:
    """Copy the tokenizer and generation files the checkpoint has; return the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(checkpoint_dir) / name
        if source.is_file():
            shutil.copyfile(source, Path(directory) / name)
            copied.append(name)
    return copied


def special_token_ids(config: Llama4Config) -> dict[int, str]:
    """id → special token for a byte-level vocabulary: bos/eos/pad where the config puts them, then CHAT_TOKENS,
    and reserved placeholders on any id left between them (a tokenizer's ids must be contiguous)."""
    eos = config.eos_token_id
    wanted = [(config.bos_token_id, BOS), *((e, EOT if k == 0 else f"<|eos_{k}|>") for k, e in enumerate(eos)), (config.pad_token_id, PAD)]
    named: dict[int, str] = {}
    for token_id, token in wanted:
        if token_id is not None:
            named.setdefault(int(token_id), token)
    next_id = max(named, default=BYTE_TOKENS - 1) + 1
    for offset, token in enumerate(CHAT_TOKENS):
        named[next_id + offset] = token
    low, high = min(named), max(named)
    if low < BYTE_TOKENS or high >= config.vocab_size:
        raise ConfigError(
            f"{config.name}: special token ids {sorted(named)[:3]}… do not fit a byte-level tokenizer (ids {BYTE_TOKENS}.."
            f"{config.vocab_size - 1} are free); export from a checkpoint that has its own tokenizer.json"
        )
    return {i: named.get(i, f"<|reserved_special_token_{i - BYTE_TOKENS}|>") for i in range(BYTE_TOKENS, high + 1)}


def byte_level_tokenizer(config: Llama4Config) -> Tokenizer:
    """Byte-level BPE without merges: ids 0..255 are the bytes, so encoding is exact for any UTF-8 text."""
    byte_symbols = _bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={byte_symbols[b]: b for b in range(BYTE_TOKENS)}, merges=[]))
    # No prefix space: decode(encode(text)) must give back exactly `text`.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = special_token_ids(config)
    # Added tokens take the next free ids in order, and the ids are contiguous from 256, so each lands on its id.
    tokenizer.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    if config.bos_token_id is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A:0", pair=f"{BOS} $A:0 {BOS} $B:1", special_tokens=[(BOS, config.bos_token_id)]
        )
    return tokenizer


def write_byte_level_tokenizer(config: Llama4Config, directory: Path) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json (with a Llama 4 chat template) and generation_config.json."""
    directory = Path(directory)
    specials = special_token_ids(config)
    byte_level_tokenizer(config).save(str(directory / "tokenizer.json"), pretty=True)
    eos = list(config.eos_token_id)
    write_json(directory / "tokenizer_config.json", {
        "backend": "tokenizers",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials.get(config.bos_token_id) if config.bos_token_id is not None else None,
        "eos_token": specials[eos[0]] if eos else None,
        "pad_token": specials.get(config.pad_token_id) if config.pad_token_id is not None else None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,  # transformers would otherwise rewrite " ." to "." on decode
        "model_max_length": config.max_position_embeddings,
    })
    write_json(directory / "generation_config.json", {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": config.pad_token_id,
        "do_sample": False,
    })
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (what the ByteLevel pre-tokenizer emits and its decoder undoes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(BYTE_TOKENS):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(BYTE_TOKENS + extra)
            extra += 1
    return symbols
