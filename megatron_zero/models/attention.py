"""The CPU (local-spec) core attention: ``torch.nn.functional.scaled_dot_product_attention``, packed or not.

megatron-core's local ``DotProductAttention`` materialises the ``[b, np, s, s]`` score matrix (``baddbmm`` into a
global buffer, an unfused masked softmax, ``bmm``) and refuses packed sequences (``packed_seq_params``): packing
is TE-only there. :class:`SDPACoreAttention` is a drop-in replacement in the local layer spec that

* computes ordinary causal attention with PyTorch's fused SDPA kernel (``is_causal``; grouped KV heads are
  handled by SDPA, not by ``repeat_interleave`` copies), or honours an explicit megatron-style boolean mask
  (``True`` = masked out);
* accepts megatron's THD (packed) format: with ``packed_seq_params.qkv_format == "thd"`` the inputs are
  ``[t, np, hn]`` (all packed rows flattened) and every ``cu_seqlens_q`` segment attends causally to itself only,
  one SDPA call per segment, exactly as Transformer Engine's THD attention does on GPU. RoPE positions restart per
  segment in megatron's own THD RoPE (``apply_rotary_pos_emb(..., cu_seqlens=...)``), upstream of this module.

So CI (CPU) exercises the same packed-sequence semantics as TE's ``TEDotProductAttention`` on GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

__all__ = ["SDPACoreAttention"]


class SDPACoreAttention(DotProductAttention):
    """``DotProductAttention``'s interface and partitioning, SDPA's kernel, and THD (packed) support."""

    def _dropout_p(self) -> float:
        return float(self.attention_dropout.p) if self.training else 0.0

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention: attention_bias is not supported")
        np_, ng = self.num_attention_heads_per_partition, self.num_query_groups_per_partition
        gqa = np_ != ng
        dropout = self._dropout_p()
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # [t, np, hn] -> per segment [1, np, len, hn]
            cu = packed_seq_params.cu_seqlens_q
            bounds = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
            q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # [np|ng, t, hn]
            outs = []
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b <= a:
                    continue
                outs.append(F.scaled_dot_product_attention(
                    q[None, :, a:b], k[None, :, a:b], v[None, :, a:b], dropout_p=dropout, is_causal=True,
                    scale=self.softmax_scale, enable_gqa=gqa)[0])
            out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # [np, t, hn]
            return out.transpose(0, 1).reshape(query.shape[0], self.hidden_size_per_partition)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        sq, sk = q.shape[2], k.shape[2]
        if attention_mask is None and sq == sk:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=sq > 1,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        elif attention_mask is None:  # queries are the last sq of sk positions (bottom-right causal)
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask.bool(), dropout_p=dropout,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        # [b, np, s, hn] -> [s, b, np * hn]
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)
