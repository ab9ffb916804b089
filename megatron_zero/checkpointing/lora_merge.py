"""LoRA adapters folded into their base weights in a stream of canonical tensors (``convert_checkpoint
--merge-lora``): the adapters live in :mod:`megatron_zero.models.lora`, the canonical QKV layout in
:mod:`megatron_zero.checkpointing.hf_llama`."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from megatron_zero.checkpointing import hf_llama
from megatron_zero.models.lora import _BASE, SUFFIX, LoraConfig, is_lora_key


def merge_canonical(stream: Iterable[tuple[str, torch.Tensor]], cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical tensors with every adapter folded into its base weight (``W_t += alpha/r * B_t A_t``).

    ``stream`` holds a layer's adapter keys after that layer's base keys or before (any order within the
    layer); tensors are yielded once their layer is complete, so memory stays at one layer.
    """
    lcfg = LoraConfig.from_dict(cfg.lora)
    pending: dict[str, torch.Tensor] = {}
    current = None

    def flush(layer_keys: dict[str, torch.Tensor]):
        adapters = {k: v for k, v in layer_keys.items() if is_lora_key(k)}
        base = {k: v for k, v in layer_keys.items() if not is_lora_key(k)}
        for ckey in list(base):
            suffix = ckey.split(".", 3)[3]
            path = suffix.rsplit(".", 1)[0]
            if not suffix.endswith(".weight") or path not in {b for b, _ in _BASE.values()}:
                continue
            prefix = ckey[: -len(suffix)]
            deltas = {t: lcfg.scale * (adapters[f"{prefix}{path}{SUFFIX}.B_{t}"].double()
                                       @ adapters[f"{prefix}{path}{SUFFIX}.A_{t}"].double())
                      for t in lcfg.targets if _BASE[t][0] == path}
            if not deltas:
                continue
            w = base[ckey]
            if path == "self_attention.linear_qkv":
                q, k, v = hf_llama.split_qkv(w, cfg)
                parts = {"q": q, "k": k, "v": v}
                parts = {n: (p.double() + deltas[n]).to(w.dtype) if n in deltas else p for n, p in parts.items()}
                base[ckey] = hf_llama.fuse_qkv(parts["q"], parts["k"], parts["v"], cfg)
            elif path == "mlp.linear_fc1":
                gate, up = w.chunk(2, dim=0)
                parts = {"gate": gate, "up": up}
                parts = {n: (p.double() + deltas[n]).to(w.dtype) if n in deltas else p for n, p in parts.items()}
                base[ckey] = torch.cat([parts["gate"], parts["up"]], dim=0)
            else:
                (delta,) = deltas.values()
                base[ckey] = (w.double() + delta).to(w.dtype)
        yield from base.items()

    for ckey, t in stream:
        layer = ckey.split(".")[2] if ckey.startswith("decoder.layers.") else None
        if layer != current and pending:
            yield from flush(pending)
            pending = {}
        current = layer
        if layer is None:
            yield ckey, t
        else:
            pending[ckey] = t
    if pending:
        yield from flush(pending)
