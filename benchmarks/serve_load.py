"""Load test: N concurrent streaming clients against `llama4-serve` and, in the same run on the same weights,
llama.cpp's `llama-server -np N` (continuous batching), both on /v1/completions with stream: true.

    python benchmarks/serve_load.py /tmp/bench/r200l-int4 --gguf ~/.cache/llama4-export-bench/gguf/rand200m-long/model-Q4_0.gguf \\
        --clients 1,8 --requests 48 --max-tokens 64 --prompt-words 48 --threads 2 --json serve-load.json
    python benchmarks/serve_load.py … --shared-prefix-words 100 --prompt-words 16   # a system prompt every request shares
    python benchmarks/serve_load.py … --serve-arg=--reuse-prefix --serve-arg=0      # llama4-serve without prefix reuse
    python benchmarks/serve_load.py … --peer-arg=--swa-full   # llama-server keeps chunked layers' K/V: prefixes reusable

Each client sends its requests one after another (a new one as soon as the previous ends) until the phase's request
count is reached; every request asks for exactly --max-tokens tokens (ignore_eos) after the same kind of prompt.
Reported per server and client count: aggregate output tokens/s (tokens / the phase's wall time), time to first token
p50/p99 (request sent → first streamed token), inter-token latency p50/p99 (between streamed chunks of a request),
errors (non-200 answers or broken streams; 429s counted apart), and the server's RSS after the first 100 requests and
at the end (ours; --rss-requests). Each server runs in its own process with --threads threads; both are started
(and warmed up) first and stay up, and the phases are interleaved: ours at the first client count, llama-server at
it, ours at the next, ... (the idle server waits on its socket), so a load change hits both alike. Last, the
profile: one decode step of our engine at each client count's batch, in this process.
llama-server comes from benchmarks/llamacpp.py's build (`--build-only` prints its bin directory).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402  (benchmarks/ is a script folder, not a package)

from llama4_export.runtime import Generator  # noqa: E402
from llama4_export.runtime.batching import BatchEngine, EngineOptions, SequenceRequest  # noqa: E402

from common import (  # benchmarks/, beside this script
    ArgumentParser, BenchmarkError, existing_dir, existing_file, last_error_line, machine_json, new_file, non_negative_int,
    positive_int, positive_ints, print_machine, run_script)

console = Console(width=160)
WORDS = "the history of science is a long story of small steps and patient work by many people over centuries".split()
SYSTEM_WORDS = "keep every answer short clear and kind and explain each step before the next one".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, errors: IO[str], seconds: float = 300) -> None:
    """Until `url` answers 200; a server that exits first is its own last error line (`errors`: its stderr)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            errors.seek(0)
            raise BenchmarkError(f"{Path(process.args[0]).name} exited with {process.returncode} before it was ready: "
                                 f"{last_error_line(errors.read())}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {seconds} s")


def rss_mb(pid: int) -> float:
    """A process's current RSS in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6  # KiB → MB, as peak_rss_mb
    return float("nan")


def prompt_text(i: int, words: int, shared_words: int = 0) -> str:
    """Prompt i: its number, then `words` words. Every prompt of a run differs from its first token on, so no server
    answers from a prompt cache (llama-server reuses a slot's KV for a prompt it has seen: a repeated prompt costs it
    no prefill) — unless `shared_words` > 0: then every prompt starts with the same text of that many words (a system
    prompt), which both servers may take from the KV a finished request left behind."""
    own = f"{i}. " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))
    if not shared_words:
        return own
    return "You answer in the voice of a patient teacher. " + " ".join(
        SYSTEM_WORDS[k % len(SYSTEM_WORDS)] for k in range(shared_words)) + "\n\n" + own


def new_http_client() -> httpx.Client:
    """A fresh connection per request (llama-server drops reused keep-alive connections under load), one client."""
    return httpx.Client(timeout=600, limits=httpx.Limits(max_keepalive_connections=0))


def one_request(http: httpx.Client, base: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: send time, chunk arrival times, status. `http` is the client thread's own httpx.Client
    (new_http_client), kept across its requests: a new httpx.Client per request costs ≈ 20 ms of CPU (its TLS context),
    and 8 clients creating theirs at once added up to 180 ms to the measured time to first token."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    stamps: list[float] = []  # arrival of every chunk with a choice (both servers send one per token)
    tokens, cached = 0, None
    try:
        with http.stream("POST", f"{base}/v1/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                return {"status": response.status_code, "stamps": [], "sent": sent, "tokens": 0}
            done = False
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        stamps.append(time.perf_counter())
                    usage = chunk.get("usage") or {}
                    tokens = usage.get("completion_tokens", tokens)
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", cached)
        return {"status": 200 if done else "broken", "stamps": stamps, "sent": sent, "tokens": tokens, "cached": cached}
    except httpx.HTTPError as exc:
        return {"status": type(exc).__name__, "stamps": stamps, "sent": sent, "tokens": 0}


def phase(base: str, model: str, clients: int, requests: int, max_tokens: int, words: int, pid: int | None,
          rss_after: int, first_prompt: int, shared_words: int = 0) -> dict:
    """`requests` streamed completions from `clients` concurrent clients (prompts first_prompt, first_prompt + 1, …);
    latency percentiles and throughput."""
    counter = iter(range(first_prompt, first_prompt + requests))
    results: list[dict] = []
    rss_first: list[float] = []

    def client() -> None:
        with new_http_client() as http:
            for i in counter:
                results.append(one_request(http, base, model, prompt_text(i, words, shared_words), max_tokens))
                if pid is not None and len(results) == rss_after:
                    rss_first.append(rss_mb(pid))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    ttft = sorted(r["stamps"][0] - r["sent"] for r in ok if r["stamps"])
    itl = sorted(b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:]))
    tokens = sum(r["tokens"] for r in ok)  # the usage both servers report
    cached = [r["cached"] for r in ok if r["cached"] is not None]  # prompt tokens a server says it did not prefill
    return {
        "clients": clients, "requests": len(results), "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1), "tokens": tokens,
        "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1), "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1),
        "itl_p50_ms": round(1000 * percentile(itl, 50), 1), "itl_p99_ms": round(1000 * percentile(itl, 99), 1),
        "errors": sum(r["status"] not in (200, 429) for r in results), "rejected_429": sum(r["status"] == 429 for r in results),
        "cached_tokens_mean": round(statistics.mean(cached), 1) if cached else None,
        "rss_after_first_mb": round(rss_first[0], 1) if rss_first else None,
        "rss_end_mb": round(rss_mb(pid), 1) if pid is not None else None,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def decode_step_ms(artifact: Path, batches: list[int], threads: int, steps: int = 24, rounds: int = 3) -> dict:
    """The profile behind the throughput ratio, in this process: the median time of one engine decode step with
    `batch` sequences decoding, per batch size (rounds interleaved, so load changes hit every size alike)."""
    generator = Generator.load(artifact, threads=threads)
    engines = {b: BatchEngine(generator, EngineOptions(max_batch=b)) for b in batches}
    times: dict[int, list[float]] = {b: [] for b in batches}
    prompt = generator.encode(prompt_text(0, 32))
    for _ in range(rounds):
        for batch, engine in engines.items():
            sequences = [engine.submit(SequenceRequest(prompt, steps + batch + 1, stop_tokens=frozenset()))
                         for _ in range(batch)]
            while any(s.fed < len(prompt) for s in sequences):  # prefill every row first
                engine.step()
            for _ in range(steps):
                start = time.perf_counter()
                engine.step()
                times[batch].append(time.perf_counter() - start)
            for seq in sequences:
                engine.cancel(seq)
            engine.step()
    return {b: round(1000 * statistics.median(t), 2) for b, t in times.items()}


@contextmanager
def running_server(name: str, command: list[str], base: str, model: str, prompt_words: int, env=None):
    """Starts a server, waits until it answers and warms it up; yields its process, terminates it on leaving."""
    console.print(f"[bold]{name}[/]: {' '.join(command)}")
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a server's log would fill a pipe and stall it
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=env)
    try:
        wait_ready(f"{base}/health", process, errors)
        with new_http_client() as http:
            one_request(http, base, model, prompt_text(0, prompt_words), 4)  # warm-up (no shared start)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)
        errors.close()


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=existing_dir)
    parser.add_argument("--gguf", type=existing_file, help="the same weights as GGUF: also run llama-server on them")
    parser.add_argument("--clients", type=positive_ints, default="1,8", help="comma-separated concurrent client counts")
    parser.add_argument("--requests", type=positive_int, default=48, help="requests per phase")
    parser.add_argument("--max-tokens", type=positive_int, default=64)
    parser.add_argument("--prompt-words", type=positive_int, default=48)
    parser.add_argument("--shared-prefix-words", type=non_negative_int, default=0,
                        help="every prompt starts with the same text of this many words (a system prompt)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--rss-requests", type=positive_int, default=100, help="RSS is sampled after this many requests")
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra llama4-serve argument (repeat)")
    parser.add_argument("--peer-arg", action="append", default=[], help="an extra llama-server argument (repeat)")
    parser.add_argument("--cache", type=Path, default=llamacpp.DEFAULT_CACHE)
    parser.add_argument("--json", type=new_file)
    args = parser.parse_args()
    if not args.clients:
        parser.error("--clients is empty; give comma-separated client counts, as 1,8")
    if args.gguf:
        llamacpp.announce_build(args.cache, "drop --gguf (llama4-serve alone)")
    machine = machine_json(print_machine(args.threads), args.threads)
    most = max(args.clients)

    port = free_port()
    ours = [sys.executable, "-c", "from llama4_export.cli.serve import main; main()", str(args.artifact), "--port",
            str(port), "--threads", str(args.threads), "--max-batch", str(most), "--max-queue", str(4 * most),
            "--model-name", "bench", *args.serve_arg]
    servers = [("llama4-serve", ours, f"http://127.0.0.1:{port}", None)]
    if args.gguf:
        bin_dir = llamacpp.build(args.cache, llamacpp.source_dir(args.cache))
        port = free_port()
        context = most * (4 * (args.prompt_words + args.shared_prefix_words) + args.max_tokens + 64)
        peer = [str(bin_dir / "llama-server"), "-m", str(args.gguf), "-t", str(args.threads), "-np", str(most),
                "-c", str(context), "--host", "127.0.0.1", "--port", str(port), "--no-webui", *args.peer_arg]
        servers.append((f"llama-server -np {most}", peer, f"http://127.0.0.1:{port}",
                        {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}))
    rows = []
    load = [os.getloadavg()[0]]
    with ExitStack() as stack:
        running = [(name, base, stack.enter_context(running_server(name, command, base, "bench", args.prompt_words, env)))
                   for name, command, base, env in servers]
        for n, clients in enumerate(args.clients):  # each phase its own prompts, the same for every server
            for name, base, process in running:
                row = phase(base, "bench", clients, args.requests, args.max_tokens, args.prompt_words, process.pid,
                            args.rss_requests, first_prompt=1 + n * args.requests, shared_words=args.shared_prefix_words)
                row["server"] = name
                rows.append(row)
                console.print(row)
            load.append(os.getloadavg()[0])

    table = Table("server", "clients", "requests", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                  "ITL p99 ms", "errors", "429s", "cached tokens (mean)")
    for r in rows:
        table.add_row(r["server"], str(r["clients"]), str(r["requests"]), f"{r['tokens_per_s']:.1f}",
                      f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p99_ms']:.0f}", f"{r['itl_p50_ms']:.1f}",
                      f"{r['itl_p99_ms']:.1f}", str(r["errors"]), str(r["rejected_429"]),
                      "n/a" if r["cached_tokens_mean"] is None else f"{r['cached_tokens_mean']:.1f}")
    console.print(table)
    steps = decode_step_ms(args.artifact, sorted({1, *args.clients}), args.threads)
    console.print(f"llama4-serve's engine, one decode step (ms) by sequences decoding: {steps}")
    console.print(f"load average (1 min) at start / after each client count: {load}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows,
                                         "decode_step_ms": steps, "load_avg_1m": load, "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    run_script(main)
