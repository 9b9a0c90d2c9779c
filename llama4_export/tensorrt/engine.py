"""`build_engines`: TensorRT engines for a tensorrt-lowered artifact, through Polygraphy's Python API.

    manifest = build_engines("out/scout-int4-trt", max_batch=4, max_prefill=512, timing_cache="timing.cache")

Per graph (decode.onnx, prefill.onnx, and vision.onnx when the artifact has one) one engine, engine/<graph>.plan,
with one optimization profile (profiles.py).
Steps: verify the artifact's hashes → conformance lint (lint.py; a violation stops the build) → check TensorRT and a
GPU → register the MoE plugin when a graph holds its node (moe_plugin.py) → Polygraphy NetworkFromOnnxPath
(strongly_typed=True: TensorRT 11 accepts nothing else, and precision must come from the graph's Cast/Q/DQ) →
CreateConfig(profiles, memory_pool_limits={WORKSPACE}, load_timing_cache, error_on_timing_cache_miss,
version_compatible, exclude_lean_runtime) → EngineBytesFromNetwork(save_timing_cache) → files written under temp
names and renamed → manifest.json rewritten last (temp + rename) with a `tensorrt` entry: TensorRT version, GPU name
and compute capability, builder settings, profiles, and sha256 of every input (graphs, weights, the timing cache as
loaded) and output (plans, the timing cache as saved).

Reproducible builds: with `reproducible=True` the build loads the timing cache and sets ERROR_ON_TIMING_CACHE_MISS,
so no tactic is timed on this run — every choice comes from the cache and a cache that lacks one fails the build
instead of silently timing (which is what makes plans differ between runs). TensorRT's documented guarantees are
narrower than "same bytes": a timing cache (and an engine) is valid only for the TensorRT version, CUDA version, GPU
model and builder settings it was made with, and the builder is not documented to be bit-deterministic (ITimingCache's
documentation: rebuilding with the same cache always gives a correct engine, but tactics and formats may vary between
builds "if weak typing is used" — our networks are strongly typed). So `llama4-export rebuild` compares plan hashes
and reports a difference as such; for same-GPU, same-TensorRT rebuilds from the same cache we expect equality.

TensorRT and a GPU are optional: `maybe_build_engines` returns one line saying what to install when they are missing.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path
from typing import Any

from ..artifact import MANIFEST, part_of_partitioned, read_manifest, replace_json, sha256_file
from ..graph_passes import trt_plugin_spec
from ..plan import cuda_memory_bytes
from ..progress import Steps
from . import moe_plugin
from .errors import BuildError
from .lint import lint_artifact
from .profiles import BuildLimits, build_limits, engine_graphs, engine_profiles

ENGINE_DIR = "engine"
DEFAULT_TIMING_CACHE = f"{ENGINE_DIR}/timing.cache"
MIN_TENSORRT = (10, 7)  # strongly typed networks with Q/DQ INT4 + tensorrt.plugin
INSTALL_HINT = ('pip install --extra-index-url https://pypi.nvidia.com "tensorrt-cu12>=10.15" "polygraphy>=0.49" '
                "(tensorrt-cu13 on CUDA 13), plus torch with CUDA and triton for the MoE plugin, on a machine with an "
                "NVIDIA GPU")


def tensorrt_problem() -> str | None:
    """None when TensorRT (>= 10.7), Polygraphy and a CUDA GPU are usable here; else what is missing, in one phrase."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    if importlib.util.find_spec("polygraphy") is None:
        return "Polygraphy is not installed"
    import tensorrt as trt

    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        return f"TensorRT {trt.__version__} is older than {'.'.join(map(str, MIN_TENSORRT))}"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def missing_tensorrt_message() -> str | None:
    problem = tensorrt_problem()
    return None if problem is None else f"{problem}: to build TensorRT engines, {INSTALL_HINT}"


def _gpu() -> dict[str, Any]:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def has_plugin_nodes(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type == trt_plugin_spec.PLUGIN_NAME for n in model.graph.node)


# Engines are built for whole-model graphs; a partitioned artifact's parts (one per GPU) are ONNX only.
PARTITIONED_ENGINES = ("TensorRT engines are built for unpartitioned artifacts only: export without --partitions to "
                       "build them (`llama4-export plan` says whether one GPU holds the model), or export with "
                       "--target onnxruntime to run the parts")


def build_engines(
    artifact_dir: str | Path, max_batch: int = 1, max_prefill: int | None = None, window: int | None = None,
    timing_cache: str | Path | None = None, reproducible: bool = False, workspace_gib: float | None = None,
    version_compatible: bool = False, show_progress: bool = True,
) -> dict[str, Any]:
    """Build engine/<graph>.plan for every graph of a tensorrt-lowered artifact; returns the new manifest.

    timing_cache: file loaded before and saved after the build (default ARTIFACT/engine/timing.cache).
    reproducible: error on a timing-cache miss (the cache must already hold every tactic: build once without it).
    workspace_gib: builder workspace memory pool limit. version_compatible: a version-compatible engine that excludes
    the lean runtime (deploy with the matching lean runtime)."""
    directory = Path(artifact_dir)
    # bad options fail alike on every machine, before the checks that need TensorRT
    if workspace_gib is not None and not (math.isfinite(workspace_gib) and workspace_gib > 0):
        raise BuildError(f"--workspace-gib {workspace_gib:g}: must be a positive number of GiB")
    manifest = read_manifest(directory)  # every hash checked before anything is built from the files
    if manifest.get("partitions"):
        raise BuildError(f"{directory}: a partitioned artifact ({len(manifest['partitions'])} parts); "
                         f"{PARTITIONED_ENGINES}")
    if (part := part_of_partitioned(directory, manifest)) is not None:
        raise BuildError(f"{part}; {PARTITIONED_ENGINES}")
    # the default window is planned for this GPU (engines are per device)
    limits = build_limits(manifest, max_batch, max_prefill, window, cuda_memory_bytes() if window is None else None)
    cache_path = Path(timing_cache) if timing_cache is not None else directory / DEFAULT_TIMING_CACHE
    if reproducible and not cache_path.is_file():
        raise BuildError(f"{cache_path}: no timing cache to reproduce from; build once without --reproducible to create it")
    _require_conformance(directory)
    problem = missing_tensorrt_message()
    if problem is not None:
        raise BuildError(problem)
    return _build(directory, manifest, limits, cache_path, reproducible, workspace_gib, version_compatible, show_progress)


def _require_conformance(directory: Path) -> None:
    """BuildError naming the first TensorRT conformance violation of the artifact's graphs, if any."""
    violations = {f: v for f, v in lint_artifact(directory).items() if v}
    if violations:
        file, found = next(iter(violations.items()))
        total = sum(len(v) for v in violations.values())
        raise BuildError(f"{directory / file}: {total} TensorRT conformance violation(s), first: {found[0].format()}; "
                         f"see `llama4-export lint {directory}`")


def _build(directory: Path, manifest: dict[str, Any], limits: BuildLimits, cache_path: Path, reproducible: bool,
           workspace_gib: float | None, version_compatible: bool, show_progress: bool) -> dict[str, Any]:
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    graphs = engine_graphs(manifest)
    profiles = engine_profiles(manifest, limits)
    settings = {
        "strongly_typed": True, "error_on_timing_cache_miss": reproducible, "version_compatible": version_compatible,
        "exclude_lean_runtime": version_compatible, "workspace_bytes": None if workspace_gib is None
        else int(workspace_gib * (1 << 30)), "limits": limits.to_json(),
    }
    cache_in = sha256_file(cache_path) if cache_path.is_file() else None
    (directory / ENGINE_DIR).mkdir(exist_ok=True)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # Plans and the timing cache (Polygraphy saves it after every engine) are written under temp names and renamed
    # once every engine is built: a failed build leaves the files the manifest lists (and their hashes) as they were.
    suffix = f".tmp-{os.getpid()}"
    work_cache = cache_path.with_name(cache_path.name + suffix)
    if cache_path.is_file():
        shutil.copyfile(cache_path, work_cache)
    staged = {work_cache: cache_path}
    engines = {}
    try:
        with Steps(show_progress) as step:
            if any(has_plugin_nodes(directory / graphs[name]) for name in graphs):
                with step(f"register TensorRT plugin {moe_plugin.PLUGIN_ID}"):
                    moe_plugin.register()
            for name in sorted(graphs):
                profile = Profile()
                for tensor, shapes in profiles[name].items():
                    profile.add(tensor, shapes.min, shapes.opt, shapes.max)
                config = CreateConfig(
                    profiles=[profile],
                    memory_pool_limits=None if workspace_gib is None else {trt.MemoryPoolType.WORKSPACE: settings["workspace_bytes"]},
                    load_timing_cache=str(work_cache) if work_cache.is_file() else None,
                    error_on_timing_cache_miss=reproducible or None,
                    version_compatible=version_compatible or None,
                    exclude_lean_runtime=version_compatible or None,
                )
                network = NetworkFromOnnxPath(str(directory / graphs[name]), strongly_typed=True)
                plan = f"{ENGINE_DIR}/{name}.plan"
                with step(f"build {plan} (TensorRT {trt.__version__})"):
                    try:
                        data = EngineBytesFromNetwork(network, config, save_timing_cache=str(work_cache))()
                    except PolygraphyException as exc:
                        # Polygraphy reports a parser error or a failed build (build_serialized_network's None) by
                        # raising (G_LOGGER.critical), not by returning None: polygraphy/backend/trt/loader.py
                        raise BuildError(f"{directory / graphs[name]}: TensorRT could not build an engine: {exc} "
                                         "(its log above says why)") from None
                    tmp = directory / f"{plan}{suffix}"
                    tmp.write_bytes(bytes(data))
                    staged[tmp] = directory / plan
                engines[name] = {"file": plan, "graph": graphs[name],
                                 "profile": {t: r.to_json() for t, r in profiles[name].items()}}
        for tmp, final in staged.items():
            if tmp.exists():  # the timing cache is there once an engine was built or one was given
                os.replace(tmp, final)
    finally:
        for tmp in [*staged, Path(f"{work_cache}.lock")]:  # Polygraphy's LockFile leaves PATH.lock behind
            tmp.unlink(missing_ok=True)
    return write_engine_manifest(directory, manifest, engines, settings, cache_path, cache_in, trt.__version__, _gpu())


def write_engine_manifest(directory: Path, manifest: dict[str, Any], engines: dict, settings: dict, cache_path: Path,
                          cache_in: str | None, trt_version: str, gpu: dict[str, Any]) -> dict[str, Any]:
    """Add the engines (files already in place) to the manifest: hashes, a `tensorrt` entry; written atomically."""
    inside = cache_path.resolve().is_relative_to(directory.resolve())
    cache_name = cache_path.resolve().relative_to(directory.resolve()).as_posix() if inside else cache_path.name
    files = dict(manifest["files"])
    for engine in engines.values():
        files[engine["file"]] = sha256_file(directory / engine["file"])
    if inside:
        files[cache_name] = sha256_file(cache_path)
    vision_data = [manifest["vision"]["external_data"]] if manifest.get("vision") else []
    inputs = sorted({manifest.get("external_data", "model.data"), *vision_data, *(e["graph"] for e in engines.values())})
    manifest = {**manifest, "files": dict(sorted(files.items()))}
    manifest["tensorrt"] = {
        "version": trt_version,
        "gpu": gpu,
        "builder": settings,
        "engines": engines,
        "timing_cache": {"path": cache_name, "inside_artifact": inside, "sha256_in": cache_in,
                         "sha256_out": sha256_file(cache_path)},
        "inputs_sha256": {name: manifest["files"][name] for name in inputs if name in manifest["files"]},
        "outputs_sha256": {e["file"]: files[e["file"]] for e in engines.values()},
    }
    replace_json(directory / MANIFEST, manifest)
    return manifest


def require_tensorrt(require_engine: bool) -> None:
    """--require-engine: a BuildError saying what to install when TensorRT or a GPU is missing (checked before the
    export too, so a long export is not wasted)."""
    problem = missing_tensorrt_message() if require_engine else None
    if problem is not None:
        raise BuildError(f"--require-engine: {problem}")


def maybe_build_engines(
    out: str | Path, require_engine: bool = False, max_batch: int = 1, max_prefill: int | None = None,
    window: int | None = None, timing_cache: str | Path | None = None, reproducible: bool = False,
    show_progress: bool = True,
) -> str:
    """After a --target tensorrt export: build the engines when TensorRT and a GPU are here, else say what to install.

    Without them the artifact is still checked as build_engines would check it (limits, conformance lint), so
    "TensorRT-ready" is a checked claim and bad options fail alike on every machine. Returns the one line to print;
    require_engine=True turns a missing TensorRT/GPU into a BuildError (exit 2)."""
    directory = Path(out)
    parts = read_manifest(directory).get("partitions")
    if parts:
        if require_engine:
            raise BuildError(f"--require-engine: {PARTITIONED_ENGINES}")
        _require_conformance(directory)
        return f"wrote the TensorRT-ready ONNX artifact {out} in {len(parts)} parts; {PARTITIONED_ENGINES}"
    options = {"max_batch": max_batch, "max_prefill": max_prefill, "window": window}
    problem = missing_tensorrt_message()
    if problem is None:
        manifest = build_engines(directory, **options, timing_cache=timing_cache, reproducible=reproducible,
                                 show_progress=show_progress)
        info = manifest["tensorrt"]
        plans = ", ".join(e["file"] for e in info["engines"].values())
        return (f"built {plans} with TensorRT {info['version']} on {info['gpu']['name']} "
                f"(sm {info['gpu']['compute_capability']})")
    require_tensorrt(require_engine)
    build_limits(read_manifest(directory), **options)
    _require_conformance(directory)
    flags = "".join(f" --{name.replace('_', '-')} {value}" for name, value in options.items()
                    if value is not None and (name, value) != ("max_batch", 1))
    flags += "" if timing_cache is None else f" --timing-cache {timing_cache}"
    flags += " --reproducible" if reproducible else ""
    return f"wrote the TensorRT-ready ONNX artifact {out}; {problem}, then run `llama4-export build {out}{flags}`"
