"""Llama decoder hyper-parameters: the published presets, tiny test presets, and HF ``config.json`` mapping.

A :class:`LlamaConfig` is the one description of a decoder that every tool passes around (it is written as
``model_config.json`` next to each checkpoint). It holds architecture only; parallel layout and precision
are run-time choices (see :mod:`megatron_zero.models.llama`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional


SURROGATE_HF_KEY = "megatron_zero_surrogate"  # surrogate provenance inside an HF config.json


@dataclasses.dataclass
class LlamaConfig:
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
    # Set on surrogates T(a, b): target checkpoint, a, b and the surrogate-layer -> target-layer mapping.
    surrogate: Optional[dict] = None

    def __post_init__(self):
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
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d  # two RMSNorm weights
        embed = self.vocab_size * d
        output = 0 if self.tie_word_embeddings else self.vocab_size * d
        return n * per_layer + embed + output + d  # final norm

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "LlamaConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.LlamaConfig`` loads unchanged."""
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "bfloat16",
        }
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
    def from_hf_config(cls, hf: dict[str, Any], name: str = "hf") -> "LlamaConfig":
        """Build from a HF Llama ``config.json`` dict; refuses what this decoder cannot represent.

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
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"expected a Llama config (model_type 'llama'), got model_type {hf.get('model_type')!r}")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("Llama configs with attention_bias/mlp_bias are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"expected hidden_act 'silu', got {hf.get('hidden_act')!r}")
        scaling = hf.get("rope_scaling") or None
        factor = None
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type"))
            if rtype != "llama3":
                raise ValueError(f"unsupported rope_scaling type {rtype!r} (only 'llama3')")
            if (scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0),
                    scaling.get("original_max_position_embeddings", 8192)) != (1.0, 4.0, 8192):
                raise ValueError(f"unsupported llama3 rope_scaling parameters {scaling}")
            factor = float(scaling["factor"])
        heads = hf["num_attention_heads"]
        return cls(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            ffn_hidden_size=hf["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads", heads),
            vocab_size=hf["vocab_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling_factor=factor,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            name=name,
            surrogate=hf.get(SURROGATE_HF_KEY),
        )


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's convention: pad the vocabulary to a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


# Published hyper-parameters (HF config.json of the instruct releases).
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
}


def get_preset(name: str) -> LlamaConfig:
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}") from None


def load_model_config(path: str) -> LlamaConfig:
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
        return LlamaConfig.from_hf_config(d, name=os.path.basename(os.path.dirname(os.path.abspath(path))))
    return LlamaConfig.from_dict(d)


def translator_indices(prov: Optional[dict]) -> list[int]:
    """The translator layers recorded in a surrogate provenance (``LlamaConfig.surrogate``): ``translator_indices``
    (multi-range / multi-translator surrogates, :mod:`megatron_zero.surrogate`), else the single
    ``translator_index`` (or ``a``) of older records; empty when there is none."""
    prov = prov or {}
    if prov.get("translator_indices") is not None:
        return [int(i) for i in prov["translator_indices"]]
    index = prov.get("translator_index", prov.get("a"))
    return [] if index is None else [int(index)]
