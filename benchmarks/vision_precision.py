"""Accuracy of each `--vision-precision` against transformers, on the two fixture vision checkpoints.

For every vision precision this ONNX Runtime can run, each fixture checkpoint (tests/fixtures/vision/tiny-a, tiny-b) is
exported with fp32 text graphs (so only the vision tower differs) and compared with what transformers computed
(scripts/make_vision_fixtures.py): the image features of every fixture image (max abs error, and the worst cosine
similarity of a feature row), and 16 greedy tokens with 1 and 2 images (how many equal transformers' `generate`).

    python benchmarks/vision_precision.py [--out-dir /tmp/vision_precision]

bf16 runs only where ONNX Runtime has the CUDA EP (its CPU EP has no bf16 kernels). Prints one table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
from safetensors.numpy import load_file

from llama4_export import api
from llama4_export.pipeline import QuantOptions
from llama4_export.runtime import Generator

from common import ArgumentParser, run_script, summary  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "vision"
CHECKPOINTS = ("tiny-a", "tiny-b")


def vision_precisions() -> list[str]:
    gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return ["fp32", "fp16", *(["bf16"] if gpu else []), "int4", "fp8"]


def measure(artifact: Path, name: str, reference: dict, stored: dict[str, np.ndarray]) -> dict:
    generator = Generator.load(artifact)
    encoder = generator.image_encoder
    cases = reference["prompts"][name]
    images = sorted({image for case in cases.values() for image in case["images"]})
    worst, cosine = 0.0, 1.0
    for image in images:
        got = encoder.encode(encoder.preprocess([FIXTURES / "images" / image])).astype(np.float64)
        want = stored[f"{name}/{image}"].reshape(got.shape).astype(np.float64)
        worst = max(worst, float(np.abs(got - want).max()))
        rows = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        cosine = min(cosine, float(rows.min()))
    agree = []
    for case in cases.values():
        result = generator.generate(case["text"], max_new_tokens=len(case["generated"]), stop_tokens=[],
                                    images=[FIXTURES / "images" / i for i in case["images"]])
        agree.append(sum(a == b for a, b in zip(result.token_ids, case["generated"])))
    return {"features_max_abs": worst, "features_min_cosine": cosine, "greedy_16_equal": agree}


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/vision_precision"))
    args = parser.parse_args()
    reference = json.loads((FIXTURES / "reference.json").read_text())
    stored = load_file(FIXTURES / "features.safetensors")
    rows = []
    for name in CHECKPOINTS:
        for precision in vision_precisions():
            out = args.out_dir / f"{name}-{precision}"
            api.export_model(out, checkpoint=FIXTURES / name, precision="fp32", target="onnxruntime",
                             quant=QuantOptions(report=False), show_progress=False, vision_precision=precision)
            rows.append({"checkpoint": name, "vision_precision": precision, **measure(out, name, reference, stored)})
    print("| checkpoint | vision precision | features max abs | min cosine | greedy 16 tokens equal (1 img, 2 img) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['vision_precision']} | {r['features_max_abs']:.2e} | "
              f"{r['features_min_cosine']:.6f} | {', '.join(f'{n}/16' for n in r['greedy_16_equal'])} |")
    (args.out_dir / "vision_precision.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    run_script(main)
