"""llama.cpp as a benchmark peer: fetch, build, convert a HF checkpoint to GGUF (F32, Q8_0, Q4_0), measure with llama-bench.

    python benchmarks/llamacpp.py ../bench/rand200m --types F32,Q8_0,Q4_0 --threads 2     # everything, prints JSON

Nothing of llama.cpp is committed here: the llama-cpp-python source distribution (which vendors llama.cpp, its
convert_hf_to_gguf.py and gguf-py) is fetched with pip into --cache (default ~/.cache/llama4-export-bench), and only
`llama-bench`, `llama-quantize` and `llama-server` (no web UI) are built there, CPU only, for the instruction sets
/proc/cpuinfo lists (GGML_NATIVE=OFF with explicit AVX2/AVX-512/VNNI/BF16 switches, AMX off: a native build died
with SIGILL/SIGSEGV on Q4_0/Q8_0 on an AMX Xeon), one build directory per set of switches (~15 min on 2 cores).
Every step is skipped when its output already exists, so a second run only measures.

    python benchmarks/llamacpp.py --build-only       # prints the bin directory (llama-server for a load test)

Conversion quirks handled here (see ../shared/checkpoints/README.md):
- the converter pins a torch we cannot install, and reads transformers-5 checkpoints only with transformers 4.x: it
  runs in its own venv (<cache>/convert-venv) holding transformers 4.57.6 and reusing this interpreter's packages
  (torch, numpy) through a .pth file;
- it rejects BPE pre-tokenizers it has no hash for: a wrapper makes that lookup fall back to 'llama4' (no edit of
  its file);
- a checkpoint without a tokenizer (the random benchmark model) gets l4-scoutlike's tokenizer.json (1024 tokens):
  the converter pads the vocabulary up to vocab_size with [PAD] tokens, which changes nothing for speed.
- llama.cpp hard-codes Scout's chunk size / floor scale / NoPE interval, so on small configs its outputs differ
  from the model's after the first chunk: compare its speed, never its text.

Decode is measured as llama-bench's tg test at depth --decode-prompt and at every --depth (`-d`: the tokens decoded
after that many tokens of context), prefill as its pp tests at depth 0; each repetition's tokens/s is kept (median,
min, max). Peak RSS is VmHWM polled every 10 ms, read together with the process name in one read of its status.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

from common import (  # benchmarks/, beside this script
    ArgumentParser, BenchmarkError, check_child, existing_dir, last_error_line, non_negative_int, positive_int,
    print_machine, run_script, summary, two_or_more)

SDIST_VERSION = "0.3.36"
CONVERTER_TRANSFORMERS = "transformers==4.57.6"
DEFAULT_CACHE = Path(os.environ.get("LLAMA4_BENCH_CACHE", Path.home() / ".cache" / "llama4-export-bench"))
FALLBACK_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "l4-scoutlike"
BUILD_TARGETS = ("llama-bench", "llama-quantize", "llama-server")

# Runs inside the converter venv: the vendored convert_hf_to_gguf.py with the pre-tokenizer lookup falling back to llama4.
CONVERT_WRAPPER = """
import sys
from pathlib import Path
root = Path(sys.argv.pop(1))
sys.path[:0] = [str(root), str(root / "gguf-py")]
from conversion.base import TextModel
original = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        return "llama4"
TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = str(root / "convert_hf_to_gguf.py")
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""

# Runs inside the converter venv: every tensor's name, shape and byte size in a GGUF file, as JSON.
GGUF_TENSORS = """
import json, sys
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[1]) / "gguf-py"))
from gguf import GGUFReader
r = GGUFReader(sys.argv[2])
print(json.dumps([[t.name, [int(d) for d in t.shape], int(t.n_bytes)] for t in r.tensors]))
"""


def log(message: str) -> None:
    print(f"[llamacpp] {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs) -> None:
    """A step of fetching, building or converting: its output goes on as it comes, its failure is its last error line."""
    log(" ".join(map(str, cmd)))
    check_child(list(map(str, cmd)), Path(str(cmd[0])).name, **kwargs)


def source_dir(cache: Path, version: str = SDIST_VERSION) -> Path:
    """The llama.cpp tree vendored by the llama-cpp-python sdist (downloaded with pip, extracted once)."""
    root = cache / f"llama_cpp_python-{version}"
    vendored = root / "vendor" / "llama.cpp"
    if (vendored / "CMakeLists.txt").is_file():
        return vendored
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(cache)])
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    return vendored


# x86 instruction sets ggml can compile for, by the /proc/cpuinfo flag(s) that must all be present. AMX stays off:
# llama.cpp's AMX path crashed (SIGILL/SIGSEGV) on Q4_0/Q8_0 on an AMX Xeon, and the native build (-march=native)
# turns it on by itself there, so builds are never native.
GGML_CPU_FEATURES = {
    "GGML_SSE42": ("sse4_2",), "GGML_AVX": ("avx",), "GGML_AVX2": ("avx2",), "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",), "GGML_BMI2": ("bmi2",), "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",), "GGML_AVX512_BF16": ("avx512_bf16",),
}
GGML_ALWAYS_OFF = ("GGML_NATIVE", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "GGML_CUDA", "GGML_METAL")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    raise BenchmarkError(f"{cpuinfo} lists no CPU flags; this script builds llama.cpp for x86 Linux only")


def ggml_options(flags: set[str]) -> dict[str, str]:
    """The CMake switches of a build for this CPU: every instruction set it has on, AMX and -march=native off."""
    options = {name: "ON" if all(f in flags for f in needed) else "OFF" for name, needed in GGML_CPU_FEATURES.items()}
    options.update({name: "OFF" for name in GGML_ALWAYS_OFF})
    return options


def build_dir(cache: Path, options: dict[str, str]) -> Path:
    """One build directory per set of switches, so a cache shared by machines of different CPUs keeps a build for each."""
    return cache / f"build-{hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]}"


def is_built(cache: Path) -> bool:
    bin_dir = build_dir(cache, ggml_options(cpu_flags())) / "bin"
    return all((bin_dir / t).is_file() for t in BUILD_TARGETS)


def announce_build(cache: Path, skip: str) -> None:
    """One line before a run fetches and builds llama.cpp (minutes it would otherwise spend silently); `skip` says how
    to run without it."""
    if not is_built(cache):
        log(f"llama.cpp is not built in {cache}: fetching llama-cpp-python {SDIST_VERSION}'s source with pip and "
            f"building {', '.join(BUILD_TARGETS)} there first (~15 min on 2 cores, once); to skip, {skip}")


def build(cache: Path, source: Path, jobs: int = 2) -> Path:
    """CPU-only build of llama-bench, llama-quantize and llama-server (no web UI) for the instruction sets this machine
    has; returns the bin directory."""
    options = ggml_options(cpu_flags())
    bin_dir = build_dir(cache, options) / "bin"
    if is_built(cache):
        return bin_dir
    log("llama.cpp for this CPU: " + " ".join(k.removeprefix("GGML_") for k, v in options.items() if v == "ON"))
    run(["cmake", "-S", str(source), "-B", str(bin_dir.parent), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
         "-DCMAKE_BUILD_TYPE=Release", *(f"-D{k}={v}" for k, v in sorted(options.items())), "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
         "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"], stdout=subprocess.DEVNULL)
    run(["cmake", "--build", str(bin_dir.parent), "--target", *BUILD_TARGETS, f"-j{jobs}"], stdout=subprocess.DEVNULL)
    (bin_dir.parent / "ggml-options.json").write_text(json.dumps(options, indent=2, sort_keys=True) + "\n")
    return bin_dir


def converter_python(cache: Path) -> Path:
    """A venv with transformers 4.x that sees this interpreter's packages (torch, numpy, safetensors) too."""
    venv = cache / "convert-venv"
    python = venv / "bin" / "python"
    marker = venv / ".ready"
    if marker.is_file():
        return python
    run([sys.executable, "-m", "venv", "--clear", str(venv)])
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # Appended after the venv's own site-packages, so the venv's transformers 4.x wins over ours.
    (site / "zz_llama4_export_host.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "-q", CONVERTER_TRANSFORMERS, "pyyaml", "tqdm", "sentencepiece"])
    marker.write_text("ok\n")
    return python


def staged_checkpoint(checkpoint: Path, work: Path, tokenizer_dir: Path) -> Path:
    """The checkpoint's files (symlinked) plus a tokenizer when it has none."""
    if (checkpoint / "tokenizer.json").is_file():
        return checkpoint
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise BenchmarkError(f"{checkpoint} has no tokenizer.json and the fallback {tokenizer_dir} has none either; pass --tokenizer DIR")
    staged = work / "hf"
    staged.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        (staged / path.name).unlink(missing_ok=True)
        (staged / path.name).symlink_to(path.resolve())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, staged / name)
    return staged


# llama-quantize's types (F32 is the converter's own output), checked before anything is fetched or built
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
              "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")


def gguf_types(text: str) -> list[str]:
    """An argparse type: comma-separated GGUF types ("" is none)."""
    types = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown GGUF type {', '.join(unknown)}; choose from {', '.join(GGUF_TYPES)}")
    return types


def convert(checkpoint: Path, cache: Path, types: list[str], tokenizer_dir: Path = FALLBACK_TOKENIZER, jobs: int = 2) -> dict[str, Path]:
    """GGUF files of the checkpoint for each type (F32 from the converter; the rest from llama-quantize)."""
    source = source_dir(cache)
    bin_dir = build(cache, source, jobs)
    out_dir = cache / "gguf" / checkpoint.resolve().name
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / "model-F32.gguf"
    if not f32.is_file():
        python = converter_python(cache)
        staged = staged_checkpoint(checkpoint, out_dir, tokenizer_dir)
        tmp = out_dir / "model-F32.gguf.partial"
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
            script.write(CONVERT_WRAPPER)
        try:
            run([str(python), script.name, str(source), str(staged), "--outtype", "f32", "--outfile", str(tmp)])
        finally:
            os.unlink(script.name)
        tmp.rename(f32)
    files = {"F32": f32}
    for kind in types:
        if kind == "F32":
            continue
        path = out_dir / f"model-{kind}.gguf"
        if not path.is_file():
            tmp = path.with_suffix(".gguf.partial")
            run([str(bin_dir / "llama-quantize"), str(f32), str(tmp), kind], stdout=subprocess.DEVNULL)
            tmp.rename(path)
        files[kind] = path
    return {k: files[k] for k in types}


def decode_bytes(gguf: Path, cache: Path, num_experts: int) -> int:
    """Bytes of one token's weights in a GGUF file: stacked expert tensors (*_exps) count one expert, the token
    embedding one row, everything else in full."""
    out = subprocess.check_output([str(converter_python(cache)), "-c", GGUF_TENSORS, str(source_dir(cache)), str(gguf)], text=True)
    total = 0
    for name, shape, size in json.loads(out):
        if "_exps" in name:
            size //= num_experts
        elif name == "token_embd.weight":
            size //= shape[-1]  # GGUF shapes are innermost first: [hidden, vocab]
        total += size
    return total


def _stats(values: list[float]) -> dict:
    import statistics

    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def llama_bench(bin_dir: Path, gguf: Path, args: list[str]) -> tuple[list[dict], float]:
    """llama-bench's JSON records and its peak RSS in MB (VmHWM, polled while it runs: it only ever grows)."""
    from llama4_export.evaluation.bench import peak_rss_mb

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-o", "json", *args]
        log(" ".join(cmd))
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)  # a file, not a pipe: its log would fill a pipe
        peak = 0.0
        while proc.poll() is None:
            # None before the exec (a forked copy of this big driver) and after the exit
            peak = max(peak, peak_rss_mb(proc.pid, name="llama-bench") or 0.0)
            time.sleep(0.01)
        if proc.returncode:
            err.seek(0)
            raise BenchmarkError(f"llama-bench failed (exit {proc.returncode}) on {gguf}: {last_error_line(err.read())}")
        out.seek(0)
        return json.load(out), peak


def measure(bin_dir: Path, gguf: Path, threads: int, prompts: list[int], decode_prompt: int, new_tokens: int, repeats: int,
            depths: list[int] = ()) -> dict:
    """Prefill (pp at depth 0) and decode (tg of new_tokens at decode_prompt and at each of `depths`)."""
    common = ["-t", str(threads), "-r", str(repeats)]
    pp, rss_pp = llama_bench(bin_dir, gguf, [*common, "-p", ",".join(map(str, prompts)), "-n", "0"])
    all_depths = sorted({decode_prompt, *depths})
    tg, rss_tg = llama_bench(bin_dir, gguf, [*common, "-p", "0", "-n", str(new_tokens), "-d", ",".join(map(str, all_depths))])
    prefill = {str(r["n_prompt"]): _stats(r["samples_ts"]) for r in pp if r["n_prompt"]}
    by_depth = {d: _stats([v for rec in tg if rec["n_depth"] == d for v in rec["samples_ts"]]) for d in all_depths}
    ttft = None
    if str(decode_prompt) in prefill:  # time to first token ≈ the prompt's prefill time (llama-bench has no TTFT)
        ttft = _stats(sorted(1e3 * decode_prompt / v for v in prefill[str(decode_prompt)]["runs"]))
    return {"prefill_tok_s": prefill, "decode_tok_s": by_depth[decode_prompt],
            "decode_depth_tok_s": {str(d): by_depth[d] for d in depths}, "ttft_ms": ttft,
            "peak_rss_mb": round(max(rss_pp, rss_tg), 1), "build": {"commit": pp[0].get("build_commit"), "cpu": pp[0].get("cpu_info")}}


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("checkpoint", type=existing_dir, nargs="?", help="HF Llama4ForCausalLM checkpoint directory")
    parser.add_argument("--types", type=gguf_types, default="F32,Q8_0,Q4_0")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--tokenizer", type=Path, default=FALLBACK_TOKENIZER, help="tokenizer.json source when the checkpoint has none")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--prompt", type=positive_int, action="append", help="prefill prompt lengths (default 128 and 512)")
    parser.add_argument("--decode-prompt", type=positive_int, default=512)
    parser.add_argument("--depth", type=non_negative_int, action="append", default=[], help="also decode after this many tokens (repeat)")
    parser.add_argument("--new-tokens", type=two_or_more, default=128)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--prepare-only", action="store_true", help="fetch, build and convert; measure nothing")
    parser.add_argument("--build-only", action="store_true", help="fetch and build; print the bin directory")
    args = parser.parse_args()
    if args.build_only:
        print(build(args.cache, source_dir(args.cache), args.threads))
        return
    if args.checkpoint is None:
        parser.error("give a checkpoint directory (or --build-only)")
    if not args.types:
        parser.error("--types is empty; give at least one GGUF type")
    files = convert(args.checkpoint, args.cache, args.types, args.tokenizer, args.threads)
    if args.prepare_only:
        print(json.dumps({k: str(v) for k, v in files.items()}, indent=2))
        return
    bin_dir = build(args.cache, source_dir(args.cache))
    print_machine(args.threads, sys.stderr)  # stdout is the JSON
    results = {k: measure(bin_dir, v, args.threads, args.prompt or [128, 512], args.decode_prompt, args.new_tokens, args.repeats,
                           args.depth)
               for k, v in files.items()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_script(main)
