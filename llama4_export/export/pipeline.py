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
# The dtype the PyTorch model is exported in. Quantized precisions (int4, fp8) will start from one of these and add
# graph passes (DESIGN.md §1).
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}


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
) -> dict[str, Any]:
    """Export decode + prefill graphs, weights, tokenizer and manifest to `out`; return the manifest."""
    out = Path(out)
    dtype = _check_arguments(out, source, precision, max_prefill)
    with _Steps(show_progress) as step:
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


def _check_arguments(out: Path, source: ModelSource, precision: str, max_prefill: int) -> torch.dtype:
    """Fail on bad input before any slow step."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not supported; choose one of: {', '.join(PRECISIONS)}")
    if max_prefill < 1:
        raise ConfigError(f"max prefill tokens {max_prefill} must be at least 1")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ArtifactError(f"{out}: directory is not empty and is not a llama4-export artifact; choose another --out or empty it")
    # An unknown preset, special token ids a byte-level tokenizer cannot hold, or a checkpoint that does not match
    # its config fail here, in milliseconds.
    if source.preset is not None:
        special_token_ids(get_preset(source.preset))
    else:
        check_checkpoint(source.checkpoint)
    return PRECISIONS[precision]


def _manifest(model: Llama4ForCausalLM, source: ModelSource, precision: str, max_prefill: int, tokenizer: dict) -> dict[str, Any]:
    kv_dtype = str(PRECISIONS[precision]).removeprefix("torch.")
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
