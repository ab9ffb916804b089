"""Prediction trajectory (Eq. 1-4) against an independent transformers computation (TP=1 and TP=2/PP=2), the
transition rule on synthetic curves, and the analysis tool end to end."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from megatron_zero.analysis.trajectory import detect_transition, position_kl, transition_crossing
from megatron_zero.errors import UserError
from tests.tiny_models import hf_causal_lm


def test_position_kl_hand_computed():
    q = torch.tensor([0.1, 0.3, 0.1])  # normalised over positions: [0.2, 0.6, 0.2]
    p = torch.tensor([0.4, 0.2, 0.2])  # -> [0.5, 0.25, 0.25]
    expected = 0.2 * math.log(0.2 / 0.5) + 0.6 * math.log(0.6 / 0.25) + 0.2 * math.log(0.2 / 0.25)
    assert position_kl(q.log(), p.log()).item() == pytest.approx(expected, rel=1e-6)
    assert position_kl(p.log(), p.log()).item() == pytest.approx(0.0, abs=1e-7)
    # a masked position is left out of the normalisation and the sum
    mask = torch.tensor([True, True, True, False])
    padded = position_kl(torch.tensor([0.1, 0.3, 0.1, 0.9]).log(), torch.tensor([0.4, 0.2, 0.2, 0.01]).log(), mask)
    assert padded.item() == pytest.approx(expected, rel=1e-6)
    # clamping at 1e-6 keeps a vanishing probability finite: q = [1 - 1e-6, 1e-6] (clamped), p = [1e-6, 1]
    zero = position_kl(torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0])).item()
    assert zero == pytest.approx((1 - 1e-6) * math.log((1 - 1e-6) / 1e-6) + 1e-6 * math.log(1e-6), rel=1e-5)


def test_detect_transition_on_synthetic_curves():
    # the paper's shape: a noisy plateau, an abrupt coalescence at layer 5, then monotone convergence
    curve = [2.0, 2.3, 1.9, 2.2, 2.1, 0.15, 0.1, 0.05, 0.02, 0.0]
    assert transition_crossing(curve) == pytest.approx(4 + (2.1 - 0.23) / (2.1 - 0.15))  # 4.96
    assert detect_transition(curve) == 5
    assert detect_transition(curve, fraction=0.03) == 7  # crosses 0.069 at 6.62
    # a bump after the first dip below the line moves the transition past the bump: max(m[l:]) is 0.3 up to
    # layer 2, crossing 0.1 at 2.71
    assert detect_transition([1.0, 0.05, 0.3, 0.02, 0.0]) == 3
    assert detect_transition([1.0, 0.5, 0.2]) == 2  # never at the line: the last layer
    assert detect_transition([1.0, 0.95, 0.15, 0.0]) == 2  # crosses at 2.33: the nearest layer, still above it
    assert detect_transition([1.0, 0.0, 0.0]) == 1  # crosses at 0.9
    with pytest.raises(ValueError):
        detect_transition([1.0])
    with pytest.raises(ValueError):
        detect_transition([1.0, 0.0], fraction=1.5)


# medians of the demo's target (examples/demo.py) from two versions of the code: layer 4 sits just above (0.031) or
# just below (0.029) the 10% line, the case on which the first-layer-under-the-line rule flipped between machines
DEMO_MEDIANS = ([0.291, 0.205, 0.126, 0.074, 0.031, 0.019, 0.007, 0.002, 0.0, 0.0, 0.0, 0.0],
                [0.294, 0.208, 0.067, 0.042, 0.029, 0.021, 0.008, 0.004, 0.0, 0.0, 0.0, 0.0])


def _first_under_the_line(curve, fraction=0.1):
    """The previous rule: the first layer from which the curve stays at or below the line."""
    tail = [max(curve[i:]) for i in range(len(curve))]
    return next(i for i, v in enumerate(tail) if v <= fraction * max(curve))


def test_transition_is_stable_under_small_perturbations_of_the_curve():
    """Each layer's value multiplied by its own random factor in [0.93, 1.07]: the transition layer of the demo's
    curves never changes, while the previous rule flips on both (from +-4% on), so the test tells the two apart."""
    gen = torch.Generator().manual_seed(0)
    for median in DEMO_MEDIANS:
        base = torch.tensor(median, dtype=torch.float64)
        answers, previous = set(), set()
        for _ in range(500):
            curve = base * (1 + 0.07 * (2 * torch.rand(len(base), generator=gen, dtype=torch.float64) - 1))
            answers.add(detect_transition(curve))
            previous.add(_first_under_the_line(curve.tolist()))
        assert answers == {4}
        assert previous == {4, 5}
    # in general the answer moves only where the crossing passes half way between two layers
    for _ in range(500):
        curve = torch.sort(torch.rand(10, generator=gen, dtype=torch.float64), descending=True).values
        curve[-1] = 0.0
        crossing = transition_crossing(curve)
        if abs(crossing - math.floor(crossing) - 0.5) > 0.1:
            noisy = curve * (1 + 1e-3 * (2 * torch.rand(10, generator=gen, dtype=torch.float64) - 1))
            assert detect_transition(noisy) == detect_transition(curve) == round(crossing)
        # and it stays within one layer of the first layer under the line (the paper's arrow)
        assert detect_transition(curve) in (_first_under_the_line(curve.tolist()) - 1,
                                            _first_under_the_line(curve.tolist()))


# ---------------------------------------------------------------------------------------------------------
# The independent reference: transformers' LlamaForCausalLM(output_hidden_states=True), one sample at a time
# ---------------------------------------------------------------------------------------------------------
def hf_trajectory(ref, sequences, metric: str) -> torch.Tensor:
    """``[samples, layers]`` from HF hidden states. hidden_states = (embeddings, outputs of layers 0..L-2,
    norm(output of layer L-1)): the last one is already normalised, the others get the final norm here."""
    rows = []
    with torch.no_grad():
        for ids in sequences:
            t = torch.tensor([ids])
            hs = ref(t, output_hidden_states=True).hidden_states
            num_layers = len(hs) - 1
            normed = [ref.model.norm(hs[i + 1]) for i in range(num_layers - 1)] + [hs[num_layers]]
            probs = [torch.softmax(ref.lm_head(x).double(), -1)[0, :-1] for x in normed]  # [N-1, V] each
            final = probs[-1]
            tgt = t[0, 1:].unsqueeze(-1)
            row = []
            for q_full in probs:
                if metric == "position-kl":
                    q, p = q_full.gather(-1, tgt).squeeze(-1), final.gather(-1, tgt).squeeze(-1)
                    q, p = (q / q.sum()).clamp(min=1e-6), (p / p.sum()).clamp(min=1e-6)
                    row.append(float((q * torch.log(q / p)).sum()))
                else:
                    row.append(float((q_full * (q_full.log() - final.log())).sum(-1).mean()))
            rows.append(row)
    return torch.tensor(rows)


def tiny_hf_reference(vocab_size: int = 250):
    from megatron_zero.models.llama_config import get_preset

    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=vocab_size)  # 250: padded at every TP size
    torch.manual_seed(0)
    ref = hf_causal_lm(cfg).eval()
    with torch.no_grad():  # larger logits than the default init: sharper, more distinct per-layer predictions
        ref.lm_head.weight.mul_(20)
    sequences = [torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                 for n in (20, 7, 13)]
    return cfg, ref, sequences


@pytest.fixture(scope="module")
def world_of_one():
    from megatron_zero.parallel.initialize import initialize_parallel

    initialize_parallel(1, 1, seed=3)


def test_trajectory_matches_transformers_hidden_states(world_of_one):
    """Padded batch (lengths 20, 7, 13) at TP=PP=1: both metrics equal the HF computation; last layer is 0."""
    from megatron_zero.analysis.trajectory import TrajectoryAnalyzer, pad_batch
    from megatron_zero.checkpointing import hf_llama
    from megatron_zero.models.llama import build_llama_model
    from megatron_zero.parallel import sharding

    cfg, ref, sequences = tiny_hf_reference()
    model = build_llama_model(cfg)
    sharding.load_canonical(model, hf_llama.canonical_getter(ref.state_dict().__getitem__, cfg))
    analyzer = TrajectoryAnalyzer(model, cfg.vocab_size)
    tokens, lengths = pad_batch(sequences)
    for metric in ("position-kl", "vocab-kl"):
        ours = analyzer(tokens, lengths, metric)
        expected = hf_trajectory(ref, sequences, metric)
        assert ours.shape == (3, cfg.num_layers)
        assert torch.all(ours[:, -1].abs() < 1e-6), ours  # the last layer is the final prediction
        assert expected[:, :-1].min() > 1e-3  # a real signal, not a comparison of zeros
        torch.testing.assert_close(ours, expected.float(), rtol=2e-4, atol=1e-5)
        # a sample's trajectory does not depend on the batch it is in
        alone = analyzer(torch.tensor([sequences[1]]), None, metric)
        torch.testing.assert_close(alone[0], ours[1], rtol=1e-5, atol=1e-6)


def test_trajectory_tp2_pp2_matches_transformers(tmp_path):
    """TP=2/PP=2 (4 processes): vocab-parallel softmax statistics, per-stage layers with the broadcast final norm
    and output layer, for both metrics, against the HF reference computed here."""
    from megatron_zero.checkpointing import hf_llama
    from tests.conftest import run_worker

    cfg, ref, sequences = tiny_hf_reference()
    getter = hf_llama.canonical_getter(ref.state_dict().__getitem__, cfg)
    torch.save({"cfg": cfg.to_dict(), "canonical": {k: getter(k) for k in hf_llama.canonical_keys(cfg)},
                "sequences": sequences,
                "expected": {m: hf_trajectory(ref, sequences, m) for m in ("position-kl", "vocab-kl")}},
               tmp_path / "ref.pt")
    out = run_worker("trajectory_parallel.py", str(tmp_path / "ref.pt"), nproc=4)
    assert "TRAJECTORY TP=2 PP=2 MATCH" in out, out[-3000:]


def _tiny_hf_checkpoint(path):
    from megatron_zero.data.tokenizers import WordTokenizer
    from tests.tiny_models import hf_llama

    hf_llama(seed=0, vocab_size=256, num_hidden_layers=3, max_position_embeddings=128).save_pretrained(path)
    WordTokenizer([f"w{i}" for i in range(200)]).save(path / "tokenizer.json")


def test_analyze_trajectory_tool(tmp_path, world_of_one, capsys):
    """The CLI on an HF checkpoint: chat records + raw text, teacher-forced and generated (A.7), both metrics;
    JSON + PNG, last layer 0, override, progress bar."""
    from tools import analyze_trajectory

    _tiny_hf_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"w{i} w{i + 1} w{i + 2}", "response": f"w{i + 3} w{i + 4}"})
                              for i in range(5)) + "\n" + json.dumps({"text": "w1 w2 w3 w4 w5 w6"}) + "\n")
    out = tmp_path / "tf"
    assert analyze_trajectory.main(["--load-dir", str(tmp_path / "ckpt"), "--data", str(data), "--output-dir",
                                    str(out), "--batch-size", "4"]) == 0
    assert "trajectory: 100%" in capsys.readouterr().out
    result = json.loads((out / "trajectory.json").read_text())
    assert len(result["per_sample"]) == 6 and len(result["median"]) == 3
    assert result["median"][-1] == pytest.approx(0.0, abs=1e-6)
    assert result["median"] == pytest.approx(np.median(result["per_sample"], axis=0).tolist(), rel=1e-6)
    assert result["transition_layer"] == result["detected_transition_layer"] == detect_transition(result["median"])
    assert result["transition_crossing"] == pytest.approx(transition_crossing(result["median"]))
    assert result["sample_record_index"] == list(range(6)) and min(result["sample_num_tokens"]) >= 2
    assert result["data"]["sha256"] and result["model"]["config"]["num_layers"] == 3
    assert (out / "trajectory.png").stat().st_size > 1000

    gen = tmp_path / "gen"
    assert analyze_trajectory.main(["--load-dir", str(tmp_path / "ckpt"), "--data", str(data), "--output-dir",
                                    str(gen), "--mode", "generated", "--max-new-tokens", "4", "--metric",
                                    "vocab-kl", "--transition-layer", "1", "--num-samples", "3"]) == 0
    result = json.loads((gen / "trajectory.json").read_text())
    assert result["transition_layer"] == 1 and result["transition_override"]
    assert len(result["per_sample"]) == 3 and all(1 <= n <= 4 for n in result["data"]["generated_tokens"])
    assert all(row[-1] == pytest.approx(0.0, abs=1e-6) for row in result["per_sample"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "x"}) + "\n")
    with pytest.raises(UserError, match="record 1: a record needs 'text'"):
        analyze_trajectory.main(["--load-dir", str(tmp_path / "ckpt"), "--data", str(bad), "--output-dir",
                                 str(tmp_path / "x")])
