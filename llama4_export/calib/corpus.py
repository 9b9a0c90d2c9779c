"""Calibration and evaluation text: files given by the user, or an embedded default corpus that works offline.

Accepted inputs (--calib-data / --eval-data): a UTF-8 text file, a JSONL file whose records have a string field
`text`, or a directory of *.txt / *.jsonl files, its subdirectories' too (read in path order; suffixes in any case).
The embedded default is real English prose: the docstrings of a fixed list of the installed Python's standard-library
modules, collected in name order (so the same Python gives the same text). Every 5th docstring is held out for the
accuracy report and never calibrated on.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Llama4ExportError


class CalibrationError(Llama4ExportError):
    """Calibration/evaluation data is missing, unreadable or too short, or a quantization setting is unsupported."""


DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
# Modules with long, prose-like documentation; the order does not matter (sorted below), the set fixes the corpus.
_STDLIB_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client", "imaplib",
    "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "multiprocessing", "numbers", "optparse",
    "os", "pathlib", "pickle", "pydoc", "queue", "random", "re", "shutil", "smtplib", "socket", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tkinter", "turtle", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "xml.dom.minidom", "zipfile",
)
_HELD_OUT_EVERY = 5


@dataclass(frozen=True)
class Corpus:
    texts: tuple[str, ...]
    source: str  # "embedded:calibration", "embedded:heldout" or the path given

    @property
    def recorded_name(self) -> str:
        """How artifacts name this text: the embedded split, or a file's name alone (no path in an artifact)."""
        return self.source if self.source.startswith("embedded:") else Path(self.source).name

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def _stdlib_docstrings() -> tuple[str, ...]:
    docs: dict[str, None] = {}  # ordered set: a docstring shared by aliases counts once
    with warnings.catch_warnings():  # deprecated names warn when read (typing.io, typing.re): not the user's concern
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in sorted(_STDLIB_MODULES):
            _add_docstrings(module_name, docs)
    return tuple(docs)


def _add_docstrings(module_name: str, docs: dict[str, None]) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # e.g. tkinter absent from a slim Python: the corpus is just shorter
        return
    objects = [module] + [getattr(module, name) for name in sorted(vars(module)) if not name.startswith("_")]
    for obj in objects:
        if obj is not module and getattr(obj, "__module__", None) != module_name:
            continue  # re-exported from elsewhere: counted under its own module, if listed
        # classes and functions defined in this module (submodule attributes come and go with other imports)
        own = obj.__doc__ if (obj is module or inspect.isclass(obj) or inspect.isfunction(obj)) else None
        doc = inspect.cleandoc(own) if isinstance(own, str) else None  # own, not inherited from a base class
        if doc and len(doc) >= 200:
            docs[doc] = None


def embedded_corpus(split: str) -> Corpus:
    """The standard-library docstring corpus: split "calibration" (4 of 5 docstrings) or "heldout" (the 5th)."""
    docs = _stdlib_docstrings()
    held = split == "heldout"
    return Corpus(tuple(d for i, d in enumerate(docs) if (i % _HELD_OUT_EVERY == _HELD_OUT_EVERY - 1) == held),
                  f"embedded:{split}")


def load_corpus(path: str | Path | None, split: str = "calibration") -> Corpus:
    """Texts from a file or directory (see the module docstring); the embedded corpus's `split` when path is None."""
    if path is None:
        return embedded_corpus(split)
    path = Path(path)
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise CalibrationError(f"{path}: directory holds no .txt or .jsonl files; give a text file, a JSONL file or a directory of them")
        for f in files:  # a data file skipped would calibrate on less than was given
            if not f.is_file():
                raise CalibrationError(f"{f}: not a regular file (a broken or looping symbolic link, a pipe?); remove "
                                       "it or point it at the text")
    elif path.is_file():
        files = [path]
    elif path.exists():  # a pipe (/dev/stdin, a shell's <(...)), a device: was "no such file or directory"
        raise CalibrationError(f"{path}: not a regular file (a pipe or a device); save the text to a file and give "
                               "that, or a directory of them")
    else:
        raise CalibrationError(f"{path}: no such file or directory; give a text file, a JSONL file (field 'text') or a directory of them")
    texts = [text for f in files for text in _read_texts(f)]
    if not any(t.strip() for t in texts):
        raise CalibrationError(f"{path}: contains no text; give a file with ordinary prose")
    return Corpus(tuple(texts), str(path))


def _data_files(directory: Path) -> list[Path]:
    """The directory's *.txt / *.jsonl, subdirectories' too (os.walk follows no symbolic link: no loop), by path."""
    def unreadable(exc: OSError) -> None:
        raise CalibrationError(f"{exc.filename}: cannot list it ({exc.strerror or exc}); make it readable")

    return sorted(Path(root) / name for root, _, names in os.walk(directory, onerror=unreadable) for name in names
                  if Path(name).suffix.lower() in (".txt", ".jsonl"))


def _read_texts(path: Path) -> list[str]:
    try:
        # a leading byte order mark (Windows editors write one) is no text, and json.loads refuses it
        raw = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read it ({exc.strerror or exc}); make it readable") from None
    if path.suffix.lower() != ".jsonl":
        return [raw]
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{number}: not valid JSON ({exc.msg}); one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f"{path}:{number}: record has no string field 'text'; each JSONL line needs {{\"text\": ...}}")
        texts.append(record["text"])
    return texts


def token_stream(corpus: Corpus, tokenizer) -> np.ndarray:
    """All texts tokenized (no special tokens) and concatenated: int64 [tokens]."""
    ids = [i for text in corpus.texts for i in tokenizer.encode(text, add_special_tokens=False).ids]
    return np.asarray(ids, dtype=np.int64)


def sample_plan(model_params: int, samples: int | None, seq_len: int | None, max_seq_len: int) -> tuple[int, int]:
    """(samples, seq_len): the given values, else 128 × 512 scaled down for tiny models (a 1M-parameter model needs
    far fewer tokens to see its activation ranges, and calibrating it must stay fast)."""
    scale = min(1.0, max(model_params / 1e9, 1 / 16))
    default_samples = max(8, int(DEFAULT_SAMPLES * scale))
    default_len = min(max_seq_len, max(128, int(DEFAULT_SEQ_LEN * scale)))
    samples = default_samples if samples is None else samples
    seq_len = default_len if seq_len is None else seq_len
    if samples < 1 or seq_len < 2:
        raise CalibrationError(f"--calib-samples {samples} / --calib-seq-len {seq_len}: need at least 1 sample of 2 tokens")
    if seq_len > max_seq_len:  # positions the model was never trained on: statistics of nothing it will see
        raise CalibrationError(f"--calib-seq-len {seq_len}: longer than the model's context of {max_seq_len} tokens "
                               f"(max_position_embeddings); choose at most {max_seq_len}")
    return samples, seq_len


def cut_samples(tokens: np.ndarray, samples: int, seq_len: int, source: str) -> np.ndarray:
    """[samples, seq_len] consecutive windows; when the text is longer than needed, windows spread evenly over it.
    Fewer tokens than one sample is an error; fewer than `samples` windows uses what there is."""
    if len(tokens) < seq_len:
        raise CalibrationError(
            f"{source}: {len(tokens)} tokens, fewer than one sample of --calib-seq-len {seq_len}; give at least "
            f"{seq_len} tokens of text (or lower --calib-seq-len)"
        )
    available = len(tokens) // seq_len
    starts = np.linspace(0, (available - 1) * seq_len, min(samples, available)).astype(np.int64) // seq_len * seq_len
    return np.stack([tokens[s : s + seq_len] for s in starts])
