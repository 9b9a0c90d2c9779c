"""The OpenAI-compatible server over a BatchEngine: protocol.py (request validation and defaults, OpenAI-style
errors — usable without HTTP), app.py (the FastAPI app, a thin layer over protocol + engine), metrics.py
(Prometheus), tools.py (tool calls parsed from replies), server.py (load an artifact and run uvicorn)."""

from .app import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES, DEFAULT_MAX_REQUEST_BYTES, ServeSettings, create_app
from .server import check_listen_address, check_ray_address, host_port, listen_socket, load_engine, serve

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_IMAGES", "DEFAULT_MAX_REQUEST_BYTES", "ServeSettings",
           "check_listen_address", "check_ray_address", "create_app", "host_port", "listen_socket", "load_engine", "serve"]
