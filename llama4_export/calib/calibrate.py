"""Calibration end to end: corpus → token samples → layer-wise statistics (+ AWQ plans), through the cache when it
matches."""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..artifact import held_directory, remove_abandoned, user_cache_directory
from ..errors import ConfigError
from ..export.tokenizer_files import byte_level_tokenizer
from . import corpus as corpus_mod
from .awq_plans import awq_plans, cached_plans
from .corpus import CalibrationError
from .layerwise import layerwise_statistics
from .stats import cache_key, load_cache, percentile_abs, save_cache


@dataclass
class Calibration:
    stats: dict[str, np.ndarray]  # site statistics without the Gram matrices (stats.py)
    key: str
    settings: dict
    reused: bool  # everything taken from the cache
    seconds: float
    cache_path: Path
    awq_plans: Path | None = None  # directory of the per-layer AWQ plans (awq_plans.py), when int4 AWQ
    awq_records: list[dict] | None = None

    def manifest_entry(self) -> dict:
        return {"key": self.key, **self.settings}


CALIBRATION_TOKENIZES = ("calibration (awq, fp8, an FP8 KV cache) tokenizes text; add the checkpoint's tokenizer.json, "
                         "or use --precision int4 --int4-algo rtn")


def tokenizer_for(source, config, needed_by: str = CALIBRATION_TOKENIZES):
    """The checkpoint's tokenizer.json, or the byte-level tokenizer a preset's artifact gets (also for a checkpoint
    without one, when its special token ids leave room for it). needed_by: what tokenizes text and what to do, for
    the refusal."""
    if source.checkpoint is not None and (Path(source.checkpoint) / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(Path(source.checkpoint) / "tokenizer.json"))
    try:
        return byte_level_tokenizer(config)
    except ConfigError as exc:
        raise CalibrationError(f"{source.checkpoint}: no tokenizer.json, and {exc}: {needed_by}") from None


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
    return user_cache_directory() / "calib" / f"{key}.safetensors"


def plans_directory(cache_path: Path, block: int) -> Path:
    """Where the AWQ plans for block size `block` live beside a statistics cache file."""
    return cache_path.with_name(f"{cache_path.stem}.awq{block}")


def calibrate(source, ids: np.ndarray, text: corpus_mod.Corpus, cache_path: str | Path | None,
              awq_block: int | None = None, progress=None, scratch: Path | None = None) -> Calibration:
    """Statistics of the fp32 model `source` on the calibration samples `ids` (from calibration_samples) and, with
    awq_block, its AWQ plans — computed layer by layer, or reused from the cache at `cache_path` (None:
    default_cache_path) when it holds this very key. scratch: where the routed experts' Gram matrices go meanwhile."""
    key = cache_key(source.manifest_entry(), text.sha256, ids)
    chosen = cache_path is not None
    cache_path = Path(cache_path) if chosen else default_cache_path(key)
    settings = {"samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "data": text.recorded_name,
                "data_sha256": text.sha256}
    start = time.perf_counter()
    try:
        stats = load_cache(cache_path, key)
    except CalibrationError:
        if chosen:  # the user's file: theirs to delete
            raise
        stats = None  # our own cache file, damaged: computed anew and replaced below
    plans, records = None, None
    reused = stats is not None
    if awq_block is not None:
        plans = plans_directory(cache_path, awq_block)
        try:
            records = cached_plans(plans, source.config.num_hidden_layers, key) if plans.is_dir() else None
        except CalibrationError:
            if chosen:  # beside the user's file: theirs
                raise
            records = None  # a damaged plan in our own cache: computed anew and replaced, as the statistics are
        if records is None:
            reused = False
            plans.parent.mkdir(parents=True, exist_ok=True)
            remove_abandoned(plans.parent, [f".{plans.name}.tmp-*"])
            with held_directory(plans.parent, f".{plans.name}.tmp-") as fresh:
                records, computed = awq_plans(source, ids, awq_block, fresh, key, progress, scratch)
                _install_plans(fresh, plans, source.config.num_hidden_layers, key)
            stats = computed if stats is None else stats
    if stats is None:
        stats = layerwise_statistics(source, ids, progress, for_awq=False)
    if not reused:
        try:
            save_cache(cache_path, stats, key, settings)
        except CalibrationError:
            if chosen:
                raise  # the default cache unwritable (a read-only home): the export goes on without it
    return Calibration(stats, key, settings, reused, time.perf_counter() - start, cache_path, plans, records)


def _install_plans(fresh: Path, plans: Path, layers: int, key: str) -> None:
    """Move freshly computed plans into place. Exports that share a cache may calibrate the same inputs at once: plans
    another one installed meanwhile are the same plans and are kept (it may be reading them); only a set made for
    other inputs is replaced."""
    try:
        os.replace(fresh, plans)  # atomic where nothing is there yet
        return
    except OSError:  # a non-empty directory is there
        try:
            if cached_plans(plans, layers, key) is not None:
                return
        except CalibrationError:
            pass  # damaged: replaced
    shutil.rmtree(plans, ignore_errors=True)
    os.replace(fresh, plans)


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
    out = {}
    for name in weight_names:
        site = activation_site(name)
        if site is not None and f"{site}.amax" in stats:
            out[name] = float(np.max(stats[f"{site}.amax"])) if percentile is None else percentile_abs(stats, site, percentile)
    return out
