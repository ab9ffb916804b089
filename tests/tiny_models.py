"""Tiny random transformers models (every decoder family, the CLIP vision tower), built offline from our configs, and\na Qwen-style tokenizer: the one place tests and workers build them."""
import torch

_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def hf_config(cfg):
    """The transformers config of our decoder config ``cfg`` (its family's class; eager attention)."""
    import transformers

    config_cls = getattr(transformers, _CLASSES[cfg.family][0])
    hf_cfg = config_cls(**{k: v for k, v in cfg.to_hf_config().items()
                           if k not in ("architectures", "torch_dtype", "dtype")})
    hf_cfg._attn_implementation = "eager"
    return hf_cfg


def hf_causal_lm(cfg):
    """An untrained transformers model of ``cfg``'s family (HF's own initialisation from the current seed)."""
    import transformers

    return getattr(transformers, _CLASSES[cfg.family][1])(hf_config(cfg))


# transformers' own configs of a tiny Llama and CLIP tower (HF's defaults elsewhere): override any field per test
TINY_HF_LLAMA = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)
TINY_HF_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                    patch_size=4, hidden_act="quick_gelu")


def hf_llama_config(**overrides):
    """A transformers ``LlamaConfig``: :data:`TINY_HF_LLAMA` with ``overrides``."""
    import transformers

    return transformers.LlamaConfig(**{**TINY_HF_LLAMA, **overrides})


def hf_llama(seed=None, **overrides):
    """An untrained transformers ``LlamaForCausalLM`` of :func:`hf_llama_config` (HF's own initialisation, from
    ``seed`` when given, else from the current random state)."""
    import transformers

    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(hf_llama_config(**overrides))


def hf_clip_config(**overrides):
    """A transformers ``CLIPVisionConfig``: :data:`TINY_HF_CLIP` with ``overrides``."""
    import transformers

    return transformers.CLIPVisionConfig(**{**TINY_HF_CLIP, **overrides})


def hf_clip(seed=None, **overrides):
    """An untrained transformers ``CLIPVisionModel`` of :func:`hf_clip_config` (HF's own initialisation, from
    ``seed`` when given); :func:`hf_clip_model` randomises its norms and biases too."""
    import transformers

    if seed is not None:
        torch.manual_seed(seed)
    return transformers.CLIPVisionModel(hf_clip_config(**overrides))


def write_hf_decoder(path, cfg, seed=None, tokenizer=None):
    """Our decoder of ``cfg`` (megatron init, from ``seed`` when given) written as an HF decoder directory, with
    ``tokenizer``'s ``tokenizer.json`` when given. Returns ``(model, canonical weights)``."""
    import os

    from megatron_zero.checkpointing.vlm_checkpoint import save_hf_decoder
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel import sharding

    if seed is not None:
        torch.manual_seed(seed)
    model = build_llama_model(cfg)
    canonical = sharding.gather_canonical([model], vocab_size=cfg.vocab_size)
    save_hf_decoder(str(path), cfg, canonical)
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, "tokenizer.json"))
    return model, canonical


def hf_model(cfg, seed=0):
    """A transformers model of ``cfg``'s family with random weights (norms and biases randomised too)."""
    torch.manual_seed(seed)
    model = hf_causal_lm(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; randomise them so their mapping is tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def hf_clip_model(cfg, seed: int = 0):
    """A transformers ``CLIPVisionModel`` of our ``ClipVisionConfig`` (or of a transformers ``CLIPVisionConfig``)
    with random weights (norms and biases too)."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = cfg if isinstance(cfg, transformers.CLIPVisionConfig) else transformers.CLIPVisionConfig(
        **cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    model = transformers.CLIPVisionModel(hf_cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1/0 and biases to 0: randomise so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
    return model


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>"]
# Qwen3's chat template as its tokenizer_config.json ships it, cut down to what the tiny worlds need
QWEN3_HUB_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}")


def write_qwen_tokenizer(out_dir, texts=("user assistant system hello what is a cat? a cat is an animal.\n",),
                         vocab_size=400) -> int:
    """A small byte-level BPE ``tokenizer.json`` laid out as Qwen's: its special tokens (``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>``, the vision tokens incl. ``<|image_pad|>``), the non-special added tokens
    ``<think>``/``</think>``, and a ``tokenizer_config.json`` naming them as Qwen3's does (no BOS). Returns the
    vocabulary size (added tokens included)."""
    import json
    import os

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=QWEN_SPECIALS)
    tok.train_from_iterator(list(texts) * 50, trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "chat_template": QWEN3_HUB_CHAT_TEMPLATE}, f)
    return tok.get_vocab_size(with_added_tokens=True)
