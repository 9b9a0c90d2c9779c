"""The one exception family users see: every message is a single line naming the file or tensor and the fix."""

from __future__ import annotations

import numbers
import os
from contextlib import contextmanager
from typing import Any, Iterator, Mapping


class Llama4ExportError(Exception):
    """Base of every error this package raises on bad input. The CLI prints it as one line and exits 2."""


class CheckpointError(Llama4ExportError):
    """A checkpoint directory, config or weight file is missing, malformed or does not match the model."""


class ConfigError(Llama4ExportError):
    """A configuration or preset is unknown or describes something we do not support."""


# What `pip install 'llama4-export[export]'` adds to the runtime's packages (pyproject.toml, as import names):
# running an artifact or serving it needs none of them.
EXPORT_PACKAGES = frozenset({"onnx", "onnx_ir", "onnxruntime_extensions", "onnxscript", "safetensors", "torch"})


# What `pip install 'llama4-export[serve]'` adds that the server imports (the openai client and httpx are the tests').
SERVE_PACKAGES = frozenset({"fastapi", "prometheus_client", "starlette", "uvicorn"})


class ExtraNotInstalled(Llama4ExportError, ModuleNotFoundError):
    """A job on an install without the optional extra (export, serve) whose packages it imports."""


@contextmanager
def needs_extra(packages: frozenset[str], extra: str, needed_by: str) -> Iterator[None]:
    """Imports of a job that needs `extra`: a missing one of its packages is one line saying which extra installs it
    ("{extra}" in needed_by is replaced by the pip command); any other missing module is a bug and propagates."""
    try:
        yield
    except ModuleNotFoundError as missing:
        package = (missing.name or "").partition(".")[0]
        if package not in packages:
            raise
        install = f"the {extra} extra (pip install 'llama4-export[{extra}]')"
        raise ExtraNotInstalled(f"{package} is not installed: {needed_by.format(extra=install)}",
                                name=package) from None


def needs_exporter(needed_by: str = "exporting, graph passes and checkpoints need {extra}; running and serving an "
                                    "artifact on ONNX Runtime do not"):
    """Imports of a job that needs the export extra."""
    return needs_extra(EXPORT_PACKAGES, "export", needed_by)


# Kinds of values a Python-API argument may take (check_types); a path may be given as a str.
PATH, TEXT, NONE = (str, os.PathLike), (str,), (type(None),)
INTEGER, NUMBER, FLAG = (numbers.Integral,), (numbers.Real,), (bool,)


def is_integer(value: Any) -> bool:
    """An integer, Python's or numpy's; True is not taken for one (check_types' rule, for values it does not see:
    config fields, manifest fields, token ids)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_types(owner: str, expected: Mapping[str, tuple[tuple[type, ...], str]], values: Mapping[str, Any],
                error: type[Llama4ExportError] = ConfigError) -> None:
    """`error` naming the first value that is none of its kinds ("export_model(partitions='2'): expected an integer,
    not str"), rather than a TypeError or AttributeError from deep inside; True is not taken for a number."""
    for name, (kinds, wanted) in expected.items():
        value = values[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise error(f"{owner}({name}={shown(value)}): expected {wanted}, not {type(value).__name__}")


def shown(value: Any, limit: int = 60) -> str:
    """A bad value as an error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
