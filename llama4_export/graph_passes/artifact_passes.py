"""The one optimize driver: run the graph passes on every graph of a written artifact, with the weights left on disk.

`optimize_graphs` loads each graph lazily (export/writer.py: tensors read when a pass asks, created tensors spilled
to a scratch file, deferred routed experts read from the weight source one expert at a time), runs the passes and
writes the optimized graphs and their one external-data file into another directory. Peak memory is the largest
single weight and what one pass computes from it, plus the graphs' structure — the same for Scout as for a tiny
preset. `optimize_artifact` applies it to an existing artifact in place, atomically (`llama4-export passes DIR`).
Same artifact + same target ⇒ byte-identical files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from ..artifact import (MANIFEST, atomic_directory, held_directory, listed_file, read_manifest,
                        remove_abandoned_beside, unlisted_entries, write_json, write_manifest)
from ..export.writer import DATA_FILE, SpillFile, file_content, load_lazily, write_graphs
from ..model.config import Llama4Config
from ..progress import Steps, note
from ..weights import WeightSource
from .errors import GraphPassError
from .manager import PassReport
from .pipeline import check_target, optimize, passes_for
from .quantize import QuantSpec
from .verify import DEFAULT_TOLERANCE

PASSES_FILE = "passes.json"


def optimize_graphs(
    source_dir: Path, graphs: dict[str, dict[str, Any]], out_dir: Path, target: str, step: Callable = Steps.silent,
    trt_plugin: bool = True, quantization: QuantSpec | None = None, verify: bool = False,
    tolerance: float = DEFAULT_TOLERANCE, weights: WeightSource | None = None, data_file: str = DATA_FILE,
    passes_file: str = PASSES_FILE, attention_chunk: int | None = None,
) -> tuple[dict[str, PassReport], int]:
    """Optimize the graphs `graphs` (manifest entries) of `source_dir` for `target` into `out_dir` (graphs, data file,
    the pass report `passes_file`); returns (the pass reports, the graphs' opset). weights: where the routed experts an
    export deferred come from; attention_chunk: the model's (config.attention_chunk_size)."""
    passes_for(target)  # an unknown target fails before any slow step
    with held_directory(out_dir.parent, ".spill-") as scratch:
        spill = SpillFile(scratch / "passes.spill")
        models, reports = {}, {}
        for name in sorted(graphs):
            file = graphs[name]["file"]
            with step(f"optimize {file} for {target}" + (" (verifying every pass)" if verify else "")):
                model = load_lazily(source_dir / file, spill, weights)
                models[name], reports[name] = optimize(model, target, verify, tolerance, trt_plugin=trt_plugin,
                                                        quantization=quantization, attention_chunk=attention_chunk)
        with step(f"write optimized graphs and {data_file}"):
            write_graphs(models, out_dir, file_content, data_file)
            write_json(out_dir / passes_file, {name: report.to_json() for name, report in reports.items()})
    return reports, max(m.opset_imports.get("", 0) for m in models.values())


def optimized_manifest(manifest: dict[str, Any], target: str, reports: dict[str, PassReport], opset: int,
                       verify: bool = False, tolerance: float | None = None) -> dict[str, Any]:
    """The manifest entries the passes change: target, opset, each graph's MoE lowering, the pass list."""
    manifest = {k: v for k, v in manifest.items() if k != "files"}
    manifest["target"] = target
    manifest["opset"] = opset
    manifest["graphs"] = {name: {**entry, "moe_lowering": reports[name].moe_lowering}
                          for name, entry in manifest["graphs"].items()}
    first = next(iter(reports.values()))
    manifest["graph_passes"] = {
        "target": target,
        "report": PASSES_FILE,
        "passes": [r.name for r in first.records],
        "verified_tolerance": tolerance if verify else None,
    }
    return manifest


def optimize_artifact(
    directory: str | Path, target: str | None = None, verify: bool = False, tolerance: float = DEFAULT_TOLERANCE,
    trt_plugin: bool = True, show_progress: bool = True,
) -> tuple[dict[str, Any], dict[str, PassReport]]:
    """Optimize an unoptimized artifact's graphs in place (atomically); returns (manifest, reports). target None: the
    one its graphs were traced for (`--no-optimize --target tensorrt` traces the positions KV layout, which ONNX
    Runtime runs too; the default trace, ONNX Runtime's in-place layout, cannot be lowered for tensorrt)."""
    directory = Path(directory)
    if target is not None:
        check_target(target)  # before the artifact's checks, which would name another problem
    if not trt_plugin and target not in (None, "tensorrt"):
        raise GraphPassError(f"--trt-fallback: picks the MoE lowering of --target tensorrt, not {target}; drop one")
    if verify and not tolerance >= 0:  # a negative bound failed the first pass, reported as that pass's bug
        raise GraphPassError(f"--tolerance {tolerance:g}: must be >= 0 (an output's deviation relative to its max "
                             "magnitude)")
    manifest = read_manifest(directory)  # checks every file's hash before we read any of it
    if manifest.get("partitions"):
        raise GraphPassError(f"{directory}: a partitioned artifact ({len(manifest['partitions'])} parts): the export "
                             "optimizes each part as it writes it (`passes --report` shows them); one made with "
                             "--no-optimize is optimized by exporting it again without that flag")
    if "graph_passes" in manifest:
        raise GraphPassError(f"{directory}: already optimized for {manifest['graph_passes'].get('target')!r}; "
                             "export again to optimize anew")
    if foreign := unlisted_entries(directory, manifest):  # the optimized artifact replaces the directory whole
        raise GraphPassError(f"{directory}: also holds {foreign[0]!r}, not in its {MANIFEST}, which optimizing it in "
                             "place would delete; move it out first")
    # positions without optimization: --target tensorrt's trace (an FP8 KV cache's needs a quantized precision, which
    # --no-optimize refuses)
    traced_for_tensorrt = manifest.get("kv_layout") == "positions"
    target = target or ("tensorrt" if traced_for_tensorrt else "onnxruntime")
    if not trt_plugin and target != "tensorrt":
        raise GraphPassError("--trt-fallback: picks the MoE lowering of --target tensorrt, and this export was traced "
                             "for onnxruntime; drop it")
    if target == "tensorrt" and not traced_for_tensorrt:
        raise GraphPassError(f"{directory}: traced for ONNX Runtime (its GroupQueryAttention updates the KV cache in "
                             "place; TensorRT has no such op), so it cannot be lowered for tensorrt; export it with "
                             "--no-optimize --target tensorrt for that, or optimize this one with --target onnxruntime")
    graphs = manifest.get("graphs") or {}
    if not graphs:
        raise GraphPassError(f"{directory / MANIFEST}: lists no graphs; re-run the export")
    for name, entry in graphs.items():  # the hashes read_manifest checked cover only the files it lists
        listed_file(directory, manifest, entry.get("file") if isinstance(entry, dict) else None, f"graphs.{name}.file")
    data_file = manifest.get("external_data", DATA_FILE)
    config = Llama4Config.from_manifest(manifest, str(directory / MANIFEST))
    note(remove_abandoned_beside(directory), show_progress)
    with Steps(show_progress) as step, atomic_directory(directory) as tmp:
        reports, opset = optimize_graphs(directory, graphs, tmp, target, step, trt_plugin, None, verify, tolerance,
                                         data_file=data_file, attention_chunk=config.attention_chunk_size)
        rewritten = {entry["file"] for entry in graphs.values()} | {data_file, MANIFEST, PASSES_FILE}
        for name in sorted(manifest["files"]):
            if name not in rewritten:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(directory / name, tmp / name)
        updated = optimized_manifest(manifest, target, reports, opset, verify, tolerance)
        manifest = write_manifest(tmp, updated)
    return manifest, reports
