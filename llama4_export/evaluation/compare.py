"""`compare`: the artifact's graphs on ONNX Runtime against TensorRT (Polygraphy) — or against PyTorch without TensorRT.

ONNX Runtime runs each graph with the MoE plugin node served by its numpy reference (graph_passes.verify's
onnxruntime-extensions Python op). With TensorRT, a GPU and built engines (manifest `tensorrt` entry) the same inputs
go through the engine with Polygraphy's TrtRunner and the two runs are compared with Polygraphy's Comparator.
Without them it is ORT-only: ONNX Runtime against our PyTorch model rebuilt from the graph's own weights — or, where
the graph passes fused them (an optimized onnxruntime artifact), from the weights the manifest records: the preset's
seeded random weights, or the checkpoint the caller names, its files' hashes checked — exact for fp32/fp16 graphs;
int4 / fp8 / bf16 graphs have no fp32 / fp16 weights to compare against, so they are only run; with a note saying
TensorRT was not compared.

Deviation = max|out − ref| / max|ref| per output (the verification ladder's metric, DESIGN.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from ..artifact import MANIFEST, listed_file, read_manifest
from ..errors import ConfigError
from ..graph_passes.ort_run import run_onnxruntime
from ..graph_passes.verify import executable_copy, sample_feeds
from ..model import io_spec
from ..model.config import Llama4Config
from ..model.modeling import InPlaceKV, KVCache
from ..tensorrt import moe_plugin
from ..tensorrt.engine import tensorrt_problem
from ..tensorrt.errors import BuildError
from ..weights import WeightSource, recorded_source
from .torch_backend import MissingGraphWeights, TorchBackend, as_stored


@dataclass
class Comparison:
    graph: str
    reference: str  # "tensorrt" | "pytorch" | "none"
    deviations: dict[str, float] = field(default_factory=dict)  # output -> max|out - ref| / max|ref|

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.deviations.items(), key=lambda kv: kv[1]) if self.deviations else ("", 0.0)


def graph_feeds(config: Llama4Config, batch: int, new_tokens: int, chunk_slots: int, global_slots: int,
                dtype: np.dtype, seed: int = 0) -> dict[str, np.ndarray]:
    """io_spec inputs: random tokens continuing a partly filled cache (row 1 has two empty global slots), random K/V."""
    rng = np.random.default_rng(seed)
    past = np.tile(np.arange(global_slots, dtype=np.int64), (batch, 1))
    past[1:, -2:] = -1
    chunk_start = (global_slots // chunk_slots) * chunk_slots  # the chunk the new tokens fall in
    chunked = np.full((batch, chunk_slots), -1, np.int64)
    filled = global_slots - chunk_start
    chunked[:, :filled] = np.arange(chunk_start, global_slots)
    feeds = {
        io_spec.INPUT_IDS: rng.integers(0, config.vocab_size, (batch, new_tokens), dtype=np.int64),
        io_spec.POSITIONS: global_slots + np.tile(np.arange(new_tokens, dtype=np.int64), (batch, 1)),
        io_spec.PAST_POSITIONS["global"]: past, io_spec.PAST_POSITIONS["chunked"]: chunked,
    }
    slots = {"chunked": chunk_slots, "global": global_slots}
    for layer in range(config.num_hidden_layers):
        shape = (batch, config.num_key_value_heads, slots[io_spec.attention_kind(config, layer)], config.head_dim)
        feeds[io_spec.past_key(layer)] = rng.standard_normal(shape).astype(dtype)
        feeds[io_spec.past_value(layer)] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph on ONNX Runtime CPU, with its plugin / fused MoE nodes served by the numpy reference."""
    runnable, library = executable_copy(ir.load(path))
    return run_onnxruntime(runnable, feeds, library)


class ReferenceModels:
    """Our PyTorch model per graph: from the graph's own weights, else (built once) from the recorded source."""

    def __init__(self, manifest: dict[str, Any], checkpoint: Path | None):
        self.manifest = manifest
        # a checkpoint given is checked at once (its hashes), before any graph runs
        self.source: WeightSource | None = None if checkpoint is None else recorded_source(manifest, checkpoint)
        self._from_source: torch.nn.Module | None = None

    def for_graph(self, path: Path, config: Llama4Config) -> torch.nn.Module:
        try:
            return TorchBackend.from_onnx_weights(path, config).model
        except MissingGraphWeights:
            if self._from_source is None:
                self.source = self.source or recorded_source(self.manifest, None)  # a preset's, or asks for the checkpoint
                self._from_source = as_stored(self.source, self.manifest)
            return self._from_source

    @property
    def built_from_source(self) -> bool:
        return self._from_source is not None


def run_pytorch(model: torch.nn.Module, config: Llama4Config, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our PyTorch model on the graph's inputs (the torch runtime backend's model)."""
    kinds = [io_spec.attention_kind(config, i) for i in range(config.num_hidden_layers)]
    dtype = model.lm_head.weight.dtype
    keys = [torch.from_numpy(feeds[io_spec.past_key(i)]).to(dtype) for i in range(config.num_hidden_layers)]
    values = [torch.from_numpy(feeds[io_spec.past_value(i)]).to(dtype) for i in range(config.num_hidden_layers)]
    in_place = io_spec.kv_layout_of(feeds) == "in_place"
    if in_place:
        cache = InPlaceKV(keys, values, [torch.from_numpy(feeds[io_spec.PAST_LENGTHS[k]]) for k in kinds])
    else:
        cache = KVCache(keys, values, [torch.from_numpy(feeds[io_spec.PAST_POSITIONS[k]]) for k in kinds])
    with torch.inference_mode():
        logits, new = model(torch.from_numpy(feeds[io_spec.INPUT_IDS]), torch.from_numpy(feeds[io_spec.POSITIONS]), cache)
    out = {io_spec.LOGITS: logits.float().numpy()}
    key, value = (io_spec.present_key, io_spec.present_value) if in_place else (io_spec.new_key, io_spec.new_value)
    for i in range(config.num_hidden_layers):
        out[key(i)], out[value(i)] = new.keys[i].float().numpy(), new.values[i].float().numpy()
    return written_slots(config, feeds, out) if in_place else out


def written_slots(config: Llama4Config, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """In-place outputs cut to what a step wrote: the logits and, per layer, each row's new slots (named new_key.i /
    new_value.i) — the rest of a returned buffer is whatever the caller's memory held."""
    tokens = feeds[io_spec.INPUT_IDS].shape[1]
    cut = {io_spec.LOGITS: outputs[io_spec.LOGITS]}
    for i in range(config.num_hidden_layers):
        lengths = feeds[io_spec.PAST_LENGTHS[io_spec.attention_kind(config, i)]]
        for present, new in ((io_spec.present_key(i), io_spec.new_key(i)), (io_spec.present_value(i), io_spec.new_value(i))):
            cut[new] = np.stack([outputs[present][b, :, n:n + tokens] for b, n in enumerate(lengths)])
    return cut


def deviations(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    result = {}
    for name, ref in reference.items():
        if name not in outputs or outputs[name].shape != ref.shape:
            raise BuildError(f"output {name!r}: shape {getattr(outputs.get(name), 'shape', None)} vs reference {ref.shape}")
        ref64 = ref.astype(np.float64)
        scale = max(float(np.abs(ref64).max(initial=0.0)), np.finfo(np.float32).tiny)
        value = float(np.abs(outputs[name].astype(np.float64) - ref64).max(initial=0.0)) / scale
        result[name] = value if np.isfinite(value) else float("inf")
    return result


def _run_tensorrt(directory: Path, engine: dict[str, Any], feeds: dict[str, np.ndarray], ort_out: dict[str, np.ndarray]):
    """The engine through Polygraphy's TrtRunner on `feeds`; Polygraphy's Comparator against the ORT outputs."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import CompareFunc, Comparator, IterationResult, RunResults
    from polygraphy.exception import PolygraphyException

    moe_plugin.register()
    try:
        with TrtRunner(EngineFromBytes((directory / engine["file"]).read_bytes())) as runner:
            trt_out = {k: np.asarray(v) for k, v in runner.infer(feeds).items()}
    except PolygraphyException as exc:  # how Polygraphy reports a plan it cannot deserialize or run (G_LOGGER.critical)
        raise BuildError(f"{directory / engine['file']}: TensorRT could not run it: {exc}; rebuild the engines here "
                         f"with `llama4-export build {directory}`") from None
    results = RunResults([("onnxruntime", [IterationResult(ort_out, runner_name="onnxruntime")]),
                          ("tensorrt", [IterationResult(trt_out, runner_name="tensorrt")])])
    Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(rtol=1e-2, atol=1e-2))
    return trt_out


def compare_artifact(directory: str | Path, batch: int = 2, prefill_tokens: int = 5, seed: int = 0,
                     checkpoint: str | Path | None = None) -> tuple[list[Comparison], list[str]]:
    """Compare every graph; returns (comparisons, notes). checkpoint: the directory an artifact exported from a
    checkpoint came from, for a PyTorch reference where the graphs no longer hold the weights as the checkpoint
    names them (an optimized fp32 / fp16 artifact without TensorRT engines)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = Llama4Config.from_manifest(manifest, str(directory / MANIFEST))
    if manifest.get("partitions"):  # its graphs are the parts' (they take hidden states and their layers' caches)
        raise BuildError(f"{directory}: a partitioned artifact ({len(manifest['partitions'])} parts); compare runs "
                         "whole-model graphs: export it without --partitions to compare its graphs")
    graphs = manifest.get("graphs") or {}
    engines = (manifest.get("tensorrt") or {}).get("engines") or {}
    if engines:
        problem = tensorrt_problem()
    elif manifest.get("target") == "tensorrt":
        problem = "the artifact has no TensorRT engines yet (llama4-export build)"
    else:
        problem = "the artifact is lowered for onnxruntime (no TensorRT engines)"
    notes = [] if problem is None else [f"ORT-only comparison (against PyTorch): {problem}"]
    kv_dtype = np.dtype(manifest.get("dtypes", {}).get("kv_cache", "float32"))
    chunk = config.attention_chunk_size or 8
    limits = (manifest.get("tensorrt") or {}).get("builder", {}).get("limits")
    chunk_slots, global_slots = (limits["chunk_slots"], limits["global_slots"]) if limits else (chunk, chunk + 6)
    quantized = manifest.get("precision") not in ("fp32", "fp16")
    if checkpoint is not None and quantized and problem is not None:  # it was accepted and nothing was compared
        raise ConfigError(f"--checkpoint: {directory}'s graphs are {manifest.get('precision')}, they compute with "
                          "quantized weights: without TensorRT engines compare only runs them, no PyTorch reference is "
                          "built; their accuracy against the checkpoint is the export's report.json")
    in_place = manifest.get("kv_layout") == "in_place"
    references = ReferenceModels(manifest, Path(checkpoint) if checkpoint is not None else None)
    comparisons = []
    for name in sorted(graphs):
        tokens = graphs[name].get("new_tokens") or prefill_tokens
        rows = min(batch, limits["max_batch"]) if limits else batch
        path = listed_file(directory, manifest, graphs[name].get("file"), f"graphs.{name}.file")
        if in_place:
            feeds = sample_feeds(ir.load(path), seed)
        else:
            feeds = graph_feeds(config, rows, tokens, chunk_slots, global_slots, kv_dtype, seed)
            if io_spec.takes_logits_index(config, range(config.num_hidden_layers), graphs[name].get("new_tokens")):
                feeds[io_spec.LOGITS_INDEX] = np.tile(np.arange(tokens, dtype=np.int64), (rows, 1))  # every token's logits
            image_features = next((v for v in ir.load(path).graph.inputs if v.name == io_spec.IMAGE_FEATURES), None)
            if image_features is not None:  # a text step of a multimodal prefill: no image rows
                feeds[io_spec.IMAGE_FEATURES] = np.zeros((0, config.hidden_size), image_features.dtype.numpy())
        ort_out = run_ort(path, feeds)
        if in_place:
            ort_out = written_slots(config, feeds, ort_out)
        if problem is None and name in engines:
            comparisons.append(Comparison(name, "tensorrt", deviations(_run_tensorrt(directory, engines[name], feeds, ort_out), ort_out)))
        elif quantized:
            notes.append(f"{graphs[name]['file']}: {manifest.get('precision')} weights, no fp32 / fp16 ones to rebuild a "
                         "PyTorch reference from; ran on ONNX Runtime only")
            comparisons.append(Comparison(name, "none", {}))
        else:
            model = references.for_graph(path, config)
            comparisons.append(Comparison(name, "pytorch", deviations(ort_out, run_pytorch(model, config, feeds))))
    if manifest.get("vision"):  # a user would otherwise take the vision tower for checked too
        notes.append(f"{manifest['vision'].get('file', 'vision.onnx')}: the vision encoder is not compared (compare runs "
                     "the text graphs)")
    if references.built_from_source:
        notes.append(f"PyTorch reference: {references.source.describe()} (the graph passes fused the graphs' weights)")
    return comparisons, notes
