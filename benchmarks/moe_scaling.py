"""Decode cost vs number of experts: the fused/lowered graph reads one expert per token, the dense one all of them.

    python benchmarks/moe_scaling.py                       # E = 4, 16, 64; 1 thread
    python benchmarks/moe_scaling.py --experts 4 16 64 128 --threads 2

Configs identical except num_local_experts: scout-tiny's structure at hidden 256, 4 layers (all MoE), experts of
width 1024 (~1.6 MB of fp32 weights each). For each E the decode graph is exported twice —
  dense      the MoE as transformers computes it (every expert on one-hot-scaled inputs): the unfused baseline;
  optimized  the gather export after the graph passes for onnxruntime (com.microsoft.MoE, or the standard-op
             gather lowering where that op does not match the reference)
— and one decode step (batch 1, `--slots` cached tokens) is timed on ONNX Runtime CPU: median of `--runs`.
Expected: optimized flat in E (within 1.3× from the smallest to the largest E), dense growing ~linearly.
Timings on a shared machine are noisy; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from passes_speed import export_graphs, feeds, optimize_graphs, step_seconds

from common import ArgumentParser, positive_int, print_machine, run_script  # benchmarks/, beside this script


def config(experts: int):
    from llama4_export.model import get_preset

    return get_preset("scout-tiny").replace(
        vocab_size=1024, hidden_size=256, intermediate_size=1024, intermediate_size_mlp=1024, num_hidden_layers=4,
        no_rope_layers=(1, 1, 1, 0), moe_layers=(0, 1, 2, 3), num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        attention_chunk_size=8192, num_local_experts=experts, name=f"moe-scaling-e{experts}",
    )


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=positive_int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--slots", type=positive_int, default=64, help="cached tokens per layer")
    parser.add_argument("--runs", type=positive_int, default=100)
    args = parser.parse_args()

    from llama4_export.export.onnx_export import DECODE, GraphSpec
    from llama4_export.weights import from_config
    from llama4_export.model import summarize

    print_machine(args.threads)
    dense_decode = GraphSpec("decode_dense", moe_impl="dense", new_tokens=1)
    rows = []
    for experts in args.experts:
        cfg = config(experts)
        with tempfile.TemporaryDirectory(prefix="moe-scaling-") as tmp:
            exported = export_graphs(from_config(cfg, seed=0), (DECODE, dense_decode), Path(tmp) / "exported")
            optimized = optimize_graphs({"decode": exported["decode"]}, Path(tmp) / "optimized")
            inputs = feeds(cfg, 1, args.slots)
            dense = step_seconds(exported["decode_dense"], inputs, args.threads, args.runs)
            fused = step_seconds(optimized["decode"], inputs, args.threads, args.runs)
        rows.append((experts, summarize(cfg)["total_params"], dense, fused))
        print(f"E={experts:4d} ({rows[-1][1] / 1e6:6.1f}M params): dense {dense * 1e3:8.3f} ms   "
              f"optimized {fused * 1e3:8.3f} ms", flush=True)
    fused_times, dense_times = [r[3] for r in rows], [r[2] for r in rows]
    print(f"optimized: E={rows[-1][0]} / E={rows[0][0]} = {fused_times[-1] / fused_times[0]:.2f}× "
          f"(max/min over E {max(fused_times) / min(fused_times):.2f}×; target ≤ 1.3×)")
    print(f"dense:     E={rows[-1][0]} / E={rows[0][0]} = {dense_times[-1] / dense_times[0]:.2f}× "
          f"(experts grew {rows[-1][0] / rows[0][0]:.0f}×)")


if __name__ == "__main__":
    run_script(main)
