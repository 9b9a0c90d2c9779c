"""The sliding cache keeps memory flat: peak RSS after 10×W generated tokens within 5% of 2×W (benchmarks/kv_memory.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "kv_memory.py"


def test_peak_rss_is_flat_past_the_window():
    spec = importlib.util.spec_from_file_location("kv_memory", BENCHMARK)
    kv_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kv_memory)
    short, long = kv_memory.measure(window=64, sinks=4, multiples=(2, 10))
    assert (short["tokens"], long["tokens"]) == (128, 640)
    assert short["cache_bytes"] == long["cache_bytes"]
    # A cache growing with the sequence would add 512 tokens × 128 KB ≈ 64 MiB (~15% of the ~420 MiB baseline).
    assert long["peak_rss_bytes"] <= 1.05 * short["peak_rss_bytes"], (short, long)
