"""`llama4-serve`'s Python entry: an artifact behind uvicorn on one process.

uvicorn handles SIGTERM / SIGINT: it stops accepting connections; queued requests get 503 at once, running ones
(streams included) may finish for up to `graceful_s` seconds, and those still running then end with their error (a
stream's error event); the process exits 0 (SIGINT: uvicorn's own exit status).
"""

from __future__ import annotations

import asyncio
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
    try:
        return BatchEngine(generator, options)
    except MemoryError as exc:  # the rows' KV cache is allocated here
        raise ConfigError(f"max_batch={options.max_batch}: the KV cache of that many rows does not fit in memory "
                          f"({exc}); give a smaller --max-batch (or --window)") from None


def host_port(host: str, port: int) -> str:
    """HOST:PORT as URLs write it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything loads, so that a bad address or a port in use is one line at once —
    not a "serving on" line after minutes of loading and then uvicorn's error (or, for 70000, a wrapped-around port)
    — and nothing can take the port while the artifact loads. uvicorn listens on it."""
    family, kind, proto, address = _listen_address(host, port)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait out TIME_WAIT
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{host_port(host, port)}: cannot listen there ({exc.strerror}); stop what holds the port "
                          "or choose another --port") from None
    return sock


def _listen_address(host: str, port: int):
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port}: must be in 1..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"host {host!r}: {exc.strerror}; listen on an address of this machine "
                          "(127.0.0.1, 0.0.0.0, ::)") from None
    return family, kind, proto, address


def check_listen_address(host: str, port: int, bind: bool = True) -> None:
    """listen_socket's checks, the socket closed again (Ray Serve's proxy binds the port itself). bind=False: the host
    and port alone — on a running cluster Serve's proxy may already hold the port, and rightly."""
    if bind:
        listen_socket(host, port).close()
    else:
        _listen_address(host, port)


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
          graceful_s: float = 30.0, sock: socket.socket | None = None) -> None:
    """Serve `engine` until SIGTERM / SIGINT, on `sock` (listen_socket's) or a socket bound to host:port now."""
    sock = sock or listen_socket(host, port)
    # uvicorn raises the signal again once it has shut down; SIGTERM's handler then lets the process end normally
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    config = uvicorn.Config(create_app(engine, settings), log_level="warning", timeout_graceful_shutdown=graceful_s)
    _DrainingServer(config, engine, graceful_s).run(sockets=[sock])


class _DrainingServer(uvicorn.Server):
    """uvicorn's shutdown stops accepting, waits `graceful_s` for open connections, then cancels their tasks: a stream
    cut mid-body, a traceback each in the log. Here queued requests end at once (503), running ones get the grace, and
    those still running near its end are cancelled through the engine, so that each ends with its error (a stream's
    error event) before uvicorn's deadline."""

    CANCEL_AHEAD_S = 3.0  # an engine step and the last events' writes fit in it

    def __init__(self, config: uvicorn.Config, engine: BatchEngine, graceful_s: float):
        super().__init__(config)
        self._engine, self._graceful_s = engine, graceful_s

    async def shutdown(self, sockets=None) -> None:
        self._engine.drain()
        cancelling = asyncio.get_running_loop().call_later(max(0.0, self._graceful_s - self.CANCEL_AHEAD_S),
                                                           self._engine.cancel_running)
        try:
            await super().shutdown(sockets)
        finally:
            cancelling.cancel()
