"""Quantization graph passes: INT4 weight-only (blockwise) and FP8 E4M3 W8A8, as standard ONNX Q/DQ.

Graph conventions (what the ONNX Runtime and TensorRT stages read):

INT4 (weight-only, symmetric, zero point 0, blocks of `block_size` consecutive k along the input dimension K)
  dense linears   x ─ MatMul ─ y  with the weight  W_int4 [K, N] (INT4 initializer `<weight>.int4`)
                  → DequantizeLinear(W_int4, scale [ceil(K/B), N] `<weight>.int4_scale`, axis=0, block_size=B)
                  The nn.Linear weight [N, K] is transposed once at quantization; Gemm(transB=1) / Transpose→MatMul
                  become MatMul. ONNX Runtime fuses DQ→MatMul into com.microsoft.MatMulNBits (4-bit in memory);
                  TensorRT reads it as weight-only INT4.
  routed experts  the fused Llama4MoE node's gate_up [E, H, 2I] / down [E, I, H] inputs (checkpoint layout x @ W, K = axis 1)
                  → Transpose(perm 0,2,1) ∘ DequantizeLinear(W_int4 [E, N, K] `<weight>.int4`, scale [E, N, ceil(K/B)]
                  `<weight>.int4_scale`, axis=2, block_size=B): K contiguous per output row, as kernels/formats.py and
                  MatMulNBits. On ONNX Runtime the MoE lowering turns each expert's slice into
                  MatMulNBits initializers (graph_passes/lower.py, one If per expert); the standard-op forms dequantize
                  at run time. The TensorRT plugin node gets the Transpose outputs as its gate_up/down inputs
                  (the plugin may read the DQ inputs for the packed layout).
  shared expert   a dense linear wherever it is a Gemm (every ONNX Runtime form); the TensorRT plugin node's
                  shared_gate/up/down inputs [N, K] → Transpose ∘ DequantizeLinear(W_int4 [K, N], axis=0) as above.
  Values: q = clip(round_half_even(w / s), -7, 7), s = amax(block) / 7 (0-blocks: s = 1). The same values as
  kernels/formats.py (nibble = q + 8, low nibble = even k) and ORT MatMulNBits with zero point 8.
FP8 E4M3 (W8A8, per-tensor scales, amax / 448)
  dense linears   x → QuantizeLinear(x, a_scale, float8e4m3fn zero point) → DequantizeLinear(…, a_scale) → MatMul
                  with weight DequantizeLinear(W_fp8 [K, N] `<weight>.fp8`, w_scale scalar `<weight>.fp8_scale`):
                  the placement TensorRT's strongly typed mode turns into an FP8 GEMM. a_scale = calibrated amax / 448.
  routed experts  weight-only FP8: DequantizeLinear(W_fp8 [E, K, N], scale [E] (axis 0)) — the MoE kernels'
                  FP8 format (kernels/formats.py) widens weights in registers and keeps activations in 16/32 bit.
                  The TensorRT plugin's shared expert weights likewise (weight-only, through a Transpose).
Scales have the graph's float type (the weight's: fp32 for ONNX Runtime, fp16 for TensorRT), as DequantizeLinear
outputs its scale's type.
Never quantized: router, norms. lm_head and the token embedding stay float unless asked (quantize_lm_head=True makes
lm_head like any linear), except int4 on ONNX Runtime, whose spec stores lm_head 8-bit and the embedding 4-bit
blockwise (QuantSpec.lm_head_bits / embedding_bits; --float-embeddings keeps both float).
FP8 E4M3 KV cache (QuantSpec.kv_cache_amax; per layer, one scale for K and one for V, s = calibrated amax / 448)
  past_key.L  graph input float8e4m3fn → DequantizeLinear(·, s `kv_cache.L.key_scale`) → what attention read before
  new_key.L   what the graph returned before → QuantizeLinear(·, s, float8e4m3fn zero point) → graph output float8e4m3fn
  (the same for value): the runtime stores the output bytes as they are and feeds them back, so every cached token
  is quantized once with the scale it is read back with; TensorRT's strongly typed mode reads the Q/DQ pair as an
  FP8 cache. The scale has the cache's float type (DequantizeLinear's output type is its scale's).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..model import io_spec
from . import ops, trt_plugin_spec
from .manager import GraphPass, PassContext

INT4_MAX = 7
INT_MAX = {4: INT4_MAX, 8: 127}
FP8_E4M3_MAX = 448.0
PRECISIONS = ("int4", "fp8")
QUANTIZED = "quantized"
_LINEAR = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|layers\.\d+\.mlp\.fc1|layers\.\d+\.mlp\.fc2)\.weight$")
_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")
LM_HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


@dataclass
class QuantSpec:
    precision: str
    block_size: int = 128
    quantize_lm_head: bool = False  # lm_head like every linear (INT4 / FP8)
    # INT4 on ONNX Runtime by default (the nearest equal of llama.cpp's Q4_0 preset: 6-bit output, 4-bit embedding):
    # lm_head 8-bit blockwise (MatMulNBits bits 8) unless quantize_lm_head, the token embedding 4-bit blockwise
    # (GatherBlockQuantized); None keeps them in the graphs' float type
    lm_head_bits: int | None = None
    embedding_bits: int | None = None
    # FP8: calibrated amax of each dense linear's input, by weight name (calib.quant.activation_amax)
    activation_amax: dict[str, float] = field(default_factory=dict)
    # FP8 KV cache: layer -> calibrated (amax of new_key.L, amax of new_value.L); empty: the cache keeps the float type
    kv_cache_amax: dict[int, tuple[float, float]] = field(default_factory=dict)

    def bits(self, name: str) -> int | None:
        """The integer width an INT4-precision linear weight gets (None: not quantized), FP8: 8 for what it quantizes."""
        if _LINEAR.search(name) or (self.quantize_lm_head and name == LM_HEAD):
            return 4 if self.precision == "int4" else 8
        return self.lm_head_bits if name == LM_HEAD and self.precision == "int4" else None


# ------------------------------------------------------------------------------------------------ numerics
def int4_blockwise(w: np.ndarray, block: int, axis: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric `bits`-bit integers (4: in [-7, 7]; 8: in [-127, 127]) along `axis` in blocks of `block`: (q int8, same
    shape; scales fp32 with that axis of size ceil(K / block)). A last partial block has its own scale."""
    w = np.moveaxis(np.asarray(w, dtype=np.float32), axis, -1)
    k = w.shape[-1]
    blocks = -(-k // block)
    padded = np.zeros(w.shape[:-1] + (blocks * block,), np.float32)
    padded[..., :k] = w
    grouped = padded.reshape(w.shape[:-1] + (blocks, block))
    qmax = INT_MAX[bits]
    scale = np.abs(grouped).max(-1) / qmax
    scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
    q = np.clip(np.round(grouped / scale[..., None]), -qmax, qmax).astype(np.int8)
    q = q.reshape(padded.shape)[..., :k]
    return np.moveaxis(q, -1, axis), np.moveaxis(scale, -1, axis)


def int4_dequantize(q: np.ndarray, scale: np.ndarray, block: int, axis: int) -> np.ndarray:
    k = q.shape[axis]
    return q.astype(np.float32) * np.repeat(scale, block, axis=axis).take(np.arange(k), axis=axis)


def fp8_quantize(w: np.ndarray, axes: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 with scale amax / 448 over `axes` (None: the whole tensor): (float8_e4m3fn array, fp32 scale)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=axes, keepdims=axes is not None)
    # amax / 448 of a tensor of subnormals is 0 or a subnormal rounded by up to half its value: w / scale would be
    # inf or past 448, which E4M3 (no inf) stores as NaN; so a zero scale is 1 and w / scale saturates, as
    # QuantizeLinear does
    scale = (amax / FP8_E4M3_MAX).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1), scale)
    return np.clip(w / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn), scale


def fp8_static_scale(amax: float, float_type: ir.DataType) -> np.ndarray:
    """A QuantizeLinear scale for a calibrated amax: amax / 448 in the graph's float type, never 0 there (fp16 rounds
    any amax under ~1e-5 to a zero scale, and QuantizeLinear's 0 / 0 is NaN)."""
    dtype = float_type.numpy()
    return np.asarray(max(max(amax, 1e-12) / FP8_E4M3_MAX, float(np.finfo(dtype).tiny)), dtype)


# ------------------------------------------------------------------------------------------------ graph helpers
def initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol, dtype: ir.DataType | None = None) -> ir.Value:
    """A new initializer `name` holding `array` (stored as `dtype` when given); the existing one when `name` is taken,
    so constants shared by many rewrites (zero points, axes) are stored once."""
    if name in graph.initializers:
        return graph.initializers[name]
    if isinstance(array, ir.TensorProtocol):
        tensor = array
        tensor.name = name
    else:
        tensor = ir.Tensor(array, dtype=dtype, name=name) if dtype is not None else ir.tensor(array, name=name)
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tuple(tensor.shape)), const_value=tensor)
    graph.register_initializer(value)
    return value


def leading_slice(tensor: ir.TensorProtocol | np.ndarray, index: int) -> np.ndarray:
    """tensor[index] (signed INT4 data as int8). A tensor in an external file is read one slice at a time, without
    mapping the file: a pass reading a Scout layer's stacked experts [16, 5120, 16384] so holds one expert, not 5.4 GB."""
    if isinstance(tensor, np.ndarray):
        return tensor[index]
    shape = tuple(tensor.shape.numpy())
    if hasattr(tensor, "read_leading"):  # a weight read from the checkpoint on demand (export/writer.SourceTensor)
        return tensor.read_leading(index)
    if not isinstance(tensor, ir.ExternalTensor):
        array = np.asarray(tensor.numpy()[index])
        return array.astype(np.int8) if tensor.dtype == ir.DataType.INT4 else array
    elements = int(np.prod(shape[1:], dtype=np.int64))
    nbytes = elements * tensor.dtype.bitwidth // 8
    with open(tensor.path, "rb") as f:
        f.seek((tensor.offset or 0) + index * nbytes)
        raw = np.fromfile(f, dtype=np.uint8, count=nbytes)
    if tensor.dtype == ir.DataType.INT4:  # two per byte, the even element in the low nibble; sign-extend
        nibbles = np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(-1).astype(np.int8)
        return ((nibbles ^ 8) - 8).reshape(shape[1:])
    return raw.view(tensor.dtype.numpy()).reshape(shape[1:])


# The slice a 2-D weight is read and quantized in: temporaries stay this size, not the tensor's (Scout's lm_head and
# token embedding are 4.1 GB each in fp32).
SLICE_BYTES = 64 << 20


def row_slices(tensor: ir.TensorProtocol | np.ndarray, rows: int) -> Iterator[np.ndarray]:
    """tensor[0:rows], tensor[rows:2·rows], … of a 2-D float weight; from an external file one slice per read,
    without mapping it."""
    if isinstance(tensor, np.ndarray) or not isinstance(tensor, ir.ExternalTensor):
        array = tensor if isinstance(tensor, np.ndarray) else tensor.numpy()
        for start in range(0, array.shape[0], rows):
            yield array[start:start + rows]
        return
    n, k = tuple(tensor.shape.numpy())
    dtype = tensor.dtype.numpy()
    with open(tensor.path, "rb") as f:
        f.seek(tensor.offset or 0)
        for start in range(0, n, rows):
            count = min(rows, n - start)
            yield np.fromfile(f, dtype=dtype, count=count * k).reshape(count, k)


def blockwise_slices(tensor: ir.TensorProtocol | np.ndarray, block: int, bits: int
                     ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """A [N, K] weight quantized along K (int4_blockwise, axis 1) one row slice at a time: (rows, q, scales) each."""
    k = tuple(tensor.shape)[1] if isinstance(tensor, np.ndarray) else int(tensor.shape.numpy()[1])
    start = 0
    for piece in row_slices(tensor, max(1, SLICE_BYTES // (4 * k))):
        q, scale = int4_blockwise(piece, block, axis=1, bits=bits)
        yield slice(start, start + len(piece)), q, scale
        start += len(piece)


def blockwise_rows(tensor: ir.TensorProtocol | np.ndarray, block: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """A [N, K] weight quantized along K slice by slice (blockwise_slices): (q int8 [N, K], scales [N, K/B])."""
    n, k = tuple(tensor.shape) if isinstance(tensor, np.ndarray) else tuple(tensor.shape.numpy())
    q, scale = np.empty((n, k), np.int8), np.empty((n, -(-k // block)), np.float32)
    for rows, q_rows, scale_rows in blockwise_slices(tensor, block, bits):
        q[rows], scale[rows] = q_rows, scale_rows
    return q, scale


def _experts_int4(weights: ir.TensorProtocol, block: int) -> tuple[ir.PackedTensor, np.ndarray]:
    """Experts [E, K, N] → INT4 [E, N, K] (K contiguous, packed two per byte) and scales [E, N, ceil(K/B)], one expert
    at a time: the temporaries stay one expert's size (a Scout layer's stacked experts are 5.4 GB in fp32)."""
    experts, k, n = weights.shape
    packed = np.empty((experts, n * k // 2), np.uint8)
    scale = np.empty((experts, n, -(-k // block)), np.float32)
    for e in range(experts):
        q_e, scale[e] = int4_blockwise(leading_slice(weights, e).T, block, axis=1)
        nibbles = (q_e.reshape(-1) & 0xF).astype(np.uint8)
        packed[e] = nibbles[0::2] | (nibbles[1::2] << 4)
    return ir.PackedTensor(packed.reshape(-1), ir.DataType.INT4, shape=(experts, n, k)), scale


def _experts_fp8(weights: ir.TensorProtocol) -> tuple[np.ndarray, np.ndarray]:
    """Experts [E, K, N] → FP8 [E, K, N] and one scale per expert [E], one expert at a time."""
    q = np.empty(tuple(weights.shape), ml_dtypes.float8_e4m3fn)
    scale = np.empty(weights.shape[0], np.float32)
    for e in range(weights.shape[0]):
        q[e], scale[e] = fp8_quantize(leading_slice(weights, e))
    return q, scale


def _dequantized_weight(graph: ir.Graph, name: str, w: np.ndarray | ir.TensorProtocol, spec: QuantSpec, axis: int,
                        anchor: ir.Node, bits: int = 4) -> ir.Value:
    """DequantizeLinear of `w` quantized per spec, inserted before `anchor`; returns its output (`w`'s float type).

    2-D `w` is a dense linear's [N, K] as nn.Linear stores it (an initializer's tensor, read in row slices, or numpy):
    the DequantizeLinear yields its transpose [K, N] (K along `axis`, 0); 3-D `w` (the initializer's tensor, read one
    expert at a time) are stacked experts [E, K, N] in checkpoint layout: INT4 stores them transposed, [E, N, K] with
    `axis` 2 (see the module docstring), FP8 as they are."""
    experts = len(w.shape) == 3
    # the graph's float type (the weight's): DequantizeLinear outputs its scale's type
    float_type = ir.DataType.from_numpy(w.dtype) if isinstance(w, np.ndarray) else w.dtype
    if spec.precision == "int4" and bits == 8:  # lm_head's default on ONNX Runtime
        q, scale = (a.T for a in blockwise_rows(w, spec.block_size, bits=8))
        inputs = [initializer(graph, f"{name}.int8", q, ir.DataType.INT8),
                  initializer(graph, f"{name}.int8_scale", scale.astype(float_type.numpy()))]
        attributes = [ir.AttrInt64("axis", axis), ir.AttrInt64("block_size", spec.block_size)]
        shape = tuple(q.shape)
    elif spec.precision == "int4":
        q, scale = _experts_int4(w, spec.block_size) if experts else (a.T for a in blockwise_rows(w, spec.block_size, 4))
        inputs = [initializer(graph, f"{name}.int4", q if experts else q.astype(ml_dtypes.int4), ir.DataType.INT4),
                  initializer(graph, f"{name}.int4_scale", scale.astype(float_type.numpy()))]
        attributes = [ir.AttrInt64("axis", axis), ir.AttrInt64("block_size", spec.block_size)]
        shape = tuple(q.shape)
    else:
        q, scale = _experts_fp8(w) if experts else fp8_quantize(np.asarray(w).T)
        inputs = [initializer(graph, f"{name}.fp8", q, ir.DataType.FLOAT8E4M3FN),
                  initializer(graph, f"{name}.fp8_scale",
                              (scale if experts else scale.reshape(())).astype(float_type.numpy()))]
        attributes = [ir.AttrInt64("axis", 0)] if experts else []
        shape = tuple(q.shape)
    node = ir.Node("", "DequantizeLinear", inputs, attributes=attributes, num_outputs=1, name=f"{name}.dequantize")
    node.outputs[0].name = f"{name}.dequantized"
    node.outputs[0].type, node.outputs[0].shape = ir.TensorType(float_type), ir.Shape(shape)
    graph.insert_before(anchor, node)
    return node.outputs[0]


def _fp8_activation(graph: ir.Graph, x: ir.Value, amax: float, name: str, anchor: ir.Node,
                    float_type: ir.DataType) -> ir.Value:
    scale = initializer(graph, f"{name}.input_fp8_scale", fp8_static_scale(amax, float_type))
    zero = initializer(graph, "fp8_zero_point", np.zeros((), ml_dtypes.float8_e4m3fn), ir.DataType.FLOAT8E4M3FN)
    quant = ir.Node("", "QuantizeLinear", [x, scale, zero], num_outputs=1, name=f"{name}.input_quantize")
    dequant = ir.Node("", "DequantizeLinear", [quant.outputs[0], scale], num_outputs=1, name=f"{name}.input_dequantize")
    quant.outputs[0].name, dequant.outputs[0].name = f"{name}.input_fp8", f"{name}.input_qdq"
    dequant.outputs[0].type, dequant.outputs[0].shape = x.type, x.shape
    graph.insert_before(anchor, [quant, dequant])
    return dequant.outputs[0]


def _feed_transposed(graph: ir.Graph, node: ir.Node, index: int, dequantized: ir.Value, layout: str) -> None:
    """Input `index` of `node` (a weight in the layout it reads) ← Transpose(dequantized): the last two axes swapped
    back from the stored layout; named `<weight>.to_<layout>` / `<weight>.dequantized_<layout>`."""
    weight = node.inputs[index]
    perm = [*range(len(weight.shape) - 2), len(weight.shape) - 1, len(weight.shape) - 2]
    transpose = ir.Node("", "Transpose", [dequantized], attributes=[ir.AttrInt64s("perm", perm)], num_outputs=1,
                        name=f"{weight.name}.to_{layout}")
    transpose.outputs[0].name = f"{weight.name}.dequantized_{layout}"
    transpose.outputs[0].type, transpose.outputs[0].shape = weight.type, weight.shape
    graph.insert_before(node, transpose)
    node.replace_input_with(index, transpose.outputs[0])


def _const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value


# ------------------------------------------------------------------------------------------------ passes
def quantize_experts(model: ir.Model, context: PassContext) -> int:
    """Llama4MoE gate_up / down initializers → Transpose(DequantizeLinear(INT4 [E, N, K], axis 2)) | DequantizeLinear(FP8 [E, K, N])"""
    spec: QuantSpec = context.quantization
    graph, count = model.graph, 0
    for node in list(graph):
        if node.domain != ops.DOMAIN or node.op_type != ops.MOE_OP:
            continue
        for index in (2, 3):  # gate_up, down: [E, K, N]
            value = node.inputs[index]
            if not value.is_initializer() or value.const_value is None or not _EXPERTS.search(value.name):
                continue
            w = value.const_value
            if spec.precision == "int4":
                # K-contiguous [E, N, K]: kernels/formats.py's and MatMulNBits' layout (the ORT lowering slices experts)
                _feed_transposed(graph, node, index, _dequantized_weight(graph, value.name, w, spec, 2, node), "kn")
            else:
                node.replace_input_with(index, _dequantized_weight(graph, value.name, w, spec, 1, node))
            count += 1
    return count


def quantize_linears(model: ir.Model, context: PassContext) -> int:
    """MatMul/Gemm(transB)/Transpose→MatMul on a quantizable weight → MatMul(x, DequantizeLinear(W [K, N])) (+ FP8 input Q/DQ);
    the TensorRT plugin's shared expert weights → Transpose(DequantizeLinear(W [K, N]))"""
    spec: QuantSpec = context.quantization
    graph, count = model.graph, 0
    for node in list(graph):
        weight = None
        # w_nk: the weight as [N, K], the tensor itself where the graph reads its transpose (read in slices later)
        if node.op_type == "Transpose" and node.domain == "":
            perm = node.attributes.get_ints("perm", None)
            w = _const_tensor(node.inputs[0]) if spec.bits(node.inputs[0].name) else None  # only what is quantized
            if w is not None and len(w.shape) == 2 and perm in (None, (1, 0), [1, 0]):
                weight, w_nk = node.inputs[0], w
        elif node.op_type == "Gemm" and node.domain == "" and len(node.inputs) == 2:
            w = _const_tensor(node.inputs[1]) if spec.bits(node.inputs[1].name) else None
            plain = (node.attributes.get_int("transA", 0) == 0 and node.attributes.get_float("alpha", 1.0) == 1.0)
            if w is not None and plain:
                weight, w_nk = node.inputs[1], (w if node.attributes.get_int("transB", 0) else w.numpy().T)
        if weight is None:
            continue
        dequantized = _dequantized_weight(graph, weight.name, w_nk, spec, 0, node, spec.bits(weight.name))
        if node.op_type == "Transpose":
            consumers = [use.node for use in node.outputs[0].uses()]
            node.outputs[0].replace_all_uses_with(dequantized)
        else:
            # A 2-D MatMul feeding an Add is turned back into Gemm by ONNX Runtime's MatMulAddFusion, which then keeps
            # the DequantizeLinear at run time instead of fusing MatMulNBits: a leading unit axis prevents that.
            axis0 = initializer(graph, "quantize.axis0", np.asarray([0], np.int64))
            unsqueeze = ir.Node("", "Unsqueeze", [node.inputs[0], axis0], num_outputs=1, name=f"{weight.name}.unsqueeze")
            matmul = ir.Node("", "MatMul", [unsqueeze.outputs[0], dequantized], num_outputs=1, name=f"{weight.name}.matmul")
            squeeze = ir.Node("", "Squeeze", [matmul.outputs[0], axis0], num_outputs=1, name=f"{weight.name}.squeeze")
            graph.insert_before(node, [unsqueeze, matmul, squeeze])
            squeeze.outputs[0].type, squeeze.outputs[0].shape = node.outputs[0].type, node.outputs[0].shape
            node.outputs[0].replace_all_uses_with(squeeze.outputs[0], replace_graph_outputs=True)
            consumers = [matmul]
        graph.remove(node, safe=True)
        if spec.precision == "fp8":
            amax = spec.activation_amax.get(weight.name)
            for consumer in consumers:
                if consumer.op_type == "MatMul" and amax is not None:
                    slot = 0 if consumer.inputs[1] is dequantized else 1
                    qdq = _fp8_activation(graph, consumer.inputs[slot], amax, weight.name, consumer, dequantized.dtype)
                    consumer.replace_input_with(slot, qdq)
        count += 1
    return count + quantize_plugin_shared_expert(graph, spec)


def quantize_plugin_shared_expert(graph: ir.Graph, spec: QuantSpec) -> int:
    """Llama4MoEPlugin(…, shared_gate, shared_up, shared_down [N, K]) → the same with each weight read through
    Transpose(DequantizeLinear(W [K, N])): the quantized weights a Gemm of the other lowerings would get."""
    count = 0
    for node in list(graph):
        if (node.domain, node.op_type) != (trt_plugin_spec.PLUGIN_DOMAIN, trt_plugin_spec.PLUGIN_NAME):
            continue
        for index in range(4, 7):  # trt_plugin_spec.PLUGIN_INPUTS: shared_gate, shared_up, shared_down
            weight = node.inputs[index]
            w = _const_tensor(weight) if spec.bits(weight.name) else None
            if w is None:
                continue
            _feed_transposed(graph, node, index, _dequantized_weight(graph, weight.name, w, spec, 0, node), "nk")
            count += 1
    return count


def quantize_kv_cache(model: ir.Model, context: PassContext) -> int:
    """past_key/value.L input → float8e4m3fn → DequantizeLinear(s);  new_key/value.L output ← QuantizeLinear(s) → float8e4m3fn"""
    spec: QuantSpec = context.quantization
    if not spec.kv_cache_amax:
        return 0
    graph, count = model.graph, 0
    inputs = {value.name: value for value in graph.inputs}
    outputs = {value.name: index for index, value in enumerate(graph.outputs)}
    zero = initializer(graph, "fp8_zero_point", np.zeros((), ml_dtypes.float8_e4m3fn), ir.DataType.FLOAT8E4M3FN)
    first = next(iter(graph))
    # a partition's graph holds only its own layers' caches; the spec has every layer's scales
    own = {layer: amaxes for layer, amaxes in spec.kv_cache_amax.items() if io_spec.past_key(layer) in inputs}
    for layer, amaxes in sorted(own.items()):
        for kind, past, new, amax in (("key", io_spec.past_key(layer), io_spec.new_key(layer), amaxes[0]),
                                      ("value", io_spec.past_value(layer), io_spec.new_value(layer), amaxes[1])):
            cache_in, cache_out = inputs[past], graph.outputs[outputs[new]]
            float_type = cache_in.dtype
            scale = initializer(graph, f"kv_cache.{layer}.{kind}_scale", fp8_static_scale(amax, float_type))
            uses = list(cache_in.uses())
            dequant = ir.Node("", "DequantizeLinear", [cache_in, scale], num_outputs=1, name=f"{past}.dequantize")
            dequant.outputs[0].name = f"{past}.dequantized"
            dequant.outputs[0].type, dequant.outputs[0].shape = ir.TensorType(float_type), cache_in.shape
            graph.insert_before(first, dequant)
            for node, index in uses:
                node.replace_input_with(index, dequant.outputs[0])
            cache_in.type = ir.TensorType(ir.DataType.FLOAT8E4M3FN)
            cache_out.name = f"{new}.unquantized"
            quant = ir.Node("", "QuantizeLinear", [cache_out, scale, zero], num_outputs=1, name=f"{new}.quantize")
            quant.outputs[0].name = new
            quant.outputs[0].type, quant.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT8E4M3FN), cache_out.shape
            graph.append(quant)
            graph.outputs[outputs[new]] = quant.outputs[0]
            count += 1
    return count


def quantization_passes() -> tuple[GraphPass, GraphPass, GraphPass]:
    """(before the MoE lowering, after it, after it): experts while still in the fused node's layout, then the dense
    linears, then the KV cache (a no-op unless QuantSpec.kv_cache_amax is set)."""
    return (GraphPass("quantize_experts", quantize_experts),
            GraphPass("quantize_linears", quantize_linears, produces=(QUANTIZED,)),
            GraphPass("quantize_kv_cache", quantize_kv_cache))
