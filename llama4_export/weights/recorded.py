"""The weights an artifact was exported from, as its manifest's `source` records them: a preset's seeded random
weights, or a checkpoint directory the caller names, whose files must hash as recorded (`rebuild`, `compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifact import sha256_file
from ..errors import CheckpointError
from .checkpoint import CheckpointWeights
from .random import RandomWeights
from .source import WeightSource


def recorded_source(manifest: dict[str, Any], checkpoint: Path | None) -> WeightSource:
    source = manifest.get("source") or {}
    if "preset" in source:
        if checkpoint is not None:
            raise CheckpointError(f"--checkpoint {checkpoint}: the artifact was exported from the random weights of "
                                  f"preset {source['preset']!r} (seed {source.get('seed', 0)}), not from a checkpoint; "
                                  "drop --checkpoint")
        return RandomWeights(source["preset"], int(source.get("seed", 0)), source.get("layers"))
    if checkpoint is None:
        raise CheckpointError(f"the artifact was exported from checkpoint {source.get('checkpoint')!r}; pass its "
                              "directory with --checkpoint")
    check_as_recorded(Path(checkpoint), source.get("files") or {})
    return CheckpointWeights(checkpoint)


def check_as_recorded(checkpoint: Path, recorded: dict[str, str | None]) -> None:
    """Each file of `checkpoint` named in `recorded` (name → sha256) must be there and hash as recorded."""
    for name, expected in sorted(recorded.items()):
        path = checkpoint / name
        if not path.is_file() or sha256_file(path) != expected:
            raise CheckpointError(f"{path}: missing or not the file the artifact was exported from (sha256 differs); "
                                  "pass the original checkpoint")
