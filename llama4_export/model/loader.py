"""A Hugging Face checkpoint directory (safetensors only) checked against its config from the headers alone; the
weights are read through weights.CheckpointWeights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .config import (INDEX_FILE, PICKLED_SUFFIXES, Llama4Config, Llama4VisionConfig, checkpoint_configs,
                     read_config_json)
from .modeling import Llama4ForCausalLM
from .vision import Llama4VisionEncoder

SINGLE_FILE = "model.safetensors"
# Multimodal Llama4ForConditionalGeneration checkpoints keep the text model under this prefix, the vision encoder and
# projector under Llama4VisionEncoder's own parameter names (vision_model.*, multi_modal_projector.*).
MULTIMODAL_PREFIX = "language_model."
# Some tools write Llama 4 in transformers' newer VLM layout (model.language_model.*, model.vision_model.*); transformers'
# Llama4ForConditionalGeneration and the hub's checkpoints keep language_model.model.*, vision_model.*
RENAMED_MULTIMODAL_PREFIX = "model.language_model."
_STORED_DTYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class CheckpointIndex:
    """What a checkpoint holds, validated against its config from the safetensors headers alone (no tensor data read)."""

    directory: Path
    config: Llama4Config
    files: dict[str, tuple[str, Path]]  # our parameter name -> (key in the file, shard path)
    stored_dtypes: dict[str, int]  # safetensors dtype -> number of tensors
    weight_file_bytes: int
    vision: Llama4VisionConfig | None = None  # None: a text-only checkpoint
    vision_files: dict[str, tuple[str, Path]] = field(default_factory=dict)  # Llama4VisionEncoder parameter -> location


def check_checkpoint(checkpoint_dir: str | Path) -> CheckpointIndex:
    """Validate names and shapes of every tensor against config.json (the text model's, and the vision encoder's when
    config.json has a vision_config); raise CheckpointError naming the first problem."""
    ckpt = Path(checkpoint_dir)
    config, vision = checkpoint_configs(ckpt)
    _refuse_quantized(ckpt / "config.json")
    locations = _tensor_locations(ckpt)

    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in Llama4ForCausalLM(config).named_parameters()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    prefix = MULTIMODAL_PREFIX if any(k.startswith(MULTIMODAL_PREFIX) for k in locations) else ""
    if not prefix and any(k.startswith(RENAMED_MULTIMODAL_PREFIX) for k in locations):  # was "… (and 43 more) is missing"
        raise CheckpointError(f"{ckpt}: tensor names use the {RENAMED_MULTIMODAL_PREFIX}* / model.vision_model.* layout; "
                              "this loader reads Llama4ForConditionalGeneration's (as on the hub): rename "
                              "model.language_model.* to language_model.model.*, lm_head.* to language_model.lm_head.*, "
                              "model.vision_model.* to vision_model.* and model.multi_modal_projector.* to "
                              "multi_modal_projector.*")
    found = {k[len(prefix):]: (k, f) for k, f in locations.items() if k.startswith(prefix)}
    _check_names(ckpt, found, expected, prefix)
    dtypes = _check_shapes(found, expected, {})

    vision_files: dict[str, tuple[str, Path]] = {}
    if vision is not None:  # a config without vision_config leaves any vision tensors unread, as before
        if not prefix:
            raise CheckpointError(f"{ckpt / 'config.json'}: has a vision_config but the text weights are not under "
                                  f"{MULTIMODAL_PREFIX!r}; this is not a Llama4ForConditionalGeneration checkpoint")
        with torch.device("meta"):
            expected_vision = {name: tuple(p.shape) for name, p in Llama4VisionEncoder(vision).named_parameters()}
        vision_files = {k: (k, f) for k, f in locations.items() if not k.startswith(prefix)}
        _check_names(ckpt, vision_files, expected_vision, "")
        dtypes = _check_shapes(vision_files, expected_vision, dtypes)
        vision_files = {n: vision_files[n] for n in sorted(expected_vision)}
    nbytes = sum(p.stat().st_size for p in set(locations.values()))
    return CheckpointIndex(ckpt, config, {n: found[n] for n in sorted(expected)}, dict(sorted(dtypes.items())), nbytes,
                           vision, vision_files)


def _refuse_quantized(config_file: Path) -> None:
    """Meta's -FP8 releases (fbgemm_fp8; compressed-tensors elsewhere) store float8 weights with `*_scale` tensors, which
    were refused as an "unexpected tensor" naming no way out."""
    raw = read_config_json(config_file)
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    quant = raw.get("quantization_config", text.get("quantization_config"))
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise CheckpointError(f"{config_file}: quantization_config (quant_method {method!r}): a pre-quantized "
                              "checkpoint; export from the unquantized (bf16) release, --precision fp8 or int4 "
                              "quantizes it here")


def _check_names(ckpt: Path, found: dict[str, tuple[str, Path]], expected: dict[str, tuple[int, ...]], prefix: str) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt}: tensor {prefix + missing[0]!r}{more} is missing from the checkpoint; it does not match its config.json")
    unexpected = sorted(set(found) - set(expected))
    scales = [name for name in unexpected if name.endswith("_scale") and name.removesuffix("_scale") in expected]
    if scales:  # fbgemm_fp8's gate_up_proj_scale, compressed-tensors' weight_scale
        key, path = found[scales[0]]
        raise _fp8_without_quantization_config(path, key, "is an FP8 weight's scale")
    if unexpected:
        key, path = found[unexpected[0]]
        raise CheckpointError(f"{path}: unexpected tensor {key!r}; the checkpoint holds weights its config.json does not describe")


def _check_shapes(found: dict[str, tuple[str, Path]], expected: dict[str, tuple[int, ...]], dtypes: dict[str, int]
                  ) -> dict[str, int]:
    """Every expected tensor's shape and stored dtype from the headers; returns `dtypes` counted on."""
    dtypes = dict(dtypes)
    for path, names in _group_by_file(found, expected).items():
        with _open(path) as f:
            for name in names:
                key = found[name][0]
                tensor_slice = f.get_slice(key)
                shape, dtype = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{path}: tensor {key!r} has shape {list(shape)}, config.json implies {list(expected[name])}; "
                        "the weights and config do not belong together"
                    )
                if dtype.startswith("F8"):
                    raise _fp8_without_quantization_config(path, key, f"is stored as {dtype}")
                if dtype not in _STORED_DTYPES:
                    raise CheckpointError(f"{path}: tensor {key!r} is stored as {dtype}; supported: {', '.join(sorted(_STORED_DTYPES))}")
                dtypes[dtype] = dtypes.get(dtype, 0) + 1
    return dtypes


def _fp8_without_quantization_config(path: Path, key: str, what: str) -> CheckpointError:
    """float8 weights whose config.json lost its quantization_config (which _refuse_quantized names) were refused as an
    "unexpected tensor" or a dtype, naming no way out."""
    return CheckpointError(f"{path}: tensor {key!r} {what}: the checkpoint has FP8 weights but its config.json has no "
                           "quantization_config; pre-quantized checkpoints are not read: export from the unquantized "
                           "(bf16) release, --precision fp8 or int4 quantizes it here")


def _group_by_file(found: dict[str, tuple[str, Path]], wanted) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name in sorted(wanted):
        by_file.setdefault(found[name][1], []).append(name)
    return dict(sorted(by_file.items()))


def _tensor_locations(ckpt: Path) -> dict[str, Path]:
    """Map every tensor name to the shard holding it, reading only safetensors headers."""
    index = ckpt / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r}); re-save the checkpoint") from None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must be an object of tensor name → shard file name (a "
                                  "string); re-save the checkpoint")
        # a shard beside the index, never elsewhere: an index is data, and may come from anywhere
        outside = sorted(s for s in set(weight_map.values()) if Path(s).is_absolute() or ".." in Path(s).parts)
        if outside:
            raise CheckpointError(f"{index}: shard {outside[0]!r} is outside the checkpoint directory; an index names "
                                  "shards by their file names in it")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (ckpt / shard).is_file():
                raise CheckpointError(f"{ckpt / shard}: shard listed in {INDEX_FILE} is missing; download it again")
        locations: dict[str, Path] = {}
        for shard in shards:
            with _open(ckpt / shard) as f:
                for key in f.keys():
                    if key in locations:  # which copy is meant? transformers silently takes the last shard's
                        raise CheckpointError(f"{ckpt / shard}: tensor {key!r} is also in {locations[key].name}; a "
                                              "tensor is in one shard only (these come from different saves): "
                                              "re-download the checkpoint")
                    locations[key] = ckpt / shard
        listed_elsewhere = sorted(k for k, s in weight_map.items() if locations.get(k) != ckpt / s)
        if listed_elsewhere:
            k = listed_elsewhere[0]
            raise CheckpointError(f"{ckpt / weight_map[k]}: tensor {k!r} listed in {INDEX_FILE} is not in this shard; the shard is stale or wrong")
        return locations
    single = ckpt / SINGLE_FILE
    if single.exists():
        with _open(single) as f:
            return {k: single for k in f.keys()}
    others = sorted(p.name for p in ckpt.iterdir() if p.suffix in PICKLED_SUFFIXES)
    hint = f" (found {others[0]}: pickled weights are never loaded; convert them to safetensors)" if others else ""
    raise CheckpointError(f"{ckpt}: no {INDEX_FILE} or {SINGLE_FILE}{hint}")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); the shard is truncated or corrupt, re-download it") from None
