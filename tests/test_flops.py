"""FLOPs accounting matches an independent per-matrix count (Megatron-LM convention)."""
import pytest

from megatron_zero.models.llama_config import get_preset
from megatron_zero.training.flops import decoder_flops_per_step, mfu


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-70b", "tiny"])
def test_decoder_flops_match_matrix_count(name):
    c = get_preset(name)
    b, s = 4, 4096
    h, hd = c.hidden_size, c.head_dim
    macs_per_token_layer = (
        h * c.num_attention_heads * hd  # q
        + 2 * h * c.num_query_groups * hd  # k, v
        + c.num_attention_heads * hd * h  # o
        + 3 * h * c.ffn_hidden_size  # gate, up, down
        + 0.5 * 2 * s * c.num_attention_heads * hd  # QK^T and AV, causal half
    )
    macs = b * s * (c.num_layers * macs_per_token_layer + h * c.vocab_size)
    expected = 3 * 2 * macs  # fwd + 2x bwd, 2 FLOPs per MAC
    assert decoder_flops_per_step(c, b, s) == pytest.approx(expected, rel=1e-12)


def test_mfu():
    tflops, util = mfu(989.4e12 * 8 * 2.0, 2.0, 8, 989.4)
    assert tflops == pytest.approx(989.4) and util == pytest.approx(1.0)
