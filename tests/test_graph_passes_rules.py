"""Each graph-pass rule on small graphs: op counts change as the rule says, outputs do not (ONNX Runtime vs numpy).

The MoE rules run on the real traced forms: one `MoE` module of scout-tiny exported with torch.onnx (dynamo) in its
gather (decode) and dense (prefill) implementations. Every lowering of the fused node is checked against the numpy
reference (moe_reference.llama4_moe), and against the unfused graph.
"""

from __future__ import annotations

import collections
import gc
import logging
import math
import warnings
import weakref

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from llama4_export.graph_passes import (canonicalize, decode_attention, fuse_moe, fuse_transformer, fuse_vision, lower,
                                        manager, ops, sibling_projections, trt_plugin_spec, weight_layout)
from llama4_export.graph_passes.lower_linears import nbits_weight, quantize_embedding
from llama4_export.graph_passes.errors import GraphPassError
from llama4_export.graph_passes.manager import GraphPass, PassContext, op_histogram, run_passes
from llama4_export.graph_passes.moe_reference import llama4_moe
from llama4_export.graph_passes.ort_run import run_onnxruntime
from llama4_export.graph_passes.pipeline import CONSTANT_CSE_LIMIT, tidy
from llama4_export.graph_passes.quantize import EMBEDDING, QuantSpec, quantize_kv_cache
from llama4_export.graph_passes.verify import executable_copy, reference_ops_available
from llama4_export.model import get_preset, io_spec
from llama4_export.model.modeling import MoE

from .conftest import random_moe_weights

CONTEXT = PassContext("onnxruntime", "gather")


def run(model: ir.Model, feeds: dict, custom_op_library: str | None = None) -> list[np.ndarray]:
    """ONNX Runtime CPU on an in-memory model (weights inline)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if custom_op_library:
        options.register_custom_ops_library(custom_op_library)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def parse(text: str, **initializers: np.ndarray) -> ir.Model:
    """A model from ONNX text, with shapes inferred (the exporter's graphs carry them too)."""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in initializers.items())
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, data_prop=True))


# ------------------------------------------------------------------------------------------ canonicalization
def test_fold_constants_folds_constant_arithmetic_but_never_a_weight():
    weight = np.arange(32, dtype=np.float32).reshape(4, 8)
    model = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 8] x) => (float[2, 4] y) {
            two = Constant <value = float[1] {2.0}> ()
            three = Constant <value = float[1] {3.0}> ()
            five = Add(two, three)
            wt = Transpose <perm = [1, 0]> (w)
            xw = MatMul(x, wt)
            y = Mul(xw, five)
        }""",
        w=weight,
    )
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    assert canonicalize.fold_constants(model, CONTEXT) > 0
    ops_after = op_histogram(model)
    assert ops_after["Add"] == 0 and ops_after["Transpose"] == 1  # the weight keeps its name and layout
    assert "w" in model.graph.initializers
    np.testing.assert_allclose(run(model, {"x": x})[0], (x @ weight.T) * 5.0, rtol=1e-6)


def test_weights_are_stored_in_the_layout_matmul_reads():
    """Transpose(W) → W.T for a weight read by two MatMuls (stored once); an activation's Transpose stays."""
    weight = np.arange(32, dtype=np.float32).reshape(4, 8)
    model = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 8] x) => (float[2, 4] y, float[8, 2] z) {
            wt = Transpose <perm = [1, 0]> (w)
            a = MatMul(x, wt)
            wt2 = Transpose <perm = [1, 0]> (w)
            b = MatMul(x, wt2)
            y = Add(a, b)
            z = Transpose <perm = [1, 0]> (x)
        }""",
        w=weight,
    )
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    before = op_histogram(model)
    assert weight_layout.store_weights_transposed(model, CONTEXT) == 2
    after = op_histogram(model)
    assert before["Transpose"] == 3 and after["Transpose"] == 1 and after["MatMul"] == 2
    np.testing.assert_array_equal(model.graph.initializers["w.T"].const_value.numpy(), weight.T)
    y, z = run(model, {"x": x})
    np.testing.assert_allclose(y, 2 * x @ weight.T, rtol=1e-6)
    np.testing.assert_array_equal(z, x.T)


def test_a_tensor_a_pass_drops_is_freed_when_the_pass_ends(monkeypatch):
    """A removed node and its output reference each other, so the tensor it holds is freed only by the cyclic collector,
    whose full collections almost never run during an export (automatic collection is off here to make that certain):
    run_passes collects after every pass of a large graph, or dropped weights pile up (a 6.8 GB peak instead of 2.8 at
    Scout shapes); the threshold is lowered to this tiny graph."""
    monkeypatch.setattr(manager, "COLLECT_FROM_BYTES", 0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 8]))
    array = np.ones((8, 8), np.float32)
    weight = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", ir.tensor(array))], num_outputs=1, name="w")
    matmul = ir.Node("", "MatMul", [x, weight.outputs[0]], num_outputs=1, name="mm")
    model = ir.Model(ir.Graph([x], matmul.outputs, nodes=[weight, matmul], opset_imports={"": 21}), ir_version=10)
    freed = weakref.ref(array)
    del array, weight, matmul

    def drop_matmul(model: ir.Model, context: PassContext) -> int:
        """MatMul(x, Constant) → x"""
        constant, product = list(model.graph)
        product.outputs[0].replace_all_uses_with(product.inputs[0], replace_graph_outputs=True)
        model.graph.remove([product, constant], safe=True)
        return 1

    gc.disable()
    try:
        run_passes(model, [GraphPass("drop_matmul", drop_matmul)], CONTEXT)
    finally:
        gc.enable()
    assert freed() is None


def test_remove_no_ops_drops_exactly_the_identities():
    model = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3] x) => (float[3, 2] y, int64[2, 3] z) {
            a = Cast <to = 1> (x)
            b = Transpose <perm = [0, 1]> (a)
            c = Reshape(b, shape23)
            d = Transpose <perm = [1, 0]> (c)
            e = Transpose <perm = [1, 0]> (d)
            f = Identity(e)
            y = Transpose <perm = [1, 0]> (f)
            z = Cast <to = 7> (f)
        }""",
        shape23=np.array([2, -1], dtype=np.int64),
    )
    before = op_histogram(model)
    rewrites = canonicalize.remove_no_ops(model, CONTEXT)
    after = op_histogram(model)
    assert rewrites >= 5
    # Left: the real transpose to y and the real float→int64 cast to z.
    assert dict(after) == {"Transpose": 1, "Cast": 1}, (before, after)
    x = np.array([[1.5, -2.0, 3.25], [4.0, 5.5, -6.75]], np.float32)
    y, z = run(model, {"x": x})
    np.testing.assert_array_equal(y, x.T)
    np.testing.assert_array_equal(z, x.astype(np.int64))


def test_remove_no_ops_keeps_a_branch_identity_that_outputs_an_outer_value():
    """An If branch outputting Identity(outer value), as our MoE lowering writes: onnx_ir's IdentityEliminationPass
    removed it and renamed the outer value, which ONNX Runtime refuses ("Subgraph output ... is an outer scope value")
    — the second optimize() of an optimized graph. The identity inside the branch's own computation goes."""
    model = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2] x, bool c) => (float[2] y) {
            s = Add(x, x)
            y = If (c) <
                then_branch = t () => (float[2] t_out) { u = Mul(s, s)  w = Identity(u)  t_out = Neg(w) },
                else_branch = e () => (float[2] e_out) { e_out = Identity(s) }
            >
        }""")
    before = op_histogram(model)
    assert canonicalize.remove_no_ops(model, CONTEXT) == 1
    assert before["Identity"] - op_histogram(model)["Identity"] == 1
    x = np.array([1.5, -2.0], np.float32)
    for c in (True, False):
        (y,) = run(model, {"x": x, "c": np.array(c)})
        np.testing.assert_array_equal(y, -(2 * x) ** 2 if c else 2 * x)


def test_reshape_that_changes_the_shape_stays():
    model = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3] x) => (float[3, 2] y) { y = Reshape(x, shape32) }""",
        shape32=np.array([3, -1], dtype=np.int64),
    )
    assert canonicalize.remove_no_ops(model, CONTEXT) == 0 and op_histogram(model)["Reshape"] == 1


def test_cse_and_dce():
    model = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3] x) => (float[2, 3] y) {
            a = Mul(x, x)
            b = Mul(x, x)
            y = Add(a, b)
            dead = Sigmoid(x)
            unused_too = Add(w, w)
        }""",
        w=np.ones(3, np.float32),
    )
    assert canonicalize.eliminate_common_subexpressions(model, CONTEXT) == 1
    assert canonicalize.eliminate_dead_code(model, CONTEXT) == 3  # Sigmoid, the Add of w, the initializer w
    assert dict(op_histogram(model)) == {"Mul": 1, "Add": 1} and not model.graph.initializers
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": x})[0], 2 * x * x, rtol=1e-6)


def test_pass_manager_refuses_a_pass_before_the_passes_it_needs():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 3] x) => (float[2, 3] y) { y = Relu(x) }""")
    with pytest.raises(GraphPassError, match="'fuse_moe_gather' needs canonical"):
        run_passes(model, fuse_moe.moe_fusion_passes(), CONTEXT)
    report = run_passes(model, [*canonicalize.canonicalization_passes(), *fuse_moe.moe_fusion_passes()], CONTEXT)
    assert [r.name for r in report.records][-2:] == ["fuse_moe_gather", "fuse_moe_dense"]
    assert report.records[-1].doc.startswith("router Gemm")


# ---------------------------------------------------------------------------------------------- MoE fusion
def _quiet_export(module, args):
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ir.from_proto(ir.to_proto(torch.onnx.export(module, args, dynamo=True, opset_version=21, verbose=False).model))


@pytest.fixture(scope="module")
def moe_layer():
    config = get_preset("scout-tiny")
    torch.manual_seed(0)
    layer = MoE(config).eval()
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.2)
    return layer


@pytest.fixture(scope="module", params=["gather", "dense"])
def traced_moe(request, moe_layer):
    """(form, exported graph of the MoE layer in that form, x, the layer's weights in checkpoint layout)."""
    moe_layer.impl = request.param
    tokens = 1 if request.param == "gather" else 7
    x = torch.randn(3, tokens, moe_layer.router.in_features, generator=torch.Generator().manual_seed(2))
    model = _quiet_export(moe_layer, (x,))
    weights = {
        "router": moe_layer.router.weight, "gate_up": moe_layer.experts.gate_up_proj, "down": moe_layer.experts.down_proj,
        "shared_gate": moe_layer.shared_expert.gate_proj.weight, "shared_up": moe_layer.shared_expert.up_proj.weight,
        "shared_down": moe_layer.shared_expert.down_proj.weight,
    }
    return request.param, model, x.numpy(), {k: v.detach().numpy() for k, v in weights.items()}


def _fuse(model: ir.Model):
    return run_passes(model, [*canonicalize.canonicalization_passes(), *fuse_moe.moe_fusion_passes()], CONTEXT)


def test_moe_fusion_turns_each_traced_form_into_one_node(traced_moe):
    form, model, x, weights = traced_moe
    fused = model.clone()
    report = _fuse(fused)
    by_pass = {r.name: r for r in report.records}
    assert by_pass[f"fuse_moe_{form}"].rewrites == 1
    assert by_pass[f"fuse_moe_{'dense' if form == 'gather' else 'gather'}"].rewrites == 0
    ops_after = op_histogram(fused)
    assert ops_after[f"{ops.DOMAIN}::{ops.MOE_OP}"] == 1
    assert sum(ops_after.values()) <= 4  # Reshape in, the node, Reshape out: the routing and experts are gone
    (node,) = [n for n in fused.graph if n.op_type == ops.MOE_OP]
    assert [v.const_value.numpy().shape for v in node.inputs[1:]] == [w.shape for w in weights.values()]
    assert node.attributes["num_experts"].value == weights["router"].shape[0] and node.attributes["top_k"].value == 1

    # The fused graph, its node run through the numpy reference, equals the unfused graph and the reference itself.
    if not reference_ops_available():
        pytest.skip("onnxruntime-extensions (dev dependency) is needed to run Llama4MoE through its reference")
    runnable, library = executable_copy(fused)
    out = run(runnable, {model.graph.inputs[0].name: x}, library)[0]
    unfused = run(model, {model.graph.inputs[0].name: x})[0]
    reference = llama4_moe(x.reshape(-1, x.shape[-1]), **weights).reshape(x.shape)
    np.testing.assert_allclose(out, unfused, rtol=0, atol=1e-5 * np.abs(unfused).max())
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


@pytest.mark.parametrize("attribute, value", [("select_last_index", 1), ("axis", 0)], ids=["last_maximum", "token_axis"])
def test_moe_fusion_leaves_a_different_routing_alone(traced_moe, attribute, value):
    """Top-1 by the *last* maximum, or an argmax over the tokens instead of the experts, is not Llama 4's routing: the
    rule must not fire."""
    form, model, _, _ = traced_moe
    changed = model.clone()
    (argmax,) = [n for n in changed.graph if n.op_type == "ArgMax"]
    argmax.attributes[attribute] = ir.AttrInt64(attribute, value)
    report = _fuse(changed)
    assert op_histogram(changed)[f"{ops.DOMAIN}::{ops.MOE_OP}"] == 0
    assert all(r.rewrites == 0 for r in report.records if r.name.startswith("fuse_moe"))


# ------------------------------------------------------------------------------------------------ lowerings
@pytest.fixture(scope="module")
def moe_weights():
    """Gate pre-activations reach ±23 (over a third beyond ±7): a clamp or gpt-oss SwiGLU constants would show."""
    return random_moe_weights(np.random.default_rng(5), experts=8, hidden=32, inter=48, gate_up_scale=1.5, scale=0.2)


@pytest.mark.parametrize("lowering", ["ort_moe", "gather", "dense"])
def test_each_lowering_matches_the_numpy_reference(moe_weights, lowering):
    x = np.random.default_rng(6).standard_normal((11, 32)).astype(np.float32)
    model = ops.moe_node_model(moe_weights)
    assert lower._lower(model, lowering) == 1
    assert op_histogram(model)[f"{ops.DOMAIN}::{ops.MOE_OP}"] == 0
    out = run(model, {"x": x})[0]
    reference = llama4_moe(x, **moe_weights)
    assert np.abs(reference).max() > 10
    np.testing.assert_allclose(out, reference, rtol=0, atol=2e-6 * np.abs(reference).max())


@pytest.mark.parametrize("attribute", [ir.AttrInt64("top_k", 2), ir.AttrString("activation", "gelu")], ids=["top_k", "gelu"])
def test_lower_moe_refuses_a_node_it_would_lower_as_top1_swiglu(moe_weights, attribute):
    """Every lowering computes top-1 SwiGLU whatever the node says: another routing or activation is refused with one
    line naming the node, the graph is left as it was."""
    model = ops.moe_node_model(moe_weights)
    node = next(iter(model.graph))
    node.attributes[attribute.name] = attribute
    before = op_histogram(model)
    for target in ("onnxruntime", "tensorrt"):
        with pytest.raises(GraphPassError, match=f"{attribute.name}={attribute.value!r}.*only top_k=1 and 'swiglu'"):
            lower.lower_moe(model, PassContext(target, "gather"))
        assert op_histogram(model) == before


@pytest.mark.parametrize("tokens", [1, 11])
def test_float_experts_on_onnxruntime_are_one_if_per_expert_and_match_the_reference(moe_weights, tokens):
    """lower_moe on ONNX Runtime, float32 experts: Llama4MoE → one If per expert over two MatMuls (only the chosen
    experts run, each on its own tokens), the stacked [E, ...] expert tensors no longer read; against numpy."""
    model = ops.moe_node_model(moe_weights)
    context = PassContext("onnxruntime", "gather")
    assert lower.lower_moe(model, context) == 1
    assert context.moe_lowering == lower.FLOAT_EXPERTS_LOWERING
    counts = collections.Counter(f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes())
    experts = len(moe_weights["router"])
    assert counts[f"{ops.DOMAIN}::{ops.MOE_OP}"] == 0 and counts["com.microsoft::MoE"] == 0
    assert counts["::If"] == experts and counts["::MatMul"] == 2 * experts
    assert not model.graph.initializers["gate_up"].uses() and not model.graph.initializers["down"].uses()
    x = np.random.default_rng(7).standard_normal((tokens, 32)).astype(np.float32)
    reference = llama4_moe(x, **moe_weights)
    np.testing.assert_allclose(run(model, {"x": x})[0], reference, rtol=0, atol=2e-6 * np.abs(reference).max())


def test_gather_lowering_reads_expert_weights_only_through_the_argmax_index(moe_weights):
    model = ops.moe_node_model(moe_weights)
    lower._lower(model, "gather")
    for name in ("gate_up", "down"):
        uses = model.graph.initializers[name].uses()
        assert [(u.node.op_type, u.idx) for u in uses] == [("Gather", 0)]
        assert uses[0].node.inputs[1].producer().op_type == "ArgMax"


def test_trt_plugin_node_follows_the_plugin_spec(moe_weights):
    model = ops.moe_node_model(moe_weights)
    lower._lower(model, "trt_plugin")
    (node,) = list(model.graph)
    assert (node.domain, node.op_type) == (trt_plugin_spec.PLUGIN_DOMAIN, trt_plugin_spec.PLUGIN_NAME)
    assert [v.name for v in node.inputs] == ["x", *ops.MOE_INPUTS[1:]]
    assert node.attributes["plugin_version"].value == trt_plugin_spec.PLUGIN_VERSION
    assert node.attributes["plugin_namespace"].value == trt_plugin_spec.PLUGIN_NAMESPACE
    assert {k: type(node.attributes[k].value) for k in trt_plugin_spec.PLUGIN_FIELDS} == trt_plugin_spec.PLUGIN_FIELDS


def test_ort_moe_probe_rejects_gpt_oss_swiglu_constants(monkeypatch):
    """A com.microsoft.MoE with gpt-oss' SwiGLU (α=1.702, up + 1) is caught by the probe; lowering falls back."""

    def gpt_oss_moe(op, x, router, gate_up, down, shared_gate, shared_up, shared_down, **_):
        logits, routed_in = lower._routing(op, x, router)
        fc1 = gate_up.const_value.numpy().transpose(0, 2, 1)
        inter = fc1.shape[1] // 2
        fc1 = np.stack([fc1[:, :inter], fc1[:, inter:]], axis=2).reshape(fc1.shape)
        routed = op.op("MoE", routed_in, logits, op.Constant(value=ir.tensor(np.ascontiguousarray(fc1))), None,
                       op.Constant(value=ir.tensor(np.ascontiguousarray(down.const_value.numpy().transpose(0, 2, 1)))),
                       _domain="com.microsoft", _version=1, k=1, activation_type="swiglu", swiglu_fusion=1,
                       activation_alpha=1.702, activation_beta=1.0, normalize_routing_weights=1)
        return op.Add(lower._shared_expert(op, x, shared_gate, shared_up, shared_down), routed)

    monkeypatch.setitem(lower.LOWERINGS, "ort_moe", gpt_oss_moe)
    lower.ort_moe_problem.cache_clear()
    try:
        problem = lower.ort_moe_problem()
        assert problem is not None and "differs from the reference" in problem
        experts = lower.IF_PER_EXPERT_MAX + 1  # more float experts than Ifs are built for: the MoE op's case
        model = ops.moe_node_model({k: v.astype(np.float32) for k, v in {
            "router": np.eye(experts, 8), "gate_up": np.ones((experts, 8, 6)), "down": np.ones((experts, 3, 8)),
            "shared_gate": np.ones((3, 8)), "shared_up": np.ones((3, 8)), "shared_down": np.ones((8, 3))}.items()})
        context = PassContext("onnxruntime", "gather")
        lower.lower_moe(model, context)
        assert context.moe_lowering == "standard ops (gather)" and "differs" in context.notes[0]
        assert op_histogram(model)["com.microsoft::MoE"] == 0
    finally:
        lower.ort_moe_problem.cache_clear()


# ------------------------------------------------------------------------------------------ transformer fusions
def _transformer_pass(name: str, target: str = "onnxruntime"):
    """The registered pass `name` of fuse_transformer for `target` (the rules are closures over the target)."""
    return {p.name: p for p in fuse_transformer.transformer_fusion_passes(target)}[name].apply


def _rms_norm(x: np.ndarray, eps: float, w: np.ndarray | None = None) -> np.ndarray:
    normed = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)
    return normed if w is None else normed * w


def test_rms_norm_fusions_change_op_counts_not_outputs_and_leave_near_misses():
    """The traced norm (x · 1/√(mean(x²) + ε) · w) and its unweighted form (QK norm) become RMSNormalization with their ε
    (1e-2 here, so a lost ε shows); ε added after the √, a mean over another axis, x³ and x normalized by z's RMS are
    other functions and stay."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(8).astype(np.float32)

    def norm(out: str, x: str = "x", square_of: str = "x", power: str = "two", axes: str = "last", eps_after_sqrt=False):
        if eps_after_sqrt:
            root = f"{out}_ms_root = Sqrt({out}_ms)\n {out}_root = Add({out}_ms_root, eps)"
        else:
            root = f"{out}_sum = Add({out}_ms, eps)\n {out}_root = Sqrt({out}_sum)"
        return f"""{out}_sq = Pow({square_of}, {power})
            {out}_ms = ReduceMean <keepdims = 1> ({out}_sq, {axes})
            {root}
            {out}_inv = Reciprocal({out}_root)
            {out} = Mul({x}, {out}_inv)"""

    outputs = ["weighted", "unweighted", "eps_after_sqrt", "other_axis", "cubed", "other_rms"]
    model = parse(
        f"""<ir_version: 10, opset_import: ["" : 23]>
        g (float[2, 8, 8] x, float[2, 8, 8] z) => ({", ".join(f"float[2, 8, 8] {o}" for o in outputs)}) {{
            {norm("weighted_core")}
            weighted = Mul(weighted_core, w)
            {norm("unweighted", x="z", square_of="z")}
            {norm("eps_after_sqrt", eps_after_sqrt=True)}
            {norm("other_axis", axes="second")}
            {norm("cubed", power="three")}
            {norm("other_rms", square_of="z")}
        }}""", w=w, eps=np.asarray(1e-2, np.float32), two=np.asarray(2.0, np.float32),
        three=np.asarray(3.0, np.float32), last=np.asarray([-1]), second=np.asarray([1]))
    feeds = {name: (rng.standard_normal((2, 8, 8)) * 0.1).astype(np.float32) for name in "xz"}
    before = run(model, feeds)
    ops_before = op_histogram(model)
    assert _transformer_pass("fuse_rms_norm")(model, CONTEXT) == 1
    assert _transformer_pass("fuse_unweighted_rms_norm")(model, CONTEXT) == 1
    ops_after = op_histogram(model)
    assert ops_after["RMSNormalization"] == 2
    assert {op: ops_before[op] - ops_after[op] for op in ("Pow", "ReduceMean", "Sqrt", "Reciprocal")} == dict.fromkeys(
        ("Pow", "ReduceMean", "Sqrt", "Reciprocal"), 2)
    after = run(model, feeds)
    x, z = feeds["x"], feeds["z"]
    np.testing.assert_allclose(after[0], _rms_norm(x, 1e-2, w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after[1], _rms_norm(z, 1e-2), rtol=1e-5, atol=1e-6)
    for got, was in zip(after, before):
        np.testing.assert_allclose(got, was, rtol=1e-5, atol=1e-6)


def test_skip_rms_norm_fusion_keeps_the_norms_epsilon_and_the_residual_sum():
    """Add(a, b) → RMSNormalization, the sum read again → SkipSimplifiedLayerNormalization(a, b) with both outputs. The
    norm here has no epsilon attribute (ONNX's default, 1e-5, as an opset-23 graph may write it): the fused op got
    none either and ran with its own default, 1e-12 — on small activations a different function."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal(8).astype(np.float32)
    model = parse(
        """<ir_version: 10, opset_import: ["" : 23]>
        g (float[N, 5, 8] a, float[N, 5, 8] b) => (float[N, 5, 8] y, float[N, 5, 8] total) {
            total = Add(a, b)
            y = RMSNormalization <axis = -1> (total, w)
        }""", w=w)
    feeds = {name: (rng.standard_normal((2, 5, 8)) * 1e-3).astype(np.float32) for name in "ab"}
    before = run(model, feeds)
    assert _transformer_pass("fuse_skip_rms_norm")(model, CONTEXT) == 1
    assert dict(op_histogram(model)) == {"com.microsoft::SkipSimplifiedLayerNormalization": 1}
    total = feeds["a"] + feeds["b"]
    after = run(model, feeds)
    np.testing.assert_allclose(after[0], _rms_norm(total, 1e-5, w), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(after[1], total)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-4, atol=1e-5)


def _rope_model(layout: str) -> tuple[ir.Model, dict]:
    """apply_rope as traced (x [B, T, H, D] viewed as interleaved pairs), or a near miss of it."""
    b, t, h, d = 2, 4, 4, 8
    view, gather_axis, stack_axis, first, second, cos_axis = [b, t, h, d // 2, 2], 4, -1, "zero", "one", "two"
    imag = "a_sin = Mul(a, s)\n b_cos = Mul(b, c)\n imag = Add(a_sin, b_cos)"
    if layout == "rotate_half":  # the halves of each head rotate together (GPT-NeoX), not the interleaved pairs
        view, gather_axis, stack_axis = [b, t, h, 2, d // 2], 3, 3
    elif layout == "pairs_swapped":
        first, second = "one", "zero"
    elif layout == "cos_over_tokens":  # cos/sin broadcast over the tokens axis instead of the heads axis (T = H)
        cos_axis = "tokens_axis"
    elif layout == "sin_cos_mixed":  # (a·cos − b·sin, a·cos + b·sin)
        imag = "a_cos_again = Mul(a, c)\n b_sin_again = Mul(b, s)\n imag = Add(a_cos_again, b_sin_again)"
    model = parse(
        f"""<ir_version: 10, opset_import: ["" : 23]>
        g (float[{b}, {t}, {h}, {d}] x, float[{b}, {t}, {d // 2}] cos, float[{b}, {t}, {d // 2}] sin)
          => (float[{b}, {t}, {h}, {d}] y) {{
            pairs = Reshape <allowzero = 1> (x, view)
            a = Gather <axis = {gather_axis}> (pairs, {first})
            b = Gather <axis = {gather_axis}> (pairs, {second})
            c = Unsqueeze(cos, {cos_axis})
            s = Unsqueeze(sin, {cos_axis})
            a_cos = Mul(a, c)
            b_sin = Mul(b, s)
            real = Sub(a_cos, b_sin)
            {imag}
            real_u = Unsqueeze(real, last)
            imag_u = Unsqueeze(imag, last)
            stacked = Concat <axis = {stack_axis}> (real_u, imag_u)
            y = Reshape <allowzero = 1> (stacked, out_shape)
        }}""", view=np.array(view), out_shape=np.array([b, t, h, d]), zero=np.asarray(0), one=np.asarray(1),
        two=np.asarray([2]), tokens_axis=np.asarray([1]), last=np.asarray([-1]))
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((b, t, h, d), dtype=np.float32)}
    angles = rng.uniform(0, 2 * np.pi, (b, t, d // 2))
    feeds["cos"], feeds["sin"] = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return model, feeds


@pytest.mark.parametrize("target, fused_op", [("onnxruntime", "com.microsoft::RotaryEmbedding"),
                                               ("tensorrt", "RotaryEmbedding")])
def test_rope_fusion_changes_op_counts_not_outputs(target, fused_op):
    model, feeds = _rope_model("interleaved")
    before = run(model, feeds)[0]
    assert _transformer_pass("fuse_rope", target)(model, PassContext(target, "gather")) == 1
    ops_after = op_histogram(model)
    assert ops_after[fused_op] == 1 and not {"Gather", "Sub", "Concat"} & set(ops_after)
    x, cos, sin = feeds["x"], feeds["cos"][:, :, None], feeds["sin"][:, :, None]
    a, b = x[..., 0::2], x[..., 1::2]
    expected = np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
    after = run(model, feeds)[0]
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["rotate_half", "pairs_swapped", "cos_over_tokens", "sin_cos_mixed"])
def test_rope_fusion_leaves_other_rotations_alone(layout):
    model, feeds = _rope_model(layout)
    before = run(model, feeds)[0]
    assert _transformer_pass("fuse_rope")(model, CONTEXT) == 0
    np.testing.assert_array_equal(run(model, feeds)[0], before)


# ------------------------------------------------------------------------------------------ vision fusions
def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def test_vision_fusions_change_op_counts_not_outputs():
    """An encoder layer's shape in small: residual sum → LayerNorm (the sum read again) → linear with bias → GELU; and a
    broadcasting Add → LayerNorm (the positional embedding's) and a tanh GELU, which must stay."""
    rng = np.random.default_rng(0)
    gamma, beta = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    w, bias = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    position = rng.standard_normal((5, 8)).astype(np.float32)
    model = parse(
        """<ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 5, 8] a, float[N, 5, 8] b) => (float[N, 5, 16] y, float[N, 5, 8] total, float[N, 5, 8] pre,
                                                   float[N, 5, 16] tanh_gelu) {
            total = Add(a, b)
            normed = LayerNormalization <axis = -1, epsilon = 1e-5> (total, gamma, beta)
            projected = MatMul(normed, w)
            biased = Add(projected, bias)
            y = Gelu(biased)
            biased_again = Add(projected, bias)
            tanh_gelu = Gelu <approximate = "tanh"> (biased_again)
            positioned = Add(a, position)
            pre = LayerNormalization <axis = -1, epsilon = 1e-5> (positioned, gamma, beta)
        }""", gamma=gamma, beta=beta, w=w, bias=bias, position=position)
    feeds = {"a": rng.standard_normal((3, 5, 8)).astype(np.float32), "b": rng.standard_normal((3, 5, 8)).astype(np.float32)}
    before = run(model, feeds)
    context = PassContext("onnxruntime", "gather")
    assert fuse_vision.fuse_skip_layer_norm(model, context) == 1 and fuse_vision.fuse_bias_gelu(model, context) == 1
    ops_after = op_histogram(model)
    assert ops_after["com.microsoft::SkipLayerNormalization"] == 1 and ops_after["LayerNormalization"] == 1
    assert ops_after["com.microsoft::BiasGelu"] == 1 and ops_after["Gelu"] == 1
    after = run(model, feeds)
    total = feeds["a"] + feeds["b"]
    expected = [_gelu(_layer_norm(total, gamma, beta) @ w + bias), total, _layer_norm(feeds["a"] + position, gamma, beta)]
    for got, was, want in zip(after, before, expected):
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_allclose(got, was, atol=1e-5)
    np.testing.assert_allclose(after[3], before[3], atol=1e-6)


def _vision_attention(softmax_axis: int):
    """The encoder's attention as traced: q, k, v [B, T, H, d] (q, k after RoPE), scaled scores, softmax, no mask."""
    return parse(
        f"""<ir_version: 10, opset_import: ["" : 21]>
        g (float[N, 5, 2, 4] q, float[N, 5, 2, 4] k, float[N, 5, 2, 4] v) => (float[N, 5, 2, 4] y) {{
            q_heads = Transpose <perm = [0, 2, 1, 3]> (q)
            k_transposed = Transpose <perm = [0, 2, 3, 1]> (k)
            v_heads = Transpose <perm = [0, 2, 1, 3]> (v)
            scores = MatMul(q_heads, k_transposed)
            scaled = Mul(scores, scale)
            weights = Softmax <axis = {softmax_axis}> (scaled)
            heads = MatMul(weights, v_heads)
            y = Transpose <perm = [0, 2, 1, 3]> (heads)
        }}""", scale=np.asarray(0.5, np.float32))


def test_vision_attention_fusion_changes_op_counts_not_outputs():
    rng = np.random.default_rng(1)
    model = _vision_attention(softmax_axis=-1)
    feeds = {name: rng.standard_normal((3, 5, 2, 4)).astype(np.float32) for name in "qkv"}
    before = run(model, feeds)[0]
    assert fuse_vision.fuse_attention(model, PassContext("onnxruntime", "gather")) == 1
    ops_after = op_histogram(model)
    assert ops_after["com.microsoft::MultiHeadAttention"] == 1
    assert not {"Softmax", "MatMul", "Transpose"} & set(ops_after)
    q, k, v = (feeds[name].transpose(0, 2, 1, 3) for name in "qkv")
    scores = 0.5 * q @ k.transpose(0, 1, 3, 2)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = ((weights / weights.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3)
    after = run(model, feeds)[0]
    np.testing.assert_allclose(after, expected, atol=1e-5)
    np.testing.assert_allclose(after, before, atol=1e-6)


def test_vision_attention_fusion_leaves_a_softmax_over_the_queries_alone():
    rng = np.random.default_rng(2)
    model = _vision_attention(softmax_axis=2)
    feeds = {name: rng.standard_normal((3, 5, 2, 4)).astype(np.float32) for name in "qkv"}
    before = run(model, feeds)[0]
    assert fuse_vision.fuse_attention(model, PassContext("onnxruntime", "gather")) == 0
    np.testing.assert_array_equal(run(model, feeds)[0], before)


@pytest.mark.parametrize("norm", ["RMSNormalization", "LayerNormalization"])
def test_skip_norm_fusions_leave_a_broadcast_scale_alone(norm):
    """A norm's scale (and bias) need only broadcast to the normalized axis, the contrib skip norms' gamma and beta must
    be 1-D of its size: fused with a [1] scale, the graph failed in ONNX Runtime ("Last dimension of gamma and input
    does not match")."""
    rng = np.random.default_rng(4)
    inputs = "total, scale" + (", bias" if norm == "LayerNormalization" else "")
    model = parse(
        f"""<ir_version: 10, opset_import: ["" : 23]>
        g (float[N, 5, 8] a, float[N, 5, 8] b) => (float[N, 5, 8] y, float[N, 5, 8] total) {{
            total = Add(a, b)
            y = {norm} <axis = -1, epsilon = 1e-5> ({inputs})
        }}""", scale=np.asarray([1.5], np.float32), bias=np.asarray([0.5], np.float32))
    fuse = fuse_vision.fuse_skip_layer_norm if norm == "LayerNormalization" else _transformer_pass("fuse_skip_rms_norm")
    feeds = {name: rng.standard_normal((2, 5, 8)).astype(np.float32) for name in "ab"}
    before = run(model, feeds)
    assert fuse(model, CONTEXT) == 0
    for got, was in zip(run(model, feeds), before):
        np.testing.assert_array_equal(got, was)


# ------------------------------------------------------------------------------------------ decode attention
def _gqa_model(heads: int, kv_heads: int, head_dim: int, slot_dim: str) -> ir.Model:
    """One in-place GroupQueryAttention over a cache whose slot dimension is `slot_dim` (io_spec's names)."""
    width, kv_width = heads * head_dim, kv_heads * head_dim
    return parse(
        f"""<ir_version: 10, opset_import: ["" : 21, "com.microsoft" : 1]>
        g (float[batch, new_tokens, {width}] q, float[batch, new_tokens, {kv_width}] k,
           float[batch, new_tokens, {kv_width}] v, float[batch, {kv_heads}, {slot_dim}, {head_dim}] past_key,
           float[batch, {kv_heads}, {slot_dim}, {head_dim}] past_value, int32[batch] seqlens_k, int32 total)
          => (float[batch, new_tokens, {width}] out, float[batch, {kv_heads}, {slot_dim}, {head_dim}] present_key,
              float[batch, {kv_heads}, {slot_dim}, {head_dim}] present_value) {{
            out, present_key, present_value = com.microsoft.GroupQueryAttention <num_heads = {heads},
                kv_num_heads = {kv_heads}, scale = {head_dim ** -0.5}> (q, k, v, past_key, past_value, seqlens_k, total)
        }}""")


def _attend_in_place(model: ir.Model, q, k, v, keys, values, lengths) -> np.ndarray:
    """One step bound as the runtime binds it: each present output on its past input's memory (keys/values edited)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    binding, out = session.io_binding(), np.empty(q.shape, np.float32)
    for name, value in (("past_key", keys), ("past_value", values)):
        buffer = ort.OrtValue.ortvalue_from_numpy(value)
        binding.bind_ortvalue_input(name, buffer)
        binding.bind_ortvalue_output(name.replace("past", "present"), buffer)
    tokens = q.shape[1]
    for name, value in (("q", q), ("k", k), ("v", v), ("seqlens_k", (lengths + tokens - 1).astype(np.int32)),
                        ("total", np.asarray(lengths.max() + tokens, np.int32))):
        binding.bind_cpu_input(name, value)
    binding.bind_output("out", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    session.run_with_iobinding(binding)
    return out


def _attention_reference(q, keys, values, lengths, groups: int) -> np.ndarray:
    """numpy, float64: token t of row b attends to slots 0..lengths[b] + t of its KV head."""
    batch, tokens, width = q.shape
    head_dim = keys.shape[-1]
    heads = width // head_dim
    out = np.zeros((batch, tokens, heads, head_dim))
    for b, t, h in np.ndindex(batch, tokens, heads):
        visible = lengths[b] + t + 1
        scores = keys[b, h // groups, :visible] @ q[b, t, h * head_dim:(h + 1) * head_dim].astype(np.float64) * head_dim ** -0.5
        weights = np.exp(scores - scores.max())
        out[b, t, h] = weights / weights.sum() @ values[b, h // groups, :visible]
    return out.reshape(batch, tokens, width)


@pytest.mark.parametrize("batch, tokens", [(1, 1), (2, 1), (1, 4)])
def test_group_decode_queries_branches_one_row_decode_and_changes_no_output(batch, tokens):
    heads, kv_heads, head_dim, capacity = 6, 2, 8, 48
    rng = np.random.default_rng(batch * 10 + tokens)
    lengths = np.array([37, 21][:batch])
    q = rng.standard_normal((batch, tokens, heads * head_dim), dtype=np.float32)
    k, v = (rng.standard_normal((batch, tokens, kv_heads * head_dim), dtype=np.float32) for _ in range(2))
    cache = [rng.standard_normal((batch, kv_heads, capacity, head_dim), dtype=np.float32) for _ in range(2)]
    original, rewritten = _gqa_model(heads, kv_heads, head_dim, "global_slots"), _gqa_model(heads, kv_heads, head_dim, "global_slots")
    before = op_histogram(rewritten)
    assert decode_attention.group_decode_queries(rewritten, CONTEXT) == 1
    after = op_histogram(rewritten)
    assert after["If"] == before["If"] + 1 and after["com.microsoft::GroupQueryAttention"] == 2  # one per branch
    # a chunked layer's cache: kept for short chunks (rand200m's 256 slots), rewritten for long ones (Scout's 8,192)
    for chunk, rewrites in ((256, 0), (decode_attention.GROUPED_CHUNK_MIN, 1)):
        context = PassContext("onnxruntime", "gather", attention_chunk=chunk)
        assert decode_attention.group_decode_queries(_gqa_model(heads, kv_heads, head_dim, "chunk_slots"), context) == rewrites
    results = {}
    for name, model in (("original", original), ("rewritten", rewritten)):
        keys, values = cache[0].copy(), cache[1].copy()
        results[name] = (_attend_in_place(model, q, k, v, keys, values, lengths), keys, values)
    out, keys, values = results["rewritten"]
    expected = _attention_reference(q, keys, values, lengths, heads // kv_heads)
    assert np.abs(out - expected).max() < 1e-5
    assert np.abs(results["original"][0] - expected).max() < 1e-5
    for b in range(batch):  # the step's K/V written in place at the same slots; the slots before untouched
        valid = slice(0, lengths[b] + tokens)
        assert np.array_equal(keys[b, :, valid], results["original"][1][b, :, valid])
        assert np.array_equal(values[b, :, valid], results["original"][2][b, :, valid])
        assert np.array_equal(keys[b, :, :lengths[b]], cache[0][b, :, :lengths[b]])
        assert np.array_equal(keys[b, :, lengths[b]:lengths[b] + tokens],
                              k[b].reshape(tokens, kv_heads, head_dim).transpose(1, 0, 2))
    # which branch ran: a one-row decode step leaves G − 1 copies of its K in the scratch slots after its own
    scratch = slice(lengths[0] + tokens, lengths[0] + tokens + heads // kv_heads - 1)
    one_row_decode = batch == 1 and tokens == 1
    assert np.array_equal(keys[0, :, scratch], cache[0][0, :, scratch]) != one_row_decode


def test_group_decode_queries_leaves_a_node_whose_attributes_its_branch_would_drop():
    """The one-token branch's GroupQueryAttention carries num_heads, kv_num_heads and scale: a node with any other
    setting (here smooth_softmax, an extra 1 in the softmax' denominator) was rewritten all the same, and a one-row
    decode step then computed a plain softmax."""
    heads, kv_heads, head_dim, capacity = 6, 2, 8, 48
    rng = np.random.default_rng(9)
    models = [_gqa_model(heads, kv_heads, head_dim, "global_slots") for _ in range(2)]
    for model in models:
        (node,) = list(model.graph)
        node.attributes["smooth_softmax"] = ir.AttrInt64("smooth_softmax", 1)
    assert decode_attention.group_decode_queries(models[1], CONTEXT) == 0
    lengths = np.array([37])
    q = rng.standard_normal((1, 1, heads * head_dim), dtype=np.float32)
    k, v = (rng.standard_normal((1, 1, kv_heads * head_dim), dtype=np.float32) for _ in range(2))
    cache = [rng.standard_normal((1, kv_heads, capacity, head_dim), dtype=np.float32) for _ in range(2)]
    original, passed = (_attend_in_place(model, q, k, v, cache[0].copy(), cache[1].copy(), lengths) for model in models)
    np.testing.assert_array_equal(passed, original)


# ------------------------------------------------------------------------------------------ sibling projections
def _nbits_projection(rng, k: int, n: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed, scales) of a random 4-bit weight, and the float W [N, K] they stand for (numpy: (q − 0) · scale)."""
    q = rng.integers(-8, 8, (n, k), dtype=np.int8)
    scale = rng.uniform(0.01, 0.1, (n, k // block)).astype(np.float32)
    packed, scales = nbits_weight(q, scale, block, 4)
    return packed, scales, q.astype(np.float64) * np.repeat(scale, block, axis=1)


def test_sibling_projections_become_one_product_and_change_no_output():
    """q, k, v MatMulNBits of one x fuse (one stays a graph output under its name); an fp32 pair of another input
    fuses; a lone projection and a sibling with another block size stay."""
    rng = np.random.default_rng(0)
    x, h = rng.standard_normal((5, 64), dtype=np.float32), rng.standard_normal((5, 32), dtype=np.float32)
    shapes = {"q": (64, 48, 32), "k": (64, 16, 32), "v": (64, 16, 32), "o": (64, 8, 16)}  # K, N, block
    weights = {name: _nbits_projection(rng, *shape) for name, shape in shapes.items()}
    gate, up, down = (rng.standard_normal(shape, dtype=np.float32) for shape in ((32, 24), (32, 24), (24, 8)))
    nbits = "\n".join(f"""{name}_y = com.microsoft.MatMulNBits <K = {k}, N = {n}, bits = 4, block_size = {block},
                      accuracy_level = 0> (x, {name}_w, {name}_s)"""
                      for name, (k, n, block) in shapes.items())
    text = f"""<ir_version: 10, opset_import: ["" : 21, "com.microsoft" : 1]>
        g (float[5, 64] x, float[5, 32] h) => (float[5, 48] q_y, float[5, 40] qkv, float[5, 8] o_y, float[5, 24] ffn,
                                               float[5, 8] down_y) {{
            {nbits}
            qkv = Concat <axis = 1> (q_y, k_y, v_y)
            gate_y = MatMul(h, gate)
            up_y = MatMul(h, up)
            ffn = Mul(gate_y, up_y)
            down_y = MatMul(ffn, down)
        }}"""
    initializers = {f"{name}_{part}": array for name, (w, s, _) in weights.items() for part, array in (("w", w), ("s", s))}
    original = parse(text, gate=gate, up=up, down=down, **initializers)
    fused = parse(text, gate=gate, up=up, down=down, **initializers)
    before = op_histogram(fused)
    assert sibling_projections.fuse_sibling_projections(fused, CONTEXT) == 5
    after = op_histogram(fused)
    assert (before["com.microsoft::MatMulNBits"], after["com.microsoft::MatMulNBits"]) == (4, 2)  # q+k+v, o (block 16)
    assert (before["MatMul"], after["MatMul"]) == (3, 2) and after["Split"] == before["Split"] + 2
    stored = set(fused.graph.initializers)
    assert {"q_w+k_w+v_w", "q_s+k_s+v_s", "gate+up"} <= stored and not {"q_w", "k_w", "v_w", "gate", "up"} & stored
    assert [v.name for v in fused.graph.outputs] == [v.name for v in original.graph.outputs]

    dense = {name: w for name, (_, _, w) in weights.items()}
    expected = [x @ dense["q"].T, x @ np.concatenate([dense[n] for n in "qkv"]).T, x @ dense["o"].T,
                (h @ gate) * (h @ up), ((h @ gate) * (h @ up)) @ down]
    feeds = {"x": x, "h": h}
    for got, want, unfused in zip(run(fused, feeds), expected, run(original, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got, unfused, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ quantization and tidy
def _helper_model(nodes: list, inputs: list, outputs: list, opset_imports=(("", 21),), **initializers) -> ir.Model:
    """A model from onnx.helper parts (for names with dots, which the text parser refuses), shapes inferred."""
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs,
                                   [onnx.numpy_helper.from_array(v, k) for k, v in initializers.items()])
    proto = onnx.helper.make_model(graph, ir_version=10,
                                   opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opset_imports])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def _embedding_model(table: np.ndarray, axis: int = 0, name: str = EMBEDDING, ids: str = io_spec.INPUT_IDS) -> ir.Model:
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    return _helper_model([onnx.helper.make_node("Gather", [name, ids], ["y"], axis=axis)],
                         [onnx.helper.make_tensor_value_info(ids, onnx.TensorProto.INT64, [2, 3])], [y],
                         **{name: table})


def test_quantize_embedding_gathers_4bit_blocks_and_changes_outputs_only_by_their_rounding():
    """Gather(embedding) → GatherBlockQuantized: rows == numpy's blockwise 4-bit rounding (s = amax(block) / 7,
    q = round(w / s) in [-7, 7]); vs the float table within s / 2. The table the input ids index is the embedding
    whatever its name (a tied checkpoint's is lm_head.weight). Near misses: other ids, a Gather along H."""
    rng = np.random.default_rng(0)
    vocab, hidden, block = 10, 64, 16
    table = rng.standard_normal((vocab, hidden), dtype=np.float32)
    table[3, :block] = 0  # an all-zero block
    ids = np.array([[3, 0, 9], [3, 5, 1]], np.int64)
    context = PassContext("onnxruntime", "gather", quantization=QuantSpec("int4", block_size=block, embedding_bits=4))
    model = _embedding_model(table)
    before = op_histogram(model)
    assert quantize_embedding(model, context) == 1
    after = op_histogram(model)
    assert (before["Gather"], after["Gather"], after["com.microsoft::GatherBlockQuantized"]) == (1, 0, 1)
    assert [v.name for v in model.graph.outputs] == ["y"]

    blocks = table.reshape(vocab, hidden // block, block)
    scale = np.abs(blocks).max(-1, keepdims=True) / 7
    scale[scale == 0] = 1
    dequantized = (np.clip(np.round(blocks / scale), -7, 7) * scale).reshape(vocab, hidden)
    (got,) = run(model, {io_spec.INPUT_IDS: ids})
    np.testing.assert_allclose(got, dequantized[ids], rtol=1e-6, atol=0)
    (unquantized,) = run(_embedding_model(table), {io_spec.INPUT_IDS: ids})
    half_step = np.repeat(scale[..., 0], block, axis=-1)[ids] / 2
    assert np.all(np.abs(got - unquantized) <= half_step * (1 + 1e-6))

    assert quantize_embedding(_embedding_model(table, name="lm_head.weight"), context) == 1
    for near_miss in (_embedding_model(table, ids="ids"), _embedding_model(table, axis=1)):
        assert quantize_embedding(near_miss, context) == 0 and op_histogram(near_miss)["Gather"] == 1


def _kv_cache_model() -> ir.Model:
    """Layer 0's cache: new = Concat(past, k) along the slots; y = q · newᵀ reads the dequantized past."""
    f, shape = onnx.TensorProto.FLOAT, [1, 2, 3, 4]
    inputs = [onnx.helper.make_tensor_value_info(name, f, shape) for name in ("past_key.0", "past_value.0")]
    inputs += [onnx.helper.make_tensor_value_info(name, f, [1, 2, 1, 4]) for name in ("q", "k", "v")]
    outputs = [onnx.helper.make_tensor_value_info(name, f, None) for name in ("y", "new_key.0", "new_value.0")]
    nodes = [onnx.helper.make_node("Concat", ["past_key.0", "k"], ["new_key.0"], axis=2),
             onnx.helper.make_node("Concat", ["past_value.0", "v"], ["new_value.0"], axis=2),
             onnx.helper.make_node("Transpose", ["past_key.0"], ["past_key_t"], perm=[0, 1, 3, 2]),
             onnx.helper.make_node("MatMul", ["q", "past_key_t"], ["y"])]
    return _helper_model(nodes, inputs, outputs)


def test_quantize_kv_cache_stores_the_cache_in_fp8_and_changes_outputs_only_by_its_rounding():
    """past → float8 input → DequantizeLinear(s); new → QuantizeLinear(s) → float8 output, s = amax / 448: the outputs
    == numpy's E4M3 rounding (saturating) of the float graph's, y == the float graph fed numpy's dequantized past;
    vs the float graph fed the float past within E4M3's rounding (3 mantissa bits). Near miss: a layer of the spec
    whose cache is in another partition's graph."""
    rng = np.random.default_rng(0)
    amax = {0: (2.0, 1.5), 1: (9.0, 9.0)}  # layer 1: not in this graph
    feeds = {name: rng.standard_normal(shape, dtype=np.float32)
             for name, shape in (("past_key.0", (1, 2, 3, 4)), ("past_value.0", (1, 2, 3, 4)), ("q", (1, 2, 1, 4)),
                                 ("k", (1, 2, 1, 4)), ("v", (1, 2, 1, 4)))}
    feeds["k"][0, 0, 0, 0] = 5.0  # beyond amax: saturates to 448·s
    model = _kv_cache_model()
    before = op_histogram(model)
    context = PassContext("onnxruntime", "gather", quantization=QuantSpec("fp8", kv_cache_amax=amax))
    assert quantize_kv_cache(model, context) == 2
    after = op_histogram(model)
    assert (after["DequantizeLinear"] - before["DequantizeLinear"], after["QuantizeLinear"] - before["QuantizeLinear"]) == (2, 2)
    assert [(v.name, v.dtype) for v in [*model.graph.inputs[:2], *model.graph.outputs]] == [
        ("past_key.0", ir.DataType.FLOAT8E4M3FN), ("past_value.0", ir.DataType.FLOAT8E4M3FN), ("y", ir.DataType.FLOAT),
        ("new_key.0", ir.DataType.FLOAT8E4M3FN), ("new_value.0", ir.DataType.FLOAT8E4M3FN)]

    scale = {"key": np.float32(amax[0][0] / 448), "value": np.float32(amax[0][1] / 448)}
    fp8 = {kind: np.clip(feeds[f"past_{kind}.0"] / scale[kind], -448, 448).astype(ml_dtypes.float8_e4m3fn)
           for kind in scale}
    got = run_onnxruntime(model, {**feeds, "past_key.0": fp8["key"], "past_value.0": fp8["value"]})
    dequantized = {f"past_{kind}.0": fp8[kind].astype(np.float32) * scale[kind] for kind in scale}
    float_graph = run_onnxruntime(_kv_cache_model(), {**feeds, **dequantized})
    np.testing.assert_allclose(got["y"], float_graph["y"], rtol=1e-6, atol=1e-7)
    for kind in scale:
        expected = np.clip(float_graph[f"new_{kind}.0"] / scale[kind], -448, 448).astype(ml_dtypes.float8_e4m3fn)
        np.testing.assert_array_equal(got[f"new_{kind}.0"].view(np.uint8), expected.view(np.uint8))
    unquantized = run_onnxruntime(_kv_cache_model(), feeds)
    past_error = np.abs(dequantized["past_key.0"] - feeds["past_key.0"]).sum(-1).max()  # Σ over the dot product
    assert np.abs(got["y"] - unquantized["y"]).max() <= past_error * np.abs(feeds["q"]).max()
    within_range = np.abs(unquantized["new_value.0"]) <= amax[0][1]
    value = got["new_value.0"].astype(np.float32) * scale["value"]
    np.testing.assert_allclose(value[within_range], unquantized["new_value.0"][within_range], rtol=2 ** -4, atol=scale["value"] * 2 ** -9)


def test_tidy_merges_duplicate_constants_lifts_them_and_drops_dead_nodes():
    """Two equal small Constants → one initializer; a dead node → gone; outputs unchanged. Near miss: constants
    beyond CONSTANT_CSE_LIMIT elements stay two (comparing them would cost more than the copy)."""
    big = np.arange(CONSTANT_CSE_LIMIT + 1, dtype=np.float32)
    make = onnx.helper.make_node

    def constant(name: str, array: np.ndarray):
        return make("Constant", [], [name], value=onnx.numpy_helper.from_array(array))

    nodes = [constant("one", np.array([1.5], np.float32)), constant("one_again", np.array([1.5], np.float32)),
             make("Add", ["x", "one"], ["a"]), make("Mul", ["a", "one_again"], ["b"]), make("Sigmoid", ["b"], ["dead"]),
             constant("big1", big), constant("big2", big), make("Add", ["b", "big1"], ["y"]),
             make("Sub", ["b", "big2"], ["z"])]
    f = onnx.TensorProto.FLOAT
    model = _helper_model(nodes, [onnx.helper.make_tensor_value_info("x", f, [2, big.size])],
                          [onnx.helper.make_tensor_value_info(name, f, None) for name in ("y", "z")])
    x = np.random.default_rng(0).standard_normal((2, big.size), dtype=np.float32)
    before = op_histogram(model)
    assert tidy(model, CONTEXT) == 5
    after = op_histogram(model)
    assert (before["Constant"], after["Constant"], before["Sigmoid"], after["Sigmoid"]) == (4, 0, 1, 0)
    initializers = model.graph.initializers.values()
    assert sorted(v.const_value.size for v in initializers) == [1, big.size, big.size]
    y, z = run(model, {"x": x})
    np.testing.assert_array_equal(y, (x + 1.5) * 1.5 + big)
    np.testing.assert_array_equal(z, (x + 1.5) * 1.5 - big)
