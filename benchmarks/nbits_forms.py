"""One-row MatMulNBits (a decode step's matmul) in each form ONNX Runtime offers, at rand200m's weight shapes.

    python benchmarks/nbits_forms.py [--threads 2] [--hot-mb 8] [--cold-mb 64]

Forms: 4-bit weights in blocks of 128 (the export's default), 64 and 32, with int8 activations (accuracy_level 4)
and with fp32 activations (level 0); 8-bit weights in blocks of 128 (the default lm_head's form), level 4. Each form
and shape runs as one graph of distinct weights fed the same [1, 1, K] input: as many copies as make --hot-mb (they
stay in cache between runs) and as make --cold-mb (as much as the decode step's 65 MB of 4-bit weights; the
"in the graph" case). Reported: µs per call and the bytes each call reads (packed weights + fp32 scales) per µs,
median of 7 × 20 runs — to set against the machine's copy bandwidth, printed with the CPU flags.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from common import (  # benchmarks/, beside this script
    ArgumentParser, positive_float, positive_int, print_machine, run_script, summary)

# (K, N) of rand200m's decode matmuls: o_proj, fused q/k/v, an expert's (and the shared expert's) gate/up and down,
# the dense MLP's fused gate/up and down, lm_head
SHAPES = ((768, 768), (768, 1280), (768, 2048), (1024, 768), (768, 4096), (2048, 768), (768, 32000))
FORMS = ((4, 128, 4), (4, 64, 4), (4, 32, 4), (4, 128, 0), (8, 128, 4))  # (bits, block_size, accuracy_level)


def session(k: int, n: int, bits: int, block: int, accuracy: int, megabytes: float,
            threads: int) -> tuple[ort.InferenceSession, int, int]:
    """A graph of distinct random weights of one form, as many as make `megabytes`: (session, copies, bytes one
    call reads: its packed weight and fp32 scales)."""
    blocks = -(-k // block)
    rng = np.random.default_rng(0)

    def weight() -> list[np.ndarray]:
        return [rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8),
                rng.uniform(0.01, 0.02, n * blocks).astype(np.float32)]

    first = weight()
    size = sum(array.nbytes for array in first)
    copies = max(1, round(megabytes * 1e6 / size))
    nodes, weights = [], []
    for c in range(copies):
        packed, scales = first if c == 0 else weight()
        weights += [numpy_helper.from_array(packed, f"w{c}"), numpy_helper.from_array(scales, f"s{c}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"w{c}", f"s{c}"], [f"y{c}"], domain="com.microsoft", K=k,
                                      N=n, bits=bits, block_size=block, accuracy_level=accuracy))
    graph = helper.make_graph(nodes, "nbits_forms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, [1, 1, n]) for c in range(copies)],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options), copies, size


def us_per_call(sess: ort.InferenceSession, k: int, copies: int) -> float:
    binding = sess.io_binding()
    binding.bind_cpu_input("x", np.random.default_rng(1).standard_normal((1, 1, k), dtype=np.float32))
    for c in range(copies):
        binding.bind_output(f"y{c}")
    for _ in range(10):  # the first runs pre-pack the weights
        sess.run_with_iobinding(binding)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(20):
            sess.run_with_iobinding(binding)
        times.append((time.perf_counter() - start) / 20 / copies * 1e6)
    return float(np.median(times))


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="ONNX Runtime intra-op threads (default %(default)s)")
    parser.add_argument("--hot-mb", type=positive_float, default=8.0,
                        help="MB (10^6 bytes) of weight copies per graph that stay in cache between runs (default "
                             "%(default)s)")
    parser.add_argument("--cold-mb", type=positive_float, default=64.0,
                        help="MB (10^6 bytes) of weight copies per graph, beyond cache as in a decode step (default "
                             "%(default)s)")
    args = parser.parse_args()

    print_machine(args.threads)
    print(f"{args.threads} threads; µs per call (GB/s read)")
    print("K × N, working set | " + " | ".join(f"{bits}-bit b{block} a{level}" for bits, block, level in FORMS))
    for k, n in SHAPES:
        for label, megabytes in (("hot", args.hot_mb), ("cold", args.cold_mb)):
            cells = []
            for bits, block, level in FORMS:
                sess, copies, size = session(k, n, bits, block, level, megabytes, args.threads)
                us = us_per_call(sess, k, copies)
                cells.append(f"{us:7.1f} ({size / us / 1e3:5.1f})")
            print(f"{k} × {n}, {label} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    run_script(main)
