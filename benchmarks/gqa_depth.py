"""One decode step of ONNX Runtime's CPU GroupQueryAttention at several context depths, bound in place as the runtime
binds it (past and present K/V are one buffer), against the time one read of that K/V takes at copy bandwidth — and,
with --grouped, the same step in the form graph_passes/decode_attention.py gives it (each KV head's query heads as
tokens of one attention, the cache read once).

    python benchmarks/gqa_depth.py --depth 512 --depth 16384            # rand200m's global layers: 12 / 4 heads of 64
    python benchmarks/gqa_depth.py --grouped --depth 64 --depth 256 --depth 1024 --depth 16384
    python benchmarks/gqa_depth.py --dtype float16 --depth 16384

Why: the global layers' attention is what makes decode fall with depth (BENCHMARKS.md, "Why decode falls with depth");
this isolates the op from the rest of the step. Median of --runs calls after 5 warm-up calls.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from llama4_export.graph_passes.decode_attention import group_decode_queries
from llama4_export.graph_passes.manager import PassContext
from llama4_export.model import io_spec

from common import (  # benchmarks/, beside this script
    ArgumentParser, non_negative_int, positive_int, print_machine, run_script)


def gqa_model(heads: int, kv_heads: int, head_dim: int, dtype: str):
    """One GroupQueryAttention over a global-layer cache (io_spec's slot dimension, as the exporter names it)."""
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"],
                            ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=heads,
                            kv_num_heads=kv_heads, scale=head_dim ** -0.5)
    cache = [1, kv_heads, io_spec.SLOT_DIMS["global"], head_dim]
    graph = helper.make_graph([node], "gqa", [
        helper.make_tensor_value_info("q", elem, [1, 1, heads * head_dim]),
        helper.make_tensor_value_info("k", elem, [1, 1, kv_heads * head_dim]),
        helper.make_tensor_value_info("v", elem, [1, 1, kv_heads * head_dim]),
        helper.make_tensor_value_info("past_k", elem, cache), helper.make_tensor_value_info("past_v", elem, cache),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("out", elem, [1, 1, heads * head_dim]),
         helper.make_tensor_value_info("present_k", elem, cache), helper.make_tensor_value_info("present_v", elem, cache)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def session_of(model, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def grouped(model):
    """The model after the decode-attention pass."""
    rewritten = ir.from_proto(model)
    if group_decode_queries(rewritten, PassContext("onnxruntime", "gather")) != 1:
        raise SystemExit("the decode-attention pass did not rewrite the node")
    return ir.to_proto(rewritten)


def median_step_us(session: ort.InferenceSession, feeds: dict, past_k, past_v, runs: int) -> float:
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    binding.bind_ortvalue_input("past_k", past_k)
    binding.bind_ortvalue_input("past_v", past_v)
    binding.bind_output("out")
    binding.bind_ortvalue_output("present_k", past_k)  # in place, as the runtime binds the cache
    binding.bind_ortvalue_output("present_v", past_v)
    for _ in range(5):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=non_negative_int, action="append", help="past tokens (repeat); default 0, 512, 4096, 16384")
    parser.add_argument("--heads", type=positive_int, default=12)
    parser.add_argument("--kv-heads", type=positive_int, default=4)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--runs", type=positive_int, default=30)
    parser.add_argument("--grouped", action="store_true", help="also time the decode-attention pass's form")
    args = parser.parse_args()
    # ONNX Runtime's own limits, refused here rather than as its RuntimeError from the session
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}; each KV head serves a "
                     "whole group of query heads")
    if args.head_dim % 8:
        parser.error(f"--head-dim {args.head_dim}: ONNX Runtime's GroupQueryAttention takes a multiple of 8")
    depths = args.depth or [0, 512, 4096, 16384]
    model = gqa_model(args.heads, args.kv_heads, args.head_dim, args.dtype)
    sessions = {"GroupQueryAttention": session_of(model, args.threads)}
    if args.grouped:
        sessions["grouped"] = session_of(grouped(model), args.threads)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, args.heads * args.head_dim), dtype=np.float32).astype(args.dtype)
    kv = rng.standard_normal((1, 1, args.kv_heads * args.head_dim), dtype=np.float32).astype(args.dtype)
    bandwidth = print_machine(args.threads)
    print(f"{args.heads} query heads over {args.kv_heads} KV heads of {args.head_dim}, {args.dtype}, "
          f"{args.threads} threads")
    for depth in depths:
        # a buffer just past the depth, as the runtime's growing cache has (the grouped form's G − 1 scratch slots
        # included): the grouped form's cost also grows with the buffer's length
        shape = (1, args.kv_heads, depth + args.heads // args.kv_heads, args.head_dim)
        past_k, past_v = (ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape, dtype=np.float32).astype(args.dtype))
                          for _ in range(2))
        feeds = {"q": q, "k": kv, "v": kv, "seqlens_k": np.array([depth], np.int32),
                 "total": np.array(depth + 1, np.int32)}
        timed = "; ".join(f"{name} {median_step_us(session, feeds, past_k, past_v, args.runs):8.1f} µs"
                          for name, session in sessions.items())
        kv_bytes = 2 * args.kv_heads * (depth + 1) * args.head_dim * np.dtype(args.dtype).itemsize
        one_read_us = kv_bytes / (bandwidth * 1e9) * 1e6
        print(f"depth {depth:6d}: {timed}; one read of its {kv_bytes / 1e6:6.1f} MB of K/V at copy bandwidth "
              f"{one_read_us:7.1f} µs")


if __name__ == "__main__":
    run_script(main)
