"""Peak RSS of the layer-streaming export on a checkpoint with the REAL Scout layer shapes, 1 layer vs 3 layers.

    python benchmarks/scout_shapes.py                         # layers 1 and 3, fp16, in a temp dir under /tmp
    python benchmarks/scout_shapes.py --layers 2 --precision fp16 --workdir /big/disk
    python benchmarks/scout_shapes.py --layers 1 3 --precision int4 fp8 --calib-samples 16 --calib-seq-len 256
    python benchmarks/scout_shapes.py --layers 1 --precision fp32 int4 --int4-algo rtn --vision --no-optimize fp32

For each layer count it writes a synthetic Hugging Face checkpoint (hidden 5120, 16 experts of width 8192 + shared
expert, 40/8 heads, head_dim 128, vocab 202048; ≈ 4.4 GB of bf16 per MoE layer + 4.1 GB of embeddings and lm_head),
one safetensors shard per layer streamed to disk slice by slice, then runs

    llama4-export --model scout --layers N --checkpoint CKPT --precision P --target onnxruntime --out OUT

under /usr/bin/time -v and reports its peak RSS ("Maximum resident set size"), then deletes both directories
(nothing is left behind; ~60 GB free disk covers 3 layers: checkpoint + export + optimized copy; int4 / fp8 leave
the routed experts out of their fp32 intermediate).
--vision makes it a multimodal (Llama4ForConditionalGeneration) checkpoint: the text model under `language_model.`, plus
the preset's full vision tower and projector (Scout's and Maverick's are the same: 34 layers of width 1408, ≈ 0.87 B
parameters, 1.74 GB of bf16) in their own shard, and Scout's image processor file; the export writes vision.onnx too.
Acceptance (issue 9): peak RSS flat in the number of layers, below the checkpoint's size and below
2 GB + 2 × one layer's bf16 size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llama4_export.artifact import write_json
from llama4_export.model.config import PRESETS, Llama4VisionConfig, get_vision_preset
from llama4_export.model.loader import INDEX_FILE, MULTIMODAL_PREFIX
from llama4_export.model.vision import Llama4VisionEncoder
from llama4_export.weights import RandomWeights

from common import (  # benchmarks/, beside this script
    ArgumentParser, BenchmarkError, last_error_line, positive_int, print_machine, run_script, summary)

_SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_streamed_shard(path: Path, source, names: list[str], dtype: torch.dtype, prefix: str = "") -> int:
    """A safetensors file written tensor by tensor, slice by slice (save_file needs every tensor in memory at once);
    `source` has `shapes` and `chunks` (a WeightSource); each name is stored with `prefix` before it."""
    shapes = source.shapes
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * torch.empty(0, dtype=dtype).element_size()
        header[prefix + name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            for piece in source.chunks(name, dtype):
                f.write(piece.contiguous().view(torch.uint8).numpy())
    return path.stat().st_size


class RandomVisionTensors:
    """Seeded random tensors of a vision tower + projector under their checkpoint names (each at most 21 M values, so
    drawn whole); the shapes and chunks write_streamed_shard reads."""

    def __init__(self, config: Llama4VisionConfig, seed: int = 0):
        with torch.device("meta"):
            self.shapes = {name: tuple(p.shape) for name, p in Llama4VisionEncoder(config).named_parameters()}
        self.seed = seed

    def chunks(self, name: str, dtype: torch.dtype):
        generator = torch.Generator().manual_seed(self.seed + sorted(self.shapes).index(name))
        yield (torch.randn(self.shapes[name], generator=generator) * 0.02).to(dtype)


def multimodal_config(text: dict, vision: Llama4VisionConfig) -> dict:
    """config.json of a Llama4ForConditionalGeneration checkpoint with this text config and vision tower."""
    fields = ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "pixel_shuffle_ratio", "projector_input_dim", "projector_output_dim", "vision_output_dim",
              "rope_theta")
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "tie_word_embeddings": False,
            "image_token_index": vision.image_token_id, "text_config": {**text, "model_type": "llama4_text"},
            "vision_config": {"model_type": "llama4_vision_model", "hidden_act": "gelu", "norm_eps": 1e-5,
                              **{f: getattr(vision, f) for f in fields}}}


# Scout's and Maverick's published preprocessor_config.json, as far as the export reads it.
PREPROCESSOR = {"image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor",
                "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "max_patches": 16, "resample": 2,
                "rescale_factor": 1 / 255, "resize_to_max_canvas": False, "size": {"height": 336, "width": 336}}


def write_checkpoint(directory: Path, layers: int, preset: str = "scout", seed: int = 0,
                     vision: bool = False) -> tuple[int, int]:
    """A preset-shaped checkpoint with `layers` layers (and the preset's vision tower when `vision`); returns (total
    bytes, bytes of one layer)."""
    source = RandomWeights(preset, seed, layers)
    directory.mkdir(parents=True)
    config = source.config.to_hf_dict()
    names = sorted(source.shapes)
    shards = {f"model-layer{i:02d}.safetensors": [n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(layers)}
    shards["model-rest.safetensors"] = [n for n in names if not n.startswith("model.layers.")]
    sources = dict.fromkeys(shards, source)
    prefix = ""
    if vision:
        tower = get_vision_preset(preset)
        config, prefix = multimodal_config(config, tower), MULTIMODAL_PREFIX
        sources["model-vision.safetensors"] = RandomVisionTensors(tower, seed)
        shards["model-vision.safetensors"] = sorted(sources["model-vision.safetensors"].shapes)
        write_json(directory / "preprocessor_config.json", PREPROCESSOR)
    write_json(directory / "config.json", config)
    sizes = {}
    for file, shard_names in shards.items():
        print(f"  writing {file} ({len(shard_names)} tensors)", flush=True)
        sizes[file] = write_streamed_shard(directory / file, sources[file], shard_names, torch.bfloat16,
                                           prefix if sources[file] is source else "")
    weight_map = {(prefix if sources[file] is source else "") + name: file
                  for file, shard_names in shards.items() for name in shard_names}
    write_json(directory / INDEX_FILE, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))})
    return sum(sizes.values()), sizes["model-layer00.safetensors"]


def measure(layers: int, precisions: list[str], workdir: Path, preset: str = "scout", extra: tuple[str, ...] = (),
            repeats: int = 1, int4_algo: str = "rtn", vision: bool = False, no_optimize: tuple[str, ...] = ()) -> list[dict]:
    """One checkpoint of `layers` layers, exported `repeats` times per precision (each export deleted before the next);
    the row holds every run's peak RSS and their median."""
    root = Path(tempfile.mkdtemp(prefix=f"scout-shapes-{layers}-", dir=workdir))
    try:
        checkpoint = root / "checkpoint"
        start = time.perf_counter()
        total, layer_bytes = write_checkpoint(checkpoint, layers, preset, vision=vision)
        written = time.perf_counter() - start
        rows = []
        for precision in precisions:
            options = (*extra, "--no-optimize") if precision in no_optimize else extra
            runs = [export_once(checkpoint, root / "artifact", layers, precision, preset, options, int4_algo)
                    for _ in range(repeats)]
            peaks = sorted(run["peak_rss_bytes"] for run in runs)
            rows.append({"layers": layers, "precision": precision, "checkpoint_bytes": total, "layer_bf16_bytes": layer_bytes,
                         "checkpoint_write_seconds": round(written, 1), **runs[0],
                         "peak_rss_bytes": peaks[len(peaks) // 2], "peak_rss_runs": peaks,
                         "export_seconds": sorted(run["export_seconds"] for run in runs)[len(runs) // 2]})
            print("  " + json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def export_once(checkpoint: Path, out: Path, layers: int, precision: str, preset: str, extra: tuple[str, ...],
                int4_algo: str) -> dict:
    # A full-size preset validates the checkpoint's shapes (cut to N layers); a tiny one just streams.
    model = ["--model", preset, "--layers", str(layers)] if preset in ("scout", "maverick") else ["--stream"]
    command = ["/usr/bin/time", "-v", str(Path(sys.executable).parent / "llama4-export"), *model,
               "--checkpoint", str(checkpoint), "--precision", precision, "--target", "onnxruntime", "--out", str(out)]
    if precision == "int4":
        command += ["--int4-algo", int4_algo]
    command += list(extra)
    print("  " + " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    # every repeat traces, as a first export does: a trace loaded from the cache would lower the later repeats' RSS
    run = subprocess.run(command, capture_output=True, text=True,
                         env={**os.environ, "LLAMA4_EXPORT_TRACE_CACHE": "off"})
    seconds = time.perf_counter() - start
    if run.returncode != 0:  # its own last error line: the one before /usr/bin/time's report
        own = run.stderr.split("Command exited with non-zero status")[0]
        raise BenchmarkError(f"export failed (exit {run.returncode}): {last_error_line(own)}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    artifact = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out)
    return {"options": command[command.index("--out") + 2:], "artifact_bytes": artifact,
            "peak_rss_bytes": peak_kb * 1024, "export_seconds": round(seconds, 1)}


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("--layers", type=positive_int, nargs="+", default=[1, 3])
    parser.add_argument("--precision", nargs="+", default=["fp16"], choices=["fp16", "fp32", "int4", "fp8"])
    parser.add_argument("--calib-samples", type=positive_int, help="fp8: calibration samples (layer-wise calibration runs every "
                        "sample through every layer: on 2 CPU cores the default plan takes ~10 min per Scout layer)")
    parser.add_argument("--calib-seq-len", type=positive_int)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--preset", default="scout", choices=sorted(PRESETS),
                        help="scout-tiny: a seconds-long check of this script itself")
    parser.add_argument("--int4-algo", default="rtn", choices=["rtn", "awq"],
                        help="int4: rtn (default, as the figures in BENCHMARKS.md) or awq (hours of CPU per Scout layer)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="exports per row; the median peak RSS is reported")
    parser.add_argument("--report", action="store_true", help="keep the accuracy report (default: --no-report, as measured before)")
    parser.add_argument("--vision", action="store_true", help="a multimodal checkpoint with the preset's full vision tower")
    parser.add_argument("--no-optimize", nargs="*", default=[], choices=["fp16", "fp32", "int4", "fp8"],
                        help="export these precisions with --no-optimize (fp32 at Scout shapes: the optimized copy needs "
                        "3 × the 20 GB artifact of free disk)")
    args = parser.parse_args()
    if args.vision and get_vision_preset(args.preset) is None:
        parser.error(f"--preset {args.preset} has no vision tower; --vision needs scout or maverick")
    print_machine(2)  # export seconds are timed: name the machine (bandwidth at the other tables' 2 threads)
    extra = [] if args.report else ["--no-report"]
    if args.calib_samples is not None:
        extra += ["--calib-samples", str(args.calib_samples)]
    if args.calib_seq_len is not None:
        extra += ["--calib-seq-len", str(args.calib_seq_len)]
    rows = []
    for layers in args.layers:
        print(f"{layers} layer(s):", flush=True)
        rows += measure(layers, args.precision, args.workdir, args.preset, tuple(extra), args.repeats, args.int4_algo,
                        args.vision, tuple(args.no_optimize))
    gb = 1e9
    print(f"\n{'precision':>9} {'layers':>6} {'checkpoint':>11} {'artifact':>10} {'peak RSS':>9} {'bound':>7} {'export s':>9}")
    for r in sorted(rows, key=lambda r: (r["precision"], r["layers"])):
        bound = 2 * gb + 2 * r["layer_bf16_bytes"]
        ok = r["peak_rss_bytes"] < min(r["checkpoint_bytes"], bound)
        print(f"{r['precision']:>9} {r['layers']:>6} {r['checkpoint_bytes'] / gb:>9.2f}GB {r['artifact_bytes'] / gb:>8.2f}GB "
              f"{r['peak_rss_bytes'] / gb:>7.2f}GB {bound / gb:>5.1f}GB {r['export_seconds']:>9.1f}  "
              f"{'below checkpoint and bound' if ok else 'NOT below checkpoint and bound'}")


if __name__ == "__main__":
    run_script(main)
