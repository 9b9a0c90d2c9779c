"""Quantization passes on ONNX Runtime vs numpy references: INT4 blockwise numerics (vs kernels/formats.py), the
DQ→MatMul form ORT fuses into MatMulNBits, INT4 experts as per-expert MatMulNBits vs moe_reference, FP8 Q/DQ."""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from llama4_export.graph_passes import lower, ops
from llama4_export.graph_passes.canonicalize import eliminate_dead_code
from llama4_export.graph_passes.lower import (FLOAT_EXPERTS_LOWERING, IF_PER_EXPERT_MAX, INT4_EXPERTS_LOWERING,
                                              QMOE_LOWERING, lower_moe, lower_routed_experts)
from llama4_export.graph_passes.lower_linears import lower_quantized_linears
from llama4_export.graph_passes.manager import PassContext
from llama4_export.graph_passes.moe_reference import llama4_moe
from llama4_export.graph_passes.quantize import (QuantSpec, fp8_quantize, int4_blockwise, int4_dequantize,
                                                 quantize_experts, quantize_linears)
from llama4_export.graph_passes.verify import executable_copy, reference_ops_available
from llama4_export.kernels.formats import quantize_int4

from .conftest import random_moe_weights


@pytest.mark.parametrize("block", [32, 64, 128])
def test_int4_blockwise_matches_the_kernel_format(block):
    w = np.random.default_rng(block).standard_normal((2, 256, 48)).astype(np.float32)  # [E, K, N]
    q, scale = int4_blockwise(w, block, axis=1)
    assert q.min() >= -7 and q.max() <= 7 and scale.shape == (2, 256 // block, 48)
    ours = int4_dequantize(q, scale, block, axis=1)
    theirs = quantize_int4(torch.from_numpy(w), block, scale_dtype=torch.float32).dequantize().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    assert np.abs(ours - w).max() <= np.abs(w).max() / 7 / 2 * 1.0001  # half a step of the largest block


def _session(model: ir.Model, path, exact: bool = True):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # fp32 activations in MatMulNBits
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _linear_model(w_nk: np.ndarray, form: str) -> ir.Model:
    """y = x @ Wᵀ as the exporter writes it: Gemm(transB=1) or Transpose(W) → MatMul."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["n", w_nk.shape[1]]))
    w = ir.Value(name="model.layers.0.self_attn.q_proj.weight", type=ir.TensorType(ir.DataType.FLOAT),
                 shape=ir.Shape(w_nk.shape), const_value=ir.tensor(w_nk))
    if form == "gemm":
        nodes = [ir.Node("", "Gemm", [x, w], attributes=[ir.AttrInt64("transB", 1)])]
    else:
        t = ir.Node("", "Transpose", [w], attributes=[ir.AttrInt64s("perm", [1, 0])])
        nodes = [t, ir.Node("", "MatMul", [x, t.outputs[0]])]
    y = nodes[-1].outputs[0]
    y.name, y.type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [y], nodes=nodes, initializers=[w], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("form", ["gemm", "transpose"])
def test_int4_linear_runs_as_matmulnbits_with_the_quantized_values(tmp_path, form):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    model = _linear_model(w, form)
    assert quantize_linears(model, PassContext("onnxruntime", "gather", quantization=QuantSpec("int4", 64))) == 1
    session = _session(model, tmp_path / "opt.onnx")
    q, scale = int4_blockwise(w.T, 64, axis=0)
    expected = x @ int4_dequantize(q, scale, 64, axis=0)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
    ops_after = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops_after["MatMulNBits"] == 1 and ops_after["DequantizeLinear"] == 0


def test_fp8_linear_quantizes_weights_and_inputs(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    model = _linear_model(w, "gemm")
    amax = float(np.abs(x).max())
    spec = QuantSpec("fp8", activation_amax={"model.layers.0.self_attn.q_proj.weight": amax})
    quantize_linears(model, PassContext("onnxruntime", "gather", quantization=spec))
    got = _session(model, tmp_path / "opt.onnx").run(None, {"x": x})[0]

    def fp8(a, s):  # independent E4M3 round trip through ml_dtypes
        return (a / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s

    expected = fp8(x, amax / 448) @ fp8(w, np.abs(w).max() / 448).T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got - x @ w.T).max() / np.abs(x @ w.T).max() < 0.1


@pytest.mark.parametrize("amax", [1e-44, 1.57e-42, 1e-39])
def test_fp8_weights_of_subnormal_magnitude_dequantize_finite(amax):
    """A weight whose amax / 448 is 0 (scale not replaced: amax isn't 0) or a subnormal rounded down by up to half its
    value was divided to inf or past 448, which E4M3 (no inf) stores as NaN: the linear then computed NaN."""
    w = (np.linspace(-1, 1, 64, dtype=np.float32) * np.float32(amax)).reshape(8, 8)
    q, scale = fp8_quantize(w)
    deq = q.astype(np.float32).astype(np.float64) * np.float64(scale)  # ml_dtypes' E4M3 decoding
    assert np.isfinite(deq).all() and scale > 0
    assert np.all(np.abs(deq - w) <= np.abs(w))  # never worse than 0, never the wrong sign


@pytest.mark.parametrize("amax", [0.0, 1e-6])
def test_fp8_input_scale_of_a_tiny_calibrated_amax_is_not_zero_in_fp16(amax):
    """An fp16 graph (TensorRT's) stored amax / 448 for an amax under ~1e-5 (0: a linear whose calibration input was
    all zeros) as a zero scale: QuantizeLinear's 0 / 0 made the linear's output NaN."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 16)).astype(np.float16)
    x = (rng.uniform(-1, 1, (3, 16)) * amax).astype(np.float16)
    model = _linear_model(w, "gemm")
    model.graph.inputs[0].type = model.graph.outputs[0].type = ir.TensorType(ir.DataType.FLOAT16)
    spec = QuantSpec("fp8", activation_amax={"model.layers.0.self_attn.q_proj.weight": amax})
    quantize_linears(model, PassContext("tensorrt", "gather", quantization=spec))
    got = run_plain(model, {"x": x}).astype(np.float64)
    expected = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=max(0.15 * np.abs(expected).max(), 1e-7))


@pytest.mark.parametrize("squeeze", ["axis 0", "every unit axis"])
def test_lower_quantized_linears_drops_only_the_unit_axis_quantize_linears_added(squeeze):
    """MatMul(Unsqueeze(x, 0), DequantizeLinear(W int4)) → Squeeze(·, 0) becomes one MatMulNBits on x, against numpy.
    A Squeeze without axes removes every unit axis, the row axis of a one-row x too: it was dropped all the same, and
    y came out [1, N] where the graph says [N]."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    model = _linear_model(w, "gemm")
    assert quantize_linears(model, PassContext("onnxruntime", "gather", quantization=QuantSpec("int4", 64))) == 1
    (squeeze_node,) = [n for n in model.graph if n.op_type == "Squeeze"]
    if squeeze == "every unit axis":
        squeeze_node.resize_inputs(1)
        model.graph.outputs[0].shape = ir.Shape([96])
    expected = run_plain(model, {"x": x})
    assert lower_quantized_linears(model, PassContext("onnxruntime", "gather")) == 1
    counts = collections.Counter(n.op_type for n in model.graph)
    assert counts["MatMulNBits"] == 1 and counts["MatMul"] == counts["DequantizeLinear"] == 0
    assert counts["Squeeze"] == counts["Unsqueeze"] == (0 if squeeze == "axis 0" else 1)
    got = run_plain(model, {"x": x})
    q, scale = int4_blockwise(w.T, 64, axis=0)
    reference = x @ int4_dequantize(q, scale, 64, axis=0)
    assert got.shape == expected.shape == (reference.shape if squeeze == "axis 0" else (96,))
    # MatMulNBits' accuracy level 4 quantizes x to int8 per block
    assert np.abs(got - expected).max() / np.abs(expected).max() < 2e-2
    assert np.abs(got.reshape(reference.shape) - reference).max() / np.abs(reference).max() < 2e-2


def run_plain(model: ir.Model, feeds: dict) -> np.ndarray:
    """The model's first output on ONNX Runtime CPU, as the graph computes it (no ORT graph rewrites)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _int4_expert_model(rng, block: int, experts: int = 4, inter: int = 96):
    weights = random_moe_weights(rng, experts=experts, hidden=64, inter=inter, gate_up_scale=0.3, scale=0.3)
    model = ops.moe_node_model(weights, None)
    for name in ("gate_up", "down"):  # the names the fused graph gives expert weights
        model.graph.initializers[name].name = f"model.layers.0.feed_forward.experts.{name}_proj"
    assert quantize_experts(model, PassContext("onnxruntime", "gather", quantization=QuantSpec("int4", block))) == 2
    dequantized = dict(weights)
    for name in ("gate_up", "down"):
        q, scale = int4_blockwise(weights[name], block, axis=1)
        dequantized[name] = int4_dequantize(q, scale, block, axis=1)
    return model, dequantized


@pytest.mark.parametrize("tokens", [1, 9])
def test_many_int4_experts_on_onnxruntime_are_one_qmoe_node_and_match_the_reference(tmp_path, tokens):
    """Beyond IF_PER_EXPERT_MAX experts (Maverick's 128) the INT4 experts become one com.microsoft.QMoE node (4-bit in
    memory), exact against the numpy reference on the dequantized weights: the layout, the gate/up interleaving, the
    routing."""
    rng = np.random.default_rng(3)
    model, dequantized = _int4_expert_model(rng, 32, experts=IF_PER_EXPERT_MAX + 4)
    context = PassContext("onnxruntime", "gather", quantization=QuantSpec("int4", 32))
    lower_moe(model, context)
    assert context.moe_lowering == QMOE_LOWERING
    eliminate_dead_code(model, PassContext("onnxruntime", "gather"))
    x = rng.standard_normal((tokens, 64)).astype(np.float32)
    got = _session(model, tmp_path / "opt.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(got, llama4_moe(x, **dequantized), rtol=1e-4, atol=1e-4)
    counts = collections.Counter(n.op_type for n in model.graph.all_nodes())
    assert counts["QMoE"] == 1 and counts["If"] == 0 and counts["DequantizeLinear"] == 0


def test_many_int4_experts_whose_linears_need_different_blocks_stay_one_if_per_expert(tmp_path):
    """QMoE takes one block size: with block 128, gate/up (K = 64, shorter than a block) is one block of 64 while down
    (K = 256) has blocks of 128, so even beyond IF_PER_EXPERT_MAX the experts stay per-expert Ifs, and match."""
    rng = np.random.default_rng(4)
    model, dequantized = _int4_expert_model(rng, 128, experts=IF_PER_EXPERT_MAX + 4, inter=256)
    context = PassContext("onnxruntime", "gather", quantization=QuantSpec("int4", 128))
    assert lower_routed_experts(model, accuracy_level=0) == {INT4_EXPERTS_LOWERING: 1, FLOAT_EXPERTS_LOWERING: 0,
                                                              QMOE_LOWERING: 0}
    eliminate_dead_code(model, context)
    x = rng.standard_normal((9, 64)).astype(np.float32)
    got = _session(model, tmp_path / "opt.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(got, llama4_moe(x, **dequantized), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("accuracy_level", [0, None])
def test_int4_experts_on_onnxruntime_are_one_if_per_expert_and_match_the_reference(tmp_path, tokens, accuracy_level):
    """lower_moe on ONNX Runtime: the INT4 experts become one If per expert over two MatMulNBits (4-bit in memory, only
    the chosen experts computed), against the numpy reference on the dequantized weights: exact with fp32 compute
    (accuracy level 0: the layout, the gate/up split, the routing, the scatter-add), within int8-activation rounding
    at the linears' default level."""
    rng = np.random.default_rng(2)
    model, dequantized = _int4_expert_model(rng, 32)
    context = PassContext("onnxruntime", "gather", quantization=QuantSpec("int4", 32))
    if accuracy_level is None:
        lower_moe(model, context)
        assert context.moe_lowering == INT4_EXPERTS_LOWERING
    else:
        assert lower_routed_experts(model, accuracy_level=accuracy_level)[INT4_EXPERTS_LOWERING] == 1
    eliminate_dead_code(model, PassContext("onnxruntime", "gather"))
    x = rng.standard_normal((tokens, 64)).astype(np.float32)
    got = _session(model, tmp_path / "opt.onnx").run(None, {"x": x})[0]
    expected = llama4_moe(x, **dequantized)
    if accuracy_level == 0:
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    else:
        assert np.abs(got - expected).max() / np.abs(expected).max() < 2e-2
    counts = collections.Counter(n.op_type for n in model.graph.all_nodes())
    assert counts["If"] == 4 and counts["MatMulNBits"] == 2 * 4 and counts["DequantizeLinear"] == 0
    assert counts["QMoE"] == 0 and counts["MatMul"] == 0  # no expert as an fp32 MatMul
    # only 4-bit expert weights are left (fp32 tensors are their block scales), no INT4 DQ input
    initializers = model.graph.initializers.values()
    assert all(v.const_value.dtype in (ir.DataType.UINT8, ir.DataType.INT64) or v.name.endswith("_scale")
               or v.name in ("router", "shared_gate", "shared_up", "shared_down") for v in initializers)
    assert all(v.const_value.dtype != ir.DataType.INT4 for v in initializers)


@pytest.mark.parametrize("precision", ["int4", "fp8"])
def test_the_tensorrt_plugin_reads_the_shared_expert_quantized_like_every_linear(precision):
    """On the tensorrt lowering the shared expert's weights are plugin inputs, not Gemms: quantize_linears gives them
    Transpose ∘ DequantizeLinear as the routed experts have, and the plugin (run by its numpy reference) matches
    llama4_moe on the dequantized weights. They stayed 16-bit there: a third of Scout's active weights."""
    if not reference_ops_available():
        pytest.skip("onnxruntime-extensions (dev dependency) is needed to run the plugin through its reference")
    rng = np.random.default_rng(8)
    weights = random_moe_weights(rng, experts=4, hidden=64, inter=96, gate_up_scale=0.3, scale=0.3)
    model = ops.moe_node_model(weights, None)
    names = {"gate_up": "experts.gate_up_proj", "down": "experts.down_proj", "shared_gate": "shared_expert.gate_proj.weight",
             "shared_up": "shared_expert.up_proj.weight", "shared_down": "shared_expert.down_proj.weight"}
    for short, name in names.items():  # the names the fused graph gives them
        model.graph.initializers[short].name = f"model.layers.0.feed_forward.{name}"
    context = PassContext("tensorrt", "gather", quantization=QuantSpec(precision, 32))
    assert quantize_experts(model, context) == 2
    assert lower._lower(model, "trt_plugin") == 1
    assert quantize_linears(model, context) == 3
    eliminate_dead_code(model, context)
    counts = collections.Counter(n.op_type for n in model.graph.all_nodes())
    assert counts["DequantizeLinear"] == 5 and counts["Transpose"] == 3 + (2 if precision == "int4" else 0)
    floats = {v.name for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.FLOAT}
    assert {n for n in floats if not n.endswith("_scale")} == {"router"}

    def fp8(w: np.ndarray) -> np.ndarray:  # E4M3 round trip with the tensor's amax / 448 (ml_dtypes)
        scale = np.abs(w).max() / 448
        return (w / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale

    dequantized = dict(weights)
    for name in names:
        w = weights[name]
        if precision == "fp8":
            dequantized[name] = np.stack([fp8(e) for e in w]) if w.ndim == 3 else fp8(w)
        else:  # blocks along K: axis 1 of the experts' [E, K, N] and of nn.Linear's [N, K]
            dequantized[name] = int4_dequantize(*int4_blockwise(w, 32, axis=1), 32, axis=1)
    runnable, library = executable_copy(model)
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    session = ort.InferenceSession(ir.to_proto(runnable).SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((9, 64)).astype(np.float32)
    expected = llama4_moe(x, **dequantized)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(llama4_moe(x, **{**dequantized, "shared_gate": weights["shared_gate"]}) - expected).max() > 1e-3


def test_same_inputs_give_byte_identical_int4_artifacts_and_the_second_build_reuses_the_calibration(tmp_path):
    from llama4_export import api

    options = api.QuantOptions("awq", 32, None, 4, 32, tmp_path / "calib.safetensors", report=False)
    export = dict(model="scout-tiny", precision="int4", target="onnxruntime", quant=options, show_progress=False)
    first = api.export_model(tmp_path / "a", **export).calibration
    cache_bytes = (tmp_path / "calib.safetensors").read_bytes()
    second = api.export_model(tmp_path / "b", **export).calibration
    assert not first.reused and second.reused and second.seconds < first.seconds
    assert (tmp_path / "calib.safetensors").read_bytes() == cache_bytes
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and "model.data" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
