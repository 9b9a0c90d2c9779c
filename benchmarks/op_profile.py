"""Where a decode step and a prefill spend their time, per ONNX Runtime op type, and how many nodes a decode step runs.

    python benchmarks/op_profile.py ARTIFACT [--prompt 512] [--steps 64] [--threads 2] [--json out.json]

One warm-up generation, then one profiled generation of --steps tokens after a --prompt-token prompt (random ids,
greedy), with ONNX Runtime's profiler on (SessionOptions.enable_profiling). The profile's kernel events are
assigned to the model runs they fall in; of each generation's runs the last --steps − 1 are decode steps, the ones
before them prefill pieces (the runtime splits a prompt at chunk boundaries). Reported: per op type, its share of decode and of prefill kernel time, and the nodes executed per decode step
(after ONNX Runtime's own fusions: what actually runs). Single-part artifacts only.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from llama4_export.artifact import MANIFEST, read_manifest
from llama4_export.model.config import Llama4Config
from llama4_export.runtime import Generator, OrtBackend
from llama4_export.runtime.ort_backend import PartGraphs, artifact_parts

from common import (  # benchmarks/, beside this script
    ArgumentParser, BenchmarkError, existing_dir, machine_json, new_file, positive_int, print_machine, run_script, summary, two_or_more)


def kernel_time_by_run(profile: Path) -> list[Counter]:
    """Per model run, in order: microseconds of kernel time per op type (and the node count under "#nodes")."""
    events = json.loads(profile.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    per_run = [Counter() for _ in runs]
    starts = np.array([start for start, _ in runs])
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i >= 0 and e["ts"] <= runs[i][1]:
            per_run[i][e["args"]["op_name"]] += e["dur"]
            per_run[i]["#nodes"] += 1
    return per_run


def single_part(artifact: Path) -> tuple[Llama4Config, PartGraphs, int]:
    """(config, graphs, max prefill tokens) of a single-part artifact; a clear exit for any other."""
    manifest = read_manifest(artifact)
    config = Llama4Config.from_manifest(manifest, str(Path(artifact) / MANIFEST))
    parts, max_prefill = artifact_parts(artifact, manifest, config)
    if len(parts) != 1:
        raise BenchmarkError(f"{artifact}: {len(parts)} parts; this benchmark takes a single-part artifact (export without "
                         "--partitions)")
    return config, parts[0], max_prefill


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("artifact", type=existing_dir, help="a single-part artifact directory (manifest.json)")
    parser.add_argument("--prompt", type=positive_int, default=512,
                        help="prompt length in tokens of the profiled prefill (default %(default)s)")
    parser.add_argument("--steps", type=two_or_more, default=64,
                        help="tokens generated after it; the decode steps profiled are all but the first (default "
                             "%(default)s)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="ONNX Runtime intra-op threads (default %(default)s)")
    parser.add_argument("--json", type=new_file,
                        help="also write the result (and the machine: CPU, flags, copy bandwidth) to this JSON file")
    args = parser.parse_args()

    config, graphs, max_prefill = single_part(args.artifact)
    machine = machine_json(print_machine(args.threads), args.threads)
    parts = [graphs]
    with tempfile.TemporaryDirectory() as scratch:
        backend = OrtBackend(parts, config, max_prefill, args.threads, profile_prefix=str(Path(scratch) / "ort"))
        generator = Generator.for_backend(backend, args.artifact)
        rng = np.random.default_rng(0)
        for _ in range(2):  # warm-up (ORT's first runs allocate and pre-pack), then the profiled generation
            ids = rng.integers(0, config.vocab_size, args.prompt).tolist()
            generator.generate(ids, max_new_tokens=args.steps, stop_tokens=[])
        runs = [r for profile in backend.end_profiling() for r in kernel_time_by_run(profile)]
    profiled = runs[len(runs) // 2:]  # the second generation
    decode, prefill = profiled[-(args.steps - 1):], profiled[:-(args.steps - 1)]
    if len(runs) % 2 or not prefill:
        raise SystemExit(f"the profile holds {len(runs)} runs; expected two generations of prefill + {args.steps - 1} steps")
    result = {"machine": machine, "artifact": str(args.artifact), "prompt": args.prompt, "steps": args.steps, "threads": args.threads,
              "decode_nodes_per_step": sorted(Counter(r["#nodes"] for r in decode).items()),
              "decode_nodes_per_layer": round(float(np.median([r["#nodes"] for r in decode])) / config.num_hidden_layers, 1)}
    table = Table(title=f"{args.artifact.name}: kernel time per op type ({args.threads} threads)")
    table.add_column("op")
    for phase, phase_runs in (("decode", decode), ("prefill", prefill)):
        total = sum((r for r in phase_runs), Counter())
        nodes = total.pop("#nodes", 0)
        time_us = sum(total.values())
        result[phase] = {"runs": len(phase_runs), "kernel_ms_per_run": round(time_us / 1e3 / max(len(phase_runs), 1), 3),
                         "nodes": nodes, "share": {op: round(us / time_us, 4) for op, us in total.most_common()}}
        table.add_column(f"{phase} share", justify="right")
    ops = sorted(set(result["decode"]["share"]) | set(result["prefill"]["share"]),
                 key=lambda op: -result["decode"]["share"].get(op, 0))
    for op in ops:
        table.add_row(op, *(f"{100 * result[p]['share'].get(op, 0):.1f} %" for p in ("decode", "prefill")))
    console = Console(width=120)
    console.print(table)
    console.print(f"decode: {result['decode']['kernel_ms_per_run']} ms of kernels per step, nodes per step "
                  f"{result['decode_nodes_per_step']} ({result['decode_nodes_per_layer']} per layer); prefill: "
                  f"{result['prefill']['runs']} runs, {result['prefill']['kernel_ms_per_run']} ms each", highlight=False)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    run_script(main)
