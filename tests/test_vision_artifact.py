"""Images through an exported artifact: the two fixture checkpoints exported once each by the one pipeline (fp32, and
tiny-a at int4), their vision graphs on ONNX Runtime against the reference features, greedy generation with images
against transformers' `generate` tokens (tests/fixtures/vision/reference.json, made by scripts/make_vision_fixtures.py),
and every bad input as one line."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from safetensors.numpy import load_file
from transformers import Llama4ForConditionalGeneration
from typer.testing import CliRunner

from llama4_export.artifact import MANIFEST, write_manifest
from llama4_export.cli.export import export_app
from llama4_export.cli.run import run_app
from llama4_export.export.onnx_export import VISION_FILE
from llama4_export.model import io_spec
from llama4_export.pipeline import QuantOptions, export, vision_precision_for, write_vision_graph
from llama4_export.rebuild import rebuild
from llama4_export.runtime import Generator
from llama4_export.runtime.image_encoder import ImageEncoder
from llama4_export.runtime.images import ImageProcessorConfig
from llama4_export.tensorrt.lint import lint_artifact
from llama4_export.tensorrt.profiles import build_limits, engine_profiles
from llama4_export.runtime.errors import ImageError
from llama4_export.weights import CheckpointWeights

from .conftest import VISION_FIXTURES

CHECKPOINTS = ("tiny-a", "tiny-b")
REFERENCE = json.loads((VISION_FIXTURES / "reference.json").read_text())
IMAGES = VISION_FIXTURES / "images"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    out = {}
    for name in CHECKPOINTS:
        out[name] = root / name
        export(out[name], CheckpointWeights(VISION_FIXTURES / name), "fp32", quant=QuantOptions(report=False),
               show_progress=False)
    return out


@pytest.fixture(scope="module")
def generators(artifacts) -> dict[str, Generator]:
    return {name: Generator.load(path) for name, path in artifacts.items()}


def case_images(case: dict) -> list[Path]:
    return [IMAGES / image for image in case["images"]]


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_vision_graph_matches_reference_features(name, generators):
    encoder = generators[name].image_encoder
    stored = load_file(VISION_FIXTURES / "features.safetensors")
    images = sorted({image for case in REFERENCE["prompts"][name].values() for image in case["images"]})
    for image in images:
        features = encoder.encode(encoder.preprocess([IMAGES / image]))
        expected = stored[f"{name}/{image}"]
        assert features.shape == (expected.shape[0] * expected.shape[1], expected.shape[2])
        assert np.abs(features - expected.reshape(features.shape)).max() <= 1e-4, image


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("prompt", ["one", "two"])
def test_greedy_generation_with_images_matches_transformers(name, prompt, generators):
    """16 greedy tokens through vision.onnx, the fused prefill (in pieces cut at tiny-a's 16-token chunks) and decode."""
    case = REFERENCE["prompts"][name][prompt]
    result = generators[name].generate(case["text"], max_new_tokens=len(case["generated"]), stop_tokens=[],
                                       images=case_images(case))
    assert result.prompt_ids == case["input_ids"]  # Llama4Processor's expansion
    assert result.token_ids == case["generated"]


def test_one_image_may_be_given_alone_in_any_form(generators):
    """images= one image, not in a list, as a path already was: a PIL image failed "not iterable", an array "truth
    value of an array is ambiguous", bytes were read one image per byte ("int is not an image")."""
    import io

    from PIL import Image

    case = REFERENCE["prompts"]["tiny-a"]["one"]
    path, = case_images(case)
    forms = {"PIL image": Image.open(path), "bytes": path.read_bytes(), "file object": io.BytesIO(path.read_bytes()),
             "array": np.asarray(Image.open(path).convert("RGB"))}
    for form, image in forms.items():
        result = generators["tiny-a"].generate(case["text"], max_new_tokens=len(case["generated"]), stop_tokens=[],
                                               images=image)
        assert (result.prompt_ids, result.token_ids) == (case["input_ids"], case["generated"]), form


def test_manifest_and_graph_inputs(artifacts):
    manifest = json.loads((artifacts["tiny-b"] / MANIFEST).read_text())
    vision = manifest["vision"]
    assert (vision["file"], vision["dtype"], vision["config"]["image_token_id"]) == ("vision.onnx", "float32", 265)
    assert vision["processor"]["resize_to_max_canvas"] and vision["processor"]["max_patches"] == 4
    inputs = {graph: [i.name for i in onnx.load(artifacts["tiny-b"] / f"{graph}.onnx", load_external_data=False).graph.input]
              for graph in ("decode", "prefill", "vision")}
    assert inputs["prefill"][-1] == io_spec.IMAGE_FEATURES and io_spec.IMAGE_FEATURES not in inputs["decode"]
    assert inputs["vision"] == [io_spec.PIXEL_VALUES]
    assert vision["graph_passes"]["passes"][-1] == "tidy" and (artifacts["tiny-b"] / vision["graph_passes"]["report"]).is_file()
    vision_ops = {n.op_type for n in onnx.load(artifacts["tiny-b"] / "vision.onnx", load_external_data=False).graph.node}
    assert {"SkipLayerNormalization", "BiasGelu", "MultiHeadAttention"} <= vision_ops  # the vision fusions ran (graph_passes/fuse_vision.py)


def test_text_prompts_run_unchanged_on_a_vision_artifact(generators):
    """No images: zero feature rows; a `<|patch|>` typed into the prompt keeps its embedding, as in transformers."""
    generator = generators["tiny-a"]
    plain = generator.generate("Hello there <|patch|>", max_new_tokens=4, stop_tokens=[])
    assert len(plain.token_ids) == 4


def test_int4_export_keeps_the_vision_graph_fp32(tmp_path, artifacts):
    out = tmp_path / "int4"
    export(out, CheckpointWeights(VISION_FIXTURES / "tiny-a"), "int4", quant=QuantOptions(int4_algo="rtn", report=False),
           show_progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["vision"]["precision"], manifest["vision"]["dtype"]) == ("fp32", "float32")
    assert (out / "vision.onnx").read_bytes() == (artifacts["tiny-a"] / "vision.onnx").read_bytes()
    assert (out / "vision.data").read_bytes() == (artifacts["tiny-a"] / "vision.data").read_bytes()
    case = REFERENCE["prompts"]["tiny-a"]["one"]
    generator = Generator.load(out)
    assert generator.image_encoder.precision == "fp32"  # what the memory planner sizes the tower by on a GPU
    result = generator.generate(case["text"], max_new_tokens=16, stop_tokens=[], images=case_images(case))
    assert len(result.token_ids) == 16


# Per --vision-precision: what its vision.onnx holds, and the stated bound on its features vs transformers' (max abs,
# worst row cosine; benchmarks/vision_precision.py measures them: BENCHMARKS.md, "Vision precision").
VISION_PRECISION_CASES = {
    "fp16": (lambda ops, dtypes: dtypes[ir.DataType.FLOAT16] > 0 and dtypes[ir.DataType.FLOAT] == 2, 5e-3, 0.9999),
    # 12 linears, q, k and v of a layer one MatMulNBits (fuse_sibling_projections)
    "int4": (lambda ops, dtypes: ops["com.microsoft.MatMulNBits"] == 8 and ops["Split"] == 2, 0.5, 0.9),
    "fp8": (lambda ops, dtypes: ops["DequantizeLinear"] == 12 and dtypes[ir.DataType.FLOAT8E4M3FN] == 12, 0.15, 0.99),
}


@pytest.mark.parametrize("precision", sorted(VISION_PRECISION_CASES))
def test_vision_precision_reaches_the_graph_and_stays_near_the_reference(precision, tmp_path):
    """tiny-a's vision graph through the one pipeline's vision step at each precision: int4 / fp8 quantize the 12
    linears of its 2 encoder layers (q, k, v, o, fc1, fc2), fp16 stores every float weight as fp16 (the RoPE tables
    stay fp32, as in every precision)."""
    vision = CheckpointWeights(VISION_FIXTURES / "tiny-a").vision
    processor = ImageProcessorConfig.from_directory(VISION_FIXTURES / "tiny-a", vision.config)
    (tmp_path / "work").mkdir()
    entry = write_vision_graph(vision, processor, precision, tmp_path, tmp_path / "work", "onnxruntime")
    assert entry["precision"] == precision
    model = ir.load(tmp_path / VISION_FILE)
    ops = Counter(f"{n.domain}.{n.op_type}".lstrip(".") for n in model.graph.all_nodes())
    dtypes = Counter(v.const_value.dtype for v in model.graph.initializers.values() if v.const_value.size > 1)
    reaches_graph, max_abs, min_cosine = VISION_PRECISION_CASES[precision]
    assert reaches_graph(ops, dtypes), (ops, dtypes)
    encoder = ImageEncoder(tmp_path / VISION_FILE, vision.config, processor)
    image = "panorama.jpg"
    features = encoder.encode(encoder.preprocess([IMAGES / image])).astype(np.float64)
    expected = load_file(VISION_FIXTURES / "features.safetensors")[f"tiny-a/{image}"].reshape(features.shape)
    cosine = (features * expected).sum(-1) / (np.linalg.norm(features, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert np.abs(features - expected).max() <= max_abs and cosine.min() >= min_cosine


def test_tensorrt_target_lowers_the_vision_graph(tmp_path):
    """--target tensorrt on a multimodal checkpoint (fp16): every graph, vision.onnx included, lints clean; the vision engine gets its own profile over the tile count (1 … one image's
    budget: 6 tiles + the global one) and the prefill one over its image feature rows; vision.onnx as lowered still
    matches transformers' features on ONNX Runtime."""
    out = tmp_path / "trt"
    export(out, CheckpointWeights(VISION_FIXTURES / "tiny-a"), "fp16", "tensorrt", QuantOptions(report=False),
           show_progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["vision"]["precision"], manifest["vision"]["graph_passes"]["target"]) == ("fp16", "tensorrt")
    assert {file: [v.format() for v in found] for file, found in lint_artifact(out).items()} == \
        {"decode.onnx": [], "prefill.onnx": [], "vision.onnx": []}
    profiles = engine_profiles(manifest, build_limits(manifest))
    side = manifest["vision"]["config"]["image_size"]
    assert profiles["vision"][io_spec.PIXEL_VALUES].to_json() == {
        "min": [1, 3, side, side], "opt": [7, 3, side, side], "max": [7, 3, side, side]}
    assert profiles["prefill"][io_spec.IMAGE_FEATURES].to_json()["min"] == [0, manifest["model"]["hidden_size"]]
    encoder = ImageEncoder.from_artifact(out, manifest)
    features = encoder.encode(encoder.preprocess([IMAGES / "panorama.jpg"]))
    expected = load_file(VISION_FIXTURES / "features.safetensors")["tiny-a/panorama.jpg"]
    assert np.abs(features - expected.reshape(features.shape)).max() <= 5e-3


# ------------------------------------------------------------------------------------------------ bad input
def run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(run_app, [str(a) for a in args])
    return result.exit_code, result.output


def test_vision_precision_defaults():
    """The text's float type; under int4 / fp8 text fp32 on onnxruntime, fp16 on tensorrt; a given one wins."""
    assert [vision_precision_for(p, t, None, True) for p, t in (("fp16", "onnxruntime"), ("bf16", "tensorrt"),
            ("int4", "onnxruntime"), ("fp8", "onnxruntime"), ("int4", "tensorrt"), ("fp8", "tensorrt"))] == \
        ["fp16", "bf16", "fp32", "fp32", "fp16", "fp16"]
    assert vision_precision_for("int4", "tensorrt", "fp8", True) == "fp8"


def test_bad_vision_precision_is_one_line_and_exit_2(tmp_path):
    cases = [
        (("--checkpoint", VISION_FIXTURES / "tiny-a", "--vision-precision", "int3"), "--vision-precision 'int3' is not supported"),
        (("--model", "scout-tiny", "--vision-precision", "fp16"), "--vision-precision fp16: this model has no vision tower"),
        (("--checkpoint", VISION_FIXTURES / "tiny-a", "--vision-precision", "int4", "--no-optimize"),
         "--vision-precision int4 quantizes in the graph passes"),
        (("--checkpoint", VISION_FIXTURES / "tiny-a", "--vision-precision", "fp16", "--text-only"),
         "--vision-precision fp16 with --text-only: the vision tower is left out"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(export_app, [str(a) for a in (*args, "--out", tmp_path / "out", "--target", "onnxruntime")])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def text_only(tmp_path_factory) -> Path:
    """tiny-b exported with --text-only through the CLI: the text deployment of a multimodal checkpoint."""
    out = tmp_path_factory.mktemp("text") / "artifact"
    result = CliRunner().invoke(export_app, ["--checkpoint", str(VISION_FIXTURES / "tiny-b"), "--text-only",
                                             "--out", str(out), "--target", "onnxruntime"])
    assert result.exit_code == 0, result.output
    return out


def test_text_only_export_leaves_the_vision_tower_out_generates_as_transformers_and_rebuilds(text_only):
    manifest = json.loads((text_only / MANIFEST).read_text())
    assert "vision" not in manifest and not [f for f in manifest["files"] if f.startswith("vision")]
    prefill = onnx.load(text_only / "prefill.onnx", load_external_data=False)
    assert io_spec.IMAGE_FEATURES not in [i.name for i in prefill.graph.input]
    result = Generator.load(text_only).generate("The quick brown fox", max_new_tokens=12, stop_tokens=[])
    reference = Llama4ForConditionalGeneration.from_pretrained(VISION_FIXTURES / "tiny-b", dtype=torch.float32).eval()
    ids = list(result.prompt_ids)
    with torch.no_grad():
        for _ in range(12):  # greedy, the whole sequence each step (no cache, no stop token)
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
    assert result.token_ids == ids[len(result.prompt_ids):]
    rebuilt = rebuild(text_only, checkpoint=VISION_FIXTURES / "tiny-b", show_progress=False)
    assert rebuilt.identical and len(rebuilt.compared) == len(manifest["files"]), rebuilt.differences


def test_rebuild_keeps_the_vision_precision_of_the_export(tmp_path):
    """rebuild exported the vision tower at its default precision, whatever the original's --vision-precision: any
    such artifact was reported "not reproducible"."""
    out = tmp_path / "artifact"
    result = CliRunner().invoke(export_app, ["--checkpoint", str(VISION_FIXTURES / "tiny-a"), "--vision-precision",
                                             "fp16", "--no-report", "--out", str(out), "--target", "onnxruntime"])
    assert result.exit_code == 0, result.output
    rebuilt = rebuild(out, checkpoint=VISION_FIXTURES / "tiny-a", show_progress=False)
    assert rebuilt.identical, rebuilt.differences


@pytest.fixture(scope="module")
def short_context(artifacts, tmp_path_factory) -> Path:
    """tiny-a's artifact with a 32-token context: a panorama (7 tiles of 4 tokens, plus markers) does not fit."""
    out = Path(shutil.copytree(artifacts["tiny-a"], tmp_path_factory.mktemp("short") / "artifact"))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["model"]["max_position_embeddings"] = 32
    write_manifest(out, {k: v for k, v in manifest.items() if k != "files"})
    return out


def test_bad_images_are_one_line_and_exit_2(artifacts, text_only, short_context, tmp_path):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((IMAGES / "grid_2x3.png").read_bytes()[:2000])
    tiny, panorama = IMAGES / "tiny.png", IMAGES / "panorama.jpg"
    cases = [
        ((artifacts["tiny-a"], "--prompt", "<|image|>hi", "--image", truncated), "truncated.png: not a readable image"),
        ((artifacts["tiny-a"], "--prompt", "<|image|>hi", "--image", tmp_path / "none.png"), "none.png: image file not found"),
        ((text_only, "--prompt", "<|image|>hi", "--image", tiny), "images need a vision graph run by the onnxruntime backend"),
        ((artifacts["tiny-a"], "--prompt", "<|image|>hi", "--image", tiny, "--image", tiny),
         "the prompt has 1 <|image|> placeholder(s) but 2 image(s)"),
        ((artifacts["tiny-a"], "--prompt", "no placeholder", "--image", tiny), "the prompt has 0 <|image|> placeholder(s)"),
        ((artifacts["tiny-a"], "--ids", "1,2", "--image", tiny), "--image goes with --prompt"),
        ((short_context, "--prompt", "<|image|>hi", "--image", panorama), "tiles × 4 tokens) but the model's context is 32"),
        ((artifacts["tiny-a"], "--prompt", "<|patch|>hi <|image|>", "--image", tiny), "the prompt text holds <|patch|>"),
        # the URL as typed: a Path option showed it as 'https:/example.com/a.png'
        ((artifacts["tiny-a"], "--prompt", "<|image|>hi", "--image", "https://example.com/a.png"),
         "'https://example.com/a.png' is a URL"),
        ((artifacts["tiny-a"], "--prompt", "<|image|>hi", "--image", ""), "images[0]: an empty path"),
    ]
    for args, message in cases:
        code, output = run(*args)
        assert code == 2 and message in output and len(output.strip().splitlines()) == 1, (args, output)


def test_a_bad_image_stops_a_batch_before_it_runs(generators, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg: not a readable image"):
        generators["tiny-a"].generate_batch(["<|image|>a", "<|image|>b"], images=[[IMAGES / "tiny.png"], [broken]])
    with pytest.raises(ImageError, match="images need a text prompt"):
        generators["tiny-a"].generate([1, 2, 3], images=[IMAGES / "tiny.png"])
    # a chat's image part is named where it is, not as images[k] of an images= the caller never gave
    messages = [{"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "image", "image": 5}]}]
    with pytest.raises(ImageError, match=r"^messages\[0\]\.content\[1\]: int is not an image"):
        generators["tiny-a"].chat(messages)


def test_compare_says_the_vision_encoder_is_not_compared(artifacts):
    """compare runs the text graphs against PyTorch; on a multimodal artifact it said nothing of vision.onnx, which
    read as if the vision tower had been checked too."""
    name = CHECKPOINTS[0]
    shown = CliRunner().invoke(export_app, ["compare", str(artifacts[name]), "--checkpoint", str(VISION_FIXTURES / name)],
                               terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert f"note: {VISION_FILE}: the vision encoder is not compared (compare runs the text graphs)" in shown.output
    assert "prefill: onnxruntime vs pytorch: max deviation" in shown.output  # the text graphs still are
