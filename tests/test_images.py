"""Image preprocessing and prompt expansion (runtime/images.py) against transformers' Llama4ImageProcessor and
Llama4Processor, whose outputs are fixtures (scripts/make_vision_fixtures.py: the reference needs torchvision), and
the resize against torch's own uint8 antialiased bilinear interpolation."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from llama4_export.model.loader import check_checkpoint
from llama4_export.runtime.errors import ImageError, ImageTooLarge
from llama4_export.runtime.images import (
    ImageProcessor, ImageProcessorConfig, best_grid, decode_data_url, fit_without_distortion, load_image, open_image,
    resize, supported_grids, to_rgb,
)
from llama4_export.runtime.tokenizer import Tokenizer

from .conftest import VISION_FIXTURES

REFERENCE = json.loads((VISION_FIXTURES / "reference.json").read_text())
IMAGES = VISION_FIXTURES / "images"


@pytest.fixture(scope="module")
def processors() -> dict[str, ImageProcessor]:
    """The two checkpoints' processors as read from their files, and Meta's published Scout processor (336-px tiles,
    at most 16) on tiny-a's normalization (the same 0.5 mean / std)."""
    found = {key: ImageProcessor.from_directory(VISION_FIXTURES / f"tiny-{key}", check_checkpoint(VISION_FIXTURES / f"tiny-{key}").vision)
             for key in ("a", "b")}
    scout = dataclasses.replace(found["a"].config, size=336, max_patches=16, tokens_per_tile=144)
    return {**found, "scout": ImageProcessor(scout)}


@pytest.fixture(scope="module")
def reference_pixels() -> dict[str, np.ndarray]:
    return load_file(VISION_FIXTURES / "pixels.safetensors")


def reference_values(pixels: dict[str, np.ndarray], processor: str, image: str) -> np.ndarray:
    """The reference pixel values from their lossless uint8 codes into the processor's table of 256 values."""
    codes, table = pixels[f"{processor}/{image}"].astype(np.int64), pixels[f"{processor}/table"]
    return table[np.arange(3)[:, None, None], codes]


def test_fixtures_cover_the_issue_cases():
    grids = REFERENCE["grids"]["scout"]
    assert len(grids) >= 10
    assert grids["one_tile.png"] == [1, 1] and grids["grid_2x3.png"] == [2, 3]
    assert grids["over_budget.png"] == [1, 8]  # 24:1 needs 24 tiles; 16 allowed
    modes = {name: Image.open(IMAGES / name).mode for name in grids}
    assert {"RGB", "RGBA", "L", "P", "LA"} <= set(modes.values())
    assert {name.rsplit(".", 1)[1] for name in grids} == {"png", "jpg", "webp"}


@pytest.mark.parametrize("key", ["scout", "a", "b"])
def test_tiles_match_the_reference_processor(processors, reference_pixels, key):
    stride = REFERENCE["scout_stride"] if key == "scout" else 1
    compared = 0
    for name, grid in REFERENCE["grids"][key].items():
        ours = processors[key].preprocess(IMAGES / name)
        assert list(ours.grid) == grid, name
        if f"{key}/{name}" not in reference_pixels:
            continue
        ref = reference_values(reference_pixels, key, name)
        got = ours.pixel_values[..., ::stride, ::stride]
        assert got.shape == ref.shape, name
        # The acceptance bound is 2e-2; on this CPU the resize is the reference's own arithmetic, so 0 is measured.
        assert np.abs(got - ref).max() <= 2e-2, name
        compared += 1
    assert compared >= (4 if key == "b" else 10)


@pytest.mark.parametrize("key", ["scout", "a", "b"])
def test_canvas_and_resized_size_match_the_reference(processors, key):
    """160 image sizes per processor (1×1 to 5000×90): the grid, and the content size read back from the reference's
    padding."""
    config = processors[key].config
    grids = supported_grids(config.max_patches)
    for h, w, rows, cols, content_h, content_w in REFERENCE["grid_table"][key]:
        grid = best_grid((h, w), grids, config.size, config.resize_to_max_canvas)
        assert grid == (rows, cols), (h, w)
        canvas = (rows * config.size, cols * config.size)
        assert fit_without_distortion((h, w), canvas, config.size, config.resize_to_max_canvas) == (content_h, content_w), (h, w)


@pytest.mark.parametrize("key", ["a", "b"])
@pytest.mark.parametrize("prompt", ["one", "two"])
def test_prompt_ids_match_llama4_processor(processors, key, prompt):
    case = REFERENCE["prompts"][f"tiny-{key}"][prompt]
    grids = [processors[key].preprocess(IMAGES / name).grid for name in case["images"]]
    text = processors[key].expand_prompt(case["text"], grids)
    assert Tokenizer(VISION_FIXTURES / f"tiny-{key}").encode(text) == case["input_ids"]


def test_image_prompt_layout(processors):
    p = processors["a"]  # 4 tokens per tile
    patches = "<|patch|>" * 4
    assert p.image_prompt((1, 1)) == f"<|image_start|><|image|>{patches}<|image_end|>"
    row = f"{patches}<|tile_x_separator|>{patches}<|tile_x_separator|>{patches}<|tile_y_separator|>"
    assert p.image_prompt((2, 3)) == f"<|image_start|>{row}{row}<|image|>{patches}<|image_end|>"


def test_resize_is_torch_uint8_antialiased_bilinear():
    """torch's uint8 interpolate is the reference's resize (torchvision calls it natively for uint8 on CPUs with AVX2
    or arm64); shrinking, growing and mixed, with sizes that leave odd taps at the edges."""
    rng = np.random.default_rng(0)
    for (h, w), (new_h, new_w) in [((37, 211), (336, 56)), ((400, 300), (56, 112)), ((9, 13), (56, 56)),
                                   ((120, 1200), (44, 336)), ((333, 333), (336, 336)), ((50, 70), (50, 23))]:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = torch.nn.functional.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None], size=(new_h, new_w),
                                                   mode="bilinear", align_corners=False, antialias=True)
        np.testing.assert_array_equal(resize(pixels, (new_h, new_w)), expected[0].permute(1, 2, 0).numpy())


def test_several_images_go_to_their_placeholders_in_order(processors):
    p = processors["a"]
    text = p.expand_prompt("A <|image|> B <|image|> C", [(1, 1), (1, 2)])
    assert text == f"A {p.image_prompt((1, 1))} B {p.image_prompt((1, 2))} C"


@pytest.mark.parametrize("text, images", [("no placeholder", 1), ("<|image|> and <|image|>", 1), ("<|image|>", 2)])
def test_placeholder_count_mismatch_is_one_clear_error(processors, text, images):
    with pytest.raises(ImageError, match=r"placeholder\(s\) but \d image\(s\) were given") as info:
        processors["a"].expand_prompt(text, [(1, 1)] * images)
    assert "\n" not in str(info.value)


def test_bad_image_files_are_one_clear_error(tmp_path):
    truncated = tmp_path / "truncated.png"
    data = (IMAGES / "one_tile.png").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    for path, message in [(truncated, "not a readable image"), (not_image, "not a readable image"),
                          (tmp_path / "missing.jpg", "image file not found")]:
        with pytest.raises(ImageError, match=message) as info:
            load_image(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_data_urls_are_read_as_rfc_2397_has_them_and_urls_are_named_as_urls():
    """Media type and "base64" are case-insensitive, and base64 wrapped in lines (as `base64` writes it) decodes: both
    were "malformed" / "does not decode". A web URL given as a file said "image file not found" with one slash."""
    import base64

    data = (IMAGES / "one_tile.png").read_bytes()
    encoded = base64.b64encode(data).decode()
    expected = np.asarray(load_image(IMAGES / "one_tile.png"))
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    for url in (f"DATA:IMAGE/PNG;BASE64,{encoded}", f"data:image/png;base64,{wrapped}"):
        assert np.array_equal(np.asarray(decode_data_url(url.replace("DATA:", "data:"))), expected)
    for image in ("https://example.com/cat.png", Path("https://example.com/cat.png")):
        with pytest.raises(ImageError, match="is a URL; images are read from files or data URLs"):
            open_image(image)


def test_an_image_without_pixels_and_image_tokens_in_the_text_are_one_clear_error(processors):
    """A 0-pixel image divided by zero in the tiling; text writing <|patch|> itself got the runtime's "the step has
    N image placeholder token(s) but M image feature row(s)"."""
    for empty in (np.zeros((0, 10, 3), np.uint8), Image.new("RGB", (0, 5))):
        with pytest.raises(ImageError, match=r"images\[0\]: a \d+ × \d+ image has no pixels"):
            processors["a"].preprocess(empty, "images[0]")
    for text in ("<|patch|><|patch|>Describe <|image|>", "<|image_start|><|image|>"):
        with pytest.raises(ImageError, match="the prompt text holds <\\|(patch|image_start)\\|> itself"):
            processors["a"].expand_prompt(text, [(1, 1)])


def test_a_hand_edited_processor_in_the_manifest_is_one_clear_error(processors):
    fields = processors["a"].config.to_dict()
    assert ImageProcessorConfig.from_dict(fields, "manifest.json") == processors["a"].config
    # an empty placeholder split the prompt with "empty separator" (llama4rt looped forever on it)
    for key, value in (("max_patches", 0), ("size", "56"), ("tokens_per_tile", 1.5), ("placeholder", ""),
                       ("image_std", (0.5, 0, 0.5))):
        with pytest.raises(ImageError, match="manifest.json: size, max_patches and tokens_per_tile must be integers"):
            ImageProcessorConfig.from_dict({**fields, key: value}, "manifest.json")


def test_a_pil_image_that_cannot_be_decoded_is_one_clear_error(processors, tmp_path):
    """Image.open() decodes lazily: a truncated file, or one closed before the image was decoded, failed on first
    use with Pillow's OSError / AssertionError traceback."""
    truncated = tmp_path / "truncated.jpg"
    data = (IMAGES / "large.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with Image.open(IMAGES / "one_tile.png") as closed:
        pass
    for image, message in [(Image.open(truncated), "images[0]: not a readable image (image file is truncated"),
                           (closed, "images[0]: the PIL image's file was closed before it was decoded")]:
        with pytest.raises(ImageError) as info:
            processors["a"].preprocess(image, "images[0]")
        assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_exif_orientation_is_applied():
    assert Image.open(IMAGES / "exif_rotated.jpg").size == (240, 100)
    assert load_image(IMAGES / "exif_rotated.jpg").size == (100, 240)


def test_a_16_bit_grayscale_png_is_read_at_its_levels_not_clipped_white(tmp_path):
    """Pillow's convert("RGB") clips 16-bit values to 0..255: a 16-bit gradient PNG became 17 levels, nearly all white."""
    levels = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "gray16.png")
    image = load_image(tmp_path / "gray16.png")
    assert image.mode.startswith("I")
    expected = np.repeat(np.rint(levels / 257).astype(np.uint8)[..., None], 3, axis=-1)  # numpy: 16 → 8 bits
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), expected)


def copy_checkpoint(tmp_path: Path, key: str) -> Path:
    return Path(shutil.copytree(VISION_FIXTURES / f"tiny-{key}", tmp_path / f"tiny-{key}"))


def edit_json(path: Path, edit) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def drop_max_patches(ckpt: Path) -> str:
    edit_json(ckpt / "preprocessor_config.json", lambda c: c.pop("max_patches"))
    return "required field 'max_patches' is missing"


def other_model_tiles(ckpt: Path) -> str:
    edit_json(ckpt / "preprocessor_config.json", lambda c: c.update(size={"height": 112, "width": 112}))
    return "the processor makes 112-px tiles of 16 tokens but the model's vision encoder takes 56-px tiles of 4"


def other_model_patches(ckpt: Path) -> str:  # the message named preprocessor_config.json alone
    edit_json(ckpt / "processor_config.json", lambda c: c.update(patch_size=7))
    return (r"preprocessor_config.json with processor_config.json's patch_size and pixel_shuffle_ratio: the processor "
            "makes 56-px tiles of 16 tokens")


def bicubic(ckpt: Path) -> str:
    edit_json(ckpt / "preprocessor_config.json", lambda c: c.update(resample=3))
    return "resample 3 is not supported"


def no_processor_files(ckpt: Path) -> str:
    (ckpt / "preprocessor_config.json").unlink()
    return "no preprocessor_config.json and no image_processor section in processor_config.json"


def empty_image_token(ckpt: Path) -> str:  # split every prompt with "empty separator"
    edit_json(ckpt / "processor_config.json", lambda c: c.update(image_token=""))
    return "image_token nonempty"


@pytest.mark.parametrize("breaker", [drop_max_patches, other_model_tiles, other_model_patches, bicubic,
                                     no_processor_files, empty_image_token])
def test_bad_processor_files_are_one_clear_error(tmp_path, breaker):
    ckpt = copy_checkpoint(tmp_path, "a")
    vision = check_checkpoint(ckpt).vision
    message = breaker(ckpt)
    with pytest.raises(ImageError, match=message) as info:
        ImageProcessorConfig.from_directory(ckpt, vision)
    assert "\n" not in str(info.value)


def test_newer_layout_takes_the_processor_section_and_the_ratio_from_it(processors):
    """tiny-b's processor_config.json (transformers 5) nests the image processor and names pixel shuffle 0.25."""
    config = processors["b"].config
    assert (config.size, config.max_patches, config.resize_to_max_canvas, config.tokens_per_tile) == (56, 4, True, 4)
    assert config.image_std == pytest.approx((0.26862954, 0.26130258, 0.27577711))


def test_an_image_past_pillows_pixel_limit_says_so_and_one_below_it_decodes_without_warnings(tmp_path, monkeypatch):
    """Pillow warns above MAX_IMAGE_PIXELS and refuses above twice it (the limits lowered here to keep the files
    small): the refusal says the image is too large, not that it is unreadable; below it, no warning reaches stderr."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "warned.png")  # 1,600 pixels: Pillow warns
    Image.new("RGB", (50, 50), (10, 200, 30)).save(tmp_path / "refused.png")  # 2,500 pixels: Pillow refuses
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "warned.png").size == (40, 40)
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "refused.png")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'refused.png'}: Image size (2500 pixels) exceeds limit of 2000 pixels")
    assert "downscale it" in message and "not a readable image" not in message and "\n" not in message


def png_claiming(width: int, height: int) -> bytes:
    """A 2 × 2 PNG whose header says it is width × height: its pixel data cannot fill that, so only a reader that
    stops at the header gets anywhere without an error."""
    import io
    import struct
    import zlib

    data = io.BytesIO()
    Image.new("L", (2, 2), 128).save(data, "PNG")
    png = bytearray(data.getvalue())
    header = b"IHDR" + struct.pack(">II", width, height) + png[24:29]  # bit depth, colour type, … kept
    png[12:29], png[29:33] = header, struct.pack(">I", zlib.crc32(header))
    return bytes(png)


def test_an_image_over_max_pixels_is_refused_from_its_header_before_it_is_decoded(processors, tmp_path):
    """A PNG of a few hundred KB may say 13000 × 13000 (169 MP, under Pillow's limit): decoding it took GBs. With
    max_pixels it is refused from the header — a file whose pixel data is not there at all gets the pixel-limit line,
    not a decoding error — in every form an image comes in; at the limit it decodes, without max_pixels Pillow's
    limit alone holds."""
    import base64
    import io
    import warnings

    claimed = png_claiming(13000, 13000)
    (tmp_path / "claimed.png").write_bytes(claimed)
    url = f"data:image/png;base64,{base64.b64encode(claimed).decode()}"
    expected = ("the image is 13000 × 13000 = 169,000,000 pixels, over the limit of 50,000,000 (max_image_pixels); "
                "downscale it (the model only sees it resized to a few tiles) or raise max_image_pixels")
    with warnings.catch_warnings():  # Pillow warns on opening it (over half its limit)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(tmp_path / "claimed.png")  # not decoded: the PIL image a caller may hand over
    for refuse in (lambda: load_image(tmp_path / "claimed.png", "claimed", 50_000_000),
                   lambda: decode_data_url(url, "claimed", 50_000_000),
                   lambda: open_image(claimed, "claimed", 50_000_000),
                   lambda: open_image(opened, "claimed", 50_000_000),
                   lambda: processors["a"].preprocess(url, "claimed", 50_000_000)):
        with pytest.raises(ImageTooLarge) as info:
            refuse()
        assert str(info.value) == f"claimed: {expected}"
        assert (info.value.width, info.value.height, info.value.limit) == (13000, 13000, 50_000_000)
    with pytest.raises(ImageError, match="^claimed: not a readable image"):  # no limit: Pillow decodes, and fails
        load_image(io.BytesIO(png_claiming(300, 200)), "claimed")
    pixels = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ImageTooLarge, match=r"^images\[0\]: the image is 30 × 20 = 600 pixels, over the limit of 599"):
        processors["a"].preprocess(pixels, "images[0]", 599)
    assert processors["a"].preprocess(pixels, "images[0]", 600).grid == processors["a"].preprocess(pixels).grid
    assert load_image(IMAGES / "one_tile.png", max_pixels=336 * 336).size == (336, 336)
    opened.close()


def test_an_image_past_pillows_own_limit_gets_the_pixel_limit_line_too():
    """Pillow refuses an image of over twice its limit (~358 MP: 20000 × 20000) inside Image.open, before check_pixels
    saw its header: the biggest images got Pillow's line (a server's 400 without code image_too_large, naming not
    --max-image-pixels) where a smaller one over the limit got ImageTooLarge. Over the caller's limit, it is that
    limit's error now; with none given, Pillow's guard still speaks."""
    claimed = png_claiming(20000, 20000)
    for refuse in (lambda: open_image(claimed, "claimed", 50_000_000),
                   lambda: decode_data_url(f"data:image/png;base64,{base64.b64encode(claimed).decode()}", "claimed",
                                           50_000_000)):
        with pytest.raises(ImageTooLarge) as info:
            refuse()
        assert str(info.value).startswith("claimed: the image is 20000 × 20000 = 400,000,000 pixels, over the limit "
                                          "of 50,000,000 (max_image_pixels)"), str(info.value)
    with pytest.raises(ImageError, match="Pillow's guard against decompression bombs") as info:
        open_image(claimed, "claimed")
    assert not isinstance(info.value, ImageTooLarge)
    with pytest.raises(ImageError, match="Pillow's guard against decompression bombs") as info:  # its limit binds
        open_image(claimed, "claimed", 10**12)
    assert not isinstance(info.value, ImageTooLarge)


def test_an_image_may_be_bytes_a_file_object_a_data_url_or_a_decoded_array(processors, reference_pixels):
    """Applications hold images in many forms (an upload's bytes, a file object, a chat's data URL, pixels decoded by
    another library as an RGB uint8 array): each gives the reference processor's pixel values of that image, as its
    file path does. What is not an image is one ImageError line naming it."""
    import base64
    import io

    compared = 0
    for name in REFERENCE["grids"]["a"]:
        if f"a/{name}" not in reference_pixels:
            continue
        path = IMAGES / name
        data = path.read_bytes()
        forms = {"bytes": data, "file object": io.BytesIO(data), "array": np.asarray(to_rgb(load_image(path))),
                 "data URL": f"data:image/{path.suffix[1:]};base64,{base64.b64encode(data).decode()}"}
        expected = reference_values(reference_pixels, "a", name)
        for form, image in forms.items():
            got = processors["a"].preprocess(image, form).pixel_values
            assert got.shape == expected.shape and np.abs(got - expected).max() <= 2e-2, (name, form)
        compared += 1
    assert compared >= 10
    for image, message in [(5, "images[0]: int is not an image"), (b"not an image", "images[0]: not a readable image"),
                           (np.zeros((4, 4), np.uint8), "images[0]: an array of shape (4, 4) and dtype uint8"),
                           (np.zeros((4, 4, 3), np.float32), "images[0]: an array of shape (4, 4, 3) and dtype float32")]:
        with pytest.raises(ImageError) as info:
            processors["a"].preprocess(image, "images[0]")
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
