"""TensorRT optimization profiles for the decode, prefill and vision graphs, from the manifest and the build limits.

One engine per graph, one profile each (the graphs are separate ONNX files with their own fixed/dynamic dims):
  prefill  batch 1…B, new tokens 1…T   (T = --max-prefill, at most the manifest's graphs.prefill.max_new_tokens);
           with a vision graph also image_features 0…B·T rows (a step may hold no image token, or only image tokens)
  decode   batch 1…B, one new token
  vision   pixel_values of 1…M tiles, M = one image's tile budget: the processor's max_patches tiles plus the global
           thumbnail tile when max_patches > 1 (the runtime encodes each image on its own)
The cache dimensions are not ranges: the runtime always hands the whole preallocated buffers over (SlidingKVCache),
so chunk slots = attention_chunk_size (the global window when the model has no chunking) and global slots = the
window W (--window, default runtime.kv_cache.default_window for the KV dtype). An engine therefore serves exactly one
W; `llama4-run --backend tensorrt` uses the W recorded in the manifest.
opt = max: TensorRT tunes kernels at opt, and the largest batch/prompt is what the limits are chosen for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..model import io_spec
from ..model.config import Llama4Config, Llama4VisionConfig
from ..model.io_spec import DEFAULT_SINKS
from ..plan import default_window, planned_window
from .errors import BuildError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRange:
    min: Shape
    opt: Shape
    max: Shape

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class BuildLimits:
    max_batch: int
    max_prefill: int
    chunk_slots: int
    global_slots: int

    def to_json(self) -> dict[str, int]:
        return {"max_batch": self.max_batch, "max_prefill": self.max_prefill, "chunk_slots": self.chunk_slots,
                "global_slots": self.global_slots}


def check_engine_options(max_batch: int, window: int | None) -> None:
    """The limits that need no artifact: checked before an export too, not only once it is written."""
    if max_batch < 1:
        raise BuildError(f"--max-batch {max_batch}: must be at least 1")
    if window is not None and window < DEFAULT_SINKS + 1:
        raise BuildError(f"--window {window}: the global KV window needs at least {DEFAULT_SINKS + 1} slots")


def build_limits(manifest: dict[str, Any], max_batch: int = 1, max_prefill: int | None = None,
                 window: int | None = None, gpu_memory_bytes: int | None = None) -> BuildLimits:
    """Check the limits against the artifact; defaults: the exported prefill limit, and the window the memory planner
    fits on a GPU of gpu_memory_bytes (plan.planned_window) or, without one, the runtime's CPU default window."""
    config = Llama4Config.from_manifest(manifest, "manifest.json")
    graphs = manifest.get("graphs") or {}
    exported = int((graphs.get("prefill") or {}).get("max_new_tokens", 1))
    check_engine_options(max_batch, window)
    max_prefill = exported if max_prefill is None else max_prefill
    if not 1 <= max_prefill <= exported:
        raise BuildError(f"--max-prefill {max_prefill}: must be between 1 and the exported prefill limit {exported} "
                         "(re-export with a larger --max-prefill to go beyond it)")
    itemsize = np.dtype(manifest.get("dtypes", {}).get("kv_cache", "float32")).itemsize
    if window is None and gpu_memory_bytes is None:
        window = default_window(config, itemsize)
    elif window is None:  # the vision engine shares the GPU: its tower and one encode are planned too
        vision = manifest.get("vision") or {}
        tower = Llama4VisionConfig.from_manifest(vision, "manifest.json") if vision else None
        window = planned_window(config, manifest.get("precision", "fp32"), gpu_memory_bytes, itemsize, max_batch,
                                max_prefill, vision=tower, vision_precision=vision.get("precision"))
    check_engine_options(max_batch, window)
    chunk = config.attention_chunk_size or window
    return BuildLimits(max_batch, max_prefill, chunk, window)


def graph_profile(config: Llama4Config, limits: BuildLimits, new_tokens: int | None,
                  vision: bool = False) -> dict[str, ShapeRange]:
    """Shape ranges of every input of one text graph; new_tokens None = dynamic (prefill: 1…max_prefill). vision:
    the artifact has a vision graph (its prefill takes image_features)."""
    b = limits.max_batch
    t_min, t_max = (1, limits.max_prefill) if new_tokens is None else (new_tokens, new_tokens)
    slots = {"chunked": limits.chunk_slots, "global": limits.global_slots}

    def rng(*dims_of_batch_and_tokens: tuple[int, int]) -> ShapeRange:
        low = tuple(lo for lo, _ in dims_of_batch_and_tokens)
        high = tuple(hi for _, hi in dims_of_batch_and_tokens)
        return ShapeRange(low, high, high)

    profile = {
        io_spec.INPUT_IDS: rng((1, b), (t_min, t_max)),
        io_spec.POSITIONS: rng((1, b), (t_min, t_max)),
    }
    for kind, name in io_spec.PAST_POSITIONS.items():
        profile[name] = rng((1, b), (slots[kind], slots[kind]))
    kvh, d = config.num_key_value_heads, config.head_dim
    for layer in range(config.num_hidden_layers):
        n = slots[io_spec.attention_kind(config, layer)]
        for name in (io_spec.past_key(layer), io_spec.past_value(layer)):
            profile[name] = rng((1, b), (kvh, kvh), (n, n), (d, d))
    if io_spec.takes_logits_index(config, range(config.num_hidden_layers), new_tokens):
        profile[io_spec.LOGITS_INDEX] = rng((1, b), (1, t_max))  # one column per row to every column
    if io_spec.takes_image_features(range(config.num_hidden_layers), new_tokens, vision):
        profile[io_spec.IMAGE_FEATURES] = rng((0, b * t_max), (config.hidden_size, config.hidden_size))
    return profile


def vision_profile(entry: dict[str, Any]) -> dict[str, ShapeRange]:
    """The vision graph's one input from the manifest's `vision` entry: 1…tile budget tiles of [C, S, S]."""
    try:
        config, processor = entry["config"], entry["processor"]
        channels, size, max_patches = int(config["num_channels"]), int(config["image_size"]), int(processor["max_patches"])
    except (KeyError, TypeError, ValueError):
        raise BuildError("manifest.json: the vision entry lacks num_channels / image_size / max_patches; re-run the "
                         "export") from None
    tiles = max_patches + (1 if max_patches > 1 else 0)
    return {io_spec.PIXEL_VALUES: ShapeRange((1, channels, size, size), (tiles, channels, size, size),
                                             (tiles, channels, size, size))}


def engine_graphs(manifest: dict[str, Any]) -> dict[str, str]:
    """{graph name: ONNX file} of every graph that gets an engine: the text graphs, and the vision graph if any."""
    graphs = {name: entry["file"] for name, entry in (manifest.get("graphs") or {}).items()}
    if manifest.get("vision"):
        graphs["vision"] = manifest["vision"]["file"]
    return graphs


def engine_profiles(manifest: dict[str, Any], limits: BuildLimits) -> dict[str, dict[str, ShapeRange]]:
    """{graph name: {input: ShapeRange}} for every graph the manifest lists (engine_graphs)."""
    config = Llama4Config.from_manifest(manifest, "manifest.json")
    graphs = manifest.get("graphs") or {}
    vision = bool(manifest.get("vision"))
    profiles = {name: graph_profile(config, limits, graphs[name].get("new_tokens"), vision) for name in sorted(graphs)}
    if vision:
        profiles["vision"] = vision_profile(manifest["vision"])
    return profiles
