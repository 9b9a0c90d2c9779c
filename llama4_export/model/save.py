"""Write a model as a Hugging Face checkpoint (config.json + safetensors, sharded with an index when large)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..artifact import atomic_directory, write_json
from .loader import INDEX_FILE, SINGLE_FILE
from .modeling import Llama4ForCausalLM


def save_checkpoint(
    model: Llama4ForCausalLM, directory: str | Path, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int | None = None
) -> Path:
    """Same layout `save_pretrained` writes, so transformers and our loader both read it."""
    config = model.config
    state = {name: t.detach().to(dtype).contiguous() for name, t in sorted(model.state_dict().items())}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    target = Path(directory)
    with atomic_directory(target) as tmp:
        hf_config = config.to_hf_dict()
        hf_config["dtype"] = str(dtype).removeprefix("torch.")
        write_json(tmp / "config.json", hf_config)
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map.update({name: file for name in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return target
