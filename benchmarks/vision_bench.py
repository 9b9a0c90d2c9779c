"""Image encode time per tile and time to first token with one 4-tile image: ours (ONNX Runtime) vs transformers eager
vs llama.cpp's multimodal path (llama-mtmd-cli), in one interleaved run.

    python benchmarks/vision_bench.py --vision-layers 8 --repeats 5 --threads 2 --workdir /tmp/visbench

The model: a seeded random `Llama4ForConditionalGeneration` written by transformers, with Scout's vision tower shapes
(336-px tiles, patch 14, hidden 1408, intermediate 5632, 16 heads, pixel shuffle 0.5, projector to the text hidden;
--vision-layers of Scout's 34 encoder layers) and the rand200m text model (../shared/bench/rand200m-config.json),
the image special tokens and tokenizer of the tiny-a test fixture and Scout's image processor (336-px tiles, up to
16). The image is 672 × 672 px: its best-fit grid is 2 × 2, so 5 tiles go through the encoder (4 + the global one).

Per repetition, in a rotating order:
  ours encode   ImageEncoder.encode on the preprocessed tiles (vision.onnx, ONNX Runtime CPU, --threads threads)
  hf encode     transformers `get_image_features` (vision model + projector) on the same pixel values
  ours TTFT     Generator.generate(prompt, images=[png], max_new_tokens=1): preprocessing + encode + prefill + token
  hf TTFT       transformers `generate(max_new_tokens=1)` with the same ids and pixel values (no preprocessing)
  llama.cpp     llama-mtmd-cli -n 1 on the GGUF text model + `--mmproj` projector file of the same checkpoint, F32
                (tokenizer staged: staged_for_llamacpp): encode = its logged slice encode times, TTFT = its wall time
                after both models are loaded (chat-templated prompt, encode, image embeddings through the text model,
                one token)
Reported: median, min and max per engine, each engine's per-tile encode, and the ratios of medians.
Everything is cached in --workdir (checkpoint, artifact, GGUF files); delete it when done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import llamacpp
from llama4_export.evaluation.bench import machine_info, memory_bandwidth_gb_s

from common import (  # benchmarks/, beside this script
    ArgumentParser, check_child, non_negative_int, positive_int, print_machine, run_script, summary)

REPO = Path(__file__).resolve().parents[1]
TEXT_CONFIG = REPO.parent / "shared" / "bench" / "rand200m-config.json"
TOKENIZER_FIXTURE = REPO / "tests" / "fixtures" / "vision" / "tiny-a"  # a tokenizer with Llama 4's image tokens
SCOUT_VISION = {"image_size": 336, "patch_size": 14, "num_channels": 3, "hidden_size": 1408, "intermediate_size": 5632,
                "num_hidden_layers": 34, "num_attention_heads": 16, "pixel_shuffle_ratio": 0.5,
                "projector_input_dim": 4096, "projector_output_dim": 4096, "vision_output_dim": 4096, "rope_theta": 10000,
                "hidden_act": "gelu", "norm_eps": 1e-5, "multi_modal_projector_bias": False, "model_type": "llama4_vision_model"}
SCOUT_PROCESSOR = {"image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor",
                   "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "max_patches": 16, "resample": 2,
                   "rescale_factor": 1 / 255, "resize_to_max_canvas": False, "size": {"height": 336, "width": 336}}
PROMPT = "<|image|>Describe this picture in one word."
IMAGE_SIDE = 672  # 2 × 2 tiles of 336 px: Scout's processor picks that grid without scaling


def log(message: str) -> None:
    print(f"[vision_bench] {message}", file=sys.stderr, flush=True)


def write_checkpoint(directory: Path, vision_layers: int, seed: int) -> None:
    """The seeded random multimodal checkpoint (fp32 safetensors) with tokenizer and processor files."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    fixture = json.loads((TOKENIZER_FIXTURE / "config.json").read_text())
    text = json.loads(TEXT_CONFIG.read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the fixture tokenizer's special ids
        text[key] = fixture["text_config"][key]
    config = Llama4Config(
        text_config=text, vision_config={**SCOUT_VISION, "num_hidden_layers": vision_layers},
        **{k: fixture[k] for k in ("image_token_index", "boi_token_index", "eoi_token_index")},
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config).eval()
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                 "generation_config.json"):
        shutil.copy(TOKENIZER_FIXTURE / name, tmp / name)
    (tmp / "preprocessor_config.json").write_text(json.dumps(SCOUT_PROCESSOR, indent=1) + "\n")
    tmp.rename(directory)


def export(checkpoint: Path, artifact: Path) -> None:
    command = [str(Path(sys.executable).parent / "llama4-export"), "--checkpoint", str(checkpoint), "--precision", "fp32",
               "--target", "onnxruntime", "--out", str(artifact), "--no-report"]
    log(" ".join(command))
    check_child(command, f"the export of {checkpoint}", stdout=subprocess.DEVNULL)


def write_image(path: Path, seed: int) -> None:
    """A smooth seeded picture (gradients + noise), IMAGE_SIDE px square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE] / IMAGE_SIDE
    rgb = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.normal(0, 20, (IMAGE_SIDE, IMAGE_SIDE, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path)


# ------------------------------------------------------------------------------------------------ llama.cpp
def staged_for_llamacpp(checkpoint: Path, staged: Path) -> Path:
    """The checkpoint's files (symlinked) with two tokenizer edits the converter and llama.cpp need: transformers 4.x
    cannot load the `TokenizersBackend` class transformers 5 names in tokenizer_config.json (PreTrainedTokenizerFast
    reads the same tokenizer.json), and llama.cpp refuses a BPE vocabulary without merges ("cannot find tokenizer
    merges"; the fixture's byte-level vocabulary has none), so one merge ("a b" -> "ab", a new id) is added. Neither
    touches the image path: the image features go into the text model as embeddings."""
    staged.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        (staged / path.name).unlink(missing_ok=True)
        if path.name not in ("tokenizer.json", "tokenizer_config.json"):
            (staged / path.name).symlink_to(path.resolve())
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (staged / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    if not tokenizer["model"].get("merges"):
        ids = [*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer["added_tokens"])]
        tokenizer["model"]["vocab"]["ab"] = max(ids) + 1
        tokenizer["model"]["merges"] = ["a b"]
    (staged / "tokenizer.json").write_text(json.dumps(tokenizer))
    return staged


def llamacpp_files(checkpoint: Path, cache: Path, work: Path) -> tuple[Path, Path, Path] | str:
    """(llama-mtmd-cli, text GGUF, mmproj GGUF) built and converted from the checkpoint, or why not (one line)."""
    source = llamacpp.source_dir(cache)
    bin_dir = llamacpp.build(cache, source)
    cli = bin_dir / "llama-mtmd-cli"
    if not cli.is_file():
        llamacpp.run(["cmake", "--build", str(bin_dir.parent), "--target", "llama-mtmd-cli", "-j2"], stdout=subprocess.DEVNULL)
    python = llamacpp.converter_python(cache)
    staged = staged_for_llamacpp(checkpoint, work / "hf-for-llamacpp")
    files = {"text": work / "text-F32.gguf", "mmproj": work / "mmproj-F32.gguf"}
    for kind, path in files.items():
        if path.is_file():
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
            script.write(llamacpp.CONVERT_WRAPPER)
        partial = path.with_suffix(".partial")
        command = [str(python), script.name, str(source), str(staged), "--outtype", "f32", "--outfile", str(partial),
                   *(["--mmproj"] if kind == "mmproj" else [])]
        log(" ".join(command))
        try:
            run = subprocess.run(command, capture_output=True, text=True)
        finally:
            os.unlink(script.name)
        if run.returncode != 0 or not partial.is_file():
            last = [line for line in (run.stderr or run.stdout).splitlines() if line.strip()]
            return f"convert_hf_to_gguf.py{' --mmproj' if kind == 'mmproj' else ''} failed: {last[-1] if last else run.returncode}"
        partial.rename(path)
    return cli, files["text"], files["mmproj"]


_ENCODED = re.compile(r"mtmd batch encoding done in (\d+) ms")
_LOADED = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I main: loading model", re.MULTILINE)  # m.ss.mmm.uuu since start


def llamacpp_once(cli: Path, text: Path, mmproj: Path, image: Path, threads: int) -> dict | str:
    """One llama-mtmd-cli run (-n 1, greedy): the image slices' encode ms (its log), and TTFT ms = the process's wall
    time after both models are loaded (its log's timestamp of "loading model") — the chat-templated prompt's text,
    the slices' encode and their embeddings through the text model, one sampled token, exit; or why it failed."""
    command = [str(cli), "-m", str(text), "--mmproj", str(mmproj), "--image", str(image), "-p", PROMPT.replace("<|image|>", ""),
               "-n", "1", "-t", str(threads), "--temp", "0", "--no-warmup", "-c", "4096"]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    wall_ms = 1e3 * (time.perf_counter() - start)
    out = run.stdout + run.stderr
    encoded = [int(m) for m in _ENCODED.findall(out)]
    loaded = _LOADED.search(out)
    if run.returncode != 0 or not encoded or loaded is None:
        last = [line for line in out.splitlines() if line.strip()]
        return f"llama-mtmd-cli exit {run.returncode}: {last[-1] if last else ''}"
    minutes, seconds, ms, us = (int(g) for g in loaded.groups())
    load_ms = (minutes * 60 + seconds) * 1e3 + ms + us / 1e3
    return {"encode_ms": float(sum(encoded)), "slices": len(encoded), "load_ms": round(load_ms, 1),
            "ttft_ms": wall_ms - load_ms}


# ------------------------------------------------------------------------------------------------ the run
def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1),
            "runs": [round(v, 1) for v in values]}


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("--vision-layers", type=positive_int, default=34,
                        help="encoder layers (Scout: 34; fewer for a quick run)")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llama4-vision-bench")
    parser.add_argument("--cache", type=Path, default=llamacpp.DEFAULT_CACHE, help="llama.cpp sources and build")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    args = parser.parse_args()
    if not TEXT_CONFIG.is_file():
        parser.error(f"{TEXT_CONFIG} is missing: the text model's config, expected in the shared folder beside the repo")
    print_machine(args.threads, sys.stderr)  # stdout is the JSON

    from transformers import Llama4ForConditionalGeneration

    from llama4_export.runtime import Generator

    work = args.workdir / f"scoutvision{args.vision_layers}-rand200m"
    checkpoint, artifact, image = work / "checkpoint", work / "artifact-fp32", work / f"image-{IMAGE_SIDE}.png"
    work.mkdir(parents=True, exist_ok=True)
    if not checkpoint.is_dir():
        log(f"writing the checkpoint ({args.vision_layers} vision layers) to {checkpoint}")
        write_checkpoint(checkpoint, args.vision_layers, args.seed)
    if not (artifact / "manifest.json").is_file():
        export(checkpoint, artifact)
    if not image.is_file():
        write_image(image, args.seed)

    peer = None if args.no_llamacpp else llamacpp_files(checkpoint, args.cache, work)
    if isinstance(peer, str):
        log(f"llama.cpp left out: {peer}")

    ours = Generator.load(artifact, threads=args.threads)
    processed = ours.image_encoder.preprocess([image])
    grid, pixel_values = processed[0].grid, processed[0].pixel_values
    tiles = pixel_values.shape[0]
    ids = ours.encode(ours.image_encoder.processor.expand_prompt(PROMPT, [grid]))
    torch.set_num_threads(args.threads)
    hf = Llama4ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    pixels = torch.from_numpy(pixel_values)
    input_ids = torch.tensor([ids])

    def ours_encode() -> np.ndarray:
        return ours.image_encoder.encode(processed)

    def hf_encode() -> np.ndarray:
        with torch.inference_mode():
            return hf.get_image_features(pixels).pooler_output.reshape(-1, hf.config.text_config.hidden_size).numpy()

    def ours_ttft() -> int:
        return ours.generate(PROMPT, images=[image], max_new_tokens=1).token_ids[0]

    def hf_ttft() -> int:
        with torch.inference_mode():
            out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels,
                              max_new_tokens=1, do_sample=False)
        return int(out[0, -1])

    # Same answers first (and one warm-up call of each)
    feature_error = float(np.abs(ours_encode() - hf_encode()).max())
    first_tokens = {"ours": ours_ttft(), "transformers": hf_ttft()}
    log(f"{tiles} tiles (grid {grid[0]}×{grid[1]} + global), {len(ids)} prompt tokens; features max |ours − hf| "
        f"{feature_error:.2e}; first tokens {first_tokens}")

    runs: dict[str, list[float]] = {k: [] for k in ("ours encode", "hf encode", "ours ttft", "hf ttft",
                                                    "llama.cpp encode", "llama.cpp ttft")}
    steps = [("ours encode", ours_encode), ("hf encode", hf_encode), ("ours ttft", ours_ttft), ("hf ttft", hf_ttft)]
    if not isinstance(peer, str) and peer is not None:
        steps.append(("llama.cpp", lambda: llamacpp_once(*peer, image, args.threads)))
    load = [os.getloadavg()[0]]
    llamacpp_info = None
    for rep in range(args.repeats):
        for name, call in steps[rep % len(steps):] + steps[:rep % len(steps)]:  # rotate the order every repetition
            start = time.perf_counter()
            result = call()
            elapsed = 1e3 * (time.perf_counter() - start)
            if name != "llama.cpp":
                runs[name].append(elapsed)
            elif isinstance(result, str):
                log(f"llama.cpp failed: {result}")
                llamacpp_info, steps = result, [s for s in steps if s[0] != "llama.cpp"]
            else:
                runs["llama.cpp encode"].append(result["encode_ms"])
                runs["llama.cpp ttft"].append(result["ttft_ms"])
                llamacpp_info = {k: result[k] for k in ("slices", "load_ms")}
        load.append(os.getloadavg()[0])
        log(f"repetition {rep + 1}/{args.repeats} done (load {load[-1]:.2f})")

    results = {name: stats(values) for name, values in runs.items() if values}
    report = {
        "machine": {**machine_info(), "copy_bandwidth_gb_s": round(memory_bandwidth_gb_s(args.threads), 1),
                    "load_average_1m": [round(v, 2) for v in load]},
        "model": {"vision_layers": args.vision_layers, "text": TEXT_CONFIG.name, "tiles": tiles, "grid": list(grid),
                  "prompt_tokens": len(ids), "threads": args.threads, "repeats": args.repeats},
        "checks": {"features_max_abs_diff": feature_error, "first_tokens": first_tokens},
        "ms": results,
        "ms_per_tile": {k.replace(" encode", ""): round(v["median"] / tiles, 1) for k, v in results.items() if "encode" in k},
        "ratios_of_medians": {
            f"{peer_name} / ours {what}": round(results[f"{peer_name} {what}"]["median"] / results[f"ours {what}"]["median"], 2)
            for peer_name in ("hf", "llama.cpp") for what in ("encode", "ttft") if f"{peer_name} {what}" in results},
        "llama.cpp": llamacpp_info if peer is not None and not isinstance(peer, str) else (peer or "not run"),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_script(main)
