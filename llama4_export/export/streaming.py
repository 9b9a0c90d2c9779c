"""Layer-streaming export: the same artifact as `export_artifact` + `optimize_artifact`, in RAM that does not grow with
the number of layers (issue 9). For checkpoints far larger than memory (Scout bf16 ≈ 218 GB, Maverick ≈ 800 GB).

How memory stays bounded
  trace      The decode and prefill graphs are traced from a model whose parameters live on PyTorch's meta device
             (shapes only, no data): the graph structure is exactly the in-memory export's, and the trace holds no
             weights. (It traces every layer, not one layer per kind: tracing costs seconds per layer, not memory.)
  weights    `save_streamed` writes the external-data file in `save_graphs`' layout — graphs in order,
             initializers by name, each distinct tensor once, the same alignment — so the bytes are the in-memory
             path's. Each weight is read from the memory-mapped safetensors shard (or generated, --random-weights)
             in slices of at most CHUNK_BYTES (the shard mapped only while one slice is copied), hashed and
             written, then freed; a weight both graphs use is read once (by name).
  passes     `optimize_streamed` runs the unchanged graph passes on graphs whose weights stay on disk: each read
             (quantization, the ONNX Runtime MoE re-layout) reads the tensor into fresh memory without mapping the
             file, and each large tensor a pass creates is spilled to a scratch file the moment it joins the graph.
             Peak RSS is the largest single weight and what one pass computes from it, plus the graphs' structure.
  calibrate  fp8 activation scales come from calib/streamed.py (sequential layer-wise: one layer's weights and the
             calibration hidden states in memory). int4 streams with RTN; AWQ's scale search does not stream yet.

Random weights (`RandomWeights`) are drawn per tensor from a generator seeded by (seed, tensor name), so any one
tensor is reproducible alone; they are not the in-memory presets' weights (one generator over every tensor in order).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx_ir import _graph_containers
from safetensors import safe_open

from ..artifact import MANIFEST, ArtifactError, atomic_directory, read_manifest, write_manifest
from ..errors import CheckpointError, ConfigError
from ..model.config import Llama4Config, get_preset
from ..model.loader import check_checkpoint
from ..model.modeling import Llama4ForCausalLM, rope_inverse_frequencies
from ..model.summary import parameter_counts, weight_bytes
from . import onnx_export
from .onnx_export import DATA_FILE, EXTERNAL_MIN_BYTES, LARGE_ALIGNMENT, LARGE_TENSOR_BYTES, SMALL_ALIGNMENT
from .pipeline import DEFAULT_MAX_PREFILL, PRECISIONS, QUANTIZED_PRECISIONS, _check_output, _manifest, _Steps
from .tokenizer_files import copy_tokenizer_files, special_token_ids, write_byte_level_tokenizer

# The most bytes of one weight held in memory at once while writing it (a slice along its first axis).
CHUNK_BYTES = 256 << 20
# Tensors a graph pass creates are spilled to disk above this many elements; smaller ones stay in memory because
# the final CSE compares constants up to graph_passes.pipeline.CONSTANT_CSE_LIMIT elements by value.
SPILL_MIN_ELEMENTS = 1 << 16
# Where the real weights come from (license-gated: accept Meta's license on the model page first).
FULL_SIZE_SOURCES = {
    "scout": "meta-llama/Llama-4-Scout-17B-16E or meta-llama/Llama-4-Scout-17B-16E-Instruct",
    "maverick": "meta-llama/Llama-4-Maverick-17B-128E or meta-llama/Llama-4-Maverick-17B-128E-Instruct",
}
# Fields that decide tensor shapes and layer kinds: a checkpoint given with --model PRESET must match them.
SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_local_experts", "moe_layers", "no_rope_layers", "use_qk_norm",
    "tie_word_embeddings",
)


class DiskSpaceError(ConfigError):
    """Not enough free disk for the artifact."""


# ------------------------------------------------------------------------------------------------ weight sources
class WeightSource(ABC):
    """Where a streamed export reads weights from, one tensor (in slices) at a time."""

    config: Llama4Config
    checkpoint: Path | None = None  # the checkpoint directory (its tokenizer.json calibrates), if any

    @abstractmethod
    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """Tensor `name` (our parameter name) converted to `dtype`, as consecutive slices along its first axis."""

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def manifest_entry(self) -> dict[str, Any]: ...

    @abstractmethod
    def write_tokenizer(self, directory: Path) -> dict[str, Any]: ...


def _slices(shape: tuple[int, ...]) -> Iterator[tuple[slice | int, ...]]:
    """Consecutive index tuples covering `shape` in row-major order, each at most CHUNK_BYTES in fp32: slices of the
    first axis, or of the second within one first-axis index when a single row is larger (a Scout expert tensor's
    row is 5120 × 16384). Depends on the shape alone, so random draws per slice are reproducible."""
    def step(inner: tuple[int, ...]) -> int:
        return max(1, CHUNK_BYTES // max(4 * int(np.prod(inner, dtype=np.int64)), 1))

    if len(shape) < 2 or step(shape[1:]) > 1 or step(shape[2:]) == 1:
        rows = step(shape[1:])
        for start in range(0, shape[0], rows):
            yield (slice(start, start + rows),)
        return
    cols = step(shape[2:])
    for row in range(shape[0]):
        for start in range(0, shape[1], cols):
            yield (slice(row, row + 1), slice(start, start + cols))


class CheckpointWeights(WeightSource):
    """A Hugging Face checkpoint, validated from its headers first; each tensor read from its memory-mapped shard
    (opened per slice, so at most one slice's pages are mapped at a time)."""

    def __init__(self, directory: str | Path, preset: str | None = None, layers: int | None = None):
        self.index = check_checkpoint(directory)
        self.config = self.index.config
        self.checkpoint = self.index.directory
        if preset is not None:
            check_matches_preset(self.config, preset, layers, self.index.directory / "config.json")

    def _location(self, name: str) -> tuple[str, Path]:
        if name not in self.index.files and name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        try:
            return self.index.files[name]
        except KeyError:
            raise CheckpointError(f"{self.index.directory}: tensor {name!r} is missing from the checkpoint") from None

    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        key, path = self._location(name)
        for index in _slices(self._read(key, path, None)):
            # The shard is mapped only while one slice is copied out: pages read stay resident (and count in RSS)
            # for as long as the file is mapped.
            yield self._read(key, path, index).to(dtype)

    @staticmethod
    def _read(key: str, path: Path, index: tuple | None):
        """The slice `index` of tensor `key`, or its shape for index None."""
        try:
            with safe_open(str(path), framework="pt") as f:
                tensor_slice = f.get_slice(key)
                return tuple(tensor_slice.get_shape()) if index is None else tensor_slice[index]
        except Exception as exc:  # safetensors raises its own types for corrupt data
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({exc}); the shard is damaged, re-download it") from None

    def describe(self) -> str:
        return f"checkpoint {self.index.directory}"

    def manifest_entry(self) -> dict[str, Any]:
        from .pipeline import ModelSource

        return ModelSource(checkpoint=self.index.directory).manifest_entry()

    def write_tokenizer(self, directory: Path) -> dict[str, Any]:
        return {"source": "checkpoint", "files": copy_tokenizer_files(self.index.directory, directory)}


class RandomWeights(WeightSource):
    """A preset's shapes with random weights drawn per tensor (normal(0, 0.02), norms 1), seeded by (seed, name)."""

    def __init__(self, preset: str, seed: int = 0, layers: int | None = None):
        self.preset, self.seed, self.layers = preset, seed, layers
        self.config = preset_config(preset, layers)
        special_token_ids(self.config)  # the byte-level tokenizer must hold the preset's special tokens

    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        shape = _parameter_shapes(self.config)[name]
        if name.endswith("norm.weight"):
            yield torch.ones(shape, dtype=dtype)
            return
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        for index in _slices(shape):
            piece = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)) + shape[len(index):]
            yield (torch.randn(piece, generator=generator) * 0.02).to(dtype)

    def describe(self) -> str:
        layers = f", {self.config.num_hidden_layers} layers" if self.layers else ""
        return f"preset {self.preset} (random weights per tensor, seed {self.seed}{layers})"

    def manifest_entry(self) -> dict[str, Any]:
        return {"preset": self.preset, "seed": self.seed, "weights": "random per tensor",
                "layers": self.config.num_hidden_layers}

    def write_tokenizer(self, directory: Path) -> dict[str, Any]:
        return {"source": "byte-level", "files": write_byte_level_tokenizer(self.config, directory)}


def _parameter_shapes(config: Llama4Config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in Llama4ForCausalLM(config).named_parameters()}


def preset_config(preset: str, layers: int | None = None) -> Llama4Config:
    """The preset, cut to its first `layers` decoder layers (same layer kinds in the same places)."""
    config = get_preset(preset)
    if layers is None:
        return config
    if not 1 <= layers <= config.num_hidden_layers:
        raise ConfigError(f"--layers {layers}: preset {preset} has {config.num_hidden_layers} layers; choose 1..{config.num_hidden_layers}")
    return config.replace(num_hidden_layers=layers, moe_layers=tuple(i for i in config.moe_layers if i < layers),
                          no_rope_layers=config.no_rope_layers[:layers])


def check_matches_preset(config: Llama4Config, preset: str, layers: int | None, config_path: Path) -> None:
    """Raise naming the first shape field where a checkpoint's config differs from the preset (cut to `layers`)."""
    expected = preset_config(preset, layers)
    for field in SHAPE_FIELDS:
        got, want = getattr(config, field), getattr(expected, field)
        if field == "no_rope_layers":
            got, want = got[:config.num_hidden_layers], want[:expected.num_hidden_layers]
        if got != want:
            hint = " (pass --layers N for a checkpoint with fewer layers)" if field == "num_hidden_layers" else ""
            raise CheckpointError(f"{config_path}: {field} is {_short(got)} but preset {preset} has {_short(want)}; "
                                  f"this checkpoint is not {preset}-shaped{hint}")


def _short(value: Any) -> str:
    text = str(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def full_size_weights_hint(preset: str) -> str:
    """Where a full-size preset's weights come from and how big they are (bf16, model/summary.py)."""
    config = get_preset(preset)
    size = weight_bytes(config)["bf16"]
    return (f"preset {preset} has {parameter_counts(config).total / 1e9:.0f} B parameters ({size / 1e9:.0f} GB in bf16): "
            f"pass --checkpoint DIR with {FULL_SIZE_SOURCES[preset]} downloaded from Hugging Face (license-gated: "
            "accept Meta's license on the model page first), or --random-weights [--layers N] for a shape-faithful dry run")


# ------------------------------------------------------------------------------------------------ disk space
def required_disk_bytes(config: Llama4Config, precision: str, optimize: bool) -> int:
    """Free disk the export needs at its peak: the traced graphs' weights plus, while optimizing, the optimized
    copy beside them (fp32 on ONNX Runtime also keeps the MoE op's re-laid-out experts: count the weights twice)."""
    params = parameter_counts(config).total
    exported = params * torch.empty(0, dtype=PRECISIONS[precision]).element_size()
    if not optimize:
        return exported
    optimized = {"int4": weight_bytes(config)["int4"] * 2, "fp8": weight_bytes(config)["fp8"] * 2,
                 "fp32": exported * 2}.get(precision, exported)
    return exported + optimized


def check_disk_space(out: Path, need: int) -> None:
    """Fail before any slow step when the file system holding `out` has less than `need` bytes free."""
    probe = Path(out).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise DiskSpaceError(f"{out}: the export needs about {need / 1e9:,.1f} GB free but {probe} has "
                             f"{free / 1e9:,.1f} GB; free space or choose another --out")


# ------------------------------------------------------------------------------------------------ trace
def trace_graphs(config: Llama4Config, dtype: torch.dtype) -> dict[str, ir.Model]:
    """decode + prefill traced from a meta-device model: the in-memory export's graphs with data-less weights
    (their const_value is a meta torch tensor named by the parameter; save_streamed fills them in)."""
    with torch.device("meta"):
        model = Llama4ForCausalLM(config).to(dtype)
        # As loader._finish: the RoPE frequencies stay fp32 whatever the weights' dtype.
        model.rope_inv_freq = torch.empty(config.head_dim // 2, dtype=torch.float32)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.eval().requires_grad_(False)
        # Inputs are created under the same default device, so the whole trace is data-free.
        return {spec.name: onnx_export.export_graph(model, spec) for spec in onnx_export.GRAPHS}


def _is_meta(tensor: Any) -> bool:
    raw = getattr(tensor, "raw", None)  # the exporter's TorchTensor wraps the parameter as .raw
    return isinstance(raw, torch.Tensor) and raw.is_meta


# ------------------------------------------------------------------------------------------------ writing
Content = Callable[[ir.Value], tuple[Any, Callable[[], Iterator[Any]]]]


def save_streamed(graphs: dict[str, ir.Model], directory: Path, content: Content, data_file: str = DATA_FILE,
                  progress: Callable[[str], None] | None = None) -> None:
    """`save_graphs` with each tensor's bytes produced slice by slice by `content(value)` → (identity, slices):
    same file order, alignment and content de-duplication, so the same bytes; a tensor whose identity was already
    written is not read again. Small tensors (< EXTERNAL_MIN_BYTES) go inline, as save_graphs leaves them."""
    directory = Path(directory)
    stored: dict[tuple, tuple[int, int]] = {}  # content key -> (offset, length)
    keys: dict[Any, tuple] = {}  # identity -> content key
    with open(directory / data_file, "wb") as data:
        for graph_model in graphs.values():
            for value in graph_model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None:
                    continue
                identity, slices = content(value)
                if tensor.nbytes < EXTERNAL_MIN_BYTES:
                    if identity is not None:  # a data-less weight: materialize it inline
                        raw = b"".join(bytes(memoryview(s)) for s in slices())
                        value.const_value = ir.Tensor(np.frombuffer(raw, tensor.dtype.numpy()).reshape(tuple(tensor.shape)),
                                                      dtype=tensor.dtype, name=value.name)
                    continue
                key = keys.get(identity) if identity is not None else None
                if key is None:
                    if progress is not None:
                        progress(value.name)
                    start = data.tell()
                    alignment = LARGE_ALIGNMENT if tensor.nbytes >= LARGE_TENSOR_BYTES else SMALL_ALIGNMENT
                    data.write(b"\0" * (-start % alignment))
                    offset = data.tell()
                    digest = hashlib.sha256()
                    for piece in slices():
                        digest.update(piece)
                        data.write(piece)
                    length = data.tell() - offset
                    if length != tensor.nbytes:
                        raise ArtifactError(f"tensor {value.name!r}: got {length} bytes, its shape and dtype need {tensor.nbytes}")
                    key = (tensor.dtype, tuple(tensor.shape), digest.digest())
                    if key in stored:  # equal content already written: drop this copy, as save_graphs never writes it
                        data.seek(start)
                        data.truncate()
                    else:
                        stored[key] = (offset, length)
                    if identity is not None:
                        keys[identity] = key
                offset, length = stored[key]
                value.const_value = ir.ExternalTensor(data_file, offset, length, tensor.dtype, shape=tensor.shape,
                                                      name=value.name, base_dir=directory)
    for name, graph_model in graphs.items():
        ir.save(graph_model, directory / f"{name}.onnx")


def _byte_view(tensor: torch.Tensor) -> np.ndarray:
    return tensor.contiguous().view(torch.uint8).numpy()


def _weight_content(source: WeightSource, dtype: torch.dtype) -> Content:
    """Meta weights come from `source` (identity: the name); anything the trace computed is written as it is."""
    def content(value: ir.Value):
        tensor = value.const_value
        if not _is_meta(tensor):
            return None, lambda: iter([np.frombuffer(tensor.tobytes(), np.uint8)])
        name = value.name
        if name == "rope_inv_freq":  # a buffer computed from the config, never stored in checkpoints
            return ("weight", name), lambda: iter([_byte_view(rope_inverse_frequencies(source.config).to(tensor.raw.dtype))])
        return ("weight", name), lambda: (_byte_view(piece) for piece in source.chunks(name, tensor.raw.dtype))

    return content


def _file_content(value: ir.Value):
    """An external tensor's stored bytes read in CHUNK_BYTES pieces (4-bit data stays packed, as tobytes gives it)."""
    tensor = value.const_value
    if not isinstance(tensor, ir.ExternalTensor):
        return None, lambda: iter([np.frombuffer(tensor.tobytes(), np.uint8)])
    path, offset, length = os.fspath(tensor.path), tensor.offset or 0, tensor.length or tensor.nbytes

    def pieces() -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(offset)
            for start in range(0, length, CHUNK_BYTES):
                yield f.read(min(CHUNK_BYTES, length - start))

    return (path, offset, length), pieces


# ------------------------------------------------------------------------------------------------ export
def export_streamed(
    out: str | Path,
    source: WeightSource,
    precision: str = "fp32",
    max_prefill: int = DEFAULT_MAX_PREFILL,
    show_progress: bool = True,
) -> dict[str, Any]:
    """`export_artifact` in bounded RAM: decode + prefill graphs, weights, tokenizer and manifest; returns the manifest.
    Quantized precisions export fp32 graphs (quantize them with `optimize_streamed`)."""
    out = Path(out)
    _check_output(out, precision, max_prefill)
    dtype = PRECISIONS[precision]
    config = source.config
    with _Steps(show_progress) as step:
        with step(f"trace decode + prefill graphs ({config.num_hidden_layers} layers, weights on the meta device)"):
            graphs = trace_graphs(config, dtype)
        with atomic_directory(out) as tmp:
            with step(f"stream weights from {source.describe()} into {DATA_FILE}"):
                save_streamed(graphs, tmp, _weight_content(source, dtype))
                for spec in onnx_export.GRAPHS:
                    onnx.checker.check_model(str(tmp / spec.file))
            with step("write tokenizer files"):
                tokenizer = source.write_tokenizer(tmp)
            with step("hash files and write manifest"):
                entry = _manifest(_ConfigOnly(config), _SourceEntry(source), precision, max_prefill, tokenizer)
                manifest = write_manifest(tmp, entry)
    return manifest


class _ConfigOnly:
    """What pipeline._manifest reads from a model: its config."""

    def __init__(self, config: Llama4Config):
        self.config = config


class _SourceEntry:
    def __init__(self, source: WeightSource):
        self.manifest_entry = source.manifest_entry


# ------------------------------------------------------------------------------------------------ graph passes
class _UncachedExternalTensor(ir.ExternalTensor):
    """An external tensor that maps its file only while a pass reads it (ExternalTensor keeps the map, and with it
    every page read, for the life of the graph)."""

    def numpy(self) -> np.ndarray:
        if self.dtype.bitwidth < 8:  # packed sub-byte data: ExternalTensor unpacks it
            array = super().numpy().copy()
            self.release()
            return array
        with open(self.path, "rb") as f:  # one read into fresh memory: no mapped pages left behind
            f.seek(self.offset or 0)
            raw = np.fromfile(f, dtype=np.uint8, count=self.nbytes)
        return raw.view(self.dtype.numpy()).reshape(self.shape.numpy())

    def __array__(self, dtype: Any = None) -> np.ndarray:
        return self.numpy().__array__(dtype)

    def tobytes(self) -> bytes:
        raw = bytes(super().tobytes())
        self.release()
        return raw


def _uncached(tensor: ir.ExternalTensor) -> _UncachedExternalTensor:
    return _UncachedExternalTensor(tensor.location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
                                   name=tensor.name, base_dir=tensor.base_dir)


class _SpillingInitializers(_graph_containers.GraphInitializers):
    """Graph initializers that move a large in-memory tensor to a scratch file as it is added (what passes create:
    quantized weights, re-laid-out experts), so created tensors never pile up in memory."""

    def __init__(self, graph: ir.Graph, data: dict, scratch: Path):
        self._scratch = scratch
        super().__init__(graph, data)

    def __setitem__(self, key: str, value: ir.Value) -> None:
        tensor = value.const_value
        if tensor is not None and not isinstance(tensor, ir.ExternalTensor) and tensor.size > SPILL_MIN_ELEMENTS:
            with open(self._scratch, "ab") as f:
                offset = f.tell()
                f.write(tensor.tobytes())
            value.const_value = _UncachedExternalTensor(self._scratch.name, offset, tensor.nbytes, tensor.dtype,
                                                        shape=tensor.shape, name=tensor.name, base_dir=self._scratch.parent)
        super().__setitem__(key, value)


def _load_streaming(path: Path, scratch: Path) -> ir.Model:
    model = ir.load(path)
    graph = model.graph
    for value in graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = _uncached(value.const_value)
    graph._initializers = _SpillingInitializers(graph, dict(graph._initializers.data), scratch)  # onnx_ir has no hook for this
    return model


def optimize_streamed(
    directory: str | Path,
    target: str | None = None,
    trt_plugin: bool = True,
    quantization=None,
    manifest_update: dict[str, Any] | None = None,
    show_progress: bool = True,
):
    """`optimize_artifact` (same passes, same files) with the weights left on disk; returns (manifest, reports)."""
    from ..graph_passes.artifact_passes import _updated_manifest, copy_other_files
    from ..graph_passes.errors import GraphPassError
    from ..graph_passes.pipeline import default_target, optimize, passes_for

    directory = Path(directory)
    manifest = read_manifest(directory)
    target = target or default_target()
    passes_for(target)
    if "graph_passes" in manifest:
        raise GraphPassError(f"{directory}: already optimized for {manifest['graph_passes'].get('target')!r}; export again to optimize anew")
    graphs = manifest.get("graphs") or {}
    if not graphs:
        raise GraphPassError(f"{directory / MANIFEST}: lists no graphs; re-run the export")
    data_file = manifest.get("external_data", DATA_FILE)
    scratch_dir = Path(tempfile.mkdtemp(prefix=f".{directory.name}.spill-", dir=directory.parent))
    try:
        models, reports = {}, {}
        with _Steps(show_progress) as step:
            for name in sorted(graphs):
                file = graphs[name]["file"]
                with step(f"optimize {file} for {target} (weights stay on disk)"):
                    model = _load_streaming(directory / file, scratch_dir / f"{name}.spill")
                    models[name], reports[name] = optimize(model, target, trt_plugin=trt_plugin, quantization=quantization)
            with atomic_directory(directory) as tmp:
                with step(f"write graphs and {data_file}"):
                    save_streamed(models, tmp, _file_content, data_file)
                    copy_other_files(directory, tmp, manifest, data_file, reports)
                with step("hash files and write manifest"):
                    manifest = _updated_manifest(manifest, target, models, reports, False, None)
                    manifest = write_manifest(tmp, {**manifest, **(manifest_update or {})})
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    return manifest, reports


# ------------------------------------------------------------------------------------------------ the whole path
def export_streamed_artifact(
    out: str | Path,
    source: WeightSource,
    precision: str = "fp32",
    optimize: bool = True,
    target: str | None = None,
    trt_plugin: bool = True,
    block_size: int | None = None,
    int4_algo: str = "rtn",
    quantize_lm_head: bool = False,
    max_prefill: int = DEFAULT_MAX_PREFILL,
    show_progress: bool = True,
    calib_data: Path | None = None,
    calib_samples: int | None = None,
    calib_seq_len: int | None = None,
):
    """Check free disk, export in bounded RAM, then optimize in bounded RAM: int4 RTN-quantized, fp8 with activation
    scales from sequential layer-wise calibration (calib/streamed.py). Returns (manifest, pass reports or None)."""
    from ..calib.calibrate import activation_amax, calibration_samples, tokenizer_for
    from ..calib.stats import cache_key
    from ..graph_passes.quantize import QuantSpec
    from .pipeline import QuantOptions, _linear_weight_names

    out = Path(out)
    _check_output(out, precision, max_prefill)
    spec = None
    if precision in QUANTIZED_PRECISIONS:
        if precision == "int4" and int4_algo != "rtn":
            raise ConfigError("--precision int4 --int4-algo awq needs AWQ's scale search, which does not stream yet: use "
                              "--int4-algo rtn, or drop --stream (in-memory export) for a model that fits in RAM")
        if not optimize:
            raise ConfigError(f"--precision {precision} quantizes in the graph passes; drop --no-optimize")
        block = QuantOptions(int4_algo="rtn", block_size=block_size).check(precision)
        spec = QuantSpec(precision, block or 128, quantize_lm_head)
    elif block_size is not None:
        raise ConfigError(f"--block-size applies to --precision int4 only (got --precision {precision})")
    if precision == "fp8":  # bad calibration text fails here, before any slow step
        tokenizer = tokenizer_for(source, source.config)
        samples, text = calibration_samples(source, source.config, tokenizer, calib_data, calib_samples, calib_seq_len)
    check_disk_space(out, required_disk_bytes(source.config, precision, optimize))
    calibration = None
    if precision == "fp8":
        from ..calib.streamed import streamed_statistics

        with _Steps(show_progress) as step:
            with step(f"calibrate layer by layer on {samples.shape[0]} × {samples.shape[1]} tokens (FP8 activation scales)"):
                stats = streamed_statistics(source, samples)
        calibration = {"key": cache_key(source.manifest_entry(), text.sha256, *samples.shape),
                       "samples": int(samples.shape[0]), "seq_len": int(samples.shape[1]), "data_sha256": text.sha256}
    manifest = export_streamed(out, source, precision, max_prefill, show_progress)
    if not optimize:
        return manifest, None
    update = None
    if spec is not None:
        if precision == "fp8":
            spec.activation_amax = activation_amax(stats, _linear_weight_names(out))
        update = {"precision": precision, "quantization": {
            "precision": precision, "algorithm": "rtn" if precision == "int4" else "max",
            "block_size": spec.block_size if precision == "int4" else None, "quantize_lm_head": quantize_lm_head,
            "calibration": calibration, "awq": None, "streamed": True}}
    return optimize_streamed(out, target, trt_plugin, spec, update, show_progress)
