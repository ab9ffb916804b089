"""CLIP ViT vision encoder on megatron-core blocks (bidirectional pre-LN transformer, quick-GELU, biases).

Structure (as HF ``CLIPVisionModel``): patch-embedding conv (no bias) -> prepend the class token -> add learned
position embeddings -> ``pre_layernorm`` -> transformer layers -> (``post_layernorm``). The transformer is a
megatron-core ``TransformerBlock``: Transformer Engine's ViT spec on GPU, megatron-core local modules
(Column/RowParallelLinear, ``SelfAttention`` with ``AttnMaskType.no_mask``, our :class:`~megatron_zero.models.norms.Norm`)
on CPU. The encoder is never pipelined: it lives whole on the first pipeline stage. It is tensor-parallel like
the decoder, but never sequence-parallel (its 577 tokens are not the decoder sequence).

Image-feature conventions (``ClipVisionConfig.feature_convention``):

* ``"zero"`` (default; the paper's reference implementation, ``src/models/adapter.py``): the LAST layer's output
  for all tokens *including* the class token (577 for ViT-L/14-336), then ``post_layernorm``.
* ``"llava"`` (LLaVA-1.5, ``vision_feature_layer=-2``, ``select_strategy="default"``): the PENULTIMATE layer's
  output (HF ``hidden_states[-2]``, i.e. before any post-layernorm), class token dropped (576). The last layer and
  ``post_layernorm`` do not influence these features, so they are not built (and not trained or saved).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import torch

from megatron_zero import platform
from megatron_zero.models.sharded import ShardedStateDictMixin

FEATURE_CONVENTIONS = ("zero", "llava")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation: ``x * sigmoid(1.702 x)`` (megatron's version is torch.compile'd, which CPU can't afford)."""
    return x * torch.sigmoid(1.702 * x)


@dataclasses.dataclass
class ClipVisionConfig:
    """CLIP vision-tower hyper-parameters and which features it hands to the adapter."""

    num_layers: int = 24
    hidden_size: int = 1024
    ffn_hidden_size: int = 4096
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 336
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    feature_convention: str = "zero"
    name: str = "custom"

    def __post_init__(self):
        if self.feature_convention not in FEATURE_CONVENTIONS:
            raise ValueError(f"feature_convention must be one of {FEATURE_CONVENTIONS}, got {self.feature_convention!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.feature_convention == "llava" and self.num_layers < 2:
            raise ValueError("the 'llava' feature convention (penultimate layer) needs at least 2 layers")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens through the transformer: patches + class token (577 for ViT-L/14 at 336 px)."""
        return self.num_patches + 1

    @property
    def num_built_layers(self) -> int:
        """Layers that compute the features (the penultimate layer's output needs one layer fewer)."""
        return self.num_layers - (1 if self.feature_convention == "llava" else 0)

    @property
    def keeps_class_token(self) -> bool:
        return self.feature_convention == "zero"

    @property
    def has_post_layernorm(self) -> bool:
        return self.feature_convention == "zero"

    @property
    def num_image_tokens(self) -> int:
        """Feature vectors per image handed to the adapter: 577 ("zero") or 576 ("llava") for ViT-L/14-336."""
        return self.num_positions if self.keeps_class_token else self.num_patches

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipVisionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ClipVisionConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_hf_config(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers.CLIPVisionConfig`` (all layers, as the HF tower always has)."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": self.layer_norm_eps,
        }

    @classmethod
    def from_hf_config(cls, hf: Any, feature_convention: str = "zero", name: str = "hf") -> "ClipVisionConfig":
        """From a ``transformers.CLIPVisionConfig`` (or its dict); refuses what this encoder cannot represent."""
        get = hf.get if isinstance(hf, dict) else (lambda k, default=None: getattr(hf, k, default))
        if get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"expected CLIP hidden_act 'quick_gelu', got {get('hidden_act')!r}")
        return cls(
            num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"),
            ffn_hidden_size=get("intermediate_size"), num_attention_heads=get("num_attention_heads"),
            patch_size=get("patch_size"), image_size=get("image_size"), num_channels=get("num_channels", 3),
            layer_norm_eps=float(get("layer_norm_eps", 1e-5)), feature_convention=feature_convention, name=name,
        )

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "ClipVisionConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


PRESETS: dict[str, ClipVisionConfig] = {
    # openai/clip-vit-large-patch14-336
    "clip-vit-l-14-336": ClipVisionConfig(name="clip-vit-l-14-336"),
    # Tiny towers for tests: 16x16 images, 4x4 patches -> 16 patches + class token.
    "tiny-clip": ClipVisionConfig(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                  patch_size=4, image_size=16, name="tiny-clip"),
    "tiny-clip-llava": ClipVisionConfig(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                        patch_size=4, image_size=16, feature_convention="llava",
                                        name="tiny-clip-llava"),
}


def get_vision_preset(name: str) -> ClipVisionConfig:
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown vision encoder preset {name!r}; choose from {sorted(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------------------
# megatron-core pieces
# ---------------------------------------------------------------------------------------------------------
def vision_transformer_config(cfg: ClipVisionConfig, tensor_model_parallel_size: int = 1,
                              params_dtype: torch.dtype = torch.float32, bf16: bool = False,
                              use_te: Optional[bool] = None, initialize_weights: bool = True):
    """megatron-core ``TransformerConfig`` of the encoder: TP like the decoder, no PP, no sequence parallel."""
    from megatron.core.transformer import TransformerConfig

    use_te = platform.HAVE_TE if use_te is None else use_te
    return TransformerConfig(
        num_layers=cfg.num_built_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_attention_heads,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=cfg.layer_norm_eps,
        gated_linear_unit=False,
        activation_func=quick_gelu,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        use_cpu_initialization=not platform.HAVE_CUDA,
        perform_initialization=initialize_weights,
        cuda_graph_scope=[],  # the whole layer; the default ("full") says the same with a deprecation warning
        transformer_impl="transformer_engine" if use_te else "local",
    )


def vision_layer_spec(use_te: bool):
    """One ViT layer: TE's ViT spec (LayerNorm fused into the linears) on GPU, local modules + :class:`Norm` on CPU."""
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec

    if use_te:
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

        return get_vit_layer_with_transformer_engine_spec()  # already AttnMaskType.no_mask
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from megatron_zero.models.norms import Norm

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},  # bidirectional
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                 linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


class ClipVisionTransformer(ShardedStateDictMixin, torch.nn.Module):
    """The CLIP vision tower. ``forward(pixels [n, C, H, W]) -> features [n, num_image_tokens, hidden]``.

    State-dict names (TP=1) are the *canonical* encoder names used by checkpoints and :mod:`hf_clip`:
    ``class_embedding``, ``patch_embedding.weight``, ``position_embedding.weight``, ``pre_layernorm.*``,
    ``transformer.layers.{i}.*`` (megatron-core layer names), ``post_layernorm.*`` ("zero" convention only).
    """

    def __init__(self, cfg: ClipVisionConfig, tensor_model_parallel_size: int = 1,
                 params_dtype: torch.dtype = torch.float32, bf16: bool = False, use_te: Optional[bool] = None,
                 initialize_weights: bool = True):
        super().__init__()
        from megatron.core.transformer.transformer_block import TransformerBlock

        from megatron_zero.models.norms import Norm

        self.cfg = cfg
        use_te = platform.HAVE_TE if use_te is None else use_te
        self.config = vision_transformer_config(cfg, tensor_model_parallel_size, params_dtype, bf16, use_te,
                                                initialize_weights)
        h = cfg.hidden_size
        self.patch_embedding = torch.nn.Conv2d(cfg.num_channels, h, kernel_size=cfg.patch_size,
                                               stride=cfg.patch_size, bias=False, dtype=params_dtype)
        self.class_embedding = torch.nn.Parameter(torch.randn(h, dtype=params_dtype) * h ** -0.5)
        self.position_embedding = torch.nn.Embedding(cfg.num_positions, h, dtype=params_dtype)
        torch.nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.pre_layernorm = Norm(self.config, h, eps=cfg.layer_norm_eps)
        self.transformer = TransformerBlock(config=self.config, spec=vision_layer_spec(use_te),
                                            pre_process=True, post_process=False)
        self.post_layernorm = Norm(self.config, h, eps=cfg.layer_norm_eps) if cfg.has_post_layernorm else None
        if not initialize_weights:
            from megatron_zero.models.llama import mark_tensor_parallel_weights

            mark_tensor_parallel_weights(self)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected images [n, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}], "
                             f"got {tuple(pixel_values.shape)}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [n, h, g, g]
        x = x.flatten(2).transpose(1, 2)  # [n, patches, h]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)
        x = self.pre_layernorm(x)
        x = self.transformer(x.transpose(0, 1).contiguous(), attention_mask=None)  # [s, n, h]
        x = x.transpose(0, 1)
        if not cfg.keeps_class_token:
            x = x[:, 1:]
        if self.post_layernorm is not None:
            x = self.post_layernorm(x)
        return x.contiguous()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
