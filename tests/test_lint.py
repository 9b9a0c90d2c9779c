"""TensorRT conformance lint on hand-built graphs: what passes, and the precise message for each broken form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llama4_export.tensorrt import trt_onnx_support
from llama4_export.tensorrt.lint import lint_model
from llama4_export.tensorrt.moe_plugin import plugin_attribute_types
from llama4_export.graph_passes import trt_plugin_spec

K, N, BLOCK = 64, 8, 32


def _model(nodes, initializers, inputs, outputs, opset=21, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], ir_version=10)


def int4_matmul(scale_dynamic=False, axis=0, block=BLOCK, zero_point=None, weight_type=TensorProto.INT4, consumer="MatMul"):
    """x [2, K] @ DequantizeLinear(w int4 [K, N], scale [K/block, N], block_size) — the INT4 weight-only form."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", weight_type, [K, N], rng.integers(-7 if weight_type == TensorProto.INT4 else 0, 8, K * N).tolist())
    scale_shape = [K // block, N] if axis == 0 else [K, N // block]
    scale = numpy_helper.from_array(rng.random(scale_shape).astype(np.float32), "scale")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])]
    initializers = [w]
    nodes = []
    if scale_dynamic:
        inputs.append(helper.make_tensor_value_info("scale_in", TensorProto.FLOAT, scale_shape))
        nodes.append(helper.make_node("Abs", ["scale_in"], ["scale"], name="scale_from_input"))
    else:
        initializers.append(scale)
    dq_inputs = ["w", "scale"]
    if zero_point is not None:
        initializers.append(helper.make_tensor("zp", weight_type, [*scale_shape], [zero_point] * int(np.prod(scale_shape))))
        dq_inputs.append("zp")
    nodes.append(helper.make_node("DequantizeLinear", dq_inputs, ["w_dq"], name="dq", axis=axis, block_size=block))
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x", "w_dq"], ["y"], name="mm"))
    else:
        nodes.append(helper.make_node("Add", ["w_dq", "w_dq"], ["y"], name="add"))
    shape = [2, N] if consumer == "MatMul" else [K, N]
    return _model(nodes, initializers, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])


def fp8_qdq(scale_dynamic=False, fp8_type=TensorProto.FLOAT8E4M3FN):
    """x → QuantizeLinear(fp8) → DequantizeLinear → MatMul(w): FP8 activation quantization with a constant scale."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w")
    zp = helper.make_tensor("zp", fp8_type, [], [0.0])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])]
    initializers = [w, zp]
    nodes = []
    if scale_dynamic:
        nodes.append(helper.make_node("ReduceMax", ["x"], ["scale"], name="amax", keepdims=0))
    else:
        initializers.append(numpy_helper.from_array(np.array(0.05, np.float32), "scale"))
    nodes += [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["xq"], name="q"),
              helper.make_node("DequantizeLinear", ["xq", "scale"], ["xdq"], name="dq"),
              helper.make_node("MatMul", ["xdq", "w"], ["y"], name="mm")]
    return _model(nodes, initializers, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])])


def plugin_graph(drop_attribute=None, int4_gate_up_axis=None, **overrides):
    """One Llama4MoEPlugin node as the tensorrt lowering writes it (trt_plugin_spec); int4_gate_up_axis: gate_up comes
    from the quantization stage's expert form, Transpose(DequantizeLinear(INT4 [E, 2I, H], axis)), perm (0, 2, 1)."""
    rng = np.random.default_rng(0)
    e, h, i = 4, 64, 8
    shapes = {"router": (e, h), "gate_up": (e, h, 2 * i), "down": (e, i, h), "shared_gate": (i, h), "shared_up": (i, h),
              "shared_down": (h, i)}
    initializers = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in shapes.items()
                    if n != "gate_up" or int4_gate_up_axis is None]
    nodes = []
    if int4_gate_up_axis is not None:
        scale_shape = [e, 2 * i, h // BLOCK] if int4_gate_up_axis == 2 else [e, 2 * i // 8, h]
        initializers += [helper.make_tensor("gate_up.int4", TensorProto.INT4, [e, 2 * i, h], [1] * (e * 2 * i * h)),
                         numpy_helper.from_array(np.ones(scale_shape, np.float32), "gate_up.int4_scale")]
        nodes += [helper.make_node("DequantizeLinear", ["gate_up.int4", "gate_up.int4_scale"], ["gate_up_nk"],
                                   name="gate_up.dequantize", axis=int4_gate_up_axis,
                                   block_size=BLOCK if int4_gate_up_axis == 2 else 8),
                  helper.make_node("Transpose", ["gate_up_nk"], ["gate_up"], name="gate_up.transpose", perm=[0, 2, 1])]
    attrs = {"num_experts": e, "top_k": 1, "activation": "swiglu", "plugin_version": trt_plugin_spec.PLUGIN_VERSION,
             "plugin_namespace": trt_plugin_spec.PLUGIN_NAMESPACE, **overrides}
    attrs.pop(drop_attribute, None)
    node = helper.make_node(trt_plugin_spec.PLUGIN_NAME, ["x", *shapes], ["y"], name="moe",
                            domain=trt_plugin_spec.PLUGIN_DOMAIN, **attrs)
    return _model([*nodes, node], initializers, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", h])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", h])],
                  extra_opsets=[helper.make_opsetid(trt_plugin_spec.PLUGIN_DOMAIN, 1)])


def messages(model) -> list[str]:
    onnx.checker.check_model(model)  # the hand-built graphs are valid ONNX: only TensorRT conformance is at stake
    return [v.format() for v in lint_model(model)]


def test_conforming_int4_fp8_and_plugin_graphs_pass():
    assert messages(int4_matmul()) == []
    assert messages(int4_matmul(zero_point=0)) == []  # an all-zero zero point is symmetric too
    assert messages(fp8_qdq()) == []
    assert messages(plugin_graph()) == []
    assert messages(plugin_graph(int4_gate_up_axis=2)) == []  # blocks along H, the axis the expert reduces over


def test_int4_expert_blocks_must_follow_the_plugins_reduction_axis():
    found = messages(plugin_graph(int4_gate_up_axis=1))
    assert found == ["[int4] node 'gate_up.dequantize' (DequantizeLinear): axis=1 but Transpose node 'gate_up.transpose' "
                     "reduces over axis 2 of 'gate_up.int4'; block-quantize along the reduction axis"]


def test_dynamic_int4_scale_is_reported():
    found = messages(int4_matmul(scale_dynamic=True))
    assert found == ["[int4] node 'dq' (DequantizeLinear): input 1 'scale' (computed by Abs node 'scale_from_input') "
                     "must be a build-time constant (an initializer) for TensorRT"]


def test_int4_block_axis_zero_point_and_consumer_are_checked():
    wrong_axis = messages(int4_matmul(axis=1))
    assert any("axis=1 but MatMul node 'mm' reduces over axis 0 of 'w'" in m for m in wrong_axis), wrong_axis
    nonzero = messages(int4_matmul(zero_point=3))
    assert nonzero == ["[int4] node 'dq' (DequantizeLinear): zero point 'zp' is not 0; TensorRT supports symmetric "
                       "quantization only (drop the zero point or make it 0)"]
    unsigned = messages(int4_matmul(weight_type=TensorProto.UINT4))
    assert any("is UINT4; TensorRT takes signed INT4" in m for m in unsigned), unsigned
    not_matmul = messages(int4_matmul(consumer="Add"))
    assert any("feeds Add node 'add'; INT4 DequantizeLinear must feed the weight input of a MatMul, Gemm or the MoE plugin" in m
               for m in not_matmul), not_matmul


def test_dynamic_fp8_scale_and_e5m2_are_reported():
    dynamic = messages(fp8_qdq(scale_dynamic=True))
    assert "[fp8] node 'q' (QuantizeLinear): input 1 'scale' (computed by ReduceMax node 'amax') must be a build-time " \
           "constant (an initializer) for TensorRT" in dynamic
    e5m2 = messages(fp8_qdq(fp8_type=TensorProto.FLOAT8E5M2))
    assert any("'zp' is FLOAT8E5M2; TensorRT's FP8 is float8e4m3fn" in m for m in e5m2), e5m2


def test_unsupported_op_is_reported_with_the_tensorrt_version():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = _model([helper.make_node("Hardmax", ["x"], ["h"], name="ok"),
                    helper.make_node("Det", ["h"], ["d"], name="det"), helper.make_node("Identity", ["h"], ["y"])],
                   [], [x], [y])
    found = messages(model)
    assert found == [f"[op] node 'det' (Det): Det is not supported by TensorRT {trt_onnx_support.TENSORRT_VERSION}'s "
                     f"ONNX parser ({trt_onnx_support.SOURCE}); rewrite it with supported ops"]


def test_foreign_domain_op_and_double_are_reported():
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = _model([helper.make_node("Cast", ["x"], ["c"], name="cast", to=TensorProto.FLOAT),
                    helper.make_node("SimplifiedLayerNormalization", ["c", "c"], ["y"], name="ort_norm",
                                     domain="com.microsoft")],
                   [], [x], [y], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    found = lint_model(model)
    assert [v.rule for v in found] == ["type", "op", "op"]
    assert "tensor 'x' is DOUBLE, which TensorRT does not support" in found[0].message
    assert found[1].message == "input 'x' is DOUBLE, but TensorRT's Cast takes FP32, FP16, BF16, INT32, INT64, UINT8, BOOL"
    assert found[2].message.startswith("com.microsoft::SimplifiedLayerNormalization is not an ONNX op TensorRT parses")


def test_plugin_attribute_missing_or_wrong_is_reported():
    assert messages(plugin_graph(drop_attribute="num_experts")) == [
        f"[plugin] node 'moe' ({trt_plugin_spec.PLUGIN_NAME}): attribute 'num_experts' is missing; the registered plugin "
        f"{trt_plugin_spec.PLUGIN_NAMESPACE}::{trt_plugin_spec.PLUGIN_NAME} requires int num_experts"]
    assert messages(plugin_graph(plugin_namespace="other")) == [
        f"[plugin] node 'moe' ({trt_plugin_spec.PLUGIN_NAME}): attribute plugin_namespace is 'other', the registered "
        f"plugin has '{trt_plugin_spec.PLUGIN_NAMESPACE}'; TensorRT would not find the plugin"]
    assert any("num_experts=5 but router 'router' has 4 rows" in m for m in messages(plugin_graph(num_experts=5)))
    assert any("attribute 'alpha' is not declared" in m for m in messages(plugin_graph(alpha=1.0)))


def test_mixed_precision_without_cast_is_reported():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"], name="add")], "g", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    found = lint_model(model)  # not check_model: ONNX itself rejects this graph, TensorRT would too
    assert [v.format() for v in found] == ["[type] node 'add' (Add): mixes precisions (a FLOAT, b FLOAT16, y FLOAT); "
                                           "a strongly typed network needs an explicit Cast"]


def test_the_lint_checks_the_plugin_as_registered():
    """The attributes the plugin registers with TensorRT are the ones the graph passes write."""
    assert plugin_attribute_types() == trt_plugin_spec.PLUGIN_FIELDS


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "RMSNormalization", "RotaryEmbedding", "DequantizeLinear", "GatherND"])
def test_the_table_holds_the_ops_our_graphs_use(op):
    assert op in trt_onnx_support.OPERATORS
