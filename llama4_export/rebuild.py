"""`rebuild`: re-run the pipeline an artifact's manifest records and compare every file hash with the original.

What is re-run: the export, its trace included (never read from the trace cache; source: preset + seed, or the
checkpoint — whose files must hash as recorded; precision, quantization and calibration settings, partitions, the
prefill limit), the graph passes for the recorded target (and MoE lowering), the accuracy report when there was one,
and — when the manifest has a `tensorrt` entry and TensorRT + a GPU are here — the engine build with the recorded
builder settings from the recorded timing cache in error-on-miss mode. Everything up to the ONNX must be
byte-identical on any machine (the exporter and passes are deterministic; calibration at any thread count:
pipeline.pin_cpu_numerics); engines only given the same timing cache, GPU model and TensorRT version (engine.py says
what TensorRT does and does not guarantee). The result is compared file by file: every difference (missing, extra, or
different sha256) is reported.

`report` (report_artifact) re-runs one step of it on the artifact as it is: the accuracy report against the recorded
source (found and checked as a rebuild finds it), on the held-out text export defaults to or on any other text; the
artifact is left as it is (its manifest lists its files: a report.json written there would change it).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifact import (MANIFEST, ArtifactError, check_writable, held_temp_directory, part_of_partitioned,
                       partition_entries, read_manifest, replace_json)
from .calib.corpus import load_corpus
from .errors import NONE, PATH, CheckpointError, ConfigError, check_types
from .evaluation.report import REPORT_FILE, accuracy_report, evaluation_tokens
from .export.tokenizer_files import TOKENIZER_FILES
from .model.config import Llama4Config
from .model.io_spec import DEFAULT_MAX_PREFILL
from .pipeline import QuantOptions, export, pin_cpu_numerics
from .progress import note
from .tensorrt.engine import ENGINE_DIR, build_engines, missing_tensorrt_message
from .tensorrt.errors import BuildError
from .weights import WeightSource, check_as_recorded, recorded_source


@dataclass
class RebuildResult:
    compared: list[str]  # files compared
    differences: list[str]  # one line per differing file, sorted by file name
    notes: list[str] = field(default_factory=list)  # what was not compared and why, tool-version differences

    @property
    def identical(self) -> bool:
        return not self.differences


def compare_hashes(expected: dict[str, str], actual: dict[str, str], only: set[str] | None = None) -> list[str]:
    """Differences between two {file: sha256} maps, sorted by file name (restricted to `only` when given)."""
    names = sorted(set(expected) | set(actual))
    if only is not None:
        names = [n for n in names if n in only]
    out = []
    for name in names:
        if name not in actual:
            out.append(f"{name}: in the original artifact, not produced by the rebuild")
        elif name not in expected:
            out.append(f"{name}: produced by the rebuild, not in the original artifact")
        elif expected[name] != actual[name]:
            out.append(f"{name}: sha256 {expected[name][:16]}… in the original, {actual[name][:16]}… rebuilt")
    return out


def tool_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    a, b = expected.get("tools", {}), actual.get("tools", {})
    return [f"{tool} {a.get(tool)} originally, {b.get(tool)} now" for tool in sorted(set(a) | set(b)) if a.get(tool) != b.get(tool)]


def _uses_trt_plugin(manifest: dict[str, Any]) -> bool:
    """The tensorrt lowering used the plugin unless a graph records the standard-op MoE (--trt-fallback)."""
    return not any("standard ops" in (g.get("moe_lowering") or "") for g in (manifest.get("graphs") or {}).values())


def _text_given_again(option: str, given: Path | None, recorded: tuple[str, str | None] | None, made_on: str,
                      not_made: str) -> Path | None:
    """One rule for a text an artifact was made with (--calib-data, --eval-data). The embedded corpus is found again
    by itself; a file must be given again, and is checked against the recorded sha256 before anything is exported (a
    calibration takes hours at Scout's size). recorded: (name, sha256) of the text, None when the artifact has no such
    step — then a text given for it is refused with `not_made`. made_on: e.g. "the artifact was calibrated"."""
    if recorded is None:
        if given is not None:
            raise BuildError(f"{option} {given}: {not_made}; drop it")
        return None
    name, sha256 = recorded
    if sha256 is None:  # no text behind it (the report's seeded random tokens)
        return given
    if given is None:
        if not name.startswith("embedded:"):
            raise BuildError(f"{made_on} on {name!r} (sha256 {sha256[:16]}…); pass it again with {option}")
        return None
    if (digest := load_corpus(given).sha256) != sha256:
        raise BuildError(f"{option} {given}: its text (sha256 {digest[:16]}…) is not what {made_on} on ({name!r}, "
                         f"sha256 {sha256[:16]}…); pass that file")
    return given


def _checked_source(manifest: dict[str, Any], checkpoint: Path | None) -> WeightSource:
    """The weights the manifest records (recorded_source: a preset's, or the checkpoint's files as hashed), and a
    checkpoint's tokenizer files as the artifact copied them (they tokenize the calibration and held-out text)."""
    source = recorded_source(manifest, checkpoint)
    if checkpoint is not None:  # a checkpoint's artifact (recorded_source refuses one for a preset's)
        _check_tokenizer_files(checkpoint, manifest)
    return source


def _check_tokenizer_files(checkpoint: Path, manifest: dict[str, Any]) -> None:
    """The tokenizer files the artifact copied from the checkpoint must be there as copied, and no others: they were
    found different only after a whole export (and calibration, whose text they tokenize)."""
    copied = (manifest.get("tokenizer") or {}).get("files") or []
    check_as_recorded(checkpoint, {name: manifest["files"].get(name) for name in copied})
    for name in TOKENIZER_FILES:
        path = checkpoint / name
        if name not in copied and path.is_file():
            raise CheckpointError(f"{path}: the checkpoint the artifact was exported from had no {name} (the artifact "
                                  "has none); pass the original checkpoint")


def _held_out_text(directory: Path, manifest: dict[str, Any], eval_data: Path | None) -> Path | None:
    """The text the accuracy report was made on: None for the embedded corpus, else the file given again."""
    recorded = None
    if REPORT_FILE in manifest["files"]:
        report = json.loads((directory / REPORT_FILE).read_text())
        recorded = str(report.get("eval_data", "")), report.get("eval_data_sha256")
    return _text_given_again("--eval-data", eval_data, recorded, "the accuracy report was made",
                             f"the artifact has no {REPORT_FILE} (exported with --no-report)")


def _quant_options(manifest: dict[str, Any], calib_data: Path | None, eval_data: Path | None) -> QuantOptions:
    """The recorded quantization settings; calibration text other than the embedded corpus must be given again."""
    quant = manifest.get("quantization") or {}
    calibration = quant.get("calibration") or {}
    recorded = (str(calibration.get("data", "")), calibration.get("data_sha256")) if calibration else None
    calib_data = _text_given_again("--calib-data", calib_data, recorded, "the artifact was calibrated",
                                   f"the artifact was not calibrated (its precision {manifest.get('precision', 'fp32')} "
                                   "reads no calibration text)")
    precision = quant.get("precision")
    percentile = quant.get("activation_range", "amax")
    return QuantOptions(
        int4_algo=quant.get("algorithm", "awq") if precision == "int4" else "awq",
        block_size=quant.get("block_size") if precision == "int4" else None,
        calib_data=calib_data, calib_samples=calibration.get("samples"), calib_seq_len=calibration.get("seq_len"),
        eval_data=eval_data, report=REPORT_FILE in manifest["files"], quantize_lm_head=bool(quant.get("quantize_lm_head")),
        float_embeddings=bool(quant.get("float_embeddings")),
        amax_percentile=float(percentile.split()[1]) if percentile.startswith("percentile") else None,
        kv_cache_dtype="fp8" if "kv_cache" in quant else None,
    )


def rebuild(artifact_dir: str | Path, checkpoint: str | Path | None = None, out: str | Path | None = None,
            calib_data: str | Path | None = None, show_progress: bool = True,
            eval_data: str | Path | None = None) -> RebuildResult:
    """Re-run the recorded pipeline into `out` (default: a temp dir, removed after) and compare with the artifact."""
    pin_cpu_numerics()  # before the recorded source's first tensor (export notes it if that was too late)
    directory = Path(artifact_dir)
    original = read_manifest(directory)
    if out is not None and Path(out).resolve() == directory.resolve():  # it was replaced, verdict or not
        raise ArtifactError(f"--out {out}: is the artifact being rebuilt, which the rebuild would replace; give another "
                            "directory (or leave --out out: a temp one)")
    source = _checked_source(original, Path(checkpoint) if checkpoint else None)
    if "vision" not in original:
        source.vision = None  # exported --text-only from a multimodal checkpoint (or the model has none)
    notes: list[str] = []
    held_out = _held_out_text(directory, original, None if eval_data is None else Path(eval_data))
    quant = _quant_options(original, None if calib_data is None else Path(calib_data), held_out)
    layers = Llama4Config.from_manifest(original, str(directory / MANIFEST)).num_hidden_layers
    parts = partition_entries(directory, original, layers)
    first = read_manifest(directory / parts[0][0], verify=False) if parts else original
    max_prefill = int(((first.get("graphs") or {}).get("prefill") or {}).get("max_new_tokens", DEFAULT_MAX_PREFILL))
    optimized = "graph_passes" in first
    target = original.get("target", "onnxruntime")
    if not optimized and first.get("kv_layout") == "positions":
        # --no-optimize --target tensorrt records target onnxruntime (nothing is lowered) but traces TensorRT's KV layout
        # (as `passes` reads it); an FP8 cache's positions layout needs a quantized precision, which --no-optimize refuses
        target = "tensorrt"
    with contextlib.ExitStack() as stack:
        if out is None:  # a killed rebuild's scratch (an artifact-sized export) goes before this one's disk check
            out = stack.enter_context(held_temp_directory("llama4-rebuild-",
                                                          lambda removed: note(removed, show_progress))) / "artifact"
        out = Path(out)
        rebuilt = export(out, source, original.get("precision", "fp32"), target, quant,
                         max(1, len(parts)), max_prefill, optimized, _uses_trt_plugin(first),
                         show_progress=show_progress,
                         vision_precision=original["vision"].get("precision") if source.vision is not None else None,
                         verify_tolerance=(first.get("graph_passes") or {}).get("verified_tolerance"),
                         trace_cache=False).manifest  # the trace is re-run and checked too, not read back
        notes += tool_differences(original, rebuilt)
        engine_files = {n for n in original["files"] if n.startswith(f"{ENGINE_DIR}/")}
        if "tensorrt" in original:
            problem = missing_tensorrt_message()
            if problem is not None:
                notes.append(f"engines not rebuilt ({problem}); compared everything up to the ONNX")
            else:
                rebuilt = _rebuild_engines(directory, out, original, show_progress)
                engine_files = set()
        only = None if not engine_files else set(original["files"]) - engine_files
        differences = compare_hashes(original["files"], rebuilt["files"], only)
        compared = sorted(set(original["files"]) if only is None else only)
        return RebuildResult(compared, differences, notes)


def _rebuild_engines(directory: Path, out: Path, original: dict[str, Any], show_progress: bool):
    info = original["tensorrt"]
    cache = info["timing_cache"]
    if not cache.get("inside_artifact"):
        raise BuildError(f"the original timing cache {cache['path']!r} is outside the artifact; copy it into "
                         f"{directory}/engine/ to rebuild the engines reproducibly")
    (out / cache["path"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(directory / cache["path"], out / cache["path"])
    builder, limits = info["builder"], info["builder"]["limits"]
    workspace = builder.get("workspace_bytes")
    return build_engines(out, max_batch=limits["max_batch"], max_prefill=limits["max_prefill"],
                         window=limits["global_slots"], timing_cache=out / cache["path"], reproducible=True,
                         workspace_gib=None if workspace is None else workspace / (1 << 30),
                         version_compatible=builder.get("version_compatible", False), show_progress=show_progress)


def report_artifact(artifact_dir: str | Path, checkpoint: str | Path | None = None, eval_data: str | Path | None = None,
                    out: str | Path | None = None) -> dict[str, Any]:
    """`llama4-export report`: the accuracy report export writes as report.json (evaluation/report.py), of the
    artifact as it is — one exported with --no-report or by someone else, or on other held-out text — against the
    source its manifest records (a preset's seeded weights; or the checkpoint, at `checkpoint` when it has moved, its
    files and tokenizer files checked against the recorded sha256 as a rebuild checks them). eval_data: default the
    text export reports on (the embedded corpus's held-out slice). The artifact is not written to (nor is anything
    else beside it); `out`: a file to write the report's JSON to, outside the artifact. Everything given is checked
    before the report runs."""
    check_types("report_artifact", {
        "artifact_dir": (PATH, "an artifact directory"), "checkpoint": (PATH + NONE, "a directory path or None"),
        "eval_data": (PATH + NONE, "a file path or None"), "out": (PATH + NONE, "a file path or None")}, locals())
    pin_cpu_numerics()  # the numbers export's report gives (before the source's first tensor)
    directory = Path(artifact_dir)
    manifest = read_manifest(directory)
    if (part := part_of_partitioned(directory, manifest)) is not None:
        raise ArtifactError(f"{part}; report on the artifact directory holding it ({directory.resolve().parent})")
    if out is not None:
        out = Path(out)
        if out.resolve().is_relative_to(directory.resolve()):
            raise ConfigError(f"--out {out}: inside the artifact, whose manifest lists its files (a file written there "
                              "changes the artifact); write the report elsewhere")
        if out.is_dir():
            raise ConfigError(f"--out {out}: is a directory; give a file path, e.g. {out / 'report.json'}")
        if not out.parent.is_dir():
            raise ConfigError(f"--out {out}: its directory {out.parent} does not exist; create it or write elsewhere")
        check_writable(out, "--out", ConfigError)
    source = _checked_source(manifest, None if checkpoint is None else Path(checkpoint))
    held_out = evaluation_tokens(source, None if eval_data is None else Path(eval_data))
    # the runnable copies of graphs lowered for TensorRT or in bf16 go to the temp directory, not beside the artifact
    # (someone else's, on a read-only share)
    with held_temp_directory("llama4-report-", note) as scratch:
        report = accuracy_report(directory, source, *held_out, scratch_in=scratch)
    if out is not None:
        replace_json(out, report)
    return report
