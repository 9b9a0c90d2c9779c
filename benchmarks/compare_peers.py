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
float32, model.generate greedy (this script's --worker mode), at the --depth values up to 2048 (eager attention's
memory grows with the square of the context: at 16384 tokens it would need tens of GB; deeper columns show –).
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
from dataclasses import replace
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402  (benchmarks/ is a script folder, not a package)

from llama4_export.evaluation.bench import kv_bytes_read, machine_info, memory_bandwidth_gb_s, result_table, spread  # noqa: E402
from llama4_export.artifact import read_manifest, sha256_file  # noqa: E402
from llama4_export.model.config import Llama4Config  # noqa: E402

from common import (  # benchmarks/, beside this script
    ArgumentParser, BenchmarkError, check_child, existing_dir, new_file, positive_int, print_machine, run_script, summary, two_or_more)

console = Console(width=160)


# ------------------------------------------------------------------------------------------ transformers worker
def transformers_worker(checkpoint: Path, threads: int, prompts: list[int], decode_prompt: int, new_tokens: int,
                        depths: list[int]) -> dict:
    """One measurement of transformers eager fp32 (runs in a child process: its peak RSS is its own)."""
    import numpy as np
    import torch
    from transformers import Llama4ForCausalLM
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging

    from llama4_export.evaluation.bench import peak_rss_mb

    # its load report lists every weight the text model leaves out (a multimodal checkpoint's vision tower: 54 lines)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
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

    for n in sorted(set(prompts)):  # warm-up, one run per prompt length as our engine's bench does
        timed(n, 2)
    prefill = {}
    for n in prompts:
        start, first = timed(n, 1)
        prefill[str(n)] = n / (first - start)
    start, first, *rest = timed(decode_prompt, new_tokens)
    at_depth = {}
    for depth in depths:  # as our bench and llama-bench -d: new_tokens after `depth` tokens (0: a one-token prompt)
        _, first_at, *rest_at = timed(max(depth, 1), new_tokens)
        at_depth[str(depth)] = (new_tokens - 1) / (rest_at[-1] - first_at)
    weight_bytes = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if ".experts." in name:
            size //= experts
        elif "embed_tokens" in name:
            size //= p.shape[0]
        weight_bytes += size
    return {"prefill_tok_s": prefill, "decode_tok_s": (new_tokens - 1) / (rest[-1] - first),
            "decode_depth_tok_s": at_depth, "ttft_ms": 1e3 * (first - start), "peak_rss_mb": peak_rss_mb(),
            "weight_bytes": weight_bytes}


# ----------------------------------------------------------------------------------------------- orchestration
def run_json(cmd: list[str], what: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        check_child([*cmd, "--json", str(out)], what, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def context(args) -> int:
    """The KV window we give our runtime: what llama-bench sizes its context to for its longest decode test."""
    return max([args.decode_prompt, *args.depth]) + args.new_tokens


def ours_once(artifact: Path, args) -> dict:
    cmd = [sys.executable, "-c", "from llama4_export.cli.export import main; main()", "bench", str(artifact), "--repeats", "1", "--threads", str(args.threads),
           "--decode-prompt", str(args.decode_prompt), "--new-tokens", str(args.new_tokens), "--window", str(context(args))]
    for n in args.prompt:
        cmd += ["--prompt", str(n)]
    for d in args.depth:
        cmd += ["--depth", str(d)]
    r = run_json(cmd, f"llama4-export bench {artifact}")
    return {"prefill_tok_s": {n: s["median"] for n, s in r["prefill_tok_s"].items()}, "decode_tok_s": r["decode_tok_s"]["median"],
            "decode_depth_tok_s": {d: s["median"] for d, s in r["decode_depth_tok_s"].items()},
            "ttft_ms": r["ttft_ms"]["median"], "peak_rss_mb": r["peak_rss_mb"],
            "weight_bytes": r["roofline"]["weight_bytes_per_token"], "kv_bytes": r["roofline"]["kv_bytes_per_token"]}


# llama.cpp does not read the chunk size from GGUF: its chunked layers attend within Scout's 8,192-token chunks.
LLAMACPP_CHUNK = 8192


def llamacpp_kv_bytes(config: Llama4Config, positions: range | list[int]) -> float:
    """The K/V bytes llama.cpp reads per decode step: its f16 cache, its chunked layers in its own chunk size."""
    return kv_bytes_read(replace(config, attention_chunk_size=LLAMACPP_CHUNK), positions, 2, None)
TRANSFORMERS_MAX_DEPTH = 2048  # eager attention's scores at 16384 tokens: tens of GB


def transformers_once(checkpoint: Path, args) -> dict:
    cmd = [sys.executable, __file__, str(checkpoint), "--worker", "transformers", "--threads", str(args.threads),
           "--decode-prompt", str(args.decode_prompt), "--new-tokens", str(args.new_tokens)]
    for n in args.prompt:
        cmd += ["--prompt", str(n)]
    for d in [d for d in args.depth if d <= TRANSFORMERS_MAX_DEPTH] or [-1]:  # -1: none (not the default four)
        cmd += ["--depth", str(d)]
    return run_json(cmd, "the transformers worker")


def llamacpp_once(bin_dir: Path, gguf: Path, weight_bytes: int, args) -> dict:
    r = llamacpp.measure(bin_dir, gguf, args.threads, args.prompt, args.decode_prompt, args.new_tokens, repeats=1,
                         depths=args.depth)
    return {"prefill_tok_s": {n: s["median"] for n, s in r["prefill_tok_s"].items()}, "decode_tok_s": r["decode_tok_s"]["median"],
            "decode_depth_tok_s": {d: s["median"] for d, s in r["decode_depth_tok_s"].items()},
            "ttft_ms": r["ttft_ms"]["median"] if r["ttft_ms"] else None, "peak_rss_mb": r["peak_rss_mb"], "weight_bytes": weight_bytes}


def aggregate(engine: str, precision: str, samples: list[dict], bandwidth: float, kv_bytes: float | None) -> dict:
    """kv_bytes: the KV a decode step reads; None: the engine's own count in its samples (ours, in its cache dtype)."""
    step_bytes = samples[0]["weight_bytes"] + (samples[0]["kv_bytes"] if kv_bytes is None else kv_bytes)
    decode = spread([s["decode_tok_s"] for s in samples])
    bound = bandwidth * 1e9 / step_bytes
    ttft = [s["ttft_ms"] for s in samples if s["ttft_ms"] is not None]
    return {
        "engine": engine, "precision": precision,
        "prefill_tok_s": {n: spread([s["prefill_tok_s"][n] for s in samples]) for n in samples[0]["prefill_tok_s"]},
        "decode_tok_s": decode, "ttft_ms": spread(ttft) if ttft else None,
        "decode_depth_tok_s": {d: spread([s["decode_depth_tok_s"][d] for s in samples])
                               for d in samples[0].get("decode_depth_tok_s", {})},
        "peak_rss_mb": max(s["peak_rss_mb"] for s in samples),
        "roofline": {"decode_bytes_per_token": int(step_bytes), "bound_tok_s": round(bound, 2),
                     "fraction_of_bound": round(decode["median"] / bound, 4)},
    }


def find(results: list[dict], key: tuple[str, str]) -> dict | None:
    return next((r for r in results if (r["engine"], r["precision"]) == key), None)


def metric(result: dict | None, name: str) -> float | None:
    """decode | prefill N | decode@D | rss, the median over rounds (RSS: the peak)."""
    if result is None:
        return None
    if name == "decode":
        return result["decode_tok_s"]["median"]
    if name == "rss":
        return result["peak_rss_mb"]
    kind, _, size = name.partition(" ") if name.startswith("prefill") else name.partition("@")
    table = result["prefill_tok_s"] if kind == "prefill" else result.get("decode_depth_tok_s", {})
    return table[size]["median"] if size in table else None


def ratio(results: list[dict], a: tuple[str, str], b: tuple[str, str], name: str, name_b: str | None = None) -> float | None:
    va, vb = metric(find(results, a), name), metric(find(results, b), name_b or name)
    return None if va is None or vb is None else va / vb


def targets(results: list[dict], prompts: list[int], depths: list[int], decode_prompt: int) -> list[tuple[str, float | None, float | None, str]]:
    """(what, value, goal, kind): kind "x" (a ratio that must reach the goal), "max" (must stay at or below), "%" (a fraction)."""
    ours = "llama4-export (onnxruntime)"
    precisions = sorted({r["precision"] for r in results if r["engine"] == ours})
    peers = {"fp32": "F32", "int4": "Q4_0"}
    rows = []
    for mine in precisions:
        theirs = peers.get(mine.split("-")[0])
        if theirs is None or find(results, ("llama.cpp", theirs)) is None:  # a comparison nobody asked for
            continue
        q = (ours, mine), ("llama.cpp", theirs)
        for n in map(str, prompts):
            rows.append((f"{mine} prefill {n} / llama.cpp {theirs}", ratio(results, *q, f"prefill {n}"), 1.2, "x"))
        decode_goal = 1.5 if theirs == "Q4_0" else None
        for d in sorted({0, decode_prompt} & set(depths)) or [decode_prompt]:
            name = f"decode@{d}" if d in depths else "decode"
            rows.append((f"{mine} decode at depth {d} / llama.cpp {theirs}", ratio(results, *q, name), decode_goal, "x"))
        rows.append((f"{mine} peak RSS / llama.cpp {theirs}", ratio(results, *q, "rss"), 1.2, "max"))
    if 0 in depths and max(depths) > 0:
        deepest = max(depths)
        for r in results:
            if r["engine"] in (ours, "llama.cpp"):
                key = (r["engine"], r["precision"])
                goal = 0.8 if r["engine"] == ours else None
                rows.append((f"{r['engine']} {r['precision']} decode at depth {deepest} / at depth 0",
                             ratio(results, key, key, f"decode@{deepest}", "decode@0"), goal, "x"))
    if find(results, (ours, "int4")) and find(results, ("transformers eager", "fp32")):
        rows.append(("int4 decode / transformers eager fp32",
                     ratio(results, (ours, "int4"), ("transformers eager", "fp32"), "decode"), None, "x"))
    for r in results:
        if r["engine"] == ours:
            rows.append((f"{r['precision']} decode / bandwidth bound", r["roofline"]["fraction_of_bound"], 0.6, "%"))
    return rows


def target_line(name: str, value: float | None, goal: float | None, kind: str) -> str:
    if value is None:
        return f"  {name}: not measured"
    shown = f"{100 * value:.0f} %" if kind == "%" else f"{value:.2f}×"
    if goal is None:
        return f"  {name}: {shown}"
    met = value <= goal if kind == "max" else value >= goal
    goal_text = f"{100 * goal:.0f} %" if kind == "%" else f"{goal:.1f}×"
    return f"  {name}: {shown}  (target {'≤' if kind == 'max' else '≥'} {goal_text}: {'met' if met else 'MISSED'})"


def artifact_spec(text: str) -> tuple[str, Path]:
    """--artifact PRECISION=DIR."""
    precision, equals, directory = text.partition("=")
    if not (precision and equals):
        raise argparse.ArgumentTypeError(f"{text} is not PRECISION=DIR; name the artifact's precision, as fp32={text}")
    return precision, existing_dir(directory)


def check_artifact(label: str, directory: Path, checkpoint: Path, hashes: dict[str, str]) -> None:
    """Refuses an --artifact whose manifest contradicts its label's precision or whose export read other files than
    `checkpoint`'s (the sha256 its manifest recorded; `hashes` keeps the checkpoint's, hashed once per run)."""
    manifest = read_manifest(directory, verify=False)
    flag, wanted, precision = f"--artifact {label}={directory}", label.split("-")[0], manifest.get("precision")
    if precision != wanted:
        raise BenchmarkError(f"{flag}: the artifact is {precision}, not {wanted}; label it {precision}={directory}")
    source = manifest.get("source") or {}
    recorded = source.get("files") if isinstance(source.get("files"), dict) else None
    if not recorded:
        raise BenchmarkError(f"{flag}: exported from {json.dumps(source, sort_keys=True)}, not from a checkpoint; "
                             f"export it from {checkpoint} (llama4-export --checkpoint {checkpoint} --out DIR)")
    present = {"config.json", "model.safetensors.index.json", *(p.name for p in checkpoint.glob("*.safetensors"))}
    present = {name for name in present if (checkpoint / name).is_file()}
    # config.json first: another model fails before any weights are hashed
    for name in sorted(set(recorded) | present, key=lambda n: (n != "config.json", n)):
        if name not in hashes and name in present:
            hashes[name] = sha256_file(checkpoint / name)
        if hashes.get(name) != recorded.get(name):
            what = (f"its {name} differs from {checkpoint}'s" if name in recorded and name in present else
                    f"it read {name}, which {checkpoint} lacks" if name in recorded else
                    f"it did not read {checkpoint}'s {name}")
            raise BenchmarkError(f"{flag}: exported from another checkpoint ({source.get('checkpoint')!r}): {what}; "
                                 "compare it against the checkpoint it was exported from, or re-export it from this one")


def depth(text: str) -> int:
    """--depth: a context length, or -1 for none."""
    value = int(text) if text.removeprefix("-").isdigit() else None
    if value is None or value < -1:
        raise argparse.ArgumentTypeError(f"{text} is not an integer of 0 or more (or -1 for no depths)")
    return value


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("checkpoint", type=existing_dir, help="the HF checkpoint every engine runs (ours: exported from it)")
    parser.add_argument("--artifact", type=artifact_spec, action="append", default=[],
                        help="PRECISION=DIR of one of our artifacts (repeat)")
    parser.add_argument("--llamacpp", type=llamacpp.gguf_types, default="F32,Q8_0,Q4_0",
                        help="GGUF types to measure ('' = skip llama.cpp)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--cache", type=Path, default=llamacpp.DEFAULT_CACHE, help="llama.cpp build/convert cache")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--prompt", type=positive_int, action="append", help="prefill prompt lengths (default 128 and 512)")
    parser.add_argument("--decode-prompt", type=positive_int, default=512)
    parser.add_argument("--depth", type=depth, action="append", help="decode after this many tokens of context too "
                        "(repeat; default 0, 512, 4096, 16384 — llama-bench -d; '--depth -1' for none)")
    parser.add_argument("--new-tokens", type=two_or_more, default=128)
    parser.add_argument("--rounds", type=positive_int, default=3, help="interleaved repetitions of every engine")
    parser.add_argument("--json", type=new_file, help="write every result here")
    parser.add_argument("--worker", choices=["transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.prompt = args.prompt or [128, 512]
    args.depth = [d for d in (args.depth or [0, 512, 4096, 16384]) if d >= 0]

    if args.worker == "transformers":
        result = transformers_worker(args.checkpoint, args.threads, args.prompt, args.decode_prompt, args.new_tokens,
                                     args.depth)
        args.json.write_text(json.dumps(result))
        return
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"{args.checkpoint} has no config.json; give a Hugging Face checkpoint directory")
    if not (args.artifact or args.llamacpp or not args.no_transformers):
        parser.error("nothing to measure: give --artifact PRECISION=DIR, --llamacpp TYPES or leave transformers on")

    config = Llama4Config.from_hf_dict(json.loads((args.checkpoint / "config.json").read_text()), source=str(args.checkpoint))
    hashes: dict[str, str] = {}
    for label, directory in args.artifact:
        check_artifact(label, directory, args.checkpoint, hashes)
    if args.llamacpp:
        llamacpp.announce_build(args.cache, "measure without llama.cpp: --llamacpp ''")
    print_machine(args.threads)
    positions = range(args.decode_prompt, args.decode_prompt + args.new_tokens - 1)
    # (engine, precision, KV bytes per step or None where the engine counts its own, measure-once callable)
    engines: list[tuple[str, str, float | None, object]] = []
    for precision, directory in args.artifact:
        engines.append(("llama4-export (onnxruntime)", precision, None, lambda d=directory: ours_once(d, args)))
    if args.llamacpp:
        files = llamacpp.convert(args.checkpoint, args.cache, args.llamacpp, jobs=args.threads)
        bin_dir = llamacpp.build(args.cache, llamacpp.source_dir(args.cache))
        for kind in args.llamacpp:
            weights = llamacpp.decode_bytes(files[kind], args.cache, config.num_local_experts)
            engines.append(("llama.cpp", kind, llamacpp_kv_bytes(config, positions),
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
    console.print(f"copy bandwidth {bandwidth:.1f} GB/s "
                  f"(rounds: {', '.join(f'{b:.1f}' for b in bandwidths)}); 1-min load average during the run: "
                  f"{', '.join(f'{v:.2f}' for v in loads)}", highlight=False)
    target_rows = targets(results, args.prompt, args.depth, args.decode_prompt)
    for row in target_rows:
        console.print(target_line(*row), highlight=False)
    if args.json:
        args.json.write_text(json.dumps({
            "checkpoint": str(args.checkpoint), "threads": args.threads, "rounds": args.rounds, "machine": machine,
            "bandwidth_gb_s": bandwidths, "load_avg_1m": loads, "results": results,
            "targets": [{"name": n, "value": v, "target": g, "kind": k} for n, v, g, k in target_rows],
        }, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    run_script(main)
