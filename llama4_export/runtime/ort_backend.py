"""ONNX Runtime backend: an artifact's decode.onnx (one new token) and prefill.onnx (more) — or, for a partitioned
artifact, one such pair per layer range, run in order with the hidden states handed from each part to the next.

Sessions: CPU EP, or the CUDA EP with onnxruntime-gpu (part k on device k). Every run goes through an IOBinding: the
cache buffers are handed to ORT without copies (OrtValues over the numpy memory, float8 ones as raw bytes with their
ONNX type) — graphs of the in_place layout (model/io_spec.py) append to them through the same OrtValues bound as
their present outputs —, and outputs are written into preallocated numpy arrays — for decode, allocated once per
cache and reused every step, each part's hidden-state output bound as the next part's input. On CPU, ORT memory-maps the
shared external-data file, so both sessions of a part use the same pages. With the CUDA EP the cache still lives in
host memory and crosses PCIe every step: correct, not fast (a device-resident cache is future work).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..artifact import MANIFEST, listed_file, partition_entries, read_manifest
from ..model import io_spec
from ..model.config import Llama4Config
from ..ort_values import RAW_ONNX_ELEMENT_TYPES, ort_value
from .backends import KVCacheState
from ..errors import is_integer
from .errors import GenerationError
from .kv_cache import InPlaceKVCache, SlidingKVCache

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _numpy_type(ort_type: str, what: str) -> np.dtype:
    """The numpy dtype of `what`'s ORT tensor type. ml_dtypes (≈ 0.5 s to import) is loaded only for an fp8 graph."""
    if ort_type == "tensor(float8e4m3fn)":
        import ml_dtypes

        return np.dtype(ml_dtypes.float8_e4m3fn)
    if ort_type not in _ORT_TYPES:
        raise GenerationError(f"{what} type {ort_type} is not supported by the numpy runtime (float32, float16, "
                              "float8e4m3fn); re-run the export")
    return np.dtype(_ORT_TYPES[ort_type])


@dataclass(frozen=True)
class PartGraphs:
    """One layer range's graphs (the whole model for an unpartitioned artifact)."""

    layers: range
    decode: Path
    prefill: Path | None


def artifact_parts(directory: Path, manifest: dict[str, Any], config: Llama4Config) -> tuple[list[PartGraphs], int]:
    """The graphs of an artifact's parts, in order, and the prefill limit."""
    directory = Path(directory)
    listed = [(Path(name), layers) for name, layers in partition_entries(directory, manifest, config.num_hidden_layers)]
    if not listed:
        listed = [(Path("."), range(config.num_hidden_layers))]
    parts, max_prefill = [], io_spec.DEFAULT_MAX_PREFILL
    for sub, layers in listed:
        own = manifest if sub == Path(".") else read_manifest(directory / sub, verify=False)
        if sub != Path(".") and own.get("layers") != [layers.start, layers.stop]:  # its graphs hold other layers
            raise GenerationError(f"{directory / sub / MANIFEST}: layers={own.get('layers')!r}, but the artifact's "
                                  f"{MANIFEST} lists the part as layers [{layers.start}, {layers.stop}]; re-run the export")
        graphs = own.get("graphs") or {}
        if not graphs.get("decode"):
            raise GenerationError(f"{directory / sub / MANIFEST}: lists no decode graph; re-run the export")
        for name in ("decode", "prefill"):
            if graphs.get(name) is not None and not isinstance(graphs[name], dict):
                raise GenerationError(f"{directory / sub / MANIFEST}: graphs.{name}={graphs[name]!r}: not an object "
                                      "with a file; re-run the export")
        prefill = graphs.get("prefill")
        if prefill:
            max_prefill = prefill.get("max_new_tokens", max_prefill)
            if not is_integer(max_prefill) or max_prefill < 1:
                raise GenerationError(f"{directory / sub / MANIFEST}: graphs.prefill.max_new_tokens={max_prefill!r}: "
                                      "must be an integer >= 1; re-run the export")
        decode_file = listed_file(directory / sub, own, graphs["decode"].get("file"), "graphs.decode.file")
        prefill_file = listed_file(directory / sub, own, prefill.get("file"), "graphs.prefill.file") if prefill else None
        parts.append(PartGraphs(layers, prefill_file if prefill and _one_graph_serves_both(graphs) else decode_file,
                                prefill_file))
    return parts, max_prefill


# What the manifest's moe_lowering says when each token reaches only its expert in any graph (QMoE, MoE: artifacts
# exported before the per-expert If lowerings, or with more experts than they are built for).
ROUTING_LOWERINGS = ("MatMulNBits per expert", "MatMul per expert", "QMoE", "com.microsoft.MoE")


def _one_graph_serves_both(graphs: dict[str, Any]) -> bool:
    """With the MoE lowered to a form that routes each token to its expert (per-expert If + MatMulNBits or MatMul,
    QMoE, MoE) in both graphs, the prefill graph computes a one-token step exactly as the decode graph does: one
    session then serves both, and the weights ORT prepacks for it are prepacked once."""
    lowerings = {(graphs.get(name) or {}).get("moe_lowering") for name in ("decode", "prefill")}
    return len(lowerings) == 1 and any(form in (next(iter(lowerings)) or "") for form in ROUTING_LOWERINGS)


def _check_graph_matches_config(graph: Path, session, config: Llama4Config, layers: range) -> None:
    """The manifest is not hashed: a hand-edited model config that disagrees with the graphs ran until ONNX Runtime
    refused a buffer's dimensions (a traceback) or numpy one of the cache's. Its layers, KV heads, head_dim and
    vocabulary (or hidden size) are checked against the graph's declared shapes when the graph is loaded."""
    declared = {value.name: value.shape for value in [*session.get_inputs(), *session.get_outputs()]}
    caches = {name for name in declared if name.startswith(("past_key.", "past_value."))}
    out = io_spec.output_names(config, layers)[0]  # logits from the last part, hidden states from the others
    layers_here = f"num_hidden_layers={config.num_hidden_layers} (layers {layers.start}..{layers.stop - 1} here)"
    if caches != {name for i in layers for name in (io_spec.past_key(i), io_spec.past_value(i))}:
        mismatch = f"{layers_here}, but the graph takes the caches of {len(caches) // 2} layers"
    elif out not in declared:
        mismatch = f"{layers_here}, but the graph gives no {out!r}"
    else:
        width = "vocab_size" if out == io_spec.LOGITS else "hidden_size"
        for field, name, axis in (("num_key_value_heads", min(caches), 1), ("head_dim", min(caches), 3),
                                  (width, out, -1)):
            held = declared[name][axis]
            if isinstance(held, int) and held != getattr(config, field):
                mismatch = f"{field}={getattr(config, field)}, but the graph's {name} has {held}"
                break
        else:
            return
    raise GenerationError(f"{graph.parent / MANIFEST}: model.{mismatch} ({graph.name}): the manifest does not describe "
                          "its graphs (edited?); re-run the export")


class _Part:
    def __init__(self, graphs: PartGraphs, config: Llama4Config, decode, prefill):
        _check_graph_matches_config(graphs.decode, decode, config, graphs.layers)
        if prefill is not None and prefill is not decode:  # one session may serve both
            _check_graph_matches_config(graphs.prefill, prefill, config, graphs.layers)
        self.layers, self.decode, self.prefill = graphs.layers, decode, prefill
        self.layout = io_spec.kv_layout_of({i.name for i in decode.get_inputs()})
        self.outputs = io_spec.output_names(config, graphs.layers, self.layout)
        output = decode.get_outputs()[0]
        self.out_type = _numpy_type(output.type, f"{graphs.decode}: output {output.name}")
        # a decode step through the prefill graph asks for its one token's logits
        self.decode_logits_index = io_spec.LOGITS_INDEX in {i.name for i in decode.get_inputs()}
        # the graphs that fuse image features in (the first part's prefill of a vision artifact): their dtype
        self.image_features = {name: _numpy_type(i.type, f"{name} graph: {i.name}")
                               for name, session in (("decode", decode), ("prefill", prefill))
                               if session is not None for i in session.get_inputs() if i.name == io_spec.IMAGE_FEATURES}


class OrtBackend:
    name = "onnxruntime"

    def __init__(
        self, parts: list[PartGraphs], config: Llama4Config, max_prefill_tokens: int, threads: int | None = None,
        providers: list[str] | None = None, session_config: dict[str, str] | None = None,
        custom_op_library: str | None = None, profile_prefix: str | None = None, image_token_id: int | None = None,
    ):
        """custom_op_library: a library of custom ops to register (the accuracy report's reference MoE ops);
        profile_prefix: write ONNX Runtime's per-node profile (JSON) under this path prefix (see end_profiling);
        image_token_id: the placeholder token whose rows take image features (an artifact with a vision graph)."""
        self.config, self.image_token_id = config, image_token_id
        options = session_options(threads)
        for key, value in sorted((session_config or {}).items()):
            options.add_session_config_entry(key, value)
        if custom_op_library:
            options.register_custom_ops_library(custom_op_library)
        if profile_prefix:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        if isinstance(providers, str):  # its letters were taken for providers ("'C' is not in this onnxruntime")
            raise GenerationError(f"providers={providers!r}: give a list, e.g. [{providers!r}]")
        base = providers or default_providers()
        available = ort.get_available_providers()
        missing = [p for p in base if (p[0] if isinstance(p, tuple) else p) not in available]
        if missing:  # ONNX Runtime printed a multi-line banner and fell back to the CPU without saying so to the caller
            raise GenerationError(f"providers: {missing[0]!r} is not in this onnxruntime (it has "
                                  f"{', '.join(available)}); install the build that has it, or "
                                  "leave providers out")
        self.providers = base
        self.parts: list[_Part] = []
        for k, graphs in enumerate(parts):
            placed = [("CUDAExecutionProvider", {"device_id": k}) if p == "CUDAExecutionProvider" and len(parts) > 1 else p
                      for p in base]
            partitioned = len(parts) > 1
            decode = load_session(graphs.decode, options, placed, partitioned)
            prefill = None if graphs.prefill is None else \
                decode if graphs.prefill == graphs.decode else load_session(graphs.prefill, options, placed, partitioned)
            self.parts.append(_Part(graphs, config, decode, prefill))
        self.decode = self.parts[0].decode  # its provider and options say where the model runs
        layouts = {part.layout for part in self.parts}
        if len(layouts) > 1:
            raise GenerationError(f"{parts[0].decode.parent}: the parts' graphs hand over the KV cache in different "
                                  "layouts; re-run the export")
        self.kv_layout = layouts.pop()
        self.max_prefill_tokens = max_prefill_tokens if all(p.prefill is not None for p in self.parts) else 1
        inputs = {i.name: i for i in self.decode.get_inputs()}
        key_type = inputs[io_spec.past_key(self.parts[0].layers.start)].type
        self.cache_dtype = _numpy_type(key_type, f"{parts[0].decode}: cache")
        self.required_slots = {kind: inputs[name].shape[1] for kind, name in io_spec.PAST_POSITIONS.items()
                               if name in inputs and isinstance(inputs[name].shape[1], int)}
        # decode: (the cache bound, its reallocation count then, per part (IOBinding, part), the logits output)
        self._bound: tuple[KVCacheState, int, list, np.ndarray, list, list] | None = None

    @classmethod
    def from_artifact(cls, directory: Path, manifest: dict[str, Any], config: Llama4Config, threads: int | None = None,
                      providers: list[str] | None = None) -> "OrtBackend":
        parts, max_prefill = artifact_parts(directory, manifest, config)
        vision = manifest.get("vision") or {}
        return cls(parts, config, max_prefill, threads, providers,
                   image_token_id=(vision.get("config") or {}).get("image_token_id"))

    def end_profiling(self) -> list[Path]:
        """Stop profiling; the profile files written, one per session (decode and prefill may share one)."""
        sessions = {id(s): s for part in self.parts for s in (part.decode, part.prefill) if s is not None}
        return [Path(session.end_profiling()) for session in sessions.values()]

    def make_cache(self, batch: int, window: int | None, sinks: int) -> KVCacheState:
        if self.kv_layout == "in_place":
            return InPlaceKVCache(self.config, batch, window, sinks, self.cache_dtype, max_step=self.max_prefill_tokens)
        # graphs with dynamic slot dimensions attend over the slots used so far
        return SlidingKVCache(self.config, batch, window, sinks, self.cache_dtype, grow=not self.required_slots)

    def forward(self, input_ids: np.ndarray, positions: np.ndarray, cache: KVCacheState,
                logits_index: np.ndarray | None = None, image_features: np.ndarray | None = None) -> np.ndarray:
        """image_features: the rows of the step's image placeholder tokens, in order, row-major (model/io_spec.py)."""
        if cache.layout != self.kv_layout:
            raise GenerationError(f"a {cache.layout} cache for graphs of the {self.kv_layout} layout; "
                                  "create it with make_cache")
        batch, tokens = input_ids.shape
        placeholders = 0 if self.image_token_id is None else int((input_ids == self.image_token_id).sum())
        given = 0 if image_features is None else image_features.shape[0]
        if given and self.image_token_id is None:
            raise GenerationError("image features given but this artifact has no vision graph; export a multimodal "
                                  "checkpoint for images")
        if given and given != placeholders:  # without features, placeholders keep their embeddings (the graph's merge)
            raise GenerationError(f"the step has {placeholders} image placeholder token(s) but {given} image feature "
                                  "row(s); expand the prompt with its images' tile grids (runtime.images)")
        if tokens == 1 and logits_index is None and not given:
            logits, new_keys, new_values = self._decode(input_ids, positions, cache)
        else:
            if logits_index is None:  # every token's logits
                logits_index = np.tile(np.arange(tokens, dtype=np.int64), (batch, 1))
            if cache.layout == "in_place":
                return self._prefill_in_place(input_ids, positions, cache, logits_index, image_features)
            bindings, logits, new_keys, new_values = self._bind(cache, slice(None), tokens, "prefill",
                                                                logits_index.shape[1])
            self._run(bindings, input_ids, positions, "prefill", logits_index, image_features)
        if cache.layout == "positions":
            cache.update(positions, new_keys, new_values)
        else:
            cache.advance(positions)
        return logits

    def _decode(self, input_ids: np.ndarray, positions: np.ndarray, cache: KVCacheState):
        if cache.layout == "in_place":
            cache.reserve(slice(None), 1)
        if self._bound is None or self._bound[0] is not cache or self._bound[1] != cache.reallocations:
            self._bound = (cache, cache.reallocations, *self._bind(cache, slice(None), 1, "decode"))
        _, _, bindings, logits, new_keys, new_values = self._bound
        self._run(bindings, input_ids, positions, "decode")
        return logits, new_keys, new_values

    def _prefill_in_place(self, input_ids: np.ndarray, positions: np.ndarray, cache: InPlaceKVCache,
                          logits_index: np.ndarray, image_features: np.ndarray | None) -> np.ndarray:
        """A step of several tokens on in-place graphs. GroupQueryAttention takes one row at a time when rows have
        past tokens, and a step's tokens must stay in one chunk: rows that all start empty and all have tokens run
        together in one piece when they can; otherwise each row with tokens runs alone (a continuous batch's
        newcomer among idle rows too), in pieces cut at chunk boundaries, each with the image feature rows of its own
        placeholders."""
        batch, tokens = input_ids.shape
        valid = positions >= 0
        counts = valid.sum(axis=1)
        right_padded = all(valid[b, : counts[b]].all() for b in range(batch))
        if right_padded and counts.all() and not cache.lengths.any() and tokens <= min(cache.piece_limit(b) for b in range(batch)):
            cache.reserve(slice(None), tokens)
            bindings, logits, _, _ = self._bind(cache, slice(None), tokens, "prefill", logits_index.shape[1])
            self._run(bindings, input_ids, positions, "prefill", logits_index, image_features)
            cache.advance(positions)
            return logits
        logits = np.zeros((batch, logits_index.shape[1], self.config.vocab_size), np.float32)
        # the first feature row of each token's placeholder (features are consumed row-major)
        is_image = np.zeros(input_ids.shape, bool) if self.image_token_id is None else input_ids == self.image_token_id
        feature_start = (np.cumsum(is_image.reshape(-1)) - is_image.reshape(-1)).reshape(input_ids.shape)
        for b in range(batch):
            columns = np.flatnonzero(valid[b])
            done = 0
            while done < columns.size:
                piece = columns[done: done + cache.piece_limit(b)]
                wanted = [(j, int(np.searchsorted(piece, c))) for j, c in enumerate(logits_index[b]) if c in piece]
                index = np.array([[k for _, k in wanted] or [0]], np.int64)
                cache.reserve(b, piece.size)
                bindings, out, _, _ = self._bind(cache, slice(b, b + 1), piece.size, "prefill", index.shape[1])
                features = None
                if image_features is not None:
                    first = feature_start[b, piece[0]]
                    features = image_features[first: first + int(is_image[b, piece].sum())]
                self._run(bindings, input_ids[b:b + 1, piece], positions[b:b + 1, piece], "prefill", index, features)
                for k, (j, _) in enumerate(wanted):
                    logits[b, j] = out[0, k]
                step = np.full((batch, piece.size), -1, np.int64)
                step[b] = positions[b, piece]
                cache.advance(step)
                done += piece.size
        return logits

    def _bind(self, cache: KVCacheState, rows: slice, tokens: int, graph: str, logits: int = 1):
        """IOBindings of every part for the cache's `rows`, and the outputs (logits with `logits` token columns, new
        K/V per layer — the positions layout only) as freshly allocated arrays. In place, each layer's past and
        present buffers are bound to the same memory; each part's hidden states output is the next part's input."""
        cfg = self.config
        batch = len(range(*rows.indices(cache.batch)))
        in_place = cache.layout == "in_place"
        kv_shape = (batch, cfg.num_key_value_heads, tokens, cfg.head_dim)
        keys = [] if in_place else [np.empty(kv_shape, cache.dtype) for _ in range(cfg.num_hidden_layers)]
        values = [] if in_place else [np.empty(kv_shape, cache.dtype) for _ in range(cfg.num_hidden_layers)]
        bindings, previous = [], None
        for part in self.parts:
            binding = getattr(part, graph).io_binding()
            if previous is not None:
                binding.bind_ortvalue_input(io_spec.HIDDEN_IN, _ortvalue(previous))
            if in_place:
                for kind, name in io_spec.PAST_LENGTHS.items():
                    binding.bind_ortvalue_input(name, _ortvalue(cache.filled[kind][rows]))
                for i in part.layers:
                    for buffers, past, present in ((cache.keys, io_spec.past_key, io_spec.present_key),
                                                   (cache.values, io_spec.past_value, io_spec.present_value)):
                        buffer = _ortvalue(buffers[i][rows])
                        binding.bind_ortvalue_input(past(i), buffer)
                        binding.bind_ortvalue_output(present(i), buffer)
            else:
                for kind, name in io_spec.PAST_POSITIONS.items():
                    binding.bind_ortvalue_input(name, _ortvalue(cache.positions[kind]))
                for i in part.layers:
                    binding.bind_ortvalue_input(io_spec.past_key(i), _ortvalue(cache.keys[i]))
                    binding.bind_ortvalue_input(io_spec.past_value(i), _ortvalue(cache.values[i]))
            last = part.layers.stop == cfg.num_hidden_layers
            first_out = np.empty((batch, logits, cfg.vocab_size) if last else (batch, tokens, cfg.hidden_size),
                                 np.float32 if last else part.out_type)
            arrays = [first_out] + [a for i in part.layers for a in ((keys[i], values[i]) if keys else ())]
            for name, array in zip(part.outputs, arrays):
                element_type = RAW_ONNX_ELEMENT_TYPES.get(array.dtype.name, array.dtype.type)
                binding.bind_output(name, "cpu", 0, element_type, list(array.shape), array.ctypes.data)
            if graph == "decode" and part.decode_logits_index:
                binding.bind_cpu_input(io_spec.LOGITS_INDEX, np.zeros((batch, 1), np.int64))
            bindings.append((binding, part))
            previous = first_out
        return bindings, previous, keys, values

    def _run(self, bindings: list, input_ids: np.ndarray, positions: np.ndarray, graph: str,
             logits_index: np.ndarray | None = None, image_features: np.ndarray | None = None) -> None:
        for k, (binding, part) in enumerate(bindings):
            if k == 0:
                binding.bind_cpu_input(io_spec.INPUT_IDS, np.ascontiguousarray(input_ids))
            if graph in part.image_features:  # zero rows for a step without image tokens
                dtype = part.image_features[graph]
                features = np.zeros((0, self.config.hidden_size), dtype) if image_features is None else image_features
                binding.bind_cpu_input(io_spec.IMAGE_FEATURES, np.ascontiguousarray(features, dtype=dtype))
            binding.bind_cpu_input(io_spec.POSITIONS, np.ascontiguousarray(positions))
            if logits_index is not None and k == len(bindings) - 1:
                binding.bind_cpu_input(io_spec.LOGITS_INDEX, np.ascontiguousarray(logits_index, dtype=np.int64))
            getattr(part, graph).run_with_iobinding(binding)


MAX_THREADS = 1024  # llama4rt's kMaxThreads: each thread holds a stack; a million of them exhausted memory


def check_threads(threads: int | None) -> None:
    if threads is not None and not 0 <= threads <= MAX_THREADS:
        raise GenerationError(f"threads={threads}: must be in 1..{MAX_THREADS} (or left out / 0 for the runtime's "
                              "choice)")


def session_options(threads: int | None) -> ort.SessionOptions:
    """Every graph's session: all of ONNX Runtime's graph optimizations, one stream, quiet."""
    check_threads(threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    return options


# The domain of TensorRT plugin nodes (graph_passes/trt_plugin_spec.PLUGIN_DOMAIN), as ONNX Runtime names an op it lacks.
TRT_PLUGIN_OP = "trt.plugins:"


def load_session(path: Path, options, providers, partitioned: bool = False):
    """partitioned: `path` is a part's graph, which --backend tensorrt refuses (so the advice does not offer it)."""
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for unreadable models
        reason = str(exc).splitlines()[0]
        fix = "re-run the export"
        if TRT_PLUGIN_OP in reason and partitioned:
            fix = ("it holds TensorRT plugin nodes (exported with --target tensorrt), and TensorRT engines are built "
                   "for unpartitioned artifacts only: export with --target onnxruntime to run the parts, or without "
                   "--partitions to build TensorRT engines")
        elif TRT_PLUGIN_OP in reason:
            fix = ("it holds TensorRT plugin nodes (exported with --target tensorrt): run it with --backend tensorrt on "
                   "an NVIDIA GPU, or export with --target onnxruntime")
        raise GenerationError(f"{path}: ONNX Runtime cannot load it ({reason}); {fix}") from None


def _ortvalue(array: np.ndarray):
    try:
        return ort_value(array)
    except ValueError as exc:
        raise GenerationError(str(exc)) from None


def default_providers() -> list[str]:
    """CUDA EP first when this onnxruntime build has it (onnxruntime-gpu), CPU EP always as the fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
