"""AWQ in bounded RAM: calib/awq.py's per-layer plans, computed during sequential layer-wise calibration, kept on disk
(the calibration cache), and replayed on the weights as the export reads them.

awq_plans     calib/layerwise.py runs the unmodified model one decoder layer at a time (AWQ's statistics are those of
              the unmodified model); while layer i's weights are materialized its statistics go to awq.plan_layer,
              the plan's operands and records are written to directory/layerNNNNN.safetensors and the layer's Gram
              matrices are dropped before layer i + 1 (the routed experts' were on disk, one expert at a time).
AwqWeights    a WeightSource over the original one: an unchanged tensor passes through; a changed one is read in
              fp32 and replayed — a 2-D / 1-D weight whole, a routed-experts tensor one expert at a time — then handed
              on in row-major slices of at most CHUNK_BYTES (fp32).

Memory per layer (planning): the layer's weights (routed experts in the source's float type), the calibration hidden
states and the routed experts' inputs, the layer's non-expert Gram matrices (float64 while accumulated), ONE routed
expert's Gram matrices, fp32 copies of one dense weight or one expert while its clip range is searched, and the
plan's operands (scale vectors; clip limits, 1/block of each weight's elements). Replay: one 2-D weight or one expert
in fp32 plus its operands.

Why the replay is bit-exact: replay applies elementwise fp32 operations (×, ÷, min, max with ±limit) in a fixed order
per element, and an elementwise IEEE operation's result does not depend on how the tensor is sliced, so a weight
replayed alone, or one expert of it, gets the bits the whole-tensor replay would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..weights import CHUNK_BYTES, WeightSource, expert_by_expert, read_tensor, slices
from .awq import LayerPlan, Op, plan_layer, replay
from .corpus import CalibrationError
from .layerwise import layerwise_statistics

PLAN_METADATA = "llama4_export_awq_plan"
PLAN_FORMAT = "llama4-export-awq-plan-2"  # 2: + the layer's search records and the calibration key


def plan_file(directory: Path, layer: int) -> Path:
    return Path(directory) / f"layer{layer:05d}.safetensors"


def save_plan(plan: LayerPlan, path: Path, records: list[dict], key: str) -> None:
    """Operands as tensors by name; the ops, the search records and the calibration key as one json metadata entry
    (one entry: safetensors writes a metadata map in hash order), sorted: the same plan gives the same bytes."""
    def order(item):
        (name, expert), _ = item
        return name, -1 if expert is None else expert

    entries = [{"tensor": name, "expert": expert, "ops": [[op.kind, op.operand, op.axis, op.start] for op in ops]}
               for (name, expert), ops in sorted(plan.ops.items(), key=order)]
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: plan.operands[name].contiguous() for name in sorted(plan.operands)}, str(tmp),
              metadata={PLAN_METADATA: json.dumps({"format": PLAN_FORMAT, "ops": entries, "records": records, "key": key},
                                                  sort_keys=True)})
    tmp.replace(path)


def read_plan(path: Path) -> dict[str, Any]:
    """The json entry of a plan file ({"format", "ops", "records", "key"})."""
    try:
        with safe_open(str(path), "pt") as f:
            plan = json.loads((f.metadata() or {})[PLAN_METADATA])
    except Exception as exc:  # safetensors raises its own types for a damaged file
        raise CalibrationError(f"{path}: not a readable AWQ plan ({exc}); delete it to calibrate again") from None
    if plan.get("format") != PLAN_FORMAT:
        raise CalibrationError(f"{path}: AWQ plan format {plan.get('format')!r}, expected {PLAN_FORMAT!r}; delete it "
                               "to calibrate again")
    return plan


def cached_plans(directory: Path, layers: int, key: str) -> list[dict] | None:
    """The search records of complete plans for `key` in `directory`, or None (absent, partial or for other inputs)."""
    records: list[dict] = []
    for layer in range(layers):
        path = plan_file(directory, layer)
        if not path.is_file():
            return None
        plan = read_plan(path)
        if plan.get("key") != key:
            return None
        records += plan["records"]
    return records


def awq_plans(source: WeightSource, samples: np.ndarray, block: int, directory: str | Path, key: str,
              progress: Callable[[int, int], None] | None = None, gram_dir: Path | None = None
              ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """AWQ plans of every decoder layer of `source` on calibration `samples` [n, seq_len], one layer in memory at a
    time, written to `directory`; returns (the search records, the statistics but the Gram matrices — e.g. for the FP8
    KV cache's scales, without a second pass over the weights)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []

    def on_layer(layer: int, module: torch.nn.Module, stats: dict[str, np.ndarray], experts) -> None:
        plan, layer_records = plan_layer(module, layer, stats, block, experts)
        save_plan(plan, plan_file(directory, layer), layer_records, key)
        records.extend(layer_records)

    stats = layerwise_statistics(source, samples, progress, for_awq=True, on_layer=on_layer, gram_dir=gram_dir)
    return records, stats


class AwqWeights(WeightSource):
    """`base`'s weights with the AWQ plans in `plans_location` (awq_plans) applied."""

    def __init__(self, base: WeightSource, plans_location: str | Path):
        self.base = base
        self.config = base.config
        self.checkpoint = base.checkpoint
        self.directory = Path(plans_location)
        self._ops: dict[str, dict[int | None, list[Op]]] = {}  # parameter name → expert (None: whole) → ops
        self._files: dict[str, Path] = {}
        for layer in range(self.config.num_hidden_layers):
            path = plan_file(self.directory, layer)
            if not path.is_file():
                raise CalibrationError(f"{path}: the AWQ plan of layer {layer} is missing; delete {self.directory} to "
                                       "calibrate again")
            for entry in read_plan(path)["ops"]:
                self._ops.setdefault(entry["tensor"], {})[entry["expert"]] = [Op(*op) for op in entry["ops"]]
                self._files[entry["tensor"]] = path

    def _operands(self, name: str, ops: list[Op]) -> dict[str, torch.Tensor]:
        with safe_open(str(self._files[name]), "pt") as f:
            return {op.operand: f.get_tensor(op.operand) for op in ops}

    def chunks(self, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        plans = self._ops.get(name)
        if plans is None:
            yield from self.base.chunks(name, dtype)
            return
        shape = self.shapes[name]
        if None in plans:  # a norm, a linear or the router: at most a few hundred MB in fp32 at Scout's shapes
            tensor = read_tensor(self.base, name, torch.float32)
            replay(tensor, plans[None], self._operands(name, plans[None]))
            for index in slices(shape):
                yield tensor[index].to(dtype)
            return
        # routed experts [E, K, N]: one expert at a time (a Scout layer's stacked gate_up is 5.4 GB in fp32)
        rows = max(1, CHUNK_BYTES // (4 * shape[2]))
        for e, expert in enumerate(expert_by_expert(self.base.chunks(name, torch.float32), shape)):
            ops = plans.get(e, [])
            replay(expert, ops, self._operands(name, ops))
            for start in range(0, shape[1], rows):
                yield expert[None, start:start + rows].to(dtype)

    def lossless_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name in self._ops else self.base.lossless_dtype(name)

    def describe(self) -> str:
        return f"{self.base.describe()} with AWQ scales and clipping"

    def manifest_entry(self) -> dict[str, Any]:
        return self.base.manifest_entry()
