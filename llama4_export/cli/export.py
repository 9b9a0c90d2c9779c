"""`llama4-export`: a thin typer layer over the Python API (api.py). Errors of ours print as one line and exit 2."""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import api
from ..artifact import check_writable, exit_on_signals, replace_json
from ..errors import ConfigError, Llama4ExportError, needs_exporter
from ..tensorrt import trt_onnx_support
from .common import console, err_console, fail, refused_writes, run_cli, version_option

export_app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Export Llama 4 to ONNX / TensorRT artifacts, and inspect them.",
)


# --------------------------------------------------------------------------------------------- llama4-export
@export_app.callback(invoke_without_command=True)
def export(
    ctx: typer.Context,
    version: bool = version_option("llama4-export"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="preset: scout, maverick, behemoth, scout-tiny, maverick-tiny"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Hugging Face checkpoint directory"),
    precision: str = typer.Option(
        "fp32", "--precision", "-p",
        help="fp32 | fp16 | bf16 (weights, activations, KV cache; bf16 for TensorRT / CUDA) | int4 (weight-only, blockwise) | "
             "fp8 (E4M3 W8A8), computing in fp32 on onnxruntime, fp16 on tensorrt; logits stay fp32",
    ),
    vision_precision: Optional[str] = typer.Option(
        None, "--vision-precision",
        help="fp32 | fp16 | bf16 | int4 | fp8: the vision tower's (multimodal checkpoints); default: --precision's float "
             "type, and with int4 / fp8 fp32 on onnxruntime, fp16 on tensorrt",
    ),
    text_only: bool = typer.Option(
        False, "--text-only", help="leave a multimodal checkpoint's vision tower out: no vision.onnx, decoder graphs "
                                   "without image inputs (a text-only deployment)",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="artifact directory to write; an existing one is replaced atomically if it is empty or a previous artifact",
    ),
    seed: int = typer.Option(0, help="seed of a preset's random weights"),
    max_prefill: Optional[int] = typer.Option(
        None, "--max-prefill", help="most tokens one prefill call takes, recorded in the manifest (default 512)",
    ),
    target: Optional[str] = typer.Option(
        None, "--target", "-t", help="onnxruntime | tensorrt: the lowering (default: tensorrt if installed, else onnxruntime)",
    ),
    trt_fallback: bool = typer.Option(False, "--trt-fallback", help="tensorrt target: standard-op MoE instead of the plugin node"),
    no_optimize: bool = typer.Option(False, "--no-optimize", help="keep the traced graphs: no fusion, no lowering"),
    passes_report: bool = typer.Option(False, "--passes-report", help="print the per-pass op-count table"),
    int4_algo: str = typer.Option("awq", "--int4-algo", help="int4: rtn | awq (activation-aware scales and clipping, calibrated; streams layer by layer)"),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="int4: 32 | 64 | 128 (default) values per scale along K"),
    calib_data: Optional[Path] = typer.Option(
        None, "--calib-data", help="calibration text: .txt, .jsonl (field 'text') or a directory of them, read with its subdirectories in path order (default: embedded corpus)",
    ),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="calibration sequences (default 128, fewer for tiny models)"),
    calib_seq_len: Optional[int] = typer.Option(None, "--calib-seq-len", help="tokens per calibration sequence (default 512, fewer for tiny models)"),
    calib_cache: Optional[Path] = typer.Option(
        None, "--calib-cache", help="calibration statistics file to reuse when it holds these inputs' (else computed and written there); default: ~/.cache/llama4-export/calib/<key of model, data, samples, seq len>",
    ),
    eval_data: Optional[Path] = typer.Option(
        None, "--eval-data", help="held-out text for the accuracy report (default: the embedded corpus's held-out slice)",
    ),
    no_report: bool = typer.Option(False, "--no-report", help="skip the accuracy report (report.json: the exported graphs against the fp32 PyTorch model on held-out text)"),
    quantize_lm_head: bool = typer.Option(False, "--quantize-lm-head", help="int4/fp8: lm_head like every linear (4-bit / fp8)"),
    float_embeddings: bool = typer.Option(
        False, "--float-embeddings", help="int4 on onnxruntime: keep the token embedding and lm_head in float (default: "
                                          "lm_head 8-bit, embedding 4-bit blockwise, as llama.cpp's Q4_0 preset)",
    ),
    calib_percentile: Optional[float] = typer.Option(
        None, "--calib-percentile", help="fp8: activation scales from this percentile of |x| (e.g. 99.99) instead of the max",
    ),
    kv_cache_dtype: Optional[str] = typer.Option(
        None, "--kv-cache-dtype", help="fp8 (with --precision fp8 / int4): E4M3 KV cache, calibrated per-layer K/V scales; "
                                       "default: the activations' float type",
    ),
    require_engine: bool = typer.Option(False, "--require-engine", help="tensorrt target: fail (exit 2) unless TensorRT and a GPU are here to build the engines"),
    max_batch: int = typer.Option(1, "--max-batch", help="tensorrt target: largest batch the engines take"),
    window: Optional[int] = typer.Option(None, "--window", help="tensorrt target: global-layer KV window W the engines are built for"),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="tensorrt target: timing cache to load and save (default OUT/engine/timing.cache)"),
    reproducible: bool = typer.Option(False, "--reproducible", help="tensorrt target: fail on a timing-cache miss instead of timing tactics"),
    stream: bool = typer.Option(
        False, "--stream", help="layer-streaming export: weights read one tensor at a time, RAM independent of model size",
    ),
    random_weights: bool = typer.Option(
        False, "--random-weights", help="with --model: shape-faithful random weights generated per tensor (streams)",
    ),
    layers: Optional[int] = typer.Option(
        None, "--layers", help="with --random-weights, or --model scout|maverick + --checkpoint: the preset's first N layers",
    ),
    partitions: int = typer.Option(
        1, "--partitions", help="split the decoder layers into N contiguous ranges, each its own graphs (part k on cuda:k)",
    ),
) -> None:
    """Export a model (a preset with seeded weights, or --checkpoint) to an artifact directory, then optimize it.

    With --target tensorrt the TensorRT engines are built too when TensorRT and a GPU are here; otherwise the last line
    says what to install (exit 0; --require-engine makes it an error)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        if out is None:
            raise ConfigError("--out DIR is required: the artifact directory to write")
        if passes_report and no_optimize:  # nothing would be printed
            raise ConfigError("--passes-report prints the graph passes' table, and --no-optimize runs none: drop one")
        quant = api.QuantOptions(int4_algo, block_size, calib_data, calib_samples, calib_seq_len, calib_cache, eval_data,
                             not no_report, quantize_lm_head, float_embeddings, calib_percentile, kv_cache_dtype)
        with refused_writes(out, hint=" (other files grew during the export?)"):  # past the disk check up front
            result = api.export_model(
                out, model, checkpoint, seed, precision, target, optimize=not no_optimize, trt_plugin=not trt_fallback,
                quant=quant, max_prefill=max_prefill, stream=stream, random_weights=random_weights, layers=layers,
                partitions=partitions, engines=api.EngineOptions(require_engine, max_batch, window, timing_cache,
                                                                 reproducible),
                vision_precision=vision_precision, text_only=text_only,
            )
    except Llama4ExportError as exc:
        fail(exc)
    if result.calibration is not None:
        calibration = result.calibration
        how = "reused from the cache" if calibration.reused else "computed"
        console.print(f"calibration {how} in {calibration.seconds:.2f} s "
                      f"({calibration.settings['samples']} × {calibration.settings['seq_len']} tokens)")
    if result.accuracy_report is not None:
        _print_report(result.accuracy_report)
    if passes_report and result.pass_reports:
        _print_pass_reports({name: r.to_json(measured=True) for name, r in result.pass_reports.items()})
    manifest = result.manifest
    size = sum((out / name).stat().st_size for name in manifest["files"])
    console.print(f"wrote {escape(str(out))}: {len(manifest['files'])} files, {size / 1e6:,.1f} MB ({manifest['precision']}, {manifest['target']})")
    if result.engine_line is not None:
        console.print(result.engine_line, markup=False, highlight=False, soft_wrap=True)


def _print_report(report: dict) -> None:
    table = Table(title=f"accuracy vs the fp32 model: {report['windows']} × {report['seq_len']} tokens of "
                        f"{report['eval_data']} ({report['tokens']} predictions)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("perplexity_reference", "perplexity_quantized", "perplexity_ratio", "kl_mean", "top1_agreement",
                "greedy_agreement_tokens"):
        table.add_row(key, f"{report[key]:.4f}")
    console.print(table)


@export_app.command()
def inspect(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="preset: scout, maverick, behemoth, scout-tiny, maverick-tiny"),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c",
        help="Hugging Face checkpoint directory (config.json alone is enough, before the weights are downloaded), or "
             "an exported artifact (the model its manifest records)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
) -> None:
    """Architecture summary: layers by kind, total/active parameters, weight bytes per precision, KV bytes per token."""
    try:
        summary = api.inspect_model(model, checkpoint)
    except Llama4ExportError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.2f} MB"


def _params(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e8 else f"{n / 1e6:,.3f} M"


def _print_summary(s: dict) -> None:
    console.print(f"[bold]{escape(s['name'])}[/]: {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
                  f"{s['num_experts']} experts (top-1 + shared), chunk {s['attention_chunk_size']}, "
                  f"QK norm {'on' if s['use_qk_norm'] else 'off'}, rope scaling {s['rope_scaling'] or 'none'}")
    t = Table(title="parameters")
    t.add_column("total", justify="right")
    t.add_column("active / token", justify="right")
    t.add_column("embedding + lm_head", justify="right")
    t.add_row(_params(s["total_params"]), _params(s["active_params"]), _params(s["embedding_params"]))
    console.print(t)
    t = Table(title="layers by kind (ffn/attention)")
    t.add_column("kind")
    t.add_column("count", justify="right")
    t.add_column("layers")
    for kind, count in s["layer_kinds"].items():
        idx = [str(layer["index"]) for layer in s["layers"] if f"{layer['ffn']}/{layer['attention']}" == kind]
        t.add_row(kind, str(count), ", ".join(idx) if len(idx) <= 16 else ", ".join(idx[:16]) + ", …")
    console.print(t)
    t = Table(title="weight bytes (router and norms stay bf16; embedding and lm_head too, except in int4 for ONNX "
                    "Runtime: lm_head 8-bit, embedding 4-bit)")
    for p in s["weight_bytes"]:
        t.add_column({"int4": "int4 (TensorRT)", "int4_onnxruntime": "int4 (ONNX Runtime)"}.get(p, p), justify="right")
    t.add_row(*(_gb(v) for v in s["weight_bytes"].values()))
    console.print(t)
    kv = s["kv_bytes_per_token"]
    t = Table(title=f"KV cache per token ({kv['dtype']})")
    t.add_column("attention")
    t.add_column("layers", justify="right")
    t.add_column("bytes / token", justify="right")
    t.add_column("bounded at")
    for kind in ("chunked", "global"):
        cap = kv[kind]["capped_at_tokens"]
        t.add_row(kind, str(kv[kind]["layers"]), f"{kv[kind]['bytes_per_token']:,}", f"{cap:,} tokens" if cap else "window W (sliding)")
    console.print(t)
    if "vision" in s:
        v = s["vision"]
        t = Table(title="vision encoder (with its pixel-shuffle adapter and the projector)")
        for name in ("parameters", "bf16", "fp8", "int4", "layers × hidden", "tile / patch px", "tokens / tile"):
            t.add_column(name, justify="right")
        t.add_row(_params(v["params"]), *(_gb(v[f"weight_bytes_{p}"]) for p in ("bf16", "fp8", "int4")),
                  f"{v['num_hidden_layers']} × {v['hidden_size']}",
                  f"{v['image_size']} / {v['patch_size']}", str(v["tokens_per_tile"]))
        Console(width=max(console.width, 100)).print(t)


@export_app.command()
def plan(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="preset: scout, maverick, behemoth, scout-tiny, maverick-tiny"),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c",
        help="Hugging Face checkpoint directory (config.json alone is enough, before the weights are downloaded)"),
    precision: str = typer.Option("bf16", "--precision", "-p", help="weights: fp32 | fp16 | bf16 | fp8 | int4"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="h100-80gb | h200-141gb | l40s-48gb | a100-40gb | rtx4090-24gb | jetson-orin-64gb"),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="memory of one GPU instead of --gpu, e.g. 24GB or 80GiB"),
    gpus: int = typer.Option(1, "--gpus", help="GPUs the decoder layers are split over (contiguous ranges, as --partitions)"),
    max_batch: int = typer.Option(1, "--max-batch", help="sequences decoded together (the KV cache and workspace scale with it)"),
    max_prefill: int = typer.Option(512, "--max-prefill", help="tokens per prefill call (the attention workspace scales with it)"),
    kv_dtype: Optional[str] = typer.Option(
        None, "--kv-dtype", help="KV cache: bf16 | fp16 | fp32 | fp8 (default: the graphs' float type, as export caches)"),
    window: Optional[int] = typer.Option(None, "--window", help="check this global window W instead of finding the largest"),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="int4: 32 | 64 | 128 values per scale (default: export's, 128 unless the model's sizes need smaller)"),
    max_tiles: Optional[int] = typer.Option(None, "--max-tiles", help="image tiles encoded at once (default 17: one Scout image, 16 tiles + the global one)"),
    vision_precision: Optional[str] = typer.Option(
        None, "--vision-precision",
        help="fp32 | fp16 | bf16 | int4 | fp8: the vision tower's, as export's (default: the text graphs' float type)"),
    text_only: bool = typer.Option(False, "--text-only", help="leave the vision tower out (a text-only deployment: export --text-only)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
) -> None:
    """GPU memory plan: weights (the vision tower's too), KV cache per layer kind, workspace, the largest global window W;
    exit 1 if it does not fit."""
    try:
        result = api.plan_gpu_memory(model, checkpoint, precision, gpu, gpu_memory, text_only=text_only, gpus=gpus,
                             max_batch=max_batch, max_prefill=max_prefill, kv_dtype=kv_dtype, window=window,
                             block_size=block_size, max_tiles=max_tiles, vision_precision=vision_precision)
    except Llama4ExportError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_plan(result)
    if not result.fits:
        raise typer.Exit(1)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _print_plan(p) -> None:
    console.print(f"[bold]{escape(p.model)}[/] {p.precision} weights, {p.kv_dtype} KV cache, batch {p.max_batch}, prefill "
                  f"{p.max_prefill} tokens on {p.gpus} × {p.gpu} ({_gib(p.gpu_memory_bytes)} each)", highlight=False)
    kv = p.kv_bytes_per_token
    t = Table(title=f"KV cache per token ({kv['per_layer']:,} B per layer)")
    for name in ("attention", "layers", "bytes / token", "slots held", "bytes at W"):
        t.add_column(name, justify="left" if name == "attention" else "right")
    for kind in ("chunked", "global"):
        k = kv[kind]
        t.add_row(kind, str(k["layers"]), f"{k['bytes_per_token']:,}", f"{k['slots']:,}",
                  _gib(k["bytes_per_token"] * k["slots"] * p.max_batch))
    console.print(t)
    t = Table(title="per GPU (workspace = hidden + max(attention, ffn) + new K/V + logits, one prefill call"
                    + ("; or one image encode if larger)" if p.vision else ")"))
    columns = ("GPU", "layers", "weights", *(("vision",) if p.vision else ()), "KV chunked", "KV global", "workspace",
               "reserve", "total", "free")
    for name in columns:
        t.add_column(name, justify="right")
    for g in p.per_gpu:
        t.add_row(str(g.index), f"{g.layers[0]}–{g.layers[1] - 1}", _gib(g.weight_bytes),
                  *((_gib(g.vision_weight_bytes),) if p.vision else ()), _gib(g.kv_chunked_bytes),
                  _gib(g.kv_global_bytes), _gib(g.workspace_bytes), _gib(g.reserve_bytes), _gib(g.total_bytes),
                  _gib(g.free_bytes))
    Console(width=max(console.width, 120)).print(t)
    if p.vision:
        v = p.vision
        console.print(f"vision tower on GPU 0: {v['params'] / 1e9:,.2f} B parameters, {_gib(v['weight_bytes'])} in "
                      f"{v['precision']}; one encode of {v['max_tiles']} tiles ({v['tokens_per_tile']} tokens each) "
                      f"needs {_gib(v['encode_workspace_bytes'])} (--text-only leaves it out)", highlight=False)
    bound = {"memory": "the most that fits", "context": "the whole context fits", "requested": "as requested"}[p.window_limit]
    if p.fits:
        console.print(f"[bold green]fits[/]: global window W = {p.window:,} tokens ({bound}); weights {_gib(p.weight_bytes)} in all",
                      highlight=False)
    else:
        # a requested W is what the table shows (it "fit" as the largest W before); else the one-chunk minimum
        at = (f"the requested W = {p.window:,}" if p.window_limit == "requested" else
              f"W = {p.min_window:,} (one attention chunk); largest W that fits: {p.window:,}")
        console.print(f"[bold red]does not fit[/]: {_gib(p.missing_bytes)} missing on the fullest GPU at {at} — try "
                      f"more --gpus, {'' if p.precision == 'int4' else 'a lower --precision, '}a smaller --max-prefill / "
                      "--max-batch, or a bigger GPU",
                      highlight=False)


@export_app.command()
def passes(
    directory: Path = typer.Argument(..., help="artifact directory written by `llama4-export --out`"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="onnxruntime | tensorrt (default: the one the export traced for: tensorrt after --no-optimize --target tensorrt, else onnxruntime)"),
    verify: bool = typer.Option(False, "--verify", help="run ONNX Runtime after every pass; fail if an output moves by more than --tolerance × its max"),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="--verify's bound, relative to each output's max magnitude (default 1e-4)"),
    trt_fallback: bool = typer.Option(False, "--trt-fallback", help="tensorrt target: standard-op MoE instead of the plugin node"),
    report_only: bool = typer.Option(False, "--report", help="print the stored pass report of an optimized artifact; change nothing"),
) -> None:
    """Optimize an artifact's graphs in place (fuse the MoE routing, RMSNorm, RoPE; lower for the target) and print the report."""
    try:
        changes = [flag for flag, given in (("--target", target is not None), ("--verify", verify),
                                            ("--tolerance", tolerance is not None),
                                            ("--trt-fallback", trt_fallback)) if given]
        if report_only and changes:  # the stored report is printed as it is: these were ignored
            raise ConfigError(f"--report prints the stored report and changes nothing; {changes[0]} applies to "
                              "optimizing: drop one")
        if tolerance is not None and not verify:
            raise ConfigError(f"--tolerance {tolerance:g} bounds --verify's check, which is not asked for; add --verify "
                              "or drop it")
        if report_only:
            reports = api.stored_pass_reports(directory)
        else:
            with refused_writes(directory):
                _, results = api.optimize_artifact(directory, target, verify=verify,
                                                   **({} if tolerance is None else {"tolerance": tolerance}),
                                                   trt_plugin=not trt_fallback)
            reports = {name: report.to_json(measured=True) for name, report in results.items()}
    except Llama4ExportError as exc:
        fail(exc)
    _print_pass_reports(reports)


def _print_pass_reports(reports: dict[str, dict]) -> None:
    from ..graph_passes.manager import report_tables  # onnx_ir: imported by the commands that print reports

    for name, report in reports.items():
        for table in report_tables(name, report):
            console.print(table)
        for note in report.get("notes", []):
            console.print(f"note: {note}", markup=False, highlight=False)


@export_app.command()
def bench(
    directory: Path = typer.Argument(..., help="artifact directory written by `llama4-export --out`"),
    prompt: list[int] = typer.Option([128, 512], "--prompt", help="prefill prompt length(s) in tokens (repeat the option)"),
    decode_prompt: int = typer.Option(512, "--decode-prompt", help="prompt length before the timed decode"),
    new_tokens: int = typer.Option(128, "--new-tokens", "-n", help="tokens decoded after --decode-prompt"),
    depth: list[int] = typer.Option([], "--depth", help="also decode after this many tokens of context (repeat; llama-bench -d)"),
    repeats: int = typer.Option(3, "--repeats", "-r", help="repetitions of every measurement (median and range reported)"),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: ORT's choice)"),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | torch | tensorrt"),
    window: Optional[int] = typer.Option(None, help="global-layer KV window W (default: the context, RAM-capped; on a GPU: `plan`'s W)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results to this JSON file"),
) -> None:
    """Prefill and decode tokens/s, time to first token, peak RSS and decode as a fraction of the memory-bandwidth bound."""
    try:
        if json_out is not None and json_out.is_dir():  # found out before the minutes of measuring, as below
            raise ConfigError(f"--json {json_out}: is a directory; give a file path, e.g. {json_out / 'bench.json'}")
        if json_out is not None and not json_out.parent.is_dir():  # found out before the minutes of measuring
            raise ConfigError(f"--json {json_out}: its directory {json_out.parent} does not exist; create it or write "
                             "elsewhere")
        if json_out is not None:
            check_writable(json_out, "--json", ConfigError)
        with needs_exporter():
            from ..evaluation.bench import result_table  # onnx: imported by this command only
        with err_console.status(f"benchmarking {escape(str(directory))}"):
            result = api.bench_artifact(directory, prompt, decode_prompt, new_tokens, repeats, threads, backend, window=window,
                                          depths=depth)
    except Llama4ExportError as exc:
        fail(exc)
    Console(width=max(console.width, 150)).print(result_table([result]))  # unreadable when wrapped into 80 columns
    roof, machine = result["roofline"], result["machine"]
    console.print(
        f"roofline: {roof['bandwidth_gb_s']:.1f} GB/s copy bandwidth / {roof['decode_bytes_per_token'] / 1e6:,.1f} MB read "
        f"per decode step = {roof['bound_tok_s']:,.1f} tok/s bound; {machine['cpu']}, {machine['cores']} cores "
        f"({' '.join(machine['cpu_flags']) or 'no listed kernel flags'}), load {machine.get('load_avg_1m', '?')}",
        highlight=False,
    )
    if json_out is not None:
        try:
            replace_json(json_out, result)
        except OSError as exc:
            fail(f"--json {json_out}: cannot write it ({exc.strerror or exc})")


# ------------------------------------------------------------------------------ TensorRT: lint, build, compare, rebuild
@export_app.command()
def lint(directory: Path = typer.Argument(..., help="tensorrt-lowered artifact directory")) -> None:
    """TensorRT conformance lint (no TensorRT needed): ops/dtypes, INT4/FP8 Q/DQ form, strong typing, plugin nodes."""
    try:
        results = api.lint_artifact(directory)
    except Llama4ExportError as exc:
        fail(exc)
    total = sum(len(v) for v in results.values())
    for file, violations in results.items():
        for violation in violations:
            console.print(violation.format(str(directory / file)), markup=False, highlight=False, soft_wrap=True)
    checked = f"against TensorRT {trt_onnx_support.TENSORRT_VERSION} ({trt_onnx_support.SOURCE})"
    if total:
        err_console.print(f"[bold red]{total} violation(s)[/] in {', '.join(f for f, v in results.items() if v)} {checked}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"{', '.join(results)}: no violations {checked}", highlight=False, soft_wrap=True)


@export_app.command()
def build(
    directory: Path = typer.Argument(..., help="tensorrt-lowered artifact directory"),
    max_batch: int = typer.Option(1, "--max-batch", help="largest batch the engines take"),
    max_prefill: Optional[int] = typer.Option(None, "--max-prefill", help="most new tokens per prefill call (default: the exported limit)"),
    window: Optional[int] = typer.Option(None, "--window", help="global-layer KV window W the engines are built for (default: `plan`'s W for this GPU)"),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="timing cache to load and save (default DIR/engine/timing.cache)"),
    reproducible: bool = typer.Option(False, "--reproducible", help="fail on a timing-cache miss instead of timing tactics"),
    workspace_gib: Optional[float] = typer.Option(None, "--workspace-gib", help="builder workspace memory limit"),
    version_compatible: bool = typer.Option(False, "--version-compatible", help="version-compatible engine, lean runtime excluded"),
) -> None:
    """Build TensorRT engines (engine/*.plan) for a tensorrt-lowered artifact; needs TensorRT and a GPU."""
    try:
        manifest = api.build_engines(directory, max_batch=max_batch, max_prefill=max_prefill, window=window,
                                 timing_cache=timing_cache, reproducible=reproducible, workspace_gib=workspace_gib,
                                 version_compatible=version_compatible)
    except Llama4ExportError as exc:
        fail(exc)
    info = manifest["tensorrt"]
    console.print(f"built {', '.join(e['file'] for e in info['engines'].values())} with TensorRT {info['version']} "
                  f"on {info['gpu']['name']}", highlight=False, soft_wrap=True)


@export_app.command()
def compare(
    directory: Path = typer.Argument(..., help="artifact directory"),
    tolerance: float = typer.Option(1e-2, "--tolerance", help="fail when an output deviates by more than this × its max"),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="the checkpoint the artifact was exported from, for the PyTorch reference of "
                                         "an optimized artifact exported from a checkpoint (not a preset)"),
) -> None:
    """ONNX Runtime vs TensorRT on the same inputs (Polygraphy); ORT vs PyTorch when TensorRT or engines are absent."""
    try:
        if not tolerance >= 0:
            raise ConfigError(f"--tolerance {tolerance:g}: must be >= 0 (an output's deviation relative to its max "
                              "magnitude)")
        comparisons, notes = api.compare_artifact(directory, checkpoint=checkpoint)
    except Llama4ExportError as exc:
        fail(exc)
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    failed = False
    for c in comparisons:
        if c.reference == "none":
            console.print(f"{c.graph}: ran on ONNX Runtime, not compared (quantized: no reference)", highlight=False,
                          soft_wrap=True)
            continue
        output, value = c.worst
        failed |= not value <= tolerance
        console.print(f"{c.graph}: onnxruntime vs {c.reference}: max deviation {value:.3g} × max|ref| ({output}); "
                      f"logits {c.deviations.get('logits', float('nan')):.3g}", highlight=False, soft_wrap=True)
    if failed:
        err_console.print(f"[bold red]deviation above --tolerance {tolerance:g}[/]", soft_wrap=True)
        raise typer.Exit(1)


@export_app.command()
def rebuild(
    directory: Path = typer.Argument(..., help="artifact directory to reproduce"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="the checkpoint it was exported from (when not a preset)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="keep the rebuilt artifact here (default: a temp dir)"),
    calib_data: Optional[Path] = typer.Option(None, "--calib-data", help="the calibration text it was exported with (when not the embedded corpus)"),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="the held-out text its accuracy report was made on (when not the embedded corpus)"),
) -> None:
    """Re-run the pipeline the manifest records and compare every file hash; print the files that differ."""
    try:
        # without --out the rebuilt artifact (as large as the original) goes to a temp directory under TMPDIR
        target, hint = ((out, "") if out is not None else
                        (Path(tempfile.gettempdir()), " (the rebuild's temp directory: give --out or set TMPDIR elsewhere)"))
        with refused_writes(target, hint=hint):
            result = api.rebuild(directory, checkpoint=checkpoint, out=out, calib_data=calib_data, eval_data=eval_data)
    except Llama4ExportError as exc:
        fail(exc)
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if result.differences:
        # every differing file, not the first only: which ones differ (report.json alone, or model.data) says where to look
        kept = (f"; the rebuilt artifact is in {out}" if out is not None else
                "; rebuild with --out DIR to keep the rebuilt artifact and compare the files")
        err_console.print(f"not reproducible: {len(result.differences)} of {len(result.compared)} files differ{kept}",
                          markup=False, highlight=False, soft_wrap=True)
        for difference in result.differences:
            err_console.print(f"  {difference}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"reproducible: {len(result.compared)} files byte-identical", highlight=False, soft_wrap=True)


@export_app.command()
def report(
    directory: Path = typer.Argument(..., help="artifact directory (left as it is: nothing is written into it)"),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", "-c", help="the checkpoint it was exported from (when not a preset), or where it is now; "
                                         "its files must hash as the manifest records"),
    eval_data: Optional[Path] = typer.Option(
        None, "--eval-data", help="held-out text: .txt, .jsonl (field 'text') or a directory of them (default: the "
                                  "embedded corpus's held-out slice, as export's report)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (report.json's) instead of the table"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the JSON to this file (outside the artifact)"),
) -> None:
    """The accuracy report export writes as report.json (perplexity vs the fp32 PyTorch model, KL, top-1 and greedy
    agreement), of an existing artifact: one exported with --no-report, on your own --eval-data, or built elsewhere."""
    try:
        with err_console.status(f"accuracy report of {escape(str(directory))}"):
            result = api.report_artifact(directory, checkpoint=checkpoint, eval_data=eval_data, out=out)
    except Llama4ExportError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print_report(result)


def main() -> None:
    # a cancelled CI job, `kill`, Ctrl-C, a closed terminal (SIGHUP): the export's temp directories (at Scout's size
    # hundreds of GB) go with it
    exit_on_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    run_cli(export_app)
