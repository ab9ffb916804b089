#!/usr/bin/env python
"""The end-to-end demo (``make demo``): the whole method at toy scale, on a CPU, in a few minutes.

1. pretrain a tiny Llama-style target LLM on a generated text corpus (chat-formatted descriptions of shapes);
2. measure its prediction trajectory (Eq. 1-4) and pick the transition layer ``a``;
3. build the surrogate T(a, L-2) and an early-phase-replaced control T(1, k) with the same number of layers;
4. stage 1: tune each translator on text; stage 2: train a small ViT encoder + adapter from scratch on
   synthetic images (rendered shapes with captions and questions) on each small decoder, decoder frozen;
5. graft each encoder into the full target zero-shot (``tools/graft.py``'s code path, provenance checked);
6. evaluate on held-out images: caption/answer loss and greedy exact-match, and print the results table.

Everything runs through the library's real code paths (megatron-core models, the training loop, DDP and the
optimizer, chat templates and loss masks, grafting checkpoints, KV-cached generation) in a world of one.
Outputs (plots, JSON, checkpoints) go to ``--output-dir`` (default ``outputs/demo``). The numbers are whatever
this run measures; see the README for a recorded run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lm-steps", type=int, default=300, help="target LLM pretraining steps")
    p.add_argument("--translator-steps", type=int, default=60, help="stage 1 steps per small decoder")
    p.add_argument("--encoder-steps", type=int, default=2000, help="stage 2 steps per encoder")
    p.add_argument("--eval-images", type=int, default=300)
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; numbers meaningless)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# The toy world
# ---------------------------------------------------------------------------------------------------------
IMAGE_SIZE = 32
SEQ = 32


def make_tokenizer():
    from megatron_zero.data import synthetic_shapes as ss
    from megatron_zero.data.tokenizers import WordTokenizer

    return WordTokenizer.build(ss.vocabulary_texts())


def chat_samples(template, n: int, seed: int):
    """Chat-formatted text: the user lists the attributes, the assistant describes or answers. The target LLM
    learns to turn attribute words into answers; an image encoder later has to make it 'read' an image like those
    words. Returns encoded conversations (ids + loss masks: the response and its closing <eot>)."""
    from megatron_zero.data import synthetic_shapes as ss
    from megatron_zero.data.chat_template import Message

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = ss.random_scene(rng)
        words = f"{s.size} {s.color} {s.shape} {s.position}"
        if rng.random() < 0.5:
            q, a = "describe the image .", s.caption
        else:
            attr = rng.choice(list(ss.QUESTIONS))
            q, a = ss.QUESTIONS[attr], s.answer(attr)
        # loss on the template's special tokens too, so the LLM predicts its own chat format (as instruct models
        # do) and the encoder-only stage's A.9 rule has something to preserve
        out.append(template.encode([Message("user", f"{words} . {q}"), Message("assistant", a)],
                                   loss_on_special_tokens=True))
    return out


def chat_rows(template, n: int, seed: int) -> dict:
    """One conversation per row, padded to SEQ: tokens, next-token labels and the response loss mask."""
    tokens = torch.zeros(n, SEQ, dtype=torch.long)
    labels = torch.zeros(n, SEQ, dtype=torch.long)
    mask = torch.zeros(n, SEQ)
    for i, enc in enumerate(chat_samples(template, n, seed)):
        ids = torch.tensor(enc.input_ids[:SEQ + 1])
        m = torch.tensor(enc.loss_mask[:SEQ + 1], dtype=torch.float)
        tokens[i, :len(ids) - 1], labels[i, :len(ids) - 1], mask[i, :len(ids) - 1] = ids[:-1], ids[1:], m[1:]
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}


def decoder_config(vocab: int, layers: int = 8):
    from megatron_zero.models.llama_config import LlamaConfig

    return LlamaConfig(num_layers=layers, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4,
                       num_query_groups=2, vocab_size=vocab, max_position_embeddings=128, rope_theta=10000.0,
                       rope_scaling_factor=None, name="demo-target")


def vision_config():
    from megatron_zero.models.clip_vit import ClipVisionConfig

    return ClipVisionConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, patch_size=16,
                            image_size=IMAGE_SIZE, name="demo-vit")


# ---------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_lm(cfg, rows, steps, lr, seed, trainable=None, canonical=None, batch=32):
    """Train a decoder (all weights, or the global layer indices in ``trainable``) on chat rows."""
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel import sharding
    from megatron_zero.training.loop import LoopConfig, build_scheduler, train
    from megatron_zero.training.optimizer import OptimizerOptions, build_optimizer, wrap_ddp
    from megatron_zero.training.train_step import lm_forward_step

    model = build_llama_model(cfg)
    if canonical is not None:
        sharding.load_canonical(model, canonical, source="demo")
    if trainable is not None:
        gmap = sharding.layer_index_map(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("decoder.layers.") and gmap[int(name.split(".")[2])] in trainable)
    oo = OptimizerOptions(lr=lr, use_distributed_optimizer=False)
    chunks = wrap_ddp([model], oo)
    opt = build_optimizer(chunks, oo)
    sched = build_scheduler(opt, lr, 0.0, steps, 0.03)
    n = rows["tokens"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def micro_batches(it):
        idx = order[torch.arange(it * batch, (it + 1) * batch) % n]
        yield {k: v[idx] for k, v in rows.items()}

    loop = LoopConfig(train_iters=steps, global_batch_size=batch, micro_batch_size=batch, seq_length=SEQ,
                      data_parallel_size=1, log_interval=max(steps // 5, 1))
    losses = train(loop, chunks, opt, sched, lm_forward_step, micro_batches)
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


def build_vlm_model(vlm_cfg, decoder_canonical, encoder_canonical=None):
    from megatron_zero.models.vlm import build_vlm, load_vlm_canonical

    model = build_vlm(vlm_cfg)
    load_vlm_canonical(model, encoder_canonical, decoder_canonical, source="demo")
    return model


def train_encoder(vlm_cfg, decoder_canonical, template, train_samples, steps, lr, seed, batch=32):
    """Stage 2 on a frozen decoder: the whole (fresh) encoder + adapter + start/end embeddings train."""
    from megatron_zero.models.freezing import apply_freezing
    from megatron_zero.training.loop import LoopConfig, build_scheduler, train
    from megatron_zero.training.optimizer import OptimizerOptions, build_optimizer, wrap_ddp
    from megatron_zero.training.vlm_batches import VLMBatches, vlm_forward_step

    torch.manual_seed(seed)
    model = build_vlm_model(vlm_cfg, decoder_canonical)
    apply_freezing([model], "stage2", encoder_trainable_layers=vlm_cfg.vision.num_built_layers)
    for p in model.vision.parameters():  # trained from scratch: the patch/position embeddings train too
        p.requires_grad_(True)
    oo = OptimizerOptions(lr=lr, use_distributed_optimizer=False)
    chunks = wrap_ddp([model], oo)
    opt = build_optimizer(chunks, oo)
    sched = build_scheduler(opt, lr, 0.0, steps, 0.03)
    ds, store = vlm_records(template, train_samples, True, vlm_cfg.num_image_embeddings)
    batches = VLMBatches(ds, image_token_id=vlm_cfg.image_token_id, num_image_embeddings=vlm_cfg.num_image_embeddings,
                         seq_length=SEQ, pad_id=template.tokenizer.pad_id, global_batch_size=batch,
                         micro_batch_size=batch, dp_rank=0, dp_size=1, seed=seed, load_image=store.__getitem__)
    loop = LoopConfig(train_iters=steps, global_batch_size=batch, micro_batch_size=batch, seq_length=SEQ,
                      data_parallel_size=1, log_interval=max(steps // 5, 1))
    losses = train(loop, chunks, opt, sched, vlm_forward_step, batches.iteration)
    from megatron_zero.models.vlm import encoder_canonical_state

    return encoder_canonical_state(model), losses


def evaluate(vlm_cfg, decoder_canonical, encoder_canonical, template, samples):
    """(mean answer loss per token, greedy exact-match accuracy) on held-out image samples."""
    from megatron_zero.data.chat_template import Message
    from megatron_zero.inference.generate import SamplingOptions, generate
    from megatron_zero.training.vlm_batches import VLMBatches

    model = build_vlm_model(vlm_cfg, decoder_canonical, encoder_canonical).eval()
    ds, store = vlm_records(template, samples, False, vlm_cfg.num_image_embeddings)
    n = len(ds) - len(ds) % 50
    batches = VLMBatches(ds, image_token_id=vlm_cfg.image_token_id, num_image_embeddings=vlm_cfg.num_image_embeddings,
                         seq_length=SEQ, pad_id=template.tokenizer.pad_id, global_batch_size=50, micro_batch_size=50,
                         dp_rank=0, dp_size=1, seed=0, load_image=store.__getitem__)
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
    for i in range(0, len(prompts), 50):
        outs = generate(model, prompts[i:i + 50], images[i:i + 50], SamplingOptions(max_new_tokens=12),
                        stop_token_ids=template.stop_token_ids)
        for out, ans in zip(outs, answers[i:i + 50]):
            text = tok.decode([t for t in out if t not in template.stop_token_ids])
            correct += int(text.strip() == " ".join(tok.decode(tok.encode(ans)).split()))
    return total / max(count, 1), correct / max(len(prompts), 1)


def trajectory(cfg, canonical, template, seed, out_dir):
    """Per-layer position-KL (Eq. 1-4) on held-out chat text, its median and the detected transition layer."""
    from megatron_zero.analysis.trajectory import detect_transition, trajectory_kl
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel import sharding

    model = build_llama_model(cfg).eval()
    sharding.load_canonical(model, canonical, source="demo")
    ids = [t for enc in chat_samples(template, 400, seed + 7) for t in enc.input_ids]
    rows = [ids[i:i + SEQ] for i in range(0, len(ids) - SEQ, SEQ)][:64]
    kl = trajectory_kl(model, torch.tensor(rows), vocab_size=cfg.vocab_size)  # [samples, layers]
    median = kl.median(dim=0).values
    a = detect_transition(median)
    return kl, median, a


def save_plots(out_dir, kl, median, a, curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for row in kl:
        ax[0].plot(row.numpy(), color="tab:blue", alpha=0.08)
    ax[0].plot(median.numpy(), color="tab:blue", lw=2.5, label="median")
    ax[0].axvline(a, color="tab:red", ls="--", label=f"transition (layer {a})")
    ax[0].set_xlabel("layer")
    ax[0].set_ylabel("KL(q_l || p) over positions")
    ax[0].set_title("prediction trajectory of the demo target")
    ax[0].legend()
    for name, losses in curves.items():
        ax[1].plot([x for x in losses if x is not None], label=name)
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("loss")
    ax[1].set_yscale("log")
    ax[1].set_title("training curves")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "demo.png")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.lm_steps, args.translator_steps, args.encoder_steps, args.eval_images = 20, 5, 20, 100
    t0 = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    from megatron_zero import platform
    from megatron_zero.data import synthetic_shapes as ss
    from megatron_zero.data.chat_template import chat_template_for
    from megatron_zero import grafting
    from megatron_zero.models.vlm import VLMConfig
    from megatron_zero.parallel.initialize import initialize_parallel
    from megatron_zero.surrogate import surrogate_canonical

    initialize_parallel(1, 1, seed=args.seed)
    log(f"megatron_zero demo on {platform.summary()}")
    tok = make_tokenizer()
    template = chat_template_for(tok)
    cfg = decoder_config(tok.vocab_size)
    L = cfg.num_layers

    # 1. pretrain the target
    log(f"1/6 pretraining the target LLM ({L} layers, {cfg.num_parameters():,} params) for {args.lm_steps} steps")
    target, lm_losses = train_lm(cfg, chat_rows(template, 8000, args.seed), args.lm_steps, 3e-3, args.seed)

    # 2. trajectory
    kl, median, a = trajectory(cfg, target, template, args.seed, args.output_dir)
    a = min(max(a, 2), L - 3)
    b = L - 2
    k = 1 + (b - a)
    log("2/6 prediction trajectory, median KL per layer: " + " ".join(f"{x:.3f}" for x in median.tolist())
        + f" -> transition layer {a}")

    # 3. surrogate and control (their provenance names the target checkpoint, which grafting verifies)
    target_dir = os.path.abspath(os.path.join(args.output_dir, "target"))
    grafting.save_hf_decoder(target_dir, cfg, target)
    surrogates = {}
    for name, (sa, sb) in {"surrogate": (a, b), "control": (1, k)}.items():
        scfg, scan = surrogate_canonical(cfg, target, sa, sb, target_name=target_dir)
        surrogates[name] = (scfg, scan, (sa, sb))
    log(f"3/6 surrogate T({a},{b}) and control T(1,{k}): {surrogates['surrogate'][0].num_layers} layers each "
        f"(target {L})")

    # 4. stage 1 (translator on text) + stage 2 (encoder on images)
    curves = {"target LM": lm_losses}
    text = chat_rows(template, 3000, args.seed + 1)
    train_samples = ss.vision_samples(4000, seed=args.seed + 2, image_size=IMAGE_SIZE)
    test_samples = ss.vision_samples(args.eval_images, seed=args.seed + 3, image_size=IMAGE_SIZE)
    vision = vision_config()
    encoders = {}
    for name, (scfg, scan, (sa, sb)) in surrogates.items():
        log(f"4/6 [{name} T({sa},{sb})] stage 1: translator (layer {sa}) on text, {args.translator_steps} steps")
        scan, _ = train_lm(scfg, text, args.translator_steps, 1e-3, args.seed, trainable={sa}, canonical=scan)
        surrogates[name] = (scfg, scan, (sa, sb))
        vcfg = VLMConfig(scfg, vision, template.image_placeholder_id)
        log(f"4/6 [{name} T({sa},{sb})] stage 2: encoder + adapter from scratch, {args.encoder_steps} steps")
        enc, losses = train_encoder(vcfg, scan, template, train_samples, args.encoder_steps, 5e-3, args.seed)
        curves[f"encoder on {name} T({sa},{sb})"] = losses
        # the encoder checkpoint records the decoder it was trained with (provenance for grafting)
        path = os.path.join(args.output_dir, f"encoder_{name}")
        emb = scan["embedding.word_embeddings.weight"]
        grafting.save_image_encoder(path, enc, vision, vcfg.image_token_id,
                                    grafting.decoder_identity(scfg, emb), overwrite=True)
        encoders[name] = (vcfg, enc)

    # 5. graft into the target (tools/graft.py's code path, provenance verified)
    grafted = {}
    for name in encoders:
        out = os.path.join(args.output_dir, f"grafted_{name}")
        grafting.graft(os.path.join(args.output_dir, f"encoder_{name}"), target_dir, out, overwrite=True)
        gcfg, genc, gdec = grafting.load_vlm_checkpoint(out)
        grafted[name] = (gcfg, genc, {k2: gdec(k2) for k2 in target})
    log("5/6 grafted both encoders into the target zero-shot")

    # 6. evaluate
    rows = []
    fresh_cfg = VLMConfig(cfg, vision, template.image_placeholder_id)
    for label, vcfg, dec, enc in [
        (f"surrogate T({a},{b}) + its encoder", encoders["surrogate"][0], surrogates["surrogate"][1],
         encoders["surrogate"][1]),
        (f"target + encoder from T({a},{b}) (zero-shot graft)", grafted["surrogate"][0], grafted["surrogate"][2],
         grafted["surrogate"][1]),
        (f"control T(1,{k}) + its encoder", encoders["control"][0], surrogates["control"][1], encoders["control"][1]),
        (f"target + encoder from T(1,{k}) (zero-shot graft)", grafted["control"][0], grafted["control"][2],
         grafted["control"][1]),
        ("target + untrained encoder", fresh_cfg, target, None),
    ]:
        loss, acc = evaluate(vcfg, dec, enc, template, test_samples)
        rows.append({"model": label, "answer_loss": loss, "exact_match": acc})
        log(f"6/6 {label}: loss {loss:.3f}, exact match {100 * acc:.1f}%")

    plot = save_plots(args.output_dir, kl, median, a, curves)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"transition_layer": a, "median_kl": median.tolist(), "results": rows,
                   "args": vars(args), "seconds": time.time() - t0}, f, indent=2)
    width = max(len(r["model"]) for r in rows)
    print()
    print(f"{'model (held-out images)':{width}s}  {'answer loss':>11s}  {'exact match':>11s}")
    for r in rows:
        print(f"{r['model']:{width}s}  {r['answer_loss']:11.3f}  {100 * r['exact_match']:10.1f}%")
    print(f"\nplots: {plot}   results: {os.path.join(args.output_dir, 'results.json')}   "
          f"total {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    from megatron_zero.errors import run_main

    run_main(main)
