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
    precision: str = typer.Option("fp32", "--precision", "-p", help="fp32 (more in later stages)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="artifact directory to write"),
    seed: int = typer.Option(0, help="seed of a preset's random weights"),
) -> None:
    """Export a model (a preset with seeded weights, or --checkpoint) to an artifact directory."""
    if ctx.invoked_subcommand is not None:
        return
    raise typer.BadParameter("the export pipeline lands with the export stage; use `llama4-export inspect` for now")


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


def export_main() -> None:
    export_app()


# ------------------------------------------------------------------------------------------------ llama4-run
def run_main() -> None:
    run_app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(export_app())
