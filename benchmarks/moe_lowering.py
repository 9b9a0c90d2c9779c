"""Routed experts on ONNX Runtime: one If per expert vs one fused node, by number of experts and of tokens in the
call — the measurement behind graph_passes/lower.py's IF_PER_EXPERT_MAX and its float32 lowering.

    python benchmarks/moe_lowering.py [--experts 8 16 128] [--tokens 1 8 64] [--hidden 768] [--inter 1024] [--threads 2]
    python benchmarks/moe_lowering.py --precision fp32 --tokens 1 8 256

One MoE layer's routed experts (the shared expert is one zero row wide, so it costs next to nothing), rand200m's expert
shape by default. int4 (random INT4 weights, block 128): "If" one If per expert over two MatMulNBits vs "fused" one
com.microsoft.QMoE node (k = 1, interleaved SwiGLU). fp32: "If" one If per expert over two MatMuls vs "fused" one
com.microsoft.MoE node. Every form is graph_passes/lower.py's lowering (lower_routed_experts with max_if_experts
forcing the form at every E, or the MoE op's rule; then dead-code elimination), as the exporter builds them on either
side of IF_PER_EXPERT_MAX. Each is checked against the numpy reference first; then each call is timed, median of
--runs after warm-up. Tokens 1 is a decode step, 8 a batch of 8 decoding sequences, 64 or 256 a prefill piece.
"""

from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from llama4_export.graph_passes import ops
from llama4_export.graph_passes.canonicalize import eliminate_dead_code
from llama4_export.graph_passes.lower import (FLOAT_EXPERTS_LOWERING, INT4_EXPERTS_LOWERING, QMOE_LOWERING,
                                              lower_moe_standard, lower_routed_experts)
from llama4_export.graph_passes.manager import PassContext
from llama4_export.graph_passes.moe_reference import llama4_moe
from llama4_export.graph_passes.quantize import QuantSpec, int4_blockwise, int4_dequantize, quantize_experts

from common import ArgumentParser, positive_int, print_machine, run_script, summary  # benchmarks/, beside this script

BLOCK = 128
FUSED_FLOAT = "com.microsoft.MoE"
# per precision: (the fused node's form, the per-expert If form, the reference check's bound on max|error| / max|out|)
FORMS = {"int4": (QMOE_LOWERING, INT4_EXPERTS_LOWERING, 3e-2),  # the Ifs' MatMulNBits round activations to int8
         "fp32": (FUSED_FLOAT, FLOAT_EXPERTS_LOWERING, 1e-5)}


def session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def lowered(weights: dict, form: str) -> bytes:
    """The MoE layer through the exporter's expert passes, in `form` whatever the number of experts."""
    model = ops.moe_node_model(weights, None)
    for name in ("gate_up", "down"):  # the names the fused graph gives expert weights
        model.graph.initializers[name].name = f"model.layers.0.feed_forward.experts.{name}_proj"
    context = PassContext("onnxruntime", "gather", quantization=QuantSpec("int4", BLOCK))
    if form in (INT4_EXPERTS_LOWERING, QMOE_LOWERING):
        quantize_experts(model, context)
    experts = len(weights["router"])
    if form == FUSED_FLOAT:
        done = lower_moe_standard(model, "ort_moe") == 1
    else:
        done = lower_routed_experts(model, max_if_experts=0 if form == QMOE_LOWERING else experts)[form] == 1
    if not done:
        raise SystemExit(f"the experts were not lowered to {form} (QMoE: does this onnxruntime's match the reference?)")
    eliminate_dead_code(model, context)  # the stacked experts the lowering replaced
    return ir.to_proto(model).SerializeToString()


def median_us(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int) -> float:
    """Median µs of one run, after 10 warm-up runs."""
    for _ in range(10):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("--experts", type=positive_int, nargs="+", default=[8, 16, 128],
                        help="routed expert counts E to measure (default %(default)s)")
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 8, 64],
                        help="tokens per call to measure (default %(default)s)")
    parser.add_argument("--hidden", type=positive_int, default=768,
                        help="hidden size, the experts' input width (default %(default)s: rand200m's)")
    parser.add_argument("--inter", type=positive_int, default=1024,
                        help="expert width, the intermediate size (default %(default)s: rand200m's)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="ONNX Runtime intra-op threads (default %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=200,
                        help="timed calls per form and shape; the median is reported (default %(default)s)")
    parser.add_argument("--precision", choices=sorted(FORMS), default="int4",
                        help="the experts' weights: int4 (MatMulNBits / QMoE) or fp32 (MatMul / MoE) (default "
                             "%(default)s)")
    args = parser.parse_args()
    if args.precision == "int4" and (args.hidden % BLOCK or args.inter % BLOCK):
        parser.error(f"--hidden {args.hidden} / --inter {args.inter}: int4 experts are quantized in blocks of {BLOCK}; "
                     f"give multiples of {BLOCK} (or --precision fp32)")
    fused_form, if_form, bound = FORMS[args.precision]
    print_machine(args.threads)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, hidden {args.hidden}, expert width {args.inter}, "
          f"{args.precision} experts{f' (block {BLOCK})' if args.precision == 'int4' else ''}; µs per call, median of {args.runs}")
    fused = fused_form.split()[0]
    print(f"{'experts':>7} {'tokens':>6} {fused:>9} {'If':>9} {fused + '/If':>9}")
    for experts in args.experts:
        rng = np.random.default_rng(experts)
        h, i = args.hidden, args.inter
        weights = {"router": rng.standard_normal((experts, h)), "gate_up": rng.standard_normal((experts, h, 2 * i)) * 0.05,
                   "down": rng.standard_normal((experts, i, h)) * 0.05,
                   "shared_gate": np.zeros((1, h)), "shared_up": np.zeros((1, h)), "shared_down": np.zeros((h, 1))}
        weights = {k: v.astype(np.float32) for k, v in weights.items()}
        reference_weights = dict(weights)
        for name in ("gate_up", "down") if args.precision == "int4" else ():  # [E, K, N] → blocks along K of [E, N, K]
            q, scale = int4_blockwise(weights[name].transpose(0, 2, 1), BLOCK, axis=2)
            reference_weights[name] = int4_dequantize(q, scale, BLOCK, axis=2).transpose(0, 2, 1)
        sessions = {fused: session(lowered(weights, fused_form), args.threads),
                    "If": session(lowered(weights, if_form), args.threads)}
        check = rng.standard_normal((9, h)).astype(np.float32)
        reference = llama4_moe(check, **reference_weights)
        for name, sess in sessions.items():
            error = np.abs(sess.run(None, {"x": check})[0] - reference).max() / np.abs(reference).max()
            if not error < bound:
                raise SystemExit(f"{name} differs from the reference by {error:.2g} × max|out| at E={experts}")
        for tokens in args.tokens:
            x = rng.standard_normal((tokens, h)).astype(np.float32)
            us = {name: median_us(sess, {"x": x}, args.runs) for name, sess in sessions.items()}
            print(f"{experts:>7} {tokens:>6} {us[fused]:>9.1f} {us['If']:>9.1f} {us[fused] / us['If']:>8.2f}×")


if __name__ == "__main__":
    run_script(main)
