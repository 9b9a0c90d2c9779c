"""Time of the accuracy report (evaluation/report.py) on an artifact against its checkpoint, and how many passes its
fp32 reference makes over the checkpoint's weights (each pass reads every layer: from disk for a full-size source).

    python benchmarks/report_time.py ARTIFACT CHECKPOINT
    PYTHONPATH=/path/to/older/checkout python benchmarks/report_time.py ARTIFACT CHECKPOINT   # the code before a change

The held-out text is 8 × 256 seeded random token ids (the report's defaults), so any checkpoint works, tokenizer or not.
"""

from __future__ import annotations

import time

import numpy as np

from llama4_export import api
from llama4_export.evaluation import report

from common import ArgumentParser, existing_dir, print_machine, run_script, summary  # benchmarks/, beside this script


def main() -> None:
    parser = ArgumentParser(description=summary(__doc__))
    parser.add_argument("artifact", type=existing_dir)
    parser.add_argument("checkpoint", type=existing_dir)
    args = parser.parse_args()
    source = api.weight_source(checkpoint=args.checkpoint)
    print_machine(2)  # the report's time is what is measured: name the machine (bandwidth at 2 threads)
    tokens = np.random.default_rng(0).integers(3, source.config.vocab_size - 3, 8 * 256)
    passes = []
    reference_call = report.ReferenceLogits.__call__

    def counted(self, ids, *rest, **options):
        passes.append(ids.shape)
        return reference_call(self, ids, *rest, **options)

    report.ReferenceLogits.__call__ = counted
    start = time.perf_counter()
    result = report.accuracy_report(args.artifact, source, tokens, "random ids")
    print(f"{report.__file__}: {time.perf_counter() - start:.1f} s, {len(passes)} reference passes "
          f"(row × token shapes {sorted(set(passes))}); greedy_agreement_tokens {result['greedy_agreement_tokens']}, "
          f"top1_agreement {result['top1_agreement']:.4f}")


if __name__ == "__main__":
    run_script(main)
