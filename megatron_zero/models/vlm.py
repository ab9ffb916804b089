"""The VLM: CLIP encoder + adapter (+ start/end-of-image embeddings) + Llama decoder on megatron-core.

Input layout. A prompt carries one placeholder token per image. Before the model sees it, every placeholder is
widened to ``E`` positions (``E`` = :attr:`ImageEncoder.num_image_embeddings`: 579 by default, 576 for "llava")
by :func:`expand_image_placeholders`, which also pads every row to one fixed length (``--seq-length``; a
multiple of 16 with FP8) so that pipeline P2P shapes are static and RoPE covers the expanded length. The result
carries a boolean ``image_mask`` whose k-th run of ``E`` True positions (row-major) belongs to image k.

Forward on the first pipeline stage: the text embeddings come from the decoder's own (vocab-parallel) embedding;
the image embeddings overwrite exactly the ``image_mask`` positions; under sequence parallelism both are scattered
along the sequence first (``GPTModel`` takes a given ``decoder_input`` as is, already ``[s/tp, b, h]``). Later
stages receive hidden states and never build the encoder. Labels/loss masks are expanded consistently: image
positions carry no loss, except that the last image position carries the placeholder's (shifted) label.

Note: megatron-core's RoPE uses positions ``0..s-1`` of the (expanded, padded) row, or, for packed rows (THD
``packed_seq_params``), positions restarting at every ``cu_seqlens`` boundary; ``position_ids`` only matter for
learned absolute embeddings, which Llama does not have.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import torch

from megatron_zero.data.packing import IGNORE_INDEX, ExpandedBatch, PackedBatch
from megatron_zero.data.packing import expand_image_placeholders as _expand_packed
from megatron_zero.models.adapter import ImageEncoder, num_image_embeddings
from megatron_zero.models.clip_vit import ClipVisionConfig
from megatron_zero.models.llama import RuntimeOptions, build_llama_model
from megatron_zero.models.llama_config import LlamaConfig
from megatron_zero.models.sharded import ShardedStateDictMixin

VLM_CONFIG_FILE = "vlm_config.json"


@dataclasses.dataclass
class VLMConfig:
    """Decoder + encoder architecture and the image placeholder token id."""

    decoder: LlamaConfig
    vision: ClipVisionConfig
    image_token_id: int

    def __post_init__(self):
        if not 0 <= self.image_token_id < self.decoder.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the decoder vocabulary "
                             f"[0, {self.decoder.vocab_size})")

    @property
    def num_image_embeddings(self) -> int:
        return num_image_embeddings(self.vision)

    def to_dict(self) -> dict:
        return {"decoder": self.decoder.to_dict(), "vision": self.vision.to_dict(), "image_token_id": self.image_token_id}

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        return cls(LlamaConfig.from_dict(d["decoder"]), ClipVisionConfig.from_dict(d["vision"]), int(d["image_token_id"]))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "VLMConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ---------------------------------------------------------------------------------------------------------
# Placeholder expansion
# ---------------------------------------------------------------------------------------------------------
def expand_image_placeholders(
    input_ids: Sequence[Sequence[int]],
    labels: Optional[Sequence[Sequence[int]]],
    loss_mask: Optional[Sequence[Sequence[bool]]],
    image_token_id: int,
    num_image_embeddings: int,
    seq_length: Optional[int] = None,
    pad_id: int = 0,
    pad_to_multiple_of: int = 1,
) -> ExpandedBatch:
    """Widen every ``image_token_id`` of each (unpacked) sample to ``num_image_embeddings`` positions.

    ``labels``/``loss_mask`` are per position and already shifted (``labels[i]`` is predicted at position ``i``;
    ``None`` = no loss anywhere). Rows are right-padded to ``seq_length`` when given (an expanded sample longer
    than that is an error), else to the longest row rounded up to ``pad_to_multiple_of``. Returns the data
    module's :class:`ExpandedBatch` (``input_ids``, ``labels``, ``loss_mask``, ``image_mask``, ``position_ids`` ...);
    a text-only sample simply has no image positions. The expansion itself is
    :func:`megatron_zero.data.packing.expand_image_placeholders` (one sample per row), so training and
    generation lay images out identically.
    """
    rows = [torch.as_tensor(list(x), dtype=torch.long) for x in input_ids]
    if not rows:
        raise ValueError("expand_image_placeholders: empty batch")
    width = max(len(r) for r in rows)
    shape = (len(rows), width)
    tokens = torch.full(shape, pad_id, dtype=torch.long)
    lab = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.bool)
    seg = torch.full(shape, -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        tokens[i, :n], seg[i, :n] = r, 0
        if labels is not None:
            if len(labels[i]) != n:
                raise ValueError(f"sample {i}: {len(labels[i])} labels for {n} tokens")
            lab[i, :n] = torch.as_tensor(list(labels[i]), dtype=torch.long)
        if loss_mask is not None:
            if len(loss_mask[i]) != n:
                raise ValueError(f"sample {i}: {len(loss_mask[i])} loss-mask entries for {n} tokens")
            mask[i, :n] = torch.as_tensor(list(loss_mask[i]), dtype=torch.bool)
    packed = PackedBatch(tokens, lab, mask, seg, image_paths=[], sample_ids=[[str(i)] for i in range(len(rows))])
    expanded = _expand_packed(packed, image_token_id, num_image_embeddings, pad_id, pad_to_multiple_of)
    longest = int((expanded.segment_ids >= 0).sum(1).max())
    if seq_length is not None:
        if longest > seq_length:
            raise ValueError(f"a sample is {longest} positions long after image expansion "
                             f"({num_image_embeddings} per image), more than --seq-length {seq_length}")
        if seq_length % pad_to_multiple_of:
            raise ValueError(f"--seq-length {seq_length} must be a multiple of {pad_to_multiple_of} (FP8 needs 16)")
        expanded = _expand_packed(packed, image_token_id, num_image_embeddings, pad_id, seq_length)
    return expanded


def image_start_positions(image_mask: torch.Tensor, num_image_embeddings: int) -> torch.Tensor:
    """``[num_images, 2]`` (row, first position) of each image's run in ``image_mask``, in image order."""
    rows, cols = torch.nonzero(image_mask, as_tuple=True)
    if len(rows) % num_image_embeddings:
        raise ValueError(f"image_mask has {len(rows)} image positions, not a multiple of {num_image_embeddings}")
    return torch.stack([rows[::num_image_embeddings], cols[::num_image_embeddings]], dim=1)


def splice_image_embeddings(text_embeddings: torch.Tensor, image_embeddings: Optional[torch.Tensor],
                            image_mask: Optional[torch.Tensor], sequence_parallel: bool = False) -> torch.Tensor:
    """Decoder input ``[s(/tp), b, h]``: ``text_embeddings`` with the ``image_mask`` positions replaced by the
    image embeddings (``[n, E, h]``, image k into the k-th run of ``E`` positions, row-major).

    ``image_mask`` is ``[b, s]`` over the full sequence; under sequence parallelism ``text_embeddings`` is this
    rank's ``[s/tp, b, h]`` slice and the image tensor is scattered the same way.
    """
    n_pos = 0 if image_mask is None else int(image_mask.sum())
    n_img = 0 if image_embeddings is None else image_embeddings.shape[0] * image_embeddings.shape[1]
    if n_pos != n_img:
        raise ValueError(f"the batch has {n_pos} image positions but {n_img} image embeddings were computed "
                         f"(does every image placeholder have an image, and vice versa?)")
    if n_pos == 0:
        return text_embeddings
    b, s = image_mask.shape
    h = text_embeddings.shape[-1]
    full = image_embeddings.new_zeros(b, s, h).masked_scatter(image_mask[..., None], image_embeddings.to(
        text_embeddings.dtype).reshape(-1, h))
    full = full.transpose(0, 1).contiguous()  # [s, b, h]
    mask = image_mask.transpose(0, 1).contiguous()[..., None]  # [s, b, 1]
    if sequence_parallel:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

        full = scatter_to_sequence_parallel_region(full)
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        mask = mask.chunk(tp, dim=0)[rank]
    return torch.where(mask, full, text_embeddings).contiguous()  # P2P sends need contiguous tensors


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class VisionLanguageModel(ShardedStateDictMixin, torch.nn.Module):
    """This rank's part of the VLM: ``vision`` (:class:`ImageEncoder`, first pipeline stage only) and
    ``language_model`` (megatron-core ``GPTModel``). Exposes what megatron's schedules and DDP look for
    (``config``, ``model_type``, ``set_input_tensor``, ``pre_process``/``post_process``, the shared
    embedding)."""

    def __init__(self, cfg: VLMConfig, opts: Optional[RuntimeOptions] = None, vp_stage: Optional[int] = None,
                 pre_process: Optional[bool] = None, post_process: Optional[bool] = None):
        super().__init__()
        opts = opts or RuntimeOptions()
        self.cfg = cfg
        self.language_model = build_llama_model(cfg.decoder, opts, vp_stage, pre_process, post_process)
        self.config = self.language_model.config
        self.pre_process = self.language_model.pre_process
        self.post_process = self.language_model.post_process
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights
        self.model_type = self.language_model.model_type
        self.vision = None
        if self.pre_process:
            from megatron_zero import platform

            self.vision = ImageEncoder(cfg.vision, cfg.decoder.hidden_size, opts.tensor_model_parallel_size,
                                       opts.params_dtype, opts.bf16, opts.use_te, opts.initialize_weights)
            if platform.HAVE_CUDA:
                self.vision.cuda(torch.cuda.current_device())

    @property
    def num_image_embeddings(self) -> int:
        return self.cfg.num_image_embeddings

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, images: Optional[torch.Tensor],
              image_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The decoder input ``[s(/tp), b, h]`` (first stage only)."""
        text = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        image_embeddings = None
        if images is not None and len(images):
            image_embeddings = self.vision(images)
        elif torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters()):
            # A text-only micro-batch still sends a (zero) gradient to every trainable encoder/adapter parameter:
            # with --overlap-grad-reduce, megatron's DDP starts a bucket's reduction only once each of its
            # parameters has seen a gradient in the last micro-batch.
            c, size = self.cfg.vision.num_channels, self.cfg.vision.image_size
            dummy = self.vision(text.new_zeros(1, c, size, size))
            text = text + 0.0 * dummy.sum().to(text.dtype)
        return splice_image_embeddings(text, image_embeddings, image_mask, self.config.sequence_parallel)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                images: Optional[torch.Tensor] = None, image_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, inference_context=None, runtime_gather_output=None,
                packed_seq_params=None):
        """Logits ``[b, s, vocab/tp]`` (or per-token losses with ``labels``) on the last stage, else hidden states.

        ``input_ids``/``image_mask`` ``[b, s]`` are the *expanded* rows; ``images`` ``[n, C, H, W]`` in placeholder
        order (row-major). Only the first stage uses ``images``/``image_mask``. Packed rows come flattened to
        ``[1, rows * seq]`` with megatron's THD ``packed_seq_params`` (see
        :mod:`megatron_zero.training.vlm_batches`).
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, position_ids, images, image_mask)
        return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, inference_context=inference_context,
                                   runtime_gather_output=runtime_gather_output, packed_seq_params=packed_seq_params)


def build_vlm(cfg: VLMConfig, opts: Optional[RuntimeOptions] = None, vp_stage: Optional[int] = None,
              pre_process: Optional[bool] = None, post_process: Optional[bool] = None) -> VisionLanguageModel:
    """This rank's VLM chunk (parallel state must be initialised)."""
    return VisionLanguageModel(cfg, opts, vp_stage, pre_process, post_process)


def build_vlm_chunks(cfg: VLMConfig, opts: Optional[RuntimeOptions] = None) -> list[VisionLanguageModel]:
    """All chunks of this rank (one per virtual pipeline stage); only the very first holds the encoder."""
    opts = opts or RuntimeOptions()
    vpp = opts.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [build_vlm(cfg, opts)]
    return [build_vlm(cfg, opts, vp_stage=i) for i in range(vpp)]


# ---------------------------------------------------------------------------------------------------------
# Canonical weights
# ---------------------------------------------------------------------------------------------------------
def load_vlm_canonical(model: VisionLanguageModel, encoder, decoder, source: str = "checkpoint") -> None:
    """Load canonical encoder tensors (dict or getter; ``None`` keeps the encoder as is) and canonical decoder
    tensors into this rank's chunk, sharding for its TP rank."""
    from megatron.core import parallel_state as ps

    from megatron_zero.parallel import sharding

    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    if model.vision is not None and encoder is not None:
        sharding.load_canonical(model.vision, encoder, rank, size, source=f"{source} (encoder)")
    sharding.load_canonical(model.language_model, decoder, rank, size, source=f"{source} (decoder)")


def encoder_canonical_state(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """The canonical encoder tensors (TP-gathered) on the ranks that hold the encoder (collective over TP)."""
    from megatron.core import parallel_state as ps

    from megatron_zero.parallel import sharding

    if model.vision is None:
        return {}
    return {k: v.detach().cpu().clone()
            for k, v in sharding.iter_canonical(model.vision, ps.get_tensor_model_parallel_group())}
