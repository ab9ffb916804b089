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

``run`` is a loop over :meth:`Trainer.step` (one iteration: batch, forward/backward, optimizer step, LR schedule)
plus logging, checkpoints and exit signals. The benchmarks and the GPU check time ``step`` itself on a trainer
made with :meth:`Trainer.for_steps`: no run directory, no exit-signal handlers, and the process groups the caller
set up once for many models (``initialize`` is skipped)::

    trainer = Trainer.for_steps(cfg).build(chunks, forward_step, make_iterator)
    result = trainer.step(i, time_phases=True)   # StepResult: loss, grad norm, lr, tokens, phase seconds
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from megatron_zero.config import ConfigError, RunConfig
from megatron_zero.training.loop import (LoopConfig, forward_iteration, install_exit_signals, prepare_run,
                                         run_iteration, setup_optimization, train)
from megatron_zero.training.train_step import StepResult


class Trainer:
    def __init__(self, cfg: RunConfig, *, steps_only: bool = False):
        """``steps_only``: see :meth:`for_steps`."""
        self.cfg = cfg
        self.steps_only = steps_only
        if steps_only:
            c = cfg.checkpoint
            if c.save or c.load:
                raise ConfigError(f"a steps-only Trainer saves and loads nothing: got --save {c.save} --load {c.load}")
            self.resuming = False
        else:
            install_exit_signals()  # idempotent: entry points install them first thing, before any slow set-up
            self.resuming = prepare_run(cfg.checkpoint)
        self.data_parallel_size: Optional[int] = None
        self.chunks: Optional[list] = None
        self.optimizer = self.scheduler = None
        self.start_iteration = 0
        self._loop: Optional[LoopConfig] = None
        self._forward_step: Optional[Callable] = None
        self._make_iterator: Optional[Callable[[int], Iterator]] = None

    @classmethod
    def for_steps(cls, cfg: RunConfig) -> "Trainer":
        """A Trainer whose caller drives :meth:`step` (benchmarks, the GPU check): it reads and writes no run
        directory (``--save``/``--load`` are refused), installs no exit-signal handlers, and uses the process
        groups already set up (no :meth:`initialize`: one world serves many models)."""
        return cls(cfg, steps_only=True)

    def initialize(self) -> int:
        """Process groups and seeds; resolves ``--global-batch-size`` (default: micro batch x DP) and checks it
        divides into micro-batches over DP. Returns the data-parallel size."""
        from megatron_zero.parallel.initialize import initialize_from_config

        self._set_data_parallel_size(initialize_from_config(self.cfg.parallel, self.cfg.training.seed))
        return self.data_parallel_size

    def _set_data_parallel_size(self, dp: int) -> None:
        t = self.cfg.training
        gbs = t.global_batch_size or t.micro_batch_size * dp
        if gbs % (t.micro_batch_size * dp):
            raise ConfigError(f"--global-batch-size {gbs} is not divisible by --micro-batch-size x DP = "
                              f"{t.micro_batch_size * dp}")
        self.cfg = self.cfg.replace("training", global_batch_size=gbs)
        self.data_parallel_size = dp

    def build(self, chunks: list, forward_step: Callable, make_iterator: Callable[[int], Iterator], *,
              model_config: Optional[dict] = None, flops_per_step: Optional[float] = None) -> "Trainer":
        """DDP, optimizer, LR schedule and resume for ``chunks`` (this rank's model chunks, weights loaded).

        ``forward_step(data_iterator, model)`` is megatron's schedule step; ``make_iterator(iteration)`` returns
        the micro-batch iterator of an iteration (a pure function of it, so a resumed run replays its data)."""
        if self.data_parallel_size is None:
            if not self.steps_only:
                raise RuntimeError("Trainer.build before Trainer.initialize")
            from megatron.core import parallel_state as ps

            self._set_data_parallel_size(ps.get_data_parallel_world_size())
        self.chunks, self.optimizer, self.scheduler, self.start_iteration = setup_optimization(
            self.cfg, chunks, model_config)
        self._loop = LoopConfig.from_config(self.cfg, self.data_parallel_size, flops_per_step, model_config)
        self._forward_step, self._make_iterator = forward_step, make_iterator
        return self

    def step(self, iteration: int, *, time_phases: bool = False) -> StepResult:
        """One training iteration on ``make_iterator(iteration)``'s batch: forward/backward, optimizer step, LR
        schedule (the body of :meth:`run`, without its logging, checkpoints and exit signals). ``time_phases``:
        the result also holds the forward+backward and optimizer seconds (the device synchronised)."""
        self._require_built("step")
        return run_iteration(self._loop, self.chunks, self.optimizer, self.scheduler, self._forward_step,
                             self._make_iterator, iteration, time_phases=time_phases)

    def forward(self, iteration: int) -> StepResult:
        """The forward pass of :meth:`step` alone (no gradients kept, no update): its loss."""
        self._require_built("forward")
        return forward_iteration(self._loop, self.chunks, self._forward_step, self._make_iterator, iteration)

    def _require_built(self, what: str) -> None:
        if self._loop is None:
            raise RuntimeError(f"Trainer.{what} before Trainer.build")

    def run(self) -> list[Optional[float]]:
        """Train from the resumed iteration to ``--train-iters``; returns the per-iteration losses."""
        self._require_built("run")
        return train(self._loop, self.chunks, self.optimizer, self.scheduler, self._forward_step,
                     self._make_iterator, start_iteration=self.start_iteration)
