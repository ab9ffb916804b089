"""Qwen targets through every VLM tool, as a user runs them (tests/test_workflow.py's chain, cut down):

HF Qwen3 (tiny random, Qwen-style tokenizer.json) + HF CLIP -> tools/analyze_trajectory.py -> tools/build_surrogate.py
-> stage 1 -> stage 2
(``python -m megatron_zero.training.pretrain_vlm``) -> tools/graft.py onto the Qwen3 target -> stage 3 with LoRA
adapters -> tools/generate.py -> tools/evaluate.py (lmms-eval) -> HF LLaVA export (--merge-lora), which a fresh
transformers-only Python loads and answers with exactly as tools/generate.py did (Qwen3's thinking switch in the
exported chat template). A Qwen2.5 decoder's LLaVA export (default system message, QKV biases) is checked the same
way on a directly built VLM. Steps that need no multi-process world run in this process (their tools' ``main``) to
keep the chain cheap; the training stages, the harness and the transformers-only check are their own processes.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli_ok
from tests.workflow_world import PHOTOS, QUESTIONS, Pipeline, hf_llava_answers, write_mc_task, write_vqa_task

pytestmark = [pytest.mark.timeout(900), pytest.mark.parametrize("wf", ["qwen3"], indirect=True)]
TRAIN = ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
         "--log-interval", "1", "--lr", "1e-3"]
N_PATCHES = 16  # workflow_world's CLIP (32 px images, 8 px patches) and tiny-clip-llava (16 px, 4 px)


def qwen_target(path: str, preset: str, seed: int = 0, **overrides) -> str:
    """A tiny random HF Qwen model of ``preset`` with a Qwen-style tokenizer over the world's texts."""
    import dataclasses

    from megatron_zero.models.llama_config import get_preset
    from tests.tiny_models import hf_model, write_qwen_tokenizer

    texts = [f"{q} {a}\n" for _, q, a in PHOTOS] + ["You are Qwen, created by Alibaba Cloud.\n"]
    vocab = write_qwen_tokenizer(path, texts, vocab_size=300)
    cfg = dataclasses.replace(get_preset(preset), vocab_size=vocab, **overrides)
    hf_model(cfg, seed=seed).save_pretrained(path)
    return path


def expanded_prompt(tokenizer_dir: str, question: str, model_family: str, **template_kwargs) -> list[int]:
    """Our chat template's generation prompt for one image + ``question``, the image token repeated per patch."""
    from megatron_zero.data.chat_template import Message, chat_template_for
    from megatron_zero.data.tokenizers import load_tokenizer

    t = chat_template_for(load_tokenizer(tokenizer_dir), model_family=model_family, **template_kwargs)
    ids = t.encode([Message("user", "<image>\n" + question)], add_generation_prompt=True).input_ids
    return [x for i in ids for x in ([i] * N_PATCHES if i == t.image_placeholder_id else [i])]


class QwenWorkflow(Pipeline):
    family = "qwen3"
    train = TRAIN

    def __init__(self, root: str):
        super().__init__(root)
        # untied head: a random tied model only echoes its last input token ("\n"); tied Qwen3 exports are checked
        # logit by logit in tests/test_hf_llava.py
        self.target = qwen_target(self.p("qwen3"), "tiny-qwen3", tie_word_embeddings=False)

    @functools.cached_property
    def trajectory(self) -> dict:
        """tools/analyze_trajectory.py (in this process) on the HF Qwen3 target, the paper's generated mode (the
        Qwen3 template's stop tokens end the answers); the random target has no real transition: overridden."""
        from tools import analyze_trajectory

        assert analyze_trajectory.main(["--load-dir", self.target, "--data", self.w["text_jsonl"], "--num-samples",
                                        "4", "--mode", "generated", "--max-new-tokens", "4", "--transition-layer",
                                        "1", "--output-dir", self.p("traj")]) == 0
        return json.load(open(self.p("traj/trajectory.json")))

    @functools.cached_property
    def surrogate(self) -> str:
        from tools import build_surrogate

        assert self.trajectory
        assert build_surrogate.main(["--load-dir", self.target, "--save-dir", self.p("srgt"), "--from-trajectory",
                                     self.p("traj/trajectory.json"), "--translator-end", "2"]) == 0
        return self.p("srgt")

    @functools.cached_property
    def stages12(self) -> tuple[list[dict], list[dict]]:
        s1 = self.pretrain_vlm("stage1", "--stage", "1", "--decoder-load", self.surrogate, "--encoder-load",
                               self.w["clip"], "--feature-convention", "llava", "--text-data-path", self.w["text_jsonl"])
        s2 = self.pretrain_vlm("stage2", "--stage", "2", "--decoder-load", self.p("stage1"), "--encoder-load",
                               self.p("stage1"), "--encoder-trainable-layers", "2", "--loss-on-special-tokens")
        return s1, s2

    @functools.cached_property
    def grafted(self) -> str:
        from tools import graft

        assert self.stages12
        assert graft.main(["--encoder", self.p("stage2/export"), "--target", self.target,
                           "--output", self.p("grafted")]) == 0
        return self.p("grafted")

    @functools.cached_property
    def stage3(self) -> list[dict]:
        return self.pretrain_vlm("stage3", "--stage", "3", "--decoder-load", self.grafted, "--encoder-load",
                                 self.grafted, "--encoder-trainable-layers", "2", "--lora-rank", "4", "--lora-alpha",
                                 "8", "--lora-dropout", "0", "--lora-targets", "q,v")

    @functools.cached_property
    def qwen25(self) -> dict:
        """A Qwen2.5 VLM (QKV biases, untied head; random weights, LLaVA convention) answered by tools/generate.py
        and exported by tools/convert_checkpoint.py, both in this process."""
        import dataclasses
        import shutil

        from PIL import Image
        from skimage import data as skdata

        from megatron_zero.data.tokenizers import load_tokenizer
        from megatron_zero.grafting import DECODER_DIR
        from megatron_zero.models.llama_config import get_preset
        from megatron_zero.parallel.initialize import initialize_parallel
        from tests.tiny_models import write_qwen_tokenizer
        from tests.test_hf_llava import _vlm_checkpoint
        from tools import convert_checkpoint, generate

        tok_dir, vlm = self.p("qwen25-tok"), self.p("qwen25-vlm")
        vocab = write_qwen_tokenizer(tok_dir, [f"{q} {a}\n" for _, q, a in PHOTOS], vocab_size=300)
        initialize_parallel(1, 1, seed=5)
        dec = dataclasses.replace(get_preset("tiny-qwen2"), vocab_size=vocab)
        _vlm_checkpoint(Path(vlm), "llava", dec,
                        image_token_id=load_tokenizer(tok_dir).special_token_id("<|image_pad|>"))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tok_dir, f), os.path.join(vlm, DECODER_DIR, f))
        image = self.p("coffee-48x32.png")  # non-square: the export pads it as we do
        Image.fromarray(skdata.coffee()).resize((48, 32)).save(image)
        with open(self.p("qwen25-prompts.jsonl"), "w") as f:
            f.write(json.dumps({"id": "c", "prompt": QUESTIONS[1][1], "images": [image]}) + "\n")
        assert generate.main(["--checkpoint", vlm, "--prompts", self.p("qwen25-prompts.jsonl"), "--output",
                              self.p("qwen25-answers.jsonl"), "--max-new-tokens", "5"]) == 0
        assert convert_checkpoint.main(["--model-type", "vlm", "--source-format", "vlm", "--target-format", "hf",
                                        "--load-dir", vlm, "--save-dir", self.p("qwen25-hf")]) == 0
        answer = json.loads(open(self.p("qwen25-answers.jsonl")).read())["text"]
        return {"export": self.p("qwen25-hf"), "image": image, "answer": answer, "tokenizer": tok_dir}

    @functools.cached_property
    def qwen3_export(self) -> str:
        from tools import convert_checkpoint

        assert self.stage3
        assert convert_checkpoint.main(["--model-type", "vlm", "--source-format", "vlm", "--target-format", "hf",
                                        "--load-dir", self.p("stage3/export"), "--save-dir", self.p("hf-llava"),
                                        "--merge-lora"]) == 0
        return self.p("hf-llava")

    @functools.cached_property
    def answers(self) -> list[dict]:
        assert self.stage3
        from tools import generate  # in this process (a world of one) to keep the suite fast

        assert generate.main(["--checkpoint", self.p("stage3/export"), "--prompts", self.write_prompts(),
                              "--output", self.p("answers.jsonl"), "--max-new-tokens", "4"]) == 0
        return [json.loads(line) for line in open(self.p("answers.jsonl"))]


def test_trajectory_surrogate_stages_graft_and_lora_stage3(wf):
    traj = wf.trajectory
    assert traj["transition_layer"] == 1 and len(traj["median"]) == 4
    cfg = json.load(open(os.path.join(wf.surrogate, "config.json")))
    assert cfg["model_type"] == "qwen3" and cfg["num_hidden_layers"] == 3
    assert cfg["megatron_zero_surrogate"]["layer_map"] == [0, 1, 3]
    s1, s2 = wf.stages12
    assert len(s1) == len(s2) == 2 and all(r["loss"] > 0 for r in s1 + s2)
    vlm = json.load(open(os.path.join(wf.grafted, "vlm_config.json")))
    dec = vlm["decoder"]
    assert (dec["family"], dec["num_layers"], dec["qk_layernorm"]) == ("qwen3", 4, True)  # the target's decoder
    s3 = wf.stage3
    assert len(s3) == 2 and all(r["grad_norm"] > 0 for r in s3)
    lora = json.load(open(wf.p("stage3/export/vlm_config.json")))["decoder"]["lora"]
    assert lora["rank"] == 4 and lora["targets"] == ["q", "v"]


def test_generate_and_evaluate_through_lmms_eval(wf):
    """generate.py's greedy answers score 0.5 through tools/evaluate.py's lmms-eval run (one target is the answer
    itself, the other is not): the harness path (our registered model, the Qwen3 chat template) answers the same."""
    answers = wf.answers
    assert [a["id"] for a in answers] == ["chelsea", "coffee"] and all(a["text"].strip() for a in answers)
    rows = [{"image": "chelsea.png", "question": QUESTIONS[0][1], "answer": answers[0]["text"].strip()},
            {"image": "coffee.png", "question": QUESTIONS[1][1], "answer": "not " + answers[1]["text"]}]
    d = write_vqa_task(wf.p("vlm_tasks"), "qwf_vqa", wf.w["images"], rows)
    run_cli_ok(["tools/evaluate.py", "--suite", "vlm", "--load", wf.p("stage3/export"), "--tasks", "qwf_vqa::exact_match",
                "--include-path", d, "--output-dir", wf.p("eval-vlm")])
    record = json.load(open(wf.p("eval-vlm/results.json")))
    assert next(iter(record["checkpoints"].values()))["scores"]["qwf_vqa"] == pytest.approx(0.5)


def test_llava_exports_answer_alike_in_transformers_alone(wf):
    """The merged Qwen3 export (stage 3's LoRA folded in) and the Qwen2.5 export, loaded by AutoProcessor +
    LlavaForConditionalGeneration in a fresh Python that never imports megatron_zero, reproduce tools/generate.py's
    greedy answers token for token from our prompt tokens; Qwen3's apply_chat_template(enable_thinking=False)
    renders our qwen3-no-thinking prompt; Qwen2.5's carries its default system message."""
    import transformers
    from PIL import Image

    export, q25 = wf.qwen3_export, wf.qwen25
    hf_cfg = json.load(open(os.path.join(export, "config.json")))
    assert hf_cfg["text_config"]["model_type"] == "qwen3" and hf_cfg["text_config"]["head_dim"] == 24
    image = os.path.join(wf.w["images"], "chelsea.png")
    assert q25["answer"].strip()  # a real answer to compare (not an immediate <|im_end|>)
    hf3, hf25 = hf_llava_answers((export, image, QUESTIONS[0][1], 4), (q25["export"], q25["image"],
                                                                        QUESTIONS[1][1], 5))
    assert hf3["text"] == wf.answers[0]["text"]
    assert hf3["input_ids"] == expanded_prompt(wf.target, QUESTIONS[0][1], "qwen3")
    assert hf25["text"] == q25["answer"]
    expected = expanded_prompt(q25["tokenizer"], QUESTIONS[1][1], "qwen2")
    assert hf25["input_ids"] == expected
    from megatron_zero.data.tokenizers import load_tokenizer

    assert load_tokenizer(q25["tokenizer"]).decode(expected).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n")
    # Qwen3's switch: apply_chat_template(enable_thinking=False) == our qwen3-no-thinking template
    processor = transformers.AutoProcessor.from_pretrained(export)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0][1]}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = processor(images=Image.open(image), text=text, return_tensors="pt")["input_ids"][0].tolist()
    assert ids == expanded_prompt(wf.target, QUESTIONS[0][1], "qwen3", family="qwen3-no-thinking")
    # a whole conversation (training layout: assistant turns, a system message) renders as our templates encode it
    from megatron_zero.data.chat_template import Message, chat_template_for

    for hf_dir, tok_dir, family, kwargs in ((export, wf.target, "qwen3", {}),
                                            (export, wf.target, "qwen3-no-thinking", {"enable_thinking": False}),
                                            (q25["export"], q25["tokenizer"], "qwen2", {})):
        proc = processor if hf_dir == export else transformers.AutoProcessor.from_pretrained(hf_dir)
        for system in (None, "Be brief."):
            chat = [Message("user", "<image>\n" + QUESTIONS[0][1]), Message("assistant", "A cat."),
                    Message("user", "And the fur?"), Message("assistant", "Orange.")]
            chat = ([Message("system", system)] if system else []) + chat
            hf_msgs = [{"role": m.role, "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0][1]}]}
                       if i == int(bool(system)) else {"role": m.role, "content": [{"type": "text", "text": m.content}]}
                       for i, m in enumerate(chat)]
            text = proc.apply_chat_template(hf_msgs, **kwargs)
            hf_ids = proc(images=Image.open(image), text=text, return_tensors="pt")["input_ids"][0].tolist()
            t = chat_template_for(load_tokenizer(tok_dir), family, image_placeholder="<|image_pad|>")
            ours = [x for i in t.encode(chat).input_ids for x in ([i] * N_PATCHES if i == t.image_placeholder_id
                                                                  else [i])]
            assert hf_ids == ours, (family, system, text)


def test_text_evaluation_through_lm_eval(wf):
    """tools/evaluate.py --suite text (lm-eval, in this process): the grafted Qwen3 VLM used text-only is the HF
    target, scored alike (Qwen has no BOS: lm-eval's prefix token is the EOS, as for HF Qwen models)."""
    from tools import evaluate

    docs = [{"question": "What animal is this?", "choices": ["A cat.", "A rocket."], "label": 0},
            {"question": "What is on the table?", "choices": ["A horse.", "A cup of coffee."], "label": 1},
            {"question": "Who is in the picture?", "choices": ["An astronaut.", "A man with a camera."], "label": 0}]
    d = write_mc_task(wf.p("text_tasks"), "qwf_mc", docs)
    assert evaluate.main(["--suite", "text", "--load", wf.target, "--compare-load", wf.grafted, "--tasks",
                          "qwf_mc:0:acc", "--include-path", d, "--output-dir", wf.p("eval-text")]) == 0
    record = json.load(open(wf.p("eval-text/results.json")))
    scores = {k: v["scores"]["qwf_mc"] for k, v in record["checkpoints"].items()}
    assert set(scores) == {"qwen3", "grafted"} and scores["qwen3"] == scores["grafted"]
    assert min(abs(scores["qwen3"] - k / 3) for k in range(4)) < 1e-9
