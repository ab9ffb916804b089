"""The vision adapter (Linear -> GELU -> Linear) and the image encoder that wraps CLIP + adapter + image markers.

As in the paper's reference implementation (``src/models/adapter.py``, ``adapter_mlp_depth=2``):
``Linear(vision_hidden -> d) -> GELU -> Linear(d -> d)`` with exact (erf) GELU, then each image's features are
wrapped between two learned embeddings, start-of-image and end-of-image (``embd_soi``/``embd_eoi``):
577 + 2 = 579 decoder embeddings per ViT-L/14-336 image.

In the "llava" feature convention there are no start/end embeddings (576 per image, exactly LLaVA-1.5's
layout, so such a model maps one-to-one onto HF ``LlavaForConditionalGeneration``).

Under tensor parallelism the adapter is megatron's column-parallel then row-parallel pair (the output is
all-reduced, so every TP rank holds the full image embeddings); the start/end embeddings are replicated.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_zero.models.clip_vit import ClipVisionConfig, ClipVisionTransformer
from megatron_zero.models.sharded import ShardedStateDictMixin


def _linear_default_init(weight: torch.Tensor) -> None:
    """``torch.nn.Linear``'s initialisation, as the reference adapter uses."""
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class VisionAdapter(ShardedStateDictMixin, torch.nn.Module):
    """``Linear(in -> d) -> GELU -> Linear(d -> d)``; column- then row-parallel under TP (canonical names
    ``linear_fc1.{weight,bias}``, ``linear_fc2.{weight,bias}``)."""

    def __init__(self, config, input_size: int, output_size: int):
        super().__init__()
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        self.linear_fc1 = ColumnParallelLinear(input_size, output_size, config=config, init_method=_linear_default_init,
                                               bias=True, gather_output=False)
        self.linear_fc2 = RowParallelLinear(output_size, output_size, config=config, init_method=_linear_default_init,
                                            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.linear_fc1(x)
        x = F.gelu(x)
        x, _ = self.linear_fc2(x)
        return x


class ImageEncoder(ShardedStateDictMixin, torch.nn.Module):
    """CLIP tower + adapter + start/end-of-image embeddings: ``pixels [n, C, H, W] -> [n, E, d]``.

    ``E = num_image_embeddings`` (579 for the paper's default, 576 for "llava"). This is the part that is trained on a
    surrogate and grafted onto the target decoder; canonical names are its TP=1 state-dict names
    (``vision_model.*``, ``adapter.*``, ``image_start_embedding``, ``image_end_embedding``).
    """

    def __init__(self, vision_cfg: ClipVisionConfig, decoder_hidden_size: int, tensor_model_parallel_size: int = 1,
                 params_dtype: torch.dtype = torch.float32, bf16: bool = False, use_te: Optional[bool] = None,
                 initialize_weights: bool = True):
        super().__init__()
        self.vision_cfg = vision_cfg
        self.vision_model = ClipVisionTransformer(vision_cfg, tensor_model_parallel_size, params_dtype, bf16, use_te,
                                                  initialize_weights)
        self.config = self.vision_model.config
        self.adapter = VisionAdapter(self.config, vision_cfg.hidden_size, decoder_hidden_size)
        if not initialize_weights:
            from megatron_zero.models.llama import mark_tensor_parallel_weights

            mark_tensor_parallel_weights(self.adapter)
        self.use_image_boundaries = vision_cfg.feature_convention == "zero"
        if self.use_image_boundaries:
            std = decoder_hidden_size ** -0.5
            self.image_start_embedding = torch.nn.Parameter(torch.randn(decoder_hidden_size, dtype=params_dtype) * std)
            self.image_end_embedding = torch.nn.Parameter(torch.randn(decoder_hidden_size, dtype=params_dtype) * std)

    @property
    def num_image_embeddings(self) -> int:
        return num_image_embeddings(self.vision_cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.adapter(self.vision_model(pixel_values))  # [n, tokens, d]
        if not self.use_image_boundaries:
            return x
        n, _, d = x.shape
        start = self.image_start_embedding.to(x.dtype).expand(n, 1, d)
        end = self.image_end_embedding.to(x.dtype).expand(n, 1, d)
        return torch.cat([start, x, end], dim=1)


def num_image_embeddings(vision_cfg: ClipVisionConfig) -> int:
    """Decoder positions one image occupies (579 / 576 for ViT-L/14-336 in the "zero" / "llava" convention)."""
    return vision_cfg.num_image_tokens + (2 if vision_cfg.feature_convention == "zero" else 0)


def fresh_adapter_tensors(vision_cfg: ClipVisionConfig, decoder_hidden_size: int, seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A freshly initialised adapter (+ start/end-of-image embeddings), as canonical ``ImageEncoder`` tensors drawn
    from their own generator: the same weights for every TP/PP layout (initialising the model's sharded
    parameters in place would depend on the layout: the RNG stream and, under TP, the local fan-in).

    Weights: ``torch.nn.Linear``'s initialisation (uniform in +-1/sqrt(fan_in)); biases zero (megatron's
    parallel linears); start/end embeddings N(0, 1/d)."""
    g = torch.Generator().manual_seed(int(seed))
    d, v = decoder_hidden_size, vision_cfg.hidden_size

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(in_features)
        return ((torch.rand(out_features, in_features, generator=g) * 2 - 1) * bound).to(dtype)

    out = {"adapter.linear_fc1.weight": linear(d, v), "adapter.linear_fc1.bias": torch.zeros(d, dtype=dtype),
           "adapter.linear_fc2.weight": linear(d, d), "adapter.linear_fc2.bias": torch.zeros(d, dtype=dtype)}
    if vision_cfg.feature_convention == "zero":
        for name in ("image_start_embedding", "image_end_embedding"):
            out[name] = (torch.randn(d, generator=g) * d ** -0.5).to(dtype)
    return out

