from ..errors import Llama4ExportError


class BuildError(Llama4ExportError):
    """A TensorRT build cannot start or failed: missing TensorRT/GPU, a graph that does not conform, bad settings."""
