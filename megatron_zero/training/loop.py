"""The training loop shared by every entry point: steps, LR schedule, logging, checkpoints, exit signals.

SLURM sends SIGTERM (or the ``--signal`` of ``sbatch``, commonly SIGUSR1) before the time limit: the loop
finishes the current step, saves a checkpoint and exits with status 75 (:data:`megatron_zero.errors.EXIT_PREEMPTED`,
"stopped early, resumable"), so ``--load`` continues the exact loss curve (model, optimizer, scheduler, RNG and
data position are all restored). ``python -m megatron_zero.launcher`` (torchrun + signal forwarding) delivers
the signal to every rank and exits 75 itself.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_zero.config import CheckpointConfig, RunConfig
from megatron_zero.errors import Preempted, StoppedWithoutCheckpoint
from megatron_zero.parallel.initialize import print_rank0
from megatron_zero.checkpointing import run_dir
from megatron_zero.checkpointing import training_checkpoint as ckpt
from megatron_zero.training.flops import mfu
from megatron_zero.training.train_step import StepResult, train_step


@dataclasses.dataclass
class LoopConfig:
    train_iters: int
    global_batch_size: int
    micro_batch_size: int
    seq_length: int
    data_parallel_size: int
    log_interval: int = 1
    save: Optional[str] = None
    save_interval: Optional[int] = None
    keep_last: int = 2
    tensorboard_dir: Optional[str] = None
    flops_per_step: Optional[float] = None
    peak_tflops: Optional[float] = None
    exit_after_iters: Optional[int] = None  # stop early (tests/debugging), saving first when --save is set
    metrics_file: Optional[str] = None  # JSON lines {"iteration", "loss", "lr", "grad_norm", "real_tokens",
    #                                     "computed_tokens"} written by rank 0
    model_config: Optional[dict] = None  # the architecture, recorded in every checkpoint and checked on resume
    async_save: bool = False  # write checkpoints in the background (published once durable)
    exit_duration_in_mins: Optional[float] = None  # save and exit 75 once the process has run this long
    save_interval_minutes: Optional[float] = None  # also save when this long has passed since the last save
    save_frozen: bool = False  # full saves even with frozen parameters (else: trainable-only, base referenced)
    fully_reshardable: bool = False  # distributed optimizer state in the any-TP/PP/DP format (else: DP only)
    frozen_base: Optional[dict] = None  # {flag: path} the frozen parameters were loaded from
    tokenizer: Optional[str] = None  # recorded in every checkpoint, for readers of an iter_* (generation, export)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @classmethod
    def from_config(cls, cfg: RunConfig, data_parallel_size: int, flops_per_step: Optional[float] = None,
                    model_config: Optional[dict] = None) -> "LoopConfig":
        """From a run's configuration (its global batch size resolved)."""
        from megatron_zero import platform
        from megatron_zero.training.flops import PEAK_TFLOPS

        gpu = os.environ.get("MEGATRON_ZERO_GPU_TYPE", "H100")
        t, c = cfg.training, cfg.checkpoint
        return cls(
            train_iters=t.train_iters, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
            seq_length=t.seq_length, data_parallel_size=data_parallel_size, log_interval=cfg.logging.log_interval,
            save=c.save, save_interval=c.save_interval, keep_last=c.keep_last_checkpoints,
            tensorboard_dir=cfg.logging.tensorboard_dir, flops_per_step=flops_per_step,
            peak_tflops=PEAK_TFLOPS.get(gpu) if platform.HAVE_CUDA else None,
            exit_after_iters=t.exit_after_iters, metrics_file=cfg.logging.metrics_file, model_config=model_config,
            async_save=c.async_save, exit_duration_in_mins=c.exit_duration_in_mins,
            save_interval_minutes=c.save_interval_minutes, save_frozen=c.save_frozen,
            fully_reshardable=c.dist_ckpt_optim_fully_reshardable,
            frozen_base={flag: path for flag, path in (("--pretrained", c.pretrained_checkpoint),
                                                       ("--decoder-load", cfg.stage.decoder_load),
                                                       ("--encoder-load", cfg.stage.encoder_load)) if path},
            tokenizer=os.path.abspath(cfg.data.tokenizer) if cfg.data.tokenizer else None,
        )


def _checkpoint_meta(cfg: LoopConfig) -> Optional[dict]:
    """What a checkpoint's manifest records besides its files: the architecture and the tokenizer."""
    meta = {"model_config": cfg.model_config} if cfg.model_config else {}
    if cfg.tokenizer:
        meta["tokenizer"] = cfg.tokenizer
    return meta or None


def build_scheduler(optimizer, lr: float, min_lr: float, train_iters: int, warmup_fraction: float,
                    decay_style: str = "cosine", weight_decay: float = 0.0):
    """megatron-core's LR scheduler: linear warmup then ``decay_style`` to ``min_lr`` (Table A.4: cosine, 3%)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=int(round(warmup_fraction * train_iters)),
        lr_decay_steps=train_iters,
        lr_decay_style=decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )


def prepare_run(checkpoint: CheckpointConfig) -> bool:
    """First thing after parsing: lock and check ``--save``, warn about a missing ``--load`` (see
    :func:`megatron_zero.checkpointing.run_dir.prepare_save_dir`); returns whether the run resumes."""
    return run_dir.prepare_save_dir(checkpoint.save, checkpoint.load, checkpoint.overwrite)


def setup_optimization(cfg: RunConfig, chunks: list, model_config: Optional[dict] = None):
    """DDP-wrap ``chunks``, build the optimizer and LR schedule of ``cfg``, and resume from ``--load`` if it
    holds a checkpoint (of the architecture ``model_config``). Returns ``(chunks, optimizer, scheduler,
    start_iteration)``."""
    from megatron_zero.checkpointing.resolve import check_resume_dir
    from megatron_zero.training.optimizer import OptimizerOptions, build_optimizer, wrap_ddp

    o, load = cfg.optimizer, cfg.checkpoint.load
    oopts = OptimizerOptions.from_config(o, bf16=cfg.model.bf16)
    chunks = wrap_ddp(chunks, oopts)
    optimizer = build_optimizer(chunks, oopts)
    ckpt.decide_optimizer_format(optimizer, chunks)  # from the model, once: save and load agree
    scheduler = build_scheduler(optimizer, o.lr, o.min_lr, cfg.training.train_iters, o.lr_warmup_fraction,
                                o.lr_decay_style, o.weight_decay)
    check_resume_dir(load)
    start = 0
    if load and run_dir.latest_iteration(load) is not None:
        start, _ = ckpt.load_checkpoint(load, chunks, optimizer, scheduler, model_config=model_config,
                                        verify=cfg.checkpoint.checkpoint_verify)
        print_rank0(f"resumed from {load} at iteration {start}")
    return chunks, optimizer, scheduler, start


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_PROCESS_START = time.time()  # --exit-duration-in-mins counts from here (as Megatron-LM's _TRAIN_START_TIME)


class _ExitSignal:
    """Remembers that SIGTERM/SIGUSR1 arrived; the loop checks it between steps (agreed over all ranks).

    Once a signal has arrived the handler stays installed (a second signal during the save must not kill the
    process with the default action).
    """

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.received: Optional[int] = None
        self._previous = {}
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        # megatron_zero.launcher starts its workers with SIGUSR1 blocked: one that came during start-up is
        # delivered now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)

    def _handle(self, signum, _frame):
        if self.received is None:
            print(f"[rank {dist.get_rank() if dist.is_initialized() else 0}] got "
                  f"{signal.Signals(signum).name}: saving a checkpoint after this step", flush=True)
        self.received = signum

    def any_rank(self, *local: bool) -> list[bool]:
        """Whether a signal arrived on any rank, then each of ``local`` or-ed over the ranks (one all-reduce)."""
        from megatron_zero.parallel.collectives import all_reduce_values

        flags = all_reduce_values([1 if self.received is not None else 0, *(int(x) for x in local)], "max")
        return [bool(x) for x in flags]

    def restore(self):
        if self.received is not None:
            return
        for s, h in self._previous.items():
            signal.signal(s, h)
        global _EXIT_SIGNAL
        if _EXIT_SIGNAL is self:
            _EXIT_SIGNAL = None


_EXIT_SIGNAL: Optional[_ExitSignal] = None


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Under torchrun: ask the kernel for ``sig`` when the launcher dies (a plain torchrun killed by SIGUSR1,
    which it does not handle, would otherwise leave this rank training as an orphan)."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        from megatron_zero import platform

        platform.die_with_parent(sig)


def install_exit_signals() -> _ExitSignal:
    """Catch the preemption signals from now on (call it first thing in an entry point; idempotent)."""
    global _EXIT_SIGNAL
    if _EXIT_SIGNAL is None:
        _EXIT_SIGNAL = _ExitSignal()
        _die_with_parent()
    return _EXIT_SIGNAL


class ProgressLogger:
    """A console progress line (rate, throughput, MFU, memory, ETA) on rank 0, plus TensorBoard scalars."""

    def __init__(self, cfg: LoopConfig, start_iteration: int):
        self.cfg = cfg
        self.start_iteration = start_iteration
        self.t_start = time.time()
        self.t_last = self.t_start
        self.iter_last = start_iteration
        self.real = self.computed = 0
        self.writer = None
        if cfg.tensorboard_dir and (not dist.is_initialized() or dist.get_rank() == 0):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.tensorboard_dir)

    def count(self, real_tokens: int, computed_tokens: int) -> None:
        """Positions of one step: ``real`` ones belong to samples, ``computed`` ones include padding."""
        self.real += real_tokens
        self.computed += computed_tokens

    def log(self, iteration: int, result: StepResult, lr: float, loss: Optional[float]) -> None:
        now = time.time()
        steps = iteration - self.iter_last
        elapsed = now - self.t_last
        dt = elapsed / max(steps, 1)
        self.t_last, self.iter_last = now, iteration
        computed = self.computed or self.cfg.global_batch_size * self.cfg.seq_length * max(steps, 1)
        real = self.real or computed
        self.real = self.computed = 0
        tokens_per_s = computed / max(elapsed, 1e-9)
        real_per_s = real / max(elapsed, 1e-9)
        world = dist.get_world_size() if dist.is_initialized() else 1
        parts = [f"iter {iteration}/{self.cfg.train_iters}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts += [f"lr {lr:.3e}"]
        if result.grad_norm is not None:
            parts.append(f"grad-norm {result.grad_norm:.3f}")
        parts += [f"{dt * 1000:.0f} ms/step", f"{real_per_s / world:,.0f} real tok/s/dev "
                  f"({100 * real / computed:.1f}% of {tokens_per_s / world:,.0f} computed)"]
        scalars = {"lr": lr, "step_time_s": dt, "tokens_per_s_per_device": tokens_per_s / world,
                   "real_tokens_per_s_per_device": real_per_s / world, "real_token_fraction": real / computed}
        if self.cfg.flops_per_step:
            # flops_per_step is for global batch x seq positions; scale to the positions actually computed
            per_step = computed / max(steps, 1) / (self.cfg.global_batch_size * self.cfg.seq_length)
            tflops, util = mfu(self.cfg.flops_per_step * per_step, dt, world, self.cfg.peak_tflops or float("inf"))
            parts.append(f"{tflops:.3g} TFLOP/s/dev")
            scalars["tflops_per_device"] = tflops
            if self.cfg.peak_tflops:
                parts.append(f"MFU {100 * util:.1f}%")
                scalars["mfu"] = util
        if torch.cuda.is_available():
            gb = torch.cuda.max_memory_allocated() / 2**30
            parts.append(f"mem {gb:.1f} GB")
            scalars["max_memory_gb"] = gb
        remaining = (self.cfg.train_iters - iteration) * (now - self.t_start) / max(iteration - self.start_iteration, 1)
        parts.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(remaining))}")
        print_rank0(" | ".join(parts))
        if self.writer is not None:
            if loss is not None:
                self.writer.add_scalar("loss", loss, iteration)
            if result.grad_norm is not None:
                self.writer.add_scalar("grad_norm", result.grad_norm, iteration)
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, iteration)

    def pause(self) -> None:
        """Exclude time spent outside training steps (checkpoint saves) from the step-time average."""
        self.t_last = time.time()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _last_stage_loss(result: StepResult) -> Optional[float]:
    """The step's loss on every rank (it is only known on the last pipeline stage)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return result.loss
    from megatron_zero.parallel.collectives import comm_tensor

    group = ps.get_pipeline_model_parallel_group()
    t = comm_tensor([result.loss if result.loss is not None else 0.0], group=group)
    dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t.item()


def _maybe_test_signal(iteration: int) -> None:
    """``MEGATRON_ZERO_SIGTERM_AT_ITER=N``: rank 0 sends itself SIGTERM after step N, as SLURM would.

    Lets tests exercise the real signal path deterministically.
    """
    at = os.environ.get("MEGATRON_ZERO_SIGTERM_AT_ITER")
    if at is not None and int(at) == iteration and (not dist.is_initialized() or dist.get_rank() == 0):
        os.kill(os.getpid(), signal.SIGTERM)


def _iteration_data(cfg: LoopConfig, model_chunks: list, make_data_iterator: Callable[[int], Iterator],
                    iteration: int) -> tuple:
    """The micro-batch iterator(s) of ``iteration`` and how the schedule runs them: ``(data, num_microbatches,
    seq_length, micro_batch_size, real_tokens, computed_tokens)``."""
    # the interleaved (virtual pipeline) schedule takes one iterator per model chunk
    # a packed step (training.vlm_batches.StepBatches) says how many micro-batches of which shape it has
    data = [make_data_iterator(iteration) for _ in model_chunks]
    num_mb = getattr(data[0], "num_microbatches", cfg.num_microbatches)
    seq, mbs = getattr(data[0], "schedule_shape", (cfg.seq_length, cfg.micro_batch_size))
    computed = getattr(data[0], "computed_tokens", cfg.global_batch_size * cfg.seq_length)
    real = getattr(data[0], "real_tokens", computed)
    return data if len(data) > 1 else data[0], num_mb, seq, mbs, real, computed


def run_iteration(cfg: LoopConfig, model_chunks: list, optimizer, scheduler, forward_step_func: Callable,
                  make_data_iterator: Callable[[int], Iterator], iteration: int,
                  time_phases: bool = False) -> StepResult:
    """One training iteration (the body of :func:`train`): the iteration's global batch through megatron's
    schedule, the optimizer step and the LR schedule. The result's loss is known on every rank; it also carries
    the lr the step used, the step's real/computed positions and its number of micro-batches."""
    data, num_mb, seq, mbs, real, computed = _iteration_data(cfg, model_chunks, make_data_iterator, iteration)
    result = train_step(forward_step_func, data, model_chunks, optimizer, num_mb, seq, mbs,
                        time_phases=time_phases)
    lr = optimizer.param_groups[0]["lr"]  # the lr this step used (the scheduler moves it on)
    if result.update_successful:
        scheduler.step(increment=1)
    return dataclasses.replace(result, loss=_last_stage_loss(result), lr=lr, real_tokens=real,
                               computed_tokens=computed, num_microbatches=num_mb)


def forward_iteration(cfg: LoopConfig, model_chunks: list, forward_step_func: Callable,
                      make_data_iterator: Callable[[int], Iterator], iteration: int) -> StepResult:
    """The forward pass of :func:`run_iteration` alone: no gradients kept, no update."""
    data, num_mb, seq, mbs, real, computed = _iteration_data(cfg, model_chunks, make_data_iterator, iteration)
    result = train_step(forward_step_func, data, model_chunks, None, num_mb, seq, mbs, forward_only=True)
    return dataclasses.replace(result, loss=_last_stage_loss(result), real_tokens=real, computed_tokens=computed,
                               num_microbatches=num_mb)


def train(
    cfg: LoopConfig,
    model_chunks: list,
    optimizer,
    scheduler,
    forward_step_func: Callable,
    make_data_iterator: Callable[[int], Iterator],
    start_iteration: int = 0,
    extra_state: Callable[[int], dict] = lambda it: {},
) -> list[Optional[float]]:
    """Train from ``start_iteration`` to ``cfg.train_iters``; returns the per-iteration losses.

    ``make_data_iterator(iteration)`` returns the micro-batch iterator of that iteration's global batch
    (this rank's share), so resuming at any iteration replays exactly the same data.
    """
    losses: list[Optional[float]] = []
    exit_signal = install_exit_signals()
    logger = ProgressLogger(cfg, start_iteration)
    iteration = start_iteration
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    metrics = open(cfg.metrics_file, "a") if cfg.metrics_file and rank0 else None
    stop_at = cfg.train_iters if cfg.exit_after_iters is None else min(cfg.train_iters, cfg.exit_after_iters)
    last_save = time.time()
    trainable_only = bool(cfg.save) and not cfg.save_frozen and ckpt.has_frozen_parameters(model_chunks)
    try:
        while iteration < stop_at:
            result = run_iteration(cfg, model_chunks, optimizer, scheduler, forward_step_func, make_data_iterator,
                                   iteration)
            logger.count(result.real_tokens, result.computed_tokens)
            iteration += 1
            loss = result.loss
            losses.append(loss)
            if iteration % cfg.log_interval == 0 or iteration == stop_at:
                logger.log(iteration, result, result.lr, loss)
            if metrics is not None:
                metrics.write(json.dumps({"iteration": iteration, "loss": loss, "grad_norm": result.grad_norm,
                                          "lr": result.lr, "real_tokens": result.real_tokens,
                                          "computed_tokens": result.computed_tokens}) + "\n")
                metrics.flush()
            _maybe_test_signal(iteration)
            if cfg.async_save and ckpt.finalize_async_save():
                print_rank0("an asynchronous checkpoint save finished and was published")
            now = time.time()
            interrupted, timed_out, save_due = exit_signal.any_rank(
                cfg.exit_duration_in_mins is not None and now - _PROCESS_START > 60 * cfg.exit_duration_in_mins,
                cfg.save_interval_minutes is not None and now - last_save > 60 * cfg.save_interval_minutes)
            periodic = (cfg.save_interval and iteration % cfg.save_interval == 0) or save_due
            stopping = interrupted or timed_out or iteration == stop_at
            if cfg.save and (periodic or stopping):
                ckpt.save_checkpoint(cfg.save, iteration, model_chunks, optimizer, scheduler,
                                     extra_state(iteration), keep_last=cfg.keep_last,
                                     meta=_checkpoint_meta(cfg),
                                     async_save=cfg.async_save and not stopping, trainable_only=trainable_only,
                                     frozen_base=cfg.frozen_base, fully_reshardable=cfg.fully_reshardable)
                print_rank0(f"{'started saving' if cfg.async_save and not stopping else 'saved'} checkpoint "
                            f"iteration {iteration} to {cfg.save}")
                last_save = time.time()
                logger.pause()
            if timed_out and not interrupted and iteration < stop_at:
                print_rank0(f"--exit-duration-in-mins {cfg.exit_duration_in_mins:g} reached: stopped after iteration "
                            f"{iteration}")
                if not cfg.save:  # exit 1: nothing to resume from
                    raise StoppedWithoutCheckpoint(f"--exit-duration-in-mins reached at iteration {iteration}/"
                                                   f"{cfg.train_iters}; no --save was given, so nothing was saved")
                raise Preempted(f"stopped at iteration {iteration}/{cfg.train_iters} (--exit-duration-in-mins), "
                                f"checkpoint saved to {cfg.save}")
            if interrupted:
                print_rank0(f"exit signal received: stopped after iteration {iteration}")
                if iteration < cfg.train_iters and cfg.save:
                    raise Preempted(f"stopped early at iteration {iteration}/{cfg.train_iters}, checkpoint saved to "
                                    f"{cfg.save}")
                if iteration < cfg.train_iters:  # exit 1: nothing to resume from
                    raise StoppedWithoutCheckpoint(f"stopped by a signal at iteration {iteration}/{cfg.train_iters}; "
                                                   f"no --save was given, so nothing was saved")
                break
    finally:
        exit_signal.restore()
        logger.close()
        if metrics is not None:
            metrics.close()
    return losses
