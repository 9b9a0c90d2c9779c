"""Side-by-side: our ONNX Runtime artifacts vs llama.cpp (GGUF) vs transformers eager fp32, on the same weights, in one run.

    python benchmarks/compare_peers.py ../bench/rand200m --artifact fp32=out/r200-fp32 --artifact int4=out/r200-int4 \\
        --llamacpp F32,Q8_0,Q4_0 --threads 2 --rounds 3 --json bench-r200.json

Every engine runs in its own process (so peak RSS is its own) and the engines are interleaved: round 1 measures each
engine once, then round 2, ...; the median and range are taken over rounds. A load change on a shared machine thus
hits every engine alike, and the ratios stay meaningful even when the absolute numbers move. The memory bandwidth is
measured at the start of every round (median used) and each engine's decode is divided by its own bandwidth bound
(bandwidth / bytes one decode step must read in that engine's weight format: attention + dense/shared MLPs + one
routed expert per MoE layer + lm_head + one embedding row + the valid KV entries).

Ours: `llama4-export bench DIR --repeats 1` (the CLI itself). llama.cpp: benchmarks/llamacpp.py (fetches, builds
and converts into its cache on first use; ~10 min). transformers: Llama4ForCausalLM, attn_implementation="eager",
float32, model.generate greedy (this script's --worker mode).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402  (benchmarks/ is a script folder, not a package)

from llama4_export.evaluation.bench import kv_bytes_read, machine_info, memory_bandwidth_gb_s, result_table, spread  # noqa: E402
from llama4_export.model.config import Llama4Config  # noqa: E402

console = Console(width=160)


# ------------------------------------------------------------------------------------------ transformers worker
def transformers_worker(checkpoint: Path, threads: int, prompts: list[int], decode_prompt: int, new_tokens: int) -> dict:
    """One measurement of transformers eager fp32 (runs in a child process: its peak RSS is its own)."""
    import numpy as np
    import torch
    from transformers import Llama4ForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from llama4_export.evaluation.bench import peak_rss_mb

    torch.set_num_threads(threads)
    model = Llama4ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    vocab, experts = model.config.vocab_size, model.config.num_local_experts
    rng = np.random.default_rng(0)

    class Stamps(BaseStreamer):
        """put() is called once with the prompt, then once per new token."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def timed(n_prompt: int, n_new: int) -> list[float]:
        ids = torch.from_numpy(rng.integers(0, vocab, (1, n_prompt)))
        stamps = Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, streamer=stamps, pad_token_id=0)
        return [start, *stamps.times[1:]]

    timed(min(prompts), 2)  # warm-up
    prefill = {}
    for n in prompts:
        start, first = timed(n, 1)
        prefill[str(n)] = n / (first - start)
    start, first, *rest = timed(decode_prompt, new_tokens)
    weight_bytes = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if ".experts." in name:
            size //= experts
        elif "embed_tokens" in name:
            size //= p.shape[0]
        weight_bytes += size
    return {"prefill_tok_s": prefill, "decode_tok_s": (new_tokens - 1) / (rest[-1] - first),
            "ttft_ms": 1e3 * (first - start), "peak_rss_mb": peak_rss_mb(), "weight_bytes": weight_bytes}


# ----------------------------------------------------------------------------------------------- orchestration
def run_json(cmd: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([*cmd, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def context(args) -> int:
    """The KV window we give our runtime: what llama-bench sizes its context to for the decode test."""
    return args.decode_prompt + args.new_tokens


def ours_once(artifact: Path, args) -> dict:
    cmd = [sys.executable, "-m", "llama4_export.cli", "bench", str(artifact), "--repeats", "1", "--threads", str(args.threads),
           "--decode-prompt", str(args.decode_prompt), "--new-tokens", str(args.new_tokens), "--window", str(context(args))]
    for n in args.prompt:
        cmd += ["--prompt", str(n)]
    r = run_json(cmd)
    return {"prefill_tok_s": {n: s["median"] for n, s in r["prefill_tok_s"].items()}, "decode_tok_s": r["decode_tok_s"]["median"],
            "ttft_ms": r["ttft_ms"]["median"], "peak_rss_mb": r["peak_rss_mb"],
            "weight_bytes": r["roofline"]["weight_bytes_per_token"]}


def transformers_once(checkpoint: Path, args) -> dict:
    cmd = [sys.executable, __file__, str(checkpoint), "--worker", "transformers", "--threads", str(args.threads),
           "--decode-prompt", str(args.decode_prompt), "--new-tokens", str(args.new_tokens)]
    for n in args.prompt:
        cmd += ["--prompt", str(n)]
    return run_json(cmd)


def llamacpp_once(bin_dir: Path, gguf: Path, weight_bytes: int, args) -> dict:
    r = llamacpp.measure(bin_dir, gguf, args.threads, args.prompt, args.decode_prompt, args.new_tokens, repeats=1)
    return {"prefill_tok_s": {n: s["median"] for n, s in r["prefill_tok_s"].items()}, "decode_tok_s": r["decode_tok_s"]["median"],
            "ttft_ms": r["ttft_ms"]["median"] if r["ttft_ms"] else None, "peak_rss_mb": r["peak_rss_mb"], "weight_bytes": weight_bytes}


def aggregate(engine: str, precision: str, samples: list[dict], bandwidth: float, kv_bytes: float) -> dict:
    step_bytes = samples[0]["weight_bytes"] + kv_bytes
    decode = spread([s["decode_tok_s"] for s in samples])
    bound = bandwidth * 1e9 / step_bytes
    ttft = [s["ttft_ms"] for s in samples if s["ttft_ms"] is not None]
    return {
        "engine": engine, "precision": precision,
        "prefill_tok_s": {n: spread([s["prefill_tok_s"][n] for s in samples]) for n in samples[0]["prefill_tok_s"]},
        "decode_tok_s": decode, "ttft_ms": spread(ttft) if ttft else None,
        "peak_rss_mb": max(s["peak_rss_mb"] for s in samples),
        "roofline": {"decode_bytes_per_token": int(step_bytes), "bound_tok_s": round(bound, 2),
                     "fraction_of_bound": round(decode["median"] / bound, 4)},
    }


def ratio(results: list[dict], a: tuple[str, str], b: tuple[str, str], metric: str) -> float | None:
    def find(key):
        return next((r for r in results if (r["engine"], r["precision"]) == key), None)

    ra, rb = find(a), find(b)
    if ra is None or rb is None:
        return None
    pick = (lambda r: r["decode_tok_s"]["median"]) if metric == "decode" else (lambda r: r["prefill_tok_s"][metric]["median"])
    return pick(ra) / pick(rb)


def targets(results: list[dict], prompts: list[int]) -> list[tuple[str, float | None, float]]:
    ours = "llama4-export (onnxruntime)"
    rows = [("INT4 decode / llama.cpp Q4_0 decode", ratio(results, (ours, "int4"), ("llama.cpp", "Q4_0"), "decode"), 1.0)]
    for n in map(str, prompts):
        for mine, theirs in (("fp32", "F32"), ("int4", "Q4_0")):
            rows.append((f"{mine.upper()} prefill {n} / llama.cpp {theirs} prefill {n}",
                         ratio(results, (ours, mine), ("llama.cpp", theirs), n), 1.0))
    rows.append(("INT4 decode / transformers eager fp32 decode", ratio(results, (ours, "int4"), ("transformers eager", "fp32"), "decode"), 5.0))
    rows.append(("FP32 decode / transformers eager fp32 decode", ratio(results, (ours, "fp32"), ("transformers eager", "fp32"), "decode"), None))
    rows.append(("FP32 decode / llama.cpp F32 decode", ratio(results, (ours, "fp32"), ("llama.cpp", "F32"), "decode"), None))
    for r in results:
        if r["engine"] == ours:
            rows.append((f"{r['precision'].upper()} decode / bandwidth bound", r["roofline"]["fraction_of_bound"], 0.6))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="the HF checkpoint every engine runs (ours: exported from it)")
    parser.add_argument("--artifact", action="append", default=[], help="PRECISION=DIR of one of our artifacts (repeat)")
    parser.add_argument("--llamacpp", default="F32,Q8_0,Q4_0", help="GGUF types to measure ('' = skip llama.cpp)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--cache", type=Path, default=llamacpp.DEFAULT_CACHE, help="llama.cpp build/convert cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, action="append", help="prefill prompt lengths (default 128 and 512)")
    parser.add_argument("--decode-prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every engine")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--worker", choices=["transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.prompt = args.prompt or [128, 512]

    if args.worker == "transformers":
        result = transformers_worker(args.checkpoint, args.threads, args.prompt, args.decode_prompt, args.new_tokens)
        args.json.write_text(json.dumps(result))
        return

    config = Llama4Config.from_hf_dict(json.loads((args.checkpoint / "config.json").read_text()), source=str(args.checkpoint))
    positions = range(args.decode_prompt, args.decode_prompt + args.new_tokens - 1)
    engines: list[tuple[str, str, float, object]] = []  # (engine, precision, KV bytes per step, measure-once callable)
    for spec in args.artifact:
        precision, _, directory = spec.partition("=")
        engines.append(("llama4-export (onnxruntime)", precision, kv_bytes_read(config, positions, 4, context(args)),
                        lambda d=Path(directory): ours_once(d, args)))
    if args.llamacpp:
        types = args.llamacpp.split(",")
        files = llamacpp.convert(args.checkpoint, args.cache, types, jobs=args.threads)
        bin_dir = llamacpp.build(args.cache, llamacpp.source_dir(args.cache))
        for kind in types:
            weights = llamacpp.decode_bytes(files[kind], args.cache, config.num_local_experts)
            engines.append(("llama.cpp", kind, kv_bytes_read(config, positions, 2, None),  # llama.cpp's KV cache is f16
                            lambda g=files[kind], w=weights: llamacpp_once(bin_dir, g, w, args)))
    if not args.no_transformers:
        engines.append(("transformers eager", "fp32", kv_bytes_read(config, positions, 4, None),
                        lambda: transformers_once(args.checkpoint, args)))

    samples: dict[int, list[dict]] = {i: [] for i in range(len(engines))}
    bandwidths, loads = [], []
    for round_index in range(args.rounds):
        bandwidths.append(memory_bandwidth_gb_s(args.threads))
        loads.append(os.getloadavg()[0])
        for i, (engine, precision, _, once) in enumerate(engines):
            console.print(f"round {round_index + 1}/{args.rounds}: {engine} {precision}", highlight=False)
            samples[i].append(once())
    loads.append(os.getloadavg()[0])
    bandwidth = statistics.median(bandwidths)
    results = [aggregate(e, p, samples[i], bandwidth, kv) for i, (e, p, kv, _) in enumerate(engines)]

    machine = machine_info()
    console.print(result_table(results, title=f"{args.checkpoint.name}: {args.threads} threads, median (min–max) over {args.rounds} interleaved rounds"))
    console.print(f"machine: {machine['cpu']}, {machine['cores']} cores; copy bandwidth {bandwidth:.1f} GB/s "
                  f"(rounds: {', '.join(f'{b:.1f}' for b in bandwidths)}); 1-min load average during the run: "
                  f"{', '.join(f'{v:.2f}' for v in loads)}", highlight=False)
    target_rows = targets(results, args.prompt)
    for name, value, goal in target_rows:
        shown = "not measured" if value is None else f"{value:.2f}×" if "bound" not in name else f"{100 * value:.0f} %"
        goal_text = "" if goal is None else f"  (target ≥ {goal:.1f}×)" if "bound" not in name else f"  (target ≥ {100 * goal:.0f} %)"
        console.print(f"  {name}: {shown}{goal_text}", highlight=False)
    if args.json:
        args.json.write_text(json.dumps({
            "checkpoint": str(args.checkpoint), "threads": args.threads, "rounds": args.rounds, "machine": machine,
            "bandwidth_gb_s": bandwidths, "load_avg_1m": loads, "results": results,
            "targets": [{"name": n, "value": v, "target": g} for n, v, g in target_rows],
        }, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
