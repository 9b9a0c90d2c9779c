"""`llama4-export bench ARTIFACT`: prefill/decode speed, time to first token, peak RSS and the memory-bandwidth roofline.

    result = bench_artifact("out/scout-fp32", repeats=3)   # JSON-ready dict; print_results(result) prints the table

What is measured (greedy, random prompt ids, no stop tokens; first one warm-up run per prompt length, since ONNX
Runtime's first run of a shape allocates its buffers — llama.cpp reserves its own when the context is created):
- prefill tokens/s for each prompt length: prompt tokens / time to the first new token;
- decode tokens/s: batch 1, `new_tokens` after a `decode_prompt`-token prompt, counting the tokens after the first
  (whose time is the prefill);
- time to first token (ms) of that decode run's prompt;
- peak RSS (VmHWM) of the process that runs the engine: a fresh interpreter that loads only the runtime (and torch
  for the torch backend alone), whatever the caller holds — the CLI holds the exporter and torch, ~200 MB that no
  runtime process (`llama4-run`, `llama4-serve`, an embedding app) loads;
- the roofline: this machine's memory bandwidth (a large multi-threaded copy) divided by the bytes one decode step
  must read (weights touched by one token: attention, dense/shared MLPs, ONE routed expert per MoE layer, the
  lm_head, one embedding row, plus the valid KV entries) = the bandwidth-bound decode tokens/s.
Every timed metric is repeated; the median and the spread (min..max) are reported, since a shared machine adds noise.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import onnx

from ..artifact import ArtifactError, child_process, end_with_parent, held_temp_directory, read_manifest
from ..errors import Llama4ExportError
from ..runtime import Generator
from ..runtime.generator import BACKENDS
from ..runtime.ort_backend import artifact_parts

# ONNX ops whose expert-weight inputs are stacked [num_experts, ...]: a top-1 token reads one slice of them
# (the unoptimized graph picks the slice with GatherND instead).
MOE_OPS = frozenset({"MoE", "QMoE", "Llama4MoE"})
PREFILL_RUN_TOKENS = 2  # a prefill measurement's warm-up: the prompt and one decode step
# (op, input index) of tables a token reads one row of: the embedding's Gather, and its int4 form (packed data and
# per-row scales of GatherBlockQuantized, graph_passes/lower_linears.py, gathered along axis 0 like the data)
TABLE_ROWS_GATHERED = frozenset({("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2)})
# a bench's scratch (the engine's result file) in the temp directory: a held_directory, so that the next bench removes
# one a SIGKILLed bench left (the OOM killer, a CI runner's hard kill: no handler runs) and not a running bench's
SCRATCH_PREFIX = "llama4-bench-"


class BenchError(Llama4ExportError):
    """A benchmark was asked for something the artifact or the options cannot give."""


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median and range of repeated measurements."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def memory_bandwidth_gb_s(threads: int = 2, megabytes: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second, GB/s): best of `repeats` copies of a buffer far beyond cache.

    The copy is split over `threads` Python threads (numpy releases the GIL while copying), since one core alone
    often cannot saturate the memory bus.
    """
    n = megabytes * (1 << 20) // 8
    src = np.ones(n, np.float64)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(n), max(1, threads))
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


# The CPU flags that decide which kernels ONNX Runtime and llama.cpp can use (reported with every measurement).
KERNEL_CPU_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                    "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                present = set(line.split(":", 1)[1].split())
                flags = [f for f in KERNEL_CPU_FLAGS if f in present]
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "platform": platform.platform()}
    if hasattr(os, "getloadavg"):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


def peak_rss_mb(pid: int | str = "self", name: str | None = None) -> float | None:
    """Peak resident set size of a process in MB (10^6 bytes, as the GB/s and MB elsewhere here): VmHWM on Linux,
    else ru_maxrss (this process only).

    VmHWM belongs to the process's current address space, so unlike ru_maxrss it does not inherit the RSS of the
    parent that forked it (Linux carries ru_maxrss across exec: a child of a big benchmark driver would look big).
    For another process: None once it has exited (its status then has no VmHWM) and, given `name`, while its
    command name is another one (a forked copy of the driver before its exec). Name and VmHWM come from one read
    of /proc/PID/status, so they describe the same address space.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        status = None
    if status is not None:
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if name is not None and fields.get("Name", "").strip() != name[:15]:  # the kernel keeps 15 characters
            return None
        if "VmHWM" in fields:
            return int(fields["VmHWM"].split()[0]) * 1024 / 1e6  # the kernel's "kB" are KiB
    if pid != "self":
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if platform.system() == "Darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux


def initializer_bytes(tensor: onnx.TensorProto) -> int:
    """An initializer's stored bytes, whether in the model file or in its external data (not loaded)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int({e.key: e.value for e in tensor.external_data}["length"])
    return len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes


def decode_weight_bytes(graph_path: Path, num_experts: int) -> int:
    """Bytes of the decode graph's initializers one token reads: stacked expert weights count one expert's slice,
    per-expert weights inside `If` branches (INT4 experts on ONNX Runtime, graph_passes/lower.py: one branch taken
    per token) one expert's share, a gathered table (the embedding, float or 4-bit) one row; everything else in full."""
    model = onnx.load(str(graph_path), load_external_data=False)
    uses: dict[str, list[tuple[str, int]]] = {}

    def collect(graph, branch_of: str | None) -> None:
        for node in graph.node:
            for index, name in enumerate(node.input):
                uses.setdefault(name, []).append((branch_of or node.op_type, index))
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    collect(attribute.g, branch_of or node.op_type)

    collect(model.graph, None)
    total = 0
    for tensor in model.graph.initializer:
        size = initializer_bytes(tensor)
        consumers = uses.get(tensor.name, [])
        dims = list(tensor.dims)
        if consumers and all(op == "If" for op, _ in consumers):
            size /= num_experts
        elif dims and dims[0] == num_experts and consumers and all(
            op in MOE_OPS or (op == "GatherND" and i == 0) for op, i in consumers  # fused MoE, or the traced top-1 gather
        ):
            size //= num_experts
        elif dims and consumers and all((op, i) in TABLE_ROWS_GATHERED for op, i in consumers):
            size //= dims[0]
        total += size
    return int(total)


def kv_bytes_read(config, positions: Sequence[int], dtype_bytes: int, window: int | None) -> float:
    """Mean bytes of valid K and V entries a decode step attends to over the given positions."""
    per_token = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    chunk = config.attention_chunk_size
    total = 0
    for p in positions:
        for layer in range(config.num_hidden_layers):
            if config.uses_rope(layer) and chunk:
                tokens = p % chunk + 1
            else:
                tokens = p + 1 if window is None else min(p + 1, window)
            total += tokens * per_token
    return total / max(1, len(positions))


def bench_artifact(
    directory: str | Path, prompt_lengths: Sequence[int] = (128, 512), decode_prompt: int = 512, new_tokens: int = 128,
    repeats: int = 3, threads: int | None = None, backend: str = "onnxruntime", bandwidth: float | None = None,
    seed: int = 0, window: int | None = None, depths: Sequence[int] = (),
) -> dict[str, Any]:
    """Measure one artifact (see the module docstring). bandwidth: a GB/s figure measured elsewhere (None = measure);
    window: the global layers' KV slots (None = the runtime default, the whole context; llama-bench instead sizes its
    context to each test, which --window decode_prompt + new_tokens mirrors); depths: also decode `new_tokens`
    after each of these context lengths (llama-bench's -d; depth 0 = a one-token prompt). The engine runs in a
    fresh interpreter, so the peak RSS is the engine's alone."""
    directory = Path(directory)
    for name, value, least in (("repeats", repeats, 1), ("new_tokens", new_tokens, 2), ("decode_prompt", decode_prompt, 1),
                               *(("prompt length", p, 1) for p in prompt_lengths), *(("depth", d, 0) for d in depths)):
        if value < least:  # the one named: "--depth -1" was answered about repeats, new tokens and prompts
            raise BenchError(f"{name}={value}: must be >= {least}")
    if backend not in (*BACKENDS, "torch"):
        raise BenchError(f"backend {backend!r} is unknown; choose one of: {', '.join((*BACKENDS, 'torch'))}")
    # A missing or foreign artifact fails here, in one line, before a process starts; the engine's loader in that
    # process checks the files' hashes, once (a Scout artifact is tens of GB to read).
    read_manifest(directory, verify=False)
    settings = {"directory": str(directory), "prompt_lengths": list(prompt_lengths), "decode_prompt": decode_prompt,
                "new_tokens": new_tokens, "repeats": repeats, "threads": threads, "backend": backend,
                "bandwidth": bandwidth, "seed": seed, "window": window, "depths": list(depths)}
    from ..progress import note  # here: rich (~3 MB) stays out of the engine's process, whose peak RSS is measured

    # a stop signal to this process alone (`kill PID`, a CI runner's SIGTERM) takes the engine's process and the temp
    # directory with it: they were left measuring on for minutes, orphaned, and behind in TMPDIR
    with contextlib.ExitStack() as stack:
        try:
            # first removing a SIGKILLed bench's, which stayed in TMPDIR for good
            scratch = stack.enter_context(held_temp_directory(SCRATCH_PREFIX, note))
        except ArtifactError as exc:  # mkdir refused (a full disk): the line names the temp directory and TMPDIR
            raise BenchError(f"{exc} (the benchmark's temp directory: set TMPDIR to a writable directory with room)") \
                from None
        out = scratch / "result.json"
        command = [sys.executable, "-m", __name__, json.dumps(settings), str(out), str(os.getpid())]
        with child_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
            stderr = process.communicate()[1]
        if process.returncode != 0:
            lines = stderr.strip().splitlines()
            raise BenchError(lines[-1] if lines else f"the benchmark process of {directory} exited with {process.returncode}")
        return json.loads(out.read_text())


def _measure(directory: str, prompt_lengths: list[int], decode_prompt: int, new_tokens: int, repeats: int,
             threads: int | None, backend: str, bandwidth: float | None, seed: int, window: int | None,
             depths: list[int]) -> dict[str, Any]:
    """bench_artifact's measurement, run in the engine's own process."""
    directory = Path(directory)
    manifest = read_manifest(directory, verify=False)  # the loader below verifies the hashes
    if backend == "torch":
        from .torch_backend import torch_generator  # torch only for this backend: no other engine's memory holds it

        gen = torch_generator(directory, window)
    else:
        gen = Generator.load(directory, backend=backend, threads=threads, window=window)
    config = gen.config
    runs = [("--prompt", max(prompt_lengths, default=0), PREFILL_RUN_TOKENS, ""),  # (flag, prompt, generated, hint)
            ("--decode-prompt", decode_prompt, new_tokens, " (or fewer --new-tokens)"),
            ("--depth", max(depths, default=0), new_tokens, " (or fewer --new-tokens)")]
    for flag, length, generated, hint in runs:
        if length + generated > config.max_position_embeddings:
            raise BenchError(
                f"{directory}: {flag} {length} + {generated} generated tokens = {length + generated} tokens exceed the "
                f"model's {config.max_position_embeddings} positions; pass a shorter {flag}{hint}"
            )
    rng = np.random.default_rng(seed)
    vocab = config.vocab_size

    def prompt(n: int) -> list[int]:
        return rng.integers(0, vocab, n).tolist()

    def timed(ids: list[int], count: int) -> list[float]:
        stamps: list[float] = []
        start = time.perf_counter()
        gen.generate(ids, max_new_tokens=count, stop_tokens=[], stream=lambda e: stamps.append(time.perf_counter()))
        return [start, *stamps]

    for n in sorted(set(prompt_lengths)):  # warm-up: ORT's first run of each prompt's piece shapes allocates
        timed(prompt(n), PREFILL_RUN_TOKENS)
    prefill = {n: [] for n in prompt_lengths}
    decode, ttft = [], []
    at_depth: dict[int, list[float]] = {d: [] for d in depths}
    for _ in range(repeats):  # interleaved, so a load change on the machine hits every metric alike
        for n in prompt_lengths:
            start, first = timed(prompt(n), 1)
            prefill[n].append(n / (first - start))
        start, first, *rest = timed(prompt(decode_prompt), new_tokens)
        ttft.append(1e3 * (first - start))
        decode.append((new_tokens - 1) / (rest[-1] - first))
        for depth in depths:
            _, first, *rest = timed(prompt(max(depth, 1)), new_tokens)
            at_depth[depth].append((new_tokens - 1) / (rest[-1] - first))

    peak_rss = peak_rss_mb()  # before the bandwidth copy, whose buffers are not the engine's
    # every part's graph that runs a decode step (a partitioned artifact lists its graphs in the parts' manifests)
    parts, _ = artifact_parts(directory, manifest, config)
    weight_bytes = sum(decode_weight_bytes(part.decode, config.num_local_experts) for part in parts)
    positions = range(decode_prompt, decode_prompt + new_tokens - 1)
    kv = kv_bytes_read(config, positions, np.dtype(gen.backend.cache_dtype).itemsize, gen.window)
    bandwidth = memory_bandwidth_gb_s(threads or os.cpu_count() or 1) if bandwidth is None else bandwidth
    decode_stats = spread(decode)
    bound = bandwidth * 1e9 / (weight_bytes + kv)
    return {
        "engine": f"llama4-export ({backend})",
        "artifact": str(directory),
        "precision": manifest.get("precision"),
        "target": manifest.get("target"),
        "threads": threads,
        "machine": machine_info(),
        "settings": {"prompt_lengths": list(prompt_lengths), "decode_prompt": decode_prompt, "new_tokens": new_tokens,
                     "repeats": repeats, "window": gen.window, "depths": list(depths)},
        "prefill_tok_s": {str(n): spread(v) for n, v in prefill.items()},
        "decode_tok_s": decode_stats,
        "decode_depth_tok_s": {str(d): spread(v) for d, v in at_depth.items()},
        "ttft_ms": spread(ttft),
        "peak_rss_mb": round(peak_rss, 1),
        "roofline": {
            "bandwidth_gb_s": round(bandwidth, 2),
            "decode_bytes_per_token": int(weight_bytes + kv),
            "weight_bytes_per_token": weight_bytes,
            "kv_bytes_per_token": int(kv),
            "bound_tok_s": round(bound, 2),
            "fraction_of_bound": round(decode_stats["median"] / bound, 4),
        },
    }


def _cell(stats: dict[str, Any], digits: int = 1) -> str:
    return f"{stats['median']:,.{digits}f} ({stats['min']:,.{digits}f}–{stats['max']:,.{digits}f})"


def result_table(results: Sequence[dict[str, Any]], title: str = "benchmark (median, min–max over repeats)"):
    """One rich Table row per result dict (bench_artifact's format; peers use the same keys)."""
    from rich.table import Table

    table = Table(title=title)
    lengths = sorted({n for r in results for n in r["prefill_tok_s"]}, key=int)
    table.add_column("engine")
    for n in lengths:
        table.add_column(f"prefill {n} tok/s", justify="right")
    depths = sorted({d for r in results for d in r.get("decode_depth_tok_s", {})}, key=int)
    for name in ("decode tok/s", *(f"decode @{d}" for d in depths), "TTFT ms", "peak RSS MB", "% of BW bound"):
        table.add_column(name, justify="right")
    for r in results:
        name = r["engine"] + (f" {r['precision']}" if r.get("precision") else "")
        roof = r.get("roofline") or {}
        fraction = f"{100 * roof['fraction_of_bound']:.0f} %" if roof.get("fraction_of_bound") is not None else "–"
        row = [name]
        row += [_cell(r["prefill_tok_s"][n], 0) if n in r["prefill_tok_s"] else "–" for n in lengths]
        row += [_cell(r["decode_tok_s"])]
        row += [_cell(r["decode_depth_tok_s"][d]) if d in r.get("decode_depth_tok_s", {}) else "–" for d in depths]
        row += [_cell(r["ttft_ms"], 0) if r.get("ttft_ms") else "–",
                f"{r['peak_rss_mb']:,.0f}" if r.get("peak_rss_mb") else "–", fraction]
        table.add_row(*row)
    return table


def _main(settings_json: str, out: str, parent: str) -> None:
    """The engine's process: `python -m llama4_export.evaluation.bench SETTINGS_JSON OUT_JSON PARENT_PID`."""
    end_with_parent(int(parent))  # a SIGKILLed bench left it measuring on for minutes, orphaned
    try:
        result = _measure(**json.loads(settings_json))
    except Llama4ExportError as exc:
        print(exc, file=sys.stderr)  # the last line, which bench_artifact raises again
        sys.exit(1)
    try:
        Path(out).write_text(json.dumps(result))
    except OSError as exc:  # the write names no file: the line names the temp directory and the way around it
        print(f"{Path(out).parent.parent}: cannot write the benchmark's result file in this temp directory "
              f"({exc.strerror or exc}); free space there or set TMPDIR to a directory with room", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _main(*sys.argv[1:])
