"""The C++ runtime (cpp/: llama4rt + llama4-cpp) against the Python runtime (`llama4-run`), token for token.

`make cpp` builds it (the test target does too); llama4-run runs in-process through its Typer app. The artifacts:
scout-tiny fp32 with a 16-token prefill limit (prompts go in pieces), int4, fp8 with an fp8 KV cache (the positions KV
layout; the others are in_place), and the trained l4-scoutlike (conftest's export). Prompts cross a chunk boundary
(scout-tiny's chunk is 16, l4-scoutlike's 64) and generations run past a small global window. Text in and out goes
through the artifacts' tokenizer graphs (onnxruntime-extensions) in C++ and through `tokenizers` in Python: the
random-weight scout-tiny generates arbitrary bytes, so its text also checks the replacement of invalid UTF-8.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from onnxruntime_extensions import get_library_path
from PIL import Image
from safetensors.numpy import load_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from llama4_export import api
from llama4_export.artifact import FORMAT_VERSION
from llama4_export.cli.run import run_app
from llama4_export.export.tokenizer_files import TOKENIZER_GRAPHS, write_byte_level_tokenizer, write_tokenizer_graphs
from llama4_export.model.config import get_preset
from llama4_export.model.loader import check_checkpoint
from llama4_export.runtime.images import ImageProcessor, load_image, to_rgb
from llama4_export.pipeline import QuantOptions

from .conftest import VISION_FIXTURES

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "cpp" / "build"
SANITIZER_BUILD = REPO / "cpp" / "build-sanitize"
PRESET = "scout-tiny"


def make_cpp() -> Path:
    """`make cpp` (a no-op when up to date); skip only where no compiler can be had."""
    if shutil.which("make") is None or (shutil.which("cmake") is None and shutil.which("apt-get") is None):
        pytest.skip("no make/cmake and no apt-get to install them: the C++ runtime cannot be built here")
    done = subprocess.run(["make", "cpp", f"CPP_BUILD={BUILD}"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"make cpp failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return BUILD / "llama4-cpp"


@pytest.fixture(scope="module")
def llama4_cpp() -> Path:
    return make_cpp()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Exports of scout-tiny's first 4 layers (3 chunked, 1 global): sharing one trace (the in_place KV layout), fp32
    (prefill limit 16) and int4 (RTN); and, for the positions layout, fp8 with an fp8 KV cache."""
    base = tmp_path_factory.mktemp("cpp")
    calib = base / "calib"
    exports = {
        "fp32": dict(max_prefill=16, quant=QuantOptions(report=False)),
        "int4": dict(precision="int4", quant=QuantOptions(int4_algo="rtn", report=False, calib_cache=calib)),
        "fp8-kv": dict(precision="fp8", quant=QuantOptions(report=False, kv_cache_dtype="fp8", calib_cache=calib)),
    }
    for name, options in exports.items():
        api.export_model(base / name, model=PRESET, layers=4, random_weights=True, show_progress=False, **options)
    return {name: base / name for name in exports}


def run_cpp(binary: Path, artifact: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), str(artifact), *map(str, args)], capture_output=True, text=True, timeout=300)


def cpp_json(binary: Path, artifact: Path, *args: str) -> dict:
    done = run_cpp(binary, artifact, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def python_json(artifact: Path, *args: str) -> dict:
    result = CliRunner().invoke(run_app, [str(artifact), *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ids(n: int, vocab: int, seed: int) -> str:
    return ",".join(map(str, np.random.default_rng(seed).integers(0, vocab, n).tolist()))


# (artifact, prompt length, generation options): prompts across chunk boundaries, generations past the window.
# scout-tiny's chunk is 16: in place, int4's one 512-token prefill piece runs in steps cut at every 16th token.
TINY_CASES = {
    # 33 tokens: prefill pieces 16 + 16 + 1; W = 24 < 33 + 40
    "fp32-pieces": ("fp32", 33, ["-n", 40, "--window", 24, "--sinks", 3]),
    "fp32-sampled": ("fp32", 40, ["-n", 48, "--window", 20, "--sinks", 2, "--temperature", 0.9, "--top-k", 50,
                                  "--top-p", 0.9, "--seed", 7, "--repetition-penalty", 1.2]),
    "int4": ("int4", 40, ["-n", 40, "--window", 24, "--sinks", 2]),
    # a ring of 9 slots: a 16-token prefill step keeps only its last 9 ring tokens
    "int4-short-ring": ("int4", 45, ["-n", 30, "--window", 10, "--sinks", 1]),
    "int4-sampled": ("int4", 20, ["-n", 40, "--window", 30, "--temperature", 1.1, "--seed", 3]),
    # seeds as Python takes them, modulo 2^64: llama4-cpp refused -1 and anything from 2^63
    "fp32-seed-2^64-1": ("fp32", 10, ["-n", 24, "--temperature", 1.0, "--seed", 2**64 - 1]),
    "fp32-seed-minus-2": ("fp32", 10, ["-n", 24, "--temperature", 1.0, "--seed", -2]),
    # scores / 1e-38 overflowed to inf and the probabilities were NaN (Python: a traceback); 1e308 is inf as a float
    "fp32-vanishing-temperature": ("fp32", 10, ["-n", 16, "--temperature", 1e-38, "--seed", 1]),
    "fp32-huge-temperature": ("fp32", 10, ["-n", 16, "--temperature", 1e308, "--seed", 1]),
    # a subnormal: llama4-cpp said "expected a number" (std::stod's underflow), llama4-run samples (greedily)
    "fp32-subnormal-temperature": ("fp32", 10, ["-n", 16, "--temperature", "1e-320", "--seed", 1]),
    "fp8-kv": ("fp8-kv", 35, ["-n", 40, "--window", 24, "--sinks", 4]),
    # no stop tokens: the bias makes end-of-text (257) the greedy pick, and both go on to -n
    "fp32-no-stop": ("fp32", 10, ["-n", 12, "--no-stop", "--logit-bias", "257=100"]),
    # pieces of 5 (7 of them) instead of the graph's 16
    "int4-small-pieces": ("int4", 33, ["-n", 20, "--window", 40, "--max-prefill-tokens", 5]),
}


def test_threads_sharing_a_model_take_turns_and_a_callback_cannot_reenter(llama4_cpp, tiny):
    """A host's threads calling generate on one Model each get their own run's tokens (without the lock they
    overwrote each other's cache: other tokens, silently), equal to llama4-run's; generate from inside its own token
    callback throws one line instead of deadlocking or corrupting the run. A host cancels a generation by throwing
    from its callback: it catches its own exception type (not a llama4rt::Error holding its message), and the Model's
    next generation is the one it would have been; likewise from the prefill's progress callback, mid-prompt."""
    prompts = [ids(n, 256, seed=n) for n in (5, 17, 33, 40)]
    done = subprocess.run([str(BUILD / "shared-model"), str(tiny["fp32"]), "24", *prompts], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *runs, reentered, cancelled, after_cancel, prefill_progress, after_prefill_cancel, bad_stops = \
        done.stdout.splitlines()
    for prompt, line in zip(prompts, runs, strict=True):
        alone, shared = line.split(" | ")
        expected = python_json(tiny["fp32"], "--ids", prompt, "-n", 24, "--no-stop")["token_ids"]  # as shared-model
        assert alone == shared == ",".join(map(str, expected)), (prompt, line)
    assert reentered == "re-entered: Model::generate was called from its own token callback; a Model runs one " \
                        "generation at a time"
    assert cancelled == "cancelled: caught the host's exception after 3 tokens"
    assert after_cancel == runs[0].split(" | ")[0]
    # the 40-token prompt in pieces of 8: progress after each piece; cancelled after the second, before any token
    assert prefill_progress == "prefill: 8/40 16/40 cancelled"
    assert after_prefill_cancel == "after it: the same ids"
    assert bad_stops == "bad stop tokens: stop_tokens=[-1, 1000000]: give a list of token ids in 0..511"  # Generator's


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_scout_tiny_tokens_match_llama4_run(llama4_cpp, tiny, case):
    name, length, options = TINY_CASES[case]
    args = ["--ids", ids(length, 256, seed=length), *options]
    expected = python_json(tiny[name], *args)
    got = cpp_json(llama4_cpp, tiny[name], *args)
    assert got["token_ids"] == expected["token_ids"]
    assert (got["prompt_ids"], got["stop_reason"], got["text"]) == (
        expected["prompt_ids"], expected["stop_reason"], expected["text"])


# (artifact, options): OpenAI's penalties over the generated tokens and a logit bias, sampled and greedy
PENALTY_CASES = {
    "fp32-sampled": ("fp32", ["--temperature", 0.9, "--seed", 5, "--repetition-penalty", 1.1, "--frequency-penalty",
                              0.7, "--presence-penalty", 0.4, "--logit-bias", "17=4", "--logit-bias", "3=-100"]),
    "int4-greedy": ("int4", ["--frequency-penalty", 1.5, "--presence-penalty", -0.5, "--logit-bias", "200=2.5"]),
}


@pytest.mark.parametrize("case", sorted(PENALTY_CASES))
def test_frequency_presence_penalties_and_logit_bias_choose_as_llama4_run(llama4_cpp, tiny, case):
    name, options = PENALTY_CASES[case]
    args = ["--ids", ids(30, 256, seed=30), "-n", 40]
    expected = python_json(tiny[name], *args, *options)
    assert expected["token_ids"] != python_json(tiny[name], *args, *options[:options.index("--frequency-penalty")])[
        "token_ids"]  # the penalties and the bias change what this model generates
    assert cpp_json(llama4_cpp, tiny[name], *args, *options)["token_ids"] == expected["token_ids"]


def test_an_eos_id_outside_the_vocabulary_runs_as_llama4_run(llama4_cpp, tiny, tmp_path):
    """A config eos id outside the vocabulary (never sampled, so it never stops anything): llama4rt refused every
    generation with "stop_tokens=[257, 600]: give a list of token ids", ids the caller never gave; llama4-run runs."""
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m["model"].update(eos_token_id=[257, 600]))
    args = ["--ids", "1,2,3", "-n", 12]
    assert cpp_json(llama4_cpp, art, *args) == python_json(art, *args)


def test_a_prompt_file_or_stdin_gives_llama4_run_prompt_file_tokens(llama4_cpp, tiny, tmp_path):
    """--prompt-file / -f: UTF-8 text less one final newline, as llama4-run reads it (here with multi-byte text and a
    newline inside)."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Café — the history of\nrivers\n", encoding="utf-8")
    expected = python_json(tiny["fp32"], "--prompt-file", prompt, "-n", 12)
    assert cpp_json(llama4_cpp, tiny["fp32"], "--prompt-file", prompt, "-n", 12) == expected
    done = subprocess.run([str(llama4_cpp), str(tiny["fp32"]), "-f", "-", "-n", "12", "--json"], capture_output=True,
                          text=True, timeout=300, input="Café — the history of\nrivers\r\n")
    assert done.returncode == 0 and json.loads(done.stdout) == expected, done.stderr


def test_stop_strings_end_where_llama4_run_ends(llama4_cpp, tiny):
    """--stop (GenerateOptions::stop_strings): the same tokens, text cut before the first stop string, and streamed
    text that never shows it, as llama4-run; the reference text is the unstopped run's."""
    base = ["--prompt", "The history of", "-n", 40]
    full = python_json(tiny["fp32"], *base)["text"]
    # three characters well inside the text, none of them a replaced byte (random weights write invalid UTF-8)
    stop = next(full[i:i + 3] for i in range(10, len(full)) if "\ufffd" not in full[i:i + 3])
    args = [*base, "--stop", "never there", "--stop", stop]
    expected = python_json(tiny["fp32"], *args)
    assert (expected["text"], expected["stop_reason"]) == (full[:full.index(stop)], "stop")
    assert cpp_json(llama4_cpp, tiny["fp32"], *args) == expected
    streamed = run_cpp(llama4_cpp, tiny["fp32"], *args, "--stream")
    assert streamed.returncode == 0 and streamed.stdout == expected["text"] + "\n", streamed.stderr


@pytest.fixture(scope="module")
def vision_artifact(tmp_path_factory) -> Path:
    """The tiny multimodal checkpoint exported (fp32: llama4rt runs images through float32 graphs)."""
    art = tmp_path_factory.mktemp("cpp-vision") / "vision"
    api.export_model(art, checkpoint=VISION_FIXTURES / "tiny-a", show_progress=False, quant=QuantOptions(report=False))
    return art


def ppm(image: Path, directory: Path) -> Path:
    """The image as the Python runtime decodes it (upright, transparency on white), as binary PPM for llama4-cpp."""
    pixels = np.asarray(to_rgb(load_image(image)), np.uint8)
    path = directory / f"{image.name}.ppm"
    path.write_bytes(b"P6\n%d %d\n255\n" % (pixels.shape[1], pixels.shape[0]) + pixels.tobytes())
    return path


@pytest.mark.parametrize("flags", [[], ["--stream"], ["--json"]])
def test_a_full_stdout_is_one_line_and_exit_2_as_llama4_run(llama4_cpp, tiny, flags):
    """Output to a full disk (/dev/full) was lost and the exit 0; llama4-run says so and exits 2 (its
    test_a_closed_pipe_ends_the_run_quietly_and_a_full_stdout_is_one_line), and now llama4-cpp does the same."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([str(llama4_cpp), str(tiny["fp32"]), "--ids", "1,2,3", "-n", "3", *flags], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: stdout: No space left on device; nothing more can be written there"], done.stderr


def test_multimodal_artifact_runs_its_text_path_as_llama4_run(llama4_cpp, vision_artifact):
    """A multimodal checkpoint's prefill takes image_features; without images llama4rt binds zero rows, so prompts,
    image placeholder ids without an image among them, give llama4-run's tokens."""
    art = vision_artifact
    assert "image_features" in {i.name for i in ort.InferenceSession(str(art / "prefill.onnx")).get_inputs()}
    image_token = json.loads((art / "manifest.json").read_text())["vision"]["config"]["image_token_id"]
    for args in (["--prompt", TEXTS[0], "-n", 12],
                 ["--ids", f"1,{image_token},{image_token},40,41", "-n", 12, "--temperature", 0.9, "--seed", 4]):
        assert cpp_json(llama4_cpp, art, *args) == python_json(art, *args)


@pytest.mark.parametrize("key", ["scout", "a", "b"])
def test_image_tiles_match_transformers_and_the_python_runtime(llama4_cpp, vision_artifact, tmp_path, key):
    """llama4rt's tiling of every fixture image under both checkpoints' processors and Scout's (336-px tiles, at most
    16): the grid and the pixels of transformers' Llama4ImageProcessor (fixtures; its acceptance bound) and, bit for
    bit, the Python runtime's — also on 24 random sizes from 1 × 1 px to 4,000 px wide."""
    processor = ImageProcessor.from_directory(VISION_FIXTURES / f"tiny-{'b' if key == 'b' else 'a'}",
                                              check_checkpoint(VISION_FIXTURES / "tiny-a").vision).config
    if key == "scout":
        processor = dataclasses.replace(processor, size=336, max_patches=16, tokens_per_tile=144)
    art = tmp_path / "art"
    shutil.copytree(vision_artifact, art)
    edit_manifest(art, lambda m: m["vision"].update(processor=processor.to_dict()))
    python = ImageProcessor(processor)
    reference = json.loads((VISION_FIXTURES / "reference.json").read_text())
    pixels = load_file(VISION_FIXTURES / "pixels.safetensors")

    def tiles(image: Path) -> tuple[list[int], np.ndarray]:
        done = subprocess.run([str(BUILD / "preprocess-tiles"), str(art), str(ppm(image, tmp_path)),
                               str(tmp_path / "tiles.f32")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rows, cols, _ = map(int, done.stdout.split())
        return [rows, cols], np.fromfile(tmp_path / "tiles.f32", np.float32)

    stride = reference["scout_stride"] if key == "scout" else 1
    for name, grid in reference["grids"][key].items():
        got_grid, got = tiles(VISION_FIXTURES / "images" / name)
        ours = python.preprocess(VISION_FIXTURES / "images" / name)
        assert got_grid == grid == list(ours.grid) and np.array_equal(got.reshape(ours.pixel_values.shape),
                                                                      ours.pixel_values), name
        if f"{key}/{name}" in pixels:
            codes, table = pixels[f"{key}/{name}"].astype(np.int64), pixels[f"{key}/table"]
            expected = table[np.arange(3)[:, None, None], codes]
            assert np.abs(got.reshape(ours.pixel_values.shape)[..., ::stride, ::stride] - expected).max() <= 2e-2, name
    rng = np.random.default_rng(7)
    for height, width in [(1, 1), (4000 // 40, 4000), *rng.integers(1, 1500, (22, 2)).tolist()]:
        image = tmp_path / f"random-{height}x{width}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image)
        got_grid, got = tiles(image)
        ours = python.preprocess(image)
        assert got_grid == list(ours.grid) and np.array_equal(got.reshape(ours.pixel_values.shape), ours.pixel_values), \
            (height, width)


def test_images_generate_as_llama4_run(llama4_cpp, vision_artifact, tmp_path):
    """Prompts with images: llama4-cpp (PPM in, the same pixels) gives llama4-run's prompt ids, tokens and text —
    one multi-tile image greedy, two images sampled. The checkpoint's chunk is 16 tokens, so each image's placeholder
    rows reach the graph across several prefill steps."""
    images = VISION_FIXTURES / "images"
    cases = [
        (["--prompt", "<|image|>What is in this picture?", "-n", 16], ["grid_2x3.png"]),
        (["--prompt", "Compare <|image|> with <|image|>.", "-n", 16, "--temperature", 0.9, "--seed", 3],
         ["tall.webp", "rgba.png"]),
    ]
    for args, names in cases:
        expected = python_json(vision_artifact, *args, *[a for n in names for a in ("--image", str(images / n))])
        got = cpp_json(llama4_cpp, vision_artifact, *args, *[a for n in names for a in ("--image", ppm(images / n, tmp_path))])
        assert got == expected and len(expected["prompt_ids"]) > 40, names


def test_image_errors_are_one_line(llama4_cpp, vision_artifact, tiny, tmp_path):
    picture = ppm(VISION_FIXTURES / "images" / "tiny.png", tmp_path)
    huge = tmp_path / "huge.ppm"  # a corrupt header's 10^10 pixels: refused before 30 GB are allocated (it aborted)
    huge.write_bytes(b"P6\n100000 100000\n255\n" + bytes(30))
    short = tmp_path / "short.ppm"
    short.write_bytes(b"P6\n4 4\n255\n" + bytes(47))
    deep = tmp_path / "deep.ppm"  # 16-bit samples: the advice must write 8-bit ones (convert keeps the depth)
    deep.write_bytes(b"P6\n1 1\n65535\n" + bytes(6))
    no_placeholder = copy_artifact(vision_artifact, tmp_path / "no-placeholder")
    edit_manifest(no_placeholder, lambda m: m["vision"]["processor"].update(placeholder=""))
    for artifact, args, message in [
        (vision_artifact, ["--prompt", "<|image|>", "--image", deep],
         f"convert {deep} -auto-orient -background white -alpha remove -alpha off -depth 8 image.ppm"),
        # a directory opened as an empty stream: "not a binary 8-bit PPM"
        (vision_artifact, ["--prompt", "<|image|>", "--image", tmp_path], f"{tmp_path}: cannot read it (Is a directory)"),
        # an empty placeholder was found at every offset: the prompt's expansion never ended
        (no_placeholder, ["--prompt", "<|image|>", "--image", picture], "an empty placeholder or a zero image_std"),
        (vision_artifact, ["--prompt", "<|patch|>hi <|image|>", "--image", picture],
         "the prompt text holds <|patch|> itself"),  # was "expand it with Model::encode(text, images)"
        (vision_artifact, ["--prompt", "<|image|>", "--image", huge], "truncated (fewer pixels than its header's "
                                                                      "100000 x 100000)"),
        (vision_artifact, ["--prompt", "<|image|>", "--image", short], "truncated (fewer pixels than its header's 4 x 4)"),
        (vision_artifact, ["--prompt", "no placeholder", "--image", picture], "0 <|image|> placeholder(s) but 1 image"),
        (vision_artifact, ["--ids", "1,2", "--image", picture], "--image needs --prompt"),
        (vision_artifact, ["--prompt", "<|image|>", "--image", tmp_path / "missing.ppm"], "cannot be read"),
        (tiny["fp32"], ["--prompt", "<|image|>", "--image", picture],
         "no vision graph (a text-only checkpoint, or exported --text-only)"),
    ]:
        done = run_cpp(llama4_cpp, artifact, *args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr


def test_a_tensorrt_artifact_is_refused_with_what_to_do(llama4_cpp, tmp_path):
    art = tmp_path / "trt"
    api.export_model(art, model=PRESET, layers=2, random_weights=True, precision="fp16", target="tensorrt",
                     show_progress=False, quant=QuantOptions(report=False))
    done = run_cpp(llama4_cpp, art, "--ids", "1,2,3")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "TensorRT plugin nodes" in done.stderr and "--target onnxruntime" in done.stderr


SCOUTLIKE_CASES = {
    # 100 held-out tokens cross the 64-token chunk; W = 96 is outgrown by the prompt, the ring wraps while decoding
    "greedy-window": ["-n", 48, "--window", 96, "--sinks", 4],
    "default-window": ["-n", 24],
    "sampled": ["-n", 40, "--window", 80, "--temperature", 0.8, "--top-p", 0.95, "--seed", 1],
}


@pytest.mark.parametrize("case", sorted(SCOUTLIKE_CASES))
def test_trained_checkpoint_tokens_match_llama4_run(llama4_cpp, scoutlike_artifact, heldout_text, case):
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(scoutlike_artifact / "tokenizer.json")).encode(heldout_text[:2000]).ids[:100]
    args = ["--ids", ",".join(map(str, prompt)), *SCOUTLIKE_CASES[case]]
    expected = python_json(scoutlike_artifact, *args)
    got = cpp_json(llama4_cpp, scoutlike_artifact, *args)
    assert got["token_ids"] == expected["token_ids"]
    assert (got["prompt_ids"], got["stop_reason"], got["text"]) == (
        expected["prompt_ids"], expected["stop_reason"], expected["text"])


def test_max_new_tokens_may_mean_until_the_stop_token(llama4_cpp, scoutlike_artifact):
    """-n 10^11: both runtimes generate until the stop token (22 tokens here) — llama4rt reserved room for every
    allowed token up front and failed with "out of memory", the Python runtime allocated 800 GB of history."""
    args = ["--prompt", "hello", "-n", 10**11]
    expected = python_json(scoutlike_artifact, *args)
    assert expected["stop_reason"] == "stop" and len(expected["token_ids"]) < 100
    assert cpp_json(llama4_cpp, scoutlike_artifact, *args) == expected


# ASCII with punctuation and a contraction, runs of spaces/tabs/newlines, digit groups, accents + CJK + emoji with a
# skin-tone modifier and a flag, and a special token inside text.
TEXTS = ["The history of Rome, isn't it?", "  a\t\tb \n\n\n   c  ", "pi 3.14159 and 1234567 or 2026-12-04",
         "café naïve 日本語 😀👍🏽 🇫🇷", "<|begin_of_text|>hello<|end_of_text|> there"]


def test_text_prompts_tokenize_as_tokenizers(llama4_cpp, scoutlike_artifact):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(scoutlike_artifact / "tokenizer.json"))
    for text in TEXTS:
        got = cpp_json(llama4_cpp, scoutlike_artifact, "--prompt", text, "-n", 0)
        assert got["prompt_ids"] == reference.encode(text).ids, text
        assert got["text"] == ""


def test_text_in_and_out_match_llama4_run(llama4_cpp, scoutlike_artifact):
    args = ["--prompt", " ".join(TEXTS), "-n", 24, "--temperature", 0.8, "--seed", 2]
    assert cpp_json(llama4_cpp, scoutlike_artifact, *args) == python_json(scoutlike_artifact, *args)


def test_streamed_text_matches_llama4_run(llama4_cpp, scoutlike_artifact, vision_artifact):
    """--stream prints the same text pieces: words of the trained checkpoint, and a random model's tokens, whose
    bytes often end inside a UTF-8 character (held back until it completes, as StreamDecoder does) — after 47 tokens
    the text ends inside one, which both print at the end as the U+FFFD the full text has."""
    random_model = ["--prompt", "Hello", "--temperature", 1.0, "--seed", 5]
    for artifact, args in [(scoutlike_artifact, ["--prompt", TEXTS[0], "-n", 40]),
                           (vision_artifact, [*random_model, "-n", 48]), (vision_artifact, [*random_model, "-n", 47])]:
        done = run_cpp(llama4_cpp, artifact, *args, "--stream")
        assert done.returncode == 0, done.stderr
        expected = CliRunner().invoke(run_app, [str(artifact), *map(str, args), "--stream"])
        assert expected.exit_code == 0 and done.stdout == expected.stdout, (done.stdout, expected.stdout)
        assert done.stdout == python_json(artifact, *args)["text"] + "\n"
    assert done.stdout.endswith("\ufffd\n")  # the random model's case did hold back and replace bytes


def test_resident_memory_is_flat_over_a_long_generation(llama4_cpp, tiny):
    """2,000 decode steps with W = 64: the cache is full long before step 200, so nothing may grow after it.
    llama4-cpp reads its own VmRSS (/proc/self/status) right after the listed steps: only it knows when a step ends."""
    done = run_cpp(llama4_cpp, tiny["fp32"], "--ids", ids(10, 256, 0), "-n", 2000, "--no-stop", "--window", 64,
                   "--temperature", 1.0, "--seed", 0, "--rss-steps", "200,2000")
    assert done.returncode == 0, done.stderr
    rss = {int(step): int(kb) for step, kb in re.findall(r"^rss step=(\d+) kb=(\d+)$", done.stderr, re.MULTILINE)}
    assert set(rss) == {200, 2000}, done.stderr
    assert abs(rss[2000] - rss[200]) <= 0.05 * rss[200], rss


def test_sanitizer_build_runs_clean(llama4_cpp, tiny, vision_artifact, tmp_path):
    """ASan + UBSan build of the library and example (any report aborts it), on a sampled run past the window, a
    prompt with two images and an error path; the tokens equal the normal build's. Its onnxruntime-extensions library
    is a copy the test then removes, as a moved build or a cleared cache would: ids still run (every open failed)."""
    root = subprocess.run(["cmake", "-N", "-L", str(BUILD)], capture_output=True, text=True).stdout
    onnxruntime_root = next(line.split("=", 1)[1] for line in root.splitlines() if line.startswith("ONNXRUNTIME_ROOT:"))
    extensions = tmp_path / "moved" / "libortextensions.so"
    extensions.parent.mkdir()
    shutil.copy(Path(onnxruntime_root) / "lib" / "libortextensions.so", extensions)
    for step in (["cmake", "-S", REPO / "cpp", "-B", SANITIZER_BUILD, "-DLLAMA4RT_SANITIZE=ON",
                  "-DCMAKE_BUILD_TYPE=Debug", f"-DONNXRUNTIME_ROOT={onnxruntime_root}", f"-DORTX_LIBRARY={extensions}"],
                 # only what runs below: llama4-cpp and the llama4rt it links (preprocess-tiles and shared-model
                 # would add compile and sanitized link time for nothing)
                 ["cmake", "--build", SANITIZER_BUILD, "-j2", "--target", "llama4-cpp"]):
        done = subprocess.run(list(map(str, step)), capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    args = ["--ids", ids(40, 256, 1), "-n", 40, "--window", 20, "--sinks", 2, "--temperature", 0.9, "--top-k", 40,
            "--seed", 5]
    for layout in ("fp32", "fp8-kv"):  # in_place, positions
        sanitized = run_cpp(SANITIZER_BUILD / "llama4-cpp", tiny[layout], *args, "--json")
        assert sanitized.returncode == 0 and "Sanitizer" not in sanitized.stderr, sanitized.stderr
        assert json.loads(sanitized.stdout) == cpp_json(llama4_cpp, tiny[layout], *args)
    images = [a for name in ("grid_2x3.png", "tiny.png") for a in ("--image", ppm(VISION_FIXTURES / "images" / name, tmp_path))]
    args = ["--prompt", "<|image|> and <|image|>", "-n", 8, *images, "--json"]
    sanitized = run_cpp(SANITIZER_BUILD / "llama4-cpp", vision_artifact, *args)
    assert sanitized.returncode == 0 and "Sanitizer" not in sanitized.stderr, sanitized.stderr
    assert json.loads(sanitized.stdout) == json.loads(run_cpp(llama4_cpp, vision_artifact, *args).stdout)
    refused = run_cpp(SANITIZER_BUILD / "llama4-cpp", tiny["fp32"], "--ids", "1,99999")
    assert refused.returncode == 2 and "Sanitizer" not in refused.stderr, refused.stderr

    extensions.unlink()
    args = ["--ids", "1,2,3", "-n", 6, "--json"]
    ids_only = run_cpp(SANITIZER_BUILD / "llama4-cpp", tiny["fp32"], *args)
    assert ids_only.returncode == 0, ids_only.stderr
    assert json.loads(ids_only.stdout)["token_ids"] == json.loads(run_cpp(llama4_cpp, tiny["fp32"], *args).stdout)["token_ids"]
    text = run_cpp(SANITIZER_BUILD / "llama4-cpp", tiny["fp32"], "--prompt", "hello")
    assert text.returncode == 2 and text.stderr == (
        f"error: text prompts need the tokenizer: onnxruntime-extensions, which runs the tokenizer graphs, is no longer "
        f"at {extensions}, where this llama4rt was built to find it; run `make cpp` again or set "
        "OpenOptions::extensions_library; give token ids instead\n"), text.stderr


APP = """#include <iostream>
#include "llama4rt.hpp"

int main(int, char** argv) {
  llama4rt::Model model = llama4rt::Model::open(argv[1]);
  llama4rt::GenerateOptions options;
  options.max_new_tokens = 8;
  for (int64_t token : model.generate(std::vector<int64_t>{1, 2, 3}, options).token_ids) std::cout << token << ",";
  const llama4rt::Model& reader = model;  // text in and out need no mutable Model
  if (reader.decode(reader.encode("Hi")) != "Hi") return 2;
  llama4rt::Model moved = std::move(model);
  try {
    model.vocab_size();
  } catch (const llama4rt::Error& e) {
    std::cout << "\\n" << e.what() << "\\n";
  }
  llama4rt::Model vision = llama4rt::Model::open(argv[2]);
  // no images: the text alone, as Generator.generate(text, images=[]) (it threw "1 placeholder(s) but 0 image(s)")
  if (vision.encode("<|image|>hi", {}).ids != vision.encode("<|image|>hi")) return 3;
  try {  // sizes whose product wraps to the buffer's length (it passed the check, then failed allocating)
    vision.encode("<|image|>", {llama4rt::Image{6148914691236517206, 1, std::vector<uint8_t>(2)}});
  } catch (const llama4rt::Error& e) {
    std::cout << e.what() << "\\n";
  }
  return moved.vocab_size() > 0 ? 0 : 1;
}
"""


def test_an_app_finds_the_installed_library_with_find_package(llama4_cpp, tiny, vision_artifact, tmp_path):
    """`cmake --install` installed nothing: an app could only add_subdirectory the sources (and then built our command
    line and test programs too). Installed, an app finds llama4rt::llama4rt with find_package, builds warning-free
    (as C++14, raised to the C++17 the header needs: it failed in the header, "'optional' in namespace 'std'")
    and runs the artifact as llama4-run does; encode / decode work on a const Model; a moved-from Model throws Error
    instead of crashing; a prompt with no images is its text, an image whose sizes do not match its pixels is refused.
    add_subdirectory configures the library alone."""
    prefix, app = tmp_path / "prefix", tmp_path / "app"
    done = subprocess.run(["cmake", "--install", str(BUILD), "--prefix", str(prefix)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    app.mkdir()
    (app / "main.cpp").write_text(APP)
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(app LANGUAGES CXX)\nset(CMAKE_CXX_STANDARD 14)\n"
        "find_package(llama4rt 0.1 REQUIRED)\nadd_executable(app main.cpp)\n"
        "target_link_libraries(app PRIVATE llama4rt::llama4rt)\ntarget_compile_options(app PRIVATE -Wall -Wextra -Werror)\n")
    for step in (["cmake", "-S", app, "-B", app / "build", f"-DCMAKE_PREFIX_PATH={prefix}"],
                 ["cmake", "--build", app / "build"]):
        done = subprocess.run(list(map(str, step)), capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ran = subprocess.run([str(app / "build" / "app"), str(tiny["fp32"]), str(vision_artifact)], capture_output=True,
                         text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    tokens, message, wrong_size = ran.stdout.splitlines()
    assert tokens == "".join(f"{t}," for t in python_json(tiny["fp32"], "--ids", "1,2,3", "-n", 8)["token_ids"])
    assert message == "this Model was moved from; use the Model it was moved to"
    assert wrong_size == "an image of 6148914691236517206 x 1 px with 2 bytes; give width x height x 3 bytes of RGB"

    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "CMakeLists.txt").write_text(f"cmake_minimum_required(VERSION 3.16)\nproject(outer LANGUAGES CXX)\n"
                                          f"add_subdirectory({REPO / 'cpp'} llama4rt)\n")
    root = subprocess.run(["cmake", "-N", "-L", str(BUILD)], capture_output=True, text=True).stdout
    onnxruntime_root = next(line.split("=", 1)[1] for line in root.splitlines() if line.startswith("ONNXRUNTIME_ROOT:"))
    done = subprocess.run(["cmake", "-S", str(outer), "-B", str(outer / "build"), f"-DONNXRUNTIME_ROOT={onnxruntime_root}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    targets = subprocess.run(["cmake", "--build", str(outer / "build"), "--target", "help"], capture_output=True,
                             text=True).stdout
    assert "llama4rt" in targets and "llama4-cpp" not in targets and "shared-model" not in targets, targets


def test_tokenizer_graphs_for_a_tokenizer_saved_by_transformers(tmp_path, capfd):
    """transformers ≥ 5 saves a tokenizer.json-backed tokenizer as class TokenizersBackend; the export still writes the
    graphs (llama4rt needs them for text prompts), and they encode as transformers does."""
    (tmp_path / "ours").mkdir()
    write_byte_level_tokenizer(get_preset(PRESET), tmp_path / "ours")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ours")
    tokenizer.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    capfd.readouterr()
    assert write_tokenizer_graphs(tmp_path / "saved")["graphs"] is not None
    assert "Unknown tokenizer" not in capfd.readouterr().err  # ONNX Runtime's error log, once the graphs were refused
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    encode = ort.InferenceSession(str(tmp_path / "saved" / TOKENIZER_GRAPHS["encode"]), options)
    for text in TEXTS:
        ids = encode.run(None, {encode.get_inputs()[0].name: np.array([text])})[0].reshape(-1).tolist()
        assert ids == tokenizer(text)["input_ids"]


def test_no_tokenizer_graphs_where_they_would_tokenize_differently(tmp_path):
    """The extensions ignore tokenizer.json's normalizer: with a Lowercase one, the export writes no graphs and says why
    (llama4rt then refuses text prompts: prompt_without_tokenizer_graphs below)."""
    write_byte_level_tokenizer(get_preset(PRESET), tmp_path)
    assert write_tokenizer_graphs(tmp_path)["graphs"] is not None
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, "normalizer": {"type": "Lowercase"}}))
    for graph in TOKENIZER_GRAPHS.values():
        (tmp_path / graph).unlink()
    entry = write_tokenizer_graphs(tmp_path)
    assert entry["graphs"] is None and "tokenizes" in entry["graphs_skipped"], entry
    assert not any((tmp_path / graph).exists() for graph in TOKENIZER_GRAPHS.values())


def test_artifact_files_are_verified_as_generator_load_does_sharing_its_record(llama4_cpp, tiny, tmp_path,
                                                                               monkeypatch):
    """llama4rt ran an artifact whose model.data had a byte flipped; now it checks every listed file's sha256 and
    refuses a damaged one in Generator.load's line. Both runtimes share the record of files verified unchanged
    (path + stat in $XDG_CACHE_HOME/llama4-export/verified.json): what one verified, the other does not hash again."""
    import time

    from llama4_export import artifact

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    time.sleep(artifact._VerifiedFiles.RACY_S)  # files changed just now are not recorded (racy)
    assert run_cpp(llama4_cpp, art, "--ids", "1,2,3", "-n", "2").returncode == 0
    hashed = []
    monkeypatch.setattr(artifact, "sha256_file", lambda path: hashed.append(path.name) or "")
    manifest = artifact.read_manifest(art)  # every file as llama4rt recorded it: none hashed
    assert hashed == [] and len(manifest["files"]) > 5

    data = art / "model.data"
    stat = data.stat()
    with open(data, "r+b") as f:  # one byte flipped in place: same size, the mtime set back below
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(stat.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    done = run_cpp(llama4_cpp, art, "--ids", "1,2,3", "-n", "2")
    python = CliRunner().invoke(run_app, [str(art), "--ids", "1,2,3", "-n", "2"])
    assert done.returncode == 2 and python.exit_code == 2
    line = f"{data}: sha256 does not match manifest.json; the file was modified or damaged, re-run the export"
    assert done.stderr == f"error: {line}\n" and line in " ".join(python.output.split())

    # a record the Python runtime writes is read by llama4rt: stat-keyed, so it vouches for the changed file too
    record = artifact._VerifiedFiles.load()
    record.entries[str(data.resolve())] = record._key(data.stat(), manifest["files"]["model.data"])
    record.changed = True
    record.save()
    assert run_cpp(llama4_cpp, art, "--ids", "1,2,3", "-n", "2").returncode == 0


@pytest.mark.parametrize(("length", "window", "sinks"), [(17, 16, 2), (20, 16, 0), (2210, 1100, 5), (16, 16, 2)])
def test_a_prompt_longer_than_the_window_is_noted_as_llama4_run_notes_it(llama4_cpp, tiny, length, window, sinks):
    """A prompt longer than --window slid silently in llama4-cpp; now llama4-run's note on stderr, word for word
    (thousands grouped as it groups them), with the same tokens on stdout; a prompt of exactly W gets none."""
    args = ["--ids", ids(length, 256, seed=length), "-n", 4, "--window", window, "--sinks", sinks]
    python = CliRunner().invoke(run_app, [str(tiny["fp32"]), *map(str, args), "--json"])
    done = run_cpp(llama4_cpp, tiny["fp32"], *args, "--json")
    assert python.exit_code == 0 and done.returncode == 0, python.output + done.stderr
    assert json.loads(done.stdout)["token_ids"] == json.loads(python.stdout)["token_ids"]
    assert done.stderr == python.stderr, done.stderr
    assert (python.stderr.startswith(f"note: the prompt is {length:,} tokens, more than the KV window of {window:,} ")
            and python.stderr.count("\n") == 1) if length > window else python.stderr == "", python.stderr


def test_a_prompt_slid_by_its_images_is_noted_as_llama4_run_notes_it(llama4_cpp, vision_artifact, tmp_path):
    """The note counts the prompt with its images expanded (the text alone is within the window), as llama4-run."""
    image = VISION_FIXTURES / "images" / "grid_2x3.png"
    args = ["--prompt", "<|image|>What is in this picture?", "-n", 4, "--window", 32, "--sinks", 4]
    python = CliRunner().invoke(run_app, [str(vision_artifact), *map(str, args), "--image", str(image), "--json"])
    length = len(json.loads(python.stdout)["prompt_ids"])
    note = f"note: the prompt is {length:,} tokens, more than the KV window of 32 (--window): the reply attends to " \
           f"its first 4 (--sinks) and last 28 tokens; the {length - 32:,} token(s) between were dropped from attention\n"
    assert length > 40 and python.stderr == note, python.stderr
    done = run_cpp(llama4_cpp, vision_artifact, *args, "--image", ppm(image, tmp_path), "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == json.loads(python.stdout) and done.stderr == note, \
        done.stderr


# --- bad input: one line on stderr, exit status 2 -------------------------------------------------------------------

def copy_artifact(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_manifest(artifact: Path, edit) -> None:
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def missing_dir(tmp_path, tiny):
    return tmp_path / "nope", ["--ids", "1"], "artifact directory not found"


def file_for_dir(tmp_path, tiny):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    return tmp_path / "model.onnx", ["--ids", "1"], "a file, not an artifact directory"


def broken_manifest(tmp_path, tiny):
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    (art / "manifest.json").write_text("{ not json")
    return art, ["--ids", "1"], "not valid JSON"


def other_format_version(tmp_path, tiny):
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m.update(format_version=1))
    return art, ["--ids", "1"], f"artifact format version 1, but this llama4rt reads version {FORMAT_VERSION}"


def missing_graph(tmp_path, tiny):
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    (art / "decode.onnx").unlink()
    return art, ["--ids", "1"], "decode.onnx: listed in manifest.json but missing"


def graph_not_matching_manifest(tmp_path, tiny):
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m["model"].update(num_hidden_layers=3))  # the graphs take 4 layers' cache
    return art, ["--ids", "1"], "input 'past_key.3' is not part of the graph contract"


def layout_not_matching_manifest(tmp_path, tiny):
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m.update(kv_layout="positions"))
    return art, ["--ids", "1"], "of the in_place layout but"


def kv_heads_not_matching_manifest(tmp_path, tiny):
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m["model"].update(num_key_value_heads=4))
    return art, ["--ids", "1"], "as the config says"


def id_outside_vocabulary(tmp_path, tiny):
    return tiny["fp32"], ["--ids", "1,2,512"], "prompt token 2 is id 512, outside the vocabulary 0..511"


def window_without_ring(tmp_path, tiny):
    return tiny["fp32"], ["--ids", "1", "--window", "4", "--sinks", "4"], "needs at least sinks + 1 = 5 slots"


def bad_ids(tmp_path, tiny):
    return tiny["fp32"], ["--ids", "1,x"], "expected comma-separated integers"


def prompt_without_tokenizer_graphs(tmp_path, tiny):
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m["tokenizer"].update(graphs=None, graphs_skipped="a reason"))
    return art, ["--prompt", "hello"], "text prompts need the tokenizer: the export wrote no tokenizer graphs: a reason"


def prompt_and_ids(tmp_path, tiny):
    return tiny["fp32"], ["--prompt", "hello", "--ids", "1"], "give exactly one of --prompt TEXT, --prompt-file FILE or --ids 1,2,3"


def negative_threads(tmp_path, tiny):
    return tiny["fp32"], ["--ids", "1", "--threads", "-1"], "threads=-1: must be in 1..1024"


def too_many_threads(tmp_path, tiny):  # narrowed to int unchecked: 2^32 + 1 ran with 1 thread, more was std::bad_alloc
    return tiny["fp32"], ["--ids", "1", "--threads", "4294967297"], "threads=4294967297: must be in 1..1024"


def infinite_temperature(tmp_path, tiny):  # ran, sampling noise; llama4-run refuses it
    return tiny["fp32"], ["--ids", "1", "--temperature", "inf"], "temperature=inf: must be a finite number"


def chunk_size_zero(tmp_path, tiny):  # a division by zero in the cache: SIGFPE killed the host process
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m["model"].update(attention_chunk_size=0))
    return art, ["--ids", "1"], "attention_chunk_size=0: must be >= 1"


def negative_prefill_limit(tmp_path, tiny):  # ONNX Runtime's error named no field; llama4-run ran it
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m["graphs"]["prefill"].update(max_new_tokens=-4))
    return art, ["--ids", "1,2,3"], "manifest.json: graphs.prefill.max_new_tokens=-4: must be an integer >= 1"


def empty_prompt_file(tmp_path, tiny):  # "cannot read it (Success)"
    (tmp_path / "empty.txt").write_bytes(b"")
    return tiny["fp32"], ["-f", tmp_path / "empty.txt"], "the prompt is empty; give at least one token"


def penalty_out_of_range(tmp_path, tiny):
    return tiny["fp32"], ["--ids", "1", "--presence-penalty", "2.5"], "presence_penalty=2.5: must be in [-2, 2]"


def negative_temperature(tmp_path, tiny):  # the float as Python writes it (it read "-1." before)
    return tiny["fp32"], ["--ids", "1", "--temperature", "-1"], "temperature=-1.0: must be >= 0 (0 = greedy)"


def top_p_too_small(tmp_path, tiny):
    return tiny["fp32"], ["--ids", "1", "--top-p", "0"], "top_p=0.0: must be in (0, 1]"


def bias_outside_vocabulary(tmp_path, tiny):
    return tiny["fp32"], ["--ids", "1", "--logit-bias", "512=1"], "logit_bias: token 512 is outside the vocabulary of 512"


def bias_given_twice(tmp_path, tiny):
    return tiny["fp32"], ["--ids", "1", "--logit-bias", "5=1", "--logit-bias", "5=-1"], "token 5 is given more than once"


def bias_without_value(tmp_path, tiny):
    return tiny["fp32"], ["--ids", "1", "--logit-bias", "5"], "--logit-bias '5': expected ID=BIAS, e.g. 42=-100"


def bias_without_id(tmp_path, tiny):  # "--logit-bias : expected an integer", the pair unnamed
    return tiny["fp32"], ["--ids", "1", "--logit-bias", "=1"], "--logit-bias '=1': expected ID=BIAS, e.g. 42=-100"


def bias_not_a_number(tmp_path, tiny):  # "--logit-bias x: expected a number"
    return tiny["fp32"], ["--ids", "1", "--logit-bias", "5=x"], "--logit-bias '5=x': expected ID=BIAS, e.g. 42=-100"


def prompt_file_not_utf8(tmp_path, tiny):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    return tiny["fp32"], ["-f", tmp_path / "latin1.txt"], \
        f"-f {tmp_path / 'latin1.txt'}: the text is not UTF-8 (byte 3 starts no well-formed"


def prompt_file_missing(tmp_path, tiny):
    return tiny["fp32"], ["--prompt-file", tmp_path / "nope.txt"], f"{tmp_path / 'nope.txt'}: cannot read it (No such"


def stop_without_tokenizer_graphs(tmp_path, tiny):
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m["tokenizer"].update(graphs=None, graphs_skipped="a reason"))
    return art, ["--ids", "1", "--stop", "x"], "stop strings need the tokenizer: the export wrote no tokenizer graphs"


def empty_prompt(tmp_path, tiny):  # generated after a lone BOS; llama4-run refuses it
    return tiny["fp32"], ["--prompt", ""], "the prompt is empty; give at least one token"


def stop_string_not_utf8(tmp_path, tiny):  # a byte of U+FFFD cut the text inside one: --json aborted (SIGABRT)
    return tiny["fp32"], ["--ids", "1,2,3", "-n", "30", "--json", "--stop", "\udcbd"], \
        "stop_strings: a stop string is not UTF-8; give UTF-8 text"


def max_prefill_tokens_zero(tmp_path, tiny):
    return tiny["fp32"], ["--ids", "1", "--max-prefill-tokens", "0"], "max_prefill_tokens=0: must be >= 1"


def empty_stop_string(tmp_path, tiny):
    return tiny["fp32"], ["--prompt", "x", "--stop", ""], "a stop string is empty"


def window_past_2_62(tmp_path, tiny):  # an int64 sum of slots wrapped: heap corruption, SIGSEGV
    return tiny["fp32"], ["--ids", "1", "--window", str(2**62 + 1)], \
        f"window={2**62 + 1}: at most {2**62} (2^62) tokens"


def window_beyond_memory(tmp_path, tiny):  # its byte count wrapped to a small buffer written past its end
    return tiny["fp32"], ["--ids", "1", "--window", str(2**62)], "out of memory; lower --window"


def sinks_past_2_62(tmp_path, tiny):  # sinks + 1 wrapped: "needs at least sinks + 1 = -9223372036854775808 slots"
    return tiny["fp32"], ["--ids", "1", "--sinks", str(2**63 - 1)], f"sinks={2**63 - 1}: at most {2**62} (2^62)"


def prompt_file_is_a_directory(tmp_path, tiny):  # was "the prompt is empty"
    return tiny["fp32"], ["-f", tmp_path], f"-f {tmp_path}: cannot read it (Is a directory)"


def one_part_of_a_partitioned_artifact(tmp_path, tiny):  # was "has no input 'past_key.4' … re-run the export"
    art = copy_artifact(tiny["fp32"], tmp_path / "parts" / "part1")
    edit_manifest(art, lambda m: m.update(layers=[4, 8]))
    return art, ["--ids", "1"], f"one part (layers 4..7) of a partitioned artifact; run the artifact directory " \
        f"holding it ({tmp_path / 'parts'})"


def partition_outside_the_artifact(tmp_path, tiny):  # ran the graphs of the directory it named ("../other" too)
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m.update(partitions=[{"directory": "../art", "layers": [0, 8]}]))
    return art, ["--ids", "1"], 'manifest.json: partitions[0].directory="../art": not a part directory of this artifact'


def graph_outside_the_artifact(tmp_path, tiny):  # ran another directory's graph, unverified (a FIFO hung)
    other = copy_artifact(tiny["fp32"], tmp_path / "other")
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m["graphs"]["prefill"].update(file=str(other / "prefill.onnx")))
    return art, ["--ids", "1"], f'manifest.json: graphs.prefill.file="{other}/prefill.onnx": not a file the artifact lists'


def tokenizer_graph_outside_the_artifact(tmp_path, tiny):  # ran another directory's tokenizer graph, unverified
    copy_artifact(tiny["fp32"], tmp_path / "other")  # the graph it names exists there
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m["tokenizer"]["graphs"].update(encode="../other/tokenizer_encode.onnx"))
    return art, ["--prompt", "hi"], \
        'manifest.json: tokenizer.graphs.encode="../other/tokenizer_encode.onnx": not a file the artifact lists'


def file_listed_outside_the_artifact(tmp_path, tiny):  # hashed a file outside the artifact
    import hashlib

    other = copy_artifact(tiny["fp32"], tmp_path / "other")
    digest = hashlib.sha256((other / "prefill.onnx").read_bytes()).hexdigest()
    art = copy_artifact(tiny["fp32"], tmp_path / "art")
    edit_manifest(art, lambda m: m["files"].update({"../other/prefill.onnx": digest}))
    return art, ["--ids", "1"], 'manifest.json: files["../other/prefill.onnx"]: not a path inside the artifact'


def json_and_stream(tmp_path, tiny):  # --stream was ignored
    return tiny["fp32"], ["--ids", "1", "--json", "--stream"], "--json prints one object at the end: drop --stream"


@pytest.mark.parametrize("breaker", [missing_dir, file_for_dir, broken_manifest, other_format_version, missing_graph,
                                     graph_not_matching_manifest, layout_not_matching_manifest,
                                     kv_heads_not_matching_manifest,
                                     id_outside_vocabulary, window_without_ring, bad_ids,
                                     prompt_without_tokenizer_graphs, prompt_and_ids, negative_threads, too_many_threads,
                                     infinite_temperature, chunk_size_zero, negative_prefill_limit, empty_prompt_file,
                                     json_and_stream,
                                     penalty_out_of_range, negative_temperature, top_p_too_small,
                                     bias_outside_vocabulary, bias_given_twice,
                                     bias_without_value, bias_without_id, bias_not_a_number, prompt_file_not_utf8,
                                     prompt_file_missing,
                                     stop_without_tokenizer_graphs, empty_stop_string, stop_string_not_utf8,
                                     max_prefill_tokens_zero,
                                     empty_prompt, window_past_2_62, window_beyond_memory, sinks_past_2_62,
                                     prompt_file_is_a_directory, one_part_of_a_partitioned_artifact,
                                     partition_outside_the_artifact, graph_outside_the_artifact,
                                     tokenizer_graph_outside_the_artifact, file_listed_outside_the_artifact],
                         ids=lambda f: f.__name__)
def test_bad_input_is_one_line_and_exit_2(llama4_cpp, tiny, tmp_path, breaker):
    artifact, args, message = breaker(tmp_path, tiny)
    done = run_cpp(llama4_cpp, artifact, *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
