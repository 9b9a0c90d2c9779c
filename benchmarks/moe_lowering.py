"""INT4 routed experts on ONNX Runtime: one If per expert over two MatMulNBits vs one com.microsoft.QMoE node, by
number of experts and of tokens in the call — the measurement behind graph_passes/lower.py's IF_PER_EXPERT_MAX.

    python benchmarks/moe_lowering.py [--experts 8 16 128] [--tokens 1 8 64] [--hidden 768] [--inter 1024] [--threads 2]

One MoE layer's routed experts (the shared expert is one zero row wide, so it costs next to nothing), random INT4 weights (block 128), rand200m's
expert shape by default. "If" is graph_passes/lower.py's per-expert lowering (lower_int4_experts, here at every E, then dead-code
elimination); "QMoE" the same experts as one QMoE node (k = 1, interleaved SwiGLU, as lower.py builds it beyond
IF_PER_EXPERT_MAX experts). Both are checked against the numpy reference on the dequantized weights first; then
each call is timed, median of --runs after warm-up. Tokens 1 is a decode step, 8 a batch of 8 decoding sequences,
64 a prefill piece.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
import onnx_ir as ir

from llama4_export.graph_passes import ops
from llama4_export.graph_passes.canonicalize import eliminate_dead_code
from llama4_export.graph_passes import lower
from llama4_export.graph_passes.manager import PassContext
from llama4_export.graph_passes.moe_reference import llama4_moe
from llama4_export.graph_passes.quantize import QuantSpec, int4_blockwise, int4_dequantize, quantize_experts

BLOCK = 128


def session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def qmoe_model(router: np.ndarray, q: dict, scale: dict) -> bytes:
    """x → QMoE(x·sigmoid(max logit), logits): fc1 rows interleaved g0, u0, g1, u1, … as its fused SwiGLU reads them,
    nibbles q + 8 with the even element low."""
    experts, hidden = router.shape

    def packed(values: np.ndarray, interleave: bool) -> tuple[np.ndarray, np.ndarray]:  # [E, N, K] int8
        rows = values.shape[1]
        order = np.arange(rows).reshape(2, rows // 2).T.reshape(-1) if interleave else np.arange(rows)
        nibbles = (values[:, order].astype(np.int16) + 8).astype(np.uint8)
        return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), order

    w1, order = packed(q["gate_up"], True)
    w2, _ = packed(q["down"], False)
    initializers = [numpy_helper.from_array(a, n) for a, n in (
        (router, "router"), (w1, "w1"), (np.ascontiguousarray(scale["gate_up"][:, order]), "s1"), (w2, "w2"),
        (np.ascontiguousarray(scale["down"]), "s2"), (np.asarray([-1], np.int64), "axis"))]
    nodes = [helper.make_node("Gemm", ["x", "router"], ["logits"], transB=1),
             helper.make_node("ReduceMax", ["logits", "axis"], ["max"], keepdims=1),
             helper.make_node("Sigmoid", ["max"], ["score"]), helper.make_node("Mul", ["x", "score"], ["routed_in"]),
             helper.make_node("QMoE", ["routed_in", "logits", "w1", "s1", "", "w2", "s2"], ["y"], domain="com.microsoft",
                              k=1, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                              expert_weight_bits=4, block_size=BLOCK)]
    graph = helper.make_graph(nodes, "qmoe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", hidden])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10).SerializeToString()


def if_model(weights: dict) -> bytes:
    model = ops.moe_node_model(weights, None)
    for name in ("gate_up", "down"):  # the names the fused graph gives expert weights
        model.graph.initializers[name].name = f"model.layers.0.feed_forward.experts.{name}_proj"
    context = PassContext("onnxruntime", "gather", quantization=QuantSpec("int4", BLOCK))
    quantize_experts(model, context)
    lower.IF_PER_EXPERT_MAX = len(weights["router"])  # the per-expert Ifs at any number of experts
    lower.lower_int4_experts(model)
    eliminate_dead_code(model, context)  # the stacked INT4 experts the lowering replaced
    return ir.to_proto(model).SerializeToString()


def median_us(sess: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    for _ in range(10):
        sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 128])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--inter", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, hidden {args.hidden}, expert width {args.inter}, "
          f"INT4 block {BLOCK}; µs per call, median of {args.runs}")
    print(f"{'experts':>7} {'tokens':>6} {'QMoE':>9} {'If':>9} {'QMoE/If':>9}")
    for experts in args.experts:
        rng = np.random.default_rng(experts)
        h, i = args.hidden, args.inter
        weights = {"router": rng.standard_normal((experts, h)), "gate_up": rng.standard_normal((experts, h, 2 * i)) * 0.05,
                   "down": rng.standard_normal((experts, i, h)) * 0.05,
                   "shared_gate": np.zeros((1, h)), "shared_up": np.zeros((1, h)), "shared_down": np.zeros((h, 1))}
        weights = {k: v.astype(np.float32) for k, v in weights.items()}
        q, scale, dequantized = {}, {}, dict(weights)
        for name in ("gate_up", "down"):  # [E, K, N] checkpoint layout → blocks along K of [E, N, K]
            q[name], scale[name] = int4_blockwise(weights[name].transpose(0, 2, 1), BLOCK, axis=2)
            dequantized[name] = int4_dequantize(q[name], scale[name], BLOCK, axis=2).transpose(0, 2, 1)
        sessions = {"QMoE": session(qmoe_model(weights["router"], q, scale), args.threads),
                    "If": session(if_model(weights), args.threads)}
        check = rng.standard_normal((9, h)).astype(np.float32)
        reference = llama4_moe(check, **dequantized)
        for name, sess in sessions.items():  # int8 activations (the Ifs' MatMulNBits) round at the 1e-2 level
            error = np.abs(sess.run(None, {"x": check})[0] - reference).max() / np.abs(reference).max()
            if not error < 3e-2:
                raise SystemExit(f"{name} differs from the reference by {error:.2g} × max|out| at E={experts}")
        for tokens in args.tokens:
            x = rng.standard_normal((tokens, h)).astype(np.float32)
            us = {name: median_us(sess, x, args.runs) for name, sess in sessions.items()}
            print(f"{experts:>7} {tokens:>6} {us['QMoE']:>9.1f} {us['If']:>9.1f} {us['QMoE'] / us['If']:>8.2f}×")


if __name__ == "__main__":
    main()
