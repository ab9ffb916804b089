"""The whole workflow as a user runs it, every step through its command-line tool (README "The whole workflow"):

HF Llama (real Llama-3 tokenizer) + HF CLIP -> convert to torch_dist (TP=2) -> trajectory (TP=2) -> surrogate ->
stage 1 -> stage 2 -> graft onto the target -> generate -> evaluate (lm-eval and lmms-eval, real entry points) ->
HF LLaVA export, which transformers alone loads and generates with.

Stage 1 and stage 2 also run in their SLURM scripts' layout scaled down (TP=2 x PP=2, sequence parallel,
distributed optimizer, overlapped grad reduce; the surrogate's last pipeline stage has nothing to train) and must
give the PP=1 losses. The chain runs once per module (each step is cached); the tiny models keep it in CI budget.
"""
from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from tests.conftest import run_cli, run_cli_ok
from tests.workflow_world import Pipeline, hf_llava_answers, write_mc_task, write_vqa_task

pytestmark = [pytest.mark.timeout(1500), pytest.mark.parametrize("wf", ["llama"], indirect=True)]
LOSS_TOL = 2e-4  # TP/PP change the order of float sums only
TRAIN = ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
         "--log-interval", "1", "--lr", "1e-3"]
# examples/slurm/stage{1,2}_surrogate_70b.sbatch: TP8 x PP2, sequence parallel, distributed optimizer, overlap
SLURM_LAYOUT = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
                "--use-distributed-optimizer", "--overlap-grad-reduce", "--recompute-activations"]


def first_lr(path: str) -> float:
    return json.loads(open(path).readline())["lr"]


class Workflow(Pipeline):
    """The steps, each run once (cached) in the order the README gives them."""

    family = "llama"
    train = TRAIN

    @functools.cached_property
    def converted(self) -> str:
        run_cli_ok(["tools/convert_checkpoint.py", "--source-format", "hf", "--target-format", "mcore", "--load-dir",
                    self.w["llama"], "--save-dir", self.p("llama-tp2"), "--target-tensor-parallel-size", "2"], nproc=2)
        return self.p("llama-tp2")

    @functools.cached_property
    def trajectory(self) -> dict:
        # the random tiny target has no real transition: the analysis' override flag fixes one
        run_cli_ok(["tools/analyze_trajectory.py", "--load-dir", self.converted, "--data", self.w["text_jsonl"],
                    "--num-samples", "4", "--tensor-model-parallel-size", "2", "--transition-layer", "1",
                    "--output-dir", self.p("traj")], nproc=2)
        return json.load(open(self.p("traj/trajectory.json")))

    @functools.cached_property
    def surrogate(self) -> str:
        assert self.trajectory["transition_layer"] == 1
        run_cli_ok(["tools/build_surrogate.py", "--load-dir", self.w["llama"], "--save-dir", self.p("srgt"),
                    "--from-trajectory", self.p("traj/trajectory.json"), "--translator-end", "3"])
        return self.p("srgt")

    def _stage1(self, name: str, layout: list, nproc: int) -> list[float]:
        rows = self.pretrain_vlm(name, "--stage", "1", "--decoder-load", self.surrogate, "--encoder-load",
                                 self.w["clip"], "--feature-convention", "llava", "--text-data-path",
                                 self.w["text_jsonl"], *layout, nproc=nproc)
        return [r["loss"] for r in rows]

    def _stage2(self, name: str, layout: list, nproc: int) -> list[float]:
        rows = self.pretrain_vlm(name, "--stage", "2", "--decoder-load", self.p("stage1"), "--encoder-load",
                                 self.p("stage1"), "--encoder-trainable-layers", "2", "--loss-on-special-tokens",
                                 *layout, nproc=nproc)
        return [r["loss"] for r in rows]

    @functools.cached_property
    def stage1(self) -> list[float]:
        return self._stage1("stage1", [], 1)

    @functools.cached_property
    def stage1_slurm_layout(self) -> list[float]:
        return self._stage1("stage1-tp2pp2", SLURM_LAYOUT, 4)

    @functools.cached_property
    def stage2(self) -> list[float]:
        assert self.stage1
        return self._stage2("stage2", [], 1)

    @functools.cached_property
    def stage2_slurm_layout(self) -> list[float]:
        assert self.stage1
        return self._stage2("stage2-tp2pp2", SLURM_LAYOUT, 4)

    @functools.cached_property
    def grafted(self) -> str:
        assert self.stage2
        run_cli_ok(["tools/graft.py", "--encoder", self.p("stage2/export"), "--target", self.w["llama"],
                    "--output", self.p("grafted")])
        return self.p("grafted")

    @functools.cached_property
    def answers(self) -> list[dict]:
        """Greedy answers of the grafted VLM to one question per photo (4 new tokens)."""
        run_cli_ok(["tools/generate.py", "--checkpoint", self.grafted, "--prompts", self.write_prompts(),
                    "--output", self.p("answers.jsonl"), "--max-new-tokens", "4"])
        return [json.loads(line) for line in open(self.p("answers.jsonl"))]

    @functools.cached_property
    def vlm_tasks(self) -> str:
        """A local lmms-eval task over the photos whose first target is the grafted VLM's own greedy answer (from
        tools/generate.py) and whose second is not: exact match must be 0.5."""
        a = self.answers
        rows = [{"image": "chelsea.png", "question": "What animal is this?", "answer": a[0]["text"].strip()},
                {"image": "coffee.png", "question": "What is on the table?", "answer": "not " + a[1]["text"]}]
        return write_vqa_task(self.p("vlm_tasks"), "wf_vqa", self.w["images"], rows)

    @functools.cached_property
    def text_tasks(self) -> str:
        docs = [{"question": "The cat sat on the", "choices": ["mat", "sea", "moon"], "label": 0},
                {"question": "A cup of", "choices": ["coffee", "rocket"], "label": 0},
                {"question": "The sky is", "choices": ["green", "blue"], "label": 1},
                {"question": "An astronaut in a white", "choices": ["suit", "cat"], "label": 0}]
        return write_mc_task(self.p("text_tasks"), "wf_mc", docs)

    @functools.cached_property
    def llava_export(self) -> str:
        run_cli_ok(["tools/convert_checkpoint.py", "--model-type", "vlm", "--source-format", "vlm", "--target-format",
                    "hf", "--load-dir", self.grafted, "--save-dir", self.p("hf-llava")])
        return self.p("hf-llava")


def test_converted_target_back_to_hf_keeps_token_ids_and_dtype(wf):
    run_cli_ok(["tools/convert_checkpoint.py", "--source-format", "mcore", "--target-format", "hf",
                "--load-dir", wf.converted, "--save-dir", wf.p("llama-back")])
    cfg = json.load(open(wf.p("llama-back/config.json")))
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (128000, 128009) and cfg["torch_dtype"] == "float32"


def test_trajectory_and_surrogate_from_the_converted_target(wf):
    assert json.load(open(os.path.join(wf.converted, "checkpoint_meta.json")))
    traj = wf.trajectory
    assert traj["transition_layer"] == 1 and len(traj["median"]) == 6
    cfg = json.load(open(os.path.join(wf.surrogate, "config.json")))
    prov = cfg["megatron_zero_surrogate"]
    # T(1,3) of 6 layers: 0, translator (copy of 1), 4, 5
    assert cfg["num_hidden_layers"] == 4 and prov["layer_map"] == [0, 1, 4, 5] and prov["translator_index"] == 1
    # the surrogate keeps the target's float32 tensors and token ids, and says so
    assert cfg["torch_dtype"] == "float32" and (cfg["bos_token_id"], cfg["eos_token_id"]) == (128000, 128009)


def test_stage1_in_the_slurm_layout_gives_the_pp1_losses(wf):
    # PP=2 over the 4-layer surrogate: the translator (layer 1) sits with the encoder, the last stage trains nothing
    ref, par = wf.stage1, wf.stage1_slurm_layout
    assert len(ref) == len(par) == 3
    assert all(abs(a - b) < LOSS_TOL for a, b in zip(ref, par)), (ref, par)
    # the logged lr is the one the step used (no warmup at 3 iterations: the peak), not the next step's
    assert first_lr(wf.p("stage1.jsonl")) == pytest.approx(1e-3)
    # saving into a fresh directory does not make megatron warn about overwriting a corrupted checkpoint
    assert all("Overwriting old incomplete" not in out for out in wf.outputs.values())


def test_stage2_in_the_slurm_layout_gives_the_pp1_losses(wf):
    # stage 2 freezes the whole decoder: the second pipeline stage has nothing to train
    ref, par = wf.stage2, wf.stage2_slurm_layout
    assert len(ref) == len(par) == 3
    assert all(abs(a - b) < LOSS_TOL for a, b in zip(ref, par)), (ref, par)


def test_graft_and_generate(wf):
    answers = wf.answers
    assert [a["id"] for a in answers] == ["chelsea", "coffee"] and all(a["text"] for a in answers)
    vlm_cfg = json.load(open(os.path.join(wf.grafted, "vlm_config.json")))
    assert vlm_cfg["decoder"]["num_layers"] == 6  # the target's decoder, not the surrogate's


def test_graft_onto_a_moved_copy_of_the_target(wf):
    """A byte-identical copy of the target at another path is the target: grafted without --force, with a note."""
    import shutil

    shutil.copytree(wf.w["llama"], wf.p("moved/llama-copy"))
    out = run_cli_ok(["tools/graft.py", "--encoder", wf.p("stage2/export"), "--target", wf.p("moved/llama-copy"),
                      "--output", wf.p("grafted-moved")])
    record = json.load(open(wf.p("grafted-moved/vlm_config.json")))
    graft_record = record.get("graft", record)
    assert '"forced": false' in out and "note:" in out and "is now at" in out
    assert not graft_record.get("problems")


def test_generate_bad_requests_are_one_line_errors(wf):
    bad = wf.p("bad.jsonl")
    with open(bad, "w") as f:
        f.write(json.dumps({"id": "x", "prompt": "hi", "images": [wf.p("no-such.png")]}) + "\n")
    for prompts, extra, expected in ((bad, [], "no-such.png"),
                                     (wf.p("prompts.jsonl"), ["--max-new-tokens", "100000"], "--max-new-tokens 100000")):
        assert wf.answers  # prompts.jsonl written
        p = run_cli(["tools/generate.py", "--checkpoint", wf.grafted, "--prompts", prompts, *extra], timeout=300)
        assert p.returncode == 2 and expected in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_vlm_evaluation_through_lmms_eval(wf):
    """tools/evaluate.py (lmms_eval.evaluator.simple_evaluate) and lmms-eval's own command line with our registered
    ``megatron_zero_vlm`` model: both score the grafted VLM's answers exactly as tools/generate.py gave them."""
    tasks = wf.vlm_tasks
    run_cli_ok(["tools/evaluate.py", "--suite", "vlm", "--load", wf.grafted, "--tasks", "wf_vqa::exact_match",
                "--include-path", tasks, "--output-dir", wf.p("eval-vlm")])
    record = json.load(open(wf.p("eval-vlm/results.json")))
    assert record["checkpoints"]["grafted"]["scores"]["wf_vqa"] == pytest.approx(0.5)
    out = run_cli_ok(["-m", "lmms_eval", "--model", "megatron_zero_vlm", "--model_args", f"load={wf.grafted}",
                      "--tasks", "wf_vqa", "--include_path", tasks, "--batch_size", "2", "--output_path",
                      wf.p("lmms-out")])
    results = [os.path.join(dp, f) for dp, _, fs in os.walk(wf.p("lmms-out")) for f in fs if f.endswith("results.json")]
    assert len(results) == 1, out[-3000:]
    assert json.load(open(results[0]))["results"]["wf_vqa"]["exact_match,none"] == pytest.approx(0.5)


def test_text_evaluation_through_lm_eval(wf):
    """The grafted VLM used text-only is the target: lm-eval gives both the same scores (Δ row 0)."""
    run_cli_ok(["tools/evaluate.py", "--suite", "text", "--load", wf.w["llama"], "--compare-load", wf.grafted,
                "--tasks", "wf_mc:0:acc", "--include-path", wf.text_tasks, "--output-dir", wf.p("eval-text")])
    scores = {k: v["scores"]["wf_mc"] for k, v in json.load(open(wf.p("eval-text/results.json")))["checkpoints"].items()}
    assert set(scores) == {"llama", "grafted"} and scores["llama"] == scores["grafted"]
    assert scores["llama"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_llava_export_is_usable_from_transformers_alone(wf):
    """AutoProcessor + LlavaForConditionalGeneration + apply_chat_template + generate() in a fresh Python that never
    imports megatron_zero reproduce tools/generate.py's greedy answer, token for token."""
    from megatron_zero.data.chat_template import Message, chat_template_for
    from megatron_zero.data.images import load_image
    from megatron_zero.data.tokenizers import load_tokenizer

    export, answer = wf.llava_export, wf.answers[0]
    image = os.path.join(wf.w["images"], "chelsea.png")
    hf = hf_llava_answers((export, image, "What animal is this?", 4))[0]
    assert hf["text"] == answer["text"]
    # the same prompt tokens (image token expanded to one per patch) and the same pixels as our preprocessing
    template = chat_template_for(load_tokenizer(wf.w["llama"]))
    ours = template.encode([Message("user", "<image>\nWhat animal is this?")], add_generation_prompt=True).input_ids
    n = (32 // 8) ** 2
    expanded = [t for i in ours for t in ([i] * n if i == template.image_placeholder_id else [i])]
    assert hf["input_ids"] == expanded
    torch.testing.assert_close(torch.tensor(hf["pixel_values"]), load_image(image, 32), atol=2e-2, rtol=0)
    for f in ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "generation_config.json"):
        assert os.path.isfile(os.path.join(export, f)), f
