"""Errors the runtime raises on bad input (prompts, token ids, cache sizes, images)."""

from ..errors import Llama4ExportError


class GenerationError(Llama4ExportError):
    """A prompt, token id, sampling option or cache size the runtime cannot use."""


class ImageError(GenerationError):
    """An image the runtime cannot use: unreadable or truncated, a placeholder count that does not match the images
    given, or processor files that do not describe a Llama 4 image processor."""


class ImageTooLarge(ImageError):
    """An image over a pixel limit (max_image_pixels), refused from its header before it was decoded."""

    def __init__(self, name: str, width: int, height: int, limit: int, setting: str = "max_image_pixels"):
        self.name, self.width, self.height, self.limit = name, width, height, limit
        super().__init__(self.saying(setting))

    def __reduce__(self):  # pickled (a worker process's error) as its fields, not as the message alone
        return type(self), (self.name, self.width, self.height, self.limit)

    def saying(self, setting: str) -> str:
        """The message, naming `setting` as the limit to raise (the Python parameter, or a server's flag)."""
        return (f"{self.name}: the image is {self.width} × {self.height} = {self.width * self.height:,} pixels, over "
                f"the limit of {self.limit:,} ({setting}); downscale it (the model only sees it resized to a few "
                f"tiles) or raise {setting}")
