"""Command line: a thin typer layer over the Python API. Errors of ours print as one line and exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import Llama4ExportError

console = Console()
err_console = Console(stderr=True)

export_app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Export Llama 4 to ONNX / TensorRT artifacts, and inspect them.",
)
run_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="Run an exported Llama 4 artifact.")


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _config_for(model: Optional[str], checkpoint: Optional[Path]):
    """The preset's config, or a checkpoint's config after checking every tensor's name and shape (headers only)."""
    from .model import get_preset
    from .model.loader import check_checkpoint

    if (model is None) == (checkpoint is None):
        raise typer.BadParameter("give exactly one of --model PRESET or --checkpoint DIR")
    if checkpoint is not None:
        return check_checkpoint(checkpoint).config
    return get_preset(model)


# --------------------------------------------------------------------------------------------- llama4-export
@export_app.callback(invoke_without_command=True)
def export(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="preset: scout, maverick, behemoth, scout-tiny, maverick-tiny"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Hugging Face checkpoint directory"),
    precision: str = typer.Option("fp32", "--precision", "-p", help="fp32 or fp16 (weights, activations and KV cache; logits stay fp32)"),
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
) -> None:
    """Export a model (a preset with seeded weights, or --checkpoint) to an artifact directory, then optimize it."""
    if ctx.invoked_subcommand is not None:
        return
    from .errors import ConfigError
    from .export import ModelSource, export_artifact
    from .graph_passes import optimize_artifact, passes_for

    try:
        if out is None:
            raise ConfigError("--out DIR is required: the artifact directory to write")
        if target is not None:
            passes_for(target)  # an unknown target fails before the export
        source = ModelSource(preset=model, seed=seed, checkpoint=checkpoint)
        limits = {} if max_prefill is None else {"max_prefill": max_prefill}
        manifest = export_artifact(out, source, precision=precision, **limits)
        if not no_optimize:
            manifest, reports = optimize_artifact(out, target, trt_plugin=not trt_fallback)
            if passes_report:
                _print_pass_reports({name: r.to_json(measured=True) for name, r in reports.items()})
    except Llama4ExportError as exc:
        _fail(exc)
    size = sum((out / name).stat().st_size for name in manifest["files"])
    console.print(f"wrote {out}: {len(manifest['files'])} files, {size / 1e6:,.1f} MB ({manifest['precision']}, {manifest['target']})")


@export_app.command()
def inspect(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="preset: scout, maverick, behemoth, scout-tiny, maverick-tiny"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Hugging Face checkpoint directory"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
) -> None:
    """Architecture summary: layers by kind, total/active parameters, weight bytes per precision, KV bytes per token."""
    from .model import summarize

    try:
        summary = summarize(_config_for(model, checkpoint))
    except Llama4ExportError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.2f} MB"


def _params(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e8 else f"{n / 1e6:,.3f} M"


def _print_summary(s: dict) -> None:
    console.print(f"[bold]{s['name']}[/]: {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
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
    t = Table(title="weight bytes (router, embeddings, norms, lm_head stay bf16)")
    for p in s["weight_bytes"]:
        t.add_column(p, justify="right")
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


@export_app.command()
def passes(
    directory: Path = typer.Argument(..., help="artifact directory written by `llama4-export --out`"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="onnxruntime | tensorrt (default: tensorrt if installed, else onnxruntime)"),
    verify: bool = typer.Option(False, "--verify", help="run ONNX Runtime after every pass; fail if an output moves by more than --tolerance × its max"),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="verify bound, relative to each output's max magnitude"),
    trt_fallback: bool = typer.Option(False, "--trt-fallback", help="tensorrt target: standard-op MoE instead of the plugin node"),
    report_only: bool = typer.Option(False, "--report", help="print the stored pass report of an optimized artifact; change nothing"),
) -> None:
    """Optimize an artifact's graphs in place (fuse the MoE routing, RMSNorm, RoPE; lower for the target) and print the report."""
    from .artifact import read_manifest
    from .graph_passes import PASSES_FILE, optimize_artifact
    from .graph_passes.errors import GraphPassError

    try:
        if report_only:
            manifest = read_manifest(directory)
            if "graph_passes" not in manifest:
                raise GraphPassError(f"{directory}: not optimized yet; run `llama4-export passes {directory}`")
            reports = json.loads((directory / PASSES_FILE).read_text(encoding="utf-8"))
        else:
            _, results = optimize_artifact(directory, target, verify=verify, tolerance=tolerance, trt_plugin=not trt_fallback)
            reports = {name: report.to_json(measured=True) for name, report in results.items()}
    except Llama4ExportError as exc:
        _fail(exc)
    _print_pass_reports(reports)


def _print_pass_reports(reports: dict[str, dict]) -> None:
    from .graph_passes.manager import report_tables

    for name, report in reports.items():
        for table in report_tables(name, report):
            console.print(table)
        for note in report.get("notes", []):
            console.print(f"note: {note}", highlight=False)


def export_main() -> None:
    export_app()


# ------------------------------------------------------------------------------------------------ llama4-run
@run_app.command()
def run(
    directory: Path = typer.Argument(..., help="artifact directory (or, with --backend torch, a HF checkpoint)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="text prompt (needs tokenizer.json in DIR)"),
    ids: Optional[str] = typer.Option(None, "--ids", help='prompt as token ids, e.g. "1,2,3"'),
    chat: bool = typer.Option(False, "--chat", help="interactive chat: one user message per stdin line, until EOF"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off"),
    top_p: float = typer.Option(1.0, "--top-p", help="1 = off"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="1 = off"),
    seed: int = typer.Option(0, help="seed of the sampler"),
    stream: bool = typer.Option(False, "--stream", help="print tokens as they are generated"),
    window: Optional[int] = typer.Option(None, help="global-layer KV window W in tokens (default: the context, RAM-capped)"),
    sinks: int = typer.Option(4, help="sink tokens S kept forever once the sequence outgrows W"),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | torch"),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: ORT's choice)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (prompt_ids, token_ids, text, stop_reason)"),
) -> None:
    """Generate a continuation of a prompt (greedy unless --temperature) with the sliding KV cache."""
    from .runtime import GenerationError, Generator

    options = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed,
    )
    try:
        if (prompt is not None) + (ids is not None) + chat != 1:
            raise GenerationError("give exactly one of --prompt TEXT, --ids 1,2,3 or --chat")
        with err_console.status(f"loading {directory}"):
            generator = Generator.load(directory, backend=backend, window=window, sinks=sinks, threads=threads)
        if chat:
            _chat_loop(generator, stream, options)
            return
        tokens = _parse_ids(ids) if ids is not None else prompt
        on_token = _piece_printer() if stream and not as_json else None
        result = generator.generate(tokens, stream=on_token, **options)
    except Llama4ExportError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps({"prompt_ids": result.prompt_ids, "token_ids": result.token_ids, "text": result.text,
                          "stop_reason": result.stop_reason}))
    elif stream:
        print(flush=True)
    else:
        print(result.text if result.text is not None else ",".join(map(str, result.token_ids)))


def _parse_ids(text: str) -> list[int]:
    from .runtime import GenerationError

    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise GenerationError(f"--ids {text!r}: expected comma-separated integers, e.g. \"1,2,3\"") from None


def _piece_printer():
    """Stream callback: each token's text, or comma-separated ids when the artifact has no tokenizer."""
    printed = 0

    def print_piece(event) -> None:
        nonlocal printed
        if event.stop:
            return
        sys.stdout.write(event.text if event.text is not None else f"{',' if printed else ''}{event.token_id}")
        sys.stdout.flush()
        printed += 1

    return print_piece


def _chat_loop(generator, stream: bool, options: dict) -> None:
    """Each stdin line is a user turn; the whole conversation is re-rendered and re-fed every turn."""
    messages: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            err_console.print("[bold]>[/] ", end="")
        line = sys.stdin.readline()
        if not line:  # EOF
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        result = generator.generate(generator.chat_prompt(messages), stream=_piece_printer() if stream else None, **options)
        if stream:
            print(flush=True)
        else:
            print(result.text, flush=True)
        messages.append({"role": "assistant", "content": result.text})


def run_main() -> None:
    run_app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(export_app())
