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
  calibrate  fp8 activation scales and FP8 KV-cache scales come from calib/streamed.py (sequential layer-wise: one
             layer's weights and the calibration hidden states in memory); int4 AWQ searches each layer's scales and
             clipping while that layer is in memory and replays them as the weights are written
             (calib/awq_streamed.py). AWQ's Gram statistics of one layer must fit in RAM (≈ 28 GB at Scout's
             shapes: check_awq_memory refuses up front when they do not; --int4-algo rtn needs none).

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

    def lossless_dtype(self, name: str) -> torch.dtype:
        """The narrowest float type that holds tensor `name` exactly (what calibration may keep it in)."""
        return torch.float32

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

    def lossless_dtype(self, name: str) -> torch.dtype:
        key, path = self._location(name)
        with safe_open(str(path), framework="pt") as f:
            stored = f.get_slice(key).get_dtype()
        return {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)

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
def required_disk_bytes(config: Llama4Config, precision: str, optimize: bool, awq_block: int | None = None) -> int:
    """Free disk the export needs at its peak: the traced graphs' weights (for int4 / fp8 without the routed experts,
    which the quantization passes read from the checkpoint) plus, while optimizing, the optimized copy beside them (fp32 on ONNX Runtime also keeps the MoE op's re-laid-out experts: count the weights twice);
    streamed AWQ (awq_block) keeps its per-layer plans until the weights are written (a clip limit per block: 4 bytes
    per awq_block weights)."""
    params = parameter_counts(config).total
    exported = params * torch.empty(0, dtype=PRECISIONS[precision]).element_size()
    if precision in QUANTIZED_PRECISIONS:  # the fp32 intermediate leaves the routed experts out (defer_experts)
        experts = len(config.moe_layers) * config.num_local_experts * 3 * config.hidden_size * config.intermediate_size
        exported -= experts * 4
    plans = 0 if awq_block is None else params * 4 // awq_block
    if not optimize:
        return exported + plans
    # While the optimized artifact is written: the exported one, the passes' scratch file (the quantized weights;
    # INT4 experts twice: DequantizeLinear form, then the per-expert MatMulNBits form) and the new artifact, whose
    # embedding and lm_head stay in the graphs' float type.
    unquantized = 2 * config.vocab_size * config.hidden_size * PRECISIONS[precision].itemsize
    created = {"int4": 2 * weight_bytes(config)["int4"], "fp8": weight_bytes(config)["fp8"], "fp32": exported}.get(precision, 0)
    written = {"int4": weight_bytes(config)["int4"] + unquantized, "fp8": weight_bytes(config)["fp8"] + unquantized}.get(precision, exported)
    return exported + max(created + written, plans)


def awq_statistics_bytes(config: Llama4Config) -> int:
    """Memory the streamed AWQ needs for its largest layer: that layer's Gram matrices (one per linear input, one per
    routed expert and input: float64 while accumulated + float32 result, calib/stats.py) and its weights in fp32."""
    def gram(channels: int) -> int:
        return channels * channels * (8 + 4)

    attention = gram(config.hidden_size) + gram(config.num_attention_heads * config.head_dim) + 2 * gram(config.head_dim)
    dense = attention + gram(config.hidden_size) + gram(config.intermediate_size_mlp)
    moe = (attention + gram(config.hidden_size) + gram(config.intermediate_size)
           + config.num_local_experts * (gram(config.hidden_size) + gram(config.intermediate_size)))
    layer_params = max(parameter_counts(config.replace(num_hidden_layers=1, moe_layers=moe_layer)).total
                       for moe_layer in ((), (0,))) - (1 if config.tie_word_embeddings else 2) * config.vocab_size * config.hidden_size
    return max(dense, moe if config.moe_layers else 0) + 4 * layer_params


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_awq_memory(config: Llama4Config) -> None:
    """Fail before any slow step when one layer's AWQ statistics cannot fit in the memory available now."""
    need, have = awq_statistics_bytes(config), _available_memory()
    if need > have:
        raise ConfigError(f"--int4-algo awq: the scale search needs about {need / 1e9:,.1f} GB for one layer's statistics "
                          f"(Gram matrices of every linear and routed expert input) and weights, but {have / 1e9:,.1f} GB "
                          "are available; use --int4-algo rtn, or a machine with more memory")


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
    written is not read again. Small tensors (< EXTERNAL_MIN_BYTES) go inline, as save_graphs leaves them.
    slices None defers a (large) tensor: its place in the file is left as a hole that is never read — the caller
    gives the loaded graph the tensor from elsewhere (`attach_deferred`)."""
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
                    if slices is None:  # deferred: a hole (no disk blocks on sparse-file systems), never read
                        data.seek(offset + tensor.nbytes)
                        data.truncate()
                        key = ("deferred", identity)
                        stored[key] = (offset, tensor.nbytes)
                    else:
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


def _weight_content(source: WeightSource, dtype: torch.dtype, defer_experts: bool = False) -> Content:
    """Meta weights come from `source` (identity: the name); anything the trace computed is written as it is.
    defer_experts: the routed experts are not written (see save_streamed) — the quantization passes read them from
    the source one expert at a time and replace them, so an fp32 copy on disk would only cost 4 bytes per parameter."""
    def content(value: ir.Value):
        tensor = value.const_value
        if not _is_meta(tensor):
            return None, lambda: iter([np.frombuffer(tensor.tobytes(), np.uint8)])
        name = value.name
        if name == "rope_inv_freq":  # a buffer computed from the config, never stored in checkpoints
            return ("weight", name), lambda: iter([_byte_view(rope_inverse_frequencies(source.config).to(tensor.raw.dtype))])
        if defer_experts and is_routed_experts(name) and tensor.nbytes >= EXTERNAL_MIN_BYTES:
            return ("weight", name), None
        return ("weight", name), lambda: (_byte_view(piece) for piece in source.chunks(name, tensor.raw.dtype))

    return content


def is_routed_experts(name: str) -> bool:
    return name.endswith((".experts.gate_up_proj", ".experts.down_proj"))


_TORCH_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16}  # quantized exports are fp32


class SourceTensor(ir.LazyTensor):
    """A weight read from a WeightSource when a pass asks for it, never kept: `numpy()` reads it whole, and
    `read_leading(e)` (quantize.leading_slice) one expert of a stacked [E, K, N] tensor — in order e = 0, 1, … it
    continues one pass over the source's slices."""

    def __init__(self, source: WeightSource, name: str, dtype: ir.DataType, shape: tuple[int, ...]):
        self.source, self.torch_dtype = source, _TORCH_DTYPES[dtype]
        super().__init__(self._whole, dtype, ir.Shape(shape), name=name)
        self._experts: Iterator[torch.Tensor] | None = None
        self._next = 0

    def _whole(self) -> ir.TensorProtocol:
        from ..calib.streamed import _read

        return ir.Tensor(_read(self.source, self.name, torch.Size(tuple(self.shape)), self.torch_dtype).numpy())

    def chunks(self) -> Iterator[torch.Tensor]:
        return self.source.chunks(self.name, self.torch_dtype)

    def read_leading(self, index: int) -> np.ndarray:
        if self._experts is None or index != self._next:
            self._experts, self._next = expert_by_expert(self.chunks(), tuple(self.shape), self.torch_dtype), 0
        for _ in range(index - self._next):
            next(self._experts)
        self._next = index + 1
        expert = next(self._experts).numpy()
        if self._next == self.shape[0]:
            self._experts = None  # done: drop the reader, which holds this expert's buffer, not keep it with the graph
        return expert


def expert_by_expert(pieces: Iterator[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype = torch.float32
                     ) -> Iterator[torch.Tensor]:
    """tensor[0], tensor[1], … of a tensor given as row-major slices of any size, each in a fresh buffer."""
    size = int(np.prod(shape[1:]))
    buffer, filled = torch.empty(size, dtype=dtype), 0
    for piece in pieces:
        flat, used = piece.reshape(-1), 0
        while used < flat.numel():
            take = min(size - filled, flat.numel() - used)
            buffer[filled:filled + take] = flat[used:used + take]
            filled, used = filled + take, used + take
            if filled == size:
                yield buffer.view(shape[1:])
                buffer, filled = torch.empty(size, dtype=dtype), 0


def attach_deferred(model: ir.Model, source: WeightSource) -> None:
    """Give a loaded graph the routed-expert weights `defer_experts` left out of its data file, read from `source`."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if is_routed_experts(value.name) and tensor is not None and tensor.nbytes >= EXTERNAL_MIN_BYTES:
            value.const_value = SourceTensor(source, value.name, tensor.dtype, tuple(tensor.shape))


def _file_content(value: ir.Value):
    """An external tensor's stored bytes read in CHUNK_BYTES pieces (4-bit data stays packed, as tobytes gives it);
    a deferred weight no pass replaced, from its source."""
    tensor = value.const_value
    if isinstance(tensor, SourceTensor):
        return ("source", tensor.name), lambda: (_byte_view(piece) for piece in tensor.chunks())
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
    defer_experts: bool = False,
) -> dict[str, Any]:
    """`export_artifact` in bounded RAM: decode + prefill graphs, weights, tokenizer and manifest; returns the manifest.
    Quantized precisions export fp32 graphs (quantize them with `optimize_streamed`); defer_experts leaves the
    routed experts out of the data file (holes: `optimize_streamed(source=…)` reads them from the source)."""
    out = Path(out)
    _check_output(out, precision, max_prefill)
    dtype = PRECISIONS[precision]
    config = source.config
    with _Steps(show_progress) as step:
        with step(f"trace decode + prefill graphs ({config.num_hidden_layers} layers, weights on the meta device)"):
            graphs = trace_graphs(config, dtype)
        with atomic_directory(out) as tmp:
            with step(f"stream weights from {source.describe()} into {DATA_FILE}"):
                save_streamed(graphs, tmp, _weight_content(source, dtype, defer_experts))
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


class SpillFile:
    """A scratch file that created tensors are moved to, shared by the graphs of one optimization: equal bytes are
    stored once (decode and prefill quantize the same weights to the same tensors)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stored: dict[bytes, int] = {}  # sha256 of the bytes -> offset

    def store(self, tensor: ir.TensorProtocol) -> _UncachedExternalTensor:
        raw = tensor.tobytes()
        digest = hashlib.sha256(raw).digest()
        offset = self._stored.get(digest)
        if offset is None:
            with open(self.path, "ab") as f:
                offset = self._stored[digest] = f.tell()
                f.write(raw)
        return _UncachedExternalTensor(self.path.name, offset, len(raw), tensor.dtype, shape=tensor.shape,
                                       name=tensor.name, base_dir=self.path.parent)


class _SpillingInitializers(_graph_containers.GraphInitializers):
    """Graph initializers that move a large in-memory tensor to a scratch file as it is added (what passes create:
    quantized weights, re-laid-out experts), so created tensors never pile up in memory."""

    def __init__(self, graph: ir.Graph, data: dict, spill: SpillFile):
        self._spill = spill
        super().__init__(graph, data)

    def __setitem__(self, key: str, value: ir.Value) -> None:
        tensor = value.const_value
        if tensor is not None and not isinstance(tensor, ir.ExternalTensor) and tensor.size > SPILL_MIN_ELEMENTS:
            value.const_value = self._spill.store(tensor)
        super().__setitem__(key, value)


def _load_streaming(path: Path, spill: SpillFile) -> ir.Model:
    model = ir.load(path)
    graph = model.graph
    for value in graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = _uncached(value.const_value)
    graph._initializers = _SpillingInitializers(graph, dict(graph._initializers.data), spill)  # onnx_ir has no hook for this
    return model


def optimize_streamed(
    directory: str | Path,
    target: str | None = None,
    trt_plugin: bool = True,
    quantization=None,
    manifest_update: dict[str, Any] | None = None,
    show_progress: bool = True,
    source: WeightSource | None = None,
):
    """`optimize_artifact` (same passes, same files) with the weights left on disk; returns (manifest, reports).
    source: where the routed experts an `export_streamed(defer_experts=True)` left out come from (the files are then
    not re-hashed on reading: holes in the data file would not match the manifest's hash anyway)."""
    from ..graph_passes.artifact_passes import _updated_manifest, copy_other_files
    from ..graph_passes.errors import GraphPassError
    from ..graph_passes.pipeline import default_target, optimize, passes_for

    directory = Path(directory)
    manifest = read_manifest(directory, verify=source is None)
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
        spill = SpillFile(scratch_dir / "passes.spill")
        with _Steps(show_progress) as step:
            for name in sorted(graphs):
                file = graphs[name]["file"]
                with step(f"optimize {file} for {target} (weights stay on disk)"):
                    model = _load_streaming(directory / file, spill)
                    if source is not None:
                        attach_deferred(model, source)
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
    kv_cache_dtype: str | None = None,
    calib_percentile: float | None = None,
):
    """Check free disk, export in bounded RAM, then optimize in bounded RAM: int4 RTN-quantized, fp8 with activation
    scales (and an FP8 KV cache with its scales) from sequential layer-wise calibration (calib/streamed.py).
    Returns (manifest, pass reports or None)."""
    from ..calib.calibrate import calibration_samples, tokenizer_for
    from ..graph_passes.quantize import QuantSpec
    from .pipeline import QuantOptions

    out = Path(out)
    _check_output(out, precision, max_prefill)
    spec = None
    options = QuantOptions(int4_algo=int4_algo, block_size=block_size, amax_percentile=calib_percentile,
                           kv_cache_dtype=kv_cache_dtype)
    if precision in QUANTIZED_PRECISIONS:
        if not optimize:
            raise ConfigError(f"--precision {precision} quantizes in the graph passes; drop --no-optimize")
        block = options.check(precision)
        spec = QuantSpec(precision, block or 128, quantize_lm_head)
    elif block_size is not None or calib_percentile is not None or kv_cache_dtype is not None:
        raise ConfigError(f"--block-size / --calib-percentile / --kv-cache-dtype apply to quantized precisions only "
                          f"(got --precision {precision})")
    awq = precision == "int4" and int4_algo == "awq"
    calibrated = precision == "fp8" or kv_cache_dtype == "fp8" or awq
    if awq:
        check_awq_memory(source.config)
    if calibrated:  # bad calibration text fails here, before any slow step
        tokenizer = tokenizer_for(source, source.config)
        samples, text = calibration_samples(source, source.config, tokenizer, calib_data, calib_samples, calib_seq_len)
    check_disk_space(out, required_disk_bytes(source.config, precision, optimize, spec.block_size if awq else None))
    plans_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.awq-", dir=out.parent)) if awq else None
    try:  # the AWQ plans are read until the quantized weights are written
        return _export_and_quantize(out, source, precision, optimize, target, trt_plugin, spec, max_prefill, show_progress,
                                    samples if calibrated else None, text if calibrated else None, plans_dir, int4_algo,
                                    quantize_lm_head, kv_cache_dtype, calib_percentile)
    finally:
        if plans_dir is not None:
            shutil.rmtree(plans_dir, ignore_errors=True)


def _export_and_quantize(out, source, precision, optimize, target, trt_plugin, spec, max_prefill, show_progress, samples,
                         text, plans_dir, int4_algo, quantize_lm_head, kv_cache_dtype, calib_percentile):
    from ..calib.calibrate import activation_amax
    from ..calib.stats import cache_key, kv_cache_amax
    from .pipeline import FP8_KV_CACHE_ENTRY, _linear_weight_names

    calibration, awq_records, stats, weights = None, None, None, source
    if samples is not None:
        from ..calib.streamed import streamed_statistics

        with _Steps(show_progress) as step:
            tokens = f"{samples.shape[0]} × {samples.shape[1]} tokens"
            if plans_dir is not None:
                from ..calib.awq_streamed import AwqWeights, awq_plans_streamed

                with step(f"calibrate layer by layer on {tokens} + AWQ scale search (block {spec.block_size})"):
                    plans, awq_records, stats = awq_plans_streamed(source, samples, spec.block_size, plans_dir)
                weights = AwqWeights(source, plans)
            else:
                with step(f"calibrate layer by layer on {tokens} (FP8 scales)"):
                    stats = streamed_statistics(source, samples, for_awq=False)
        calibration = {"key": cache_key(source.manifest_entry(), text.sha256, *samples.shape),
                       "samples": int(samples.shape[0]), "seq_len": int(samples.shape[1]), "data_sha256": text.sha256}
    # Quantized: the passes replace the routed experts, reading them from the source one expert at a time, so the
    # fp32 intermediate leaves them out (Scout: 431 GB of fp32 never written).
    manifest = export_streamed(out, weights, precision, max_prefill, show_progress, defer_experts=spec is not None)
    if not optimize:
        return manifest, None
    update = None
    if spec is not None:
        entry = {"precision": precision, "algorithm": {"int4": int4_algo, "fp8": "max"}[precision],
                 "block_size": spec.block_size if precision == "int4" else None, "quantize_lm_head": quantize_lm_head,
                 "calibration": calibration, "awq": awq_records, "streamed": True}
        update = {"precision": precision, "quantization": entry}
        if precision == "fp8":
            spec.activation_amax = activation_amax(stats, _linear_weight_names(out), calib_percentile)
            entry["activation_range"] = "amax" if calib_percentile is None else f"percentile {calib_percentile}"
        if kv_cache_dtype == "fp8":
            spec.kv_cache_amax = kv_cache_amax(stats, source.config.num_hidden_layers)
            update["dtypes"] = {"logits": "float32", "kv_cache": "float8_e4m3fn"}
            entry["kv_cache"] = FP8_KV_CACHE_ENTRY
    try:
        return optimize_streamed(out, target, trt_plugin, spec, update, show_progress,
                                 source=weights if spec is not None else None)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # the unquantized intermediate is not what was asked for
        raise
