"""INT4 vs fp32 decode speed on ONNX Runtime CPU for a ~100M-parameter random Llama 4 config.

    python benchmarks/int4_speed.py [--work-dir /tmp/int4_speed] [--steps 64] [--threads 2]

Saves the random model as a checkpoint, exports it at fp32 and at int4 (RTN, block 128: the speed does not depend on
the algorithm), then times the decode graph for --steps tokens after a 32-token prefill, with the runtime's cache.
Prints both times per token and the ratio. The INT4 session holds the weights as MatMulNBits / GatherBlockQuantized.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from llama4_export.export import ModelSource, export_artifact
from llama4_export.export.pipeline import QuantOptions, export_quantized
from llama4_export.graph_passes import optimize_artifact
from llama4_export.model.config import _every, _moe_layers, get_preset
from llama4_export.model.loader import from_config
from llama4_export.model.save import save_checkpoint
from llama4_export.runtime.generator import Generator


def config_100m():
    """5 layers, hidden 768, 4 routed experts + shared expert of 1536, vocab 8192: ~110M parameters, ~45M active."""
    return dataclasses.replace(
        get_preset("scout-tiny"), vocab_size=8192, hidden_size=768, intermediate_size=1536, intermediate_size_mlp=3072,
        num_hidden_layers=5, num_attention_heads=12, num_key_value_heads=4, head_dim=64, attention_chunk_size=256,
        no_rope_layers=_every(5, 4), moe_layers=_moe_layers(5, 1), name="bench-100m",
        bos_token_id=256, eos_token_id=(257,), pad_token_id=258,
    )


def decode_seconds_per_token(artifact: Path, steps: int, threads: int) -> float:
    generator = Generator.load(artifact, threads=threads, verify=False)
    backend = generator.backend
    cache = generator._cache_for(1)
    prompt = np.arange(300, 332, dtype=np.int64)[None]
    out = backend.forward(prompt, np.arange(32, dtype=np.int64)[None], cache)
    cache.update(np.arange(32, dtype=np.int64)[None], out.new_keys, out.new_values)
    token = np.array([[int(out.logits[0, -1].argmax())]], dtype=np.int64)
    times = []
    for step in range(steps):
        position = np.array([[32 + step]], dtype=np.int64)
        start = time.perf_counter()
        out = backend.forward(token, position, cache)
        times.append(time.perf_counter() - start)
        cache.update(position, out.new_keys, out.new_values)
        token = np.array([[int(out.logits[0, -1].argmax())]], dtype=np.int64)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/int4_speed"))
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    config = config_100m()
    checkpoint = args.work_dir / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        model = from_config(config, seed=0)
        print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M")
        save_checkpoint(model, checkpoint, dtype=torch.float32)
        del model
    source = ModelSource(checkpoint=checkpoint)
    fp32, int4 = args.work_dir / "fp32", args.work_dir / "int4"
    if not (fp32 / "manifest.json").is_file():
        export_artifact(fp32, source)
        optimize_artifact(fp32, "onnxruntime")
    if not (int4 / "manifest.json").is_file():
        export_quantized(int4, source, "int4", QuantOptions(int4_algo="rtn", report=False), "onnxruntime")
    t_fp32 = decode_seconds_per_token(fp32, args.steps, args.threads)
    t_int4 = decode_seconds_per_token(int4, args.steps, args.threads)
    size = {p.name: sum(f.stat().st_size for f in p.iterdir()) / 1e6 for p in (fp32, int4)}
    print(f"decode, median of {args.steps} steps, {args.threads} threads: fp32 {t_fp32 * 1e3:.2f} ms/token "
          f"({size['fp32']:.0f} MB artifact), int4 {t_int4 * 1e3:.2f} ms/token ({size['int4']:.0f} MB); "
          f"int4 is {t_fp32 / t_int4:.2f}x faster")


if __name__ == "__main__":
    main()
