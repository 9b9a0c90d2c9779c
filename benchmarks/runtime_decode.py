"""Prefill and decode speed of the Generator (graph + sliding-cache writes + sampling) on an exported artifact.

    python benchmarks/runtime_decode.py out/scoutlike-fp32 --threads 2
    python benchmarks/runtime_decode.py --checkpoint ../shared/checkpoints/l4-scoutlike   # exports to a temp dir first

Greedy, no stop tokens; the prompt is random ids. Decode tokens/s counts the tokens after the first one (whose time
is the prefill). Best of --repeats runs, since a shared machine only ever adds time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from llama4_export.runtime.generator import BACKENDS

from common import (  # benchmarks/, beside this script
    ArgumentParser, existing_dir, positive_int, print_machine, run_script, summary, two_or_more)


def measure(artifact: Path, backend: str, threads: int, prompt_tokens: int, new_tokens: int, window: int | None, repeats: int) -> dict:
    from llama4_export.runtime import Generator

    gen = Generator.load(artifact, backend=backend, threads=threads, window=window)
    prompt = np.random.default_rng(0).integers(0, gen.config.vocab_size, prompt_tokens).tolist()
    best = None
    for _ in range(repeats):
        stamps: list[float] = []
        start = time.perf_counter()
        gen.generate(prompt, max_new_tokens=new_tokens, stop_tokens=[], stream=lambda e: stamps.append(time.perf_counter()))
        prefill_s = stamps[0] - start
        decode_s = stamps[-1] - stamps[0]
        run = {"prefill_tok_s": prompt_tokens / prefill_s, "decode_tok_s": (new_tokens - 1) / decode_s}
        best = run if best is None or run["decode_tok_s"] > best["decode_tok_s"] else best
    return {"backend": backend, "threads": threads, "window": gen.window, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, **best}


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("artifact", nargs="?", type=existing_dir)
    parser.add_argument("--checkpoint", type=existing_dir, help="export this checkpoint (fp32) to a temp dir first")
    parser.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--prompt-tokens", type=positive_int, default=100)
    parser.add_argument("--new-tokens", type=two_or_more, default=128)
    parser.add_argument("--window", type=positive_int, default=None)
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    if (args.artifact is None) == (args.checkpoint is None):
        parser.error("give an artifact directory or --checkpoint DIR (one of them)")
    print_machine(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            from llama4_export import api

            artifact = Path(tmp) / "artifact"
            api.export_model(artifact, checkpoint=args.checkpoint, optimize=False)
        r = measure(artifact, args.backend, args.threads, args.prompt_tokens, args.new_tokens, args.window, args.repeats)
    print(f"{r['backend']}, {r['threads']} threads, W={r['window']}: prefill {r['prompt_tokens']} tokens "
          f"{r['prefill_tok_s']:.0f} tok/s, decode {r['new_tokens']} tokens {r['decode_tok_s']:.1f} tok/s")


if __name__ == "__main__":
    run_script(main)
