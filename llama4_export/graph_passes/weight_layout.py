"""Weights stored in the layout their consumer reads.

  Transpose(W initializer [N, K], perm [1, 0]) → W.T initializer [K, N]  (nn.Linear's weight feeding MatMul)

The exporter traces nn.Linear as MatMul(x, Transpose(W)); left in place, ONNX Runtime folds every such Transpose into
a private transposed copy of the weight when a session starts (the mapped original and the copy are then both
resident while the session loads), and TensorRT does the same at build time. Stored transposed, MatMul reads the
artifact's bytes directly. Runs after the quantization passes, which read the untransposed weights by name.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .manager import GraphPass, PassContext
from .quantize import SLICE_BYTES, row_slices

TRANSPOSED_SUFFIX = ".T"


def _transposed(tensor: ir.TensorProtocol) -> np.ndarray:
    """tensor.T as a new C-order array, the original read in row slices: one copy of the weight in memory, not two
    (Scout's fp32 lm_head is 4.1 GB)."""
    if tensor.dtype.bitwidth < 8:
        return np.ascontiguousarray(tensor.numpy().T)
    n, k = tuple(tensor.shape.numpy())
    out = np.empty((k, n), tensor.dtype.numpy())
    start = 0
    for rows in row_slices(tensor, max(1, SLICE_BYTES // (out.itemsize * k))):
        out[:, start:start + len(rows)] = rows.T
        start += len(rows)
    return out


def store_weights_transposed(model: ir.Model, context: PassContext) -> int:
    """Transpose(W initializer, perm [1, 0]) → initializer W.T (the transposed data)"""
    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "" or not node.inputs or node.inputs[0] is None:
            continue
        weight = node.inputs[0]
        if not weight.is_initializer() or weight.const_value is None or len(weight.shape) != 2 \
                or list(node.attributes.get_ints("perm", [1, 0])) != [1, 0]:
            continue
        name = weight.name + TRANSPOSED_SUFFIX
        if name not in graph.initializers:
            data = _transposed(weight.const_value)
            value = ir.Value(name=name, type=weight.type, shape=ir.Shape(data.shape),
                             const_value=ir.Tensor(data, dtype=weight.dtype, name=name))
            graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(graph.initializers[name], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        count += 1
    return count


def weight_layout_pass() -> GraphPass:
    return GraphPass("store_weights_transposed", store_weights_transposed)
