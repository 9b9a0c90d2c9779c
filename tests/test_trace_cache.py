"""The on-disk trace cache (export/trace_cache.py): a second export of the same graphs loads them instead of tracing
(the trace was ~2/3 of a scout-tiny export), with byte-identical artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from llama4_export.export import onnx_export, trace_cache
from llama4_export.model.config import checkpoint_configs, get_preset

from .conftest import VISION_FIXTURES


def _texts(graphs: dict) -> dict[str, str]:
    return {name: str(model.graph) for name, model in graphs.items()}


def test_a_trace_is_stored_loaded_equal_and_a_damaged_entry_replaced(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(onnx_export, "_TRACES", {})  # this process's traces: not in front of the disk cache here
    config = get_preset("scout-tiny", 1)
    fresh, cached = onnx_export.traced_graphs(config, torch.float32, range(1))
    [entry] = trace_cache.directory().iterdir()
    assert not cached and sorted(p.name for p in entry.iterdir()) == ["decode.onnx", "entry.json", "prefill.onnx"]
    sizes = {p.name: p.stat().st_size for p in entry.iterdir()}

    monkeypatch.setattr(onnx_export, "_TRACES", {})
    loaded, cached = onnx_export.traced_graphs(config, torch.float32, range(1))
    assert cached and _texts(loaded) == _texts(fresh)
    weights = [v.const_value for v in loaded["decode"].graph.initializers.values() if v.name.startswith("model.")]
    assert weights and all(t.raw.is_meta and isinstance(t.raw, torch.nn.Parameter) for t in weights)  # as traced

    with open(entry / "decode.onnx", "r+b") as f:  # a torn write, a full disk
        f.truncate(sizes["decode.onnx"] // 2)
    monkeypatch.setattr(onnx_export, "_TRACES", {})
    retraced, cached = onnx_export.traced_graphs(config, torch.float32, range(1))
    assert not cached and _texts(retraced) == _texts(fresh)
    assert f"note: trace cache entry {entry} is unreadable" in capfd.readouterr().err
    assert {p.name: p.stat().st_size for p in entry.iterdir()} == sizes and trace_cache.load(entry) is not None
    assert [p.name for p in trace_cache.directory().iterdir()] == [entry.name]  # no temp directory left beside it


def test_a_vision_trace_is_cached_unless_turned_off_or_unwritable(tmp_path, monkeypatch, capfd):
    _, vision = checkpoint_configs(VISION_FIXTURES / "tiny-a")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAMA4_EXPORT_TRACE_CACHE", "off")
    fresh = onnx_export.trace_vision(vision, torch.float32)
    assert not (tmp_path / "cache").exists()
    monkeypatch.delenv("LLAMA4_EXPORT_TRACE_CACHE")
    assert str(onnx_export.trace_vision(vision, torch.float32).graph) == str(fresh.graph)  # stored
    assert str(onnx_export.trace_vision(vision, torch.float32).graph) == str(fresh.graph)  # loaded
    assert len(list(trace_cache.directory().iterdir())) == 1
    (tmp_path / "file").write_text("")  # a cache directory that cannot be made: the export goes on without it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    assert str(onnx_export.trace_vision(vision, torch.float32).graph) == str(fresh.graph)
    assert "exporting without it" in capfd.readouterr().err


def test_the_key_tells_traces_apart():
    config = get_preset("scout-tiny", 2)
    key = lambda *args: trace_cache.entry_key(onnx_export.trace_arguments(*args))  # noqa: E731
    base = key(config, torch.float32, range(2), "positions", None)
    assert base == key(config.replace(name="renamed"), torch.float32, None, "positions", None)  # same graphs
    others = [key(config, torch.float16, range(2), "positions", None),
              key(config, torch.float32, range(1), "positions", None),
              key(config, torch.float32, range(1, 2), "positions", None),
              key(config, torch.float32, range(2), "in_place", None),
              key(config, torch.float32, range(2), "positions", 7),
              key(config.replace(rms_norm_eps=1e-6), torch.float32, range(2), "positions", None)]
    assert len({base, *others}) == 1 + len(others)


def _export(out: Path, cache: Path) -> str:
    done = subprocess.run([sys.executable, "-c", "from llama4_export.cli.export import main; main()", "--model",
                           "scout-tiny", "--layers", "1", "--random-weights", "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache), "LLAMA4_EXPORT_TRACE_CACHE": "on"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_a_second_export_loads_the_trace_and_writes_the_same_bytes(tmp_path):
    first = _export(tmp_path / "a", tmp_path / "cache")
    second = _export(tmp_path / "b", tmp_path / "cache")
    hit = "✓ trace decode + prefill (1 layer, weights on the meta device), from the trace cache ("
    assert not any(line.startswith(hit) for line in first.splitlines())
    assert any(line.startswith(hit) for line in second.splitlines()), second
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert "manifest.json" in map(str, files)
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
