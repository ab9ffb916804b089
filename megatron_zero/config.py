"""The typed run configuration: the flags of a training run, parsed once into nested dataclasses.

:func:`megatron_zero.arguments.parse` turns the command line into a :class:`RunConfig` (one section per
concern, field names = Megatron-LM's flag names with ``_``) and :func:`validate` checks it; from there on library
code takes these dataclasses (or the one section it needs), never an ``argparse.Namespace``. The same shape as
torchtitan's ``JobConfig`` and Megatron-Bridge's ``ConfigContainer``.

Values that depend on what a run reads (the stage presets, which depend on the decoder's size) are *resolved*
into a new config with :func:`dataclasses.replace`, never written into the parsed one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from megatron_zero.errors import UserError


class ConfigError(UserError, ValueError):
    """A flag value or combination of flags that cannot work (the message names the flag)."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    pipeline_stage_layers: Optional[Sequence[int]] = None  # decoder layers per (virtual) pipeline stage
    sequence_parallel: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: Optional[str] = None  # preset name, model_config.json, or a checkpoint directory holding one
    bf16: bool = False
    fp8_format: Optional[str] = None
    fp8_recipe: str = "delayed"
    transformer_impl: str = "auto"
    recompute_activations: bool = False
    make_vocab_size_divisible_by: int = 128
    lora_rank: Optional[int] = None
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "q,v"


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # None: micro batch x DP (pretrain_vlm: the stage preset)
    seq_length: int = 2048
    train_iters: Optional[int] = None
    exit_after_iters: Optional[int] = None  # stop (and save) early: tests, debugging
    seed: int = 1234


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: Optional[float] = 1e-4  # None: the stage preset (pretrain_vlm)
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.03
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = None  # the run directory written to
    load: Optional[str] = None  # the run directory resumed from
    pretrained_checkpoint: Optional[str] = None  # initial weights (read only)
    save_interval: Optional[int] = None
    keep_last_checkpoints: int = 2
    overwrite: bool = False
    checkpoint_verify: str = "hash"
    # background saves, frozen weights in checkpoints, time-based exit and save (Megatron-LM names)
    async_save: bool = False
    save_frozen: bool = False
    dist_ckpt_optim_fully_reshardable: bool = False  # distributed optimizer: save in the format any TP/PP/DP resumes
    exit_duration_in_mins: Optional[float] = None
    save_interval_minutes: Optional[float] = None
    export_model: bool = False  # pretrain_lm: write <save>/export at the end
    no_export: bool = False  # pretrain_vlm: skip writing <save>/export at the end


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_path: Optional[str] = None
    tokenizer: Optional[str] = None
    chat_template: Optional[str] = None
    pack_sequences: bool = True
    mock_data: bool = False
    instruction_data_path: Optional[str] = None
    image_root: Optional[str] = None
    text_data_path: Optional[str] = None
    text_ratio: Optional[float] = None
    allow_dropped_samples: bool = False
    strict_images: bool = False
    prompt_format: str = "meta"
    image_token_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """The VLM training stage (pretrain_vlm): what is trained, from which weights, with which loss."""

    stage: Optional[int] = None
    decoder_load: Optional[str] = None
    encoder_load: Optional[str] = None
    vision_model: Optional[str] = None
    feature_convention: str = "zero"
    loss_weighting: str = "token-mean"
    loss_weighting_ord: Optional[float] = None
    loss_weighting_avg_norm: bool = False
    loss_on_special_tokens: Optional[bool] = None
    encoder_trainable_layers: Optional[int] = None
    translator_layer: Optional[int] = None
    control_unfreeze_early: bool = False


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None  # per-iteration JSON lines, written by rank 0


SECTIONS = {"parallel": ParallelConfig, "model": ModelConfig, "training": TrainingConfig,
            "optimizer": OptimizerConfig, "checkpoint": CheckpointConfig, "data": DataConfig, "stage": StageConfig,
            "logging": LoggingConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run is told, one section per concern."""

    parallel: ParallelConfig = ParallelConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    data: DataConfig = DataConfig()
    stage: StageConfig = StageConfig()
    logging: LoggingConfig = LoggingConfig()

    @classmethod
    def from_flags(cls, flags: dict[str, Any], strict: bool = True) -> "RunConfig":
        """From ``{flag dest: value}`` (a parsed command line). ``strict``: a dest no section knows is a programming
        error (an entry point's flag missing here); else such flags are left to the caller (a tool's own flags)."""
        owner = {f.name: name for name, section in SECTIONS.items() for f in dataclasses.fields(section)}
        unknown = sorted(set(flags) - set(owner))
        if unknown and strict:
            raise TypeError(f"flags without a place in RunConfig: {unknown}; add them to a section of "
                            f"megatron_zero/config.py")
        parts: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for dest, value in flags.items():
            if dest in owner:
                parts[owner[dest]][dest] = value
        return cls(**{name: SECTIONS[name](**values) for name, values in parts.items()})

    def replace(self, section: str, **changes) -> "RunConfig":
        """A copy with ``changes`` in ``section`` (resolving a value, e.g. a stage preset)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _at_least_one(flag: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"--{flag} must be >= 1, got {value}")


def validate(cfg: RunConfig, world_size: Optional[int] = None) -> None:
    """The checks of flag values and combinations that need neither the model nor the data; errors name the flag.

    (What needs a checkpoint, tokenizer or dataset is checked when the run is built, before any weight is read.)
    """
    p, t, c = cfg.parallel, cfg.training, cfg.checkpoint
    for flag, value in (("tensor-model-parallel-size", p.tensor_model_parallel_size),
                        ("pipeline-model-parallel-size", p.pipeline_model_parallel_size),
                        ("micro-batch-size", t.micro_batch_size), ("seq-length", t.seq_length),
                        ("log-interval", cfg.logging.log_interval), ("global-batch-size", t.global_batch_size),
                        ("train-iters", t.train_iters), ("save-interval", c.save_interval),
                        ("keep-last-checkpoints", c.keep_last_checkpoints)):
        _at_least_one(flag, value)
    for flag, value in (("exit-duration-in-mins", c.exit_duration_in_mins),
                        ("save-interval-minutes", c.save_interval_minutes)):
        if value is not None and value <= 0:
            raise ConfigError(f"--{flag} must be > 0, got {value}")
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None and (vpp < 1 or p.pipeline_model_parallel_size == 1):
        raise ConfigError("--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1")
    if world_size is not None:
        mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % mp:
            raise ConfigError(f"world size {world_size} is not divisible by --tensor-model-parallel-size x "
                              f"--pipeline-model-parallel-size = {mp}")
        dp = world_size // mp
        gbs, mbs = t.global_batch_size, t.micro_batch_size
        if gbs is not None and gbs % (mbs * dp):
            raise ConfigError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x "
                              f"data-parallel size {dp}")
    text_ratio = cfg.data.text_ratio
    if text_ratio is not None and not 0 < text_ratio < 1:
        raise ConfigError(f"--text-ratio must be in (0, 1), got {text_ratio}")
    if c.export_model and not c.save:
        raise ConfigError("--export-model writes <save>/export: give --save")
    if c.dist_ckpt_optim_fully_reshardable and not cfg.optimizer.use_distributed_optimizer:
        raise ConfigError("--dist-ckpt-optim-fully-reshardable is a format of the distributed optimizer's state: give "
                          "--use-distributed-optimizer (a plain optimizer's state resumes only at its own layout)")
    if cfg.model.fp8_format and t.seq_length % 16:
        raise ConfigError(f"--seq-length {t.seq_length} must be a multiple of 16 with --fp8-format")
