"""`optimize_artifact`: run the graph passes on every graph of an artifact directory, in place and atomically.

The graphs are rewritten into a new directory beside the artifact (the export's `save_graphs`: one shared external
data file, each tensor stored once, aligned offsets), the other files are copied, the pass reports go to
passes.json, the manifest is re-hashed; then the new directory replaces the old (artifact.atomic_directory).
Same artifact + same target ⇒ byte-identical files.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator

import onnx_ir as ir

from ..artifact import MANIFEST, atomic_directory, read_manifest, write_json, write_manifest
from .errors import GraphPassError
from .manager import PassReport
from .pipeline import default_target, optimize, passes_for
from .quantize import QuantSpec
from .verify import DEFAULT_TOLERANCE

PASSES_FILE = "passes.json"


def optimize_artifact(
    directory: str | Path,
    target: str | None = None,
    verify: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    trt_plugin: bool = True,
    show_progress: bool = True,
    quantization: QuantSpec | None = None,
    manifest_update: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, PassReport]]:
    """Optimize decode.onnx / prefill.onnx (every graph the manifest lists) for `target`; returns (manifest, reports).

    quantization: also quantize the weights (quantize.py); manifest_update: entries to set in the manifest."""
    from ..export.onnx_export import DATA_FILE, save_graphs

    directory = Path(directory)
    manifest = read_manifest(directory)  # checks every file's hash before we read any of it
    target = target or default_target()
    passes_for(target)  # an unknown target fails before any slow step
    if "graph_passes" in manifest:
        done = manifest["graph_passes"]
        raise GraphPassError(f"{directory}: already optimized for {done.get('target')!r}; export again to optimize anew")
    graphs = manifest.get("graphs") or {}
    if not graphs:
        raise GraphPassError(f"{directory / MANIFEST}: lists no graphs; re-run the export")
    data_file = manifest.get("external_data", DATA_FILE)

    models, reports = {}, {}
    with _steps(show_progress) as step:
        for name in sorted(graphs):
            with step(f"optimize {graphs[name]['file']} for {target}" + (" (verifying every pass)" if verify else "")):
                models[name], reports[name] = optimize(directory / graphs[name]["file"], target, verify, tolerance,
                                                        trt_plugin=trt_plugin, quantization=quantization)
        with atomic_directory(directory) as tmp:
            with step(f"write graphs and {data_file}"):
                save_graphs(models, tmp, data_file)
                copy_other_files(directory, tmp, manifest, data_file, reports)
            with step("hash files and write manifest"):
                manifest = _updated_manifest(manifest, target, models, reports, verify, tolerance)
                manifest = write_manifest(tmp, {**manifest, **(manifest_update or {})})
    return manifest, reports


def copy_other_files(directory: Path, tmp: Path, manifest: dict, data_file: str, reports: dict[str, PassReport]) -> None:
    """Into the rewritten artifact `tmp`: every file of `directory` the rewrite does not produce (tokenizer files,
    report.json, …), and the pass reports."""
    rewritten = {entry["file"] for entry in (manifest.get("graphs") or {}).values()} | {data_file, MANIFEST, PASSES_FILE}
    for name in sorted(manifest["files"]):
        if name not in rewritten:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(directory / name, tmp / name)
    write_json(tmp / PASSES_FILE, {name: report.to_json() for name, report in reports.items()})


def _updated_manifest(manifest: dict, target: str, models: dict[str, ir.Model], reports: dict[str, PassReport],
                      verify: bool, tolerance: float) -> dict[str, Any]:
    manifest = {k: v for k, v in manifest.items() if k != "files"}
    manifest["target"] = target
    manifest["opset"] = max(m.opset_imports.get("", 0) for m in models.values())
    manifest["graphs"] = {
        name: {**entry, "moe_lowering": reports[name].moe_lowering} for name, entry in manifest["graphs"].items()
    }
    first = next(iter(reports.values()))
    manifest["graph_passes"] = {
        "target": target,
        "report": PASSES_FILE,
        "passes": [r.name for r in first.records],
        "verified_tolerance": tolerance if verify else None,
    }
    return manifest


@contextlib.contextmanager
def _steps(show: bool) -> Iterator:
    """Named steps with a spinner and elapsed time (rich, on stderr), or silence."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description}"), TimeElapsedColumn(),
                        console=Console(stderr=True), disable=not show)

    @contextlib.contextmanager
    def step(description: str) -> Iterator[None]:
        task = progress.add_task(description, total=1)
        yield
        progress.update(task, completed=1)

    with progress:
        yield step
