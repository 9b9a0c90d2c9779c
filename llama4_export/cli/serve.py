"""`llama4-serve`: an OpenAI-compatible HTTP server over an exported artifact (serving/), continuous batching."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import Llama4ExportError
from ..serving import ServeSettings, load_engine, serve as serve_artifact
from .common import err_console, fail

serve_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                        help="Serve an exported Llama 4 artifact over the OpenAI HTTP API.")


@serve_app.command()
def serve(
    artifact: Path = typer.Argument(..., help="artifact directory (manifest.json)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    max_batch: int = typer.Option(8, "--max-batch", help="sequences decoded at once (rows of the KV cache)"),
    max_queue: int = typer.Option(64, "--max-queue", help="requests waiting for a row; beyond it: 429"),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="seconds a request may take (0 = none)"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="the model id clients send (default: DIR's name)"),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: ORT's choice)"),
    window: Optional[int] = typer.Option(None, help="global-layer KV window W in tokens"),
) -> None:
    """Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics until SIGTERM."""
    try:
        with err_console.status(f"loading {artifact}"):
            engine = load_engine(artifact, max_batch, max_queue, threads, window)
        settings = ServeSettings(model_name or artifact.resolve().name, request_timeout or None)
    except Llama4ExportError as exc:
        fail(exc)
    err_console.print(f"serving {settings.model_name} on http://{host}:{port}/v1 (max batch {max_batch})")
    serve_artifact(engine, settings, host, port)


def main() -> None:
    serve_app()
