"""The decoder (Llama-3.x, Qwen3, Qwen2.5) on megatron-core ``GPTModel``: GQA, RoPE, RMSNorm, SwiGLU; per family
Llama-3 RoPE scaling, QK-norm (``qk_layernorm``), q/k/v biases (``add_qkv_bias``), head_dim (``kv_channels``).

The layer spec is Transformer Engine's on GPU (bf16, optional FP8) and megatron-core's local spec on CPU;
both compute the same function (tests compare them when a GPU is at hand).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_zero import platform
from megatron_zero.models.llama_config import LlamaConfig, padded_vocab_size
from megatron_zero.parallel.pipeline_layout import megatron_layout, split_layers
from megatron_zero.errors import UserError


class ModelConfigError(UserError, ValueError):
    """The model cannot be laid out with the requested parallelism/precision."""


@dataclasses.dataclass
class RuntimeOptions:
    """Run-time choices for building a model: parallel layout, precision, memory."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    pipeline_stage_layers: Optional[Sequence[int]] = None
    sequence_parallel: bool = False
    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    fp8: Optional[str] = None  # None | "e4m3" | "hybrid"
    fp8_recipe: str = "delayed"  # "delayed" | "tensorwise" | "mxfp8" | "blockwise"
    recompute_activations: bool = False  # full-layer activation recompute
    use_te: Optional[bool] = None  # None = use TE when available
    make_vocab_size_divisible_by: int = 128
    # False: build without random initialisation, for models whose every weight is loaded right after (megatron's
    # ``perform_initialization=False``: no CPU init time, no temporary full-size copy of each weight); the
    # tensor-parallel attributes megatron sets only while initialising are set by mark_tensor_parallel_weights.
    initialize_weights: bool = True

    @classmethod
    def from_config(cls, parallel, model) -> "RuntimeOptions":
        """From a run's :class:`megatron_zero.config.ParallelConfig` and :class:`~megatron_zero.config.ModelConfig`."""
        return cls(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            pipeline_stage_layers=parallel.pipeline_stage_layers,
            sequence_parallel=parallel.sequence_parallel,
            params_dtype=torch.bfloat16 if model.bf16 else torch.float32,
            bf16=model.bf16,
            fp8=model.fp8_format,
            fp8_recipe=model.fp8_recipe,
            recompute_activations=model.recompute_activations,
            use_te={"auto": None, "te": True, "local": False}[model.transformer_impl],
            make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
        )


def validate(cfg: LlamaConfig, opts: RuntimeOptions) -> list[int]:
    """Check ``cfg`` can be laid out with ``opts``; returns the per-(virtual)-stage layer counts."""
    tp = opts.tensor_model_parallel_size
    if cfg.num_attention_heads % tp:
        raise ModelConfigError(
            f"--tensor-model-parallel-size {tp} does not divide the {cfg.num_attention_heads} attention heads "
            f"of model {cfg.name!r}"
        )
    if cfg.num_query_groups % tp:
        raise ModelConfigError(
            f"--tensor-model-parallel-size {tp} does not divide the {cfg.num_query_groups} KV heads "
            f"(query groups) of model {cfg.name!r}"
        )
    if cfg.ffn_hidden_size % tp:
        raise ModelConfigError(
            f"--tensor-model-parallel-size {tp} does not divide ffn_hidden_size {cfg.ffn_hidden_size}"
        )
    if opts.sequence_parallel and tp == 1:
        raise ModelConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if opts.fp8 and not platform.HAVE_TE:
        raise ModelConfigError("--fp8-format needs Transformer Engine on a GPU (not available here)")
    if opts.use_te and not platform.HAVE_TE:
        raise ModelConfigError("--transformer-impl te needs Transformer Engine on a GPU (not available here)")
    vpp = opts.virtual_pipeline_model_parallel_size or 1
    try:
        return split_layers(cfg.num_layers, opts.pipeline_model_parallel_size, opts.pipeline_stage_layers, vpp)
    except ValueError as e:
        raise ModelConfigError(str(e)) from None


def decoder_spec(use_te: bool, config, vp_stage: Optional[int] = None):
    """Decoder spec: TE fused modules on GPU; on CPU megatron-core's local modules with our :class:`Norm`
    (megatron's torch-norm fallback refuses sequence parallelism) and our :class:`SDPACoreAttention` (fused
    SDPA kernel; packed THD sequences as TE's attention handles them)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from megatron_zero.models.attention import SDPACoreAttention
    from megatron_zero.models.norms import Norm

    qk_layernorm = bool(getattr(config, "qk_layernorm", False))
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    # SDPA kernel instead of megatron's unfused softmax attention, and packed (THD) sequences on CPU
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    if qk_layernorm:  # Qwen3: RMSNorm over each head (weights of size head_dim)
        spec.submodules.self_attention.submodules.q_layernorm = Norm
        spec.submodules.self_attention.submodules.k_layernorm = Norm
    spec.submodules.input_layernorm = Norm
    spec.submodules.pre_mlp_layernorm = Norm
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=Norm)


def transformer_config(cfg: LlamaConfig, opts: RuntimeOptions, num_layers: Optional[int] = None):
    """megatron-core ``TransformerConfig`` for ``cfg`` under ``opts``."""
    from megatron.core.transformer import TransformerConfig

    stage_layers = validate(cfg, opts)
    use_te = platform.HAVE_TE if opts.use_te is None else opts.use_te
    kwargs = {}
    if opts.pipeline_model_parallel_size > 1 or opts.pipeline_stage_layers is not None:
        kwargs["pipeline_model_parallel_layout"] = megatron_layout(stage_layers)
    if opts.recompute_activations:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if opts.fp8:
        kwargs.update(fp8=opts.fp8, fp8_recipe=opts.fp8_recipe)
    return TransformerConfig(
        num_layers=cfg.num_layers if num_layers is None else num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=opts.tensor_model_parallel_size,
        pipeline_model_parallel_size=opts.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=opts.virtual_pipeline_model_parallel_size,
        sequence_parallel=opts.sequence_parallel,
        params_dtype=opts.params_dtype,
        pipeline_dtype=opts.params_dtype,
        bf16=opts.bf16,
        use_cpu_initialization=not platform.HAVE_CUDA,
        perform_initialization=opts.initialize_weights,
        cuda_graph_scope=[],  # the whole layer; the default ("full") says the same with a deprecation warning
        transformer_impl="transformer_engine" if use_te else "local",
        **kwargs,
    )


def build_llama_model(
    cfg: LlamaConfig,
    opts: Optional[RuntimeOptions] = None,
    vp_stage: Optional[int] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
):
    """This rank's part of the decoder as a megatron-core ``GPTModel`` (parallel state must be initialised)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    opts = opts or RuntimeOptions()
    config = transformer_config(cfg, opts)
    use_te = platform.HAVE_TE if opts.use_te is None else opts.use_te
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(use_te, config, vp_stage),
        vocab_size=padded_vocab_size(cfg.vocab_size, opts.tensor_model_parallel_size, opts.make_vocab_size_divisible_by),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )
    model.llama_config = cfg
    if not opts.initialize_weights:
        mark_tensor_parallel_weights(model)
    if not platform.HAVE_CUDA and opts.tensor_model_parallel_size == 1:
        import types

        model.compute_language_model_loss = types.MethodType(_whole_vocab_cross_entropy, model)
    zero_vocab_padding(model, cfg.vocab_size)
    if cfg.lora:
        from megatron_zero.models.lora import apply_lora

        apply_lora(model, cfg)
    if platform.HAVE_CUDA:
        model.cuda(torch.cuda.current_device())
    return model


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give every tensor-parallel weight the attributes (``tensor_model_parallel``, ``partition_dim``, ``stride``)
    megatron-core sets only while initialising it: needed after building with ``initialize_weights=False``
    (sharded loads, DDP and the optimizer read them). Column-parallel linears and vocab-parallel embeddings are
    split along dim 0, row-parallel linears along dim 1; weights that have the attributes are left alone."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, set_tensor_model_parallel_attributes,
    )
    from megatron.core.transformer.mlp import MLP

    # megatron's MLP builds a gated (SwiGLU) fc1 with stride 2: each TP rank holds interleaved [gate, up] pieces
    strides = {id(m.linear_fc1): 2 for m in model.modules() if isinstance(m, MLP) and m.config.gated_linear_unit
               and not getattr(m.config, "use_kitchen", False)}
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, strides.get(id(module), 1))
        bias = getattr(module, "bias", None)
        if dim == 0 and isinstance(bias, torch.Tensor) and not hasattr(bias, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(bias, True, 0, 1)


def _whole_vocab_cross_entropy(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``GPTModel.compute_language_model_loss`` when one rank holds the whole vocabulary (TP=1 on CPU): torch's
    fused log-softmax + NLL instead of megatron's vocab-parallel cross-entropy, which makes several extra passes
    over the ``[s, b, vocab]`` logits for its TP all-reduces. Same function (padded vocabulary rows included),
    per-token losses ``[b, s]``."""
    s, b, v = logits.shape
    loss = F.cross_entropy(logits.reshape(s * b, v).float(), labels.transpose(0, 1).reshape(s * b), reduction="none")
    return loss.view(s, b).transpose(0, 1).contiguous()


def zero_vocab_padding(model, vocab_size: int) -> None:
    """Zero the rows of the (vocab-parallel) embedding/output weights that lie past the true vocabulary."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("embedding.word_embeddings.weight", "output_layer.weight")):
                start = rank * p.shape[0]
                first_pad = max(0, vocab_size - start)
                if first_pad < p.shape[0]:
                    p[first_pad:].zero_()


def build_llama_chunks(cfg: LlamaConfig, opts: Optional[RuntimeOptions] = None) -> list:
    """All model chunks of this rank (one per virtual pipeline stage), as megatron's schedules expect."""
    opts = opts or RuntimeOptions()
    vpp = opts.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [build_llama_model(cfg, opts)]
    return [build_llama_model(cfg, opts, vp_stage=i) for i in range(vpp)]
