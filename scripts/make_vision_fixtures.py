"""Regenerate tests/fixtures/vision/: what transformers' Llama 4 image processor, processor and model compute, for the
tests that CI runs without them.

The reference image processor (Llama4ImageProcessor) runs on torchvision, which cannot run beside this project's CPU
torch pin (see llama4_export/runtime/images.py), so this script runs in a separate venv, outside the repo (~5.5 GB:
the PyPI torch wheels bring CUDA libraries; everything here runs on the CPU):

    python3 -m venv /tmp/vision-ref
    /tmp/vision-ref/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.25.0 pillow safetensors
    /tmp/vision-ref/bin/python scripts/make_vision_fixtures.py        # from the repository root

transformers must be the version of the project's dev venv (the test builds the same model from the same files).
The script imports nothing of this project. It writes, deterministically:

  images/            12 small images made here: tiny, panorama, tall, exactly one tile, over the tile budget, large,
                     exact 2×3 grid, RGBA, greyscale, palette with transparency, grey + alpha, EXIF-rotated;
                     PNG, JPEG and WebP
  tiny-a/, tiny-b/   two seeded Llama4ForConditionalGeneration checkpoints saved by transformers (fp16 safetensors)
                     with a byte-level tokenizer that has Llama 4's special tokens. tiny-a: 56-px tiles of 14-px
                     patches, pixel shuffle 0.5, up to 6 tiles, Meta's file layout (preprocessor_config.json).
                     tiny-b: 7-px patches, pixel shuffle 0.25, up to 4 tiles with resize_to_max_canvas, CLIP's
                     mean/std, older config spellings (rope_theta, torch_dtype), newer transformers' processor
                     layout (processor_config.json with an image_processor section)
  reference.json     per processor (scout = Meta's published 336 px / 16 tiles, a, b) and image: the tile grid;
                     a table of grids and resized content sizes for 160 image sizes; prompt ids with one and with two
                     images; greedy `generate` tokens (16) with their smallest top-1 margin; versions used
  pixels.safetensors the reference pixel values, losslessly as uint8 codes into a per-processor table of the 256
                     values a pixel can take (every value is bf16(bf16(bf16(u · rescale) − mean) / std) of the resized
                     uint8 pixel u): Scout's 336-px tiles every 8th row and column, tiny-a's whole for every image,
                     tiny-b's whole for the prompt images and rgba.png
  features.safetensors  the reference projected image features of every prompt image (fp32)
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import PIL
import safetensors
import torch
import torchvision
import transformers
from PIL import Image, ImageDraw, ImageOps
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoProcessor, GenerationConfig, Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor,
    Llama4Processor, PreTrainedTokenizerFast,
)

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "vision"
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<|header_start|>", "<|header_end|>", "<|pad|>",
    "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
]
TOKEN_ID = {token: 256 + k for k, token in enumerate(SPECIAL_TOKENS)}
VOCAB = 256 + len(SPECIAL_TOKENS)
SCOUT_STRIDE = 8  # Scout's tiles are kept every 8th row and column (a whole 336-px tile would be 339 KB)
NEW_TOKENS = 16
PROMPTS = {
    "one": ("<|image|>What is in this picture?", ["panorama.jpg"]),
    "two": ("Compare <|image|> with <|image|>: which one is taller?", ["tall.webp", "tiny.png"]),
}

# tiny-b's pixel values are kept for these images only (its grids for all of them).
B_PIXELS = {image for _, images in PROMPTS.values() for image in images} | {"rgba.png"}

CHECKPOINTS = {
    "tiny-a": dict(
        text=dict(hidden_size=32, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                  interleave_moe_layer_step=2, attention_chunk_size=16, use_qk_norm=True, attn_temperature_tuning=True,
                  floor_scale=8, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16}),
        vision=dict(image_size=56, patch_size=14, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                    intermediate_size=128, pixel_shuffle_ratio=0.5, projector_input_dim=48, projector_output_dim=48,
                    vision_output_dim=48, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        processor=dict(size={"height": 56, "width": 56}, max_patches=6, resize_to_max_canvas=False),
        patch_size=14, seed=1,
    ),
    "tiny-b": dict(
        text=dict(hidden_size=24, intermediate_size=24, intermediate_size_mlp=48, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, head_dim=8, num_local_experts=2,
                  interleave_moe_layer_step=1, attention_chunk_size=8192, use_qk_norm=False,
                  attn_temperature_tuning=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        vision=dict(image_size=56, patch_size=7, hidden_size=16, num_attention_heads=2, num_hidden_layers=3,
                    intermediate_size=256, pixel_shuffle_ratio=0.25, projector_input_dim=32, projector_output_dim=32,
                    vision_output_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 100.0}),
        processor=dict(size={"height": 56, "width": 56}, max_patches=4, resize_to_max_canvas=True,
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]),
        patch_size=7, seed=2,
    ),
}


# --------------------------------------------------------------------------------------------------------- images
def _pattern(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients (what interpolation sees), a few flat shapes (small files) and one fine checkerboard patch
    (what antialiasing sees)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    period = max(width, height) / (4 + seed % 3)  # a few waves whatever the size: large images stay small files
    rgb = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                    127.5 + 127.5 * np.sin(2 * np.pi * (x + 2 * y) / period)], axis=-1)
    image = Image.fromarray(rgb.round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(1, max(width // 3, 2))), y0 + int(rng.integers(1, max(height // 3, 2)))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    cell = max(min(width, height) // 16, 1)
    checker = ((np.indices((cell * 4, cell * 4)).sum(axis=0) % 2) * 255).astype(np.uint8)
    image.paste(Image.fromarray(checker, "L").convert("RGB"), (width // 2, height // 2))
    return image


def make_images(directory: Path) -> list[str]:
    directory.mkdir(parents=True)
    rgba = _pattern(200, 120, 7).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 200).round().astype(np.uint8), (120, 1))
    rgba.putalpha(Image.fromarray(alpha, "L"))
    palette = _pattern(100, 60, 9).quantize(colors=16)
    grey_alpha = _pattern(64, 48, 10).convert("LA")
    grey_alpha.putalpha(Image.fromarray(np.tile(np.linspace(255, 30, 64).astype(np.uint8), (48, 1)), "L"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown rotated 90° clockwise
    saves = {
        "tiny.png": (_pattern(9, 13, 1), {}),
        "panorama.jpg": (_pattern(1200, 160, 2), {"quality": 90}),
        "tall.webp": (_pattern(140, 900, 3), {"quality": 90}),
        "one_tile.png": (_pattern(336, 336, 4), {}),
        "over_budget.png": (_pattern(2400, 100, 5), {}),
        "large.jpg": (_pattern(1500, 1100, 6), {"quality": 70}),
        "grid_2x3.png": (_pattern(1008, 672, 11), {}),
        "rgba.png": (rgba, {}),
        "grey.jpg": (_pattern(300, 500, 8).convert("L"), {"quality": 90}),
        "palette.png": (palette, {"transparency": 3}),
        "grey_alpha.png": (grey_alpha, {}),
        "exif_rotated.jpg": (_pattern(240, 100, 12), {"quality": 90, "exif": exif}),
    }
    for name, (image, options) in saves.items():
        image.save(directory / name, **options)
    return list(saves)


def open_image(path: Path) -> Image.Image:
    """As the runtime opens a file: decoded now, turned upright by its EXIF orientation (transformers' load_image)."""
    with Image.open(path) as opened:
        opened.load()
        return ImageOps.exif_transpose(opened)


# ------------------------------------------------------------------------------------------------- checkpoints
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Ids 0–255 are the bytes (GPT-2's printable stand-ins), then SPECIAL_TOKENS; a leading <|begin_of_text|>."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    symbols = {b: chr(b) if b in printable else chr(256 + unprintable.index(b)) for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A:0", special_tokens=[(bos, TOKEN_ID[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token="<|eot|>", pad_token="<|pad|>")


def seeded_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights that make activations and logits O(1), so greedy choices are not near-ties: linear layers and experts
    normal(0, 1/√fan_in), embeddings normal(0, 1), class and positional embeddings normal(0, 1/√hidden), norm weights
    1 + normal(0, 0.1), biases normal(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif "norm" in name:
                param.copy_(1 + 0.1 * noise)
            elif name.endswith(("class_embedding", "positional_embedding_vlm")):
                param.copy_(noise / math.sqrt(param.shape[-1]))
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            else:  # nn.Linear [out, in]; experts [E, in, out]
                param.copy_(noise / math.sqrt(param.shape[1] if param.ndim == 3 else param.shape[-1]))


def make_checkpoint(name: str, spec: dict) -> Path:
    directory = OUT / name
    text = dict(vocab_size=VOCAB, num_experts_per_tok=1, max_position_embeddings=4096, tie_word_embeddings=False,
                bos_token_id=TOKEN_ID["<|begin_of_text|>"], eos_token_id=TOKEN_ID["<|eot|>"],
                pad_token_id=TOKEN_ID["<|pad|>"], **spec["text"])
    config = Llama4Config(text_config=text, vision_config=spec["vision"], image_token_index=TOKEN_ID["<|patch|>"],
                          boi_token_index=TOKEN_ID["<|image_start|>"], eoi_token_index=TOKEN_ID["<|image_end|>"])
    model = Llama4ForConditionalGeneration(config)
    seeded_weights(model, spec["seed"])
    model.to(torch.float16).save_pretrained(directory)
    processor = Llama4Processor(image_processor=Llama4ImageProcessor(**spec["processor"]), tokenizer=byte_level_tokenizer(),
                                patch_size=spec["patch_size"], pixel_shuffle_ratio=spec["vision"]["pixel_shuffle_ratio"])
    processor.save_pretrained(directory)
    processor_file = directory / "processor_config.json"
    saved = json.loads(processor_file.read_text())
    # transformers does not save the processor's pixel_shuffle_ratio; its loader takes it from this file when present
    saved["pixel_shuffle_ratio"] = spec["vision"]["pixel_shuffle_ratio"]
    if name == "tiny-a":  # Meta's layout: the image processor in preprocessor_config.json
        image_processor = saved.pop("image_processor")
        image_processor.update(image_processor_type="Llama4ImageProcessorFast", processor_class="Llama4Processor")
        _write_json(directory / "preprocessor_config.json", image_processor)
    else:  # older spellings in config.json: rope_theta instead of rope_parameters, torch_dtype instead of dtype
        cfg = json.loads((directory / "config.json").read_text())
        for section in (cfg["text_config"], cfg["vision_config"]):
            section["rope_theta"] = section.pop("rope_parameters")["rope_theta"]
        cfg["torch_dtype"] = cfg.pop("dtype")
        _write_json(directory / "config.json", cfg)
    _write_json(processor_file, saved)
    return directory


# --------------------------------------------------------------------------------------------------- references
def value_table(image_processor) -> torch.Tensor:
    """[3, 256]: the pixel value the reference's rescale + normalize gives each uint8 level, per channel."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    out = image_processor.rescale_and_normalize(levels, True, image_processor.rescale_factor, True,
                                                image_processor.image_mean, image_processor.image_std)
    return out[0, :, 0].float()


def as_codes(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 codes with table[channel][code] == pixel exactly (asserted)."""
    values = pixels.float().movedim(-3, -1)  # [..., H, W, 3]
    codes = (values[..., None] == table[None, None, None]).float().argmax(-1).to(torch.uint8)
    assert torch.equal(table[torch.arange(3), codes.long()], values), "a pixel value outside the reference's table"
    return codes.movedim(-1, -3).contiguous()


def grid_table(image_processor, sizes: list[tuple[int, int]]) -> list[list[int]]:
    """[h, w, rows, cols, content_h, content_w] per size: a white image of that size through the reference, the
    content size read back from where the black padding starts."""
    rows = []
    size = image_processor.size["height"]
    for h, w in sizes:
        out = image_processor(Image.new("RGB", (w, h), (255, 255, 255)), return_tensors="pt")
        grid_h, grid_w = (int(v) for v in out["aspect_ratios"][0])
        tiles = out["pixel_values"][: grid_h * grid_w, 0].float()  # channel 0
        canvas = tiles.view(grid_h, grid_w, size, size).permute(0, 2, 1, 3).reshape(grid_h * size, grid_w * size)
        rows.append([h, w, grid_h, grid_w, int((canvas[:, 0] > 0).sum()), int((canvas[0] > 0).sum())])
    return rows


def table_sizes() -> list[tuple[int, int]]:
    fixed = [(1, 1), (1, 700), (700, 1), (13, 9), (55, 57), (56, 56), (57, 56), (112, 168), (335, 337), (336, 336),
             (337, 336), (336, 672), (672, 336), (1008, 1344), (1344, 1344), (1345, 1344), (100, 2400), (5000, 90),
             (799, 1201), (3000, 2000)]
    rng = np.random.default_rng(0)
    sides = np.exp(rng.uniform(math.log(4), math.log(3000), size=(140, 2))).round().astype(int)
    return fixed + [(int(h), int(w)) for h, w in sides]


def greedy_generate(model, inputs, pad_id: int) -> tuple[list[int], float]:
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"].float(), generation_config=config, output_scores=True,
                         return_dict_in_generate=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(new) == NEW_TOKENS
    top2 = [scores[0].topk(2).values for scores in out.scores]
    margin = min(float(first - second) for first, second in top2)
    return new, margin


def main() -> None:
    torch.manual_seed(0)
    if OUT.exists():
        shutil.rmtree(OUT)
    names = make_images(OUT / "images")
    images = {name: open_image(OUT / "images" / name) for name in names}
    checkpoints = {name: make_checkpoint(name, spec) for name, spec in CHECKPOINTS.items()}
    processors = {"scout": Llama4ImageProcessor(size={"height": 336, "width": 336}, max_patches=16)}
    full = {name: AutoProcessor.from_pretrained(path) for name, path in checkpoints.items()}
    processors.update({name.removeprefix("tiny-"): p.image_processor for name, p in full.items()})

    pixels, reference = {}, {"versions": {m.__name__: m.__version__ for m in (torch, torchvision, transformers, PIL,
                                                                               np, safetensors)},
                             "scout_stride": SCOUT_STRIDE, "grids": {}, "grid_table": {}, "prompts": {}}
    for key, image_processor in processors.items():
        table = value_table(image_processor)
        pixels[f"{key}/table"] = table
        reference["grids"][key] = {}
        for name, image in images.items():
            out = image_processor(image, return_tensors="pt")
            reference["grids"][key][name] = [int(v) for v in out["aspect_ratios"][0]]
            values = out["pixel_values"]
            if key == "scout":
                values = values[..., ::SCOUT_STRIDE, ::SCOUT_STRIDE]
            if key != "b" or name in B_PIXELS:
                pixels[f"{key}/{name}"] = as_codes(values, table)
        reference["grid_table"][key] = grid_table(image_processor, table_sizes())

    features = {}
    for name, path in checkpoints.items():
        processor = full[name]
        model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        reference["prompts"][name] = {}
        for label, (text, image_names) in PROMPTS.items():
            inputs = processor(text=text, images=[images[i] for i in image_names], return_tensors="pt")
            with torch.no_grad():
                for image_name in image_names:
                    tiles = processor.image_processor(images[image_name], return_tensors="pt")["pixel_values"].float()
                    features[f"{name}/{image_name}"] = model.get_image_features(pixel_values=tiles).pooler_output
                tokens, margin = greedy_generate(model, inputs, TOKEN_ID["<|pad|>"])
            reference["prompts"][name][label] = {
                "text": text, "images": image_names, "input_ids": inputs["input_ids"][0].tolist(),
                "generated": tokens, "smallest_top1_margin": round(margin, 4),
            }
            assert margin > 1e-3, f"{name}/{label}: greedy step with a top-1 margin of {margin}: pick another seed"
    save_file(pixels, OUT / "pixels.safetensors")
    save_file({k: v.contiguous() for k, v in features.items()}, OUT / "features.safetensors")
    _write_json(OUT / "reference.json", reference)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT}: {total / 1e6:.2f} MB")


def _write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
