"""Llama4Config: the text model's shape and semantics, from a Hugging Face config.json or a named preset."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, is_integer


SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "vocab_size", "intermediate_size", "intermediate_size_mlp", "num_local_experts", "num_experts_per_tok",
               "attention_chunk_size", "max_position_embeddings", "no_rope_layer_interval", "interleave_moe_layer_step")
DERIVED_WHEN_0 = ("num_key_value_heads", "head_dim", "intermediate_size_mlp")


@dataclass(frozen=True)
class RopeScaling:
    """llama3 frequency scaling (DESIGN.md §3)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class Llama4Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of each routed expert and of the shared expert
    intermediate_size_mlp: int  # width of the dense MLP on non-MoE layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    moe_layers: tuple[int, ...]
    no_rope_layers: tuple[int, ...]  # 1 = RoPE (chunked attention), 0 = NoPE (global attention)
    attention_chunk_size: int | None
    use_qk_norm: bool
    attn_temperature_tuning: bool
    floor_scale: int
    attn_scale: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    num_experts_per_tok: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        problems = []
        if len(self.no_rope_layers) < n:
            problems.append(f"no_rope_layers has {len(self.no_rope_layers)} entries for {n} layers")
        if any(i < 0 or i >= n for i in self.moe_layers):
            problems.append(f"moe_layers {list(self.moe_layers)} names layers outside 0..{n - 1}")
        elif len(set(self.moe_layers)) < len(self.moe_layers):
            problems.append(f"moe_layers {list(self.moe_layers)} names a layer twice")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            problems.append("head_dim must be even for RoPE")
        if self.num_experts_per_tok != 1:
            problems.append(f"num_experts_per_tok={self.num_experts_per_tok}: Llama 4 routes top-1 only")
        if problems:
            raise ConfigError(f"invalid Llama 4 config ({self.name}): " + "; ".join(problems))

    # --- per-layer structure -------------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        """RoPE layers attend within chunks; NoPE layers attend globally (DESIGN.md §3)."""
        return bool(self.no_rope_layers[layer])

    def layer_kind(self, layer: int) -> str:
        ffn = "moe" if self.is_moe_layer(layer) else "dense"
        attn = "chunked" if self.uses_rope(layer) else "global"
        return f"{ffn}/{attn}"

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> "Llama4Config":
        return dataclasses.replace(self, **changes)

    # --- Hugging Face round trip ---------------------------------------------------------------------------
    def first_layers(self, layers: int, what: str = "the model") -> "Llama4Config":
        """This model cut to its first `layers` decoder layers (same layer kinds in the same places)."""
        if not 1 <= layers <= self.num_hidden_layers:
            raise ConfigError(f"--layers {layers}: {what} has {self.num_hidden_layers} layers; choose 1..{self.num_hidden_layers}")
        return self.replace(num_hidden_layers=layers, moe_layers=tuple(i for i in self.moe_layers if i < layers),
                            no_rope_layers=self.no_rope_layers[:layers])

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 style `llama4_text` config.json dict (what `save_pretrained` writes)."""
        if self.rope_scaling is None:
            rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["Llama4ForCausalLM"],
            "model_type": "llama4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "intermediate_size_mlp": self.intermediate_size_mlp,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_layers": list(self.moe_layers),
            "no_rope_layers": list(self.no_rope_layers),
            "layer_types": ["chunked_attention" if r else "full_attention" for r in self.no_rope_layers],
            "attention_chunk_size": self.attention_chunk_size,
            "use_qk_norm": self.use_qk_norm,
            "attn_temperature_tuning": self.attn_temperature_tuning,
            "floor_scale": self.floor_scale,
            "attn_scale": self.attn_scale,
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "dtype": "bfloat16",
        }

    @classmethod
    def from_manifest(cls, manifest: Any, source: str) -> "Llama4Config":
        """The text config an artifact's manifest records (its `model` entry: the source's config.json)."""
        raw = manifest.get("model") if isinstance(manifest, dict) else None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: has no 'model' config object; re-run the export")
        return cls.from_hf_dict(raw, source=source)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Llama4Config":
        """Parse a `llama4_text` or multimodal `llama4` config, from older or newer transformers or Meta's release."""
        cfg = raw.get("text_config", raw) if raw.get("model_type") == "llama4" or "text_config" in raw else raw
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{source}: 'text_config' is not an object; is this a Llama 4 checkpoint?")
        model_type = cfg.get("model_type", "llama4_text")
        if model_type not in ("llama4_text", "llama4"):
            raise CheckpointError(f"{source}: model_type {model_type!r} is not Llama 4 (expected 'llama4_text' or 'llama4')")

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise CheckpointError(f"{source}: required field {key!r} is missing; the config is not a complete Llama 4 text config")
            return cfg[key]

        for key in SIZE_FIELDS:  # a 0 divides by zero later (heads, a chunk's positions) or makes an empty model
            value = cfg.get(key)
            if value is None or key in DERIVED_WHEN_0 and is_integer(value) and value == 0:
                continue  # `head_dim or hidden // heads`, as transformers reads it
            if not is_integer(value):  # 256.5 and "256" were taken as 256, true as 1
                raise CheckpointError(f"{source}: {key}={json.dumps(value)}: must be an integer; fix the value or "
                                      "re-save the config")
            if value < 1:
                raise CheckpointError(f"{source}: {key}={value}: must be >= 1; fix the value or re-save the config")
        tied = cfg.get("tie_word_embeddings", raw.get("tie_word_embeddings"))
        if tied is not None and not isinstance(tied, bool):  # "false", a string, was taken as true
            raise CheckpointError(f"{source}: tie_word_embeddings={json.dumps(tied)}: must be true or false; fix the "
                                  "value or re-save the config")
        for key in ("moe_layers", "no_rope_layers"):
            value = cfg.get(key)
            if value is not None and not (isinstance(value, list) and all(is_integer(i) for i in value)):
                raise CheckpointError(f"{source}: {key}={json.dumps(value)}: must be a list of integers; fix the value "
                                      "or re-save the config")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # true and 2.5 were taken as ids 1 and 2
            value = cfg.get(key)
            ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
            if value is not None and not all(is_integer(i) for i in ids):
                listed = " or a list of token ids" if key == "eos_token_id" else ""
                raise CheckpointError(f"{source}: {key}={json.dumps(value)}: must be a token id{listed}; fix the value "
                                      "or re-save the config")
        if any(flag not in (0, 1) for flag in cfg.get("no_rope_layers") or ()):
            raise CheckpointError(f"{source}: no_rope_layers={json.dumps(cfg['no_rope_layers'])}: each entry is 1 (RoPE) "
                                  "or 0 (NoPE); fix the value or re-save the config")
        try:
            n_layers = int(need("num_hidden_layers"))
            hidden = int(need("hidden_size"))
            heads = int(need("num_attention_heads"))
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            if cfg.get("hidden_act", "silu") != "silu":
                raise CheckpointError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (Llama 4 uses 'silu')")
            if cfg.get("attention_bias"):
                raise CheckpointError(f"{source}: attention_bias=true is not supported (Llama 4 has no attention biases)")

            interval = int(cfg.get("no_rope_layer_interval", 4))
            no_rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
            step = int(cfg.get("interleave_moe_layer_step", 1))
            moe_layers = cfg.get("moe_layers")
            if moe_layers is None:
                moe_layers = list(range(step - 1, n_layers, step))

            rope_theta, rope_scaling = _parse_rope(cfg, source)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                vocab_size=int(need("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(need("intermediate_size")),
                intermediate_size_mlp=int(cfg.get("intermediate_size_mlp") or need("intermediate_size")),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                num_local_experts=int(need("num_local_experts")),
                num_experts_per_tok=int(cfg.get("num_experts_per_tok", 1)),
                moe_layers=tuple(int(i) for i in moe_layers),
                no_rope_layers=tuple(int(x) for x in no_rope),
                attention_chunk_size=None if cfg.get("attention_chunk_size") is None else int(cfg["attention_chunk_size"]),
                use_qk_norm=bool(cfg.get("use_qk_norm", True)),
                # Meta's release writes an int here (e.g. 4); any truthy value switches tuning on.
                attn_temperature_tuning=bool(cfg.get("attn_temperature_tuning", True)),
                floor_scale=int(cfg.get("floor_scale", 8192)),
                attn_scale=float(cfg.get("attn_scale", 0.1)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos_ids,
                pad_token_id=cfg.get("pad_token_id"),
                name=source,
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: malformed field ({exc}); fix the value or re-save the config") from None
        except ConfigError as exc:  # the fields' consistency (__post_init__): the file's problem, as the rest here
            raise CheckpointError(str(exc)) from None


def read_config_json(path: Path) -> dict[str, Any]:
    """A checkpoint's config.json as a dict; CheckpointError naming the file when it is missing or not a JSON object."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (Path(path).parent / "manifest.json").is_file():
            raise CheckpointError(f"{Path(path).parent}: an exported artifact (manifest.json), not a Hugging Face "
                                  "checkpoint; give the checkpoint it was exported from (or --model PRESET for a "
                                  "preset's)") from None
        raise CheckpointError(f"{path}: config.json not found; a Hugging Face checkpoint directory needs one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); re-save the config") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def _parse_rope(cfg: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """transformers < 5 writes `rope_theta` + `rope_scaling`; transformers 5 writes `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 500000.0)))
    rope_type = params.get("rope_type", "default")
    if rope_type == "default" and scaling:
        params, rope_type = scaling, scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in ("default", None):
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (Llama 4 uses 'llama3' or none)")
    try:
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise CheckpointError(f"{source}: llama3 rope scaling lacks {exc.args[0]!r}") from None


@dataclass(frozen=True)
class Llama4VisionConfig:
    """The vision half of a multimodal (`Llama4ForConditionalGeneration`) config: the encoder over image tiles, its
    pixel-shuffle adapter, and the projector into the text model, whose `<|patch|>` rows the features replace."""

    image_size: int  # side of one square tile, pixels
    patch_size: int  # side of one square patch, pixels
    num_channels: int
    hidden_size: int
    intermediate_size: int  # encoder MLP width, and the width of the pixel-shuffled patches the adapter takes
    num_hidden_layers: int
    num_attention_heads: int
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    rope_theta: float
    text_hidden_size: int
    image_token_id: int  # the placeholder token (`<|patch|>`) whose embeddings become image features
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be a multiple of num_attention_heads")
        elif self.head_dim % 4:
            problems.append(f"head_dim {self.head_dim} must be a multiple of 4 (2D RoPE gives half its pairs to x, half to y)")
        side, ratio = self.image_size // self.patch_size, self.pixel_shuffle_ratio
        if not (0 < ratio <= 1 and (side * ratio).is_integer() and (self.hidden_size / ratio**2).is_integer()):
            problems.append(f"pixel_shuffle_ratio {ratio} does not divide {side} patches per side and hidden_size {self.hidden_size}")
        elif self.intermediate_size != self.shuffled_size:
            problems.append(f"intermediate_size {self.intermediate_size} must equal hidden_size / pixel_shuffle_ratio² = "
                            f"{self.shuffled_size} (the adapter's first layer takes the pixel-shuffled patches)")
        if self.projector_input_dim != self.projector_output_dim:
            problems.append("projector_input_dim must equal projector_output_dim (the adapter's second layer is square)")
        if self.vision_output_dim != self.projector_output_dim:
            problems.append("vision_output_dim must equal projector_output_dim (the projector takes the adapter's output)")
        if problems:
            raise ConfigError(f"invalid Llama 4 vision config ({self.name}): " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def shuffled_side(self) -> int:
        """Patches per side after the pixel shuffle."""
        return int(self.patches_per_side * self.pixel_shuffle_ratio)

    @property
    def shuffled_size(self) -> int:
        """Channels of one patch after the pixel shuffle (ratio² of them merged)."""
        return int(self.hidden_size / self.pixel_shuffle_ratio**2)

    @property
    def tokens_per_tile(self) -> int:
        """Text positions one image tile fills: the patches left after the pixel shuffle (Scout: (336/14 · 0.5)² = 144)."""
        return self.shuffled_side**2

    def to_dict(self) -> dict[str, Any]:
        """The fields (an artifact manifest's `vision.config`); `from_dict` reads them back."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}

    @classmethod
    def from_dict(cls, fields: Any, source: str) -> "Llama4VisionConfig":
        try:
            return cls(**fields, name=source)
        except TypeError as exc:
            raise ConfigError(f"{source}: not a vision config ({exc}); re-run the export") from None

    @classmethod
    def from_manifest(cls, entry: Any, source: str) -> "Llama4VisionConfig":
        """The tower config of an artifact manifest's `vision` entry."""
        fields = entry.get("config") if isinstance(entry, dict) else None
        if not isinstance(fields, dict):
            raise ConfigError(f"{source}: the vision entry has no config object; re-run the export")
        return cls.from_dict(fields, source)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "Llama4VisionConfig | None":
        """The vision half of a multimodal `llama4` config (older or newer transformers spellings); None when the config
        has no `vision_config` (a text-only checkpoint)."""
        vision = raw.get("vision_config")
        if vision is None:
            return None
        text = raw.get("text_config")
        if not isinstance(vision, dict) or not isinstance(text, dict):
            raise CheckpointError(f"{source}: 'vision_config' and 'text_config' must both be objects in a multimodal Llama 4 config")

        def need(cfg: dict[str, Any], key: str, where: str) -> Any:
            if cfg.get(key) is None:
                raise CheckpointError(f"{source}: required field '{where}{key}' is missing; the config is not a complete "
                                      "Llama 4 multimodal config")
            return cfg[key]

        def size(key: str, value: Any = None) -> int:
            """A size of the tower: an integer >= 1, as the text config's (256.5, "336" and -3 were taken; 0 divided
            by zero)."""
            value = need(vision, key, "vision_config.") if value is None else value
            if not is_integer(value):
                raise CheckpointError(f"{source}: vision_config.{key}={json.dumps(value)}: must be an integer; fix the "
                                      "value or re-save the config")
            if value < 1:
                raise CheckpointError(f"{source}: vision_config.{key}={value}: must be >= 1; fix the value or re-save "
                                      "the config")
            return int(value)

        def square(key: str) -> int:
            value = need(vision, key, "vision_config.")
            if isinstance(value, list) and len(value) == 2 and value[0] == value[1]:
                value = value[0]
            if isinstance(value, list):
                raise CheckpointError(f"{source}: vision_config.{key} {value} is not square; Llama 4 tiles are square")
            return size(key, value)

        if vision.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{source}: vision_config.hidden_act {vision['hidden_act']!r} is not supported (Llama 4 uses 'gelu')")
        # transformers 5 nests the theta in rope_parameters; older releases and Meta's files write rope_theta.
        rope = vision.get("rope_parameters") or {}
        token = raw.get("image_token_index", raw.get("image_token_id"))
        if token is None:
            raise CheckpointError(f"{source}: required field 'image_token_index' is missing; a multimodal config names "
                                  "the token whose embeddings the image features replace")
        try:
            return cls(
                image_size=square("image_size"),
                patch_size=square("patch_size"),
                num_channels=size("num_channels", vision.get("num_channels", 3)),
                hidden_size=size("hidden_size"),
                intermediate_size=size("intermediate_size"),
                num_hidden_layers=size("num_hidden_layers"),
                num_attention_heads=size("num_attention_heads"),
                pixel_shuffle_ratio=float(need(vision, "pixel_shuffle_ratio", "vision_config.")),
                projector_input_dim=size("projector_input_dim"),
                projector_output_dim=size("projector_output_dim"),
                vision_output_dim=size("vision_output_dim"),
                rope_theta=float(rope.get("rope_theta", vision.get("rope_theta", 10000.0))),  # transformers' default
                text_hidden_size=int(need(text, "hidden_size", "text_config.")),
                image_token_id=int(token),
                name=source,
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: malformed vision_config field ({exc}); fix the value or re-save the config") from None


# --- presets ------------------------------------------------------------------------------------------------
def _every(n_layers: int, interval: int) -> tuple[int, ...]:
    """no_rope_layers with a NoPE layer every `interval` layers (3, 7, 11, ... for interval 4)."""
    return tuple(int((i + 1) % interval != 0) for i in range(n_layers))


def _moe_layers(n_layers: int, step: int) -> tuple[int, ...]:
    return tuple(range(step - 1, n_layers, step))


_SCOUT_ROPE = RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_max_position_embeddings=8192)
_LLAMA4_TOKENS = dict(bos_token_id=200000, eos_token_id=(200001, 200007, 200008), pad_token_id=200018)
_FULL = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
    num_attention_heads=40, num_key_value_heads=8, head_dim=128, attention_chunk_size=8192, attn_temperature_tuning=True,
    floor_scale=8192, attn_scale=0.1, rope_theta=500000.0, no_rope_layers=_every(48, 4), **_LLAMA4_TOKENS,
)
# Tiny presets keep every feature of their big sibling at a few MB: MoE + shared expert, interleave, NoPE every
# 4th layer with temperature tuning that actually changes values (small floor_scale), chunked attention with a
# chunk small enough to cross in a short test, QK norm as in the big model, and Scout's llama3 rope scaling.
_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, intermediate_size_mlp=160, num_hidden_layers=8,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=16, attn_temperature_tuning=True,
    floor_scale=8, attn_scale=0.1, rope_theta=500000.0, no_rope_layers=_every(8, 4), max_position_embeddings=4096,
    bos_token_id=256, eos_token_id=(257,), pad_token_id=258,
)

PRESETS: dict[str, Llama4Config] = {
    "scout": Llama4Config(
        **_FULL, num_local_experts=16, moe_layers=_moe_layers(48, 1), use_qk_norm=True, rope_scaling=_SCOUT_ROPE,
        max_position_embeddings=10485760, name="scout",
    ),
    "maverick": Llama4Config(
        **_FULL, num_local_experts=128, moe_layers=_moe_layers(48, 2), use_qk_norm=False, rope_scaling=None,
        max_position_embeddings=1048576, name="maverick",
    ),
    # Behemoth's weights are unreleased and its exact shapes unpublished: this shape preset is chosen to match the
    # announced 16 experts, ~288B active and ~2T total parameters (see README).
    "behemoth": Llama4Config(
        **{**_FULL, "hidden_size": 16384, "intermediate_size": 38912, "intermediate_size_mlp": 77824,
           "num_hidden_layers": 64, "num_attention_heads": 128, "no_rope_layers": _every(64, 4)},
        num_local_experts=16, moe_layers=_moe_layers(64, 1), use_qk_norm=True, rope_scaling=_SCOUT_ROPE,
        max_position_embeddings=10485760, name="behemoth",
    ),
    "scout-tiny": Llama4Config(
        **_TINY, num_local_experts=4, moe_layers=_moe_layers(8, 1), use_qk_norm=True,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
        name="scout-tiny",
    ),
    "maverick-tiny": Llama4Config(
        **_TINY, num_local_experts=8, moe_layers=_moe_layers(8, 2), use_qk_norm=False, rope_scaling=None,
        name="maverick-tiny",
    ),
}


# Scout's and Maverick's published vision towers are the same (config.json `vision_config`; image_token_index 200092).
_FULL_VISION = dict(
    image_size=336, patch_size=14, num_channels=3, hidden_size=1408, intermediate_size=5632, num_hidden_layers=34,
    num_attention_heads=16, pixel_shuffle_ratio=0.5, projector_input_dim=4096, projector_output_dim=4096,
    vision_output_dim=4096, rope_theta=10000.0, text_hidden_size=5120, image_token_id=200092,
)
VISION_PRESETS: dict[str, Llama4VisionConfig] = {
    name: Llama4VisionConfig(**_FULL_VISION, name=name) for name in ("scout", "maverick")
}


def get_vision_preset(name: str) -> Llama4VisionConfig | None:
    """The preset's vision tower, or None for a text-only preset (the tiny ones, Behemoth's unpublished one)."""
    get_preset(name)  # an unknown name fails as it does for the text config
    return VISION_PRESETS.get(name)


def get_preset(name: str, layers: int | None = None) -> Llama4Config:
    """The preset, or its first `layers` decoder layers (same layer kinds in the same places)."""
    try:
        config = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None
    if layers is None:
        return config
    return config.first_layers(layers, f"preset {name}")


# A checkpoint directory's files, as far as reading its configs needs them (no torch: inspect and plan of a checkpoint
# that is config.json alone run on the base install).
INDEX_FILE = "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pth", ".pt")  # torch.save's weights: named in the refusal, never loaded


def checkpoint_configs(checkpoint_dir: str | Path) -> tuple[Llama4Config, Llama4VisionConfig | None]:
    """The text and vision configs of a checkpoint directory's config.json (its weights not looked at)."""
    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        problem = "is a file, not a checkpoint directory" if ckpt.exists() else "checkpoint directory not found"
        raise CheckpointError(f"{ckpt}: {problem}; pass a directory holding config.json and *.safetensors")
    raw = read_config_json(ckpt / "config.json")
    config = Llama4Config.from_hf_dict(raw, source=str(ckpt / "config.json")).replace(name=ckpt.name)
    return config, Llama4VisionConfig.from_hf_dict(raw, source=str(ckpt / "config.json"))


def holds_weights(checkpoint_dir: str | Path) -> bool:
    """Whether the directory has any weights (safetensors, their index, or pickled ones, which are refused) — else it
    is config.json alone."""
    ckpt = Path(checkpoint_dir)
    return (ckpt / INDEX_FILE).exists() or any(p.suffix in (".safetensors", *PICKLED_SUFFIXES) for p in ckpt.iterdir())
