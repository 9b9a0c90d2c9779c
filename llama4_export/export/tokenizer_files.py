"""Tokenizer files of an artifact: copied from the checkpoint, or a byte-level tokenizer written for presets.

A preset has random weights and no tokenizer, but the runtime needs one to turn text into ids. The byte-level
tokenizer maps every UTF-8 byte to the id of the same value (0..255), so any text round-trips, and puts Llama 4's
special tokens at the config's bos/eos/pad ids, followed by the chat-format markers.

Beside tokenizer.json go the same tokenizer as ONNX graphs of onnxruntime-extensions' ops, for runtimes without
`tokenizers` (the C++ runtime runs them with the extensions' custom-op library).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from ..artifact import write_json
from ..byte_level import BYTE_SYMBOLS, SYMBOL_BYTES
from ..errors import CheckpointError, ConfigError, is_integer
from ..model.config import Llama4Config

# chat_template.jinja: where transformers saves a checkpoint's chat template (it overrides tokenizer_config.json's)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", CHAT_TEMPLATE_FILE)
BYTE_TOKENS = 256
BOS, EOT, PAD = "<|begin_of_text|>", "<|eot|>", "<|pad|>"
# text → ids (HfJsonTokenizer: tokenizer.json's own pipeline, <|begin_of_text|> included); ids → UTF-8 bytes
# (BpeDecoder, special tokens skipped, as the Python runtime decodes). Invalid UTF-8 comes out as raw bytes, but the
# output ends at a NUL byte: the manifest lists the tokens holding one ("nul_byte_tokens": id → hex bytes) for the
# runtime to put in itself.
TOKENIZER_GRAPHS = {"encode": "tokenizer_encode.onnx", "decode": "tokenizer_decode.onnx"}
# What the graphs must tokenize as `tokenizers` does before an artifact carries them: words and contractions, runs of
# whitespace and newlines, digit groups, accents, CJK, emoji with modifiers, punctuation runs, a special token.
PROBE_TEXTS = ("The history of it, don't we'LL?", "  runs\tof \n\n\n  spaces  ", "digits 1234567 3.14159",
               "café naïve 日本語 😀👍🏽 🇫🇷", "graphs : iterable --\r\n x", f"{BOS}hello{EOT} world")
# Placed at the first ids after bos/eos/pad: what the chat template and a base model's end of text need.
CHAT_TOKENS = ("<|header_start|>", "<|header_end|>", "<|end_of_text|>")

# Llama 4's chat format: each message is `<|header_start|>role<|header_end|>\n\ncontent<|eot|>`.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    # content as text, or as OpenAI's parts (text, and an image as its placeholder): Generator.chat takes both
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- elif part['type'] == 'image' %}{{- '<|image|>' }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot|>' }}"
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
        eos = content.get("eos_token_id") if name == "generation_config.json" else None
        # the runtimes stop on these ids: llama4-run failed with a traceback at "x", llama4-cpp at "2" or 8.0
        if eos is not None and not all(is_integer(e) for e in (eos if isinstance(eos, list) else [eos])):
            raise CheckpointError(f"{path}: eos_token_id={json.dumps(eos)}: must be a token id or a list of token ids; "
                                  "fix the value or re-download it")
        template = content.get("chat_template") if name in ("tokenizer_config.json", CHAT_TEMPLATE_FILE) else None
        if isinstance(template, str):
            try:
                ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).from_string(template)
            except TemplateError as exc:
                raise CheckpointError(f"{path}: its chat_template does not compile ({_first_line(exc)}); fix or remove "
                                      "it") from None


def missing_tokenizer_note(checkpoint_dir: Path) -> str | None:
    """The note for a checkpoint without tokenizer.json: its artifact exported silently and was found to take token
    ids only when `llama4-run --prompt` refused it."""
    if (Path(checkpoint_dir) / "tokenizer.json").is_file():
        return None
    return (f"note: {checkpoint_dir}: no tokenizer.json, so the artifact will have no tokenizer and take token ids only "
            "(llama4-run --ids); put the model's tokenizer.json in the checkpoint for one that takes text")


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
            f"{config.vocab_size - 1} are free); export from a checkpoint that has its own tokenizer.json (a model in memory: "
            "ModelWeights(model, checkpoint=DIR) takes DIR's tokenizer files)"
        )
    return {i: named.get(i, f"<|reserved_special_token_{i - BYTE_TOKENS}|>") for i in range(BYTE_TOKENS, high + 1)}


def byte_level_tokenizer(config: Llama4Config) -> Tokenizer:
    """Byte-level BPE without merges: ids 0..255 are the bytes, so encoding is exact for any UTF-8 text."""
    tokenizer = Tokenizer(models.BPE(vocab={BYTE_SYMBOLS[b]: b for b in range(BYTE_TOKENS)}, merges=[]))
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


def write_tokenizer_graphs(directory: Path) -> dict[str, object]:
    """Write TOKENIZER_GRAPHS beside the directory's tokenizer.json; return the manifest's entry for them:
    {"graphs": TOKENIZER_GRAPHS}, or {"graphs": None, "graphs_skipped": why} where they cannot stand in for it."""
    directory = Path(directory)
    # imported here, not at the top: the extensions take ~2 s to import and only an export with a tokenizer uses them
    from onnxruntime_extensions import gen_processing_models, get_library_path

    text = (directory / "tokenizer.json").read_text(encoding="utf-8")
    spec = json.loads(text)
    kinds = ((spec.get("model") or {}).get("type"), (spec.get("decoder") or {}).get("type"))
    if kinds != ("BPE", "ByteLevel"):
        return {"graphs": None, "graphs_skipped": f"the tokenizer is {kinds[0]} with a {kinds[1]} decoder; the graphs "
                                                  "cover byte-level BPE (Llama 4's)"}
    reference = Tokenizer.from_str(text)
    try:
        encode, _ = gen_processing_models("HfJsonTokenizer", pre_kwargs={
            "tokenizer_vocab": text, "tokenizer_config": _extensions_tokenizer_config(directory / "tokenizer_config.json")})
        _, decode = gen_processing_models("BpeDecoder", post_kwargs=_bpe_decoder_attributes(reference, spec))
        # The extensions leave the decode graph's input and output without a shape, which onnx.checker refuses
        # ("Field 'shape' of 'type' is required"): ids [batch, sequence] → one string per row.
        _set_dims(decode.graph.input[0], ["batch", "sequence"])
        _set_dims(decode.graph.output[0], ["batch"])
        sessions = {}
        for name, graph in (("encode", encode), ("decode", decode)):
            options = onnxruntime.SessionOptions()
            options.register_custom_ops_library(get_library_path())
            sessions[name] = onnxruntime.InferenceSession(graph.SerializeToString(), options,
                                                          providers=["CPUExecutionProvider"])
        for probe in PROBE_TEXTS:
            expected = reference.encode(probe).ids
            ids = sessions["encode"].run(None, {encode.graph.input[0].name: np.array([probe])})[0].reshape(-1).tolist()
            decoded = sessions["decode"].run(None, {decode.graph.input[0].name: np.array([expected], dtype=np.int64)})
            if ids != expected or decoded[0].reshape(-1)[0] != reference.decode(expected):
                return {"graphs": None, "graphs_skipped": f"onnxruntime-extensions tokenizes {probe!r} differently "
                                                          "from tokenizers"}
    except Exception as exc:  # the extensions and ONNX Runtime raise their own types for a tokenizer they cannot take
        return {"graphs": None,
                "graphs_skipped": f"onnxruntime-extensions cannot take this tokenizer ({_first_line(exc)})"}
    for name, graph in (("encode", encode), ("decode", decode)):
        # The extensions number their graphs and nodes per process: fixed names keep re-exports byte-identical.
        graph.graph.name = f"tokenizer_{name}"
        for node in graph.graph.node:
            node.name = node.op_type
        onnx.save(graph, directory / TOKENIZER_GRAPHS[name])
    return {"graphs": {**TOKENIZER_GRAPHS, "nul_byte_tokens": _nul_byte_tokens(reference, spec)}}


def _set_dims(value: onnx.ValueInfoProto, names: list[str]) -> None:
    shape = value.type.tensor_type.shape
    shape.ClearField("dim")
    for name in names:
        shape.dim.add().dim_param = name


def _extensions_tokenizer_config(path: Path) -> str:
    """tokenizer_config.json as the extensions read it. transformers ≥ 5 saves every tokenizer.json-backed tokenizer as
    class "TokenizersBackend", a name the extensions predate (ONNX Runtime logs an error and no graphs would be
    written); it is what earlier versions called PreTrainedTokenizerFast, and the probes below check the result."""
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return json.dumps(config)


def _bpe_decoder_attributes(tokenizer: Tokenizer, spec: dict) -> dict[str, object]:
    """The BpeDecoder op's attributes: every id's token, the byte-level alphabet, the added and special tokens."""
    vocab = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = spec.get("added_tokens", [])
    return {
        "id_vocab": "\n".join(vocab.get(i, "") for i in range(max(vocab) + 1)),
        "byte_decoder": "\n".join(f"{ord(symbol)}\t{byte}" for byte, symbol in BYTE_SYMBOLS.items()),
        "added_tokens": "\n".join(f"{a['id']}\t{a['content']}" for a in added),
        "all_special_ids": "\n".join(str(a["id"]) for a in added if a.get("special")),
        "skip_special_tokens": 1,
    }


def _nul_byte_tokens(tokenizer: Tokenizer, spec: dict) -> dict[str, str]:
    """id → hex bytes of every vocabulary token whose bytes hold a NUL (where BpeDecoder's output would end)."""
    added = {a["id"] for a in spec.get("added_tokens", [])}
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1])
    return {str(i): bytes(SYMBOL_BYTES[ch] for ch in token).hex() for token, i in vocab
            if BYTE_SYMBOLS[0] in token and i not in added and all(ch in SYMBOL_BYTES for ch in token)}
