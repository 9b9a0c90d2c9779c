"""An artifact's vision graph on ONNX Runtime: images → the prefill's image_features (model/io_spec.py).

    encoder = ImageEncoder.from_artifact(directory, manifest)   # None for an artifact without a vision graph
    images = encoder.preprocess(["a.png", "b.jpg"])              # every file read and tiled before anything runs
    prompt = encoder.processor.expand_prompt("<|image|> vs <|image|>", [i.grid for i in images])
    features = encoder.encode(images)                            # [tiles · tokens_per_tile, text hidden]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..artifact import MANIFEST, listed_file
from ..model import io_spec
from ..errors import ConfigError
from ..model.config import Llama4VisionConfig
from .errors import ImageError
from .images import ImageProcessor, ImageProcessorConfig, ProcessedImage
from .ort_backend import default_providers, load_session, session_options

ImageInput = str | Path | bytes | np.ndarray | Image.Image  # images.open_image: also data URLs and file objects


class ImageEncoder:
    """vision.onnx in its own session, with the image processor the manifest records."""

    def __init__(self, graph: Path, config: Llama4VisionConfig, processor: ImageProcessorConfig,
                 threads: int | None = None, providers: list[str] | None = None, precision: str | None = None):
        self.config, self.processor = config, ImageProcessor(processor)
        self.precision = precision  # the manifest's vision precision (what the memory planner sizes the tower by)
        self.session = load_session(graph, session_options(threads), providers or default_providers())

    @classmethod
    def from_artifact(cls, directory: Path, manifest: dict[str, Any], threads: int | None = None,
                      providers: list[str] | None = None) -> "ImageEncoder | None":
        entry = manifest.get("vision")
        if not entry:
            return None
        source = str(Path(directory) / MANIFEST)
        try:
            config = Llama4VisionConfig.from_manifest(entry, source)
        except ConfigError as exc:
            raise ImageError(str(exc)) from None
        processor = ImageProcessorConfig.from_dict(entry.get("processor"), source)
        return cls(listed_file(directory, manifest, entry.get("file"), "vision.file"), config, processor, threads, providers, entry.get("precision"))

    def preprocess(self, images: Sequence[ImageInput], names: Sequence[str] | None = None,
                   max_pixels: int | None = None) -> list[ProcessedImage]:
        """Each image's tiles; an error names it by `names` (where the caller took it from) or as images[k].
        max_pixels: refuse an image of more pixels before decoding it (None: Pillow's limit only)."""
        return [self.processor.preprocess(image, names[i] if names else f"images[{i}]", max_pixels)
                for i, image in enumerate(images)]

    def encode(self, images: Sequence[ProcessedImage]) -> np.ndarray:
        """The projected features of every tile of `images`, in prompt order."""
        pixels = np.concatenate([image.pixel_values for image in images])
        dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
        return self.session.run([io_spec.IMAGE_FEATURES], {io_spec.PIXEL_VALUES: pixels.astype(dtype)})[0]
