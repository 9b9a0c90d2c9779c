"""Activation statistics of the PyTorch model on calibration samples (accumulated by calib/layerwise.py), and their
cache file.

Sites (one per distinct linear input; `L` = layer index):
  layers.L.attn_in         input of q/k/v_proj (input_layernorm output)            [H]
  layers.L.o_in            input of o_proj                                         [heads·D]
  layers.L.mlp_in          post_attention_layernorm output: dense/shared gate+up, router   [H]
  layers.L.down_in         input of the dense MLP's / shared expert's down_proj    [I]
  layers.L.expert_in       routed expert e's input x·sigmoid(logit), tokens routed to e   [E, H]
  layers.L.expert_down_in  routed expert e's down_proj input                       [E, I]
  final_in                 lm_head input
  layers.L.new_key         the keys the graph emits as new_key.L (after RoPE / QK norm)   [head_dim]
  layers.L.new_value       the values it emits as new_value.L (FP8 KV cache scales)        [head_dim]
For each site: `.amax` (max |x|, per tensor; per expert for expert sites), `.mean_abs` (mean |x| per input channel,
AWQ's activation salience), `.gram` (Σ x xᵀ / tokens, so the output MSE of any weight perturbation ΔW is
tr(ΔW Σ ΔWᵀ) exactly: AWQ's scale search needs no stored activations) and, for the non-expert sites (FP8 activation
scales), `.abs_hist`: counts of |x| on a fixed log2 grid (HIST_BINS_PER_OCTAVE bins per octave from 2^HIST_MIN_EXP;
zeros and smaller values in bin 0, larger in the last), so a percentile of |x| is known to 2^(1/32) ≈ 2 % without
storing activations. Accumulated in float64, stored float32. The routed experts' Gram matrices are kept per expert
(`ExpertGrams`), in memory or on disk.

Cache file: safetensors, the statistics above by name except the Gram matrices (only AWQ's search reads them, and
its plans are cached beside this file), one metadata entry holding json {"key": sha256 of (format, model id, data
hash, samples, seq_len, token ids), "settings": ...}. Same inputs ⇒ byte-identical file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..artifact import check_writable, replaced_file
from .corpus import CalibrationError

CACHE_FORMAT = "llama4-export-calib-4"  # 4: no Gram matrices (AWQ plans are cached beside the statistics)
HIST_BINS_PER_OCTAVE = 32
HIST_MIN_EXP, HIST_MAX_EXP = -24, 24
HIST_BINS = (HIST_MAX_EXP - HIST_MIN_EXP) * HIST_BINS_PER_OCTAVE
METADATA = "llama4_export_calibration"


def cache_key(model_id: dict, data_sha256: str, ids: np.ndarray) -> str:
    """Keyed by the token ids themselves, not only the text: the same text under another tokenizer (a checkpoint's
    tokenizer.json is not among the weight files its identity hashes) gives other samples."""
    samples, seq_len = ids.shape
    ids_sha256 = hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()
    blob = json.dumps({"format": CACHE_FORMAT, "model": model_id, "data": data_sha256, "samples": samples,
                       "seq_len": seq_len, "ids": ids_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class Accumulator:
    def __init__(self, grams: bool = True):
        self.grams = grams
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.amax: dict[str, torch.Tensor] = {}

    def add(self, site: str, x: torch.Tensor, slot: int | None = None, slots: int = 0) -> None:
        """x [tokens, C]; slot: the expert index for per-expert sites (then stats are [slots, ...])."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        channels = x.shape[-1]
        if site not in self.counts:
            lead = (slots,) if slot is not None else ()
            self.sums[site + ".mean_abs"] = torch.zeros(*lead, channels, dtype=torch.float64)
            if self.grams:
                self.sums[site + ".gram"] = torch.zeros(*lead, channels, channels, dtype=torch.float64)
            self.counts[site] = torch.zeros(lead, dtype=torch.float64)
            self.amax[site] = torch.zeros(lead, dtype=torch.float64)
        index = (slot,) if slot is not None else ()
        if x.shape[0] == 0:
            return
        self.sums[site + ".mean_abs"][index] += x.abs().sum(0)
        if self.grams:
            self.sums[site + ".gram"][index] += x.T @ x
        if slot is None:
            bins = ((torch.log2(x.abs().clamp(min=2.0 ** HIST_MIN_EXP)) - HIST_MIN_EXP) * HIST_BINS_PER_OCTAVE).floor()
            counts = torch.bincount(bins.clamp(0, HIST_BINS - 1).long().flatten(), minlength=HIST_BINS)
            self.sums[site + ".abs_hist"] = self.sums.get(site + ".abs_hist", 0) + counts.double()
        self.counts[site][index] += x.shape[0]
        self.amax[site][index] = torch.maximum(self.amax[site][index], x.abs().max())

    def result(self) -> dict[str, np.ndarray]:
        out = {}
        for site, count in self.counts.items():
            denom = count.clamp(min=1)
            out[site + ".mean_abs"] = (self.sums[site + ".mean_abs"] / denom[..., None]).float().numpy()
            if self.grams:
                out[site + ".gram"] = (self.sums[site + ".gram"] / denom[..., None, None]).float().numpy()
            out[site + ".amax"] = self.amax[site].float().numpy().reshape(count.shape)
            out[site + ".tokens"] = count.float().numpy()
            if site + ".abs_hist" in self.sums:
                out[site + ".abs_hist"] = self.sums[site + ".abs_hist"].float().numpy()
        return out


def percentile_abs(stats: dict[str, np.ndarray], site: str, percentile: float) -> float:
    """The `percentile` of |x| at `site` from its histogram: the upper edge of the bin where the cumulative count
    reaches it (≤ 2^(1/32) above the exact value), never above the site's amax."""
    hist = stats[site + ".abs_hist"].astype(np.float64)
    cumulative = np.cumsum(hist)
    k = int(np.searchsorted(cumulative, percentile / 100 * cumulative[-1]))
    upper = 2.0 ** (HIST_MIN_EXP + (min(k, HIST_BINS - 1) + 1) / HIST_BINS_PER_OCTAVE)
    return float(min(upper, np.max(stats[site + ".amax"])))


def kv_cache_amax(stats: dict[str, np.ndarray], layers: int) -> dict[int, tuple[float, float]]:
    """Per layer (max |new_key|, max |new_value|) seen in calibration: the FP8 KV cache's scales are these / 448."""
    missing = [f"layers.{i}.new_key.amax" for i in range(layers) if f"layers.{i}.new_key.amax" not in stats]
    if missing:
        raise CalibrationError(f"calibration statistics have no {missing[0]!r} (made by an older version); delete the "
                               "calibration cache or give another --calib-cache to recalibrate")
    # np.max: a 0-d amax comes back from the cache file as shape [1]
    return {i: (float(np.max(stats[f"layers.{i}.new_key.amax"])), float(np.max(stats[f"layers.{i}.new_value.amax"])))
            for i in range(layers)}


class ExpertGrams:
    """The Gram matrices of one routed-expert site, expert by expert ([E, K, K] would be GBs at Scout's shapes): held
    in memory, or written to `directory` as each expert's is finished and read back one expert at a time."""

    def __init__(self, site: str, experts: int, directory: Path | None = None):
        self.site, self.directory = site, None if directory is None else Path(directory)
        self._held: list[np.ndarray | None] = [None] * experts

    def __len__(self) -> int:
        return len(self._held)

    def _path(self, expert: int) -> Path:
        return self.directory / f"{self.site}.{expert}.npy"

    def put(self, expert: int, gram: np.ndarray) -> None:
        if self.directory is None:
            self._held[expert] = gram
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            np.save(self._path(expert), gram)

    def __getitem__(self, expert: int) -> np.ndarray:
        held = self._held[expert]
        return held if held is not None else np.load(self._path(expert))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        stacked = np.stack([self[e] for e in range(len(self))])
        return stacked if dtype is None else stacked.astype(dtype)


def save_cache(path: Path, stats: dict[str, np.ndarray], key: str, settings: dict) -> None:
    from safetensors.numpy import save_file

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a temp file of its own: exports sharing the cache may save the same statistics at once (one fixed temp name
        # had them write one file together and the second rename fail)
        with replaced_file(path) as tmp:
            # One metadata entry: safetensors writes a metadata map in hash order, so two entries would make the bytes
            # vary.
            save_file({k: np.ascontiguousarray(stats[k]) for k in sorted(stats)}, tmp,
                      metadata={METADATA: json.dumps({"key": key, "settings": settings}, sort_keys=True)})
    except Exception as exc:  # OSError, or safetensors' own error type wrapping one
        raise CalibrationError(f"{path}: cannot write the calibration cache there ({exc}); give a writable "
                               "--calib-cache") from None


def check_cache_writable(path: Path) -> None:
    """CalibrationError unless a cache file can be written at `path` (before a calibration of hours, not after); its
    missing directories are created, as save_cache creates them."""
    check_writable(path, "--calib-cache", CalibrationError, create_parent=True)


def load_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached statistics when `path` holds a cache for `key`; None when absent or made for other inputs (then
    replaced). CalibrationError when it is damaged or no calibration cache at all (a checkpoint shard, say)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "np") as f:
            metadata = f.metadata() or {}
        if METADATA not in metadata:  # someone's other safetensors file: never to be overwritten
            raise CalibrationError(f"{path}: a safetensors file but no calibration cache (no {METADATA!r} metadata), "
                                   "which the export would overwrite; give another --calib-cache")
        if json.loads(metadata[METADATA]).get("key") != key:
            return None
        return load_file(str(path))
    except CalibrationError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CalibrationError(f"{path}: not a readable calibration cache ({exc}); delete it or give another --calib-cache") from None
