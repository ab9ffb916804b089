"""Distributed-checkpoint support for our plain ``torch.nn.Module`` containers of megatron-core modules."""
from __future__ import annotations


class ShardedStateDictMixin:
    """megatron-core's ``MegatronModule.sharded_state_dict`` for a container that is not a ``MegatronModule``.

    Without it, megatron's fallback treats every tensor under a plain module as replicated, which is wrong for
    the tensor-parallel layers inside (the VLM, the image encoder, the CLIP tower, the adapter). With it, own
    parameters are replicated and each child contributes its own (possibly TP-sharded) entries.
    """

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.module import MegatronModule

        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, metadata)
