"""The one export pipeline: a weight source → an artifact directory (DESIGN.md §2), for every precision, target and
partitioning, streamed or in memory.

    export(out, source, precision="int4", target="onnxruntime", quant=QuantOptions(), parts=1)

  1. checks      everything that can fail fast fails before any slow step: output directory, precision × target,
                 quantization options, the files the artifact copies, calibration / evaluation text, free disk, the
                 memory AWQ's search needs;
  2. calibrate   (int4 AWQ, fp8, FP8 KV cache) layer by layer from the source, through the calibration cache
                 (calib/calibrate.py); AWQ's plans are replayed on the weights as they are read (AwqWeights);
  3. per part    (one part, or `parts` contiguous layer ranges balanced by the memory planner): trace decode +
                 prefill on the meta device, write them with their weights read from the source (export/), then the
                 graph passes for the target with the weights left on disk, quantizing (graph_passes/); a multimodal
                 checkpoint's vision encoder becomes vision.onnx (own data file, its own precision: vision_precision_for)
                 through the same passes, and the first prefill graph fuses its features in (model/io_spec.py);
  4. finish      tokenizer files, the manifest (sha256 of every file), the accuracy report of the artifact on ONNX
                 Runtime against the source's fp32 model (evaluation/report.py), the manifest again.
Everything is written into a temp directory beside `out` and renamed into place at the end: an export that fails at
any stage (a full disk included) leaves nothing behind. TensorRT engines are built from the finished artifact
(tensorrt/engine.py). Same inputs ⇒ byte-identical files, whichever source kind or memory mode produced them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import onnxscript
import torch

from . import __version__
from .artifact import (atomic_directory, check_replaceable, held_directory, remove_abandoned_beside,
                       replaceable_directory, writable_parent, write_json, write_manifest)
from .calib.awq_plans import AwqWeights
from .calib.calibrate import Calibration, activation_amax, calibrate, calibration_samples, tokenizer_for
from .calib.corpus import CalibrationError
from .calib.stats import check_cache_writable, kv_cache_amax
from .errors import FLAG, INTEGER, NONE, NUMBER, PATH, TEXT, ConfigError, check_types
from .evaluation.report import REPORT_FILE, accuracy_report, evaluation_tokens
from .export.tokenizer_files import (check_tokenizer_files, copy_tokenizer_files, missing_tokenizer_note,
                                     write_byte_level_tokenizer, write_tokenizer_graphs)
from .export.onnx_export import GRAPHS, OPSET, VISION_FILE, trace_vision, traced_graphs
from .export.writer import DATA_FILE, weight_content, write_graphs
from .graph_passes.artifact_passes import optimize_graphs, optimized_manifest
from .graph_passes.manager import PassReport
from .graph_passes.pipeline import check_target
from .graph_passes.quantize import LM_HEAD, QuantSpec
from .graph_passes.verify import DEFAULT_TOLERANCE
from .model.config import Llama4Config
from .model.io_spec import DEFAULT_MAX_PREFILL
from .model.summary import block_size_problem, default_block_size, parameter_counts, vision_block_size, vision_parameter_count, weight_bytes
from .plan import layer_weight_bytes, partition_layers
from .progress import Steps, note
from .runtime.images import ImageProcessorConfig
from .weights import VisionWeights, WeightSource

# The dtype of each precision's graphs; int4 / fp8 quantize their weights in the passes (graph_dtype: the float type).
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                                      "int4": torch.float32, "fp8": torch.float32}
QUANTIZED_PRECISIONS = ("int4", "fp8")
VISION_DATA_FILE = "vision.data"
VISION_PASSES_FILE = "vision_passes.json"
# ONNX Runtime's CPU EP has no bf16 kernels (MatMul, Add, Mul: NOT_IMPLEMENTED on 1.32); its CUDA EP and TensorRT have.
GPU_ONLY_PRECISIONS = ("bf16",)
DEFAULT_BLOCK_SIZE = 128
# The manifest's quantization.kv_cache entry of an FP8 KV cache.
FP8_KV_CACHE_ENTRY = {
    "dtype": "float8e4m3fn",
    "scales": "per layer, one for K and one for V: the max |new_key.L| / |new_value.L| over the calibration "
              "samples (PyTorch model, calibration key above) / 448, graph initializers kv_cache.L.{key,value}_scale",
}


class DiskSpaceError(ConfigError):
    """Not enough free disk for the artifact."""


@dataclass(frozen=True)
class QuantOptions:
    """How to quantize (precision int4 / fp8), what to calibrate on, and what to evaluate on."""

    int4_algo: str = "awq"  # rtn | awq
    block_size: int | None = None  # INT4 only; None = 128
    calib_data: Path | None = None  # None: the embedded corpus (calib/corpus.py)
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    calib_cache: Path | None = None  # None: calib.calibrate.default_cache_path (under ~/.cache)
    eval_data: Path | None = None  # None: the embedded corpus's held-out slice
    report: bool = True
    quantize_lm_head: bool = False  # lm_head like every linear (INT4 / FP8)
    float_embeddings: bool = False  # INT4 on ONNX Runtime: keep the token embedding and lm_head in float (spec_for)
    amax_percentile: float | None = None  # FP8 activation scales: this percentile of |x| instead of the max
    kv_cache_dtype: str | None = None  # "fp8": FP8 E4M3 KV cache with calibrated per-layer scales

    def __post_init__(self) -> None:
        optional_path, optional_integer = (PATH + NONE, "a path or None"), (INTEGER + NONE, "an integer or None")
        check_types("QuantOptions", {
            "int4_algo": (TEXT, "a str"), "block_size": optional_integer, "calib_data": optional_path,
            "calib_samples": optional_integer, "calib_seq_len": optional_integer, "calib_cache": optional_path,
            "eval_data": optional_path, "report": (FLAG, "True or False"), "quantize_lm_head": (FLAG, "True or False"),
            "float_embeddings": (FLAG, "True or False"), "amax_percentile": (NUMBER + NONE, "a number or None"),
            "kv_cache_dtype": (TEXT + NONE, "a str or None")}, vars(self))
        for name in ("calib_data", "calib_cache", "eval_data"):  # a str path works as the CLI's Path does
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))

    def check(self, precision: str) -> None:
        """Raise on an option that does not apply to `precision`, contradicts another, or is unsupported."""
        if self.int4_algo not in ("rtn", "awq"):
            raise CalibrationError(f"--int4-algo {self.int4_algo!r} is unknown; choose rtn or awq")
        if self.calib_cache is not None and self.calib_cache.is_dir():  # found after the calibration had run
            raise CalibrationError(f"--calib-cache {self.calib_cache}: is a directory; give the cache file's path, e.g. "
                                   f"{self.calib_cache / 'calib.safetensors'}")
        if self.calib_cache is not None and self.needs_calibration(precision):  # written once it has run (hours)
            check_cache_writable(self.calib_cache)
        if self.eval_data is not None and not self.report:
            raise ConfigError("--eval-data is what the accuracy report evaluates on, and --no-report skips it: drop one")
        if self.float_embeddings and self.quantize_lm_head:
            raise ConfigError("--float-embeddings keeps the embedding and lm_head in float, --quantize-lm-head "
                              "quantizes lm_head: choose one")
        if self.kv_cache_dtype not in (None, "fp8"):
            raise CalibrationError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is unknown; choose fp8 (or drop it: the "
                                   "cache then has the activations' float type)")
        if precision not in QUANTIZED_PRECISIONS:
            for flag, given, applies in (
                ("--int4-algo / --block-size", self.int4_algo != QuantOptions.int4_algo or self.block_size is not None,
                 "int4 only"),
                ("--calib-percentile", self.amax_percentile is not None, "fp8 only"),
                ("--kv-cache-dtype", self.kv_cache_dtype is not None, "fp8 / int4 (calibrated scales)"),
                ("--quantize-lm-head", self.quantize_lm_head, "int4 / fp8"),
                ("--float-embeddings", self.float_embeddings, "int4"),
            ):
                if given:
                    raise ConfigError(f"{flag} applies to --precision {applies} (got --precision {precision})")
            return
        if self.float_embeddings and precision != "int4":  # fp8 keeps both in float anyway
            raise ConfigError("--float-embeddings applies to --precision int4 (fp8 keeps the token embedding and "
                              "lm_head in float already); drop it")
        if precision == "int4":
            if self.amax_percentile is not None:
                raise CalibrationError("--calib-percentile sets FP8 activation scales; int4 is weight-only: drop it")
            problem = block_size_problem(self.block)
            if problem is not None:
                raise CalibrationError(problem)
            return
        if self.block_size is not None:
            raise CalibrationError(f"--block-size {self.block_size} applies to --precision int4 only ({precision} uses "
                                   "per-tensor scales); drop it")
        if self.amax_percentile is not None and not 50 < self.amax_percentile <= 100:
            raise CalibrationError(f"--calib-percentile {self.amax_percentile}: give a percentile in (50, 100], e.g. 99.99")

    @property
    def block(self) -> int:
        return DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size  # 0 is refused, not the default

    def awq(self, precision: str) -> bool:
        return precision == "int4" and self.int4_algo == "awq"

    def spec_for(self, precision: str, target: str) -> QuantSpec:
        """The passes' QuantSpec. INT4 on ONNX Runtime quantizes lm_head to 8-bit blockwise and the token embedding to
        4-bit blockwise unless float_embeddings (TensorRT has no blockwise 8-bit GEMM or quantized gather in these
        graphs: both stay float there unless --quantize-lm-head)."""
        lowered = precision == "int4" and target == "onnxruntime" and not self.float_embeddings
        return QuantSpec(precision, self.block, self.quantize_lm_head,
                         lm_head_bits=8 if lowered and not self.quantize_lm_head else None,
                         embedding_bits=4 if lowered else None)

    def unused_calibration(self, precision: str) -> str | None:
        """The note for calibration settings given where nothing calibrates: not refused (a script may pass the same
        settings to every precision), not silently ignored either."""
        given = [flag for flag, value in (("--calib-data", self.calib_data), ("--calib-samples", self.calib_samples),
                                          ("--calib-seq-len", self.calib_seq_len), ("--calib-cache", self.calib_cache))
                 if value is not None]
        if not given or self.needs_calibration(precision):
            return None
        return (f"{' / '.join(given)}: not used, --precision {precision}{' --int4-algo rtn' if precision == 'int4' else ''} "
                "calibrates nothing (int4 with AWQ, fp8 and --kv-cache-dtype fp8 do)")

    def needs_calibration(self, precision: str) -> bool:
        return precision == "fp8" or self.awq(precision) or (precision in QUANTIZED_PRECISIONS and self.kv_cache_dtype == "fp8")


@dataclass
class ExportResult:
    manifest: dict[str, Any]
    pass_reports: dict[str, PassReport] = field(default_factory=dict)  # graph (part/graph when partitioned) → report
    accuracy_report: dict[str, Any] | None = None
    calibration: Calibration | None = None
    engine_line: str | None = None  # the TensorRT engine build's last line (api.export_model, tensorrt target)


def export(
    out: str | Path,
    source: WeightSource,
    precision: str = "fp32",
    target: str = "onnxruntime",
    quant: QuantOptions = QuantOptions(),
    parts: int = 1,
    max_prefill: int = DEFAULT_MAX_PREFILL,
    optimize: bool = True,
    trt_plugin: bool = True,
    show_progress: bool = True,
    vision_precision: str | None = None,
    verify_tolerance: float | None = None,
    trace_cache: bool = True,
) -> ExportResult:
    """Export `source` to the artifact directory `out` (see the module docstring); returns what was written.
    vision_precision: the vision tower's (a multimodal source only); None: vision_precision_for's default.
    verify_tolerance: check every graph pass on ONNX Runtime to this tolerance (`passes --verify`; what a rebuild of
    such an artifact replays). trace_cache: False traces anew, reading and writing no trace cache (rebuild)."""
    out = replaceable_directory(out)
    config = source.config
    return_large_frees_to_the_os()
    note(pin_cpu_numerics(), show_progress)
    check_replaceable(out, "--out")
    check_precision(precision, target)
    if target == "onnxruntime" and config.head_dim % 8:  # its kernel refuses to run, at the first token
        where = "the model" if source.checkpoint is None else Path(source.checkpoint) / "config.json"
        raise ConfigError(f"{where}: head_dim {config.head_dim} is not a multiple of 8, which ONNX Runtime's "
                          "GroupQueryAttention (every artifact's attention there) requires; such a model cannot be "
                          "exported for ONNX Runtime")
    quant.check(precision)
    note(quant.unused_calibration(precision), show_progress)
    if precision == "int4" and quant.block_size is None:
        quant = dataclasses.replace(quant, block_size=default_block_size(config))
    if max_prefill < 1:
        raise ConfigError(f"--max-prefill {max_prefill}: must be at least 1")
    if parts < 1 or parts > config.num_hidden_layers:
        raise ConfigError(f"--partitions {parts}: choose 1..{config.num_hidden_layers} (the model has "
                          f"{config.num_hidden_layers} decoder layers)")
    quantized = precision in QUANTIZED_PRECISIONS
    if quantized and not optimize:
        raise ConfigError(f"--precision {precision} quantizes in the graph passes; drop --no-optimize")
    report = quant.report and optimize
    if source.checkpoint is not None:
        check_tokenizer_files(source.checkpoint)
    vision = source.vision
    vision_precision = vision_precision_for(precision, target, vision_precision, vision is not None, optimize)
    processor = None if vision is None else ImageProcessorConfig.from_directory(source.checkpoint, vision.config)
    image_token_id = None if vision is None else vision.config.image_token_id
    samples = text = None
    if quant.needs_calibration(precision):
        samples, text = calibration_samples(source, config, tokenizer_for(source, config), quant.calib_data,
                                            quant.calib_samples, quant.calib_seq_len)
        if quant.awq(precision):
            check_awq_memory(config, *samples.shape)
    if report:
        held_out = evaluation_tokens(source, quant.eval_data)
    spec = quant.spec_for(precision, target) if quantized else None
    if source.checkpoint is not None:  # after the refusals above (calibration without a tokenizer is one of them)
        note(missing_tokenizer_note(source.checkpoint), show_progress)
    note(remove_abandoned_beside(out), show_progress)  # before the disk check: they may be what fills the disk
    check_disk_space(out, required_disk_bytes(config, precision, optimize, target, spec) +
                     (0 if vision is None else
                      vision_parameter_count(vision.config) * graph_dtype(vision_precision, target).itemsize * 2))
    ranges = [range(config.num_hidden_layers)] if parts == 1 else partition_layers(config, parts, precision)
    layout = kv_layout_for(target, quant)

    with (held_directory(writable_parent(out.resolve()), f".{out.name}.work-") as work, Steps(show_progress) as step,
          atomic_directory(out) as tmp):
        calibration = None
        weights = source
        if samples is not None:
            what = f"{samples.shape[0]} × {samples.shape[1]} tokens" + (f", AWQ block {quant.block}" if quant.awq(precision) else "")
            with step(f"calibrate layer by layer on {what}"):
                calibration = calibrate(source, samples, text, quant.calib_cache,
                                        quant.block if quant.awq(precision) else None, scratch=work / "grams")
            if quant.awq(precision):
                weights = AwqWeights(source, calibration.awq_plans)
            if precision == "fp8":
                spec.activation_amax = activation_amax(calibration.stats, sorted(source.shapes), quant.amax_percentile)
            if quant.kv_cache_dtype == "fp8":
                spec.kv_cache_amax = kv_cache_amax(calibration.stats, config.num_hidden_layers)
        result = ExportResult({}, calibration=calibration)
        entries, opsets = [], []
        for k, layers in enumerate(ranges):
            part_dir = tmp if parts == 1 else tmp / part_directory(k)
            part_dir.mkdir(exist_ok=True)
            what = "" if parts == 1 else f"part {k} (layers {layers.start}–{layers.stop - 1}): "
            traced = work / f"traced{k}" if optimize else part_dir
            traced.mkdir(exist_ok=True)
            counted = f"{len(layers)} layer" + ("s" if len(layers) != 1 else "")
            with step(f"{what}trace decode + prefill ({counted}, weights on the meta device)") as outcome:
                graphs, cached = traced_graphs(config, graph_dtype(precision, target), layers, layout, image_token_id,
                                               trace_cache)
                outcome.note = ", from the trace cache" if cached else ""
            with step(f"{what}write graphs with weights from {weights.describe()}"):
                write_graphs(graphs, traced, weight_content(weights, defer_experts=quantized))
                del graphs
                for graph in GRAPHS:
                    onnx.checker.check_model(str(traced / graph.file))  # the path form checks the external data too
            graph_entries = graphs_manifest(max_prefill)
            entry = _base_manifest(config, source, precision, target, max_prefill, graph_entries, layout)
            if optimize:
                verify = verify_tolerance is not None
                reports, opset = optimize_graphs(traced, graph_entries, part_dir, target, step, trt_plugin, spec, verify,
                                                 verify_tolerance if verify else DEFAULT_TOLERANCE,
                                                 weights=weights if quantized else None,  # the deferred experts
                                                 attention_chunk=config.attention_chunk_size)
                shutil.rmtree(traced)
                entry = optimized_manifest(entry, target, reports, opset, verify, verify_tolerance)
                result.pass_reports.update({(name if parts == 1 else f"part{k}/{name}"): r for name, r in reports.items()})
            if parts > 1:
                write_manifest(part_dir, {**entry, "layers": [layers.start, layers.stop],
                                          "tokenizer": {"source": "none", "files": []}})
                entries.append({"layers": [layers.start, layers.stop], "directory": part_directory(k)})
                opsets.append(entry["opset"])
        if parts > 1:  # the graphs live in the parts: their opset (the passes raise it), and no weights file here
            manifest = {**_base_manifest(config, source, precision, target, max_prefill, {}, layout),
                        "partitions": entries, "target": target if optimize else "onnxruntime", "opset": max(opsets)}
            del manifest["external_data"]
        else:
            manifest = entry
        if vision is not None:
            with step(f"trace + write the vision encoder ({vision.config.num_hidden_layers} layers, {vision_precision})"):
                manifest["vision"] = write_vision_graph(vision, processor, vision_precision, tmp,
                                                        work if optimize else None, target, trt_plugin, quant.block,
                                                        trace_cache)
        with step("write tokenizer files"):
            manifest["tokenizer"] = _tokenizer_files(source, config, tmp)
        manifest.update(_quantization_entries(precision, quant, calibration, spec))
        result.manifest = write_manifest(tmp, manifest)
        if report:
            with step("accuracy report (the artifact on ONNX Runtime vs the source's fp32 PyTorch model)"):
                result.accuracy_report = accuracy_report(tmp, source, *held_out)
            write_json(tmp / REPORT_FILE, result.accuracy_report)
            result.manifest = write_manifest(tmp, {k: v for k, v in result.manifest.items() if k != "files"})
    return result


def write_vision_graph(vision: VisionWeights, processor: ImageProcessorConfig, precision: str, directory: Path,
                       work: Path | None, target: str, trt_plugin: bool = True,
                       block: int = DEFAULT_BLOCK_SIZE, trace_cache: bool = True) -> dict[str, Any]:
    """vision.onnx + its data file in `directory`; returns the manifest's `vision` entry: what the runtime needs to
    turn images into the prefill's image_features. work: trace into it and run the graph passes for `target` into
    `directory` (None: --no-optimize, the traced graph as it is); int4 / fp8 trace graph_dtype's float type and
    quantize the encoder layers' linears there (quantize.QuantSpec.bits), the patch embedding, adapter and projector
    stay in that type. trace_cache: as export's."""
    traced = directory if work is None else work / "vision"
    traced.mkdir(exist_ok=True)
    dtype = graph_dtype(precision, target)
    write_graphs({"vision": trace_vision(vision.config, dtype, trace_cache)}, traced, weight_content(vision),
                 VISION_DATA_FILE)
    onnx.checker.check_model(str(traced / VISION_FILE))
    entry = {"file": VISION_FILE, "external_data": VISION_DATA_FILE, "precision": precision,
             "dtype": str(dtype).removeprefix("torch."), "config": vision.config.to_dict(),
             "processor": processor.to_dict()}
    if work is None:
        return entry
    spec = QuantSpec(precision, vision_block_size(vision.config, block)) if precision in QUANTIZED_PRECISIONS else None
    reports, _ = optimize_graphs(traced, {"vision": {"file": VISION_FILE}}, directory, target, Steps.silent, trt_plugin, spec,
                                 data_file=VISION_DATA_FILE, passes_file=VISION_PASSES_FILE)
    shutil.rmtree(traced)
    if spec is not None:
        entry["block_size"] = spec.block_size if precision == "int4" else None
    entry["graph_passes"] = {"target": target, "report": VISION_PASSES_FILE,
                             "passes": [r.name for r in reports["vision"].records]}
    return entry


def graph_dtype(precision: str, target: str) -> torch.dtype:
    """The float type the graphs compute in (activations, unquantized weights, scales, KV cache): the precision's own;
    int4 / fp8 trace fp32 graphs for ONNX Runtime (its CPU kernels: MatMulNBits, QMoE, fp8 emulation) and fp16 for
    TensorRT, whose strongly typed networks compute in the graph's types (W4A16 / FP8 with 16-bit activations)."""
    if precision in QUANTIZED_PRECISIONS and target == "tensorrt":
        return torch.float16
    return PRECISIONS[precision]


def vision_precision_for(precision: str, target: str, vision_precision: str | None, has_vision: bool,
                         optimize: bool = True) -> str:
    """The vision tower's precision: `vision_precision` when given (checked as --precision is), else the text's float
    type, and for int4 / fp8 text fp32 on ONNX Runtime (the tower is 0.8 % of Scout's weights and runs once per image:
    exact is cheap) and fp16 on TensorRT (the GPU's half-precision kernels; accuracy: BENCHMARKS.md)."""
    if vision_precision is None:
        if precision not in QUANTIZED_PRECISIONS:
            return precision
        return "fp16" if target == "tensorrt" else "fp32"
    if not has_vision:
        raise ConfigError(f"--vision-precision {vision_precision}: this model has no vision tower (no vision_config); "
                          "drop it")
    check_precision(vision_precision, target, "--vision-precision")
    if vision_precision in QUANTIZED_PRECISIONS and not optimize:
        raise ConfigError(f"--vision-precision {vision_precision} quantizes in the graph passes; drop --no-optimize")
    return vision_precision


def kv_layout_for(target: str, quant: QuantOptions) -> str:
    """How the graphs hand over the KV cache (model/io_spec.py): in place through ONNX Runtime's GroupQueryAttention,
    which appends to the cache buffers itself — except for TensorRT, whose lowering keeps its own attention, and for
    an FP8 cache, which the op cannot read."""
    return "positions" if target == "tensorrt" or quant.kv_cache_dtype == "fp8" else "in_place"


def part_directory(index: int) -> str:
    return f"part{index}"


def graphs_manifest(max_prefill: int) -> dict[str, dict[str, Any]]:
    return {spec.name: {"file": spec.file, "moe_impl": spec.moe_impl, "new_tokens": spec.new_tokens,  # null: dynamic
                        "max_new_tokens": spec.new_tokens or max_prefill} for spec in GRAPHS}


def _base_manifest(config: Llama4Config, source: WeightSource, precision: str, target: str, max_prefill: int,
                   graphs: dict[str, dict[str, Any]], kv_layout: str) -> dict[str, Any]:
    kv_dtype = str(graph_dtype(precision, target)).removeprefix("torch.")
    return {
        "model": config.to_hf_dict(),
        "source": source.manifest_entry(),
        "precision": precision,
        "target": "onnxruntime",
        "opset": OPSET,
        "external_data": DATA_FILE,
        "graphs": graphs,
        "dtypes": {"logits": "float32", "kv_cache": kv_dtype},
        "kv_layout": kv_layout,
        "tools": {"llama4_export": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _quantization_entries(precision: str, quant: QuantOptions, calibration: Calibration | None,
                          spec: QuantSpec | None) -> dict[str, Any]:
    if precision not in QUANTIZED_PRECISIONS:
        return {}
    entry: dict[str, Any] = {
        "precision": precision, "algorithm": quant.int4_algo if precision == "int4" else "max",
        "block_size": quant.block if precision == "int4" else None, "quantize_lm_head": quant.quantize_lm_head,
        "float_embeddings": quant.float_embeddings,
        "lm_head": "int4" if quant.quantize_lm_head and precision == "int4" else
                   "fp8" if quant.quantize_lm_head else f"int{spec.lm_head_bits}" if spec.lm_head_bits else "float",
        "embedding": f"int{spec.embedding_bits}" if spec.embedding_bits else "float",
        "calibration": None if calibration is None else calibration.manifest_entry(),
        "awq": None if calibration is None else calibration.awq_records,
    }
    update: dict[str, Any] = {"quantization": entry}
    if precision == "fp8":
        entry["activation_range"] = "amax" if quant.amax_percentile is None else f"percentile {quant.amax_percentile}"
    if spec.kv_cache_amax:
        entry["kv_cache"] = FP8_KV_CACHE_ENTRY
        update["dtypes"] = {"logits": "float32", "kv_cache": "float8_e4m3fn"}
    return update


def _tokenizer_files(source: WeightSource, config: Llama4Config, directory: Path) -> dict[str, Any]:
    if source.checkpoint is not None:
        entry = {"source": "checkpoint", "files": copy_tokenizer_files(source.checkpoint, directory)}
    else:
        entry = {"source": "byte-level", "files": write_byte_level_tokenizer(config, directory)}
    if "tokenizer.json" in entry["files"]:
        entry.update(write_tokenizer_graphs(directory))
    return entry


# ------------------------------------------------------------------------------------------------ checks
def check_precision(precision: str, target: str, flag: str = "--precision") -> None:
    """bf16 artifacts for onnxruntime only where this onnxruntime build has the CUDA EP (onnxruntime-gpu)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{flag} {precision!r} is not supported; choose one of: {', '.join(PRECISIONS)}")
    check_target(target, ConfigError)
    if precision in GPU_ONLY_PRECISIONS and target == "onnxruntime" and \
            "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ConfigError(f"{flag} {precision} does not run on ONNX Runtime's CPU EP (no {precision} kernels) and this "
                          f"onnxruntime has no CUDA EP: use {flag} fp32, fp16, int4 or fp8 here, or --target tensorrt")


def traced_weight_bytes(config: Llama4Config, precision: str, target: str) -> int:
    """Bytes of the traced graphs' weights, in the type they are traced in (graph_dtype: fp16 for TensorRT's int4 /
    fp8); int4 / fp8 leave the routed experts out (defer_experts: the quantization passes read them from the source)."""
    params = parameter_counts(config).total
    if precision in QUANTIZED_PRECISIONS:
        params -= len(config.moe_layers) * config.num_local_experts * 3 * config.hidden_size * config.intermediate_size
    return params * graph_dtype(precision, target).itemsize


def artifact_weight_bytes(config: Llama4Config, precision: str, target: str, spec: QuantSpec) -> int:
    """Bytes of the optimized int4 / fp8 artifact's weights (plan.layer_weight_bytes per layer, unquantized tensors
    and scales in the graphs' float type) with the embedding and lm_head as `spec` stores them: 4-bit / 8-bit blockwise
    on ONNX Runtime's int4 default, int4 / fp8 under --quantize-lm-head, else float."""
    wide = graph_dtype(precision, target)
    itemsize = wide.itemsize
    float_name = next(name for name in ("fp32", "fp16", "bf16") if PRECISIONS[name] == wide)
    layers = sum(layer_weight_bytes(config, layer, precision, spec.block_size, activation_dtype=float_name)
                 for layer in range(config.num_hidden_layers))

    def stored(count: int, bits: int | None) -> int:
        if bits is None:
            return count * itemsize
        scales = count // spec.block_size * itemsize if precision == "int4" else 4  # fp8: one fp32 scale
        return count * bits // 8 + scales

    counts = parameter_counts(config)  # a tied lm_head is stored apart from the embedding all the same
    embedding, lm_head = stored(counts.embedding, spec.embedding_bits), stored(counts.embedding, spec.bits(LM_HEAD))
    return layers + embedding + lm_head + config.hidden_size * itemsize  # + the final norm


def required_disk_bytes(config: Llama4Config, precision: str, optimize: bool, target: str,
                        spec: QuantSpec | None = None) -> int:
    """Free disk the export needs at its peak: the traced graphs' weights plus, while optimizing, the optimized copy
    beside them (fp32 on ONNX Runtime also keeps the MoE op's re-laid-out experts: count the weights twice); AWQ keeps
    its plans in the calibration cache (a clip limit per block: 4 bytes per 128 weights). `spec`: int4 / fp8's."""
    exported = traced_weight_bytes(config, precision, target)
    plans = parameter_counts(config).total * 4 // DEFAULT_BLOCK_SIZE if precision == "int4" else 0
    if not optimize:
        return exported
    # While the optimized artifact is written: the exported one, the passes' scratch file (the quantized weights;
    # INT4 experts twice: DequantizeLinear form, then the per-expert MatMulNBits form) and the new artifact.
    created = {"int4": 2 * weight_bytes(config)["int4"], "fp8": weight_bytes(config)["fp8"], "fp32": exported}.get(precision, 0)
    written = artifact_weight_bytes(config, precision, target, spec) if spec is not None else exported
    return exported + created + written + plans


def check_disk_space(out: Path, need: int) -> None:
    """Fail before any slow step when the file system holding `out` has less than `need` bytes free."""
    probe = Path(out).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise DiskSpaceError(f"{out}: the export needs about {_size(need)} free but {probe} has {_size(free)}; free "
                             "space or choose another --out")


def _size(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"  # a small export's need shows, not "0.0 GB"


def awq_memory_bytes(config: Llama4Config, samples: int, seq_len: int) -> int:
    """Memory AWQ's layer-wise search needs at its largest layer (calib/layerwise.py, awq_plans.py): the layer's
    weights but the routed experts (fp32), one routed expert twice (fp32: the one being run or searched, and the copy
    its clip search edits), the calibration hidden states three times (the residual, the shared expert's output, the
    routed experts' input), the layer's Gram matrices (float64 while accumulated + float32 result) with one routed
    expert's, and the search's temporaries (four fp32 copies of the largest weight)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q = config.num_attention_heads * d
    attention = h * (q + 2 * config.num_key_value_heads * d) + q * h

    def gram(channels: int) -> int:
        return channels * channels * (8 + 4)

    def layer(moe: bool) -> int:
        width = i if moe else config.intermediate_size_mlp
        params = attention + 3 * h * width + (config.num_local_experts * h if moe else 0)
        grams = gram(h) * 2 + gram(q) + gram(width) + (gram(h) + gram(i) if moe else 0)
        expert = 2 * 3 * h * i * 4 if moe else 0
        largest = max(2 * i * h, width * h, q * h)
        return 4 * params + grams + expert + 4 * 4 * largest

    states = 3 * samples * seq_len * h * 4
    return states + max(layer(j in config.moe_layers) for j in range(config.num_hidden_layers))


def return_large_frees_to_the_os() -> None:
    """Layer-wise work allocates and frees the same large temporaries (a sample's activations, an expert) thousands of
    times. glibc's malloc raises its mmap threshold every time it frees a large block, so those temporaries end up in
    its heap and peak RSS measures fragmentation rather than live data; pinning the threshold at 1 MiB keeps large
    blocks in their own mappings, returned to the OS when freed. A no-op where libc is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


# Read once per process, before torch runs its first kernel. Calibration and the accuracy report compute in fp32 with
# torch on the CPU, whose bits otherwise depend on the thread count (MKL splits a small GEMM's reduction differently)
# and on the vector ISA the CPU offers (MKL's code path, ATen's kernels): calibrated weights and report.json would
# then not rebuild identically on a machine with another core count or another CPU. MKL's strict conditional
# numerical reproducibility mode on its AVX2 path and ATen at AVX2 give the same bits on every x86-64 CPU with AVX2,
# at any thread count (and measured no slower here).
REPRODUCIBLE_CPU_NUMERICS = {"MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2"}


def pin_cpu_numerics() -> str | None:
    """Set REPRODUCIBLE_CPU_NUMERICS where the environment does not choose otherwise. None when this process's torch
    computes with them (or as the environment chose); else a note: torch had already run kernels in this process."""
    for name, value in REPRODUCIBLE_CPU_NUMERICS.items():
        os.environ.setdefault(name, value)
    chosen, in_use = os.environ["ATEN_CPU_CAPABILITY"].upper(), torch.backends.cpu.get_cpu_capability()
    if in_use == chosen or not in_use.startswith("AVX512"):  # the pin, or a CPU it does not apply to (no AVX-512)
        return None
    return (f"note: torch had already run kernels in this process (at {in_use}, not {chosen}), so calibrated weights "
            "and report.json are reproducible only on machines like this one at this thread count; export in a fresh "
            "process (as llama4-export does) for bytes any machine rebuilds")


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_awq_memory(config: Llama4Config, samples: int, seq_len: int) -> None:
    """Fail before any slow step when AWQ's search of one layer cannot fit in the memory available now."""
    need, have = awq_memory_bytes(config, samples, seq_len), available_memory()
    if need > have:
        raise ConfigError(f"--int4-algo awq: the scale search needs about {need / 1e9:,.1f} GB for one layer "
                          f"({samples} × {seq_len} calibration tokens) but {have / 1e9:,.1f} GB are available; lower "
                          "--calib-samples, use --int4-algo rtn, or a machine with more memory")
