"""`export_model`: the whole `llama4-export` job as one Python call — which path a request takes (in memory, layer
streaming, partitions, quantized), the export, the graph passes and the TensorRT engines. cli.py only parses options
and prints what comes back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class EngineOptions:
    """TensorRT engine build after a --target tensorrt export (build/engine.py maybe_build_engines)."""

    require_engine: bool = False
    max_batch: int = 1
    window: int | None = None
    timing_cache: Path | None = None
    reproducible: bool = False

    def given(self) -> list[str]:
        flags = {"--require-engine": self.require_engine, "--max-batch": self.max_batch != 1,
                 "--window": self.window is not None, "--timing-cache": self.timing_cache is not None,
                 "--reproducible": self.reproducible}
        return [name for name, set_ in flags.items() if set_]


@dataclass
class ExportResult:
    manifest: dict[str, Any]
    pass_reports: dict[str, Any] | None = None  # graph name -> graph_passes PassReport (None: not optimized here)
    accuracy_report: dict[str, Any] | None = None  # int4 / fp8 with the report
    calibration: Any = None  # calib.calibrate.Calibration of an in-memory quantized export
    engine_line: str | None = None  # maybe_build_engines' last line (tensorrt target)


def weight_source(model: str | None, checkpoint: Path | None, seed: int, stream: bool, random_weights: bool,
                  layers: int | None):
    """The weight source of a layer-streaming export (export/streaming.py), or None for the in-memory path."""
    from .streaming import FULL_SIZE_SOURCES, CheckpointWeights, RandomWeights, full_size_weights_hint

    if random_weights:
        if model is None or checkpoint is not None:
            raise ConfigError("--random-weights needs --model PRESET and no --checkpoint")
        return RandomWeights(model, seed, layers)
    if model in FULL_SIZE_SOURCES and checkpoint is not None:
        return CheckpointWeights(checkpoint, preset=model, layers=layers)  # checked against the preset's shapes
    if layers is not None:
        raise ConfigError("--layers N applies to --random-weights, or to --model scout|maverick with --checkpoint DIR")
    if model in FULL_SIZE_SOURCES:
        raise ConfigError(full_size_weights_hint(model))
    if stream and (model or checkpoint):
        return CheckpointWeights(checkpoint) if checkpoint is not None else RandomWeights(model, seed)
    return None


def export_model(
    out: Path,
    model: str | None = None,
    checkpoint: Path | None = None,
    seed: int = 0,
    precision: str = "fp32",
    target: str | None = None,
    optimize: bool = True,
    trt_plugin: bool = True,
    quant=None,
    max_prefill: int | None = None,
    stream: bool = False,
    random_weights: bool = False,
    layers: int | None = None,
    partitions: int = 1,
    engines: EngineOptions = EngineOptions(),
) -> ExportResult:
    """Export, optimize for `target` and (tensorrt) build engines. quant: export.pipeline.QuantOptions (int4 / fp8)."""
    from ..build import maybe_build_engines, require_tensorrt
    from ..graph_passes import optimize_artifact, passes_for
    from ..graph_passes.pipeline import default_target
    from .pipeline import QUANTIZED_PRECISIONS, ModelSource, QuantOptions, check_precision_for_target, export_artifact
    from .pipeline import export_quantized

    quant = quant or QuantOptions()
    if target is not None:
        passes_for(target)  # an unknown target fails before the export
    target = target or default_target()
    check_precision_for_target(precision, target)
    build = target == "tensorrt" and optimize
    if not build and engines.given():
        raise ConfigError(f"{', '.join(engines.given())}: engine options apply to --target tensorrt without --no-optimize")
    require_tensorrt(engines.require_engine)
    streamed = weight_source(model, checkpoint, seed, stream, random_weights, layers)
    source = None if streamed is not None else ModelSource(preset=model, seed=seed, checkpoint=checkpoint)
    limits = {} if max_prefill is None else {"max_prefill": max_prefill}
    if precision not in QUANTIZED_PRECISIONS:
        _refuse_quantization_options(precision, quant)
    if partitions != 1:
        from .partitions import export_partitioned

        if streamed is not None or precision in QUANTIZED_PRECISIONS:
            raise ConfigError("--partitions N supports fp32 / fp16 in-memory exports for now (no --stream, "
                              "--random-weights, int4 or fp8)")
        result = ExportResult(export_partitioned(out, source, partitions, precision, target=target, optimize=optimize,
                                                 trt_plugin=trt_plugin, **limits))
        build = False  # TensorRT engines per part are not built yet
    elif streamed is not None:
        from .streaming import export_streamed_artifact

        manifest, reports = export_streamed_artifact(
            out, streamed, precision, optimize, target, trt_plugin, quant.block_size, quant.int4_algo,
            quant.quantize_lm_head, calib_data=quant.calib_data, calib_samples=quant.calib_samples,
            calib_seq_len=quant.calib_seq_len, kv_cache_dtype=quant.kv_cache_dtype,
            calib_percentile=quant.amax_percentile, **limits)
        result = ExportResult(manifest, reports)
    elif precision in QUANTIZED_PRECISIONS:
        if not optimize:
            raise ConfigError(f"--precision {precision} quantizes in the graph passes; drop --no-optimize")
        manifest, report, calibration = export_quantized(out, source, precision, quant, target, trt_plugin, **limits)
        result = ExportResult(manifest, accuracy_report=report, calibration=calibration)
    else:
        manifest = export_artifact(out, source, precision=precision, **limits)
        result = ExportResult(manifest)
        if optimize:
            result.manifest, result.pass_reports = optimize_artifact(out, target, trt_plugin=trt_plugin)
    if build:
        result.engine_line = maybe_build_engines(out, engines.require_engine, max_batch=engines.max_batch,
                                                 window=engines.window, timing_cache=engines.timing_cache,
                                                 reproducible=engines.reproducible)
    return result


def _refuse_quantization_options(precision: str, quant) -> None:
    from .pipeline import QuantOptions

    defaults = QuantOptions()
    if quant.block_size is not None or quant.int4_algo != defaults.int4_algo:
        raise ConfigError(f"--int4-algo / --block-size apply to --precision int4 only (got --precision {precision})")
    if quant.amax_percentile is not None:
        raise ConfigError(f"--calib-percentile applies to --precision fp8 only (got --precision {precision})")
    if quant.kv_cache_dtype is not None:
        raise ConfigError(f"--kv-cache-dtype applies to --precision fp8 / int4 (calibrated scales; got --precision {precision})")
