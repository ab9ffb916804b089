"""One Trainer for every training entry point: configure -> validate -> ``Trainer`` -> ``initialize`` ->
``build`` -> ``run``.

An entry point (``pretrain_lm``, ``pretrain_vlm``) parses its command line into a
:class:`~megatron_zero.config.RunConfig` (:func:`megatron_zero.arguments.parse`), or builds one in code (the demo,
once per training run of its pipeline), checks what its model and data need, then::

    trainer = Trainer(cfg)                  # checks and locks --save (nothing is built yet)
    dp = trainer.initialize()               # process groups (TP/PP/DP), seeds
    chunks = ...                            # the model chunks of this rank, weights loaded, frozen as wanted
    trainer.build(chunks, forward_step, make_iterator, model_config=..., flops_per_step=...)
    losses = trainer.run()                  # steps, logging, checkpoints, preemption (exit 75)

``build`` wraps the chunks in megatron-core DDP, builds the optimizer and LR schedule from ``cfg.optimizer`` and
resumes from ``--load`` (model, optimizer, scheduler, RNG, data position); ``run`` trains from there to
``--train-iters``. The model config dict is recorded in every checkpoint and checked on resume.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from megatron_zero.config import ConfigError, RunConfig
from megatron_zero.training.loop import LoopConfig, install_exit_signals, prepare_run, setup_optimization, train


class Trainer:
    def __init__(self, cfg: RunConfig):
        install_exit_signals()  # idempotent: entry points install them first thing, before any slow set-up
        self.cfg = cfg
        self.resuming = prepare_run(cfg.checkpoint)
        self.data_parallel_size: Optional[int] = None
        self.chunks: Optional[list] = None
        self.optimizer = self.scheduler = None
        self.start_iteration = 0
        self._loop: Optional[LoopConfig] = None
        self._forward_step: Optional[Callable] = None
        self._make_iterator: Optional[Callable[[int], Iterator]] = None

    def initialize(self) -> int:
        """Process groups and seeds; resolves ``--global-batch-size`` (default: micro batch x DP) and checks it
        divides into micro-batches over DP. Returns the data-parallel size."""
        from megatron_zero.parallel.initialize import initialize_from_config

        dp = initialize_from_config(self.cfg.parallel, self.cfg.training.seed)
        t = self.cfg.training
        gbs = t.global_batch_size or t.micro_batch_size * dp
        if gbs % (t.micro_batch_size * dp):
            raise ConfigError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size x DP = "
                              f"{t.micro_batch_size * dp}")
        self.cfg = self.cfg.replace("training", global_batch_size=gbs)
        self.data_parallel_size = dp
        return dp

    def build(self, chunks: list, forward_step: Callable, make_iterator: Callable[[int], Iterator], *,
              model_config: Optional[dict] = None, flops_per_step: Optional[float] = None) -> "Trainer":
        """DDP, optimizer, LR schedule and resume for ``chunks`` (this rank's model chunks, weights loaded).

        ``forward_step(data_iterator, model)`` is megatron's schedule step; ``make_iterator(iteration)`` returns
        the micro-batch iterator of an iteration (a pure function of it, so a resumed run replays its data)."""
        if self.data_parallel_size is None:
            raise RuntimeError("Trainer.build before Trainer.initialize")
        self.chunks, self.optimizer, self.scheduler, self.start_iteration = setup_optimization(
            self.cfg, chunks, model_config)
        self._loop = LoopConfig.from_config(self.cfg, self.data_parallel_size, flops_per_step, model_config)
        self._forward_step, self._make_iterator = forward_step, make_iterator
        return self

    def run(self) -> list[Optional[float]]:
        """Train from the resumed iteration to ``--train-iters``; returns the per-iteration losses."""
        if self._loop is None:
            raise RuntimeError("Trainer.run before Trainer.build")
        return train(self._loop, self.chunks, self.optimizer, self.scheduler, self._forward_step,
                     self._make_iterator, start_iteration=self.start_iteration)
