"""The world a new user starts from, built small: a tiny random HF Llama with the real Llama-3 tokenizer (as the
Hugging Face hub ships it: tokenizer.json with the 256 special tokens, tokenizer_config.json with the chat
template, original/tokenizer.model), a tiny random HF CLIP vision tower, and a LLaVA-format JSON over
scikit-image photos (+ a text-only JSONL for stage 1 and the trajectory); and :class:`Pipeline`, the workflow a
user runs on it, one subclass per decoder family (the ``wf`` fixture of tests/conftest.py)."""
from __future__ import annotations

import json
import os
import shutil
import textwrap
from typing import ClassVar

import torch

from tests.conftest import REPO, run_cli_ok, subprocess_env

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# (photo, question, answer): scikit-image's sample photos
PHOTOS = [
    ("astronaut", "Who is in the picture?", "An astronaut in a white suit."),
    ("chelsea", "What animal is this?", "A cat with orange fur."),
    ("coffee", "What is on the table?", "A cup of coffee."),
    ("rocket", "What do you see?", "A rocket on the launch pad."),
    ("camera", "Describe the photo.", "A man with a camera."),
    ("horse", "What shape is shown?", "A horse."),
]
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
            patch_size=8, projection_dim=32)


def llama3_tokenizer_model() -> str:
    import llama_models

    return os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")


def write_hf_llama3_tokenizer(out_dir: str) -> None:
    """tokenizer.json (+ the 256 special tokens), tokenizer_config.json (chat template), original/tokenizer.model."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from megatron_zero.data.tokenizers import llama3_special_token_names

    specials = llama3_special_token_names()
    backend = TikTokenConverter(vocab_file=llama3_tokenizer_model(), extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  chat_template=LLAMA3_CHAT_TEMPLATE)
    tok.save_pretrained(out_dir)
    os.makedirs(os.path.join(out_dir, "original"), exist_ok=True)
    shutil.copy(llama3_tokenizer_model(), os.path.join(out_dir, "original", "tokenizer.model"))


def build_world(root: str, llama: bool = True) -> dict:
    """The world; ``llama=False``: the CLIP tower and the data only (a test brings its own decoder)."""
    from PIL import Image
    from skimage import data as skdata

    from tests.tiny_models import hf_clip, hf_llama

    torch.manual_seed(0)
    paths = {k: os.path.join(root, k) for k in ("llama", "clip", "images")}
    if llama:
        hf_llama(vocab_size=128256, bos_token_id=128000, eos_token_id=128009, tie_word_embeddings=False,
                 **DECODER).eval().save_pretrained(paths["llama"])
        write_hf_llama3_tokenizer(paths["llama"])
    else:
        del paths["llama"]
    clip = hf_clip(**CLIP).eval()
    clip.save_pretrained(paths["clip"])
    os.makedirs(paths["images"])
    records, texts = [], []
    for i in range(4):  # 24 samples: every photo 4 times, each with its own question
        for name, q, a in PHOTOS:
            if i == 0:
                img = getattr(skdata, name)()
                Image.fromarray(img).convert("RGB").save(os.path.join(paths["images"], f"{name}.png"))
            records.append({"id": f"{name}-{i}", "image": f"{name}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
            texts.append({"prompt": q.replace("picture", "story").replace("photo", "day"), "response": a})
    paths["llava_json"] = os.path.join(root, "llava.json")
    with open(paths["llava_json"], "w") as f:
        json.dump(records, f)
    paths["text_jsonl"] = os.path.join(root, "text.jsonl")
    with open(paths["text_jsonl"], "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in texts)
    paths["root"] = root
    return paths


def write_vqa_task(task_dir: str, name: str, images_dir: str, rows: list[dict]) -> str:
    """A local lmms-eval ``generate_until`` task ``name`` in ``task_dir`` over ``rows`` ({image, question, answer},
    images under ``images_dir``), scored by exact match (for ``--include-path``). Returns ``task_dir``."""
    os.makedirs(task_dir)
    with open(os.path.join(task_dir, f"{name}_utils.py"), "w") as f:
        f.write(textwrap.dedent(f"""\
            import os
            from PIL import Image

            def doc_to_visual(doc):
                return [Image.open(os.path.join({images_dir!r}, doc["image"])).convert("RGB")]

            def doc_to_text(doc):
                return doc["question"]
            """))
    return _write_json_task(task_dir, name, rows, f"""\
            output_type: generate_until
            doc_to_visual: !function {name}_utils.doc_to_visual
            doc_to_text: !function {name}_utils.doc_to_text
            doc_to_target: answer
            generation_kwargs:
              max_new_tokens: 4
              until: ["\\n"]
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            """)


def write_mc_task(task_dir: str, name: str, docs: list[dict]) -> str:
    """A local lm-eval ``multiple_choice`` task ``name`` in ``task_dir`` over ``docs`` ({question, choices, label}),
    scored by accuracy (for ``--include-path``). Returns ``task_dir``."""
    os.makedirs(task_dir)
    return _write_json_task(task_dir, name, docs, """\
            output_type: multiple_choice
            doc_to_text: "{{question}}"
            doc_to_choice: "{{choices}}"
            doc_to_target: "{{label}}"
            metric_list:
              - metric: acc
            """)


def task_yaml(name: str, data: str, body: str) -> str:
    """A local lm-eval / lmms-eval task ``name`` over the test split of the JSON-lines file ``data``, followed by
    ``body`` (the task's own YAML lines, dedented)."""
    return textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        """) + textwrap.dedent(body)


def _write_json_task(task_dir: str, name: str, rows: list[dict], body: str) -> str:
    """``name.jsonl`` (the rows) and ``name.yaml`` (:func:`task_yaml` over it) in ``task_dir``. Returns it."""
    data = os.path.join(task_dir, f"{name}.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(task_dir, f"{name}.yaml"), "w") as f:
        f.write(task_yaml(name, data, body))
    return task_dir


QUESTIONS = (("chelsea", "What animal is this?"), ("coffee", "What is on the table?"))


class Pipeline:
    """One decoder family's workflow as a user runs it, every step through its tool and run once (a cached property
    of the family's subclass). Tests take the module-scoped fixture ``wf`` (tests/conftest.py), parametrized by
    family: ``pytest.mark.parametrize("wf", [family], indirect=True)``."""

    family = ""
    train: ClassVar[list] = []  # pretrain_vlm's batch and run-length flags
    _by_family: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Pipeline._by_family[cls.family] = cls

    @staticmethod
    def of(family: str) -> type:
        return Pipeline._by_family[family]

    def __init__(self, root: str):
        self.root = root
        self.w = build_world(root, llama=self.family == "llama")
        self.outputs: dict[str, str] = {}

    def p(self, name: str) -> str:
        return os.path.join(self.root, name)

    def pretrain_vlm(self, name: str, *args: str, nproc: int = 1) -> list[dict]:
        """``python -m megatron_zero.training.pretrain_vlm ARGS`` on the world's LLaVA data, saving to ``p(name)``:
        its metrics rows."""
        self.outputs[name] = run_cli_ok(
            ["-m", "megatron_zero.training.pretrain_vlm", *args, "--data-path", self.w["llava_json"], "--image-root",
             self.w["images"], *self.train, "--save", self.p(name), "--metrics-file", self.p(f"{name}.jsonl")],
            nproc=nproc)
        return [json.loads(line) for line in open(self.p(f"{name}.jsonl"))]

    def write_prompts(self) -> str:
        """``prompts.jsonl`` for tools/generate.py: one of :data:`QUESTIONS` per photo."""
        with open(self.p("prompts.jsonl"), "w") as f:
            f.writelines(json.dumps({"id": name, "prompt": question,
                                     "images": [os.path.join(self.w["images"], f"{name}.png")]}) + "\n"
                         for name, question in QUESTIONS)
        return self.p("prompts.jsonl")


def hf_llava_answers(*cases: tuple) -> list[dict]:
    """tests/workers/hf_llava_generate.py (one launch) in a Python without megatron_zero on its path; ``cases``:
    (export, image, question, max_new_tokens)."""
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    out = run_cli_ok([os.path.join(REPO, "tests", "workers", "hf_llava_generate.py"),
                      *(str(x) for c in cases for x in c)], env=env)
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"text"')]
