"""Traced graphs kept on disk across processes: $XDG_CACHE_HOME/llama4-export/traces/<key>/ (~/.cache when unset;
`LLAMA4_EXPORT_TRACE_CACHE=off` bypasses it). A trace costs seconds per layer (minutes at Scout's size) and depends
only on its arguments and on the code and library versions that ran it, which is what the key hashes.

An entry is one plain ONNX file per graph (any ONNX tool opens it; nothing is ever unpickled) and entry.json. The
trace's weights are data-less meta tensors: stored as initializers with name, type and dims but no data, and listed
in entry.json (dtype, shape, parameter or buffer), from which loading rebuilds them as the trace made them; the
constants the trace computed are stored with their data. entry.json also holds each file's sha256: a damaged entry
(a truncated file still parses when cut at a field boundary) is traced anew and replaced, never an error. Entries
are written into a temp directory beside the final one and renamed into place, so none looks complete before it is.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx_ir as ir
import torch
from torch.onnx._internal.exporter._core import TorchTensor  # what the exporter wraps parameters in

from ..artifact import ArtifactError, held_directory, remove_abandoned, user_cache_directory, write_json

ENVIRONMENT = "LLAMA4_EXPORT_TRACE_CACHE"  # "off": trace every time, write nothing
ENTRY = "entry.json"
FORMAT = 1  # of an entry's files; part of the key
_PACKAGES = ("llama4-export", "torch", "onnxscript", "onnx-ir", "onnx")
# The package code a trace runs: the model and the exporter (export imports nothing else of this package). Hashed
# as source bytes, not only by version: an edited checkout keeps its version number.
_TRACED_CODE = ("model", "export")


def enabled() -> bool:
    return os.environ.get(ENVIRONMENT, "").strip().lower() != "off"


def directory() -> Path:
    return user_cache_directory() / "traces"


def config_fields(config: Any) -> dict[str, Any]:
    """A config dataclass's compared fields (as its == sees them: the display name is left out), nested ones as
    dicts."""
    values = dataclasses.asdict(config)
    return {f.name: values[f.name] for f in dataclasses.fields(config) if f.compare}


@functools.cache
def _code_fingerprint() -> str:
    digest = hashlib.sha256()
    for package in _PACKAGES:
        try:
            digest.update(f"{package}=={metadata.version(package)}\n".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{package} absent\n".encode())
    digest.update(f"python {sys.version_info[:2]}\n".encode())
    root = Path(__file__).resolve().parents[1]
    for path in sorted(p for part in _TRACED_CODE for p in (root / part).rglob("*.py")):
        source = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()} {len(source)}\n".encode())
        digest.update(source)
    return digest.hexdigest()


def entry_key(arguments: dict[str, Any]) -> str:
    """sha256 over a trace's arguments (JSON, sorted keys) and the code that traces them."""
    text = json.dumps({"arguments": arguments, "code": _code_fingerprint(), "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def cached(arguments: dict[str, Any], trace: Callable[[], dict[str, ir.Model]]) -> tuple[dict[str, ir.Model], bool]:
    """The graphs of the trace `arguments` describes: from the cache (True), else from `trace()`, stored (False)."""
    if not enabled():
        return trace(), False
    path = directory() / entry_key(arguments)
    graphs = load(path)
    if graphs is not None:
        return graphs, True
    graphs = trace()
    store(path, graphs)
    return graphs, False


def load(path: Path) -> dict[str, ir.Model] | None:
    """The entry's graphs, or None when it is missing or damaged (a note on stderr for the latter)."""
    if not path.is_dir():
        return None
    try:
        entry = json.loads((path / ENTRY).read_text(encoding="utf-8"))
        graphs = {}
        for name, weights in entry["graphs"].items():
            data = (path / f"{name}.onnx").read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"][name]:
                raise ValueError(f"{name}.onnx does not match its sha256")
            graphs[name] = _restored(ir.serde.deserialize_model(onnx.load_model_from_string(data)), weights)
        return graphs
    except Exception as exc:  # whatever the damage (a torn file, a foreign one): trace anew, as with no entry
        print(f"note: trace cache entry {path} is unreadable ({type(exc).__name__}: {exc}); tracing anew",
              file=sys.stderr)
        return None


def store(path: Path, graphs: dict[str, ir.Model]) -> None:
    """Write the entry at `path` (replacing a damaged one there). A cache that cannot be written costs only the next
    trace: one note on stderr, no error; of concurrent writers of one key, the first rename wins."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(parent, [".*.tmp-*", ".*.old-*"])  # left by writers killed before their rename
        with held_directory(parent, f".{path.name}.tmp-") as tmp:
            entry: dict[str, Any] = {"format": FORMAT, "graphs": {}, "sha256": {}}
            for name, model in graphs.items():
                data, weights = _serialized(model)
                (tmp / f"{name}.onnx").write_bytes(data)
                entry["graphs"][name], entry["sha256"][name] = weights, hashlib.sha256(data).hexdigest()
            write_json(tmp / ENTRY, entry)
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep the entry from other users of a shared cache
            if path.exists():  # the damaged entry load() refused: moved aside first, as a rename cannot replace it
                aside = parent / f".{path.name}.old-{os.getpid()}"
                try:
                    os.rename(path, aside)
                    shutil.rmtree(aside, ignore_errors=True)
                except OSError:
                    pass  # another process moved it first
            try:
                os.rename(tmp, path)
            except OSError:
                pass  # another process's entry took its place first; held_directory removes ours
    except (OSError, ArtifactError) as exc:
        print(f"note: trace cache {parent} is not writable ({getattr(exc, 'strerror', None) or exc}); exporting "
              f"without it", file=sys.stderr)


def _is_meta(tensor: Any) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and raw.is_meta


def _serialized(model: ir.Model) -> tuple[bytes, dict[str, list]]:
    """The model as ONNX bytes, its meta weights as data-less initializers; and those weights' name → [torch dtype,
    shape, is a parameter]. The model is left as it was."""
    weights, swapped = {}, {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if _is_meta(tensor):
            weights[value.name] = [str(tensor.raw.dtype).removeprefix("torch."), list(tensor.raw.shape),
                                   isinstance(tensor.raw, torch.nn.Parameter)]
            swapped[value] = tensor
            # An external tensor serializes without reading data; its file reference is dropped below.
            value.const_value = ir.ExternalTensor("", None, None, tensor.dtype, shape=tensor.shape, name=value.name)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped.items():
            value.const_value = tensor
    for tensor_proto in proto.graph.initializer:
        if tensor_proto.name in weights:
            tensor_proto.ClearField("external_data")
            tensor_proto.ClearField("data_location")
    return proto.SerializeToString(deterministic=True), weights


def _restored(model: ir.Model, weights: dict[str, list]) -> ir.Model:
    """Initializers as the trace had them: meta weights wrapped as the exporter wraps them, constants in memory."""
    initializers = model.graph.initializers
    if not set(weights) <= set(initializers):
        raise ValueError(f"weights missing from the graph: {sorted(set(weights) - set(initializers))[:3]}")
    for value in initializers.values():
        tensor = value.const_value
        if value.name in weights:
            dtype, shape, parameter = weights[value.name]
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"{value.name}: {dtype!r} is no torch dtype")
            raw = torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            value.const_value = TorchTensor(torch.nn.Parameter(raw, requires_grad=False) if parameter else raw,
                                            name=value.name)
        else:
            value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name)
    return model
