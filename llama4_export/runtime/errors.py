"""Errors the runtime raises on bad input (prompts, token ids, cache sizes, images)."""

from ..errors import Llama4ExportError


class GenerationError(Llama4ExportError):
    """A prompt, token id, sampling option or cache size the runtime cannot use."""


class ImageError(GenerationError):
    """An image the runtime cannot use: unreadable or truncated, a placeholder count that does not match the images
    given, or processor files that do not describe a Llama 4 image processor."""
