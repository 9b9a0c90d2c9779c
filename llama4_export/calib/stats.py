"""Activation statistics from the PyTorch model on calibration samples, and their cache file.

Sites (one per distinct linear input; `L` = layer index):
  layers.L.attn_in         input of q/k/v_proj (input_layernorm output)            [H]
  layers.L.o_in            input of o_proj                                         [heads·D]
  layers.L.mlp_in          post_attention_layernorm output: dense/shared gate+up, router   [H]
  layers.L.down_in         input of the dense MLP's / shared expert's down_proj    [I]
  layers.L.expert_in       routed expert e's input x·sigmoid(logit), tokens routed to e   [E, H]
  layers.L.expert_down_in  routed expert e's down_proj input                       [E, I]
  final_in                 lm_head input
For each site: `.amax` (max |x|, per tensor; per expert for expert sites), `.mean_abs` (mean |x| per input channel,
AWQ's activation salience) and `.gram` (Σ x xᵀ / tokens, so the output MSE of any weight perturbation ΔW is
tr(ΔW Σ ΔWᵀ) exactly: AWQ's scale search needs no stored activations). Accumulated in float64, stored float32.

Cache file: safetensors, tensors above by name, one metadata entry holding json {"key": sha256 of (format, model id,
data hash, samples, seq_len), "settings": ...}. Same inputs ⇒ byte-identical file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import CalibrationError

CACHE_FORMAT = "llama4-export-calib-1"
METADATA = "llama4_export_calibration"


def cache_key(model_id: dict, data_sha256: str, samples: int, seq_len: int) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "model": model_id, "data": data_sha256, "samples": samples,
                       "seq_len": seq_len}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Accumulator:
    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.amax: dict[str, torch.Tensor] = {}

    def add(self, site: str, x: torch.Tensor, slot: int | None = None, slots: int = 0) -> None:
        """x [tokens, C]; slot: the expert index for per-expert sites (then stats are [slots, ...])."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        channels = x.shape[-1]
        if site not in self.counts:
            lead = (slots,) if slot is not None else ()
            self.sums[site + ".mean_abs"] = torch.zeros(*lead, channels, dtype=torch.float64)
            self.sums[site + ".gram"] = torch.zeros(*lead, channels, channels, dtype=torch.float64)
            self.counts[site] = torch.zeros(lead, dtype=torch.float64)
            self.amax[site] = torch.zeros(lead, dtype=torch.float64)
        index = (slot,) if slot is not None else ()
        if x.shape[0] == 0:
            return
        self.sums[site + ".mean_abs"][index] += x.abs().sum(0)
        self.sums[site + ".gram"][index] += x.T @ x
        self.counts[site][index] += x.shape[0]
        self.amax[site][index] = torch.maximum(self.amax[site][index], x.abs().max())

    def result(self) -> dict[str, np.ndarray]:
        out = {}
        for site, count in self.counts.items():
            denom = count.clamp(min=1)
            out[site + ".mean_abs"] = (self.sums[site + ".mean_abs"] / denom[..., None]).float().numpy()
            out[site + ".gram"] = (self.sums[site + ".gram"] / denom[..., None, None]).float().numpy()
            out[site + ".amax"] = self.amax[site].float().numpy().reshape(count.shape)
            out[site + ".tokens"] = count.float().numpy()
        return out


@torch.no_grad()
def collect_statistics(model, samples: np.ndarray, progress=None) -> dict[str, np.ndarray]:
    """Run the fp32 PyTorch model on [samples, seq_len] token ids with hooks; return the site statistics."""
    from ..model.modeling import MLP, MoE

    acc = _Accumulator()
    handles = []

    def pre_hook(site):
        def hook(module, args):
            acc.add(site, args[0])
        return hook

    def moe_hook(layer):
        def hook(module: MoE, args):
            flat = args[0].reshape(-1, args[0].shape[-1])
            index, score = module.route(flat)
            routed = flat * score[:, None]
            experts = module.experts.gate_up_proj.shape[0]
            for e in range(experts):
                rows = routed[index == e]
                acc.add(f"layers.{layer}.expert_in", rows, slot=e, slots=experts)
                gate, up = (rows @ module.experts.gate_up_proj[e]).chunk(2, dim=-1)
                acc.add(f"layers.{layer}.expert_down_in", F.silu(gate) * up, slot=e, slots=experts)
        return hook

    for layer, block in enumerate(model.model.layers):
        attn, ff = block.self_attn, block.feed_forward
        handles.append(attn.q_proj.register_forward_pre_hook(pre_hook(f"layers.{layer}.attn_in")))
        handles.append(attn.o_proj.register_forward_pre_hook(pre_hook(f"layers.{layer}.o_in")))
        handles.append(ff.register_forward_pre_hook(pre_hook(f"layers.{layer}.mlp_in")))
        mlp = ff.shared_expert if isinstance(ff, MoE) else ff
        assert isinstance(mlp, MLP)
        handles.append(mlp.down_proj.register_forward_pre_hook(pre_hook(f"layers.{layer}.down_in")))
        if isinstance(ff, MoE):
            handles.append(ff.register_forward_pre_hook(moe_hook(layer)))
    handles.append(model.lm_head.register_forward_pre_hook(pre_hook("final_in")))
    try:
        for i, row in enumerate(samples):
            model(torch.from_numpy(row[None]))
            if progress is not None:
                progress(i + 1, len(samples))
    finally:
        for handle in handles:
            handle.remove()
    return acc.result()


def save_cache(path: Path, stats: dict[str, np.ndarray], key: str, settings: dict) -> None:
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # One metadata entry: safetensors writes a metadata map in hash order, so two entries would make the bytes vary.
    save_file({k: np.ascontiguousarray(stats[k]) for k in sorted(stats)}, str(tmp),
              metadata={METADATA: json.dumps({"key": key, "settings": settings}, sort_keys=True)})
    tmp.replace(path)


def load_cache(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached statistics when `path` holds a cache for `key`; None when absent or made for other inputs."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "np") as f:
            if json.loads((f.metadata() or {}).get(METADATA, "{}")).get("key") != key:
                return None
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise CalibrationError(f"{path}: not a readable calibration cache ({exc}); delete it or give another --calib-cache") from None
