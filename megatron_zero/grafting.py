"""Zero-shot grafting (the method's last step): an image encoder trained on a surrogate + the surrogate's target
decoder -> a VLM checkpoint, after checking that they belong together.

No model is built and nothing is trained: the encoder (+adapter, start/end-of-image embeddings) and the target's HF
files are placed side by side, unchanged. (An encoder given as a training run's ``iter_*`` is the exception: that VLM
is loaded, with the frozen base it references, and its encoder written out first.) The file formats and their I/O live in
:mod:`megatron_zero.checkpointing.vlm_checkpoint` (re-exported here for convenience); this module holds the
provenance checks and :func:`graft`.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from megatron_zero.checkpointing.vlm_checkpoint import (  # noqa: F401  (re-exported)
    DECODER_DIR, ENCODER_FORMAT, ENCODER_META, ENCODER_TENSORS, TOKENIZER_FILES, HFDecoder, VLMCheckpointError,
    decoder_identity, embedding_fingerprint, load_image_encoder, load_vlm_checkpoint, read_image_encoder_meta,
    save_hf_decoder, save_image_encoder, save_image_encoder_from_model, tokenizer_hash, write_vlm_checkpoint,
)
from megatron_zero.models.clip_vit import ClipVisionConfig
from megatron_zero.models.vlm import VLMConfig


class GraftingError(VLMCheckpointError):
    """The encoder and target decoder do not belong together."""


def _same_target(recorded: Optional[str], target: HFDecoder) -> bool:
    if not recorded:
        return False
    if os.path.abspath(recorded) == target.path:
        return True
    name = os.path.basename(os.path.normpath(recorded))
    return name in (os.path.basename(target.path), target.cfg.name) or recorded == target.cfg.name


def provenance_check(encoder_meta: dict, target: HFDecoder, target_identity: dict) -> tuple[list[str], list[str]]:
    """``(problems, notes)``: every reason this encoder should not be grafted onto ``target`` (empty when it
    belongs), and what is worth saying but no reason to refuse.

    Identity, not location: the surrogate's recorded target *architecture hash*, the word-embedding fingerprint
    (the surrogate keeps the target's embeddings) and the tokenizer hash must match the target's. A target found at
    another path than the one recorded (a moved or copied checkpoint) is a note. Surrogates built before the
    architecture hash was recorded fall back to comparing the recorded target's path or name.
    """
    from megatron_zero.surrogate import architecture_sha256

    trained = encoder_meta.get("trained_with") or {}
    problems, notes = [], []
    prov = trained.get("surrogate")
    if not prov:
        problems.append(f"the encoder was trained with decoder {trained.get('name')!r}, which is not a surrogate "
                        f"(its config records no surrogate provenance)")
    else:
        recorded_arch = prov.get("target_config_sha256")
        if recorded_arch is not None:
            if recorded_arch != architecture_sha256(target.cfg):
                problems.append(f"the encoder was trained on a surrogate of a different architecture than the target "
                                f"{target.path} (recorded target architecture hash {recorded_arch[:12]}..., the "
                                f"target's {architecture_sha256(target.cfg)[:12]}...)")
            if not _same_target(prov.get("target"), target):
                notes.append(f"the surrogate was built from {prov.get('target')!r}; the target is now at "
                             f"{target.path} (architecture, embeddings and tokenizer match)")
        elif not _same_target(prov.get("target"), target):
            problems.append(f"the encoder was trained on a surrogate of {prov.get('target')!r}, not of the target "
                            f"{target.path} ({target.cfg.name!r}), and its provenance records no architecture hash "
                            f"to identify a moved target by")
        recorded_tok, target_tok = prov.get("tokenizer_sha256"), target_identity.get("tokenizer_hash")
        if recorded_tok and target_tok and recorded_tok != target_tok:
            problems.append("the target's tokenizer files differ from those the surrogate was built with")
    if encoder_meta["decoder_hidden_size"] != target.cfg.hidden_size:
        problems.append(f"the adapter outputs {encoder_meta['decoder_hidden_size']} features but the target's hidden "
                        f"size is {target.cfg.hidden_size}")
    if trained.get("vocab_size") != target.cfg.vocab_size:
        problems.append(f"vocabulary size {trained.get('vocab_size')} (surrogate) != {target.cfg.vocab_size} (target)")
    if trained.get("embedding_fingerprint") != target_identity["embedding_fingerprint"]:
        problems.append("the surrogate's word-embedding table differs from the target's (different vocabulary or "
                        "embedding space: the surrogate was not built from this target)")
    ours, theirs = trained.get("tokenizer_hash"), target_identity.get("tokenizer_hash")
    if ours and theirs and ours != theirs:
        problems.append("the tokenizer files differ between the surrogate and the target")
    if not 0 <= encoder_meta["image_token_id"] < target.cfg.vocab_size:
        problems.append(f"image placeholder id {encoder_meta['image_token_id']} is outside the target vocabulary")
    return problems, notes


def resolve_target(path: str, flag: str = "--target") -> str:
    """The HF Llama directory a graft target names (grafting links its files unchanged, so it must be HF)."""
    from megatron_zero.checkpointing.resolve import DECODER_KINDS, resolve_checkpoint

    ckpt = resolve_checkpoint(path, flag, accept=DECODER_KINDS)
    if ckpt.kind != "hf-llama":
        raise GraftingError(f"{flag} {path}: is {ckpt.describe()}; grafting places the target's HF Llama files "
                            f"unchanged, so it needs an HF Llama directory (convert a torch_dist checkpoint with "
                            f"tools/convert_checkpoint.py --source-format mcore --target-format hf)")
    return ckpt.root


def _write_encoder_of(ckpt, path: str) -> None:
    """The image-encoder checkpoint of a training checkpoint's VLM (loaded with the frozen base it references),
    recording the decoder it was trained with, as the run's export records it."""
    from megatron_zero.checkpointing.sources import materialize_vlm

    tok = ckpt.tokenizer_dir
    save_image_encoder_from_model(path, materialize_vlm(ckpt), tokenizer_hash(tok) if tok else None)


def _rewrite_record(output: str, record: dict) -> None:
    from megatron_zero.models.vlm import VLM_CONFIG_FILE

    path = os.path.join(output, VLM_CONFIG_FILE)
    with open(path) as f:
        data = json.load(f)
    data["graft"] = record
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=2)
    os.replace(path + ".tmp", path)


def graft(encoder_path: str, target_path: str, output: str, force: bool = False, overwrite: bool = False) -> dict:
    """Write a VLM checkpoint: the encoder (+adapter, start/end embeddings) unchanged, the target decoder unchanged.

    ``encoder_path``: an image-encoder checkpoint, or a VLM / training run / training export holding one;
    ``target_path``: the target's HF Llama directory. Refuses (:class:`GraftingError`, listing every problem)
    when the provenance does not match, unless ``force``.
    Returns the graft record stored in ``vlm_config.json``.
    """
    from megatron_zero.checkpointing.resolve import ENCODER_KINDS, resolve_checkpoint

    ckpt = resolve_checkpoint(encoder_path, "--encoder", accept=ENCODER_KINDS)
    target_path = resolve_target(target_path)
    if ckpt.encoder_dir is None:  # a training checkpoint (iter_*): its encoder written out first, then grafted
        import tempfile

        with tempfile.TemporaryDirectory(prefix=".graft-encoder-", dir=os.path.dirname(os.path.abspath(output))) as t:
            encoder_dir = os.path.join(t, "encoder")
            _write_encoder_of(ckpt, encoder_dir)
            record = graft(encoder_dir, target_path, output, force, overwrite)
        record["encoder"] = ckpt.root
        _rewrite_record(output, record)
        return record
    encoder_path = ckpt.encoder_dir
    meta = read_image_encoder_meta(encoder_path)
    target = HFDecoder(target_path)
    identity = target.identity()
    problems, notes = provenance_check(meta, target, identity)
    if problems and not force:
        raise GraftingError("refusing to graft {} onto {}:\n  - {}\n(pass --force to graft anyway)".format(
            encoder_path, target_path, "\n  - ".join(problems)))
    vlm_cfg = VLMConfig(target.cfg, ClipVisionConfig.from_dict(meta["vision"]), meta["image_token_id"])
    record = {"encoder": os.path.abspath(encoder_path), "target": target.path, "forced": bool(problems and force),
              "problems": problems, "notes": notes, "encoder_trained_with": meta["trained_with"], "target_identity": identity}

    write_vlm_checkpoint(output, encoder_path, target_path, vlm_cfg, record, overwrite)
    return record
