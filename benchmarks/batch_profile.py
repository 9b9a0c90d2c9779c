"""Kernel time per ONNX Runtime op type of one continuous-batching decode step, with 1 and with N sequences decoding.

    python benchmarks/batch_profile.py ARTIFACT [--batch 8] [--steps 20] [--threads 2]

For each batch size: a BatchEngine (max_batch = the largest size) gets that many random 32-token prompts, prefills
them, then runs --steps decode steps twice; the second round's last --steps model runs are the decode steps measured
(ONNX Runtime's profiler, op_profile.kernel_time_by_run). Prints kernel ms per step per op type for both sizes and
their ratio: which ops batching does not amortize (an MoE's experts: more rows touch more experts).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from op_profile import kernel_time_by_run
from rich.console import Console
from rich.table import Table

from llama4_export.artifact import MANIFEST, read_manifest
from llama4_export.model.config import Llama4Config
from llama4_export.runtime import Generator, OrtBackend
from llama4_export.runtime.batching import BatchEngine, EngineOptions, SequenceRequest
from llama4_export.runtime.ort_backend import artifact_parts

from common import (  # benchmarks/, beside this script
    ArgumentParser, existing_dir, positive_int, print_machine, run_script, summary)

PROMPT = 32


def decode_kernel_ms(artifact: Path, batch: int, max_batch: int, steps: int, threads: int) -> Counter:
    """Kernel ms per decode step per op type with `batch` sequences decoding."""
    manifest = read_manifest(artifact)
    config = Llama4Config.from_manifest(manifest, str(Path(artifact) / MANIFEST))
    parts, max_prefill = artifact_parts(artifact, manifest, config)
    with tempfile.TemporaryDirectory() as scratch:
        backend = OrtBackend(parts, config, max_prefill, threads, profile_prefix=str(Path(scratch) / "ort"))
        engine = BatchEngine(Generator.for_backend(backend, artifact), EngineOptions(max_batch=max_batch))
        rng = np.random.default_rng(0)
        for _ in range(2):  # warm-up round, then the profiled one
            sequences = [engine.submit(SequenceRequest(rng.integers(0, config.vocab_size, PROMPT).tolist(), steps + 2,
                                                       stop_tokens=frozenset())) for _ in range(batch)]
            while any(s.fed < PROMPT for s in sequences):
                engine.step()
            for _ in range(steps):
                engine.step()
            for seq in sequences:
                engine.cancel(seq)
            engine.step()
        runs = [r for profile in backend.end_profiling() for r in kernel_time_by_run(profile)]
    total = sum(runs[-steps:], Counter())
    total.pop("#nodes", None)
    return Counter({op: us / 1e3 / steps for op, us in total.items()})


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("artifact", type=existing_dir, help="artifact directory (manifest.json) to profile")
    parser.add_argument("--batch", type=positive_int, default=8, help="N: the sequences decoding at once in the "
                        "batched step, compared with 1 (default %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=20, help="decode steps profiled per batch size (default "
                        "%(default)s)")
    parser.add_argument("--threads", type=positive_int, default=2, help="ONNX Runtime intra-op threads (default "
                        "%(default)s)")
    args = parser.parse_args()
    print_machine(args.threads)
    one, many = (decode_kernel_ms(args.artifact, b, args.batch, args.steps, args.threads) for b in (1, args.batch))
    table = Table(title=f"{args.artifact.name}: kernel ms per decode step ({args.threads} threads, ORT profiler on)")
    for column in ("op", "1 sequence", f"{args.batch} sequences", "ratio"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for op, ms in (many + one).most_common(12):
        table.add_row(op, f"{one[op]:.3f}", f"{many[op]:.3f}", f"{many[op] / one[op]:.1f}×" if one[op] else "–")
    table.add_row("all", f"{sum(one.values()):.2f}", f"{sum(many.values()):.2f}",
                  f"{sum(many.values()) / sum(one.values()):.1f}×")
    Console(width=120).print(table)


if __name__ == "__main__":
    run_script(main)
