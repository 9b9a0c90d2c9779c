"""Errors the runtime raises on bad input (prompts, token ids, cache sizes)."""

from ..errors import Llama4ExportError


class GenerationError(Llama4ExportError):
    """A prompt, token id, sampling option or cache size the runtime cannot use."""
