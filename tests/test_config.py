"""The typed run configuration: flags parsed once into RunConfig, one validator, one vocabulary with deprecated
aliases, one-line argument errors without a process-wide argparse patch."""
import argparse
import dataclasses

import pytest

from megatron_zero import arguments
from megatron_zero.config import SECTIONS, ConfigError, RunConfig, validate
from megatron_zero.errors import run_main
from megatron_zero.training import pretrain_lm, pretrain_vlm

VLM = ["--stage", "1", "--decoder-load", "dec", "--data-path", "d.json", "--train-iters", "3"]


def _parse(module, argv, **kw):
    return arguments.parse(module.build_parser(), argv, required=["--train-iters"], **kw)


@pytest.mark.parametrize("module", [pretrain_lm, pretrain_vlm])
def test_every_flag_of_an_entry_point_has_its_place_in_run_config(module):
    dests = {a.dest for a in module.build_parser()._actions if a.dest != "help"}
    owned = {f.name for section in SECTIONS.values() for f in dataclasses.fields(section)}
    assert dests <= owned, sorted(dests - owned)
    with pytest.raises(TypeError, match="surrogate"):
        RunConfig.from_flags({"surrogate": "40,78"})  # a flag no section knows is a programming error


def test_sections_and_deprecated_aliases(capsys):
    cfg = _parse(pretrain_lm, ["--model", "tiny", "--train-iters", "2", "--pretrained", "ckpt", "--dtype", "bf16",
                               "--tensor-model-parallel-size", "1", "--lr", "0.5", "--metrics-file", "m.jsonl"],
                 resolve=pretrain_lm.resolve_model_flag)
    assert cfg.checkpoint.pretrained_checkpoint == "ckpt" and cfg.model.bf16 and cfg.optimizer.lr == 0.5
    assert cfg.training.train_iters == 2 and cfg.logging.metrics_file == "m.jsonl"
    err = capsys.readouterr().err.splitlines()
    assert any("--pretrained is deprecated, use --pretrained-checkpoint" in x for x in err), err
    assert any("--dtype bf16 is deprecated, use --bf16" in x for x in err), err
    # the architecture defaults to the pretrained checkpoint's (a resolved value, not a mutated one)
    cfg = _parse(pretrain_lm, ["--train-iters", "2", "--pretrained-checkpoint", "ckpt"],
                 resolve=pretrain_lm.resolve_model_flag)
    assert cfg.model.model == "ckpt"
    assert "--pretrained " not in pretrain_lm.build_parser().format_help()  # old spellings are not advertised


def test_stage_presets_resolve_into_a_new_config():
    parsed = _parse(pretrain_vlm, VLM)
    assert parsed.optimizer.lr is None and parsed.training.global_batch_size is None
    s1 = pretrain_vlm.apply_stage_presets(parsed, decoder_layers=2)
    assert (s1.optimizer.lr, s1.training.global_batch_size, s1.stage.loss_on_special_tokens) == (1e-4, 256, False)
    assert parsed.optimizer.lr is None  # the parsed config is never changed (frozen dataclasses)
    s3 = pretrain_vlm.apply_stage_presets(parsed.replace("stage", stage=3), decoder_layers=80)
    assert s3.optimizer.lr == pretrain_vlm.STAGE3_LR_70B
    given = pretrain_vlm.apply_stage_presets(_parse(pretrain_vlm, VLM + ["--lr", "3e-3"]), decoder_layers=2)
    assert given.optimizer.lr == 3e-3
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.optimizer.lr = 1.0


@pytest.mark.parametrize("changes, world, message", [
    ({"training": {"micro_batch_size": 0}}, 1, "--micro-batch-size must be >= 1"),
    ({"parallel": {"sequence_parallel": True}}, 1, "--sequence-parallel needs"),
    ({"parallel": {"tensor_model_parallel_size": 2}}, 3, "world size 3 is not divisible"),
    ({"training": {"global_batch_size": 3, "micro_batch_size": 2}}, 1, "--global-batch-size 3"),
    ({"data": {"text_ratio": 1.5}}, 1, "--text-ratio must be in"),
    ({"checkpoint": {"export_model": True}}, 1, "--export-model writes"),
    ({"checkpoint": {"dist_ckpt_optim_fully_reshardable": True}}, 1, "--dist-ckpt-optim-fully-reshardable is a format"),
])
def test_one_validator_names_the_flag(changes, world, message):
    cfg = RunConfig()
    for section, values in changes.items():
        cfg = cfg.replace(section, **values)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_argument_errors_are_one_line_without_patching_argparse(capsys):
    original = argparse.ArgumentParser.error
    with pytest.raises(SystemExit) as exited:
        run_main(pretrain_vlm.main, prog="pretrain_vlm", argv=VLM + ["--micro-batch-size", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(": error: --micro-batch-size must be >= 1, got 0 (see --help)"), err
    assert "\n" not in err and "usage:" not in err
    assert argparse.ArgumentParser.error is original  # nothing process-wide was replaced
    with pytest.raises(SystemExit) as exited:
        run_main(pretrain_lm.main, prog="pretrain_lm", argv=["--train-iters", "1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: --model is required (a preset name or "
                                                    "model_config.json) (see --help)")
