"""The PyTorch reference as a runtime backend: our Llama4ForCausalLM through the same step contract as the exported
graphs (runtime/backends.py) — what the exported graphs are checked against, and a runner for checkpoints that were
never exported (`llama4-run CHECKPOINT --backend torch`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..artifact import MANIFEST, read_manifest
from ..graph_passes.quantize import EMBEDDING, LM_HEAD
from ..graph_passes.weight_layout import TRANSPOSED_SUFFIX
from ..model.config import Llama4Config
from ..model.io_spec import DEFAULT_MAX_PREFILL, DEFAULT_SINKS
from ..model.modeling import KVCache, Llama4ForCausalLM
from ..runtime.errors import GenerationError
from ..runtime.generator import Generator
from ..runtime.kv_cache import SlidingKVCache
from ..runtime.ort_backend import artifact_parts, check_threads
from ..weights import CheckpointWeights, WeightSource, materialize, recorded_source, slices


class TorchBackend:
    name = "torch"

    def __init__(self, model: Llama4ForCausalLM, max_prefill_tokens: int = DEFAULT_MAX_PREFILL):
        self.model = model.eval()
        self.config: Llama4Config = model.config
        dtype = model.lm_head.weight.dtype
        if dtype not in (torch.float32, torch.float16):
            raise GenerationError(f"model dtype {dtype}: the numpy KV cache holds float32 or float16; load the model in one of those")
        self.cache_dtype = np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
        self.max_prefill_tokens = max_prefill_tokens
        self.required_slots: dict[str, int] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, max_prefill_tokens: int = DEFAULT_MAX_PREFILL) -> "TorchBackend":
        return cls(materialize(CheckpointWeights(checkpoint_dir)), max_prefill_tokens)

    @classmethod
    def from_onnx_weights(cls, graph_path: Path, config: Llama4Config,
                          max_prefill_tokens: int = DEFAULT_MAX_PREFILL) -> "TorchBackend":
        """Our PyTorch model with the weights an exported (unquantized) graph carries under their checkpoint names."""
        return cls(materialize(GraphWeights(graph_path, config)), max_prefill_tokens)

    def make_cache(self, batch: int, window: int | None, sinks: int) -> SlidingKVCache:
        return SlidingKVCache(self.config, batch, window, sinks, self.cache_dtype, grow=True)

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache,
                logits_index: np.ndarray | None = None) -> np.ndarray:
        # torch.from_numpy shares memory: the model reads the cache buffers in place.
        kv = KVCache(
            keys=[torch.from_numpy(k) for k in cache.keys],
            values=[torch.from_numpy(v) for v in cache.values],
            positions=[torch.from_numpy(cache.positions[kind]) for kind in cache.kinds],
        )
        with torch.inference_mode():
            index = None if logits_index is None else torch.from_numpy(np.asarray(logits_index, np.int64))
            logits, new = self.model(torch.from_numpy(input_ids), torch.from_numpy(positions), kv, logits_index=index)
        cache.update(positions, [k.numpy() for k in new.keys], [v.numpy() for v in new.values])
        return logits.float().numpy()


class MissingGraphWeights(GenerationError):
    """A graph without every float weight under its checkpoint name (quantized, optimized, or weights merged)."""


class GraphWeights(WeightSource):
    """The initializers of an exported graph that keep their checkpoint names, as a weight source (external data is
    memory-mapped, not read)."""

    def __init__(self, graph_path: Path, config: Llama4Config):
        self.path, self.config = Path(graph_path), config
        self.arrays = onnx_initializers(self.path)
        for name in self.shapes:  # a weight the passes stored transposed for its MatMul (graph_passes/weight_layout.py)
            if name not in self.arrays and name + TRANSPOSED_SUFFIX in self.arrays:
                self.arrays[name] = self.arrays[name + TRANSPOSED_SUFFIX].T
        if config.tie_word_embeddings and EMBEDDING not in self.arrays and LM_HEAD in self.arrays:
            self.arrays[EMBEDDING] = self.arrays[LM_HEAD]  # a tied checkpoint's one tensor is traced under lm_head's name
        missing = sorted(set(self.shapes) - set(self.arrays))
        if missing:
            raise MissingGraphWeights(
                f"{graph_path}: has no initializer {missing[0]!r}, so the torch backend cannot rebuild the model from it "
                "(quantized, optimized by the graph passes, or equal weights merged); run the artifact on onnxruntime, "
                "or the PyTorch reference on the checkpoint it came from (llama4-run CHECKPOINT --backend torch)"
            )
        for name, shape in self.shapes.items():
            if tuple(self.arrays[name].shape) != shape:
                raise GenerationError(f"{graph_path}: initializer {name!r} has shape {list(self.arrays[name].shape)}, "
                                      f"the model needs {list(shape)}")

    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        array = self.arrays[name]
        for index in slices(tuple(array.shape)):
            yield torch.from_numpy(np.array(array[index])).to(dtype)  # np.array: a writable copy of the memory map

    def describe(self) -> str:
        return f"the weights of {self.path}"

    def manifest_entry(self) -> dict[str, Any]:
        return {"graph": self.path.name}


def onnx_initializers(graph_path: Path) -> dict[str, np.ndarray]:
    """Every initializer of an ONNX file as numpy; external data is memory-mapped, not read."""
    try:
        model = onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for damaged files
        raise GenerationError(f"{graph_path}: not a readable ONNX file ({exc}); re-run the export") from None
    maps: dict[str, np.memmap] = {}
    arrays = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            arrays[tensor.name] = numpy_helper.to_array(tensor)
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = graph_path.parent / info["location"]
        if info["location"] not in maps:
            maps[info["location"]] = np.memmap(location, dtype=np.uint8, mode="r")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        arrays[tensor.name] = maps[info["location"]][offset : offset + length].view(dtype).reshape(tuple(tensor.dims))
    return arrays


def as_stored(source: WeightSource, manifest: dict[str, Any]) -> Llama4ForCausalLM:
    """Our model on `source`'s weights rounded as an unquantized artifact stores them (fp16 or fp32), computed in
    fp32 as the model on a graph's own weights is."""
    stored = torch.float16 if manifest.get("precision") == "fp16" else torch.float32
    return materialize(source, stored).float()


def torch_generator(directory: str | Path, window: int | None = None, sinks: int = DEFAULT_SINKS,
                    max_prefill_tokens: int | None = None, threads: int | None = None) -> Generator:
    """`llama4-run DIR --backend torch`: the PyTorch reference on a checkpoint directory, or on the weights of an
    unquantized artifact's decode graph (where the graph passes fused them: a preset artifact's recorded weights).
    threads: torch's intra-op threads, as ONNX Runtime's are set (None / 0: torch's choice)."""
    check_threads(threads)
    if threads:
        torch.set_num_threads(threads)
    directory = Path(directory)
    if not (directory / MANIFEST).is_file() and (directory / "config.json").is_file():
        return Generator.for_backend(TorchBackend.from_checkpoint(directory), directory, window, sinks,
                                     max_prefill_tokens=max_prefill_tokens)
    manifest = read_manifest(directory)
    config = Llama4Config.from_manifest(manifest, str(directory / MANIFEST))
    parts, max_prefill = artifact_parts(directory, manifest, config)
    if len(parts) != 1:
        raise GenerationError(f"{directory}: a partitioned artifact runs on the onnxruntime backend only (got 'torch')")
    try:
        backend = TorchBackend.from_onnx_weights(parts[0].decode, config, max_prefill)
    except MissingGraphWeights:
        if "preset" not in (manifest.get("source") or {}) or manifest.get("precision") not in ("fp32", "fp16"):
            raise  # a checkpoint's artifact: its advice is to run the checkpoint itself
        backend = TorchBackend(as_stored(recorded_source(manifest, None), manifest), max_prefill)
    return Generator.for_backend(backend, directory, window, sinks, manifest.get("precision"), max_prefill_tokens)
