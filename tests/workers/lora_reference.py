"""LoRA forward/backward shared by tests/test_lora.py (TP=1, in-process) and tests/workers/qwen_parallel.py (TP=2)."""
import torch
import torch.distributed as dist


def lora_logits_and_grads(ref: dict, tensor_parallel_size: int):
    """Build ref["cfg"] (with LoRA) at this TP, load ref["canonical"] (base + adapters), run ``tokens`` forward,
    backward ``sum(logits * ref["probe"])``. Returns full logits ``[b, s, V]`` and the canonical (TP-gathered)
    gradients of every trainable tensor."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_zero.models.llama import RuntimeOptions, build_llama_model
    from megatron_zero.models.llama_config import DecoderConfig
    from megatron_zero.parallel import sharding

    cfg = DecoderConfig.from_dict(ref["cfg"])
    model = build_llama_model(cfg, RuntimeOptions(tensor_model_parallel_size=tensor_parallel_size))
    sharding.load_canonical(model, ref["canonical"], ps.get_tensor_model_parallel_rank(),
                            ps.get_tensor_model_parallel_world_size(), source="LoRA reference")
    model.train()  # dropout is 0 in the reference: train mode only to be sure nothing else differs
    tokens = ref["tokens"]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    out = gather_from_tensor_model_parallel_region(model(tokens, pos, None))[..., : cfg.vocab_size]  # [b, s, V]
    (out * ref["probe"]).sum().backward()
    logits = out.detach()
    mapping = sharding.layer_index_map(model)
    grads = {}
    tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
            continue
        g = p.grad
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            pieces = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(pieces, g.contiguous(), group=group)
            g = torch.cat(pieces, dim=p.partition_dim)
        grads[sharding.canonical_key(name, mapping)] = g
    return logits, grads
