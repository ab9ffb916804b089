#!/usr/bin/env python
"""The end-to-end demo (``make demo``): the whole method at toy scale, on a CPU (~10 minutes on 2 cores).

1. pretrain a small Llama-style target LLM on generated chat text (attribute words in random order, then a
   caption of them or the answer to a question about one of them);
2. measure its prediction trajectory (Eq. 1-4) and detect the transition layer ``a``;
3. build the surrogate T(a, L-2) and the control T(1, k) that replaces the early phase instead, with the same
   number of layers;
4. for every seed: stage 1 tunes each translator on text; stage 2 trains a small ViT encoder + adapter from
   scratch on rendered shapes (captions, attribute questions) on the frozen surrogate, the frozen control and
   the frozen target itself (the upper bound);
5. graft the surrogate's and the control's encoders into the full target zero-shot (``tools/graft.py``'s code
   path, provenance checked);
6. evaluate every pairing on the same held-out images (answer loss, greedy exact match), plus the paper's
   stage-3 point: a few steps of full-decoder fine-tuning from the grafted encoder vs from an untrained one.

The target, its trajectory and the surrogate are built once (``--seed``); each of ``--seeds`` seeds reruns
steps 4-6 (translator data order, encoder initialisation, training images and their order, stage 3). Seeds run
in ``--workers`` processes, one thread each. Everything runs through the library's real code paths
(megatron-core models, the training loop with DDP and the optimizer, chat templates and loss masks, the
trajectory analyser, the surrogate builder, grafting checkpoints with provenance, KV-cached generation) in a
world of one per process. Outputs go to ``--output-dir`` (``results.json``, ``demo.png``, checkpoints).
The printed conclusion is computed from the per-seed numbers: a claim is made only if it holds on every seed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

JOBS = ("upper", "surrogate", "control", "untrained")  # longest first (see main)
KINDS = ("upper_bound", "surrogate_own", "surrogate_graft", "control_own", "control_graft", "untrained",
         "stage3_graft", "stage3_untrained")


def parse_args(argv=None):
    from megatron_zero.arguments import ArgumentParser

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--seed", type=int, default=1234, help="seed of the target LLM, its data and the held-out images")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds for stages 1-3 (seed, seed+1, ...)")
    p.add_argument("--workers", type=int, default=2, help="parallel worker processes (one thread each)")
    p.add_argument("--layers", type=int, default=12, help="target decoder layers")
    p.add_argument("--hidden", type=int, default=64, help="target decoder width")
    p.add_argument("--lm-steps", type=int, default=400, help="target LLM pretraining steps")
    p.add_argument("--lm-lr", type=float, default=2e-3)
    p.add_argument("--translator-steps", type=int, default=60, help="stage 1 steps per small decoder")
    p.add_argument("--encoder-steps", type=int, default=680, help="stage 2 steps per encoder")
    p.add_argument("--encoder-lr", type=float, default=2e-3)
    p.add_argument("--stage3-steps", type=int, default=24, help="stage 3 steps (0: skip the stage-3 rows)")
    p.add_argument("--stage3-lr", type=float, default=5e-4)
    p.add_argument("--train-images", type=int, default=4000, help="training images per seed (stages 2 and 3)")
    p.add_argument("--eval-images", type=int, default=300, help="held-out images (the same for every row and seed)")
    p.add_argument("--jobs", default=",".join(JOBS),
                   help="the per-seed jobs to run, comma-separated (default: all); a subset prints its rows and the "
                        "claims they support, e.g. --jobs upper to check the upper bound on more seeds")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; numbers meaningless)")
    args = p.parse_args(argv)
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if not args.jobs or set(args.jobs) - set(JOBS):
        p.error(f"--jobs takes a comma-separated subset of {','.join(JOBS)}, got {','.join(args.jobs)!r}")
    if args.seeds < 1 or args.workers < 1:
        p.error("--seeds and --workers must be >= 1")
    if args.eval_images < 50 or args.eval_images % 50:
        p.error(f"--eval-images must be a positive multiple of 50, got {args.eval_images}")
    return args


# ---------------------------------------------------------------------------------------------------------
# The toy world
# ---------------------------------------------------------------------------------------------------------
IMAGE_SIZE = 32
SEQ = 35  # image conversations: up to 16 text tokens + 19 image embeddings (16 patches, CLS, start, end)
TEXT_SEQ = 20  # text conversations: up to 21 tokens, i.e. 20 positions that predict the next one
UPPER_BOUND_LINE = 80.0  # exact match % the encoder trained on the target itself must reach on every seed
MARGIN = 5.0  # exact-match points by which a comparison must hold on a seed to be claimed
LOSS_RATIO = 1.5  # ... and the factor for the answer loss
WARMUP = 0.1  # fraction of each run's steps spent in linear LR warmup (then cosine to 0); gradients clipped at 1


def make_tokenizer():
    from megatron_zero.data import synthetic_shapes as ss
    from megatron_zero.data.tokenizers import WordTokenizer

    return WordTokenizer.build(ss.vocabulary_texts())


def chat_samples(template, n: int, seed: int):
    """Chat-formatted text: the user lists the four attribute words *in random order*, the assistant describes
    them (a caption, which puts them in order) or answers a question about one. The target LLM learns to find an
    attribute among the context words by what it is, not where it is -- the lookup an image encoder later drives
    with embeddings the LM reads like those words. Returns encoded conversations (ids + loss masks)."""
    from megatron_zero.data import synthetic_shapes as ss
    from megatron_zero.data.chat_template import Message

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = ss.random_scene(rng)
        words = [s.size, s.color, s.shape, s.position]
        rng.shuffle(words)
        if rng.random() < 0.5:
            q, a = "describe the image .", s.caption
        else:
            attr = rng.choice(list(ss.QUESTIONS))
            q, a = ss.QUESTIONS[attr], s.answer(attr)
        # loss on the template's special tokens too, so the LLM predicts its own chat format (as instruct models
        # do) and the encoder-only stage's A.9 rule has something to preserve
        out.append(template.encode([Message("user", f"{' '.join(words)} . {q}"), Message("assistant", a)],
                                   loss_on_special_tokens=True))
    return out


def chat_rows(template, n: int, seed: int) -> dict:
    """One conversation per row, padded to TEXT_SEQ: tokens, next-token labels and the response loss mask."""
    tokens = torch.zeros(n, TEXT_SEQ, dtype=torch.long)
    labels = torch.zeros(n, TEXT_SEQ, dtype=torch.long)
    mask = torch.zeros(n, TEXT_SEQ)
    for i, enc in enumerate(chat_samples(template, n, seed)):
        if len(enc.input_ids) > TEXT_SEQ + 1:
            raise ValueError(f"a text conversation has {len(enc.input_ids)} tokens; TEXT_SEQ {TEXT_SEQ} fits "
                             f"{TEXT_SEQ + 1}")
        ids = torch.tensor(enc.input_ids)
        m = torch.tensor(enc.loss_mask[:TEXT_SEQ + 1], dtype=torch.float)
        tokens[i, :len(ids) - 1], labels[i, :len(ids) - 1], mask[i, :len(ids) - 1] = ids[:-1], ids[1:], m[1:]
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}


def decoder_config(vocab: int, layers: int = 12, hidden: int = 64):
    from megatron_zero.models.llama_config import LlamaConfig

    return LlamaConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=2 * hidden, num_attention_heads=4,
                       num_query_groups=2, vocab_size=vocab, max_position_embeddings=128, rope_theta=10000.0,
                       rope_scaling_factor=None, name="demo-target")


def vision_config():
    from megatron_zero.models.clip_vit import ClipVisionConfig

    return ClipVisionConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, patch_size=8,
                            image_size=IMAGE_SIZE, name="demo-vit")


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _trainer(lr, steps, batch, seq, seed):
    """The library's Trainer for one run (megatron DDP + optimizer, grad clipping 1.0, warmup/cosine schedule),
    process groups and seeds set up: build the model after it, then ``trainer.build(...).run()``."""
    from megatron_zero.config import DataConfig, LoggingConfig, OptimizerConfig, RunConfig, TrainingConfig
    from megatron_zero.training.trainer import Trainer

    cfg = RunConfig(training=TrainingConfig(micro_batch_size=batch, global_batch_size=batch, seq_length=seq,
                                            train_iters=steps, seed=seed),
                    optimizer=OptimizerConfig(lr=lr, lr_warmup_fraction=WARMUP, clip_grad=1.0),
                    data=DataConfig(pack_sequences=False), logging=LoggingConfig(log_interval=max(steps // 4, 1)))
    trainer = Trainer(cfg)
    trainer.initialize()
    return trainer


def train_lm(cfg, rows, steps, lr, seed, trainable=None, canonical=None, batch=32):
    """Train a decoder (all weights, or the global layer indices in ``trainable``) on chat rows."""
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel import sharding
    from megatron_zero.training.train_step import lm_forward_step

    trainer = _trainer(lr, steps, batch, TEXT_SEQ, seed)
    torch.manual_seed(seed)
    model = build_llama_model(cfg)
    if canonical is not None:
        sharding.load_canonical(model, canonical, source="demo")
    if trainable is not None:
        gmap = sharding.layer_index_map(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("decoder.layers.") and gmap[int(name.split(".")[2])] in trainable)
    n = rows["tokens"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def micro_batches(it):
        idx = order[torch.arange(it * batch, (it + 1) * batch) % n]
        yield {k: v[idx] for k, v in rows.items()}

    losses = trainer.build([model], lm_forward_step, micro_batches).run()
    return sharding.gather_canonical([model], vocab_size=cfg.vocab_size), losses


def vlm_records(template, samples, loss_on_special_tokens, num_image_embeddings):
    """ChatDataset of image samples; image 'paths' are keys into an in-memory store of preprocessed tensors."""
    from PIL import Image

    from megatron_zero.data.chat_template import Message
    from megatron_zero.data.datasets import ChatDataset, Conversation, TokenizationConfig
    from megatron_zero.data.images import preprocess_pil

    store, convs = {}, []
    for s in samples:
        key = f"img{s['id']}"
        store[key] = preprocess_pil(Image.fromarray(s["image"]), IMAGE_SIZE)
        convs.append(Conversation([Message("user", s["prompt"]), Message("assistant", s["answer"])], [key], key))
    ds = ChatDataset.build(convs, template, TokenizationConfig(max_seq_len=SEQ, num_image_tokens=num_image_embeddings,
                                                                loss_on_special_tokens=loss_on_special_tokens))
    return ds, store


def _batches(ds, store, vlm_cfg, template, run_cfg):
    """The library's micro-batches of image records (the in-memory image store stands in for the image files)."""
    from megatron_zero.training.vlm_batches import VLMBatches

    return VLMBatches.from_config(ds, run_cfg, pad_id=template.tokenizer.pad_id, image_token_id=vlm_cfg.image_token_id,
                                  num_image_embeddings=vlm_cfg.num_image_embeddings, load_image=store.__getitem__)


def build_vlm_model(vlm_cfg, decoder_canonical, encoder_canonical=None):
    from megatron_zero.models.vlm import build_vlm, load_vlm_canonical

    model = build_vlm(vlm_cfg)
    load_vlm_canonical(model, encoder_canonical, decoder_canonical, source="demo")
    return model


def untrained_encoder(vlm_cfg, decoder_canonical, seed):
    """A freshly initialised encoder + adapter (as stage 2 starts from), as canonical tensors."""
    from megatron_zero.models.vlm import encoder_canonical_state

    torch.manual_seed(seed)
    return encoder_canonical_state(build_vlm_model(vlm_cfg, decoder_canonical))


def train_vlm(vlm_cfg, decoder_canonical, template, train_samples, steps, lr, seed, stage="stage2",
              encoder_canonical=None, batch=32):
    """Stage 2 (frozen decoder; the whole encoder + adapter + start/end embeddings train, from scratch unless
    ``encoder_canonical``) or stage 3 (the same plus the whole decoder). Returns (encoder, decoder) canonical
    tensors and the losses."""
    from megatron_zero.models.freezing import apply_freezing
    from megatron_zero.models.vlm import encoder_canonical_state
    from megatron_zero.parallel import sharding
    from megatron_zero.training.vlm_batches import vlm_forward_step

    trainer = _trainer(lr, steps, batch, SEQ, seed)
    torch.manual_seed(seed)
    model = build_vlm_model(vlm_cfg, decoder_canonical, encoder_canonical)
    apply_freezing([model], stage, encoder_trainable_layers=vlm_cfg.vision.num_built_layers)
    for p in model.vision.parameters():  # trained from scratch: the patch/position embeddings train too
        p.requires_grad_(True)
    ds, store = vlm_records(template, train_samples, True, vlm_cfg.num_image_embeddings)
    batches = _batches(ds, store, vlm_cfg, template, trainer.cfg)
    losses = trainer.build([model], vlm_forward_step, batches.iteration).run()
    decoder = sharding.gather_canonical([model.language_model], vocab_size=vlm_cfg.decoder.vocab_size)
    return encoder_canonical_state(model), decoder, losses


def evaluate(vlm_cfg, decoder_canonical, encoder_canonical, template, samples):
    """(mean answer loss per token, greedy exact-match accuracy) on held-out image samples."""
    from megatron_zero.config import DataConfig, RunConfig, TrainingConfig
    from megatron_zero.data.chat_template import Message
    from megatron_zero.inference.generate import SamplingOptions, generate

    model = build_vlm_model(vlm_cfg, decoder_canonical, encoder_canonical).eval()
    ds, store = vlm_records(template, samples, False, vlm_cfg.num_image_embeddings)
    n = len(ds) - len(ds) % 50
    batches = _batches(ds, store, vlm_cfg, template, RunConfig(
        training=TrainingConfig(micro_batch_size=50, global_batch_size=50, seq_length=SEQ, seed=0),
        data=DataConfig(pack_sequences=False)))
    total, count = 0.0, 0.0
    with torch.no_grad():
        for it in range(n // 50):
            for b in batches.iteration(it):
                losses = model(b["tokens"], b["position_ids"], None, images=b["images"], image_mask=b["image_mask"],
                               labels=b["labels"])
                total += float((losses * b["loss_mask"]).sum())
                count += float(b["loss_mask"].sum())
    prompts, images, answers = [], [], []
    for s in samples[:n]:
        enc = template.encode([Message("user", s["prompt"])], add_generation_prompt=True)
        prompts.append(enc.input_ids)
        images.append(store[f"img{s['id']}"].unsqueeze(0))
        answers.append(s["answer"])
    correct = 0
    tok = template.tokenizer
    for i in range(0, len(prompts), 150):  # KV-cached decoding: fewer, larger batches
        outs = generate(model, prompts[i:i + 150], images[i:i + 150], SamplingOptions(max_new_tokens=12),
                        stop_token_ids=template.stop_token_ids)
        for out, ans in zip(outs, answers[i:i + 150]):
            text = tok.decode([t for t in out if t not in template.stop_token_ids])
            correct += int(text.strip() == " ".join(tok.decode(tok.encode(ans)).split()))
    return total / max(count, 1), correct / max(len(prompts), 1)


def trajectory(cfg, canonical, template, seed):
    """Per-layer position-KL (Eq. 1-4) of held-out chat conversations (one per row, padding excluded), its
    median, the detected transition layer and where the median crosses the transition line (in layers)."""
    from megatron_zero.analysis.trajectory import detect_transition, pad_batch, trajectory_kl, transition_crossing
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel import sharding

    model = build_llama_model(cfg).eval()
    sharding.load_canonical(model, canonical, source="demo")
    tokens, lengths = pad_batch([enc.input_ids for enc in chat_samples(template, 200, seed + 7)])
    kl = trajectory_kl(model, tokens, vocab_size=cfg.vocab_size, lengths=lengths)  # [samples, layers]
    median = kl.median(dim=0).values
    return kl, median, detect_transition(median), transition_crossing(median)


# ---------------------------------------------------------------------------------------------------------
# Per-seed jobs (run in worker processes)
# ---------------------------------------------------------------------------------------------------------
_SHARED: dict = {}


def _worker_init(shared_path: str, threads: int) -> None:
    """A fresh process: one thread, its own world of one (a new rendezvous port), the shared target loaded."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        os.environ.pop(k, None)
    torch.set_num_threads(threads)
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1)
    _SHARED.update(torch.load(shared_path, weights_only=False))


def _world(args):
    from megatron_zero.data import synthetic_shapes as ss
    from megatron_zero.data.chat_template import chat_template_for

    template = chat_template_for(make_tokenizer())
    test = ss.vision_samples(args.eval_images, seed=args.seed + 3, image_size=IMAGE_SIZE)
    return template, test


def run_job(kind: str, seed: int) -> dict:
    """One seed's work for one decoder: ``surrogate`` / ``control`` (stage 1, stage 2, graft, evaluate; stage 3
    from the graft for the surrogate), ``upper`` (stage 2 on the target itself) or ``untrained`` (evaluate an
    untrained encoder on the target; stage 3 from it). Returns rows {kind: (model, layers, loss, exact)} and the
    training curves."""
    from megatron_zero import grafting
    from megatron_zero.data import synthetic_shapes as ss
    from megatron_zero.models.vlm import VLMConfig
    from megatron_zero.surrogate import surrogate_canonical

    t0, c0 = time.time(), time.process_time()
    sh = _SHARED
    args, cfg, target, target_dir = sh["args"], sh["cfg"], sh["target"], sh["target_dir"]
    template, test = _world(args)
    vision = vision_config()
    train_samples = ss.vision_samples(args.train_images, seed=seed * 1000 + 2, image_size=IMAGE_SIZE)
    out_dir = os.path.join(args.output_dir, f"seed{seed}")
    os.makedirs(out_dir, exist_ok=True)
    rows, curves = {}, {}
    target_vcfg = VLMConfig(cfg, vision, template.image_placeholder_id)
    L = cfg.num_layers

    def stage3(kind3, encoder, label):
        if args.stage3_steps <= 0:
            return
        enc3, dec3, losses = train_vlm(target_vcfg, target, template, train_samples, args.stage3_steps,
                                       args.stage3_lr, seed, stage="stage3", encoder_canonical=encoder)
        loss, acc = evaluate(target_vcfg, dec3, enc3, template, test)
        rows[kind3] = (label, L, loss, acc)
        curves[kind3] = losses

    if kind in ("surrogate", "control"):
        sa, sb = sh[kind]
        scfg, scan = surrogate_canonical(cfg, target, sa, sb, target_name=target_dir)
        scan, _ = train_lm(scfg, chat_rows(template, 2000, seed * 1000 + 1), args.translator_steps, 1e-3, seed,
                           trainable={sa}, canonical=scan)
        vcfg = VLMConfig(scfg, vision, template.image_placeholder_id)
        enc, _, losses = train_vlm(vcfg, scan, template, train_samples, args.encoder_steps, args.encoder_lr, seed)
        curves[f"{kind}_own"] = losses
        path = os.path.join(out_dir, f"encoder_{kind}")
        grafting.save_image_encoder(path, enc, vision, vcfg.image_token_id,
                                    grafting.decoder_identity(scfg, scan["embedding.word_embeddings.weight"]),
                                    overwrite=True)
        name = f"T({sa},{sb})" if kind == "surrogate" else f"control T({sa},{sb})"
        loss, acc = evaluate(vcfg, scan, enc, template, test)
        rows[f"{kind}_own"] = (f"{name} + its encoder", scfg.num_layers, loss, acc)
        # zero-shot graft through the grafting tool's code path (provenance checked against the target)
        gpath = os.path.join(out_dir, f"grafted_{kind}")
        grafting.graft(path, target_dir, gpath, overwrite=True)
        gcfg, genc, gdec = grafting.load_vlm_checkpoint(gpath)
        gdec = {k: gdec(k) for k in target}
        loss, acc = evaluate(gcfg, gdec, genc, template, test)
        rows[f"{kind}_graft"] = (f"target + encoder from {name} (zero-shot graft)", L, loss, acc)
        if kind == "surrogate":
            stage3("stage3_graft", genc, f"target + graft, {args.stage3_steps} stage-3 steps")
    elif kind == "upper":
        enc, _, losses = train_vlm(target_vcfg, target, template, train_samples, args.encoder_steps,
                                   args.encoder_lr, seed)
        curves["upper_bound"] = losses
        loss, acc = evaluate(target_vcfg, target, enc, template, test)
        rows["upper_bound"] = ("target + its own encoder (upper bound)", L, loss, acc)
    elif kind == "untrained":
        enc = untrained_encoder(target_vcfg, target, seed)
        loss, acc = evaluate(target_vcfg, target, enc, template, test)
        rows["untrained"] = ("target + untrained encoder", L, loss, acc)
        stage3("stage3_untrained", enc, f"target + untrained encoder, {args.stage3_steps} stage-3 steps")
    else:
        raise ValueError(kind)
    return {"kind": kind, "seed": seed, "rows": rows, "curves": curves, "wall": time.time() - t0,
            "cpu": time.process_time() - c0}


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------
def _mean_spread(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def conclusions(rows: dict, seeds: list, target_layers: int) -> list[str]:
    """What the per-seed numbers show. A comparison is claimed only if it holds on every seed with a margin
    (:data:`MARGIN` points of exact match, :data:`LOSS_RATIO` for the answer loss); the line gives the smallest
    margin seen. Claims whose rows were not run (``--jobs``) are left out."""
    n = len(seeds)
    em = {k: [100 * x for x in r["exact_match"]] for k, r in rows.items()}
    loss = {k: r["answer_loss"] for k, r in rows.items()}
    out = []

    def claim(needs, gap, need, text, smallest, absent):
        if not set(needs) <= set(rows):
            return
        gaps = [gap(i) for i in range(n)]
        k = sum(g >= need for g in gaps)
        out.append(f"{text} on {k}/{n} seeds ({smallest} {min(gaps):.1f})" if k == n else f"{absent} ({k}/{n} seeds)")

    def beats(better, worse):
        return lambda i: em[better][i] - em[worse][i]

    claim(["upper_bound"], lambda i: em["upper_bound"][i], UPPER_BOUND_LINE,
          f"the encoder trained on the target itself reaches >= {UPPER_BOUND_LINE:.0f}% exact match", "lowest",
          f"the upper-bound encoder does NOT reach {UPPER_BOUND_LINE:.0f}% exact match on every seed")
    claim(["surrogate_graft", "control_graft"], beats("surrogate_graft", "control_graft"), MARGIN,
          f"zero-shot graft beats the control's graft by >= {MARGIN:.0f} points of exact match", "smallest gap",
          f"graft > control by {MARGIN:.0f} points (exact match) is not shown at this scale")
    claim(["surrogate_graft", "control_graft"], lambda i: loss["control_graft"][i] / loss["surrogate_graft"][i],
          LOSS_RATIO, f"zero-shot graft's answer loss is >= {LOSS_RATIO}x lower than the control's graft's",
          "smallest ratio", f"a {LOSS_RATIO}x lower answer loss than the control's graft is not shown")
    claim(["surrogate_graft", "untrained"], beats("surrogate_graft", "untrained"), MARGIN,
          f"zero-shot graft beats an untrained encoder on the target by >= {MARGIN:.0f} points of exact match",
          "smallest gap", f"graft > untrained by {MARGIN:.0f} points (exact match) is not shown")
    claim(["stage3_graft", "stage3_untrained"], beats("stage3_graft", "stage3_untrained"), MARGIN,
          f"stage 3 from the grafted encoder beats stage 3 from an untrained one by >= {MARGIN:.0f} points of "
          "exact match", "smallest gap", "the stage-3 warm start is not shown at this scale")
    if "surrogate_own" in rows:
        layers = rows["surrogate_own"]["layers"]
        out.append(f"the surrogate keeps {layers} of the target's {target_layers} layers "
                   f"({100 * layers / target_layers:.0f}%)")
    return out


def print_table(rows: dict, seeds: list) -> None:
    width = max(len(r["model"]) for r in rows.values())
    head = f"{'model (held-out images)':{width}s} {'layers':>6s}  {'exact match % mean+-sd':>22s}  " \
           f"{'answer loss mean+-sd':>20s}  per seed (exact match %)"
    print(head)
    for r in rows.values():
        m, s = _mean_spread([100 * x for x in r["exact_match"]])
        lm, ls = _mean_spread(r["answer_loss"])
        per = " ".join(f"{100 * x:5.1f}" for x in r["exact_match"])
        print(f"{r['model']:{width}s} {r['layers']:6d}  {m:14.1f} +- {s:4.1f}  {lm:12.3f} +- {ls:.3f}  {per}")
    print(f"(seeds {', '.join(map(str, seeds))})")


COLORS = {"upper_bound": "black", "surrogate_own": "tab:green", "surrogate_graft": "tab:blue",
          "control_own": "tab:orange", "control_graft": "tab:red", "untrained": "tab:gray",
          "stage3_graft": "tab:purple", "stage3_untrained": "tab:brown"}
SHORT = {"upper_bound": "target + own encoder (upper bound)", "surrogate_own": "surrogate + its encoder",
         "surrogate_graft": "target + surrogate's encoder (graft)", "control_own": "control + its encoder",
         "control_graft": "target + control's encoder (graft)", "untrained": "target + untrained encoder",
         "stage3_graft": "stage 3 from the graft", "stage3_untrained": "stage 3 from untrained"}


def save_plots(out_dir, kl, median, a, rows, curves, seeds):
    """demo.png: the main result (exact match per row, every seed's point), the trajectory with the transition,
    and the training curves (one colour per row, one line per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1.25, 1, 1]})
    # 1. the main result
    kinds = list(rows)
    for y, kind in enumerate(kinds):
        em = [100 * x for x in rows[kind]["exact_match"]]
        ax[0].barh(y, statistics.fmean(em), color=COLORS[kind], alpha=0.35)
        ax[0].plot(em, [y] * len(em), "o", color=COLORS[kind], ms=5)
    ax[0].set_yticks(range(len(kinds)), [rows[k]["model"] for k in kinds], fontsize=7)
    ax[0].invert_yaxis()
    ax[0].set_xlim(0, 100)
    ax[0].axvline(UPPER_BOUND_LINE, color="black", lw=0.8, ls=":")  # the upper bound's claim
    ax[0].set_xlabel("exact match on held-out images (%): bar = mean, dots = seeds")
    ax[0].set_title(f"main result ({len(seeds)} seeds)")
    # 2. the trajectory
    for row in kl:
        ax[1].plot(row.numpy(), color="tab:blue", alpha=0.06)
    ax[1].plot(median.numpy(), color="tab:blue", lw=2.5, label="median")
    ax[1].axhline(0.1 * float(median.max()), color="gray", lw=0.8, ls=":", label="10% of the maximum")
    ax[1].axvline(a, color="tab:red", ls="--", label=f"transition (layer {a})")
    ax[1].set_xlabel("layer")
    ax[1].set_ylabel("KL(q_l || p) over positions (Eq. 4)")
    ax[1].set_title("prediction trajectory of the target")
    ax[1].legend()
    # 3. training curves: the legend names the rows; the seeds are the lines of one colour
    for kind in KINDS:
        for seed in seeds:
            ys = [x for x in curves.get((seed, kind), []) if x is not None]
            w = max(1, len(ys) // 50)
            ys = [statistics.fmean(ys[max(0, i - w):i + 1]) for i in range(len(ys))]
            label = SHORT[kind] if ys and seed == seeds[0] else None
            ax[2].plot(ys, color=COLORS[kind], lw=1.0, alpha=0.8, label=label)
    ax[2].set_xlabel("step")
    ax[2].set_ylabel("answer loss (running mean)")
    ax[2].set_yscale("log")
    ax[2].set_title("training curves (one line per seed)")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "demo.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.lm_steps, args.translator_steps, args.encoder_steps, args.eval_images = 20, 4, 12, 50
        args.train_images = 400
        args.stage3_steps = min(args.stage3_steps, 4)
    t0, c0 = time.time(), time.process_time()
    args.output_dir = os.path.abspath(args.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    from megatron_zero import grafting, platform
    from megatron_zero.parallel.initialize import initialize_parallel
    from megatron_zero.surrogate import compute_ratio, surrogate_config

    torch.set_num_threads(1)  # one thread per process everywhere: no oversubscription, one reduction order
    initialize_parallel(1, 1, seed=args.seed)
    log(f"megatron_zero demo on {platform.summary()}")
    from megatron_zero.data.chat_template import chat_template_for

    template = chat_template_for(make_tokenizer())
    cfg = decoder_config(template.tokenizer.vocab_size, args.layers, args.hidden)
    L = cfg.num_layers

    # 1. pretrain the target
    log(f"1/6 pretraining the target LLM ({L} layers x {cfg.hidden_size}, {cfg.num_parameters():,} params) for "
        f"{args.lm_steps} steps (lr {args.lm_lr}, {WARMUP:.0%} warmup, cosine, clip 1.0)")
    target, lm_losses = train_lm(cfg, chat_rows(template, 8000, args.seed), args.lm_steps, args.lm_lr, args.seed)

    # 2. trajectory
    kl, median, a, crossing = trajectory(cfg, target, template, args.seed)
    detected = a
    a = min(max(a, 2), L - 3)
    b = L - 2
    k = 1 + (b - a)
    log("2/6 prediction trajectory, median KL per layer: " + " ".join(f"{x:.3f}" for x in median.tolist())
        + f" -> transition layer {detected} (nearest to {crossing:.2f}, where it falls to 10% of its maximum)"
        + ("" if a == detected else f", clamped to {a}"))

    # 3. surrogate and control (their provenance names the target checkpoint, which grafting verifies)
    target_dir = os.path.join(args.output_dir, "target")
    grafting.save_hf_decoder(target_dir, cfg, target)
    scfg = surrogate_config(cfg, a, b)
    log(f"3/6 surrogate T({a},{b}) and control T(1,{k}): {scfg.num_layers} layers each (target {L}, "
        f"{100 * scfg.num_layers / L:.0f}% kept; {compute_ratio(cfg, scfg, SEQ):.2f}x the target's FLOPs per token)")

    # 4-6 per seed, in worker processes
    seeds = [args.seed + i for i in range(args.seeds)]
    shared_path = os.path.join(args.output_dir, "shared.pt")
    torch.save({"args": args, "cfg": cfg, "target": target, "target_dir": target_dir, "surrogate": (a, b),
                "control": (1, k)}, shared_path)
    # longest first (stage 2 through all 12 layers; 7 layers + stage 3; 7 layers; stage 3 only), so that the short
    # jobs fill the end and neither worker idles while the other finishes a long one
    jobs = [(kind, s) for kind in JOBS if kind in args.jobs for s in seeds]
    log(f"4-6/6 {len(jobs)} jobs ({len(seeds)} seeds x {', '.join(k for k in JOBS if k in args.jobs)}) on "
        f"{args.workers} worker processes: stage 1 ({args.translator_steps} steps), stage 2 ({args.encoder_steps} "
        f"steps, lr {args.encoder_lr}), graft, stage 3 ({args.stage3_steps} steps), evaluation on "
        f"{args.eval_images} held-out images")
    results, worker_cpu = [], 0.0
    with cf.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=_worker_init, initargs=(shared_path, 1)) as pool:
        futures = {pool.submit(run_job, kind, s): (kind, s) for kind, s in jobs}
        for fut in cf.as_completed(futures):
            r = fut.result()
            results.append(r)
            worker_cpu += r["cpu"]
            for kind_, (label, _, loss, acc) in r["rows"].items():
                log(f"seed {r['seed']} {kind_:16s} {label}: answer loss {loss:.3f}, exact match {100 * acc:.1f}%")
            log(f"job {r['kind']}/seed {r['seed']} done in {r['wall']:.0f} s ({len(results)}/{len(jobs)}; "
                f"{time.time() - t0:.0f} s elapsed)")

    rows, curves = {}, {}
    for kind in KINDS:
        per_seed = {r["seed"]: r["rows"][kind] for r in results if kind in r["rows"]}
        if not per_seed:
            continue
        label, layers = per_seed[seeds[0]][0], per_seed[seeds[0]][1]
        rows[kind] = {"kind": kind, "model": label, "layers": layers,
                      "exact_match": [per_seed[s][3] for s in seeds], "answer_loss": [per_seed[s][2] for s in seeds]}
    for r in results:
        for kind, losses in r["curves"].items():
            curves[(r["seed"], kind)] = losses
    os.remove(shared_path)

    plot = save_plots(args.output_dir, kl, median, a, rows, curves, seeds)
    lines = conclusions(rows, seeds, L)
    wall, cpu = time.time() - t0, time.process_time() - c0 + worker_cpu
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"seeds": seeds, "target_layers": L, "rows": list(rows.values()),
                   "transition_layer": a, "detected_transition_layer": detected,
                   "transition_crossing": crossing, "median_kl": median.tolist(),
                   "surrogate": [a, b], "control": [1, k], "conclusions": lines, "args": vars(args),
                   "wall_seconds": wall, "cpu_seconds": cpu}, f, indent=2)
    print()
    print_table(rows, seeds)
    print()
    for line in lines:
        print(f"- {line}")
    print(f"\nplots: {plot}   results: {os.path.join(args.output_dir, 'results.json')}   "
          f"wall {wall:.0f} s, CPU {cpu:.0f} s (all processes)")
    return 0


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
