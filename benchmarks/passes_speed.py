"""Decode (and prefill) step time on ONNX Runtime CPU before vs after the graph passes, on a ~50M-parameter model.

    python benchmarks/passes_speed.py                      # random 50M config, ORT target, 1 thread
    python benchmarks/passes_speed.py --threads 2 --slots 512

The model: scout-tiny's structure (every layer MoE with a shared expert, NoPE every 4th layer, QK norm) at hidden
512, 8 layers, 4 experts of width 640, vocab 8192 — about 53M parameters. Both graphs are exported, optimized for
onnxruntime, and timed on the same inputs: a batch of one with `--slots` cached tokens. Each timing is the median of
`--runs` calls after warm-up; a shared or busy machine makes them noisy, so compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ArgumentParser, positive_int, print_machine, run_script  # benchmarks/, beside this script


def config_50m():
    from llama4_export.model import get_preset

    return get_preset("scout-tiny").replace(
        vocab_size=8192, hidden_size=512, intermediate_size=640, intermediate_size_mlp=1280, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, attention_chunk_size=8192, name="bench-50m",
    )


def export_graphs(model, specs, directory: Path) -> dict[str, Path]:
    """Export `specs` (export.GraphSpec) of `model` into `directory` (one shared data file); paths by name."""
    from llama4_export.export.onnx_export import export_graph
    from llama4_export.export.writer import write_graphs as save_graphs

    directory.mkdir(parents=True, exist_ok=True)
    save_graphs({spec.name: export_graph(model, spec) for spec in specs}, directory)
    return {spec.name: directory / spec.file for spec in specs}


def optimize_graphs(paths: dict[str, Path], directory: Path, target: str = "onnxruntime") -> dict[str, Path]:
    from llama4_export.export.writer import write_graphs as save_graphs
    from llama4_export.graph_passes.pipeline import optimize

    directory.mkdir(parents=True, exist_ok=True)
    save_graphs({name: optimize(path, target)[0] for name, path in paths.items()}, directory)
    return {name: directory / path.name for name, path in paths.items()}


def feeds(config, tokens: int, slots: int) -> dict[str, np.ndarray]:
    """One row: `slots` cached tokens at positions 0..slots-1 (every layer), `tokens` new ones after them."""
    from llama4_export.model import io_spec

    rng = np.random.default_rng(0)
    past = np.arange(slots, dtype=np.int64)[None]
    inputs = {
        io_spec.INPUT_IDS: rng.integers(0, config.vocab_size, (1, tokens), dtype=np.int64),
        io_spec.POSITIONS: (slots + np.arange(tokens, dtype=np.int64))[None],
        io_spec.PAST_POSITIONS["chunked"]: past,
        io_spec.PAST_POSITIONS["global"]: past,
    }
    shape = (1, config.num_key_value_heads, slots, config.head_dim)
    for layer in range(config.num_hidden_layers):
        inputs[io_spec.past_key(layer)] = rng.standard_normal(shape, dtype=np.float32)
        inputs[io_spec.past_value(layer)] = rng.standard_normal(shape, dtype=np.float32)
    return inputs


def step_seconds(path: Path, inputs: dict[str, np.ndarray], threads: int, runs: int) -> float:
    """Median wall time of one `session.run` on the CPU EP with all graph optimizations on (as the runtime runs it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(5):
        session.run(None, inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=positive_int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--slots", type=positive_int, default=256, help="cached tokens per layer")
    parser.add_argument("--prefill-tokens", type=positive_int, default=64)
    parser.add_argument("--runs", type=positive_int, default=50)
    args = parser.parse_args()

    from llama4_export.export.onnx_export import GRAPHS
    from llama4_export.weights import from_config
    from llama4_export.model import summarize

    print_machine(args.threads)
    config = config_50m()
    params = summarize(config)["total_params"]
    print(f"{config.name}: {params / 1e6:.1f}M parameters, {config.num_hidden_layers} layers, "
          f"{config.num_local_experts} experts; {args.slots} cached tokens, {args.threads} thread(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="passes-speed-") as tmp:
        before = export_graphs(from_config(config, seed=0), GRAPHS, Path(tmp) / "before")
        after = optimize_graphs(before, Path(tmp) / "after")
        for name, tokens in (("decode", 1), ("prefill", args.prefill_tokens)):
            inputs = feeds(config, tokens, args.slots)
            t_before = step_seconds(before[name], inputs, args.threads, args.runs)
            t_after = step_seconds(after[name], inputs, args.threads, args.runs)
            print(f"{name:8s} ({tokens:3d} new tokens): before {t_before * 1e3:8.2f} ms   after {t_after * 1e3:8.2f} ms   "
                  f"before/after {t_before / t_after:5.2f}×", flush=True)


if __name__ == "__main__":
    run_script(main)
