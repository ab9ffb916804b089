"""Decoder hyper-parameters of every supported family: published presets, tiny test presets, HF ``config.json``.

A :class:`DecoderConfig` (also importable as ``LlamaConfig``, its historical name) is the one description of a
decoder that every tool passes around (it is written as ``model_config.json`` next to each checkpoint). It holds
architecture only; parallel layout and precision are run-time choices (see :mod:`megatron_zero.models.llama`).

Families (``family``), all pre-norm RMSNorm + SwiGLU + RoPE decoders with GQA on megatron-core's ``GPTModel``:

* ``llama``: Llama-3.x (no biases, Llama-3 RoPE frequency scaling, head_dim = hidden/heads);
* ``qwen3``: Qwen3 dense -- RMSNorm on each query/key head before RoPE (``qk_layernorm``), head_dim set
  independently of hidden/heads (``kv_channels`` in megatron, e.g. 128 with hidden 2560 / 32 heads on Qwen3-4B),
  tied embeddings on the small sizes (<= 4B);
* ``qwen2``: Qwen2 / Qwen2.5 -- biases on the q/k/v projections (``add_qkv_bias``), none elsewhere.

Anything else (sliding-window attention, logit soft-capping, MoE, ...) is refused by :meth:`from_hf_config` with
one line naming what is missing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

from megatron_zero.errors import UserError


class UnsupportedModelError(UserError, ValueError):
    """A HF config this decoder cannot represent (names the family / feature that is missing)."""


FAMILIES = ("llama", "qwen3", "qwen2")
# family -> (HF architectures entry, HF model_type)
_HF_NAMES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}
# HF model types we know and do not support: what they need that this decoder lacks
_UNSUPPORTED = {
    "gemma3": "sliding-window attention (interleaved local/global layers), attention-logit soft-capping, "
              "(1 + weight) RMSNorm scaling, GeGLU and scaled embeddings",
    "gemma3_text": "sliding-window attention (interleaved local/global layers), attention-logit soft-capping, "
                   "(1 + weight) RMSNorm scaling, GeGLU and scaled embeddings",
    "gemma2": "sliding-window attention, attention- and final-logit soft-capping, (1 + weight) RMSNorm scaling, GeGLU",
    "gemma": "(1 + weight) RMSNorm scaling, GeGLU and scaled embeddings",
    "mistral": "sliding-window attention",
    "mixtral": "mixture-of-experts MLPs",
    "qwen3_moe": "mixture-of-experts MLPs",
    "qwen2_moe": "mixture-of-experts MLPs",
    "qwen3_next": "gated delta-net linear attention and mixture-of-experts MLPs",
    "phi3": "fused qkv/gate_up projections and LongRoPE scaling",
    "olmo2": "post-norm layers and QK-norm over all heads",
}


SURROGATE_HF_KEY = "megatron_zero_surrogate"  # surrogate provenance inside an HF config.json


@dataclasses.dataclass
class DecoderConfig:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    # Llama-3.x frequency scaling (low_freq_factor=1, high_freq_factor=4, original context 8192); None = off.
    rope_scaling_factor: Optional[float] = 8.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    head_dim: Optional[int] = None
    name: str = "custom"
    family: str = "llama"  # one of FAMILIES
    qk_layernorm: bool = False  # Qwen3: RMSNorm over each query/key head (weights of size head_dim)
    add_qkv_bias: bool = False  # Qwen2/2.5: biases on q/k/v (not on o_proj or the MLP)
    # LoRA adapters on the decoder (megatron_zero.models.lora.LoraConfig.to_dict()); None = none
    lora: Optional[dict] = None
    # Set on surrogates T(a, b): target checkpoint, a, b and the surrogate-layer -> target-layer mapping.
    surrogate: Optional[dict] = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedModelError(f"unknown decoder family {self.family!r}; supported: {list(FAMILIES)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads} (set head_dim explicitly)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by num_query_groups "
                f"(KV heads) {self.num_query_groups}"
            )

    # ---- sizes ---------------------------------------------------------------------------------------
    def num_parameters(self, num_layers: Optional[int] = None) -> int:
        """Exact parameter count (unpadded vocabulary) for ``num_layers`` decoder layers (default: all)."""
        n = self.num_layers if num_layers is None else num_layers
        d, f, h = self.hidden_size, self.ffn_hidden_size, self.head_dim
        attn = d * h * self.num_attention_heads * 2 + d * h * self.num_query_groups * 2  # q, o, k, v
        if self.add_qkv_bias:
            attn += h * (self.num_attention_heads + 2 * self.num_query_groups)
        if self.qk_layernorm:
            attn += 2 * h
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d  # two RMSNorm weights
        embed = self.vocab_size * d
        output = 0 if self.tie_word_embeddings else self.vocab_size * d
        return n * per_layer + embed + output + d  # final norm

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown decoder config fields: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "DecoderConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' config class of this family loads unchanged."""
        arch, model_type = _HF_NAMES[self.family]
        cfg = {
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }
        if self.family == "llama":
            cfg.update(attention_bias=False, mlp_bias=False)
        elif self.family == "qwen3":
            cfg.update(attention_bias=False, use_sliding_window=False, sliding_window=None,
                       max_window_layers=self.num_layers)
        elif self.family == "qwen2":
            cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
        if self.surrogate is not None:
            cfg[SURROGATE_HF_KEY] = self.surrogate
        if self.rope_scaling_factor is not None:
            cfg["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": self.rope_scaling_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        return cfg

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], name: str = "hf") -> "DecoderConfig":
        """Build from a HF ``config.json`` dict (Llama, Qwen3, Qwen2/2.5); refuses what this decoder cannot represent
        with an :class:`UnsupportedModelError` naming the missing feature.

        Reads both spellings of RoPE settings: transformers 4's ``rope_theta`` + ``rope_scaling`` and
        transformers 5's ``rope_parameters`` (theta and scaling together).
        """
        params = hf.get("rope_parameters")
        if isinstance(params, dict):
            hf, params = dict(hf), dict(params)
            if "rope_theta" in params:
                hf.setdefault("rope_theta", params.pop("rope_theta"))
            if params.get("rope_type", params.get("type", "default")) != "default":
                hf.setdefault("rope_scaling", params)
        model_type = hf.get("model_type", "llama")
        what = f"{name}: model_type {model_type!r}"
        if model_type in _UNSUPPORTED:
            raise UnsupportedModelError(f"{what} is not supported: this decoder lacks {_UNSUPPORTED[model_type]} "
                                        f"(supported model types: {[t for _, t in _HF_NAMES.values()]})")
        family = {t: f for f, (_, t) in _HF_NAMES.items()}.get(model_type)
        if family is None:
            raise UnsupportedModelError(f"{what} is not a supported decoder family (expected model_type one of "
                                        f"{[t for _, t in _HF_NAMES.values()]})")
        missing = []
        if hf.get("mlp_bias"):
            missing.append("MLP biases (mlp_bias)")
        if hf.get("attention_bias"):
            missing.append("biases on every attention projection incl. o_proj (attention_bias)")
        if hf.get("hidden_act", "silu") != "silu":
            missing.append(f"activation {hf.get('hidden_act')!r} (only SwiGLU with 'silu')")
        if hf.get("use_sliding_window"):
            missing.append("sliding-window attention (use_sliding_window)")
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            missing.append(f"layer types {sorted(set(layer_types) - {'full_attention'})}")
        if any(hf.get(k) for k in ("attn_logit_softcapping", "final_logit_softcapping")):
            missing.append("logit soft-capping")
        if hf.get("num_experts") or hf.get("num_local_experts"):
            missing.append("mixture-of-experts MLPs")
        scaling = hf.get("rope_scaling") or None
        factor = None
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type"))
            if rtype != "llama3" or family != "llama":
                missing.append(f"rope_scaling type {rtype!r} (only 'llama3' on Llama)")
            elif (scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0),
                    scaling.get("original_max_position_embeddings", 8192)) != (1.0, 4.0, 8192):
                missing.append(f"llama3 rope_scaling parameters {scaling} (only low 1, high 4, original 8192)")
            else:
                factor = float(scaling["factor"])
        if missing:
            raise UnsupportedModelError(f"{what} is not supported: this decoder lacks " + "; ".join(missing))
        heads = hf["num_attention_heads"]
        return cls(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling_factor=factor,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5 if family == "llama" else 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            name=name,
            family=family,
            qk_layernorm=family == "qwen3",
            add_qkv_bias=family == "qwen2",
            surrogate=hf.get(SURROGATE_HF_KEY),
        )


LlamaConfig = DecoderConfig  # the historical name, used across the code base


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's convention: pad the vocabulary to a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _qwen3(layers, hidden, ffn, heads, kv, tie, name) -> DecoderConfig:
    return DecoderConfig(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads, num_query_groups=kv,
        vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rope_scaling_factor=None,
        norm_eps=1e-6, tie_word_embeddings=tie, head_dim=128, name=name, family="qwen3", qk_layernorm=True,
    )


def _qwen25(layers, hidden, ffn, heads, kv, name) -> DecoderConfig:
    return DecoderConfig(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads, num_query_groups=kv,
        vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0, rope_scaling_factor=None,
        norm_eps=1e-6, tie_word_embeddings=False, name=name, family="qwen2", add_qkv_bias=True,
    )


# Published hyper-parameters (HF config.json of the releases).
PRESETS: dict[str, LlamaConfig] = {
    "llama-3.2-1b": LlamaConfig(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
        vocab_size=128256, rope_scaling_factor=32.0, tie_word_embeddings=True, name="llama-3.2-1b",
    ),
    "llama-3.2-3b": LlamaConfig(
        num_layers=28, hidden_size=3072, ffn_hidden_size=8192, num_attention_heads=24, num_query_groups=8,
        vocab_size=128256, rope_scaling_factor=32.0, tie_word_embeddings=True, name="llama-3.2-3b",
    ),
    "llama-3.1-8b": LlamaConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        vocab_size=128256, rope_scaling_factor=8.0, tie_word_embeddings=False, name="llama-3.1-8b",
    ),
    "llama-3.1-70b": LlamaConfig(
        num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_query_groups=8,
        vocab_size=128256, rope_scaling_factor=8.0, tie_word_embeddings=False, name="llama-3.1-70b",
    ),
    # Qwen3 (HF config.json of Qwen/Qwen3-*): QK-norm, head_dim 128 whatever the width, tied embeddings <= 4B.
    "qwen3-4b": _qwen3(36, 2560, 9728, 32, 8, tie=True, name="qwen3-4b"),
    "qwen3-8b": _qwen3(36, 4096, 12288, 32, 8, tie=False, name="qwen3-8b"),
    "qwen3-32b": _qwen3(64, 5120, 25600, 64, 8, tie=False, name="qwen3-32b"),
    # Qwen2.5 (HF config.json of Qwen/Qwen2.5-*-Instruct): q/k/v biases.
    "qwen2.5-7b": _qwen25(28, 3584, 18944, 28, 4, name="qwen2.5-7b"),
    "qwen2.5-72b": _qwen25(80, 8192, 29568, 64, 8, name="qwen2.5-72b"),
    # Tiny presets for tests and the demo: same architecture, toy sizes.
    "tiny": LlamaConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        vocab_size=256, max_position_embeddings=512, rope_theta=10000.0, rope_scaling_factor=None,
        name="tiny",
    ),
    "tiny-tied": LlamaConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        vocab_size=256, max_position_embeddings=512, rope_theta=500000.0, rope_scaling_factor=8.0,
        tie_word_embeddings=True, name="tiny-tied",
    ),
    "tiny-qwen3": DecoderConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        vocab_size=256, max_position_embeddings=512, rope_theta=1000000.0, rope_scaling_factor=None, norm_eps=1e-6,
        tie_word_embeddings=True, head_dim=24, name="tiny-qwen3", family="qwen3", qk_layernorm=True,
    ),
    "tiny-qwen2": DecoderConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        vocab_size=256, max_position_embeddings=512, rope_theta=1000000.0, rope_scaling_factor=None, norm_eps=1e-6,
        name="tiny-qwen2", family="qwen2", add_qkv_bias=True,
    ),
}


def get_preset(name: str) -> DecoderConfig:
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}") from None


def load_model_config(path: str) -> DecoderConfig:
    """A preset name, a ``model_config.json``, or a directory holding one (or a HF ``config.json``)."""
    if path in PRESETS:
        return get_preset(path)
    if os.path.isdir(path):
        for fname in ("model_config.json", "config.json"):
            if os.path.exists(os.path.join(path, fname)):
                return load_model_config(os.path.join(path, fname))
        raise FileNotFoundError(f"{path}: no model_config.json or config.json in this directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"model config {path!r} is neither a preset ({sorted(PRESETS)}) nor a file")
    with open(path) as f:
        d = json.load(f)
    if "num_hidden_layers" in d:
        return DecoderConfig.from_hf_config(d, name=os.path.basename(os.path.dirname(os.path.abspath(path))))
    return DecoderConfig.from_dict(d)


def translator_indices(prov: Optional[dict]) -> list[int]:
    """The translator layers recorded in a surrogate provenance (``LlamaConfig.surrogate``): ``translator_indices``
    (multi-range / multi-translator surrogates, :mod:`megatron_zero.surrogate`), else the single
    ``translator_index`` (or ``a``) of older records; empty when there is none."""
    prov = prov or {}
    if prov.get("translator_indices") is not None:
        return [int(i) for i in prov["translator_indices"]]
    index = prov.get("translator_index", prov.get("a"))
    return [] if index is None else [int(index)]
