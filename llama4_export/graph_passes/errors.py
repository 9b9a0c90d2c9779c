"""Errors of the graph-pass stage."""

from ..errors import Llama4ExportError


class GraphPassError(Llama4ExportError):
    """A graph cannot be optimized or lowered as asked (unknown target, unsupported node, failed verification)."""
