"""`llama4-serve`: an OpenAI-compatible HTTP server over an exported artifact (serving/), continuous batching; with
--ray, the same app as a Ray Serve deployment of N replicas."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..errors import Llama4ExportError
from ..runtime import Generator
from ..runtime.ort_backend import check_threads
from ..runtime.batching import DEFAULT_REUSE_PREFIX_TOKENS, EngineOptions
from ..serving import (DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES, DEFAULT_MAX_REQUEST_BYTES, ServeSettings,
                       check_listen_address, check_ray_address, host_port, listen_socket, load_engine, serve as serve_engine)
from .common import err_console, fail, run_cli, version_option

serve_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                        help="Serve an exported Llama 4 artifact over the OpenAI HTTP API.")


@serve_app.command()
def serve(
    artifact: Path = typer.Argument(..., help="artifact directory (manifest.json)"),
    version: bool = version_option("llama4-serve"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="TCP port"),
    max_batch: int = typer.Option(8, "--max-batch", help="sequences decoded at once (rows of the KV cache)"),
    max_queue: int = typer.Option(64, "--max-queue", help="requests waiting for a row; beyond it: 429"),
    reuse_prefix: int = typer.Option(DEFAULT_REUSE_PREFIX_TOKENS, "--reuse-prefix",
                                     help="fewest prompt tokens a request takes over from a free row's last sequence "
                                          "instead of prefilling them (0 = never)"),
    prefill_budget: Optional[int] = typer.Option(None, "--prefill-budget",
                                                 help="most prompt tokens a step feeds while others decode (smoother "
                                                      "streams, less throughput; default: the artifact's prefill limit)"),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="seconds a request may take (0 = none)"),
    max_request_bytes: int = typer.Option(DEFAULT_MAX_REQUEST_BYTES, "--max-request-bytes",
                                          help="largest request body; a bigger one gets 413 (0 = no limit)"),
    max_image_pixels: int = typer.Option(DEFAULT_MAX_IMAGE_PIXELS, "--max-image-pixels",
                                         help="most pixels (width × height) of a chat image; a bigger one gets 400, "
                                              "read from its header before it is decoded"),
    max_images: int = typer.Option(DEFAULT_MAX_IMAGES, "--max-images",
                                   help="most images in one chat request; more get 400 before any is decoded"),
    seed: int = typer.Option(0, help="seeds the seeds drawn for requests that give none (each such request samples "
                                     "differently; the server's answers repeat from its start)"),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="the model id clients send (default: DIR's name)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LLAMA4_SERVE_API_KEY", show_envvar=True,
                                          help="require `Authorization: Bearer KEY` on /v1/ (better from the "
                                               "environment than the command line, which others can list)"),
    allow_origin: Optional[list[str]] = typer.Option(None, "--allow-origin", help="let browser pages from this origin "
                                                     "call the API (CORS), e.g. http://localhost:3000 or '*'; repeatable"),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime intra-op threads (default: ORT's choice); with --ray "
                                                     "also the CPUs Ray reserves for each replica (default 1)"),
    window: Optional[int] = typer.Option(None, help="global-layer KV window W in tokens"),
    ray: bool = typer.Option(False, "--ray", help="deploy on Ray Serve (pip install '.\\[ray]')"),
    replicas: Optional[int] = typer.Option(None, "--replicas", help="with --ray: replicas, each with its own engine "
                                                                     "(default 1)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="with --ray: a cluster (auto, HOST:PORT); default: a local instance"),
    gpus_per_replica: Optional[float] = typer.Option(None, "--gpus-per-replica",
                                                     help="with --ray: GPUs Ray reserves per replica (default 0)"),
) -> None:
    """Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics until SIGTERM."""
    try:
        ray_only = [flag for flag, value in (("--replicas", replicas), ("--ray-address", ray_address),
                                             ("--gpus-per-replica", gpus_per_replica)) if value is not None]
        if ray_only and not ray:  # the single-process server would have run one engine and ignored them
            raise Llama4ExportError(f"{ray_only[0]} applies to a Ray Serve deployment: add --ray, or drop it")
        replicas = 1 if replicas is None else replicas
        for flag, value in (("--request-timeout", request_timeout), ("--max-request-bytes", max_request_bytes)):
            if not value >= 0:  # (nan too) the API's "None: no limit" is 0 here
                raise Llama4ExportError(f"{flag} {value}: must be >= 0 (0 = no limit)")
        settings = ServeSettings(artifact.resolve().name if model_name is None else model_name, request_timeout or None,
                                 api_key or None, max_request_bytes or None, seed,
                                 tuple(allow_origin or ()), max_image_pixels, max_images)
        options = EngineOptions(max_batch, max_queue, reuse_prefix, prefill_budget)
        if ray:
            if replicas < 1:
                raise Llama4ExportError(f"--replicas {replicas}: must be >= 1")
            if gpus_per_replica is not None and not 0 <= gpus_per_replica < math.inf:
                raise Llama4ExportError(f"--gpus-per-replica {gpus_per_replica}: must be >= 0 (a fraction shares a GPU)")
            check_listen_address(host, port, bind=ray_address is None)
            check_ray_address(ray_address)
            check_threads(threads)  # a bad thread count or artifact fails here, once, not in every replica
            sliding = _sliding(Generator.load(artifact, threads=1, window=window))
            _serve_on_ray(artifact, settings, host, port, replicas, options, threads, window, gpus_per_replica or 0,
                          ray_address, sliding)
            return
        sock = listen_socket(host, port)
        with err_console.status(f"loading {escape(str(artifact))}"):
            engine = load_engine(artifact, options, threads, window)
    except Llama4ExportError as exc:
        fail(exc)
    err_console.print(f"serving {settings.model_name} on http://{host_port(host, port)}/v1 (max batch {max_batch}"
                      f"{_sliding(engine.generator)})", markup=False, soft_wrap=True)
    serve_engine(engine, settings, host, port, sock=sock)


def _sliding(generator: Generator) -> str:
    """The part of the "serving" line saying that prompts between the KV window W and the context are accepted and
    slide (the server refuses only past the context): with W capped to fit memory, or a small --window, the operator
    was not told."""
    window, context = generator.window, generator.config.max_position_embeddings
    return f"; KV window {window:,} of the {context:,}-token context: longer sequences slide" if window < context else ""


def _serve_on_ray(artifact: Path, settings: ServeSettings, host: str, port: int, replicas: int,
                  options: EngineOptions, threads: int | None, window: int | None, gpus: float,
                  address: str | None, sliding: str) -> None:
    """Ray is imported only here: the single-process server does not need it."""
    try:
        from ..serving import ray_serve
    except ImportError as exc:
        raise Llama4ExportError(f"--ray needs Ray Serve ({exc}); pip install 'llama4-export[ray]'") from None

    def ready() -> None:
        err_console.print(f"serving {settings.model_name} on http://{host_port(host, port)}/v1 from {replicas} Ray "
                          f"replica{'s' if replicas != 1 else ''}{sliding}", markup=False, soft_wrap=True)

    with err_console.status(f"starting Ray and {replicas} replica{'s' if replicas != 1 else ''} of "
                            f"{escape(str(artifact))}"):
        ray_serve.run(artifact, settings, host, port, replicas, options, threads, window, gpus, address, on_ready=ready)


def main() -> None:
    run_cli(serve_app)
