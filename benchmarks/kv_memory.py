"""Peak RSS while generating 10×W tokens vs 2×W with a small global window W: the sliding KV cache keeps it flat.

    python benchmarks/kv_memory.py                       # wide-KV random model, torch backend
    python benchmarks/kv_memory.py --artifact out/DIR    # an exported artifact on ONNX Runtime

Each length runs in its own subprocess so each peak (resource.getrusage ru_maxrss) is its own. The default model
has tiny weights but 128 KB of K/V per token (4 global layers × 16 KV heads × head_dim 256, fp32), so a cache that
grew with the sequence would add ~66 MB between the two runs at W = 64 — far above the noise of the ~300 MB baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests load this file by path
from common import ArgumentParser, check_child, existing_dir, non_negative_int, positive_int, run_script, summary  # noqa: E402


def wide_kv_config():
    from llama4_export.model import get_preset

    return get_preset("scout-tiny").replace(
        num_hidden_layers=5, no_rope_layers=(1, 0, 0, 0, 0), moe_layers=(0,), num_attention_heads=16,
        num_key_value_heads=16, head_dim=256, attention_chunk_size=32, name="wide-kv",
    )


def child(tokens: int, window: int, sinks: int, artifact: str | None) -> dict:
    from llama4_export.evaluation.torch_backend import TorchBackend
    from llama4_export.runtime import Generator

    if artifact:
        gen = Generator.load(artifact, window=window, sinks=sinks, threads=2)
    else:
        import torch

        from llama4_export.weights import from_config

        torch.set_num_threads(1)  # matrices this small only lose from threading (and fight parallel jobs)
        gen = Generator(TorchBackend(from_config(wide_kv_config())), window=window, sinks=sinks)
    result = gen.generate([1, 2, 3], max_new_tokens=tokens, stop_tokens=[])
    assert len(result.token_ids) == tokens
    return {
        "tokens": tokens, "window": window, "sinks": sinks, "cache_bytes": gen._cache.nbytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
    }


def measure(window: int = 64, sinks: int = 4, multiples: tuple[int, ...] = (2, 10), artifact: str | None = None) -> list[dict]:
    runs = []
    for m in multiples:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(m * window), "--window", str(window), "--sinks", str(sinks)]
        if artifact:
            cmd += ["--artifact", str(artifact)]
        out = check_child(cmd, f"the {m * window}-token run", stdout=subprocess.PIPE).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return runs


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("--window", type=positive_int, default=64,
                        help="global-layer KV window W in tokens; the runs generate 2×W and 10×W tokens (default "
                             "%(default)s)")
    parser.add_argument("--sinks", type=non_negative_int, default=4,
                        help="attention-sink tokens kept at the window's start, fewer than --window (default "
                             "%(default)s)")
    parser.add_argument("--artifact", type=existing_dir, default=None,
                        help="measure this artifact on ONNX Runtime (default: a wide-KV random model on the torch "
                             "backend)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sinks >= args.window:
        parser.error(f"--sinks {args.sinks} leaves no room in --window {args.window}; give fewer sinks than the window")
    if args.child is not None:
        print(json.dumps(child(args.child, args.window, args.sinks, args.artifact)))
        return
    runs = measure(args.window, args.sinks, artifact=args.artifact)
    for r in runs:
        print(f"{r['tokens']:>7} tokens (W={r['window']}, S={r['sinks']}): peak RSS {r['peak_rss_bytes'] / 2**20:8.1f} MiB, "
              f"KV cache {r['cache_bytes'] / 2**20:.2f} MiB")
    growth = runs[-1]["peak_rss_bytes"] / runs[0]["peak_rss_bytes"] - 1
    print(f"peak RSS growth from {runs[0]['tokens']} to {runs[-1]['tokens']} tokens: {growth:+.2%}")


if __name__ == "__main__":
    run_script(main)
