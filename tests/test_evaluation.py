"""Evaluation: the real lm-eval harness on a local task equals a direct forward pass (transformers' Llama on the
same weights), TP=2 and PP=2 equal one process, Table A.5 is encoded as the paper prints it, tools/evaluate.py
tabulates and compares, and the lmms-eval adapter matches direct VLM computations."""
import dataclasses
import json
import os

import pytest
import torch

from tests.conftest import exit_status, run_worker
from tests.tiny_models import hf_causal_lm
from tests.workflow_world import task_yaml

TEXTS = ["the cat sat on the mat .", "a dog ran in the park .", "birds fly over the blue sea .",
         "is the sky green ? yes no", "question answer what color is it", "please answer or"]
DOCS = [
    {"question": "the cat sat on the", "choices": ["mat", "sea", "park"], "label": 0,
     "text": "a dog ran in the park . the cat sat on the mat ."},
    {"question": "birds fly over the blue", "choices": ["sea", "dog"], "label": 0,
     "text": "birds fly over the blue sea ."},
    {"question": "is the sky green ?", "choices": ["yes", "no"], "label": 1, "text": "is the sky green ? no"},
]
TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen"]
MAX_GEN = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random HF Llama checkpoint with a word-level tokenizer, and local tasks (JSONL + YAML)."""
    from megatron_zero.data.tokenizers import WordTokenizer
    from megatron_zero.models.llama_config import get_preset

    root = tmp_path_factory.mktemp("eval")
    tok = WordTokenizer.build(TEXTS)
    # vocab ~40 -> 128 padded rows inside megatron (256 at TP=2): the padding must not leak into the softmax
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tok.vocab_size, max_position_embeddings=96)
    torch.manual_seed(0)
    hf = hf_causal_lm(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.5)
    ckpt = root / "ckpt"
    hf.save_pretrained(ckpt)
    tok.save(ckpt / "tokenizer.json")

    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "tiny_mc.yaml").write_text(task_yaml("tiny_mc", data, """\
        output_type: multiple_choice
        doc_to_text: "{{question}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{label}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    (tasks / "tiny_rolling.yaml").write_text(task_yaml("tiny_rolling", data, """\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
        """))
    (tasks / "tiny_gen.yaml").write_text(task_yaml("tiny_gen", data, f"""\
        output_type: generate_until
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{choices[label]}}}}"
        generation_kwargs:
          until: ["."]
          max_gen_toks: {MAX_GEN}
        metric_list:
          - metric: exact_match
        """))
    missing = root / "missing"
    missing.mkdir()
    (missing / "tiny_missing.yaml").write_text(task_yaml("tiny_missing", root / "nowhere.jsonl", """\
        output_type: multiple_choice
        doc_to_text: "{{question}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{label}}"
        """))
    return dict(root=root, tok=tok, hf=hf, ckpt=str(ckpt), tasks=str(tasks), missing=str(missing), cfg=cfg)


# ---- independent references: transformers' LlamaForCausalLM on the same weights --------------------------------
def reference_logprob(setup, context: list, continuation: list) -> tuple:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(setup["hf"](ids).logits[0].double(), dim=-1)
    rows = logp[len(context) - 1:-1]
    target = torch.tensor(continuation)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def reference_greedy(setup, prompt: list, until: str) -> str:
    tok, ids = setup["tok"], list(prompt)
    new = []
    for _ in range(MAX_GEN):
        with torch.no_grad():
            nxt = int(setup["hf"](torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        new.append(nxt)
        if nxt == tok.eos_id or until in tok.decode(new):
            break
    if new[-1] == tok.eos_id:
        new = new[:-1]
    return tok.decode(new).split(until)[0]


@pytest.fixture(scope="module")
def harness_samples(setup):
    """The real lm-eval harness, in this process (a world of one), on the three local tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import megatron_zero.evaluation.lm_eval_adapter  # noqa: F401  (registers "megatron_zero")

    results = lm_eval.simple_evaluate(
        model="megatron_zero", model_args=f"load={setup['ckpt']},batch_size=2",
        tasks=TASKS, task_manager=TaskManager(include_path=setup["tasks"], include_defaults=False),
        log_samples=True, bootstrap_iters=0)
    samples = {t: [s["resps"] for s in sorted(rows, key=lambda s: s["doc_id"])]
               for t, rows in results["samples"].items()}
    return results, samples


def test_harness_loglikelihoods_equal_direct_forward(setup, harness_samples):
    results, samples = harness_samples
    tok, bos = setup["tok"], setup["tok"].bos_id
    correct = []
    for doc, resps in zip(DOCS, samples["tiny_mc"]):
        context = [bos] + tok.encode(doc["question"])
        refs = [reference_logprob(setup, context, tok.encode(" " + c)) for c in doc["choices"]]
        for (ours,), ref in zip(resps, refs):
            assert ours[0] == pytest.approx(ref[0], abs=1e-4) and ours[1] == ref[1]
        correct.append(max(range(len(refs)), key=lambda i: refs[i][0]) == doc["label"])
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    for doc, ((ours,),) in zip(DOCS, samples["tiny_rolling"]):
        ref, _ = reference_logprob(setup, [bos], tok.encode(doc["text"]))
        assert ours == pytest.approx(ref, abs=1e-3)
    for doc, ((ours,),) in zip(DOCS, samples["tiny_gen"]):
        assert ours == reference_greedy(setup, [bos] + tok.encode(doc["question"]), ".")


def test_tensor_and_pipeline_parallel_equal_one_process(setup, harness_samples):
    _, single = harness_samples
    prefix = str(setup["root"] / "parallel")
    run_worker("eval_parallel.py", setup["ckpt"], setup["tasks"], prefix, nproc=2)
    for layout in ("tp2", "pp2"):
        with open(f"{prefix}.{layout}.json") as f:
            parallel = json.load(f)
        assert parallel["tiny_gen"] == single["tiny_gen"], layout
        for task in ("tiny_mc", "tiny_rolling"):
            ours = torch.tensor([x for doc in parallel[task] for r in doc for x in _flat(r)])
            ref = torch.tensor([x for doc in single[task] for r in doc for x in _flat(r)])
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4, msg=f"{layout} {task}")


def _flat(resp):
    """A sample's response ([(logprob, greedy)] or [logprob]) as floats."""
    value = resp[0]
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def test_table_a5_is_encoded_once_as_the_paper_prints_it():
    """Table A.5 (columns in the paper's order: mmlu hellaswag arceasy arcchallenge winogrande piqa boolq
    openbookqa), copied literally from the appendix."""
    from megatron_zero.evaluation.suites import TEXT_SUITE, select, settings_table

    shots = "5 10 0 25 5 0 0 0".split()
    acc_type = "- norm norm norm - norm - norm".split()
    columns = "mmlu hellaswag arc_easy arc_challenge winogrande piqa boolq openbookqa".split()
    assert [b.task for b in TEXT_SUITE] == columns
    assert [b.num_fewshot for b in TEXT_SUITE] == [int(s) for s in shots]
    assert [b.metric for b in TEXT_SUITE] == ["acc_norm" if a == "norm" else "acc" for a in acc_type]
    assert select("text") == list(TEXT_SUITE)
    assert [b.task for b in select("text", ["ARC-c", "piqa"])] == ["arc_challenge", "piqa"]
    assert "| ARC-c | arc_challenge | 25 | acc_norm |" in settings_table(TEXT_SUITE)
    # the names are the released harness's own tasks/groups
    import lm_eval

    task_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    declared = set()
    for sub in ("mmlu/default", "hellaswag", "arc", "winogrande", "piqa", "super_glue/boolq", "openbookqa"):
        for name in os.listdir(os.path.join(task_dir, sub)):
            if "yaml" in name and os.path.isfile(os.path.join(task_dir, sub, name)):
                with open(os.path.join(task_dir, sub, name)) as f:
                    declared |= {line.split(":", 1)[1].strip().strip("\"'") for line in f
                                 if line.startswith(("task:", "group:"))}
    assert set(columns) <= declared


def test_suite_few_shot_settings_reach_the_harness(setup):
    from megatron_zero.evaluation.runner import load_text_tasks
    from megatron_zero.evaluation.suites import Benchmark

    (task,) = load_text_tasks([Benchmark("MC", "tiny_mc", "acc", num_fewshot=2)], [setup["tasks"]])
    assert task.get_config("num_fewshot") == 2
    task.build_all_requests(limit=1, rank=0, world_size=1)
    context = task.instances[0].args[0]
    shots, question = context.rsplit("\n\n", 1)[0].split("\n\n"), context.rsplit("\n\n", 1)[1]
    assert len(shots) == 2 and question == DOCS[0]["question"]  # two solved examples, then the question


def test_evaluate_tool_compares_two_checkpoints(setup, harness_samples, capsys):
    from tools.evaluate import main

    results, _ = harness_samples
    out = setup["root"] / "tool"
    args = ["--suite", "text", "--load", setup["ckpt"], "--compare-load", setup["ckpt"], "--label", "A",
            "--compare-label", "B", "--tasks", "tiny_mc:0:acc", "--include-path", setup["tasks"],
            "--batch-size", "3", "--output-dir", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    acc = results["results"]["tiny_mc"]["acc,none"]
    assert record["checkpoints"]["A"]["scores"] == {"tiny_mc": pytest.approx(acc)}
    assert record["checkpoints"]["B"]["scores"] == {"tiny_mc": pytest.approx(acc)}
    table = (out / "results.md").read_text()
    assert f"| A | {acc:.2f} | {acc:.2f} |" in table and "| Δ (B − A) | 0.00 | 0.00 |" in table
    assert "| Δ (B − A) | 0.00 | 0.00 |" in printed


def test_evaluate_tool_fails_clearly_without_data(setup, capsys):
    from tools.evaluate import main

    code = exit_status(main, ["--suite", "text", "--load", setup["ckpt"], "--tasks", "tiny_missing",
                              "--include-path", setup["missing"], "--output-dir", str(setup["root"] / "none")])
    err = capsys.readouterr().err
    assert code == 2
    assert "tiny_missing" in err and "not available" in err and "--include-path" in err
    assert exit_status(main, ["--suite", "text", "--load", str(setup["root"] / "absent"), "--tasks", "x"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err


# ---- lmms-eval adapter -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm(setup):
    """A VLM checkpoint: a random tiny CLIP encoder grafted onto the tiny decoder."""
    from megatron_zero.evaluation.vlm_adapter import MegatronZeroVLM
    from megatron_zero.models.clip_vit import get_vision_preset
    from megatron_zero.grafting import HFDecoder, graft, save_image_encoder_from_model, tokenizer_hash
    from megatron_zero.models.vlm import VLMConfig, build_vlm, load_vlm_canonical
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=5)
    target = HFDecoder(setup["ckpt"])
    cfg = VLMConfig(target.cfg, get_vision_preset("tiny-clip"), setup["tok"].special_token_id("<image>"))
    model = build_vlm(cfg)
    load_vlm_canonical(model, None, target.canonical_getter())
    encoder = setup["root"] / "encoder"
    save_image_encoder_from_model(str(encoder), model, tokenizer_hash(setup["ckpt"]))
    out = setup["root"] / "vlm"
    graft(str(encoder), setup["ckpt"], str(out), force=True)  # the encoder never saw a surrogate: no provenance
    adapter = MegatronZeroVLM(load=str(out), batch_size=2, binary="mme")
    return adapter


def _images(n):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(12 + 4 * i, 20, 3, generator=g) * 255).to(torch.uint8).numpy())
            for i in range(n)]


def _requests(kind, rows, task):
    from lmms_eval.api.instance import Instance

    docs = {i: {"image": img} for i, (_, _, img) in enumerate(rows)}
    reqs = [Instance(kind, (text, second, lambda doc: [doc["image"]], i, task, "test"), i,
                     {"task": task, "doc_id": i, "repeats": 1}) for i, (text, second, _) in enumerate(rows)]
    return reqs, {task: {"test": docs}}


def _prompt(adapter, text):
    from megatron_zero.data.chat_template import Message

    return adapter.vlm.template.encode([Message("user", "<image>\n" + text)], add_generation_prompt=True).input_ids


def test_vlm_adapter_matches_direct_computation(vlm):
    from megatron_zero.data.images import preprocess_pil
    from megatron_zero.evaluation.vlm_adapter import BINARY_INSTRUCTION
    from megatron_zero.inference.generate import SamplingOptions, generate
    from megatron_zero.models.vlm import expand_image_placeholders

    model, tok, size = vlm.vlm.model, vlm.vlm.tokenizer, vlm.vlm.cfg.vision.image_size
    images = _images(3)
    questions = ["is the sky green ?", "what color is it ?", "the cat sat on the"]

    # loglikelihood, batched (2 + 1) vs one request at a time through the model directly
    rows = [(q, a, img) for q, a, img in zip(questions, [" no", " blue sea", " mat"], images)]
    reqs, vlm.task_dict = _requests("loglikelihood", rows, "mytask")
    got = vlm.loglikelihood(reqs)
    for (q, a, img), (logp, greedy) in zip(rows, got):
        prompt, answer = _prompt(vlm, q), tok.encode(a)
        e = expand_image_placeholders([prompt + answer], None, None, vlm.vlm.cfg.image_token_id,
                                      model.num_image_embeddings)
        n = e.input_ids.shape[1]
        with torch.no_grad():
            logits = model(e.input_ids, torch.arange(n)[None], images=preprocess_pil(img, size)[None],
                           image_mask=e.image_mask)[0, :, :tok.vocab_size]
        lp = torch.log_softmax(logits.double(), -1)[n - len(answer) - 1:n - 1]
        assert logp == pytest.approx(float(lp.gather(-1, torch.tensor(answer)[:, None]).sum()), abs=1e-4)
        assert greedy == bool((lp.argmax(-1) == torch.tensor(answer)).all())

    # generation, batched vs alone
    gen_kwargs = {"until": ["."], "max_new_tokens": 4}
    reqs, vlm.task_dict = _requests("generate_until", [(q, gen_kwargs, img) for q, img in zip(questions, images)],
                                    "mytask")
    got = vlm.generate_until(reqs)
    stops = set(vlm.vlm.template.stop_token_ids)
    for q, img, text in zip(questions, images, got):
        (ids,) = generate(model, [_prompt(vlm, q)], [preprocess_pil(img, size)[None]], SamplingOptions(4),
                          vlm.vlm.template.stop_token_ids)
        assert text == tok.decode([t for t in ids if t not in stops]).split(".")[0].strip()

    # binary mode for "mme" tasks: the yes/no prompt, answered by the likelier first token
    mme_q = [q + "\nAnswer the question using a single word or phrase." for q in questions]
    reqs, vlm.task_dict = _requests("generate_until", [(q, gen_kwargs, img) for q, img in zip(mme_q, images)], "mme")
    got = vlm.generate_until(reqs)
    for q, img, answer in zip(questions, images, got):
        prompt = _prompt(vlm, q + "\n" + BINARY_INSTRUCTION)
        e = expand_image_placeholders([prompt], None, None, vlm.vlm.cfg.image_token_id, model.num_image_embeddings)
        with torch.no_grad():
            last = model(e.input_ids, torch.arange(e.input_ids.shape[1])[None],
                         images=preprocess_pil(img, size)[None], image_mask=e.image_mask)[0, -1, :tok.vocab_size]
        logp = torch.log_softmax(last.double(), -1)
        yes = torch.logsumexp(logp[[tok.encode(w)[0] for w in ("yes", "Yes")]], 0)
        no = torch.logsumexp(logp[[tok.encode(w)[0] for w in ("no", "No")]], 0)
        assert answer == ("yes" if yes >= no else "no")


def test_vlm_prompt_rules():
    from megatron_zero.evaluation.text_model import EvaluationError
    from megatron_zero.evaluation.vlm_adapter import (BINARY_INSTRUCTION, binary_prompt, parse_binary_tasks,
                                                      with_image_tags)

    assert with_image_tags("what is it?", 2) == "<image>\n<image>\nwhat is it?"
    assert with_image_tags("<image> vs <image>", 2) == "<image> vs <image>"
    with pytest.raises(EvaluationError, match="1 <image> tags but 2 images"):
        with_image_tags("<image> what?", 2)
    assert binary_prompt("Q?\nAnswer the question using a single word or phrase.") == f"Q?\n{BINARY_INSTRUCTION}"
    assert binary_prompt("Is it red?") == f"Is it red?\n{BINARY_INSTRUCTION}"
    assert parse_binary_tasks("mme|pope") == ("mme", "pope") and parse_binary_tasks(None) == ()
    assert parse_binary_tasks("all") == ("",)
