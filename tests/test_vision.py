"""The vision encoder, its config and loader, and early fusion, against transformers' Llama4ForConditionalGeneration:
built in-test from the two fixture checkpoints, and against the reference outputs stored beside them (features and
greedy `generate` tokens computed by transformers from the reference processor's pixel values)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Llama4ForConditionalGeneration
from typer.testing import CliRunner

from llama4_export import CheckpointError, Llama4ExportError
from llama4_export.cli.export import export_app
from llama4_export.model import Llama4VisionConfig, get_preset, get_vision_preset, summarize
from llama4_export.model.loader import check_checkpoint
from llama4_export.model.multimodal import generate_greedy, merge_image_features
from llama4_export.model.vision import Llama4VisionEncoder
from llama4_export.runtime.images import ImageProcessor
from llama4_export.runtime.tokenizer import Tokenizer
from llama4_export.weights import load, load_vision, vision_from_config

from .conftest import VISION_FIXTURES, make_hf_checkpoint

CHECKPOINTS = ("tiny-a", "tiny-b")
REFERENCE = json.loads((VISION_FIXTURES / "reference.json").read_text())


@pytest.fixture(scope="module")
def reference_features() -> dict[str, torch.Tensor]:
    return load_file(VISION_FIXTURES / "features.safetensors")


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple]:
    """Per fixture checkpoint: our text model, our encoder and the image processor read from its files."""
    models = {}
    for name in CHECKPOINTS:
        ckpt = VISION_FIXTURES / name
        models[name] = (load(ckpt), load_vision(ckpt), ImageProcessor.from_directory(ckpt, check_checkpoint(ckpt).vision))
    return models


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_features_match_transformers(name, reference_features, loaded):
    """Our encoder vs the stored reference (transformers with torch 2.14) and vs transformers here, ≤ 1e-4 in fp32."""
    _, encoder, processor = loaded[name]
    hf = Llama4ForConditionalGeneration.from_pretrained(VISION_FIXTURES / name, dtype=torch.float32).eval()
    images = {image for case in REFERENCE["prompts"][name].values() for image in case["images"]}
    for image in sorted(images):
        tiles = torch.from_numpy(processor.preprocess(VISION_FIXTURES / "images" / image).pixel_values)
        with torch.no_grad():
            ours, here = encoder(tiles), hf.get_image_features(pixel_values=tiles).pooler_output
        stored = reference_features[f"{name}/{image}"]
        assert ours.shape == stored.shape == (tiles.shape[0], encoder.config.tokens_per_tile, hf.config.text_config.hidden_size)
        assert (ours - stored).abs().max() <= 1e-4, image
        assert (ours - here).abs().max() <= 1e-4, image


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("prompt", ["one", "two"])
def test_greedy_generation_with_images_matches_transformers(name, prompt, loaded):
    """The whole path in PyTorch: our preprocessing and prompt expansion, our encoder, the fused prefill and the text
    model, against transformers' `generate` (16 greedy tokens) on the reference processor's inputs."""
    case = REFERENCE["prompts"][name][prompt]
    model, encoder, processor = loaded[name]
    processed = [processor.preprocess(VISION_FIXTURES / "images" / image) for image in case["images"]]
    ids = Tokenizer(VISION_FIXTURES / name).encode(processor.expand_prompt(case["text"], [p.grid for p in processed]))
    pixels = torch.from_numpy(np.concatenate([p.pixel_values for p in processed]))
    tokens = generate_greedy(model, encoder, torch.tensor([ids]), pixels, len(case["generated"]))
    assert tokens == case["generated"]


def test_merge_is_masked_scatter():
    torch.manual_seed(0)
    embeddings = torch.randn(2, 7, 5)
    mask = torch.rand(2, 7) > 0.5
    features = torch.randn(int(mask.sum()), 5)
    expected = embeddings.masked_scatter(mask[..., None], features)
    assert torch.equal(merge_image_features(embeddings, mask, features), expected)
    assert torch.equal(merge_image_features(embeddings, torch.zeros(2, 7, dtype=torch.bool), features[:0]), embeddings)
    with pytest.raises(ValueError, match="image placeholder tokens but features for"):
        merge_image_features(embeddings, mask, features[1:])


def test_seeded_encoder_matches_transformers_and_is_deterministic():
    """vision_from_config on a third config (pixel shuffle 0.5, 3 tiles of 8×8 patches), loaded into transformers."""
    from transformers import Llama4Config as HFConfig

    vision = dict(image_size=64, patch_size=8, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                  intermediate_size=128, pixel_shuffle_ratio=0.5, projector_input_dim=24, projector_output_dim=24,
                  vision_output_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 50.0})
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=16, intermediate_size_mlp=16, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=2)
    hf_config = HFConfig(vision_config=vision, text_config=text, image_token_index=60)
    config = Llama4VisionConfig.from_hf_dict(hf_config.to_dict())
    ours = vision_from_config(config, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), vision_from_config(config, seed=3).state_dict().values()))
    hf = Llama4ForConditionalGeneration(hf_config).eval()
    hf.load_state_dict({**hf.state_dict(), **ours.state_dict()})
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert (ours(pixels) - hf.get_image_features(pixel_values=pixels).pooler_output).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------------ config + loader
def test_config_reads_newer_and_older_spellings():
    a = check_checkpoint(VISION_FIXTURES / "tiny-a").vision  # rope_parameters, dtype (transformers 5)
    b = check_checkpoint(VISION_FIXTURES / "tiny-b").vision  # rope_theta, torch_dtype (older / Meta's)
    assert (a.rope_theta, b.rope_theta) == (10000.0, 100.0)
    assert (a.patch_size, a.pixel_shuffle_ratio, a.tokens_per_tile) == (14, 0.5, 4)
    assert (b.patch_size, b.pixel_shuffle_ratio, b.tokens_per_tile, b.shuffled_size) == (7, 0.25, 4, 256)
    assert a.image_token_id == 265 and a.text_hidden_size == 32


def test_scout_vision_preset_is_meta_published_size():
    vision = get_vision_preset("scout")
    assert vision.tokens_per_tile == 144 and get_vision_preset("scout-tiny") is None
    with torch.device("meta"):
        instantiated = sum(p.numel() for p in Llama4VisionEncoder(vision).parameters())
    summary = summarize(get_preset("scout"), vision)
    assert summary["vision"]["params"] == instantiated
    # Meta's "109B" counts the vision tower: 107.77 B text + 0.87 B vision.
    assert (summary["total_params"] + instantiated) / 1e9 == pytest.approx(109, abs=0.5)


@pytest.mark.parametrize("field, value, message", [
    ("intermediate_size", 100, "intermediate_size 100 must equal hidden_size / pixel_shuffle_ratio² = 128"),
    ("patch_size", [14, 7], "is not square"),
    ("image_size", None, "required field 'vision_config.image_size' is missing"),
    ("hidden_act", "relu", "hidden_act 'relu' is not supported"),
    # a ZeroDivisionError traceback; negative parameter counts printed; a string and a fraction taken as integers
    ("patch_size", 0, "vision_config.patch_size=0: must be >= 1"),
    ("num_attention_heads", 0, "vision_config.num_attention_heads=0: must be >= 1"),
    ("num_hidden_layers", -3, "vision_config.num_hidden_layers=-3: must be >= 1"),
    ("image_size", "336", 'vision_config.image_size="336": must be an integer'),
    ("hidden_size", 1408.7, "vision_config.hidden_size=1408.7: must be an integer"),
])
def test_bad_vision_config_is_one_clear_error(tmp_path, field, value, message):
    ckpt = Path(shutil.copytree(VISION_FIXTURES / "tiny-a", tmp_path / "ckpt"))
    config = json.loads((ckpt / "config.json").read_text())
    config["vision_config"][field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(Llama4ExportError, match=re.escape(message)) as info:
        check_checkpoint(ckpt)
    assert "\n" not in str(info.value)


def rewrite_weights(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("vision_model.model.layers.1.mlp.fc2.bias"), "tensor 'vision_model.model.layers.1.mlp.fc2.bias' is missing"),
    (lambda t: t.update({"multi_modal_projector.linear_1.weight": torch.zeros(32, 40)}),
     "tensor 'multi_modal_projector.linear_1.weight' has shape \\[32, 40\\], config.json implies \\[32, 48\\]"),
    (lambda t: t.update({"vision_model.extra": torch.zeros(2)}), "unexpected tensor 'vision_model.extra'"),
    (lambda t: t.update({"vision_model.class_embedding": torch.zeros(32, dtype=torch.int32)}),
     "tensor 'vision_model.class_embedding' is stored as I32"),
])
def test_vision_weights_load_strictly(tmp_path, edit, message):
    ckpt = Path(shutil.copytree(VISION_FIXTURES / "tiny-a", tmp_path / "ckpt"))
    rewrite_weights(ckpt, edit)
    for loader in (check_checkpoint, load_vision, load):
        with pytest.raises(CheckpointError, match=message) as info:
            loader(ckpt)
        assert "\n" not in str(info.value)
    result = CliRunner().invoke(export_app, ["inspect", "--checkpoint", str(ckpt)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


RENAMED_LAYOUT = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                  ("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."))


def test_a_checkpoint_in_the_model_language_model_layout_is_named_with_the_renames(tmp_path):
    """model.language_model.* / model.vision_model.* (as some tools write Llama 4) was refused as "tensor
    'lm_head.weight' (and 43 more) is missing", naming no layout; the renames the message gives load it."""
    ckpt = Path(shutil.copytree(VISION_FIXTURES / "tiny-a", tmp_path / "ckpt"))

    def rename(tensors, pairs):
        for key in list(tensors):
            old, new = next((old, new) for old, new in pairs if key.startswith(old))
            tensors[new + key[len(old):]] = tensors.pop(key)
    rewrite_weights(ckpt, lambda t: rename(t, RENAMED_LAYOUT))
    result = CliRunner().invoke(export_app, ["inspect", "--checkpoint", str(ckpt)])
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: {ckpt}: tensor names use the model.language_model.* / model.vision_model.* layout; this loader reads "
        "Llama4ForConditionalGeneration's (as on the hub): rename model.language_model.* to language_model.model.*, "
        "lm_head.* to language_model.lm_head.*, model.vision_model.* to vision_model.* and "
        "model.multi_modal_projector.* to multi_modal_projector.*"), result.stderr
    rewrite_weights(ckpt, lambda t: rename(t, [(new, old) for old, new in RENAMED_LAYOUT]))
    reference = Llama4ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).state_dict()
    assert all(torch.equal(weight, reference[name]) for name, weight in load_vision(ckpt).state_dict().items())


def test_text_only_checkpoint_stays_text_only(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "text", dtype=torch.float32)
    index = check_checkpoint(ckpt)
    assert index.vision is None and index.vision_files == {}
    with pytest.raises(CheckpointError, match="has no vision_config; this text-only checkpoint has no vision encoder"):
        load_vision(ckpt)
    assert "vision" not in CliRunner().invoke(export_app, ["inspect", "--checkpoint", str(ckpt), "--json"]).stdout


def test_multimodal_checkpoint_text_model_matches_transformers():
    """The text half of a multimodal checkpoint loads as before (language_model.*) and computes what transformers'
    language model computes."""
    ckpt = VISION_FIXTURES / "tiny-a"
    hf = Llama4ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (load(ckpt)(ids) - hf(input_ids=ids).logits).abs().max() <= 1e-4


def test_inspect_reports_vision_parameters_and_tokens_per_tile():
    result = CliRunner().invoke(export_app, ["inspect", "--checkpoint", str(VISION_FIXTURES / "tiny-b"), "--json"])
    assert result.exit_code == 0, result.output
    vision = json.loads(result.stdout)["vision"]
    with torch.device("meta"):
        count = sum(p.numel() for p in Llama4VisionEncoder(check_checkpoint(VISION_FIXTURES / "tiny-b").vision).parameters())
    assert vision["params"] == count and vision["tokens_per_tile"] == 4 and vision["patch_size"] == 7
    table = CliRunner().invoke(export_app, ["inspect", "--model", "scout"]).stdout
    assert "vision encoder" in table and "144" in table
