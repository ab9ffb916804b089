"""Prediction trajectory (Eq. 1-4) against an independent transformers computation; transition detection."""
import dataclasses
import json

import pytest
import torch

from megatron_zero.analysis.trajectory import detect_transition, position_kl


def test_position_kl_hand_computed():
    q = torch.tensor([0.2, 0.6, 0.2])
    p = torch.tensor([0.5, 0.25, 0.25])
    # normalised over positions: q -> [0.2, 0.6, 0.2], p -> [0.5, 0.25, 0.25]
    expected = 0.2 * torch.log(torch.tensor(0.2 / 0.5)) + 0.6 * torch.log(torch.tensor(0.6 / 0.25)) \
        + 0.2 * torch.log(torch.tensor(0.2 / 0.25))
    assert position_kl(q, p).item() == pytest.approx(expected.item(), rel=1e-6)
    # scaling either vector does not matter (normalised over positions); identical -> 0
    assert position_kl(3 * q, p).item() == pytest.approx(expected.item(), rel=1e-6)
    assert position_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)
    # clamping at 1e-6 keeps zeros finite
    assert torch.isfinite(position_kl(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])))


def test_detect_transition_rule():
    toy = [0.99, 0.52, 0.27, 0.14, 0.056, 0.013, 0.003, 0.0]  # the toy target of shared/notes
    assert detect_transition(toy) == 4
    # a bump after the first dip below the threshold moves the transition past the bump
    assert detect_transition([1.0, 0.05, 0.3, 0.02, 0.0]) == 3
    assert detect_transition([1.0, 0.5, 0.2], fraction=0.1) == 2  # never below: the last layer
    with pytest.raises(ValueError):
        detect_transition([1.0])


@pytest.fixture(scope="module")
def world_of_one():
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=3)


@pytest.mark.parametrize("metric", ["position-kl", "vocab-kl"])
def test_trajectory_matches_transformers_hidden_states(world_of_one, metric):
    import transformers

    from megatron_zero.analysis.trajectory import trajectory_kl
    from megatron_zero.checkpointing import hf_llama
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.models.llama_config import get_preset
    from megatron_zero.parallel import sharding

    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=250)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items()
                                         if k not in ("architectures", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    model = build_llama_model(cfg).eval()
    sharding.load_canonical(model, hf_llama.canonical_getter(ref.state_dict().__getitem__, cfg))
    tokens = torch.randint(0, 250, (3, 20), generator=torch.Generator().manual_seed(1))
    ours = trajectory_kl(model, tokens, cfg.vocab_size, metric)
    assert ours.shape == (3, cfg.num_layers)
    assert torch.allclose(ours[:, -1], torch.zeros(3), atol=1e-6)  # the last layer is the final prediction

    with torch.no_grad():
        out = ref(tokens, output_hidden_states=True)
    final_lp = torch.log_softmax(out.logits.float(), -1)[:, :-1]
    hs = out.hidden_states  # embeddings, layer 0 .. L-2 outputs, then norm(layer L-1 output)
    tgt = tokens[:, 1:].unsqueeze(-1)
    for layer in range(cfg.num_layers - 1):
        lp = torch.log_softmax(ref.lm_head(ref.model.norm(hs[layer + 1])).float(), -1)[:, :-1]
        if metric == "position-kl":
            q = lp.gather(-1, tgt).squeeze(-1).exp()
            p = final_lp.gather(-1, tgt).squeeze(-1).exp()
            q, p = (q / q.sum(-1, keepdim=True)).clamp(min=1e-6), (p / p.sum(-1, keepdim=True)).clamp(min=1e-6)
            expected = (q * (q / p).log()).sum(-1)
        else:
            expected = (lp.exp() * (lp - final_lp)).sum(-1).mean(-1)
        torch.testing.assert_close(ours[:, layer], expected, rtol=1e-4, atol=1e-5)


def test_analyze_trajectory_tool(tmp_path, world_of_one):
    """The CLI on an HF checkpoint and chat-formatted JSONL: JSON + PNG written, last layer 0, override works."""
    import transformers

    from tools import analyze_trajectory

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    from megatron_zero.data.tokenizers import WordTokenizer

    words = [f"w{i}" for i in range(200)]
    WordTokenizer(words).save(tmp_path / "ckpt" / "tokenizer.json")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}", "response": f"w{i + 3} w{i + 4}"})
                              for i in range(5)) + "\n" + json.dumps({"text": "w1 w2 w3 w4 w5 w6"}) + "\n")
    out = tmp_path / "out"
    assert analyze_trajectory.main(["--load-dir", str(tmp_path / "ckpt"), "--data", str(data), "--output-dir",
                                    str(out), "--transition-layer", "1"]) == 0
    result = json.loads((out / "trajectory.json").read_text())
    assert len(result["per_sample"]) == 6 and len(result["median"]) == 3
    assert result["median"][-1] == pytest.approx(0.0, abs=1e-6)
    assert result["transition_layer"] == 1 and "detected_transition_layer" in result
    assert (out / "trajectory.png").stat().st_size > 1000


def test_trajectory_tp2_pp2_matches_single_process(tmp_path):
    """Vocab-parallel softmax statistics and per-stage layers (final norm/output layer broadcast) under TP=2/PP=2
    give the single-process trajectory."""
    from tests.conftest import run_worker

    ref = str(tmp_path / "ref.pt")
    run_worker("trajectory_parallel.py", "--reference", ref)
    out = run_worker("trajectory_parallel.py", "--compare", ref, nproc=4)
    assert "MATCH" in out and "MISMATCH" not in out, out[-3000:]
