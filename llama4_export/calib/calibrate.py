"""Calibration end to end: corpus → token samples → statistics, through the cache file when it matches."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import corpus as corpus_mod
from .corpus import CalibrationError
from .stats import cache_key, collect_statistics, load_cache, save_cache


@dataclass
class Calibration:
    stats: dict[str, np.ndarray]
    key: str
    settings: dict
    reused: bool  # taken from the cache file
    seconds: float
    cache_path: Path


def tokenizer_for(source, config):
    """The checkpoint's tokenizer.json, or the byte-level tokenizer a preset's artifact gets (also for a checkpoint
    without one, when its special token ids leave room for it)."""
    from tokenizers import Tokenizer

    from ..errors import ConfigError
    from ..export.tokenizer_files import byte_level_tokenizer

    if source.checkpoint is not None and (Path(source.checkpoint) / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(Path(source.checkpoint) / "tokenizer.json"))
    try:
        return byte_level_tokenizer(config)
    except ConfigError as exc:
        raise CalibrationError(
            f"{source.checkpoint}: no tokenizer.json, and {exc}: calibration (awq, fp8) and the accuracy report need "
            "to tokenize text; add the checkpoint's tokenizer.json, or use --precision int4 --int4-algo rtn --no-report"
        ) from None


def calibration_samples(source, config, tokenizer, data: str | Path | None, samples: int | None,
                        seq_len: int | None) -> tuple[np.ndarray, corpus_mod.Corpus]:

    params = _parameters(config)
    samples, seq_len = corpus_mod.sample_plan(params, samples, seq_len, config.max_position_embeddings)
    text = corpus_mod.load_corpus(data, "calibration")
    tokens = corpus_mod.token_stream(text, tokenizer)
    return corpus_mod.cut_samples(tokens, samples, seq_len, text.source), text


def _parameters(config) -> int:
    h, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    per_layer = 4 * h * config.num_attention_heads * config.head_dim + 3 * h * max(i * (e + 1), config.intermediate_size_mlp)
    return config.num_hidden_layers * per_layer + 2 * config.vocab_size * h


def default_cache_path(key: str) -> Path:
    """$XDG_CACHE_HOME/llama4-export/calib/<key>.safetensors (~/.cache when unset): any rebuild of the same model with
    the same data and settings finds it."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llama4-export" / "calib" / f"{key}.safetensors"


def calibrate(model, source, ids: np.ndarray, text: corpus_mod.Corpus, cache_path: str | Path | None,
              progress=None) -> Calibration:
    """Statistics for `model` on the calibration samples `ids` (from calibration_samples), reused from `cache_path`
    (None: default_cache_path) when it holds this very key, else computed and written there."""
    key = cache_key(source.manifest_entry(), text.sha256, *ids.shape)
    cache_path = Path(cache_path) if cache_path is not None else default_cache_path(key)
    settings = {"samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "data": text.source if text.source.startswith("embedded:") else Path(text.source).name,
                "data_sha256": text.sha256}
    start = time.perf_counter()
    cached = load_cache(cache_path, key)
    if cached is not None:
        return Calibration(cached, key, settings, True, time.perf_counter() - start, cache_path)
    stats = collect_statistics(model, ids, progress)
    save_cache(cache_path, stats, key, settings)
    return Calibration(stats, key, settings, False, time.perf_counter() - start, cache_path)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def activation_site(weight_name: str) -> str | None:
    """The statistics site holding the input of the linear with this weight (graph initializer name)."""
    if weight_name == "lm_head.weight":
        return "final_in"
    match = _LAYER.match(weight_name)
    if not match:
        return None
    layer = f"layers.{match.group(1)}"
    for proj, site in (("q_proj", "attn_in"), ("k_proj", "attn_in"), ("v_proj", "attn_in"), ("o_proj", "o_in"),
                       ("gate_proj", "mlp_in"), ("up_proj", "mlp_in"), ("down_proj", "down_in")):
        if f".{proj}.weight" in weight_name and ".experts." not in weight_name:
            return f"{layer}.{site}"
    return None


def activation_amax(stats: dict[str, np.ndarray], weight_names: list[str], percentile: float | None = None) -> dict[str, float]:
    """FP8 input range per linear weight name, from the calibration statistics: the max |x| seen, or with
    `percentile` that percentile of |x| (clips rare outliers for a finer step on the rest)."""
    from .stats import percentile_abs

    out = {}
    for name in weight_names:
        site = activation_site(name)
        if site is not None and f"{site}.amax" in stats:
            out[name] = float(np.max(stats[f"{site}.amax"])) if percentile is None else percentile_abs(stats, site, percentile)
    return out
