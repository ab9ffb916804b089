"""LoRA for the decoder (the paper's Fig. 2 / Sec. A.2 baseline), tensor-parallel aware, on megatron-core linears.

``W x`` becomes ``W x + (alpha / r) * B A dropout(x)`` for each target projection (PEFT's definition: ``A``
Kaiming-uniform, ``B`` zero, so a fresh adapter leaves the model unchanged). Targets are HF's projection names
without ``_proj``: ``q, k, v`` (inside megatron's fused ``linear_qkv``), ``o`` (``linear_proj``), ``gate, up``
(inside the fused ``linear_fc1``) and ``down`` (``linear_fc2``). Each target has its own ``A_t`` ``[r, in]`` and
``B_t`` ``[out_t, r]`` in HF layout (``out_t`` rows ordered as HF's ``{t}_proj``), so merging is
``W_t += (alpha / r) B_t A_t`` on HF-shaped tensors.

Tensor parallelism, split consistently with the base layer:

* column-parallel bases (``q, k, v, gate, up``; output split over TP): ``A`` on the input side is replicated;
  ``B`` on the output side is split along its rows exactly as the base's output (per query group for q/k/v,
  gate and up halves separately), so each rank adds its own output slice. ``A x`` goes through
  ``copy_to_tensor_model_parallel_region`` so ``A``'s gradient is summed over the TP ranks.
* row-parallel bases (``o, down``; input split over TP): ``A`` is split along its columns as the base's input;
  the partial ``A x`` is all-reduced (``reduce_from_tensor_model_parallel_region``), ``B`` is replicated.

Sequence parallelism (``--sequence-parallel``): a column-parallel base gets its input split along the sequence
(it all-gathers it itself) and a row-parallel base reduce-scatters its output along the sequence. The adapters
follow the same pattern on their rank-``r`` activations: column: ``A x`` on this rank's sequence slice, then
all-gathered along the sequence (``gather_from_sequence_parallel_region``; its backward reduce-scatters, summing
the ranks' ``B`` slices' contributions); row: the partial ``A x`` is reduce-scattered along the sequence
(``reduce_scatter_to_sequence_parallel_region``) and ``B`` applied to this rank's slice. The replicated tensor
then sees only this rank's part of the sequence (``A`` for column, ``B`` for row bases), so it is marked
``sequence_parallel`` and megatron-core's ``finalize_model_grads`` sums its gradient over the TP ranks, as it
does for the layer norms under sequence parallelism. Dropout on a split input draws from megatron's
model-parallel RNG (a different mask per TP rank, as its own sequence-parallel dropouts).

The adapters are sibling modules of the base linears (``self_attention.linear_qkv_lora``, ...), applied by a
forward hook, so every base tensor keeps its name and the canonical/HF mappings are unchanged; the adapters'
canonical keys are ``decoder.layers.N.<linear>_lora.{A,B}_<target>``. The LoRA settings are part of the decoder
config (``DecoderConfig.lora``), written with every checkpoint, so any loader rebuilds the adapters;
:func:`megatron_zero.checkpointing.lora_merge.merge_canonical` folds them into the base weights
(``convert_checkpoint --merge-lora``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

from megatron_zero.errors import UserError

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# target -> (decoder-layer module path of the base linear, parallel kind)
_BASE = {
    "q": ("self_attention.linear_qkv", "column"), "k": ("self_attention.linear_qkv", "column"),
    "v": ("self_attention.linear_qkv", "column"), "o": ("self_attention.linear_proj", "row"),
    "gate": ("mlp.linear_fc1", "column"), "up": ("mlp.linear_fc1", "column"), "down": ("mlp.linear_fc2", "row"),
}
# order of the parts inside a fused column-parallel output (per group)
_PARTS = {"self_attention.linear_qkv": ("q", "k", "v"), "mlp.linear_fc1": ("gate", "up")}
SUFFIX = "_lora"
INIT_SEED = 20250419


class LoraError(UserError, ValueError):
    """Bad LoRA settings (names the flag)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        if self.rank < 1:
            raise LoraError(f"--lora-rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise LoraError(f"--lora-targets: unknown target(s) {bad or '(none)'}; choose from {','.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))  # canonical order

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        return cls(int(d["rank"]), float(d["alpha"]), float(d["dropout"]), tuple(d["targets"]))

    @classmethod
    def from_config(cls, model) -> Optional["LoraConfig"]:
        """From a run's :class:`megatron_zero.config.ModelConfig` (``None`` without ``--lora-rank``)."""
        if not model.lora_rank:
            return None
        targets = tuple(t.strip() for t in model.lora_targets.split(",") if t.strip())
        return cls(model.lora_rank, model.lora_alpha, model.lora_dropout, targets)


def add_lora_arguments(parser) -> None:
    g = parser.add_argument_group("LoRA (decoder; frozen base weights)")
    g.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank instead of the decoder")
    g.add_argument("--lora-alpha", type=float, default=32.0, help="scale alpha (update = alpha/r * B A x)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default="q,v", help=f"comma-separated subset of {','.join(TARGETS)}")


def target_shapes(cfg, target: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Full (TP=1) shapes of ``A_t`` and ``B_t`` for decoder config ``cfg``."""
    d, f, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_query_groups * hd
    in_out = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    i, o = in_out[target]
    r = LoraConfig.from_dict(cfg.lora).rank
    return (r, i), (o, r)


def num_trainable_parameters(cfg) -> int:
    """``L * sum_t r * (in_t + out_t)``: the adapters' parameter count."""
    lcfg = LoraConfig.from_dict(cfg.lora)
    per_layer = sum(math.prod(a) + math.prod(b) for a, b in (target_shapes(cfg, t) for t in lcfg.targets))
    return cfg.num_layers * per_layer


class LoraAdapter(torch.nn.Module):
    """The adapters of one base linear (one or more targets), this TP rank's slices."""

    def __init__(self, base_path: str, targets: Sequence[str], cfg, lcfg: LoraConfig, tp_size: int, dtype,
                 layer: int = 0, tp_rank: int = 0, sequence_parallel: bool = False):
        super().__init__()
        self.base_path, self.targets, self.scale = base_path, tuple(targets), lcfg.scale
        self.kind = _BASE[self.targets[0]][1]
        self.sequence_parallel = sequence_parallel and tp_size > 1
        self.dropout = torch.nn.Dropout(lcfg.dropout) if lcfg.dropout > 0 else torch.nn.Identity()
        self.tp_size = tp_size
        self.groups = cfg.num_query_groups // tp_size if base_path == "self_attention.linear_qkv" else 1
        self.part_rows = {}  # per group, this rank
        if base_path == "self_attention.linear_qkv":
            per = cfg.num_attention_heads // cfg.num_query_groups
            self.part_rows = {"q": per * cfg.head_dim, "k": cfg.head_dim, "v": cfg.head_dim}
        elif base_path == "mlp.linear_fc1":
            self.part_rows = {"gate": cfg.ffn_hidden_size // tp_size, "up": cfg.ffn_hidden_size // tp_size}
        self.split = {}
        for t in self.targets:
            (r, i), (o, _) = target_shapes(cfg, t)
            # PEFT's (and nn.Linear's) init of A, drawn at full size from a generator seeded by (layer, target) and
            # sliced: the same adapters at every TP/PP layout, identical replicas on every TP rank
            a = torch.empty(r, i)
            gen = torch.Generator().manual_seed(INIT_SEED + 16 * layer + TARGETS.index(t))
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            if self.kind == "column":
                a, b, split = a.to(dtype), torch.zeros(o // tp_size, r, dtype=dtype), ("B", 0)
            else:
                a = a.chunk(tp_size, dim=1)[tp_rank].contiguous().to(dtype)
                b, split = torch.zeros(o, r, dtype=dtype), ("A", 1)
            self.register_parameter(f"A_{t}", torch.nn.Parameter(a))
            self.register_parameter(f"B_{t}", torch.nn.Parameter(b))
            self.split[t] = split
            from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

            name, dim = split
            set_tensor_model_parallel_attributes(getattr(self, f"{name}_{t}"), True, dim, 1)
            if self.sequence_parallel:  # the replicated tensor sees this rank's sequence slice only
                setattr(getattr(self, f"{'B' if name == 'A' else 'A'}_{t}"), "sequence_parallel", True)
        self.layer_norm = None  # (weight, eps) when the base is TE's fused LayerNorm+Linear

    def _delta(self, t: str, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as mtp

        h = torch.nn.functional.linear(x, getattr(self, f"A_{t}"))
        if self.kind == "column":
            h = (mtp.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
                 if self.sequence_parallel else mtp.copy_to_tensor_model_parallel_region(h))
        else:
            h = (mtp.reduce_scatter_to_sequence_parallel_region(h)
                 if self.sequence_parallel else mtp.reduce_from_tensor_model_parallel_region(h))
        return torch.nn.functional.linear(h, getattr(self, f"B_{t}")) * self.scale

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.dropout, torch.nn.Identity) or not (self.sequence_parallel or self.kind == "row"):
            return self.dropout(x)  # replicated input: the same mask on every TP rank
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            return self.dropout(x)

    def hook(self, base, inputs, output):
        x = inputs[0]
        if self.layer_norm is not None:
            weight, eps = self.layer_norm
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
        x = self._dropout(x)
        y, bias = output if isinstance(output, tuple) else (output, None)
        if self.kind == "row" or not self.part_rows:
            (t,) = self.targets
            y = y + self._delta(t, x)
        else:
            parts = []
            for p in _PARTS[self.base_path]:
                rows = self.part_rows[p]
                if p in self.targets:
                    parts.append(self._delta(p, x).reshape(*y.shape[:-1], self.groups, rows))
                else:
                    parts.append(y.new_zeros(*y.shape[:-1], self.groups, rows))
            y = y + torch.cat(parts, dim=-1).reshape(y.shape)
        return (y, bias) if isinstance(output, tuple) else y

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        axes = {f"{name}_{t}": dim for t, (name, dim) in self.split.items()}
        return make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets)


def apply_lora(model, cfg) -> None:
    """Add ``cfg.lora``'s adapters to this rank's decoder layers and freeze every other parameter."""
    from megatron.core import parallel_state as ps

    lcfg = LoraConfig.from_dict(cfg.lora)
    tp = ps.get_tensor_model_parallel_world_size()
    for p in model.parameters():
        p.requires_grad_(False)
    by_base: dict[str, list[str]] = {}
    for t in lcfg.targets:
        by_base.setdefault(_BASE[t][0], []).append(t)
    for layer in model.decoder.layers:
        for base_path, targets in by_base.items():
            parent_name, linear_name = base_path.split(".")
            parent = getattr(layer, parent_name)
            base = getattr(parent, linear_name)
            adapter = LoraAdapter(base_path, targets, cfg, lcfg, tp, model.config.params_dtype,
                                  layer=layer.layer_number - 1, tp_rank=ps.get_tensor_model_parallel_rank(),
                                  sequence_parallel=model.config.sequence_parallel)
            if hasattr(base, "layer_norm_weight"):  # TE fuses the pre-norm into the linear: normalise here too
                adapter.layer_norm = (base.layer_norm_weight, model.config.layernorm_epsilon)
            device = base.weight.device
            adapter.to(device)
            parent.add_module(linear_name + SUFFIX, adapter)
            base.register_forward_hook(adapter.hook)


def lora_keys(cfg, layer: int) -> list[str]:
    """Canonical keys of one decoder layer's adapters."""
    lcfg = LoraConfig.from_dict(cfg.lora)
    return [f"decoder.layers.{layer}.{_BASE[t][0]}{SUFFIX}.{m}_{t}" for t in lcfg.targets for m in "AB"]


def is_lora_key(ckey: str) -> bool:
    return f"{SUFFIX}." in ckey
