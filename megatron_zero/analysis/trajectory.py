"""The prediction trajectory of a decoder (paper Sec. 1.1, Eq. 1-4) and its transition point.

For tokens ``t`` (N of them) and the hidden state ``X_l`` after decoder layer ``l``::

    P   = softmax(norm(X_{L-1}) W^T)            (Eq. 1; norm = the model's final RMSNorm, W = output layer)
    p   = P[:-1, t[1:]]                          (Eq. 2; probability of the true next token, N-1 positions)
    q_l = softmax(norm(X_l) W^T)[:-1, t[1:]]     (Eq. 3; the final norm is applied to every layer's output)
    D_KL(q_l || p) = 1^T (q_l log(q_l / p))      (Eq. 4)

Eq. 4 compares *vectors over positions*, not distributions over the vocabulary. As in the authors' reference
implementation, ``q_l`` and ``p`` are first normalised over the positions (each sums to 1) and then clamped at
``1e-6``; the normalisation is done in log space (``softmax`` over positions of ``log q``), which is the same
``q / sum(q)`` without underflow. The last layer's KL is 0 by construction. ``metric="vocab-kl"`` gives the usual
logit-lens view instead: ``KL(softmax(norm(X_l) W^T) || P)`` over the full vocabulary, averaged over positions.

Parallelism (:class:`TrajectoryAnalyzer`): the same code runs in a world of one and under TP x PP (a 70B model is
analysed on 8+ GPUs). Forward hooks on this rank's decoder layers capture their outputs (``[s, b, h]``, sequence
first; gathered first under sequence parallelism). Every pipeline stage evaluates its own layers: the final norm
weight and this TP rank's output-layer shard (``V/tp`` rows) are broadcast *once* from the last stage along the
pipeline group, and the last layer's output ``X_{L-1}`` is broadcast per batch, so each stage also has ``P``.
Softmax statistics (max, sum of exponentials), the target token's logit (from the TP rank owning it) and the
vocab-KL sums are all-reduced over the TP group -- full-vocabulary logits are never gathered. Vocabulary rows past
the true vocabulary (TP padding) are excluded from every softmax. The per-layer results of all stages are summed
over the pipeline group, so every rank returns the whole ``[samples, layers]`` table.

Batches are right-padded; ``lengths`` says how many tokens of each row are real. Causal attention means a row
never sees the padding after it, and padded positions are left out of the normalisation and the sums, so a
sample's trajectory does not depend on the batch it is in.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_zero.parallel import vocab_parallel

EPS = 1e-6
METRICS = ("position-kl", "vocab-kl")
METRIC_DEFINITIONS = {
    "position-kl": "Eq. 4: sum over the N-1 positions of q_l log(q_l / p), where q_l / p are the probabilities of "
                   "the true next tokens under softmax(norm(X_l) W^T) / softmax(norm(X_{L-1}) W^T), each "
                   "normalised over positions (sums to 1) and clamped at 1e-6",
    "vocab-kl": "logit lens: KL(softmax(norm(X_l) W^T) || softmax(norm(X_{L-1}) W^T)) over the vocabulary, "
                "averaged over the N-1 positions",
}
TRANSITION_RULE = ("the layer nearest to where the median curve (its running maximum from the last layer back, drawn "
                   "as straight lines between layers) falls to {fraction} x its maximum for good")


def position_kl(log_q: torch.Tensor, log_p: torch.Tensor, mask: Optional[torch.Tensor] = None,
                eps: float = EPS) -> torch.Tensor:
    """Eq. 4 over the last dimension (positions), from log-probabilities ``log q_l`` and ``log p``.

    ``q`` and ``p`` are normalised over the positions where ``mask`` is True (all when None), clamped at ``eps``;
    masked positions contribute nothing.
    """
    if mask is not None:
        log_q = log_q.masked_fill(~mask, float("-inf"))
        log_p = log_p.masked_fill(~mask, float("-inf"))
    q = torch.softmax(log_q.double(), dim=-1).clamp(min=eps)
    p = torch.softmax(log_p.double(), dim=-1).clamp(min=eps)
    terms = q * (q / p).log()
    if mask is not None:
        terms = terms.masked_fill(~mask, 0.0)
    return terms.sum(-1).float()


def transition_crossing(median: Sequence[float] | torch.Tensor, fraction: float = 0.1) -> float:
    """Where the curve falls to ``fraction`` of its maximum for good, as a position in layers.

    The curve is taken as its running maximum from the last layer back (``max(m[l:])``, so a later bump above the
    line counts) and drawn as straight lines between layers, as in the plot; the crossing is the point where it
    reaches the line for the last time, e.g. ``4.16`` = 16% of the way from layer 4 to layer 5. A curve that
    never gets to the line gives the last layer.
    """
    m = torch.as_tensor(median, dtype=torch.float64)
    if m.dim() != 1 or len(m) < 2:
        raise ValueError("the transition needs a 1-D curve over at least 2 layers")
    if not 0 < fraction < 1:
        raise ValueError(f"the transition fraction must lie in (0, 1), got {fraction}")
    line = fraction * float(m.max())
    tail_max = torch.flip(torch.cummax(torch.flip(m, [0]), 0).values, [0])  # max of m[l:]
    below = torch.nonzero(tail_max <= line).flatten()
    if not len(below):
        return float(len(m) - 1)
    first = int(below[0])
    if first == 0:
        return 0.0
    above, under = float(tail_max[first - 1]), float(tail_max[first])  # above > line >= under
    return first - 1 + (above - line) / (above - under)


def detect_transition(median: Sequence[float] | torch.Tensor, fraction: float = 0.1) -> int:
    """The transition layer of a (median) trajectory: the layer nearest to :func:`transition_crossing`, where the
    curve falls to ``fraction`` of its maximum for good -- where the curves have coalesced and from then on only
    converge to the final prediction (the arrows of the paper's Fig. 3). Half way rounds up.

    Why the nearest layer and not the first layer under the line: the answer then changes only when the line
    passes half way between two layers, i.e. as far as it can be from both layers' values. A layer sitting just
    above or just below the line -- where float noise of another CPU or torch build decides which side it is
    on -- gives the same answer either way. Example: the median 0.291 0.205 0.126 0.074 0.031 0.019 0.007 ...
    (line 0.029) crosses at 4.16 and gives layer 4; with layer 4 at 0.028 instead it crosses at 3.98: layer 4.
    No rule that picks a layer is free of an edge: this one's is a crossing at x.5, which is why the crossing is
    reported beside the layer (``trajectory.json``, the demo's log).
    """
    return math.floor(transition_crossing(median, fraction) + 0.5)


# ---------------------------------------------------------------------------------------------------------
# The analyser
# ---------------------------------------------------------------------------------------------------------
class TrajectoryAnalyzer:
    """Per-layer divergence from the final prediction for batches of token sequences, on this rank's model chunk
    (a megatron-core ``GPTModel``; any TP x PP, no virtual stages). Every rank of the model-parallel group calls
    it with the same tokens; every rank gets the whole result."""

    def __init__(self, model, vocab_size: int):
        from megatron.core import parallel_state as ps

        from megatron_zero.parallel.sharding import layer_index_map

        config = model.config
        if config.normalization != "RMSNorm":
            raise ValueError(f"the trajectory analysis expects a Llama decoder (RMSNorm), got {config.normalization}")
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.num_layers = config.num_layers
        self.layers = [layer_index_map(model)[i] for i in range(len(model.decoder.layers))]
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.last_stage = ps.get_pipeline_model_parallel_last_rank()
        self.is_last = ps.is_pipeline_last_stage()
        self.sequence_parallel = config.sequence_parallel
        self.hidden = config.hidden_size
        self.eps = config.layernorm_epsilon
        self.device = next(model.parameters()).device
        self.dtype = config.params_dtype
        self.shard = model.vocab_size // ps.get_tensor_model_parallel_world_size()  # padded vocabulary / tp
        self.first = ps.get_tensor_model_parallel_rank() * self.shard
        self.valid = vocab_parallel.valid_ids(self.shard, self.first, vocab_size, self.device)
        self.norm_weight, self.output_weight = self._head(model)

    def _head(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm weight and this TP rank's output-layer rows, on every stage (from the last one)."""
        if self.is_last:
            norm = model.decoder.final_layernorm.weight.detach()
            out = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                   else model.output_layer.weight).detach()
        else:
            norm = torch.empty(self.hidden, dtype=self.dtype, device=self.device)
            out = torch.empty(self.shard, self.hidden, dtype=self.dtype, device=self.device)
        if self.pp > 1:
            norm, out = norm.contiguous(), out.contiguous()
            dist.broadcast(norm, src=self.last_stage, group=self.pp_group)
            dist.broadcast(out, src=self.last_stage, group=self.pp_group)
        return norm.float(), out.float()

    def _layer_outputs(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """``[s, b, h]`` output of each of this rank's decoder layers (pipeline forward, forward hooks)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        outs: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for layer in self.model.decoder.layers]
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).expand(b, -1)

        def forward_step(_data_iterator, model):
            return model(tokens, positions, None), lambda _out, non_loss_data=True: None

        try:
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]),
                                        model=[self.model], num_microbatches=1, seq_length=s, micro_batch_size=b,
                                        forward_only=True, collect_non_loss_data=True)
        finally:
            for h in hooks:
                h.remove()
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            outs = [gather_from_sequence_parallel_region(o, tensor_parallel_output_grad=False) for o in outs]
        return [o.detach() for o in outs]

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """``log softmax(norm(X) W^T)`` shard ``[b, s-1, V/tp]`` (positions that predict a next token)."""
        x = torch.nn.functional.rms_norm(hidden[:-1].float(), (self.hidden,), self.norm_weight, self.eps)
        return vocab_parallel.log_softmax(x @ self.output_weight.t(), self.valid, self.tp_group).transpose(0, 1)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, lengths: Optional[Sequence[int]] = None,
                 metric: str = "position-kl") -> torch.Tensor:
        """``[samples, layers]`` (float32, on every rank): each layer's divergence from the final prediction.

        ``tokens`` ``[b, s]`` right-padded, ``lengths`` the real tokens per row (default: all ``s``; >= 2).
        """
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        b, s = tokens.shape
        tokens = tokens.to(self.device)
        lengths = torch.as_tensor(lengths if lengths is not None else [s] * b, device=self.device)
        if int(lengths.min()) < 2 or int(lengths.max()) > s:
            raise ValueError(f"every sample needs 2 <= length <= {s} tokens, got lengths {lengths.tolist()}")
        mask = torch.arange(s - 1, device=self.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # [b, s-1]
        targets = tokens[:, 1:]
        hidden = self._layer_outputs(tokens)
        final = hidden[-1].float().contiguous() if self.is_last else torch.empty(s, b, self.hidden,
                                                                                  device=self.device)
        if self.pp > 1:
            dist.broadcast(final, src=self.last_stage, group=self.pp_group)
        final_lp = self._log_probs(final)
        log_p = vocab_parallel.pick(final_lp, targets, self.first, self.tp_group)
        if metric == "position-kl":
            del final_lp
        result = torch.zeros(b, self.num_layers, device=self.device)
        for layer, h in zip(self.layers, hidden):
            lp = self._log_probs(h)
            if metric == "position-kl":
                result[:, layer] = position_kl(vocab_parallel.pick(lp, targets, self.first, self.tp_group), log_p,
                                               mask)
            else:
                kl = vocab_parallel.kl(lp, final_lp, self.valid, self.tp_group).masked_fill(~mask, 0.0)
                result[:, layer] = kl.sum(-1) / mask.sum(-1)
        if self.pp > 1:
            dist.all_reduce(result, group=self.pp_group)  # each stage filled only its own layers
        return result.cpu()


def trajectory_kl(model, tokens: torch.Tensor, vocab_size: int, metric: str = "position-kl",
                  lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
    """One-off :class:`TrajectoryAnalyzer` call: ``[samples, layers]`` for ``tokens`` ``[b, s]``."""
    return TrajectoryAnalyzer(model, vocab_size)(tokens, lengths, metric)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Right-padded ``[b, max_len]`` tokens and the row lengths."""
    lengths = [len(r) for r in rows]
    out = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out, lengths
