"""`llama4-serve`'s Python entry: an artifact behind uvicorn on one process.

uvicorn handles SIGTERM / SIGINT: it stops accepting connections, lets running requests (streams included) finish
for up to `graceful_s` seconds, then the app's lifespan stops the engine (cancelling what still runs) and the
process exits 0 (SIGINT: uvicorn's own exit status).
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import uvicorn

from ..runtime import Generator
from ..runtime.batching import BatchEngine, EngineOptions
from ..errors import ConfigError
from .app import ServeSettings, create_app


def load_engine(artifact: str | Path, options: EngineOptions, threads: int | None = None,
                window: int | None = None) -> BatchEngine:
    """The artifact's generator (manifest verified) behind a BatchEngine scheduling by `options`."""
    generator = Generator.load(artifact, threads=threads, window=window)
    return BatchEngine(generator, options)


def check_listen_address(host: str, port: int) -> None:
    """Refuse, before anything loads, a port outside 1..65535 and a host name that resolves to nothing (uvicorn
    would say so only after the artifact is loaded, or bind a port other than the one asked for)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port}: must be in 1..65535")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"host {host!r}: {exc.strerror}; listen on an address of this machine "
                              "(127.0.0.1, 0.0.0.0, ::)") from None


def check_ray_address(address: str | None) -> None:
    """A cluster address (HOST:PORT or ray://HOST:PORT) must accept a connection: Ray itself retries an unreachable
    one for minutes, printing warnings, before it gives up. None and "auto" are Ray's to resolve."""
    if address is None or address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {address}: cannot connect ({exc.strerror or exc}); start the cluster "
                              "(`ray start --head`) or leave --ray-address out for a local instance") from None


def serve(engine: BatchEngine, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          graceful_s: float = 30.0) -> None:
    """Serve `engine` until SIGTERM / SIGINT."""
    check_listen_address(host, port)
    # uvicorn raises the signal again once it has shut down; SIGTERM's handler then lets the process end normally
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=graceful_s)
