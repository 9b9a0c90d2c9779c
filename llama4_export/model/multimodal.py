"""Early fusion in PyTorch: the text model's token embeddings with the image placeholder rows replaced by projected
image features, then the text model as usual — the reference path the fused prefill graph will be traced from.

transformers fills the placeholder rows with `masked_scatter` (features consumed in order, row-major over the batch).
Here the same rows are picked with a cumulative sum and a gather, which traces to standard ONNX ops and allows zero
image tokens in a step (a text-only prompt piece) without a special case.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .modeling import KVCache, Llama4ForCausalLM, NewKV, _tracing
from .vision import Llama4VisionEncoder


def merge_image_features(embeddings: Tensor, image_mask: Tensor, image_features: Tensor) -> Tensor:
    """embeddings [B, T, H] with the rows where image_mask [B, T] is true replaced by image_features [N, H], in order."""
    flat = image_mask.reshape(-1)
    if not _tracing() and int(flat.sum()) != image_features.shape[0]:
        raise ValueError(f"{int(flat.sum())} image placeholder tokens but features for {image_features.shape[0]}; "
                         "expand the prompt with the image's tile grid (runtime.images)")
    # 1-based feature row of each placeholder, 0 for text tokens; counted in float32 (exact below 2^24 tokens a step)
    # because TensorRT's CumSum takes float types only
    row = (torch.cumsum(flat.float(), dim=0) * flat).long()
    table = torch.cat([image_features.new_zeros(1, image_features.shape[-1]), image_features]).to(embeddings.dtype)
    return torch.where(image_mask[..., None], table[row].view_as(embeddings), embeddings)


def fused_forward(model: Llama4ForCausalLM, input_ids: Tensor, image_features: Tensor, image_token_id: int,
                  positions: Tensor | None = None, kv_cache: KVCache | None = None) -> Tensor | tuple[Tensor, NewKV]:
    """The text model over input_ids [B, T] whose `image_token_id` rows take image_features [N, hidden] (the encoder's
    [tiles, tokens_per_tile, hidden] flattened over tiles): logits, or (logits, NewKV) with a KV cache."""
    embeddings = merge_image_features(model.model.embed_tokens(input_ids), input_ids == image_token_id, image_features)
    return model(embeddings, positions, kv_cache)


@torch.inference_mode()
def generate_greedy(model: Llama4ForCausalLM, encoder: Llama4VisionEncoder, input_ids: Tensor, pixel_values: Tensor,
                    max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt (input_ids [1, T], already expanded for its images) given the pixel values
    of all its image tiles in prompt order: the fused prefill, then one token per step through the KV cache. No stop
    tokens: exactly max_new_tokens ids."""
    features = encoder(pixel_values.to(encoder.vision_model.class_embedding.dtype))
    features = features.reshape(-1, features.shape[-1])
    t = input_ids.shape[1]
    positions = torch.arange(t)[None]
    cache = KVCache.empty(model.config, 1, model.lm_head.weight.dtype)
    logits, new = fused_forward(model, input_ids, features, encoder.config.image_token_id, positions, cache)
    tokens = []
    for step in range(max_new_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        if step + 1 == max_new_tokens:
            break
        cache = cache.append(new, positions)
        positions = torch.tensor([[t + step]])
        logits, new = model(torch.tensor([[tokens[-1]]]), positions, cache)
    return tokens
