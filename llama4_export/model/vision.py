"""Llama 4's vision encoder in plain PyTorch, exact against transformers' Llama4VisionModel + Llama4MultiModalProjector.

One image tile [3, S, S] becomes `tokens_per_tile` rows of the text model's hidden size:

  patches   S/p × S/p patches of p×p×3 pixels, flattened channel-major, through one linear (HF's unfold "convolution")
  + class   a learned class embedding appended AFTER the patches, then a learned positional embedding, LayerNorm
  encoder   pre-LayerNorm layers: attention with biases and 2D RoPE (non-causal), GELU MLP with biases
  adapter   LayerNorm, class token dropped, pixel shuffle (ratio r: r²·patches of hidden/r² channels), GELU MLP whose
            output also goes through GELU
  projector one linear to the text model's hidden size

Export-friendly by construction: only reshapes, transposes and matmuls with sizes fixed by the config (the tile count
is the one free dimension), and the 2D RoPE as precomputed cos/sin tables applied with real tensors (transformers
multiplies complex numbers, which torch.onnx cannot export). Parameter names are the checkpoint's with the
`vision_model.` / `multi_modal_projector.` prefixes, so a multimodal checkpoint's vision tensors load 1:1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Llama4VisionConfig
from .modeling import apply_rope

# transformers builds every vision LayerNorm with PyTorch's default eps and ignores vision_config.norm_eps (1e-5 in
# every published config); exactness against it means the same constant.
LAYER_NORM_EPS = 1e-5


def vision_rope_tables(config: Llama4VisionConfig) -> tuple[Tensor, Tensor]:
    """cos, sin [patches + 1, head_dim / 2] of the 2D RoPE, fp32. The first half of the rotary pairs turns with the
    patch's column, the second half with its row (both counted from 1); the class token (last row) does not turn."""
    side, pairs = config.patches_per_side, config.head_dim // 2
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, pairs, 2)[: pairs // 2].float() / pairs))
    index = torch.arange(side * side)
    column, row = (index % side + 1).float(), (index // side + 1).float()
    angles = torch.cat([column[:, None] * freqs, row[:, None] * freqs], dim=-1)
    angles = torch.cat([angles, torch.zeros(1, pairs)])  # class token
    return torch.cos(angles), torch.sin(angles)


class VisionAttention(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.o_proj = nn.Linear(h, h)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        n, t, h = x.shape
        q = self.q_proj(x).view(n, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(n, t, self.heads, self.head_dim)
        v = self.v_proj(x).view(n, t, self.heads, self.head_dim)
        q, k = apply_rope(q, cos[None], sin[None]), apply_rope(k, cos[None], sin[None])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [N, heads, T, D]
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5, dim=-1)
        return self.o_proj(torch.matmul(probs, v).transpose(1, 2).reshape(n, t, h))


class VisionMLP(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionLayers(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class PatchEmbedding(nn.Module):
    """p×p×3 patches, flattened channel-major (channel, then row, then column: nn.Unfold's order), through a linear."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.side, self.patch, self.channels = config.patches_per_side, config.patch_size, config.num_channels
        self.linear = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size, bias=False)

    def forward(self, pixels: Tensor) -> Tensor:
        s, p, c = self.side, self.patch, self.channels
        patches = pixels.reshape(-1, c, s, p, s, p).permute(0, 2, 4, 1, 3, 5)  # [N, row, column, channel, py, px]
        return self.linear(patches.reshape(-1, s * s, c * p * p))


class PixelShuffleMLP(nn.Module):
    """Pixel shuffle then a two-layer GELU MLP (GELU after both layers, no biases)."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.side, self.ratio = config.patches_per_side, config.pixel_shuffle_ratio
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False)
        self.mlp.fc2 = nn.Linear(config.projector_output_dim, config.projector_output_dim, bias=False)

    def pixel_shuffle(self, x: Tensor) -> Tensor:
        """[N, side², C] → [N, (side·r)², C/r²]: neighbouring patches merged into channels, as transformers orders them."""
        side, r, c = self.side, self.ratio, x.shape[-1]
        x = x.reshape(-1, side, int(side * r), int(c / r))  # pairs of columns merged
        x = x.permute(0, 2, 1, 3).reshape(-1, int(side * r), int(side * r), int(c / r**2))  # pairs of rows merged
        return x.permute(0, 2, 1, 3).reshape(-1, int(side * r) ** 2, int(c / r**2))

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.mlp.fc2(F.gelu(self.mlp.fc1(self.pixel_shuffle(x)))))


class VisionTower(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        h, patches = config.hidden_size, config.patches_per_side**2
        self.patch_embedding = PatchEmbedding(config)
        self.class_embedding = nn.Parameter(torch.zeros(h))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(patches + 1, h))
        self.layernorm_pre = nn.LayerNorm(h, eps=LAYER_NORM_EPS)
        self.layernorm_post = nn.LayerNorm(h, eps=LAYER_NORM_EPS)
        self.model = VisionLayers(config)
        self.vision_adapter = PixelShuffleMLP(config)
        cos, sin = vision_rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels)
        x = torch.cat([x, self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        x = self.layernorm_pre(x + self.positional_embedding_vlm.to(x.dtype))
        for layer in self.model.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        return self.vision_adapter(self.layernorm_post(x)[:, :-1])


class Projector(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_output_dim, config.text_hidden_size, bias=False)


class Llama4VisionEncoder(nn.Module):
    """`encoder(pixel_values [tiles, 3, S, S])` → image features [tiles, tokens_per_tile, text hidden size]."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTower(config)
        self.multi_modal_projector = Projector(config)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.multi_modal_projector.linear_1(self.vision_model(pixel_values))


def finish_vision_encoder(encoder: Llama4VisionEncoder) -> Llama4VisionEncoder:
    """Buffers a checkpoint does not hold (the RoPE tables, fp32 whatever the weights) and eval mode, after the
    parameters were assigned to a module built on the meta device."""
    encoder.vision_model.rope_cos, encoder.vision_model.rope_sin = vision_rope_tables(encoder.config)
    return encoder.eval().requires_grad_(False)
