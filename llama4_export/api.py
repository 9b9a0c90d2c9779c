"""The Python API behind both CLIs and the server: one function per job, owning validation and defaults.

    from llama4_export import api
    result = api.export_model("out/scout-int4", model="scout", checkpoint="Llama-4-Scout-17B-16E-Instruct",
                              precision="int4")
    print(result.manifest["files"], result.accuracy_report)

Jobs: export_model (any preset / checkpoint / random weights, any precision, target and partitioning, streamed or in
memory, + TensorRT engines), optimize_artifact (the graph passes on an unoptimized artifact), inspect_model,
plan_gpu_memory, bench_artifact, lint_artifact, build_engines, compare_artifact, rebuild and report_artifact (the
accuracy report of an artifact as it is; both rebuild.py). Running an
artifact is the runtime's (runtime.Generator.load); the PyTorch reference backend is evaluation.torch_backend.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifact import MANIFEST, part_of_partitioned, partition_entries, read_manifest
from .errors import FLAG, INTEGER, NONE, PATH, TEXT, ConfigError, check_types, needs_exporter
from .graph_passes.errors import GraphPassError
from .model.config import (Llama4Config, Llama4VisionConfig, checkpoint_configs, get_preset, get_vision_preset,
                           holds_weights)
from .model.io_spec import DEFAULT_MAX_PREFILL
from .model.summary import summarize
from .plan import MemoryPlan, gpu_spec, plan_memory

if TYPE_CHECKING:
    from .pipeline import ExportResult, QuantOptions
    from .weights import WeightSource

__all__ = [  # noqa: F822 (the jobs __getattr__ imports on first use)
    "EngineOptions", "ExportResult", "QuantOptions", "bench_artifact", "build_engines", "compare_artifact",
    "default_target", "export_model", "inspect_model", "lint_artifact", "optimize_artifact", "plan_gpu_memory", "rebuild",
    "report_artifact", "stored_pass_reports", "weight_source",
]


def __getattr__(name: str):
    """The jobs that need torch or onnx, imported on first use: `llama4-export --help`, `inspect --model` and `plan`
    start without them (≈ 0.2 s instead of 3), and an install without the export extra runs everything else."""
    with needs_exporter():
        return getattr(_job_module(name), name)


def _job_module(name: str):
    if name in ("ExportResult", "QuantOptions"):
        from . import pipeline as module
    elif name == "bench_artifact":
        from .evaluation import bench as module
    elif name == "compare_artifact":
        from .evaluation import compare as module
    elif name == "optimize_artifact":
        from .graph_passes import artifact_passes as module
    elif name == "default_target":
        from .graph_passes import pipeline as module
    elif name in ("rebuild", "report_artifact"):
        from . import rebuild as module
    elif name == "build_engines":
        from .tensorrt import engine as module
    elif name == "lint_artifact":
        from .tensorrt import lint as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return module


# In-memory exports (faster: the source is read once) while the fp32 model stays under this share of free memory.
IN_MEMORY_FRACTION = 0.4


@dataclass(frozen=True)
class EngineOptions:
    """TensorRT engine build after a --target tensorrt export (tensorrt/engine.py maybe_build_engines)."""

    require_engine: bool = False
    max_batch: int = 1
    window: int | None = None
    timing_cache: Path | None = None
    reproducible: bool = False

    def __post_init__(self):
        from .tensorrt.profiles import check_engine_options

        check_types("EngineOptions", {
            "require_engine": (FLAG, "True or False"), "max_batch": (INTEGER, "an integer"),
            "window": (INTEGER + NONE, "an integer or None"), "timing_cache": (PATH + NONE, "a file path or None"),
            "reproducible": (FLAG, "True or False")}, vars(self))
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
        check_engine_options(self.max_batch, self.window)

    def given(self) -> list[str]:
        flags = {"--require-engine": self.require_engine, "--max-batch": self.max_batch != 1,
                 "--window": self.window is not None, "--timing-cache": self.timing_cache is not None,
                 "--reproducible": self.reproducible}
        return [name for name, set_ in flags.items() if set_]


def weight_source(model: str | None = None, checkpoint: str | Path | None = None, seed: int = 0,
                  random_weights: bool = False, layers: int | None = None) -> WeightSource:
    """Where the weights come from: a checkpoint (checked against --model PRESET's shapes when both are given), a
    preset's seeded random weights (full-size presets only with --random-weights: they are 100+ B parameters)."""
    with needs_exporter():
        from .weights import FULL_SIZE_SOURCES, CheckpointWeights, RandomWeights, full_size_weights_hint
    if random_weights:
        if model is None or checkpoint is not None:
            raise ConfigError("--random-weights needs --model PRESET and no --checkpoint")
        return RandomWeights(model, seed, layers)
    if checkpoint is not None:
        if seed != 0:  # the seed draws a preset's random weights; a checkpoint's export was byte-identical to seed 0
            raise ConfigError(f"--seed {seed} seeds a preset's random weights; a --checkpoint has its own: drop --seed")
        if layers is not None and model is None:
            raise ConfigError("--layers N with --checkpoint needs --model PRESET (the shapes the checkpoint is checked against)")
        return CheckpointWeights(checkpoint, preset=model, layers=layers)
    if model is None:
        raise ConfigError("give --model PRESET or --checkpoint DIR (or --model PRESET --random-weights)")
    if layers is not None:
        raise ConfigError("--layers N applies to --random-weights, or to --model PRESET with --checkpoint DIR")
    if model in FULL_SIZE_SOURCES:
        raise ConfigError(full_size_weights_hint(model))
    return RandomWeights(model, seed)


def export_model(
    out: str | Path,
    model: str | None = None,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    precision: str = "fp32",
    target: str | None = None,
    optimize: bool = True,
    trt_plugin: bool = True,
    quant: QuantOptions | None = None,
    max_prefill: int | None = None,
    stream: bool = False,
    random_weights: bool = False,
    layers: int | None = None,
    partitions: int = 1,
    engines: EngineOptions = EngineOptions(),
    show_progress: bool = True,
    vision_precision: str | None = None,
    text_only: bool = False,
) -> ExportResult:
    """`llama4-export`: the weight source, the one pipeline (pipeline.export), then the TensorRT engines.

    stream: read the source layer by layer (RAM independent of the model's size) instead of loading it first; a model
    whose fp32 weights exceed IN_MEMORY_FRACTION of the free memory always streams. Both give the same bytes.
    target None: tensorrt when TensorRT is installed here, else onnxruntime. vision_precision None: the text's float
    type, or for int4 / fp8 fp32 on onnxruntime and fp16 on tensorrt (pipeline.vision_precision_for, which checks it).
    text_only: leave a multimodal source's vision tower out (the artifact is then that of a text-only checkpoint)."""
    with needs_exporter():
        from .graph_passes.pipeline import default_target
        from .pipeline import QuantOptions, available_memory, export, pin_cpu_numerics
        from .tensorrt.engine import PARTITIONED_ENGINES, maybe_build_engines, require_tensorrt
        from .weights import in_memory
    pin_cpu_numerics()  # before the source's first tensor: pipeline.export notes it if torch had run kernels before

    optional_text = (TEXT + NONE, "a str or None")
    check_types("export_model", {
        "out": (PATH, "a directory path"), "model": optional_text, "checkpoint": (PATH + NONE, "a directory path or None"),
        "seed": (INTEGER, "an integer"), "precision": (TEXT, "a str"), "target": optional_text,
        "optimize": (FLAG, "True or False"), "trt_plugin": (FLAG, "True or False"),
        "quant": ((QuantOptions, *NONE), "api.QuantOptions(...) or None"),
        "max_prefill": (INTEGER + NONE, "an integer or None"), "stream": (FLAG, "True or False"),
        "random_weights": (FLAG, "True or False"), "layers": (INTEGER + NONE, "an integer or None"),
        "partitions": (INTEGER, "an integer"), "engines": ((EngineOptions,), "api.EngineOptions(...)"),
        "show_progress": (FLAG, "True or False"), "vision_precision": optional_text,
        "text_only": (FLAG, "True or False"),
    }, locals())
    if text_only and vision_precision is not None:
        raise ConfigError(f"--vision-precision {vision_precision} with --text-only: the vision tower is left out; "
                          "drop one")
    target = target or default_target()
    build = target == "tensorrt" and optimize
    if not build and engines.given():
        raise ConfigError(f"{', '.join(engines.given())}: engine options apply to --target tensorrt without --no-optimize")
    if not trt_plugin and not build:
        raise ConfigError("--trt-fallback: picks the MoE lowering of --target tensorrt, which this export does not "
                          "lower for; drop it, or export with --target tensorrt (without --no-optimize)")
    if partitions > 1 and engines.given():
        raise ConfigError(f"{', '.join(engines.given())} with --partitions {partitions}: {PARTITIONED_ENGINES}")
    if build and engines.reproducible:  # build_engines' check, before the export rather than after it
        if engines.timing_cache is None:  # OUT/engine/timing.cache: OUT is written anew, so it is never there
            raise ConfigError("--reproducible without --timing-cache: the default cache lies in --out, which this "
                              "export writes anew, so it holds no tactics; pass --timing-cache FILE of an earlier "
                              "build, or drop --reproducible")
        if not engines.timing_cache.is_file():
            raise ConfigError(f"--timing-cache {engines.timing_cache}: no timing cache to reproduce from (--reproducible); "
                              "build once without --reproducible to create it")
    require_tensorrt(engines.require_engine)
    source = weight_source(model, checkpoint, seed, random_weights, layers)
    if text_only:
        source.vision = None  # the pipeline then writes no vision graph and traces the decoder without image inputs
    if not stream and source.fp32_bytes() < IN_MEMORY_FRACTION * available_memory():
        source = in_memory(source)
    result = export(Path(out), source, precision, target, quant or QuantOptions(), partitions,
                    DEFAULT_MAX_PREFILL if max_prefill is None else max_prefill, optimize, trt_plugin, show_progress,
                    vision_precision)
    if build:
        result.engine_line = maybe_build_engines(out, engines.require_engine, max_batch=engines.max_batch,
                                                 window=engines.window, timing_cache=engines.timing_cache,
                                                 reproducible=engines.reproducible, show_progress=show_progress)
    return result


def _artifact_manifest(directory: str | Path | None) -> dict[str, Any] | None:
    """The manifest of an exported artifact given where a checkpoint may be (its files not verified: only its
    configs and settings are read), or None."""
    if directory is None or not (Path(directory) / MANIFEST).is_file():
        return None
    return read_manifest(directory, verify=False)


def model_configs(model: str | None, checkpoint: str | Path | None) -> tuple[Llama4Config, Llama4VisionConfig | None]:
    """A preset's text and vision configs, or a checkpoint's after checking every tensor's name and shape (headers
    only) — or from its config.json alone when the directory holds no weights yet (to inspect or plan a model before
    downloading it), or an exported artifact's as its manifest records them; the vision config is None for a
    text-only model."""
    if (model is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --model PRESET or --checkpoint DIR")
    if (manifest := _artifact_manifest(checkpoint)) is not None:
        if (part := part_of_partitioned(checkpoint, manifest)) is not None:
            raise ConfigError(f"{part}; inspect the artifact directory holding it ({Path(checkpoint).resolve().parent})")
        source, vision = str(Path(checkpoint) / MANIFEST), manifest.get("vision")
        return (Llama4Config.from_manifest(manifest, source).replace(name=Path(checkpoint).name),
                None if vision is None else Llama4VisionConfig.from_manifest(vision, source))
    if checkpoint is not None:
        if not Path(checkpoint).is_dir() or not holds_weights(checkpoint):
            return checkpoint_configs(checkpoint)  # which refuses a directory that is not there
        with needs_exporter():
            from .model.loader import check_checkpoint
        index = check_checkpoint(checkpoint)
        return index.config, index.vision
    return get_preset(model), get_vision_preset(model)


MODEL_KINDS = {"model": (TEXT + NONE, "a preset name or None"), "checkpoint": (PATH + NONE, "a directory path or None")}

# plan_gpu_memory's options (plan.plan_memory's keywords)
PLAN_OPTION_KINDS = {
    **{name: (INTEGER, "an integer") for name in ("gpus", "max_batch", "max_prefill", "sinks")},
    **{name: (INTEGER + NONE, "an integer or None") for name in ("window", "block_size", "max_tiles")},
    **{name: (TEXT + NONE, "a str or None") for name in ("kv_dtype", "activation_dtype", "vision_precision")},
}


def inspect_model(model: str | None = None, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """`llama4-export inspect`: layers by kind, total/active parameters, weight bytes per precision, KV bytes/token,
    and the vision encoder's parameters and tokens per image tile when the model has one."""
    check_types("inspect_model", MODEL_KINDS, locals())
    return summarize(*model_configs(model, checkpoint))


def plan_gpu_memory(model: str | None = None, checkpoint: str | Path | None = None, precision: str = "bf16",
                    gpu: str | None = None, gpu_memory: str | None = None, text_only: bool = False,
                    **options) -> MemoryPlan:
    """`llama4-export plan`: the memory plan of the model on `gpu` (or one GPU of `gpu_memory`), its vision tower
    included unless `text_only` (or the model has none); options: gpus, max_batch, max_prefill, kv_dtype, window,
    block_size, max_tiles, vision_precision (plan.plan_memory)."""
    if unknown := sorted(set(options) - set(PLAN_OPTION_KINDS)):  # was plan_memory()'s TypeError
        raise ConfigError(f"plan_gpu_memory({unknown[0]}=...): unknown option; choose from: "
                          f"{', '.join(PLAN_OPTION_KINDS)}")
    check_types("plan_gpu_memory", {  # a str max_batch or an int gpu_memory was a TypeError / AttributeError inside
        **MODEL_KINDS, "precision": (TEXT, "a str"), "gpu": (TEXT + NONE, "a GPU name or None"),
        "gpu_memory": (TEXT + NONE, "a size such as '80GB', or None"), "text_only": (FLAG, "True or False"),
        **{name: PLAN_OPTION_KINDS[name] for name in options}}, {**locals(), **options})
    if _artifact_manifest(checkpoint) is not None:  # its weights are stored as its target's passes chose
        raise ConfigError(f"{checkpoint}: an exported artifact; plan plans a deployment from its checkpoint (or "
                          "--model PRESET) and a precision, and the runtime sizes an artifact's window on the GPU it "
                          "runs on by itself")
    config, vision = model_configs(model, checkpoint)
    return plan_memory(config, precision, gpu_spec(gpu, gpu_memory), vision=None if text_only else vision, **options)


def stored_pass_reports(directory: str | Path) -> dict[str, Any]:
    """`llama4-export passes DIR --report`: the pass report an optimized artifact stores."""
    with needs_exporter():
        from .graph_passes.artifact_passes import PASSES_FILE

    check_types("stored_pass_reports", {"directory": (PATH, "an artifact directory")}, locals(), GraphPassError)
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("partitions"):  # each part stores its own graphs' reports: "part0/decode", "part0/prefill", ...
        layers = Llama4Config.from_manifest(manifest, str(directory / MANIFEST)).num_hidden_layers
        return {f"{part}/{name}": report for part, _ in partition_entries(directory, manifest, layers)
                for name, report in stored_pass_reports(directory / part).items()}
    if "graph_passes" not in manifest:
        raise GraphPassError(f"{directory}: not optimized yet; run `llama4-export passes {directory}`")
    return json.loads((directory / PASSES_FILE).read_text(encoding="utf-8"))
