"""Projections of one activation become one matrix product (onnxruntime).

  MatMulNBits(x, B_i, scales_i; K, N_i, bits, block_size, accuracy_level), i = 1..n, the same x and attributes but N
      → Split(MatMulNBits(x, B_1 ‖ … ‖ B_n, scales_1 ‖ … ‖ scales_n; N = ΣN_i), [N_1, …, N_n], axis −1)
  MatMul(x, W_i initializer [K, N_i]), i = 1..n, the same x and dtype
      → Split(MatMul(x, W_1 ‖ … ‖ W_n  [K, ΣN_i]), [N_1, …, N_n], axis −1)

Why: attention's q, k and v projections read the same normed hidden state, as do the MLP's and the shared expert's gate
and up. Each kernel call has a fixed cost beside its weight reads (k_proj's 4-bit 768 × 256 weight is 100 KB) and
wakes the thread pool; one call over the concatenated weights pays it once. On rand200m's shapes at one token
(benchmarks/sibling_projections.py) 4-bit q, k, v run 1.7× faster as one call, gate and up 1.1–1.2×, the shared
expert's 1.35×; at 128 rows q, k, v gain 1.1× and the two 2,048-wide gate and up lose 4 %, which leaves prefill
unchanged end to end (BENCHMARKS.md).

Exact: each output column is the same dot product over the same K, whichever product computes it; MatMulNBits'
B [N, K/block, blob] and scales [N · K/block] are row-major in N, so concatenating along N concatenates the columns.
The experts' gate and up are one matrix already (lower.py); the main graph is the only one searched.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from ._match import is_weight
from .lower_linears import ORT_DOMAIN, take_place
from .manager import GraphPass, PassContext
from .quantize import initializer

NBITS_ATTRIBUTES = {"K", "N", "bits", "block_size", "accuracy_level"}


def _sibling_key(node: ir.Node) -> tuple | None:
    """What a node must share with another to be fused with it (None: not a projection this rule fuses)."""
    x = node.inputs[0] if node.inputs else None
    if x is None:
        return None
    if node.op_type == "MatMulNBits" and node.domain == ORT_DOMAIN and len(node.inputs) == 3 \
            and is_weight(node.inputs[1], 3) and is_weight(node.inputs[2], 1) and set(node.attributes) <= NBITS_ATTRIBUTES:
        return (id(x), "MatMulNBits", *(node.attributes.get_int(a, 0) for a in sorted(NBITS_ATTRIBUTES - {"N"})))
    if node.op_type == "MatMul" and node.domain == "" and is_weight(node.inputs[1], 2):
        return id(x), "MatMul", node.inputs[1].shape[0], node.inputs[1].dtype
    return None


def _joined_name(names: list[str]) -> str:
    """"a.q_proj.w", "a.k_proj.w" → "a.q_proj+k_proj.w": the shared prefix and suffix (whole dotted parts) kept."""
    parts = [name.split(".") for name in names]
    prefix = 0
    while all(len(p) > prefix + 1 and p[prefix] == parts[0][prefix] for p in parts):
        prefix += 1
    suffix = 0
    while all(len(p) > prefix + suffix + 1 and p[-1 - suffix] == parts[0][-1 - suffix] for p in parts):
        suffix += 1
    middles = ["_".join(p[prefix:len(p) - suffix]) for p in parts]
    return ".".join([*parts[0][:prefix], "+".join(middles), *parts[0][len(parts[0]) - suffix:]])


def _concatenated(graph: ir.Graph, weights: list[ir.Value], axis: int) -> ir.Value:
    """One initializer holding `weights` concatenated along `axis`; built in its own frame so that no local keeps the
    array alive once the graph has spilled it (writer.load_lazily)."""
    return initializer(graph, _joined_name([w.name for w in weights]),
                       np.concatenate([w.const_value.numpy() for w in weights], axis=axis))


def _fuse(graph: ir.Graph, members: list[ir.Node]) -> None:
    first = members[0]
    nbits = first.op_type == "MatMulNBits"
    widths = [m.attributes.get_int("N") if nbits else m.inputs[1].shape[1] for m in members]
    if nbits:
        inputs = [_concatenated(graph, [m.inputs[1] for m in members], 0),
                  _concatenated(graph, [m.inputs[2] for m in members], 0)]
        attributes = [ir.AttrInt64(a, sum(widths) if a == "N" else first.attributes.get_int(a))
                      for a in sorted(first.attributes)]
    else:
        inputs, attributes = [_concatenated(graph, [m.inputs[1] for m in members], 1)], []
    name = _joined_name([m.inputs[1].name for m in members])
    product = ir.Node(first.domain, first.op_type, [first.inputs[0], *inputs], attributes=attributes, num_outputs=1,
                      name=name)
    product.outputs[0].name = f"{name}.out"
    product.outputs[0].type = first.outputs[0].type
    if first.outputs[0].shape is not None:
        product.outputs[0].shape = ir.Shape([*first.outputs[0].shape[:-1], sum(widths)])
    split = ir.Node("", "Split", [product.outputs[0], initializer(graph, f"{name}.widths", np.asarray(widths, np.int64))],
                    attributes=[ir.AttrInt64("axis", -1)], num_outputs=len(members), name=f"{name}.split")
    graph.insert_before(first, [product, split])
    old_weights = [v for m in members for v in m.inputs[1:]]
    for member, part in zip(members, split.outputs):
        take_place(part, member.outputs[0])
        member.outputs[0].replace_all_uses_with(part, replace_graph_outputs=True)
        graph.remove(member, safe=True)
    for weight in old_weights:
        if not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name)


def fuse_sibling_projections(model: ir.Model, context: PassContext) -> int:
    """MatMulNBits / MatMul of one input with constant weights → one product over the concatenated weights, then Split"""
    graph = model.graph
    siblings: dict[tuple, list[ir.Node]] = defaultdict(list)
    for node in graph:
        key = _sibling_key(node)
        if key is not None:
            siblings[key].append(node)
    fused = [members for members in siblings.values() if len(members) > 1]
    for members in fused:
        _fuse(graph, members)
    return sum(len(members) for members in fused)


def sibling_projections_pass() -> GraphPass:
    return GraphPass("fuse_sibling_projections", fuse_sibling_projections)
