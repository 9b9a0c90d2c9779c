"""The one artifact writer: graphs whose weights come from anywhere → `{graph}.onnx` files sharing one external-data
file, each distinct tensor stored once, in a layout runtimes can memory-map; and the lazy reading the graph passes
use on a written artifact, so no stage ever holds more than one weight (or one expert) at a time.

Writing (`write_graphs`): a tensor's bytes come slice by slice from a content function (`weight_content` reads a
weight source; `file_content` re-reads a written artifact or a pass's spill file; `memory_content` takes tensors
already in the graph), are hashed and written, then freed. Order: graphs in the given order, initializers by name;
a tensor whose bytes were already written is not written again (decode and prefill share every weight). Offsets are
aligned: 64 KiB for tensors of 1 MiB and more, 64 bytes for the rest; tensors under 1 KiB stay inside the .onnx.

Reading for the passes (`load_lazily`): external tensors are read into fresh memory when a pass asks (never mapped
for the life of the graph); tensors a pass creates are moved to a spill file the moment they join the graph; routed
experts a quantized export left out of its data file (`defer_experts`) are read from the weight source one expert
at a time (`SourceTensor`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir import _graph_containers

from ..artifact import ArtifactError
from ..model.modeling import rope_inverse_frequencies
from ..weights import CHUNK_BYTES, WeightSource, expert_by_expert, read_tensor

DATA_FILE = "model.data"
# Tensors smaller than this stay inside the .onnx file (shape constants, scalars): onnx's own default threshold.
EXTERNAL_MIN_BYTES = 1024
# Offsets in the data file are aligned so runtimes can memory-map tensors: 64 KiB (the largest allocation
# granularity, Windows') for big tensors, 64 bytes (a cache line) for the rest; onnx's external-data helper does the same.
LARGE_TENSOR_BYTES = 1 << 20
LARGE_ALIGNMENT = 1 << 16
SMALL_ALIGNMENT = 64
# Tensors a graph pass creates are spilled to disk above this many elements; smaller ones stay in memory because
# the final CSE compares constants up to graph_passes.pipeline.CONSTANT_CSE_LIMIT elements by value.
SPILL_MIN_ELEMENTS = 1 << 16

# value → (identity, slices): identity names the bytes for de-duplication before they are read (None: compare by
# content only); slices yields the bytes in pieces, or is None for a deferred tensor (a hole in the file).
Content = Callable[[ir.Value], tuple[Any, Callable[[], Iterator[Any]] | None]]


def memory_content(value: ir.Value):
    """A tensor already in the graph (in memory, or computed by the trace)."""
    tensor = value.const_value
    return None, lambda: iter([np.frombuffer(tensor.tobytes(), np.uint8)])


def write_graphs(graphs: dict[str, ir.Model], directory: Path, content: Content = memory_content,
                 data_file: str = DATA_FILE, progress: Callable[[str], None] | None = None) -> None:
    """Write `{name}.onnx` for every graph into `directory`, all pointing into one external-data file; each tensor's
    bytes come slice by slice from `content(value)` → (identity, slices). A tensor whose identity, or whose content,
    was already written is stored once. slices None defers a (large) tensor: its place in the file is left as a hole
    that is never read — the loaded graph gets the tensor from elsewhere (`attach_deferred`)."""
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


def _is_meta(tensor: Any) -> bool:
    raw = getattr(tensor, "raw", None)  # the exporter's TorchTensor wraps the parameter as .raw
    return isinstance(raw, torch.Tensor) and raw.is_meta


def is_routed_experts(name: str) -> bool:
    return name.endswith((".experts.gate_up_proj", ".experts.down_proj"))


def weight_content(source: WeightSource, defer_experts: bool = False) -> Content:
    """A traced graph's data-less weights from `source` (identity: the name); anything the trace computed is
    written as it is. defer_experts: the routed experts are not written (see write_graphs) — the quantization passes
    read them from the source one expert at a time and replace them, so an fp32 copy on disk would only cost 4 bytes
    per parameter."""
    def content(value: ir.Value):
        tensor = value.const_value
        if not _is_meta(tensor):
            return memory_content(value)
        name, dtype = value.name, tensor.raw.dtype
        if name == "rope_inv_freq":  # a buffer computed from the config, never stored in checkpoints
            return ("weight", name), lambda: iter([_byte_view(rope_inverse_frequencies(source.config).to(dtype))])
        if defer_experts and is_routed_experts(name) and tensor.nbytes >= EXTERNAL_MIN_BYTES:
            return ("weight", name), None
        return ("weight", name), lambda: (_byte_view(piece) for piece in source.chunks(name, dtype))

    return content


def file_content(value: ir.Value):
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
        return ir.Tensor(read_tensor(self.source, self.name, self.torch_dtype).numpy())

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




def attach_deferred(model: ir.Model, source: WeightSource) -> None:
    """Give a loaded graph the routed-expert weights `defer_experts` left out of its data file, read from `source`."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if is_routed_experts(value.name) and tensor is not None and tensor.nbytes >= EXTERNAL_MIN_BYTES:
            value.const_value = SourceTensor(source, value.name, tensor.dtype, tuple(tensor.shape))




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
        raw = _stored_bytes(tensor)
        digest = hashlib.sha256(raw).digest()
        offset = self._stored.get(digest)
        if offset is None:
            with open(self.path, "ab") as f:
                offset = self._stored[digest] = f.tell()
                f.write(raw)
        return _UncachedExternalTensor(self.path.name, offset, len(raw), tensor.dtype, shape=tensor.shape,
                                       name=tensor.name, base_dir=self.path.parent)


def _stored_bytes(tensor: ir.TensorProtocol) -> memoryview | bytes:
    """The bytes ONNX stores for `tensor`: a view of its array where that array already is those bytes (tobytes()
    would copy it: a second 4.1 GB in memory for Scout's transposed fp32 lm_head), else tobytes() (sub-byte types
    are packed, so that copy is the smaller one)."""
    if isinstance(tensor, ir.PackedTensor):
        array = tensor.numpy_packed()
    elif isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray) and tensor.dtype.bitwidth >= 8:
        array = tensor.raw
    else:
        return tensor.tobytes()
    if sys.byteorder != "little" or not array.flags.c_contiguous:
        return tensor.tobytes()
    return memoryview(array.reshape(-1).view(np.uint8))


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


def load_lazily(path: Path, spill: SpillFile, source: WeightSource | None = None) -> ir.Model:
    """A written graph for the passes: external tensors read on demand, created tensors spilled to `spill`, and the
    routed experts an export deferred read from `source`."""
    model = ir.load(path)
    graph = model.graph
    for value in graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = _uncached(value.const_value)
    graph._initializers = _SpillingInitializers(graph, dict(graph._initializers.data), spill)  # onnx_ir has no hook for this
    if source is not None:
        attach_deferred(model, source)
    return model


