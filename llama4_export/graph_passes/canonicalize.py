"""Canonicalization: constant folding, no-op removal, common-subexpression elimination, dead-code elimination.

Weights are never folded: a node that reads a model parameter (an initializer of at least PARAMETER_MIN_ELEMENTS
elements) stays, so every weight keeps its checkpoint name and layout — decode and prefill share one external-data
file by those tensors, and the quantization passes find weights by name.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
from onnxscript.rewriter import pattern

from .manager import GraphPass, PassContext

PARAMETER_MIN_ELEMENTS = 17  # scalars and shape vectors are smaller; every weight of a real model is far larger


def _reads_parameter(node: ir.Node) -> bool:
    return any(
        v is not None and v.is_initializer() and v.const_value is not None and v.const_value.size >= PARAMETER_MIN_ELEMENTS
        for v in node.inputs
    )


def fold_constants(model: ir.Model, context: PassContext) -> int:
    """op(constants…) → its value, for nodes that read no model parameter."""
    before = _node_count(model)
    onnxscript.optimizer.fold_constants(model, should_fold=lambda node: False if _reads_parameter(node) else None)
    common_passes.RemoveUnusedNodesPass()(model)
    return before - _node_count(model)


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


# --- no-op removal ------------------------------------------------------------------------------------------
def _identity(op, x, **_):
    return op.Identity(x)  # removed with every other Identity by IdentityEliminationPass


def _cast_pattern(op, x, to):
    return op.Cast(x, to=to)


def _cast_is_noop(context, x, to, **_) -> bool:
    return x.dtype is not None and to.as_int() == x.dtype.value


def _transpose_pattern(op, x, perm):
    return op.Transpose(x, perm=perm)


def _transpose_is_noop(context, x, perm, **_) -> bool:
    return list(perm.as_ints()) == list(range(len(perm.as_ints())))


def _reshape_pattern(op, x, shape):
    return op.Reshape(x, shape, _allow_other_attributes=True)


def _reshape_is_noop(context, x, shape, **_) -> bool:
    """Provably the identity: same rank, every entry but at most one -1 equals x's static size there, no 0 entries."""
    target = shape.const_value.numpy().tolist() if shape.const_value is not None else None
    if target is None or x.shape is None or len(target) != x.shape.rank() or 0 in target or target.count(-1) > 1:
        return False
    return all(t == -1 or (isinstance(d, int) and d == t) for t, d in zip(target, x.shape.dims))


def _transpose_pair_pattern(op, x, inner, outer):
    return op.Transpose(op.Transpose(x, perm=inner), perm=outer)


def _transpose_pair_is_noop(context, x, inner, outer, **_) -> bool:
    p, q = inner.as_ints(), outer.as_ints()
    return len(p) == len(q) and [p[i] for i in q] == list(range(len(p)))


NO_OP_RULES = [  # name: pattern → replacement
    pattern.RewriteRule(_cast_pattern, _identity, _cast_is_noop, name="Cast(x, to=type(x)) → x"),
    pattern.RewriteRule(_transpose_pattern, _identity, _transpose_is_noop, name="Transpose(x, perm=[0..n-1]) → x"),
    pattern.RewriteRule(_transpose_pair_pattern, _identity, _transpose_pair_is_noop, name="Transpose(Transpose(x, p), p⁻¹) → x"),
    pattern.RewriteRule(_reshape_pattern, _identity, _reshape_is_noop, name="Reshape(x, shape(x)) → x"),
]


def remove_no_ops(model: ir.Model, context: PassContext) -> int:
    """Cast to the same type, identity Transpose / Reshape, inverse Transpose pairs, Identity → their input."""
    count = pattern.RewriteRuleSet(NO_OP_RULES).apply_to_model(model)
    return count + _eliminate_identities(model)


def _eliminate_identities(model: ir.Model) -> int:
    """y = Identity(x) → x, except where y is an output of its graph and x is not a value that graph computes: a
    graph input, an initializer, another output, or an outer graph's value (an If branch must not output one, which
    onnx_ir's IdentityEliminationPass made of the branches our MoE lowering writes)."""
    removed = 0
    for graph in (model.graph, *model.functions.values()):
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if node.op_type != "Identity" or node.domain != "" or len(node.inputs) != 1 or node.inputs[0] is None:
                continue
            x, y = node.inputs[0], node.outputs[0]
            output = y.is_graph_output()
            if output and (x.is_graph_input() or x.is_initializer() or x.is_graph_output() or x.graph is not node.graph):
                continue
            x.shape = x.shape if x.shape is not None else y.shape
            x.type = x.type if x.type is not None else y.type
            y.replace_all_uses_with(x, replace_graph_outputs=True)
            if output:
                x.name = y.name
            node.graph.remove(node, safe=True)
            removed += 1
    return removed


def eliminate_common_subexpressions(model: ir.Model, context: PassContext) -> int:
    """op(a, b) computed twice → computed once (same op, attributes and inputs)."""
    before = _node_count(model)
    common_passes.CommonSubexpressionEliminationPass()(model)
    return before - _node_count(model)


def eliminate_dead_code(model: ir.Model, context: PassContext) -> int:
    """Nodes and initializers no graph output depends on → removed."""
    before = _node_count(model) + len(model.graph.initializers)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    return before - _node_count(model) - len(model.graph.initializers)


CANONICAL = "canonical"


def canonicalization_passes() -> list[GraphPass]:
    return [
        GraphPass("fold_constants", fold_constants),
        GraphPass("remove_no_ops", remove_no_ops),
        GraphPass("cse", eliminate_common_subexpressions),
        GraphPass("dce", eliminate_dead_code, produces=(CANONICAL,)),
    ]
