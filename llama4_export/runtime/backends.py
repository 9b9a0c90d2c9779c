"""Backends run one step of the graph contract (export/io_spec.py) against a SlidingKVCache they only read.

forward(input_ids [B, T], positions [B, T], cache) → StepOutput(logits [B, T, V], new K/V per layer [B, kvh, T, D]).
The Generator writes the new K/V into the cache; a backend never does.

- TorchBackend: our PyTorch Llama4ForCausalLM through the same contract — the reference, and a runner for
  checkpoints that were never exported.
- OrtBackend: ONNX Runtime on decode.onnx (one new token) and prefill.onnx (more), CPU EP, or CUDA EP with
  onnxruntime-gpu. The cache buffers are handed to ORT without copies (OrtValues over the numpy memory, valid for
  the cache's lifetime) and decode writes its outputs into preallocated numpy arrays through an IOBinding. With the
  CUDA EP the cache still lives in host memory and crosses PCIe every step: correct, not fast (a device-resident
  cache is future work). On CPU, ORT memory-maps the shared external-data file, so both sessions use the same
  pages (measured on l4-scoutlike: the second session adds ~19 MB of RSS for 53 MB of weights — pre-packed copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes
import numpy as np

from ..export import io_spec
from ..model.config import Llama4Config
from .errors import GenerationError
from .kv_cache import SlidingKVCache

DEFAULT_PREFILL_TOKENS = 512


@dataclass
class StepOutput:
    logits: np.ndarray
    new_keys: list[np.ndarray]
    new_values: list[np.ndarray]


class Backend(Protocol):
    name: str
    config: Llama4Config
    cache_dtype: np.dtype
    max_prefill_tokens: int  # the most new tokens one forward call takes per row
    required_slots: dict[str, int]  # kind -> slot count a graph with static cache shapes insists on

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache) -> StepOutput: ...


class TorchBackend:
    name = "torch"

    def __init__(self, model, max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS):
        import torch

        self.model = model.eval()
        self.config: Llama4Config = model.config
        dtype = model.lm_head.weight.dtype
        if dtype not in (torch.float32, torch.float16):
            raise GenerationError(f"model dtype {dtype}: the numpy KV cache holds float32 or float16; load the model in one of those")
        self.cache_dtype = np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
        self.max_prefill_tokens = max_prefill_tokens
        self.required_slots: dict[str, int] = {}

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> "TorchBackend":
        from ..model.loader import load

        return cls(load(checkpoint_dir), max_prefill_tokens)

    @classmethod
    def from_onnx_weights(
        cls, graph_path: Path, config: Llama4Config, max_prefill_tokens: int = DEFAULT_PREFILL_TOKENS
    ) -> "TorchBackend":
        """Our PyTorch model with the weights an exported (unquantized) graph carries under their checkpoint names."""
        import torch

        from ..model.loader import _empty_model, _finish

        weights = onnx_initializers(graph_path)
        model = _empty_model(config)
        model.to_empty(device="cpu")
        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(weights))
        if missing:
            raise GenerationError(
                f"{graph_path}: has no initializer {missing[0]!r}, so the torch backend cannot rebuild the model from it "
                "(quantized, or the exporter merged equal weights); use --backend onnxruntime or pass the checkpoint directory"
            )
        with torch.no_grad():
            for name, param in params.items():
                value = weights[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise GenerationError(f"{graph_path}: initializer {name!r} has shape {list(value.shape)}, the model needs {list(param.shape)}")
                param.copy_(torch.from_numpy(np.array(value)))  # np.array: a writable copy of the memory map
        return cls(_finish(model, config), max_prefill_tokens)

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache) -> StepOutput:
        import torch

        from ..model.modeling import KVCache

        # torch.from_numpy shares memory: the model reads the cache buffers in place.
        kv = KVCache(
            keys=[torch.from_numpy(k) for k in cache.keys],
            values=[torch.from_numpy(v) for v in cache.values],
            positions=[torch.from_numpy(cache.positions[kind]) for kind in cache.kinds],
        )
        with torch.inference_mode():
            logits, new = self.model(torch.from_numpy(input_ids), torch.from_numpy(positions), kv)
        return StepOutput(logits.float().numpy(), [k.numpy() for k in new.keys], [v.numpy() for v in new.values])


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(float8e4m3fn)": ml_dtypes.float8_e4m3fn}
# ONNX element types of the ml_dtypes arrays ORT's numpy conversion does not know ("Numpy_type 260 can't be converted
# to MLDataType" on onnxruntime 1.32): they are handed over as raw bytes with their ONNX type.
_ONNX_ELEMENT_TYPES = {np.dtype(ml_dtypes.float8_e4m3fn): 17}  # TensorProto.FLOAT8E4M3FN


class OrtBackend:
    name = "onnxruntime"

    def __init__(
        self, decode_path: Path, prefill_path: Path | None, config: Llama4Config, max_prefill_tokens: int,
        threads: int | None = None, providers: list[str] | None = None, session_config: dict[str, str] | None = None,
    ):
        import onnxruntime as ort

        self.config = config
        self.providers = providers or default_providers()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
        for key, value in sorted((session_config or {}).items()):
            options.add_session_config_entry(key, value)
        self.decode = self._session(ort, decode_path, options)
        self.prefill = self._session(ort, prefill_path, options) if prefill_path is not None else None
        self.max_prefill_tokens = max_prefill_tokens if self.prefill is not None else 1

        inputs = {i.name: i for i in self.decode.get_inputs()}
        key_type = inputs[io_spec.past_key(0)].type
        if key_type not in _ORT_TYPES:
            raise GenerationError(f"{decode_path}: cache type {key_type} is not supported by the numpy runtime "
                                  "(float32, float16, float8e4m3fn)")
        self.cache_dtype = np.dtype(_ORT_TYPES[key_type])
        self.required_slots = {}
        for kind, name in io_spec.PAST_POSITIONS.items():
            dim = inputs[name].shape[1]
            if isinstance(dim, int):
                self.required_slots[kind] = dim
        self.output_names = io_spec.output_names(config)
        # (the cache bound, its reallocation count then, IOBinding, its output arrays)
        self._bound: tuple[SlidingKVCache, int, Any, StepOutput] | None = None

    def _session(self, ort, path: Path, options):
        try:
            return ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            raise GenerationError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]}); re-run the export") from None

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache) -> StepOutput:
        if input_ids.shape[1] == 1:
            return self._decode(input_ids, positions, cache)
        if cache.dtype in _ONNX_ELEMENT_TYPES:  # session.run takes numpy arrays ORT knows only
            return self._prefill_bound(input_ids, positions, cache)
        feeds = self._cache_feeds(cache)
        feeds[io_spec.INPUT_IDS], feeds[io_spec.POSITIONS] = input_ids, positions
        out = self.prefill.run(self.output_names, feeds)
        n = self.config.num_hidden_layers
        return StepOutput(out[0], out[1 : 2 * n + 1 : 2], out[2 : 2 * n + 1 : 2])

    def _prefill_bound(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache) -> StepOutput:
        import onnxruntime as ort

        binding = self.prefill.io_binding()
        for name, array in self._cache_feeds(cache).items():
            binding.bind_ortvalue_input(name, _ortvalue(ort, array))
        binding.bind_cpu_input(io_spec.INPUT_IDS, input_ids)
        binding.bind_cpu_input(io_spec.POSITIONS, positions)
        out = self._output_arrays(cache.batch, input_ids.shape[1], cache.dtype)
        _bind_outputs(binding, self.output_names, out)
        self.prefill.run_with_iobinding(binding)
        return out

    def _output_arrays(self, batch: int, tokens: int, dtype: np.dtype) -> StepOutput:
        cfg = self.config
        kv_shape = (batch, cfg.num_key_value_heads, tokens, cfg.head_dim)
        return StepOutput(np.empty((batch, tokens, cfg.vocab_size), np.float32),
                          [np.empty(kv_shape, dtype) for _ in range(cfg.num_hidden_layers)],
                          [np.empty(kv_shape, dtype) for _ in range(cfg.num_hidden_layers)])

    def _cache_feeds(self, cache: SlidingKVCache) -> dict[str, np.ndarray]:
        feeds = {io_spec.PAST_POSITIONS[k]: p for k, p in cache.positions.items()}
        for i in range(self.config.num_hidden_layers):
            feeds[io_spec.past_key(i)], feeds[io_spec.past_value(i)] = cache.keys[i], cache.values[i]
        return feeds

    def _decode(self, input_ids: np.ndarray, positions: np.ndarray, cache: SlidingKVCache) -> StepOutput:
        import onnxruntime as ort

        if self._bound is None or self._bound[0] is not cache or self._bound[1] != cache.reallocations:
            binding = self.decode.io_binding()
            # OrtValues over the cache's numpy memory (zero-copy on CPU; copied to the device by a GPU EP).
            for name, array in self._cache_feeds(cache).items():
                binding.bind_ortvalue_input(name, _ortvalue(ort, array))
            out = self._output_arrays(cache.batch, 1, cache.dtype)
            _bind_outputs(binding, self.output_names, out)
            self._bound = (cache, cache.reallocations, binding, out)
        _, _, binding, out = self._bound
        binding.bind_cpu_input(io_spec.INPUT_IDS, input_ids)
        binding.bind_cpu_input(io_spec.POSITIONS, positions)
        self.decode.run_with_iobinding(binding)
        return out


def _ortvalue(ort, array: np.ndarray):
    """An OrtValue over `array`'s memory (no copy on CPU), float8 arrays included."""
    if array.dtype in _ONNX_ELEMENT_TYPES:
        if not array.flags.c_contiguous:  # ORT reads the bytes in C order (the cache's buffers always are)
            raise GenerationError(f"a {array.dtype} input of shape {list(array.shape)} is not C-contiguous")
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint8), _ONNX_ELEMENT_TYPES[array.dtype])
    return ort.OrtValue.ortvalue_from_numpy(array)


def _bind_outputs(binding, names: list[str], out: StepOutput) -> None:
    """ORT writes the step's outputs straight into `out`'s arrays."""
    arrays = [out.logits] + [a for kv in zip(out.new_keys, out.new_values) for a in kv]
    for name, array in zip(names, arrays):
        element_type = _ONNX_ELEMENT_TYPES.get(array.dtype, array.dtype.type)
        binding.bind_output(name, "cpu", 0, element_type, list(array.shape), array.ctypes.data)


def onnx_initializers(graph_path: Path) -> dict[str, np.ndarray]:
    """Every initializer of an ONNX file as numpy; external data is memory-mapped, not read."""
    import onnx
    from onnx import numpy_helper

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


def default_providers() -> list[str]:
    """CUDA EP first when this onnxruntime build has it (onnxruntime-gpu), CPU EP always as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
