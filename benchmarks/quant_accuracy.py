"""Accuracy of INT4 (RTN vs AWQ, block 32/64/128) and FP8 on l4-scoutlike vs its fp32 model, on held-out text.

INT4 runs use the default of `--precision int4` on ONNX Runtime: lm_head 8-bit and the token embedding 4-bit
blockwise; the `…-float-embeddings` run keeps both in float (`--float-embeddings`), which prices that default.

    python benchmarks/quant_accuracy.py [--checkpoint ../shared/checkpoints/l4-scoutlike] [--out-dir /tmp/quant_acc]

Calibration: corpus_train.txt beside the checkpoint (cached: the first run calibrates, the others reuse the cache);
evaluation: corpus_heldout.txt. Prints one table and writes quant_accuracy.json in --out-dir.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llama4_export import api
from llama4_export.pipeline import QuantOptions

from common import ArgumentParser, existing_dir, positive_int, run_script, summary  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "checkpoints"


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("--checkpoint", type=existing_dir, default=SHARED / "l4-scoutlike")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/quant_accuracy"))
    parser.add_argument("--calib-samples", type=positive_int, default=32)
    parser.add_argument("--calib-seq-len", type=positive_int, default=256)
    parser.add_argument("--only", nargs="*", help="run names to run (fp8, int4-rtn-b32, int4-awq-b128, …); default all")
    args = parser.parse_args()
    runs = [("fp8", None, None, False)] + [("int4", algo, block, False) for block in (32, 64, 128) for algo in ("rtn", "awq")]
    runs.append(("int4", "awq", 128, True))
    named = {(precision if algo is None else f"{precision}-{algo}-b{block}" + ("-float-embeddings" if embed else "")):
             (precision, algo, block, embed) for precision, algo, block, embed in runs}
    unknown = sorted(set(args.only or ()) - set(named))
    if unknown:
        parser.error(f"--only: unknown run {', '.join(unknown)}; choose from {', '.join(named)}")
    corpus = args.checkpoint.parent
    for needed in (args.checkpoint, corpus / "corpus_train.txt", corpus / "corpus_heldout.txt"):
        if not needed.exists():  # the default checkpoint is not checked by its type, and the corpus sits beside it
            parser.error(f"{needed} does not exist; --checkpoint takes a checkpoint whose folder holds corpus_train.txt "
                         "and corpus_heldout.txt")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (precision, algo, block, float_embeddings) in named.items():
        if args.only and name not in args.only:
            continue
        options = QuantOptions(int4_algo=algo or "awq", block_size=block, calib_data=corpus / "corpus_train.txt",
                               calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                               calib_cache=args.out_dir / "calibration.safetensors",
                               eval_data=corpus / "corpus_heldout.txt", float_embeddings=float_embeddings)
        start = time.perf_counter()
        report = api.export_model(args.out_dir / name, checkpoint=args.checkpoint, precision=precision, quant=options,
                                  target="onnxruntime", show_progress=False).accuracy_report
        rows.append({"run": name, **report, "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name:16s} ppl {report['perplexity_reference']:.4f} → {report['perplexity_quantized']:.4f} "
              f"ratio {report['perplexity_ratio']:.5f}  KL {report['kl_mean']:.5f}  top1 {report['top1_agreement']:.4f}  "
              f"greedy {report['greedy_agreement_tokens']:.2f}/{report['greedy_tokens']}", flush=True)
    (args.out_dir / "quant_accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    run_script(main)
