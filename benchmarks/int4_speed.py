"""INT4 vs fp32 decode speed on ONNX Runtime CPU for a ~100M-parameter random Llama 4 config.

    python benchmarks/int4_speed.py [--work-dir /tmp/int4_speed] [--steps 64] [--threads 2]

Saves the random model as a checkpoint, exports it at fp32 and at int4 (RTN, block 128: the speed does not depend on
the algorithm), then times the decode graph for --steps tokens after a 32-token prefill, with the runtime's cache, the two
artifacts' steps interleaved. Prints the op counts of ONNX Runtime's optimized INT4 decode graph (the weights stay
4-bit: MatMulNBits, experts in per-expert If branches), both median times per token and the ratio.
"""

from __future__ import annotations

import collections
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from llama4_export import api
from llama4_export.model.config import _every, _moe_layers, get_preset
from llama4_export.weights import from_config
from llama4_export.model.save import save_checkpoint
from llama4_export.runtime.generator import Generator

from common import ArgumentParser, positive_int, print_machine, run_script, summary  # benchmarks/, beside this script


def config_100m():
    """5 layers, hidden 768, 4 routed experts + shared expert of 1536, vocab 8192: ~110M parameters, ~45M active."""
    return dataclasses.replace(
        get_preset("scout-tiny"), vocab_size=8192, hidden_size=768, intermediate_size=1536, intermediate_size_mlp=3072,
        num_hidden_layers=5, num_attention_heads=12, num_key_value_heads=4, head_dim=64, attention_chunk_size=256,
        no_rope_layers=_every(5, 4), moe_layers=_moe_layers(5, 1), name="bench-100m",
        bos_token_id=256, eos_token_id=(257,), pad_token_id=258,
    )


class Decoder:
    """One artifact's decode loop through the runtime's cache: prefill 32 tokens, then one timed step per call."""

    def __init__(self, artifact: Path, threads: int):
        generator = Generator.load(artifact, threads=threads, verify=False)
        self.backend, self.cache = generator.backend, generator._cache_for(1)
        prompt = np.arange(300, 332, dtype=np.int64)[None]
        self._advance(prompt, np.arange(32, dtype=np.int64)[None])
        self.times: list[float] = []

    def _advance(self, ids: np.ndarray, positions: np.ndarray) -> float:
        start = time.perf_counter()
        logits = self.backend.forward(ids, positions, self.cache)  # advances the cache
        elapsed = time.perf_counter() - start
        self.token, self.position = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64), int(positions[0, -1]) + 1
        return elapsed

    def step(self) -> None:
        self.times.append(self._advance(self.token, np.array([[self.position]], dtype=np.int64)))


def session_op_counts(graph: Path, threads: int) -> collections.Counter:
    """Op types of ONNX Runtime's optimized graph for `graph` (what the session executes), subgraphs included."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath, load_external_data=False)
    counts: collections.Counter = collections.Counter()
    pending = [model.graph]
    while pending:
        graph_proto = pending.pop()
        for node in graph_proto.node:
            counts[node.op_type] += 1
            pending.extend(attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH)
    return counts


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/int4_speed"),
                        help="where the random checkpoint and its two artifacts are written (default %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=64,
                        help="decode steps timed per artifact, interleaved (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="ONNX Runtime intra-op threads (default %(default)s)")
    args = parser.parse_args()
    print_machine(args.threads)
    config = config_100m()
    checkpoint = args.work_dir / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        model = from_config(config, seed=0)
        print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M")
        save_checkpoint(model, checkpoint, dtype=torch.float32)
        del model
    fp32, int4 = args.work_dir / "fp32", args.work_dir / "int4"
    if not (fp32 / "manifest.json").is_file():
        api.export_model(fp32, checkpoint=checkpoint, target="onnxruntime", quant=api.QuantOptions(report=False))
    if not (int4 / "manifest.json").is_file():
        api.export_model(int4, checkpoint=checkpoint, precision="int4", target="onnxruntime",
                         quant=api.QuantOptions(int4_algo="rtn", report=False))
    counts = session_op_counts(int4 / "decode.onnx", args.threads)
    print("int4 decode, ONNX Runtime session graph:", ", ".join(f"{op} {n}" for op, n in sorted(counts.items())
                                                              if op in ("MatMulNBits", "If", "DequantizeLinear", "MatMul", "Gemm")))
    decoders = {"fp32": Decoder(fp32, args.threads), "int4": Decoder(int4, args.threads)}
    for _ in range(args.steps):  # interleaved, so a change in machine load hits both alike
        for decoder in decoders.values():
            decoder.step()
    t_fp32, t_int4 = (float(np.median(decoders[name].times)) for name in ("fp32", "int4"))
    size = {p.name: sum(f.stat().st_size for f in p.iterdir()) / 1e6 for p in (fp32, int4)}
    print(f"decode, median of {args.steps} steps, {args.threads} threads: fp32 {t_fp32 * 1e3:.2f} ms/token "
          f"({size['fp32']:.0f} MB artifact), int4 {t_int4 * 1e3:.2f} ms/token ({size['int4']:.0f} MB); "
          f"int4 is {t_fp32 / t_int4:.2f}x faster")


if __name__ == "__main__":
    run_script(main)
