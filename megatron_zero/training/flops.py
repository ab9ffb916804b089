"""Model FLOPs per training step in Megatron-LM's convention, and MFU.

Per token, per layer, for forward + backward (3x forward; 2 FLOPs per multiply-accumulate):

* attention projections, GQA-aware: ``12 h^2 r (1 + g/n)``  (r = n*head_dim/h; Q and O full, K and V g/n);
* attention scores and values, causal (halved): ``12 h^2 r (s/h) * 0.5``;
* SwiGLU MLP (three h x f matrices): ``12 h^2 (f/h) * 3/2``;
* logits: ``12 h^2 * V / (2 L h)`` per layer, i.e. ``6 h V`` per token in total.

This is the formula of Megatron-LM's ``num_floating_point_operations`` (and hence of Megatron-Bridge's
published throughput tables), so MFU numbers compare directly. Norms, RoPE, softmax and the loss are not
counted. The vision encoder's FLOPs can be added with :func:`vit_flops_per_image`.
"""
from __future__ import annotations

# Dense bf16 peak TFLOP/s per device (no sparsity), for MFU.
PEAK_TFLOPS = {
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "B200": 2250.0,
}


def decoder_flops_per_step(cfg, global_batch: int, seq_length: int, padded_vocab: int | None = None,
                           num_layers: int | None = None) -> float:
    """Training FLOPs of one step of ``global_batch`` sequences of ``seq_length`` tokens (LlamaConfig ``cfg``)."""
    L = cfg.num_layers if num_layers is None else num_layers
    h, n, g, f = cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
    V = padded_vocab or cfg.vocab_size
    r = n * cfg.head_dim / h
    per_layer = (
        (1 + g / n + (seq_length / h) * 0.5) * r  # attention: projections + causal scores
        + (f / h) * 1.5  # SwiGLU MLP
        + V / (2 * L * h)  # logits, spread over the layers
    )
    return 12.0 * global_batch * seq_length * L * h * h * per_layer


def decoder_training_flops(cfg, global_batch: int, seq_length: int, trainable_layers: int | None = None,
                           padded_vocab: int | None = None) -> float:
    """:func:`decoder_flops_per_step` with only ``trainable_layers`` of the decoder's layers trained (default: all).
    Frozen layers still pass gradients to what lies below them (the adapter, the encoder, a translator), so they do
    the forward and the input-gradient GEMMs but no weight-gradient GEMMs: 2x forward instead of 3x. (A stage that
    trains nothing below the decoder would need no backward at all; the paper's stages all do.)"""
    full = decoder_flops_per_step(cfg, global_batch, seq_length, padded_vocab)
    trainable = cfg.num_layers if trainable_layers is None else trainable_layers
    return full * (1 - (cfg.num_layers - trainable) / (3 * cfg.num_layers))


def vit_flops_per_image(num_layers: int, hidden: int, mlp: int, tokens: int, trainable_layers: int | None = None) -> float:
    """Encoder FLOPs per image, forward + backward (bidirectional attention, two-matrix GELU MLP).

    Frozen layers below the first trainable one need no backward: they cost 1x instead of 3x.
    """
    fwd_per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * mlp) + 4 * tokens * tokens * hidden
    trainable = num_layers if trainable_layers is None else trainable_layers
    return fwd_per_layer * (3 * trainable + (num_layers - trainable))


def mfu(flops_per_step: float, step_time_s: float, num_devices: int, peak_tflops: float) -> tuple[float, float]:
    """(achieved TFLOP/s per device, model FLOPs utilisation in [0, 1])."""
    tflops = flops_per_step / step_time_s / num_devices / 1e12
    return tflops, tflops / peak_tflops
