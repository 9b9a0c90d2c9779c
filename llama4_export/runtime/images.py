"""Llama 4 image preprocessing and prompt expansion in numpy + Pillow, as transformers' Llama4ImageProcessor and
Llama4Processor do them — torch-free, like the rest of the runtime.

Why not call the reference: transformers' Llama4ImageProcessor runs on torchvision, and torchvision cannot run beside
this project's CPU torch pin. Checked 2026-11 with torch==2.13.0+cpu: pip resolves torchvision==0.28.0 (the only
release that pairs with torch 2.13, metadata `torch==2.13.0`) and installs it, but `import torchvision` fails with
"RuntimeError: operator torchvision::nms does not exist" because its compiled extension links libc10_cuda.so, which
the CPU torch does not ship (the CPU builds of torchvision live on PyTorch's own index, which we cannot reach). The
reference outputs therefore come from fixtures made in a separate venv (scripts/make_vision_fixtures.py).

What one image becomes (parameters from the checkpoint's processor files, never assumed):
  1. decode (PNG, JPEG, WebP, … anything Pillow reads), turn upright by its EXIF orientation as transformers'
     `load_image` does, convert to RGB as the image processor converts a PIL image: an image with an alpha channel or
     a transparent palette colour is composited onto white, everything else (greyscale, palette, CMYK) converted;
  2. pick the canvas: every grid of `rows × cols` tiles of `size` px with at most `max_patches` tiles is a candidate;
     the scale that fits the image into a canvas without distortion is min(canvas_h / h, canvas_w / w) (in float32);
     the smallest scale ≥ 1 wins (the largest with `resize_to_max_canvas`), or, when no canvas lets the image grow,
     the largest scale below 1; ties go to the smallest canvas area, then to the first in transformers' order;
  3. resize without distortion to fit the canvas — growing no further than `size` on a side unless
     `resize_to_max_canvas` — with torch's native uint8 antialiased bilinear resize reproduced in numpy (`resize`),
     pad right and bottom with black, rescale and normalize rounding through bfloat16 at every step as the reference
     does, cut into the grid's tiles row by row;
  4. when there is more than one tile, add a global tile: the whole image resized (distorted) to one tile.
On x86 CPUs with AVX2 (and on arm64) the reference resizes uint8 pixels natively: fixed-point weights, width pass
then height pass, each rounded to uint8. That is what `resize` computes, bit for bit (Pillow's own bilinear resize
differs by one level on a fraction of the pixels). Elsewhere (older CPUs, GPUs) the reference resizes in float32 and
rounds once, which differs from itself on AVX2 by at most one level.

The prompt: each `<|image|>` placeholder becomes `<|image_start|>`, then for a grid of more than one tile its rows of
tiles (each tile `tokens_per_tile` `<|patch|>` tokens, `<|tile_x_separator|>` between the tiles of a row,
`<|tile_y_separator|>` after each row), then `<|image|>` and the global tile's (or the single tile's) patch tokens,
then `<|image_end|>`. The model replaces the `<|patch|>` rows with the image features, tile by tile in this order.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import is_integer, shown
from ..model.config import Llama4VisionConfig
from .errors import ImageError, ImageTooLarge

PREPROCESSOR_FILE = "preprocessor_config.json"  # Meta's published checkpoints
PROCESSOR_FILE = "processor_config.json"  # the processor; newer transformers nest the image processor in it
BILINEAR = 2  # PILImageResampling.BILINEAR: the only resampling Llama 4's processor uses
# The placeholder a prompt marks each image with: processor_config.json's `image_token`, Llama4Processor's default.
# The expansion itself is written with these fixed tokens whatever the processor file says, as Llama4Processor does.
IMAGE_TOKEN = "<|image|>"
IMAGE_START, IMAGE_END, PATCH = "<|image_start|>", "<|image_end|>", "<|patch|>"
TILE_X_SEPARATOR, TILE_Y_SEPARATOR = "<|tile_x_separator|>", "<|tile_y_separator|>"
PROCESSOR_TOKENS = (IMAGE_START, IMAGE_END, PATCH, TILE_X_SEPARATOR, TILE_Y_SEPARATOR)
DATA_URL = "data:"


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: np.ndarray  # float32 [tiles, 3, size, size]: the grid's tiles row by row, then the global tile
    grid: tuple[int, int]  # tiles per column and per row (transformers' aspect_ratios)


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Llama4ImageProcessor's parameters and Llama4Processor's prompt tokens."""

    size: int  # side of one tile
    max_patches: int  # most tiles in the grid (the global tile not counted)
    resize_to_max_canvas: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_convert_rgb: bool
    tokens_per_tile: int  # `<|patch|>` tokens per tile: (size / patch_size)² / round(1 / pixel_shuffle_ratio²)
    placeholder: str  # what marks an image in a prompt

    @classmethod
    def from_directory(cls, directory: str | Path, vision: Llama4VisionConfig) -> "ImageProcessorConfig":
        """The image processor section of `processor_config.json` (newer transformers) or `preprocessor_config.json`
        (Meta's checkpoints), with the processor's patch size and pixel-shuffle ratio (the model's when the processor
        file does not name them, as transformers saves it), checked against the model's vision config."""
        directory = Path(directory)
        processor = _read_json(directory / PROCESSOR_FILE) if (directory / PROCESSOR_FILE).is_file() else {}
        if isinstance(processor.get("image_processor"), dict):
            source, fields = directory / PROCESSOR_FILE, processor["image_processor"]
        elif (directory / PREPROCESSOR_FILE).is_file():
            source, fields = directory / PREPROCESSOR_FILE, _read_json(directory / PREPROCESSOR_FILE)
        else:
            raise ImageError(f"{directory}: no {PREPROCESSOR_FILE} and no image_processor section in {PROCESSOR_FILE}; "
                             "copy the processor files from the model's checkpoint")
        return cls._parse(fields, processor, vision, source)

    def to_dict(self) -> dict[str, Any]:
        """The fields (an artifact manifest's `vision.processor`); `from_dict` reads them back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Any, source: str) -> "ImageProcessorConfig":
        try:
            config = cls(**{**fields, "image_mean": tuple(fields["image_mean"]), "image_std": tuple(fields["image_std"])})
        except (TypeError, KeyError) as exc:
            raise ImageError(f"{source}: not an image processor config ({exc}); re-run the export") from None
        # the manifest is not hashed: a hand-edited value failed deep in the tiling with a traceback
        integers = {"size": config.size, "max_patches": config.max_patches, "tokens_per_tile": config.tokens_per_tile}
        numbers = [config.rescale_factor, *config.image_mean, *config.image_std]
        if not all(is_integer(v) and v >= 1 for v in integers.values()) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) or 0 in config.image_std \
                or not (isinstance(config.placeholder, str) and config.placeholder):
            raise ImageError(f"{source}: size, max_patches and tokens_per_tile must be integers >= 1 (got "
                             f"{', '.join(f'{k} {v!r}' for k, v in integers.items())}), the means and stds numbers, "
                             "the stds nonzero, the placeholder a nonempty string; re-run the export")
        return config

    @classmethod
    def _parse(cls, fields: dict[str, Any], processor: dict[str, Any], vision: Llama4VisionConfig, source: Path
               ) -> "ImageProcessorConfig":
        def need(key: str) -> Any:
            if fields.get(key) is None:
                raise ImageError(f"{source}: required field {key!r} is missing from the image processor config")
            return fields[key]

        kind = fields.get("image_processor_type", "Llama4ImageProcessor")
        if not str(kind).startswith("Llama4ImageProcessor"):
            raise ImageError(f"{source}: image_processor_type {kind!r} is not Llama 4's (Llama4ImageProcessor)")
        try:
            size = need("size")
            if not (isinstance(size, dict) and size.get("height") == size.get("width") and size.get("height")):
                raise ImageError(f"{source}: size {size!r} must be a square {{'height': N, 'width': N}}")
            if not fields.get("do_resize", True):
                raise ImageError(f"{source}: do_resize false is not supported (Llama 4 always resizes onto its tile grid)")
            if int(fields.get("resample", BILINEAR)) != BILINEAR:
                raise ImageError(f"{source}: resample {fields['resample']} is not supported (Llama 4 resizes bilinearly: 2)")
            mean, std = (_three(need(key), key, source) for key in ("image_mean", "image_std"))
            do_rescale, do_normalize = bool(fields.get("do_rescale", True)), bool(fields.get("do_normalize", True))
            if do_normalize and not do_rescale:
                raise ImageError(f"{source}: do_normalize without do_rescale is not supported (nor by the reference)")
            patch_size = int(processor.get("patch_size", vision.patch_size))
            ratio = float(processor.get("pixel_shuffle_ratio", vision.pixel_shuffle_ratio))
            tile = int(size["height"])
            tokens_per_tile = (tile // patch_size) ** 2 // int(round(1.0 / ratio**2))
            config = cls(
                size=tile, max_patches=int(need("max_patches")),
                resize_to_max_canvas=bool(fields.get("resize_to_max_canvas", False)), do_rescale=do_rescale,
                rescale_factor=float(fields.get("rescale_factor", 1 / 255)), do_normalize=do_normalize,
                image_mean=mean, image_std=std, do_convert_rgb=bool(fields.get("do_convert_rgb", True)),
                tokens_per_tile=tokens_per_tile,
                placeholder=str(processor.get("image_token", IMAGE_TOKEN)),
            )
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise ImageError(f"{source}: malformed image processor field ({exc}); re-save the processor") from None
        if config.max_patches < 1 or 0 in std or not config.placeholder:
            raise ImageError(f"{source}: max_patches must be ≥ 1, image_std nonzero and image_token nonempty")
        if (config.size, config.tokens_per_tile) != (vision.image_size, vision.tokens_per_tile):
            # patch_size and pixel_shuffle_ratio are the processor file's, beside preprocessor_config.json's tile size
            named = [key for key in ("patch_size", "pixel_shuffle_ratio") if key in processor]
            if named and source.name != PROCESSOR_FILE:
                source = f"{source} with {PROCESSOR_FILE}'s {' and '.join(named)}"
            raise ImageError(
                f"{source}: the processor makes {config.size}-px tiles of {config.tokens_per_tile} tokens but the model's "
                f"vision encoder takes {vision.image_size}-px tiles of {vision.tokens_per_tile}; the processor files "
                "belong to another model"
            )
        return config


class ImageProcessor:
    """Images → tiles of normalized pixels, and prompts → prompts with each image's placeholder tokens."""

    def __init__(self, config: ImageProcessorConfig):
        self.config = config
        self.canvases = supported_grids(config.max_patches)

    @classmethod
    def from_directory(cls, directory: str | Path, vision: Llama4VisionConfig) -> "ImageProcessor":
        return cls(ImageProcessorConfig.from_directory(directory, vision))

    def preprocess(self, image: Any, name: str = "image", max_pixels: int | None = None) -> ProcessedImage:
        """One image (any form open_image takes; `name` says which in an error; max_pixels as open_image's) as tiles."""
        rgb = to_rgb(open_image(image, name, max_pixels), self.config.do_convert_rgb)
        if rgb.width == 0 or rgb.height == 0:
            raise ImageError(f"{name}: a {rgb.width} × {rgb.height} image has no pixels")
        size = self.config.size
        rows, cols = best_grid((rgb.height, rgb.width), self.canvases, size, self.config.resize_to_max_canvas)
        height, width = fit_without_distortion((rgb.height, rgb.width), (rows * size, cols * size), size,
                                               self.config.resize_to_max_canvas)
        pixels = np.asarray(rgb, np.uint8)
        canvas = np.zeros((rows * size, cols * size, 3), np.uint8)
        canvas[:height, :width] = resize(pixels, (height, width))
        tiles = canvas.reshape(rows, size, cols, size, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, size, size)
        if rows * cols > 1:
            tiles = np.concatenate([tiles, resize(pixels, (size, size)).transpose(2, 0, 1)[None]])
        return ProcessedImage(self.normalize(tiles), (rows, cols))

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [..., 3, H, W] → float32, rescaled and normalized in bfloat16 as the reference does it (each step
        computed in float32 and rounded to bfloat16)."""
        c = self.config
        if not c.do_rescale:
            return pixels.astype(np.float32)
        if not c.do_normalize:  # the reference multiplies the uint8 pixels in float32
            return pixels.astype(np.float32) * np.float32(c.rescale_factor)
        x = _bf16_round(pixels.astype(np.float32) * np.float32(c.rescale_factor))
        mean, std = (_bf16_round(np.asarray(v, np.float32)).reshape(3, 1, 1) for v in (c.image_mean, c.image_std))
        return _bf16_round(_bf16_round(x - mean) / std)

    def image_prompt(self, grid: tuple[int, int]) -> str:
        """The placeholder text of one image with this tile grid."""
        rows, cols = grid
        patches = PATCH * self.config.tokens_per_tile
        text = IMAGE_START
        if rows * cols > 1:
            text += (TILE_X_SEPARATOR.join([patches] * cols) + TILE_Y_SEPARATOR) * rows
        return text + IMAGE_TOKEN + patches + IMAGE_END

    def expand_prompt(self, text: str, grids: list[tuple[int, int]]) -> str:
        """`text` with its k-th `<|image|>` placeholder replaced by the k-th image's placeholder text."""
        placeholder = self.config.placeholder
        # beside images, typed image tokens would take feature rows none of them gives (without images a typed
        # <|patch|> keeps its embedding, as in transformers)
        written = next((token for token in PROCESSOR_TOKENS if token in text), None)
        if written is not None:
            raise ImageError(f"the prompt text holds {written} itself; only the image processor writes an image's "
                             f"tokens: mark each image with {placeholder} alone")
        pieces = text.split(placeholder)
        if len(pieces) - 1 != len(grids):
            raise ImageError(f"the prompt has {len(pieces) - 1} {placeholder} placeholder(s) but {len(grids)} image(s) "
                             f"were given; put one {placeholder} where each image goes, in order")
        return pieces[0] + "".join(self.image_prompt(grid) + piece for grid, piece in zip(grids, pieces[1:]))


def open_image(image: Any, name: str = "image", max_pixels: int | None = None) -> Image.Image:
    """An image as a PIL image: a file path, a data URL, a file's encoded bytes (or a binary file object), a PIL
    image, or an H × W × 3 uint8 RGB array (pixels another library decoded, taken as they are). max_pixels: refuse
    (ImageTooLarge) an image of more pixels, read from its header before it is decoded (None: Pillow's limit only)."""
    if isinstance(image, Image.Image):
        check_pixels(image.size, name, max_pixels)  # an Image.open()ed image is not decoded yet
        try:
            image.load()  # an Image.open()ed image decodes here: a truncated file is one line, not a traceback
        except AssertionError:  # Pillow's assert on a file closed before the image was decoded
            raise ImageError(f"{name}: the PIL image's file was closed before it was decoded; load() it (or give "
                             "the file) while the file is open") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name}: not a readable image ({exc}); give a PNG, JPEG or WebP image") from None
        return image
    if isinstance(image, str) and image.startswith(DATA_URL):
        return decode_data_url(image, name, max_pixels)
    if isinstance(image, (str, Path)):
        if not str(image):
            raise ImageError(f"{name}: an empty path; give an image file")
        if re.match(r"[a-z][a-z0-9+.-]*:/", str(image), re.IGNORECASE):  # a Path keeps one slash of "https://"
            raise ImageError(f"{name}: {shown(str(image))} is a URL; images are read from files or data URLs (the "
                             "runtime fetches nothing from the network): download it and give the file")
        return load_image(image, max_pixels=max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return load_image(io.BytesIO(bytes(image)), name, max_pixels)
    if hasattr(image, "read"):
        return load_image(image, name, max_pixels)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"{name}: an array of shape {image.shape} and dtype {image.dtype}; give height × width × "
                             "3 uint8 RGB pixels")
        check_pixels((image.shape[1], image.shape[0]), name, max_pixels)
        return Image.fromarray(image, "RGB")
    raise ImageError(f"{name}: {type(image).__name__} is not an image; give a file path, a data URL, the file's "
                     "bytes, a PIL image or a height × width × 3 uint8 RGB array")


def load_image(path: str | Path | io.BytesIO, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """A decoded image (a file, or bytes in memory called `name`), turned upright by its EXIF orientation; ImageError
    naming it if it cannot be read, ImageTooLarge if it has more than max_pixels pixels (None: Pillow's limit only) —
    said from the header, before a byte of it is decoded: an image just under Pillow's limit (13000 × 13000, a PNG of
    a few hundred KB) took ~1.8 GB and ~17 s of CPU to decode and resize."""
    name = name or str(path)
    try:
        with warnings.catch_warnings():
            # Pillow warns from half its decompression-bomb limit on; such an image is decoded (the tiles are
            # resized from it) and a warning would only add stray lines to a one-line tool's output
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:  # reads the header alone
                check_pixels(opened.size, name, max_pixels)
                opened.load()  # decode now: a truncated or corrupt file fails here, not half-way through a batch
                return ImageOps.exif_transpose(opened)
    except FileNotFoundError:
        raise ImageError(f"{name}: image file not found") from None
    except UnidentifiedImageError:  # Pillow's message names the file object (an address, for a data URL's bytes)
        raise ImageError(f"{name}: not a readable image (no image format recognised); give a PNG, JPEG or WebP "
                         "image") from None
    except Image.DecompressionBombError as exc:  # a valid file, just too many pixels to decode safely
        size = _bomb_size(exc)  # Image.open refused it before check_pixels saw it (over twice Pillow's limit)
        if size is not None and max_pixels is not None and size[0] * size[1] > max_pixels:
            raise ImageTooLarge(name, *size, max_pixels) from None  # over the caller's limit too: that limit's error
        raise ImageError(f"{name}: {str(exc).split(',')[0]}, Pillow's guard against decompression bombs; downscale "
                         "it (the model only sees it resized to a few tiles)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc}); give a PNG, JPEG or WebP image") from None


def _bomb_size(exc: BaseException) -> tuple[int, int] | None:
    """The width × height Pillow's decompression-bomb check refused: the `size` it was called with, in the frame that
    raised (Pillow's message gives the pixel count alone); None where that frame has none."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    size = None if frame is None else frame.tb_frame.f_locals.get("size")
    if isinstance(size, tuple) and len(size) == 2 and all(is_integer(n) for n in size):
        return int(size[0]), int(size[1])
    return None


def decode_data_url(url: str, name: str = "image_url", max_pixels: int | None = None) -> Image.Image:
    """The image of a `data:image/...;base64,...` URL (RFC 2397), as chat messages carry them. Nothing is fetched:
    any other URL is refused. max_pixels as for load_image."""
    if not url.startswith(DATA_URL):
        raise ImageError(f"{name}: {shown(url)} is not a data URL; only data:image/...;base64,... URLs are accepted "
                         "(the runtime fetches nothing from the network)")
    header, comma, payload = url[len(DATA_URL):].partition(",")
    media_type, *parameters = header.lower().split(";")  # RFC 2397: both case-insensitive
    if not comma:
        raise ImageError(f"{name}: a malformed data URL (no comma after its header); give "
                         "data:image/<type>;base64,<data>")
    if not media_type.startswith("image/"):
        raise ImageError(f"{name}: the data URL's media type {media_type or '(none)'!r} is not an image type; give "
                         "data:image/<type>;base64,<data>")
    if "base64" not in parameters:
        raise ImageError(f"{name}: the data URL is not base64-encoded; give data:image/<type>;base64,<data>")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)  # base64 wrapped in lines, as tools write it
    except ValueError as exc:
        raise ImageError(f"{name}: the data URL's base64 payload does not decode ({exc})") from None
    return load_image(io.BytesIO(data), name, max_pixels)


def check_pixels(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    """ImageTooLarge if a width × height image has more than max_pixels pixels (None: no limit here)."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(name, width, height, max_pixels)


def to_rgb(image: Image.Image, convert: bool = True) -> Image.Image:
    """RGB as the reference converts a PIL image: transparency composited onto white."""
    if not convert:
        if image.mode != "RGB":
            raise ImageError(f"a {image.mode} image with do_convert_rgb false: the processor takes RGB images only")
        return image
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grayscale (a 16-bit PNG)
        image = eight_bit_gray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def eight_bit_gray(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit ("L"): Pillow's convert("RGB") clips its values to 0..255, which turned a
    16-bit PNG almost white (the reference processor's conversion does the same). 32-bit "I" images are read as the
    16-bit range they come from."""
    levels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257
    gray = Image.fromarray(np.rint(levels).astype(np.uint8), "L")
    gray.info = dict(image.info)  # a transparent level (tRNS) is composited onto white as before
    if "transparency" in gray.info:
        gray.info["transparency"] = round(min(max(gray.info["transparency"], 0), 65535) / 257)
    return gray


def supported_grids(max_patches: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with rows·cols ≤ max_patches, in transformers' order (it decides ties): grouped by aspect
    ratio in the order each ratio first appears going from max_patches tiles down to 1, each tile count's factor
    pairs by ascending rows."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for tiles in range(max_patches, 0, -1):
        for rows in sorted(r for r in range(1, tiles + 1) if tiles % r == 0):
            by_ratio.setdefault(rows / (tiles // rows), []).append((rows, tiles // rows))
    return [grid for grids in by_ratio.values() for grid in grids]


def best_grid(image_size: tuple[int, int], grids: list[tuple[int, int]], tile: int, resize_to_max_canvas: bool
              ) -> tuple[int, int]:
    """The tile grid whose canvas the image fits best (the module docstring's rule 2), scales in float32 as the
    reference computes them."""
    h, w = np.float32(image_size[0]), np.float32(image_size[1])
    scales = [min(np.float32(rows * tile) / h, np.float32(cols * tile) / w) for rows, cols in grids]
    growing = [s for s in scales if s >= 1]
    if growing:
        chosen = max(growing) if resize_to_max_canvas else min(growing)
    else:
        chosen = max(scales)
    candidates = [grid for grid, s in zip(grids, scales) if s == chosen]
    return min(candidates, key=lambda grid: grid[0] * grid[1])  # min keeps the first of equal areas


def fit_without_distortion(image_size: tuple[int, int], canvas: tuple[int, int], tile: int, resize_to_max_canvas: bool
                           ) -> tuple[int, int]:
    """(height, width) the image is resized to inside the canvas keeping its aspect ratio; without
    resize_to_max_canvas no side grows past max(its own length, one tile).

    The arithmetic follows the reference's types: a limit taken from the canvas is an int64 tensor element there, so
    its scale is a float32 division and every product or comparison it enters is float32 (numpy's float32 scalars
    behave alike); a limit taken from the image or the tile is a Python int (float64 arithmetic)."""
    h, w = image_size

    def limit(own: int, canvas_side: int) -> int | np.int64:
        grown = max(own, tile)
        return np.int64(canvas_side) if resize_to_max_canvas or canvas_side < grown else grown

    def scale(target: int | np.int64, own: int) -> float | np.float32:
        return np.float32(target) / np.float32(own) if isinstance(target, np.int64) else target / own

    target_h, target_w = limit(h, canvas[0]), limit(w, canvas[1])
    scale_h, scale_w = scale(target_h, h), scale(target_w, w)
    if scale_w < scale_h:
        height, width = min(math.floor(h * scale_w), target_h), target_w
    else:
        height, width = target_h, min(math.floor(w * scale_h), target_w)
    return max(int(height), 1), max(int(width), 1)


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] → [height, width, C]: antialiased bilinear as torch resizes uint8 images natively (Pillow's
    filter and support; weights normalized in float64, then fixed point at the most bits an int16 holds for the
    axis's largest weight; a width pass, then a height pass, each rounded to uint8)."""
    for axis, target in ((1, size[1]), (0, size[0])):
        if pixels.shape[axis] != target:
            pixels = _resample_axis(pixels, axis, target)
    return pixels


def _resample_axis(pixels: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    in_size = pixels.shape[axis]
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # the triangle filter's half-width, widened when shrinking
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero, as astype
    count = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - first, 0, taps)
    tap = np.arange(taps)
    distance = np.abs(((tap[None] + first[:, None]) - center[:, None] + 0.5) * invscale)
    weights = np.where((distance < 1.0) & (tap[None] < count[:, None]), 1.0 - distance, 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # summed in tap order, as the reference does
        total = total + weights[:, k]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0)
    largest = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    fixed = (0.5 + weights * float(1 << precision)).astype(np.int32)
    index = np.minimum(first[:, None] + tap[None], in_size - 1)
    shape = [1] * pixels.ndim
    shape[axis] = out_size
    out = np.full(pixels.shape[:axis] + (out_size,) + pixels.shape[axis + 1:], 1 << (precision - 1), np.int32)
    for k in range(taps):
        out += np.take(pixels, index[:, k], axis=axis).astype(np.int32) * fixed[:, k].reshape(shape)
    return np.clip(out >> precision, 0, 255).astype(np.uint8)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    import ml_dtypes  # ≈ 0.5 s to import: only when an image is preprocessed, not at every runtime start

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _three(value: Any, key: str, source: Path) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ImageError(f"{source}: {key} has {len(values)} values; an RGB processor needs 3")
    return values[0], values[1], values[2]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImageError(f"{path}: not valid JSON ({exc}); re-copy it from the checkpoint") from None
    if not isinstance(content, dict):
        raise ImageError(f"{path}: expected a JSON object")
    return content
