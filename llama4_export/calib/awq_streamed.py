"""AWQ in bounded RAM (issue 9): calib/awq.py's per-layer plans computed during sequential layer-wise calibration,
kept on disk, and replayed on the weights as the streaming export reads them.

awq_plans_streamed   calib/streamed.py runs the unmodified model one decoder layer at a time (AWQ's statistics are
                     those of the unmodified model, as in memory, where collect_statistics runs before apply_awq);
                     while layer i's weights are materialized its statistics (with Gram matrices) go to
                     awq.plan_layer, the plan's operands are written to scratch_dir/layerNNNNN.safetensors and the
                     Gram matrices are dropped before layer i + 1 (the small statistics are kept and returned).
AwqWeights           a WeightSource over the original one: an unchanged tensor passes through; a changed one is
                     read in fp32 and replayed — a 2-D / 1-D weight whole, a routed-experts tensor one expert at a
                     time — then handed on in row-major slices of at most CHUNK_BYTES (fp32).

Memory per layer (planning): the layer's weights (routed experts in the checkpoint's float type), the calibration
hidden states, the layer's statistics (the largest item: collect_statistics accumulates the Gram matrices in float64,
≈ 12 GB for a Scout MoE layer — 16 experts × (5120² + 8192²) — plus their float32 result, ≈ 6 GB), fp32 copies of one dense weight or one expert while its clip range is
searched, and the plan's operands (scale vectors; clip limits, 1/block of each weight's elements). Replay: one 2-D
weight or one expert in fp32 plus its operands.

Why the replay is bit-exact: a plan holds the operands the in-memory search computes (same statistics — streamed
ones are collect_statistics' bits; same weights — bf16 → fp32 widening is exact; the searches see the same values in
the same layouts), and replay applies the same elementwise fp32 operations (×, ÷, min, max with ±limit) in the same
order per element. An elementwise IEEE operation's result does not depend on how the tensor is sliced, so a weight
replayed alone, or one expert of it, gets the in-memory apply_awq's bits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..export.streaming import CHUNK_BYTES, WeightSource, _parameter_shapes, _slices, expert_by_expert
from .awq import LayerPlan, Op, plan_layer, replay
from .corpus import CalibrationError
from .streamed import _read, streamed_statistics

PLAN_METADATA = "llama4_export_awq_plan"
PLAN_FORMAT = "llama4-export-awq-plan-1"


def plan_file(directory: Path, layer: int) -> Path:
    return Path(directory) / f"layer{layer:05d}.safetensors"


def save_plan(plan: LayerPlan, path: Path) -> None:
    """Operands as tensors by name, the ops as one json metadata entry (one entry: safetensors writes a metadata map
    in hash order), sorted: the same plan gives the same bytes."""
    def order(item):
        (name, expert), _ = item
        return name, -1 if expert is None else expert

    entries = [{"tensor": name, "expert": expert, "ops": [[op.kind, op.operand, op.axis, op.start] for op in ops]}
               for (name, expert), ops in sorted(plan.ops.items(), key=order)]
    tmp = path.with_name(path.name + ".tmp")
    save_file({name: plan.operands[name].contiguous() for name in sorted(plan.operands)}, str(tmp),
              metadata={PLAN_METADATA: json.dumps({"format": PLAN_FORMAT, "ops": entries}, sort_keys=True)})
    tmp.replace(path)


def awq_plans_streamed(source: WeightSource, samples: np.ndarray, block: int, scratch_dir: str | Path,
                       progress: Callable[[int, int], None] | None = None
                       ) -> tuple[Path, list[dict], dict[str, np.ndarray]]:
    """AWQ plans of every decoder layer of `source` on calibration `samples` [n, seq_len], one layer in memory at a
    time; returns (the plans' directory for AwqWeights, apply_awq's records, the statistics but the Gram matrices:
    collect_statistics' values, e.g. for the FP8 KV cache's scales, without a second pass over the weights)."""
    directory = Path(scratch_dir)
    directory.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []

    def on_layer(layer: int, module: torch.nn.Module, stats: dict[str, np.ndarray]) -> None:
        plan, layer_records = plan_layer(module, layer, stats, block)
        save_plan(plan, plan_file(directory, layer))
        records.extend(layer_records)

    stats = streamed_statistics(source, samples, progress, for_awq=True, on_layer=on_layer)
    return directory, records, stats


class AwqWeights(WeightSource):
    """`base`'s weights with the AWQ plans in `plans_location` (awq_plans_streamed) applied: bit for bit the
    parameters apply_awq leaves in the in-memory fp32 model."""

    def __init__(self, base: WeightSource, plans_location: str | Path):
        self.base = base
        self.config = base.config
        self.checkpoint = base.checkpoint
        self.directory = Path(plans_location)
        self._shapes = _parameter_shapes(self.config)
        self._ops: dict[str, dict[int | None, list[Op]]] = {}  # parameter name → expert (None: whole) → ops
        self._files: dict[str, Path] = {}
        for layer in range(self.config.num_hidden_layers):
            path = plan_file(self.directory, layer)
            if not path.is_file():
                raise CalibrationError(f"{path}: the AWQ plan of layer {layer} is missing; run awq_plans_streamed again")
            try:
                with safe_open(str(path), "pt") as f:
                    plan = json.loads((f.metadata() or {})[PLAN_METADATA])
            except Exception as exc:  # safetensors raises its own types for a damaged file
                raise CalibrationError(f"{path}: not a readable AWQ plan ({exc}); run awq_plans_streamed again") from None
            if plan.get("format") != PLAN_FORMAT:
                raise CalibrationError(f"{path}: AWQ plan format {plan.get('format')!r}, expected {PLAN_FORMAT!r}; "
                                       "run awq_plans_streamed again")
            for entry in plan["ops"]:
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
        shape = self._shapes[name]
        if None in plans:  # a norm, a linear or the router: at most a few hundred MB in fp32 at Scout's shapes
            tensor = _read(self.base, name, torch.Size(shape), torch.float32)
            replay(tensor, plans[None], self._operands(name, plans[None]))
            for index in _slices(shape):
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

    def write_tokenizer(self, directory: Path) -> dict[str, Any]:
        return self.base.write_tokenizer(directory)
