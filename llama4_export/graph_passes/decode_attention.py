"""A one-token attention reads each KV head's cache once (onnxruntime, in-place graphs).

  GroupQueryAttention(q [B, T, H·D], k, v, past_key, past_value, seqlens_k, total) over a global-layer cache, or a
  chunked-layer cache of at least GROUPED_CHUNK_MIN slots
  → If(B·T = 1,
       then: GroupQueryAttention(num_heads = kv_heads) on the G = H / kv_heads query heads of each KV head as G tokens
             [1, G, kv_heads·D], with k and v repeated G times, seqlens_k + G − 1, total + G − 1 and an
             attention_bias of −∞ on every slot after the token's own,
       else: the original node)

Why: ONNX Runtime's CPU GroupQueryAttention runs one GEMV per *query* head, so a decode step reads each KV head's
cache G times — at 16,384 tokens the global layers' fp32 K/V are 101 MB, read 3× on rand200m (BENCHMARKS.md, "Why
decode falls with depth"). As G tokens of an attention with as many query heads as KV heads, each KV head's cache is
one G-row GEMM's operand, read once.

Exact: every query head attends to the same slots with the same scale. The G tokens append G copies of the new K/V at
slots L..L+G−1; token g's causal window reaches L+g, and the bias hides L+1.. from all of them, so each sees the L
past slots and its own K/V once. The G − 1 copies after slot L are scratch that the next step overwrites: the runtime
keeps that room behind every in-place buffer (io_spec.decode_scratch_slots). ONNX Runtime takes several new tokens
after past ones only in a batch of one row, hence the If: batches and prefill keep the original node. Short chunks
keep the node too: below a few hundred slots the G reads come from cache and the rewrite's extra work (≈ 6–10 µs a
step) costs more than it saves (benchmarks/gqa_depth.py --grouped).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..model import io_spec
from .lower import ORT_DOMAIN, NodeBuilder
from .manager import GraphPass, PassContext

# The shortest attention chunk whose layers are rewritten. The one-row form wins from ≈ 250 past slots (rand200m's
# shapes, 2 threads, cache-warm; benchmarks/gqa_depth.py --grouped), but its cost also grows with the buffer's length,
# and a chunked layer's buffer stays a whole chunk long while it attends to half a chunk on average.
GROUPED_CHUNK_MIN = 1024
# What the one-token branch's node is given; any other attribute (smooth_softmax, causal, qk_output, …) would change
# what it computes, unless at one of these values, which mean "off".
CARRIED_ATTRIBUTES = {"num_heads", "kv_num_heads", "scale"}
NEUTRAL_ATTRIBUTES = {"do_rotary": 0, "local_window_size": -1, "softcap": 0.0}


def _rewritable(node: ir.Node, context: PassContext) -> bool:
    """A plain GroupQueryAttention (no attribute set but the head counts and scale, no extra inputs) of G > 1 over a
    cache the graph takes as an input: a global layer's, or a chunked layer's when the chunk is long."""
    if node.op_type != "GroupQueryAttention" or node.domain != ORT_DOMAIN or len(node.inputs) != 7:
        return False
    if not all(name in CARRIED_ATTRIBUTES or NEUTRAL_ATTRIBUTES.get(name) == attribute.value
               for name, attribute in node.attributes.items()):
        return False
    heads, kv_heads = node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")
    past_key = node.inputs[3]
    if not (heads > kv_heads and heads % kv_heads == 0 and past_key is not None and past_key.is_graph_input()
            and past_key.shape is not None and len(past_key.shape) == 4 and isinstance(past_key.shape[3], int)):
        return False
    slots = str(past_key.shape[2])
    long_chunk = (context.attention_chunk or 0) >= GROUPED_CHUNK_MIN
    return slots == io_spec.SLOT_DIMS["global"] or (slots == io_spec.SLOT_DIMS["chunked"] and long_chunk)


def _one_token_branch(graph: ir.Graph, node: ir.Node, prefix: str) -> ir.Graph:
    q, k, v, past_key, past_value, seqlens, total = node.inputs
    heads, kv_heads = node.attributes.get_int("num_heads"), node.attributes.get_int("kv_num_heads")
    groups, head_dim = heads // kv_heads, int(past_key.shape[3])
    op = NodeBuilder(f"{prefix}.one_token")

    def shape(name: str, dims: list[int]) -> ir.Value:
        return op.constant(graph, name, np.asarray(dims, np.int64))

    # query head h = kv·G + g (GroupQueryAttention's grouping) → token g, head kv
    tokens = op("q_tokens", "Reshape", [op("q_grouped", "Transpose", [
        op("q_heads", "Reshape", [q, shape("q_heads_shape", [1, kv_heads, groups, head_dim])])], perm=[0, 2, 1, 3]),
        shape("q_tokens_shape", [1, groups, kv_heads * head_dim])])
    repeat = shape("repeat", [1, groups, 1])
    extra = op.constant(graph, "extra_slots", np.asarray(groups - 1, np.int32))
    last = op("seqlens", "Add", [seqlens, extra])
    visible_end = op("total", "Add", [total, extra])
    # −∞ on the slots after each row's own token (the scratch copies); causality hides the rest
    slots = op("slots", "Range", [op.constant(graph, "zero", np.asarray(0, np.int64)),
                                  op("total_i64", "Cast", [visible_end], to=ir.DataType.INT64),
                                  op.constant(graph, "one", np.asarray(1, np.int64))])
    own_slot = op("own_slot", "Unsqueeze", [op("seqlens_i64", "Cast", [seqlens], to=ir.DataType.INT64),
                                            shape("bias_axes", [1, 2, 3])])
    dtype = q.dtype.numpy()
    bias = op("bias", "Expand", [
        op("bias_row", "Where", [op("after_own", "Greater", [slots, own_slot]),
                                 op.constant(graph, "hidden", np.asarray(-np.inf, dtype)),
                                 op.constant(graph, "shown", np.asarray(0, dtype))]),
        shape("bias_shape", [1, 1, groups, 1])])
    out, present_key, present_value = op.outputs("attention", "GroupQueryAttention", [
        tokens, op("k_tokens", "Expand", [k, repeat]), op("v_tokens", "Expand", [v, repeat]), past_key, past_value, last,
        visible_end, None, None, None, bias], 3, domain=ORT_DOMAIN, num_heads=kv_heads, kv_num_heads=kv_heads,
        scale=node.attributes.get_float("scale", head_dim ** -0.5))
    out = op("out", "Reshape", [op("out_heads", "Transpose", [
        op("out_tokens", "Reshape", [out, shape("out_tokens_shape", [1, groups, kv_heads, head_dim])])],
        perm=[0, 2, 1, 3]), shape("out_shape", [1, 1, heads * head_dim])])
    return ir.Graph([], [out, present_key, present_value], nodes=op.tape.nodes, name=f"{prefix}.one_token")


def group_decode_queries(model: ir.Model, context: PassContext) -> int:
    """GroupQueryAttention over a global (or long-chunk) cache → If(one row, one token: the query heads of each KV
    head as tokens of one attention per KV head, the cache read once; else: the node)"""
    if context.target != "onnxruntime":
        return 0
    graph, count = model.graph, 0
    for node in [n for n in graph if _rewritable(n, context)]:
        prefix = node.name or f"group_decode_queries.{count}"
        op = NodeBuilder(prefix)
        q_width = node.attributes.get_int("num_heads") * int(node.inputs[3].shape[3])
        one_token = op("one_token", "Equal", [op("q_size", "Size", [node.inputs[0]]),
                                              op.constant(graph, "one_token_size", np.asarray(q_width, np.int64))])
        then_branch = _one_token_branch(graph, node, prefix)
        else_op = NodeBuilder(f"{prefix}.any")
        kept = else_op.outputs("attention", node.op_type, list(node.inputs), 3, domain=ORT_DOMAIN,
                               **{name: attribute.value for name, attribute in node.attributes.items()})
        else_branch = ir.Graph([], kept, nodes=else_op.tape.nodes, name=f"{prefix}.any")
        results = op.outputs("attention", "If", [one_token], 3, then_branch=then_branch, else_branch=else_branch)
        graph.insert_before(node, op.tape.nodes)
        names = [value.name for value in node.outputs]
        for old, new in zip(node.outputs, results):
            new.type, new.shape = old.type, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        for name, new in zip(names, results):  # the present_key/value graph outputs keep their contract names
            new.name = name
        count += 1
    return count


def decode_attention_pass() -> GraphPass:
    return GraphPass("group_decode_queries", group_decode_queries)
