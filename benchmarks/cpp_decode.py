"""Decode tokens/s of the C++ runtime (llama4-cpp) against the Python runtime (Generator) on one artifact, interleaved.

    make cpp
    python benchmarks/cpp_decode.py /tmp/bench/r200-int4 --threads 2 --window 640 --rounds 5

Both: greedy, no stop tokens, the same random prompt (512 ids), 128 new tokens; decode tokens/s = the tokens after the
first over the time since the first was chosen (benchmarks/runtime_decode.py's convention; llama4-cpp --stats
measures it the same way around its own generate call). Every round runs Python then C++, so load hits both alike;
the ratio of the medians is the number to quote, with the load average and the machine (CPU, flags) beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llama4_export.evaluation.bench import machine_info
from llama4_export.runtime import Generator

from common import (  # benchmarks/, beside this script
    ArgumentParser, check_child, existing_dir, positive_int, print_machine, run_script, summary, two_or_more)

REPO = Path(__file__).resolve().parents[1]


def python_round(gen, prompt: list[int], new_tokens: int) -> float:
    stamps: list[float] = []
    gen.generate(prompt, max_new_tokens=new_tokens, stop_tokens=[], stream=lambda e: stamps.append(time.perf_counter()))
    return (new_tokens - 1) / (stamps[-1] - stamps[0])


def cpp_round(binary: Path, artifact: Path, prompt: list[int], new_tokens: int, threads: int, window: int) -> float:
    done = check_child([str(binary), str(artifact), "--ids", ",".join(map(str, prompt)), "-n", str(new_tokens),
                        "--no-stop", "--stats", "--threads", str(threads), "--window", str(window)],
                       f"{binary.name} on {artifact}", stdout=subprocess.DEVNULL)
    return json.loads(done.stderr.strip().splitlines()[-1])["decode_tok_s"]


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("artifact", type=existing_dir, help="artifact directory (manifest.json) both runtimes load")
    parser.add_argument("--binary", type=Path, default=REPO / "cpp" / "build" / "llama4-cpp",
                        help="the llama4-cpp executable (default: cpp/build/llama4-cpp, built by `make cpp`)")
    parser.add_argument("--threads", type=positive_int, default=2,
                        help="threads of both runtimes (default %(default)s)")
    parser.add_argument("--window", type=positive_int, default=640,
                        help="global-layer KV window W in tokens, both runtimes (default %(default)s)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=512,
                        help="random prompt length in tokens (default %(default)s)")
    parser.add_argument("--new-tokens", type=two_or_more, default=128,
                        help="tokens generated per run; decode tok/s counts those after the first (default "
                             "%(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=5,
                        help="interleaved rounds, Python then C++ in each (default %(default)s)")
    args = parser.parse_args()
    if not args.binary.is_file():  # the default is checked too, unlike a type= on a default that is not a string
        parser.error(f"--binary {args.binary} does not exist; build it with `make cpp` or give its path")

    print_machine(args.threads, sys.stderr)  # stdout is the JSON
    gen = Generator.load(args.artifact, threads=args.threads, window=args.window)
    prompt = np.random.default_rng(0).integers(0, gen.config.vocab_size, args.prompt_tokens).tolist()
    load_before = os.getloadavg()
    python, cpp = [], []
    for _ in range(args.rounds):
        python.append(python_round(gen, prompt, args.new_tokens))
        cpp.append(cpp_round(args.binary, args.artifact, prompt, args.new_tokens, args.threads, args.window))
    load_after = os.getloadavg()
    result = {
        "artifact": str(args.artifact), "threads": args.threads, "window": args.window,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "python_decode_tok_s": python, "cpp_decode_tok_s": cpp,
        "python_median": statistics.median(python), "cpp_median": statistics.median(cpp),
        "cpp_over_python": statistics.median(cpp) / statistics.median(python),
        "load_average_1m": [round(load_before[0], 2), round(load_after[0], 2)], "machine": machine_info(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_script(main)
