"""Multi-range / multi-translator surrogates, against the authors' ``build_surrogate_model`` run on real layers.

``_their_build_surrogate`` is their loop (``src/build_decoder.py``) over an ``nn.ModuleList`` whose layers know
their target index: rename the translator, ``pop(i)`` it from the range list, then remove the rest with their
running ``index_offset``. Our :func:`surviving_layers` must give the same surviving layers in the same order.
"""
import copy

import pytest
import torch

from megatron_zero.surrogate import surrogate_canonical, surrogate_config, surviving_layers


class _Layer(torch.nn.Module):
    def __init__(self, i):
        super().__init__()
        self.target_index = i


def _their_build_surrogate(num_layers, translators_range, num_translators):
    """Their algorithm, verbatim in structure; returns (target index of each surviving layer, translator ids)."""
    layers = torch.nn.ModuleList([_Layer(i) for i in range(num_layers)])
    translators = []
    translators_range = copy.deepcopy(translators_range)
    for range_idx, trans_range in enumerate(translators_range):
        trans_range.sort()
        index_offset = 0
        if range_idx > 0:
            index_offset += sum(len(translators_range[i]) for i in range(range_idx))
        for i in range(num_translators):
            translator_layer_id = trans_range[i]
            translators.append(layers[translator_layer_id - index_offset].target_index)  # rename: same layer
            trans_range.pop(i)
        for layer_id in trans_range:
            layers.pop(layer_id - index_offset)
            index_offset += 1
    return [m.target_index for m in layers], translators


def _their_optim_filter_ids(translators_range, num_translators):
    """train_llama.py::func_optim_filter's translator layer ids (surrogate indexing)."""
    ids = []
    for i, r in enumerate(translators_range):
        o = 0
        if i > 0:
            o += sum(len(translators_range[i]) for i in range(i)) - 1
        ids += [n - o for n in r[:num_translators]]
    return ids


CASES = [
    (28, [(16, 26)], 1),  # Llama-3.2-3B
    (32, [(17, 30)], 1),  # Llama-3.1-8B
    (80, [(40, 78)], 1),  # Llama-3.1-70B
    (80, [(16, 26), (40, 78)], 1),  # their comment's two-range example
    (10, [(1, 5)], 2),
    (24, [(2, 9), (12, 20)], 3),
    (30, [(1, 4), (8, 12), (15, 25)], 1),
]


@pytest.mark.parametrize("num_layers,ranges,k", CASES)
def test_surviving_layers_match_their_build_surrogate_model(num_layers, ranges, k):
    theirs, their_translators = _their_build_surrogate(num_layers, [list(range(s, e + 1)) for s, e in ranges], k)
    mapping, translators = surviving_layers(num_layers, ranges, k)
    assert mapping == theirs
    assert [mapping[j] for j in translators] == their_translators
    assert their_translators == [s + 2 * i for s, _ in ranges for i in range(k)]  # s, s+2, ...: their pop(i)
    # their optimizer filter finds these translators only for one range, or two ranges with one translator
    filt = _their_optim_filter_ids([list(range(s, e + 1)) for s, e in ranges], k)
    assert (filt == translators) == (len(ranges) == 1 or (len(ranges) == 2 and k == 1))


def test_70b_two_ranges_layer_names_and_errors():
    mapping, translators = surviving_layers(80, [(16, 26), (40, 78)])
    assert mapping == list(range(17)) + list(range(27, 41)) + [79] and translators == [16, 30]
    for ranges, k, message in [([(5, 9), (9, 12)], 1, "ascending and disjoint"), ([(3, 4)], 2, "need >= 3"),
                               ([(2, 9)], 0, ">= 1"), ([(70, 79)], 1, "L-1 = 79"), ([], 1, "at least one")]:
        with pytest.raises(ValueError, match=message):
            surviving_layers(80, ranges, k)
    with pytest.raises(IndexError):  # what their code does with too few layers for k translators
        _their_build_surrogate(80, [list(range(3, 5))], 2)


def _tiny():
    from megatron_zero.models.llama_config import LlamaConfig

    return LlamaConfig(num_layers=12, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=1,
                       vocab_size=16, max_position_embeddings=16, rope_theta=10000.0, rope_scaling_factor=None,
                       name="tiny")


def test_provenance_tensors_and_stage1_freezing_for_every_translator():
    from megatron_zero.checkpointing import hf_llama
    from megatron_zero.models.freezing import trainable_predicate

    cfg = _tiny()
    g = torch.Generator().manual_seed(0)
    canonical = {k: torch.randn(3, generator=g) for k in hf_llama.canonical_keys(cfg)}
    scfg, tensors = surrogate_canonical(cfg, canonical, ranges=[(1, 4), (6, 9)], num_translators=2,
                                        target_name="tiny")
    prov = scfg.surrogate
    assert prov["layer_map"] == [0, 1, 3, 5, 6, 8, 10, 11] and prov["translator_indices"] == [1, 2, 4, 5]
    assert prov["translator_ranges"] == [[1, 4], [6, 9]] and prov["num_translators"] == 2
    assert prov["stage1_trainable_layers"] == [1, 2, 4, 5] and scfg.num_layers == 8
    assert scfg.name == "tiny-T(1,4)+T(6,9)x2"
    for j, t in enumerate(prov["layer_map"]):
        assert torch.equal(tensors[f"decoder.layers.{j}.mlp.linear_fc1.weight"],
                           canonical[f"decoder.layers.{t}.mlp.linear_fc1.weight"])
    keep = trainable_predicate("stage1", scfg, num_encoder_layers=2)
    trained = [j for j in range(scfg.num_layers) if keep(f"language_model.decoder.layers.{j}.mlp.linear_fc1.weight")]
    assert trained == [1, 2, 4, 5]
    # single-range surrogates keep their provenance keys
    single = surrogate_config(cfg, 2, 9)
    assert single.surrogate["translator_index"] == 2 and single.surrogate["translator_indices"] == [2]
    assert single.surrogate["layer_map"] == [0, 1, 2, 10, 11]
