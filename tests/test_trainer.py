"""The Trainer's per-step API (what the benchmarks and the GPU check time) against its run loop: ``run`` is a loop
over the same iteration as ``step``, so both give the same losses from the same weights and data."""
import pytest
import torch

from megatron_zero.config import CheckpointConfig, ConfigError, OptimizerConfig, RunConfig, TrainingConfig

SEQ, GBS, ITERS = 32, 4, 3


@pytest.fixture(scope="module")
def world_of_one():
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=7)


def _cfg(**checkpoint):
    return RunConfig(training=TrainingConfig(micro_batch_size=2, global_batch_size=GBS, seq_length=SEQ,
                                             train_iters=ITERS, seed=7),
                     optimizer=OptimizerConfig(lr=1e-2, lr_warmup_fraction=0.0, lr_decay_style="constant"),
                     checkpoint=CheckpointConfig(**checkpoint))


def _build(trainer):
    from megatron_zero.models.llama import build_llama_chunks
    from megatron_zero.models.llama_config import get_preset
    from megatron_zero.training.train_step import lm_forward_step
    from megatron_zero_dev.steps import alternating_token_batches

    cfg = get_preset("tiny")
    torch.manual_seed(0)
    chunks = build_llama_chunks(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (GBS * (SEQ + 1) * 2,), generator=torch.Generator().manual_seed(1))
    return trainer.build(chunks, lm_forward_step, alternating_token_batches(tokens, SEQ, GBS, 2))


def test_step_is_the_iteration_run_loops_over(world_of_one):
    from megatron_zero.training.trainer import Trainer

    stepped = _build(Trainer.for_steps(_cfg()))
    forward = stepped.forward(0).loss
    results = [stepped.step(i, time_phases=True) for i in range(ITERS)]
    assert forward == pytest.approx(results[0].loss, rel=1e-6)  # forward alone: the loss before the update
    assert results[-1].loss < results[0].loss  # the updates train (the same two batches alternate)
    for r in results:
        assert r.lr == pytest.approx(1e-2) and r.grad_norm > 0 and r.update_successful
        assert r.real_tokens == r.computed_tokens == GBS * SEQ and r.num_microbatches == 2
        assert r.forward_backward_s > 0 and r.optimizer_s > 0

    run = Trainer(_cfg())
    assert run.initialize() == 1  # the same world of one and seed as the fixture's
    losses = _build(run).run()
    assert losses == pytest.approx([r.loss for r in results], rel=1e-6)


def test_steps_only_trainer_refuses_a_run_directory(tmp_path):
    from megatron_zero.training.trainer import Trainer

    for flags in ({"save": str(tmp_path / "run")}, {"load": str(tmp_path / "run")}):
        with pytest.raises(ConfigError, match="steps-only Trainer saves and loads nothing"):
            Trainer.for_steps(_cfg(**flags))
    assert not (tmp_path / "run").exists()


def test_step_before_build_is_refused():
    from megatron_zero.training.trainer import Trainer

    with pytest.raises(RuntimeError, match="Trainer.step before Trainer.build"):
        Trainer.for_steps(_cfg()).step(0)
