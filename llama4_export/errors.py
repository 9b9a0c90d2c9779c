"""The one exception family users see: every message is a single line naming the file or tensor and the fix."""


class Llama4ExportError(Exception):
    """Base of every error this package raises on bad input. The CLI prints it as one line and exits 2."""


class CheckpointError(Llama4ExportError):
    """A checkpoint directory, config or weight file is missing, malformed or does not match the model."""


class ConfigError(Llama4ExportError):
    """A configuration or preset is unknown or describes something we do not support."""
