"""TensorRT backend: the artifact's engines (engine/decode.plan, engine/prefill.plan) through the TensorRT Python API.

    gen = Generator.load("out/scout-int4-trt", backend="tensorrt")   # or: llama4-run DIR --backend tensorrt

- Device buffers are torch CUDA tensors, handed to TensorRT by address (IExecutionContext.set_tensor_address) and
  run with execute_async_v3 on a torch stream.
- The sliding KV cache lives on the GPU: DeviceSlidingKVCache keeps the runtime's slot bookkeeping (positions,
  lengths: small, on the host) and the K/V buffers as CUDA tensors; the engines read them in place and the new K/V
  they return are scattered into them on the GPU (the Generator creates the cache through `make_cache`).
- Decode is CUDA-graph captured per (cache, batch): its shapes never change (one token, fixed cache buffers), so the
  inputs are copied into static device buffers and the captured graph is replayed. TensorRT needs one ordinary
  enqueue before capture (lazy initialisation), which the first decode step is. Prefill shapes vary: never captured.
  Nor is a decode engine holding the MoE plugin: its Python impl allocates its grouping tensors from torch's caching
  allocator on TensorRT's stream, outside any capture pool (capture untested: no GPU run yet). Engines of the --trt-fallback lowering
  (standard ops only) are captured.
- The engines must have been built for this cache: the manifest's `tensorrt.builder.limits` (chunk/global slots, max
  batch, max prefill) become the backend's required_slots and limits.
- A multimodal artifact's prefill engine takes image_features: the step's rows (the vision graph runs in the
  Generator's ImageEncoder), zero rows for a text step, bound from a buffer of at least one row (a non-null address).

Written to the TensorRT 10.x Python API documentation; it needs TensorRT, torch with CUDA and a GPU, so CI covers only
its error paths (no TensorRT here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..model import io_spec
from ..model.config import Llama4Config
from ..tensorrt import moe_plugin
from ..tensorrt.engine import PARTITIONED_ENGINES, has_plugin_nodes, missing_tensorrt_message
from .errors import GenerationError
from .kv_cache import SlidingKVCache


def tensor_address(tensor) -> int:
    """The device address TensorRT gets for `tensor`: its storage's address for an empty one too. torch reports
    data_ptr() 0 for a tensor without elements, and enqueueV3 needs a non-null address for every input (even a 0-row
    one), per IExecutionContext::setTensorAddress in NvInferRuntime.h (TensorRT 10.x)."""
    return tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()


class DeviceSlidingKVCache(SlidingKVCache):
    """SlidingKVCache whose K/V buffers are CUDA tensors (positions and lengths stay numpy: the policy runs on the host)."""

    def __init__(self, config: Llama4Config, batch: int, window: int | None, sinks: int, dtype, device):
        import torch

        super().__init__(config, batch, window, sinks, dtype)  # np.zeros: host pages are never touched, then dropped
        torch_dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[self.dtype]
        self.keys = [torch.zeros(k.shape, dtype=torch_dtype, device=device) for k in self.keys]
        self.values = [torch.zeros_like(k) for k in self.keys]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() for k in self.keys + self.values) + \
            sum(p.nbytes for p in self.positions.values())

    def update(self, positions: np.ndarray, new_keys: list, new_values: list) -> None:
        # The base class indexes buffers[b][:, slots] = new[b][:, src] with numpy index arrays: torch accepts the same
        # expressions on CUDA tensors, so the scatter happens on the GPU.
        super().update(positions, new_keys, new_values)


class TrtBackend:
    name = "tensorrt"

    def __init__(self, directory: Path, manifest: dict[str, Any], config: Llama4Config, max_prefill_tokens: int,
                 cuda_graphs: bool = True):
        if manifest.get("partitions"):
            raise GenerationError(f"--backend tensorrt: {directory} is a partitioned artifact; {PARTITIONED_ENGINES}")
        problem = missing_tensorrt_message()
        if problem is not None:
            raise GenerationError(f"--backend tensorrt: {problem}")
        info = manifest.get("tensorrt") or {}
        engines = info.get("engines") or {}
        if "decode" not in engines:
            raise GenerationError(f"{directory}: has no TensorRT engines; build them with `llama4-export build {directory}`")
        import tensorrt as trt
        import torch

        self.config, self.torch, self.trt = config, torch, trt
        self.device = torch.device("cuda", torch.cuda.current_device())
        moe_plugin.register()  # harmless when no engine holds the plugin
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for name, entry in sorted(engines.items()):
            engine = runtime.deserialize_cuda_engine((directory / entry["file"]).read_bytes())
            if engine is None:
                raise GenerationError(f"{directory / entry['file']}: TensorRT {trt.__version__} cannot load it (built with "
                                      f"TensorRT {info.get('version')} on {info.get('gpu', {}).get('name')}); rebuild it here")
            context = engine.create_execution_context()
            if context is None:  # TensorRT returns None when it cannot allocate the context (device memory)
                raise GenerationError(f"{directory / entry['file']}: TensorRT could not create an execution context "
                                      "(out of GPU memory? its log says why); free GPU memory, or rebuild the engines with a "
                                      "smaller --max-batch or --window")
            self.engines[name], self.contexts[name] = engine, context
        limits = info["builder"]["limits"]
        self.max_batch = int(limits["max_batch"])
        self.max_prefill_tokens = min(max_prefill_tokens, int(limits["max_prefill"])) if "prefill" in self.engines else 1
        self.required_slots = {"chunked": int(limits["chunk_slots"]), "global": int(limits["global_slots"])}
        self.cache_dtype = np.dtype(manifest.get("dtypes", {}).get("kv_cache", "float32"))
        self.stream = torch.cuda.Stream(device=self.device)
        # see the module docstring
        self.cuda_graphs = cuda_graphs and not has_plugin_nodes(directory / engines["decode"]["graph"])
        prefill = self.engines.get("prefill")
        self.takes_image_features = prefill is not None and io_spec.IMAGE_FEATURES in {
            prefill.get_tensor_name(i) for i in range(prefill.num_io_tensors)}
        self._decode_graph: tuple | None = None  # (cache, static inputs, outputs, CUDAGraph)

    def make_cache(self, batch: int, window: int | None, sinks: int) -> SlidingKVCache:
        if batch > self.max_batch:
            raise GenerationError(f"batch {batch}: the engines were built for at most {self.max_batch} rows; rebuild "
                                  "with a larger --max-batch")
        return DeviceSlidingKVCache(self.config, batch, window, sinks, self.cache_dtype, self.device)

    # --- one step ----------------------------------------------------------------------------------------------
    def _torch_dtype(self, trt_dtype):
        trt, torch = self.trt, self.torch
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}[trt_dtype]

    def _bind(self, graph: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Set every input's shape and address; allocate the outputs; return them by name."""
        engine, context = self.engines[graph], self.contexts[graph]
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):  # outside the engine's optimization profile
                raise GenerationError(f"{graph} engine: input {name} of shape {tuple(tensor.shape)} is outside the "
                                      "shapes it was built for; rebuild the engines with larger limits")
            context.set_tensor_address(name, tensor_address(tensor))
        outputs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != self.trt.TensorIOMode.OUTPUT:
                continue
            out = self.torch.empty(tuple(context.get_tensor_shape(name)), dtype=self._torch_dtype(engine.get_tensor_dtype(name)),
                                   device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        return outputs

    def _inputs(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache,
                logits_index: np.ndarray | None = None) -> dict[str, Any]:
        torch = self.torch
        inputs = {io_spec.INPUT_IDS: torch.from_numpy(input_ids).to(self.device),
                  io_spec.POSITIONS: torch.from_numpy(positions).to(self.device)}
        if logits_index is not None:
            inputs[io_spec.LOGITS_INDEX] = torch.from_numpy(np.ascontiguousarray(logits_index, np.int64)).to(self.device)
        for kind, name in io_spec.PAST_POSITIONS.items():
            inputs[name] = torch.from_numpy(cache.positions[kind]).to(self.device)
        for i in range(self.config.num_hidden_layers):
            inputs[io_spec.past_key(i)], inputs[io_spec.past_value(i)] = cache.keys[i], cache.values[i]
        return inputs

    def _advance(self, positions: np.ndarray, cache: SlidingKVCache, outputs: dict[str, Any]) -> np.ndarray:
        """Write the step's new K/V into the cache (on the GPU); return the logits."""
        n = self.config.num_hidden_layers
        cache.update(positions, [outputs[io_spec.new_key(i)] for i in range(n)],
                     [outputs[io_spec.new_value(i)] for i in range(n)])
        return outputs[io_spec.LOGITS].float().cpu().numpy()

    def _image_features(self, rows: np.ndarray | None) -> Any:
        hidden = self.config.hidden_size
        rows = np.zeros((0, hidden), np.float32) if rows is None else rows
        dtype = self._torch_dtype(self.engines["prefill"].get_tensor_dtype(io_spec.IMAGE_FEATURES))
        buffer = self.torch.empty((max(len(rows), 1), hidden), dtype=dtype, device=self.device)
        buffer[:len(rows)].copy_(self.torch.from_numpy(np.ascontiguousarray(rows)))
        return buffer[:len(rows)]

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache,
                logits_index: np.ndarray | None = None, image_features: np.ndarray | None = None) -> np.ndarray:
        if not isinstance(cache, DeviceSlidingKVCache):
            raise GenerationError("the TensorRT backend needs its GPU cache (Generator creates it via make_cache)")
        decode = input_ids.shape[1] == 1 and logits_index is None and image_features is None
        if decode and self.cuda_graphs:
            return self._decode_captured(input_ids, positions, cache)
        graph = "decode" if decode else "prefill"
        if not decode and logits_index is None:  # every token's logits
            logits_index = np.tile(np.arange(input_ids.shape[1], dtype=np.int64), (input_ids.shape[0], 1))
        with self.torch.cuda.stream(self.stream):
            inputs = self._inputs(input_ids, positions, cache, logits_index)
            if graph == "prefill" and self.takes_image_features:
                inputs[io_spec.IMAGE_FEATURES] = self._image_features(image_features)
            outputs = self._bind(graph, inputs)
            if not self.contexts[graph].execute_async_v3(self.stream.cuda_stream):
                raise GenerationError(f"TensorRT failed to run the {graph} engine (see its log)")
        self.stream.synchronize()
        return self._advance(positions, cache, outputs)

    def _decode_captured(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache) -> np.ndarray:
        torch = self.torch
        state = self._decode_graph
        if state is None or state[0] is not cache:
            # First decode step for this cache: bind static buffers, run once (TensorRT's lazy init), then capture.
            with torch.cuda.stream(self.stream):
                static = self._inputs(input_ids, positions, cache)
                outputs = self._bind("decode", static)
                if not self.contexts["decode"].execute_async_v3(self.stream.cuda_stream):
                    raise GenerationError("TensorRT failed to run the decode engine (see its log)")
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.contexts["decode"].execute_async_v3(self.stream.cuda_stream)
            self._decode_graph = (cache, static, outputs, graph)
            return self._advance(positions, cache, outputs)
        _, static, outputs, graph = state
        with torch.cuda.stream(self.stream):
            static[io_spec.INPUT_IDS].copy_(torch.from_numpy(input_ids), non_blocking=False)
            static[io_spec.POSITIONS].copy_(torch.from_numpy(positions), non_blocking=False)
            for kind, name in io_spec.PAST_POSITIONS.items():
                static[name].copy_(torch.from_numpy(cache.positions[kind]), non_blocking=False)
            graph.replay()
        self.stream.synchronize()
        return self._advance(positions, cache, outputs)

    @classmethod
    def from_artifact(cls, directory: Path, manifest: dict[str, Any], config: Llama4Config) -> "TrtBackend":
        prefill = (manifest.get("graphs") or {}).get("prefill") or {}
        return cls(Path(directory), manifest, config, int(prefill.get("max_new_tokens", io_spec.DEFAULT_MAX_PREFILL)))
