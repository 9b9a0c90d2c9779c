"""`export_artifact`: a preset or checkpoint → an artifact directory (DESIGN.md §2) for ONNX Runtime.

out/
  decode.onnx, prefill.onnx   the two graphs (io_spec interface), both pointing into
  model.data                  one external-data file: every weight stored once
  tokenizer.json, tokenizer_config.json, generation_config.json
  manifest.json               config, source, precision, graphs, tool versions, sha256 of every file

The directory is written beside `out` and renamed into place when complete. An existing `out` is replaced only if
it is empty or a previous artifact (it has manifest.json), so a mistyped --out never deletes unrelated files.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import onnx
import onnxruntime
import onnxscript
import torch

from .. import __version__
from ..artifact import MANIFEST, ArtifactError, atomic_directory, sha256_file, write_manifest
from ..errors import ConfigError
from ..model.config import get_preset
from ..model.loader import INDEX_FILE, check_checkpoint, from_preset, load
from ..model.modeling import Llama4ForCausalLM
from . import onnx_export
from .tokenizer_files import copy_tokenizer_files, special_token_ids, write_byte_level_tokenizer

TARGET = "onnxruntime"
DEFAULT_MAX_PREFILL = 512
# The dtype the PyTorch model is exported in. Quantized precisions (int4, fp8) export fp32 graphs and quantize their
# weights in the graph passes (export_quantized, graph_passes/quantize.py).
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                                      "int4": torch.float32, "fp8": torch.float32}
QUANTIZED_PRECISIONS = ("int4", "fp8")
# ONNX Runtime's CPU EP has no bf16 kernels (MatMul, Add, Mul: NOT_IMPLEMENTED on 1.32); its CUDA EP and TensorRT have.
GPU_ONLY_PRECISIONS = ("bf16",)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a preset with seeded random weights, or a Hugging Face checkpoint directory."""

    preset: str | None = None
    seed: int = 0
    checkpoint: Path | None = None

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.checkpoint is None):
            raise ConfigError("give exactly one model source: a preset name (--model) or a checkpoint directory (--checkpoint)")

    def describe(self) -> str:
        return f"preset {self.preset} (seed {self.seed})" if self.preset else f"checkpoint {self.checkpoint}"

    def load(self, dtype: torch.dtype) -> Llama4ForCausalLM:
        if self.preset is not None:
            return from_preset(self.preset, seed=self.seed, dtype=dtype)
        return load(self.checkpoint, dtype=dtype)

    def manifest_entry(self) -> dict[str, Any]:
        """What identifies the weights: preset + seed, or the checkpoint's name and the sha256 of the files we read.
        The directory's name only, not its path, so the same checkpoint gives the same manifest on any machine."""
        if self.preset is not None:
            return {"preset": self.preset, "seed": self.seed}
        ckpt = Path(self.checkpoint)
        files = [ckpt / "config.json", *([ckpt / INDEX_FILE] if (ckpt / INDEX_FILE).is_file() else []), *sorted(ckpt.glob("*.safetensors"))]
        return {"checkpoint": ckpt.name, "files": {f.name: sha256_file(f) for f in files}}


def export_artifact(
    out: str | Path,
    source: ModelSource,
    precision: str = "fp32",
    max_prefill: int = DEFAULT_MAX_PREFILL,
    show_progress: bool = True,
    model: Llama4ForCausalLM | None = None,
) -> dict[str, Any]:
    """Export decode + prefill graphs, weights, tokenizer and manifest to `out`; return the manifest.

    model: export this (already loaded, e.g. AWQ-scaled) model instead of loading `source`."""
    out = Path(out)
    dtype = _check_arguments(out, source, precision, max_prefill)
    if precision in QUANTIZED_PRECISIONS and model is None:
        raise ConfigError(f"precision {precision} needs calibration and the graph passes: use export_quantized")
    with _Steps(show_progress) as step:
        if model is None:
            with step(f"load {source.describe()} ({precision})"):
                model = source.load(dtype)
        graphs = {}
        for spec in onnx_export.GRAPHS:
            with step(f"export {spec.name} graph (MoE: {spec.moe_impl})"):
                graphs[spec.name] = onnx_export.export_graph(model, spec)
        with atomic_directory(out) as tmp:
            with step(f"write {', '.join(s.file for s in onnx_export.GRAPHS)} and {onnx_export.DATA_FILE}"):
                onnx_export.save_graphs(graphs, tmp)
                for spec in onnx_export.GRAPHS:
                    onnx.checker.check_model(str(tmp / spec.file))  # the path form also checks the external data
            with step("write tokenizer files"):
                if source.checkpoint is not None:
                    tokenizer = {"source": "checkpoint", "files": copy_tokenizer_files(source.checkpoint, tmp)}
                else:
                    tokenizer = {"source": "byte-level", "files": write_byte_level_tokenizer(model.config, tmp)}
            with step("hash files and write manifest"):
                manifest = write_manifest(tmp, _manifest(model, source, precision, max_prefill, tokenizer))
    return manifest


def check_precision_for_target(precision: str, target: str) -> None:
    """bf16 artifacts for onnxruntime only where this onnxruntime build has the CUDA EP (onnxruntime-gpu)."""
    if precision in GPU_ONLY_PRECISIONS and target == TARGET and \
            "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ConfigError(f"--precision {precision} does not run on ONNX Runtime's CPU EP (no {precision} kernels) and this "
                          "onnxruntime has no CUDA EP: use --precision fp32, fp16, int4 or fp8 here, or --target tensorrt")


def _check_arguments(out: Path, source: ModelSource, precision: str, max_prefill: int) -> torch.dtype:
    """Fail on bad input before any slow step."""
    _check_output(out, precision, max_prefill)
    # An unknown preset, special token ids a byte-level tokenizer cannot hold, or a checkpoint that does not match
    # its config fail here, in milliseconds.
    if source.preset is not None:
        special_token_ids(get_preset(source.preset))
    else:
        check_checkpoint(source.checkpoint)
    return PRECISIONS[precision]


def _check_output(out: Path, precision: str, max_prefill: int) -> None:
    """The checks that do not depend on the model source (export/streaming.py shares them)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not supported; choose one of: {', '.join(PRECISIONS)}")
    if max_prefill < 1:
        raise ConfigError(f"max prefill tokens {max_prefill} must be at least 1")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ArtifactError(f"{out}: directory is not empty and is not a llama4-export artifact; choose another --out or empty it")


def _manifest(model: Llama4ForCausalLM, source: ModelSource, precision: str, max_prefill: int, tokenizer: dict) -> dict[str, Any]:
    kv_dtype = str(PRECISIONS[precision]).removeprefix("torch.")  # quantized precisions keep an fp32 cache
    return {
        "model": model.config.to_hf_dict(),
        "source": source.manifest_entry(),
        "precision": precision,
        "target": TARGET,
        "opset": onnx_export.OPSET,
        "external_data": onnx_export.DATA_FILE,
        "graphs": {
            spec.name: {
                "file": spec.file,
                "moe_impl": spec.moe_impl,
                "new_tokens": spec.new_tokens,  # null: dynamic
                "max_new_tokens": spec.new_tokens or max_prefill,
            }
            for spec in onnx_export.GRAPHS
        },
        "dtypes": {"logits": "float32", "kv_cache": kv_dtype},
        "tokenizer": tokenizer,
        "tools": {
            "llama4_export": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


class _Steps:
    """Named steps with a spinner and elapsed time each (rich), or silence."""

    def __init__(self, show: bool):
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), TimeElapsedColumn(),
            console=Console(stderr=True), disable=not show,
        )

    def __enter__(self):
        self._progress.__enter__()
        return self.step

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        task = self._progress.add_task(description, total=1)
        try:
            yield
        except BaseException:
            self._progress.remove_task(task)  # the error message says what failed; no spinner left behind
            raise
        self._progress.update(task, completed=1)


# The manifest's quantization.kv_cache entry of an FP8 KV cache (both the in-memory and the streamed export).
FP8_KV_CACHE_ENTRY = {
    "dtype": "float8e4m3fn",
    "scales": "per layer, one for K and one for V: the max |new_key.L| / |new_value.L| over the calibration "
              "samples (PyTorch model, calibration key above) / 448, graph initializers kv_cache.L.{key,value}_scale",
}


@dataclass(frozen=True)
class QuantOptions:
    """How to quantize (precision int4 / fp8) and what to calibrate and evaluate on."""

    int4_algo: str = "awq"  # rtn | awq
    block_size: int | None = None  # INT4 only; None = 128
    calib_data: Path | None = None  # None: the embedded corpus (calib/corpus.py)
    calib_samples: int | None = None
    calib_seq_len: int | None = None
    calib_cache: Path | None = None  # None: calib.calibrate.default_cache_path (under ~/.cache)
    eval_data: Path | None = None  # None: the embedded corpus's held-out slice
    report: bool = True
    quantize_lm_head: bool = False
    amax_percentile: float | None = None  # FP8 activation scales: this percentile of |x| instead of the max
    kv_cache_dtype: str | None = None  # "fp8": FP8 E4M3 KV cache with calibrated per-layer scales; None: the graph's float type

    def check(self, precision: str) -> int:
        """The block size to use; raises on an unsupported combination."""
        from ..calib.corpus import CalibrationError
        from ..graph_passes.quantize import BLOCK_SIZES

        if self.int4_algo not in ("rtn", "awq"):
            raise CalibrationError(f"--int4-algo {self.int4_algo!r} is unknown; choose rtn or awq")
        if self.kv_cache_dtype not in (None, "fp8"):
            raise CalibrationError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is unknown; choose fp8 (or drop it: the cache "
                                   "then has the activations' float type)")
        if precision == "int4":
            block = self.block_size or 128
            if self.amax_percentile is not None:
                raise CalibrationError("--calib-percentile sets FP8 activation scales; int4 is weight-only: drop it")
            if block not in BLOCK_SIZES:
                raise CalibrationError(f"--block-size {block} is not supported for int4; choose one of: "
                                       f"{', '.join(map(str, BLOCK_SIZES))}")
            return block
        if self.block_size is not None:
            raise CalibrationError(f"--block-size {self.block_size} applies to --precision int4 only ({precision} "
                                   "uses per-tensor scales); drop it")
        if self.amax_percentile is not None and not 50 < self.amax_percentile <= 100:
            raise CalibrationError(f"--calib-percentile {self.amax_percentile}: give a percentile in (50, 100], e.g. 99.99")
        return 0

    def needs_calibration(self, precision: str) -> bool:
        return precision == "fp8" or self.int4_algo == "awq" or self.kv_cache_dtype == "fp8"


def export_quantized(
    out: str | Path,
    source: ModelSource,
    precision: str,
    options: QuantOptions = QuantOptions(),
    target: str = TARGET,
    trt_plugin: bool = True,
    max_prefill: int = DEFAULT_MAX_PREFILL,
    show_progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None, Any]:
    """int4 / fp8: calibrate (cache-aware) → AWQ-scale (int4 awq) → export fp32 graphs → graph passes with the
    quantization passes → accuracy report vs the unquantized PyTorch model.
    Returns (manifest, report or None, calib.calibrate.Calibration or None (RTN needs none))."""
    from ..artifact import write_json
    from ..calib.calibrate import activation_amax, calibrate, calibration_samples, tokenizer_for
    from ..calib.corpus import load_corpus
    from ..graph_passes import optimize_artifact
    from ..graph_passes.quantize import QuantSpec

    out = Path(out)
    if precision not in QUANTIZED_PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not a quantized precision; choose int4 or fp8")
    block = options.check(precision)
    _check_arguments(out, source, precision, max_prefill)
    algo = options.int4_algo if precision == "int4" else "max"
    # Bad calibration / evaluation text fails here, before any slow step.
    config = get_preset(source.preset) if source.preset is not None else check_checkpoint(source.checkpoint).config
    tokenizer = tokenizer_for(source, config) if options.needs_calibration(precision) or options.report else None
    if options.needs_calibration(precision):
        samples, calib_text = calibration_samples(source, config, tokenizer, options.calib_data, options.calib_samples,
                                                  options.calib_seq_len)
    if options.report:
        load_corpus(options.eval_data, "heldout")
    with _Steps(show_progress) as step:
        with step(f"load {source.describe()} (fp32, to quantize to {precision})"):
            model = source.load(torch.float32)
        calibration, awq_records = None, None
        if options.needs_calibration(precision):
            with step(f"calibrate on {samples.shape[0]} × {samples.shape[1]} tokens (statistics for AWQ / FP8 scales)"):
                calibration = calibrate(model, source, samples, calib_text, options.calib_cache)
        if precision == "int4" and options.int4_algo == "awq":
            with step(f"AWQ scale search (block {block})"):
                from ..calib.awq import apply_awq

                awq_records = apply_awq(model, calibration.stats, block)
    export_artifact(out, source, precision, max_prefill, show_progress, model=model)
    del model
    spec = QuantSpec(precision, block or 128, options.quantize_lm_head)
    if precision == "fp8":
        weight_names = _linear_weight_names(out)
        spec.activation_amax = activation_amax(calibration.stats, weight_names, options.amax_percentile)
    manifest_update = {"precision": precision}
    if options.kv_cache_dtype == "fp8":
        from ..calib.stats import kv_cache_amax

        spec.kv_cache_amax = kv_cache_amax(calibration.stats, config.num_hidden_layers)
        manifest_update["dtypes"] = {"logits": "float32", "kv_cache": "float8_e4m3fn"}
    quant_entry = {
        "precision": precision, "algorithm": algo, "block_size": block or None,
        "quantize_lm_head": options.quantize_lm_head,
        "calibration": None if calibration is None else {
            "key": calibration.key, **calibration.settings},
        "awq": awq_records,
    }
    if precision == "fp8":
        quant_entry["activation_range"] = "amax" if options.amax_percentile is None else f"percentile {options.amax_percentile}"
    if spec.kv_cache_amax:
        quant_entry["kv_cache"] = FP8_KV_CACHE_ENTRY
    manifest, _ = optimize_artifact(out, target, trt_plugin=trt_plugin, show_progress=show_progress,
                                    quantization=spec, manifest_update={**manifest_update, "quantization": quant_entry})
    report = None
    if options.report:
        from ..calib.report import REPORT_FILE, accuracy_report

        with _Steps(show_progress) as step:
            with step("accuracy report (quantized artifact on ONNX Runtime vs the fp32 PyTorch model)"):
                report = accuracy_report(out, source.load(torch.float32), tokenizer, options.eval_data)
        write_json(out / REPORT_FILE, report)
        manifest = write_manifest(out, {k: v for k, v in manifest.items() if k != "files"})
    return manifest, report, calibration


def _linear_weight_names(directory: Path) -> list[str]:
    """Initializer names of the exported graphs (FP8 looks their activation amax up by name)."""
    names = set()
    for spec in onnx_export.GRAPHS:
        proto = onnx.load(str(directory / spec.file), load_external_data=False)
        names.update(init.name for init in proto.graph.initializer)
    return sorted(names)
