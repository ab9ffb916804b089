"""Tiny random transformers models of every decoder family, built offline from our configs (tests and workers)."""
import torch

_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def hf_model(cfg, seed=0):
    """A transformers model of ``cfg``'s family with random weights (norms and biases randomised too)."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[cfg.family])
    torch.manual_seed(seed)
    hf_cfg = config_cls(**{k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    model = model_cls(hf_cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; randomise them so their mapping is tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model
