"""ONNX Runtime lowering of the quantized linears and the token embedding: weights stored in the layout the kernels
read, so ONNX Runtime maps them from the artifact instead of converting them into private copies when a session
starts.

  MatMul(x, DequantizeLinear(W int4|int8 [K, N], scale [K/B, N], axis 0, block_size B))
      → com.microsoft.MatMulNBits(x, B uint8 [N, K/B, B·bits/8], scales [N · K/B], K, N, bits, block_size B)
        (an Unsqueeze(x, 0) before and Squeeze(·, 0) after it, which quantize_linears adds against ORT's MatMulAddFusion,
        are dropped: MatMulNBits takes x as it is)
  Gather(embedding fp32 [V, H], ids)   (QuantSpec.embedding_bits = 4)
      → com.microsoft.GatherBlockQuantized(data uint8 [V, H/2], ids, scales [V, H/B], gather_axis 0, quantize_axis 1,
        block_size B, bits 4)

Packing (checked against numpy on the installed onnxruntime in tests/test_quant.py): 4-bit values are q + 8 with the
even element in the low nibble, 8-bit values q + 128 — the ops' implicit zero points; q = round(w / s), s = amax(block)
/ 7 (4-bit) or / 127 (8-bit), as quantize.int4_blockwise computes them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..model import io_spec
from ._match import const_equals
from .manager import GraphPass, PassContext
from .quantize import EMBEDDING, QUANTIZED, SLICE_BYTES, blockwise_slices, initializer

ORT_DOMAIN = "com.microsoft"
ZERO_POINT = {4: 8, 8: 128}  # the ops' implicit zero points: stored = q + zero point
# MatMulNBits compute: 4 = int8 activations per block (what ONNX Runtime's own DQ→MatMul fusion picks, several times
# faster than fp32 compute at one token); 0 = fp32 compute, exact up to rounding.
ACCURACY_LEVEL = 4


def _stored(q: np.ndarray, bits: int, width: int) -> np.ndarray:
    """q rows (values of `bits` bits, any integer type) + the zero point as uint8, padded to `width` with the zero
    point, two 4-bit values per byte (the even element in the low nibble)."""
    stored = np.full((q.shape[0], width), ZERO_POINT[bits], np.uint8)
    stored[:, :q.shape[1]] = q.astype(np.int16) + ZERO_POINT[bits]
    return stored[:, 0::2] | (stored[:, 1::2] << 4) if bits == 4 else stored


def nbits_weight(q: np.ndarray, scale: np.ndarray, block: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """q [N, K] (int8 values of `bits` bits) and its block scales [N, ceil(K/B)] → MatMulNBits' B [N, ceil(K/B),
    B·bits/8] uint8 (padding past K holds the zero point) and scales [N · ceil(K/B)]. Packed in row slices: an
    lm_head of 202048 × 5120 needs no int16 copy of itself."""
    rows, k = q.shape
    blocks = scale.shape[1]
    packed = np.empty((rows, blocks * block * bits // 8), np.uint8)
    step = max(1, SLICE_BYTES // (2 * blocks * block))
    for start in range(0, rows, step):
        packed[start:start + step] = _stored(q[start:start + step], bits, blocks * block)
    return packed.reshape(rows, blocks, -1), np.ascontiguousarray(scale.reshape(-1), np.float32)


def take_place(new: ir.Value, old: ir.Value) -> None:
    """`new` gets `old`'s name (it may be a graph output, e.g. logits), type and shape."""
    name = old.name
    old.name = f"{name}.replaced"
    new.name, new.type, new.shape = name, old.type, old.shape


def _quantized_weight(value: ir.Value) -> tuple[ir.Node, int] | None:
    """(its DequantizeLinear, bits) when `value` is DequantizeLinear(int4|int8 const [K, N], const scale, axis 0)."""
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain != "" or len(node.inputs) != 2:
        return None
    data, scale = node.inputs
    bits = {ir.DataType.INT4: 4, ir.DataType.INT8: 8}.get(data.dtype)
    if bits is None or data.const_value is None or scale.const_value is None or len(data.shape) != 2 \
            or node.attributes.get_int("axis", 1) != 0:
        return None
    return node, bits


def lower_quantized_linears(model: ir.Model, context: PassContext) -> int:
    """MatMul(x, DequantizeLinear(W int4|int8 [K, N], axis 0)) → MatMulNBits(x, W in its kernel layout)"""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "" or not node.inputs[1] or _quantized_weight(node.inputs[1]) is None:
            continue
        dequantize, bits = _quantized_weight(node.inputs[1])
        data, scale = dequantize.inputs
        block = dequantize.attributes.get_int("block_size")
        k, n = data.shape
        q = data.const_value.numpy().T  # [N, K]
        packed, scales = nbits_weight(q, scale.const_value.numpy().T, block, bits)
        base = data.name.rsplit(".", 1)[0]
        x, output = node.inputs[0], node.outputs[0]
        unsqueeze, squeeze = x.producer(), next(iter(output.uses()), (None, 0))[0] if len(output.uses()) == 1 else None
        wrapped = (unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" and squeeze is not None
                   and squeeze.op_type == "Squeeze" and len(x.uses()) == 1
                   and len(squeeze.inputs) == 2 and const_equals(unsqueeze.inputs[1], [0])
                   and const_equals(squeeze.inputs[1], [0]))  # a Squeeze without axes drops every unit axis
        inputs = [unsqueeze.inputs[0] if wrapped else x, initializer(graph, f"{base}.nbits", packed),
                  initializer(graph, f"{base}.nbits_scale", scales)]
        matmul = ir.Node(ORT_DOMAIN, "MatMulNBits", inputs, num_outputs=1, name=f"{base}.matmul_nbits",
                         attributes=[ir.AttrInt64("K", int(k)), ir.AttrInt64("N", int(n)), ir.AttrInt64("bits", bits),
                                     ir.AttrInt64("block_size", block), ir.AttrInt64("accuracy_level", ACCURACY_LEVEL)])
        replaced = squeeze.outputs[0] if wrapped else output
        take_place(matmul.outputs[0], replaced)
        graph.insert_before(node, matmul)
        replaced.replace_all_uses_with(matmul.outputs[0], replace_graph_outputs=True)
        for dead in ([squeeze, node, unsqueeze] if wrapped else [node]):
            graph.remove(dead, safe=True)
        if not dequantize.outputs[0].uses():  # free the int8/int4 copy now, not at the next dead-code pass
            graph.remove(dequantize, safe=True)
            for value in (data, scale):
                if not value.uses():
                    graph.initializers.pop(value.name)
        count += 1
    if count:
        model.opset_imports.setdefault(ORT_DOMAIN, 1)
    return count


def quantize_embedding(model: ir.Model, context: PassContext) -> int:
    """Gather(embedding fp32 [V, H], ids) → GatherBlockQuantized(4-bit [V, H/2], ids) (QuantSpec.embedding_bits)

    The embedding is the table the input ids index, whatever its name: a tied checkpoint's is traced as lm_head.weight
    (one tensor, one name), which quantize_linears has already given lm_head's 8-bit copy."""
    spec = context.quantization
    if spec is None or spec.embedding_bits is None:
        return 0
    graph, count = model.graph, 0
    for node in list(graph):
        table = node.inputs[0] if node.op_type == "Gather" and node.domain == "" and len(node.inputs) == 2 else None
        if table is None or node.inputs[1].name != io_spec.INPUT_IDS or node.inputs[1] not in graph.inputs \
                or table.const_value is None or node.attributes.get_int("axis", 0) != 0:
            continue
        vocab, hidden = tuple(table.shape)
        packed = np.empty((vocab, hidden // 2), np.uint8)
        scale = np.empty((vocab, -(-hidden // spec.block_size)), np.float32)
        for rows, q, row_scales in blockwise_slices(table.const_value, spec.block_size, bits=4):  # no whole int8 copy
            packed[rows], scale[rows] = _stored(q, 4, hidden), row_scales
        inputs = [initializer(graph, f"{EMBEDDING}.int4_packed", packed), node.inputs[1],
                  initializer(graph, f"{EMBEDDING}.int4_scale", scale)]
        gather = ir.Node(ORT_DOMAIN, "GatherBlockQuantized", inputs, num_outputs=1, name=f"{EMBEDDING}.gather_quantized",
                         attributes=[ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1),
                                     ir.AttrInt64("block_size", spec.block_size), ir.AttrInt64("bits", 4)])
        take_place(gather.outputs[0], node.outputs[0])
        graph.insert_before(node, gather)
        node.outputs[0].replace_all_uses_with(gather.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    if count:
        model.opset_imports.setdefault(ORT_DOMAIN, 1)
    return count


def ort_linear_passes() -> tuple[GraphPass, GraphPass]:
    return (GraphPass("lower_quantized_linears", lower_quantized_linears, requires=(QUANTIZED,)),
            GraphPass("quantize_embedding", quantize_embedding))
