"""TP/PP/DP (and sequence parallel, uneven pipeline splits, tied embeddings, the interleaved schedule) match
TP=PP=DP=1.

One reference run in a world of one, then one 4-process torchrun that runs several layouts in turn:
logits, loss, grad norm, the loss after one AdamW step and the updated weights must all agree (fp32).
"""
from tests.conftest import run_worker


def test_parallel_layouts_match_single_process(tmp_path):
    ref = str(tmp_path / "reference.pt")
    run_worker("parallel_equivalence.py", "--reference", ref)
    out = run_worker("parallel_equivalence.py", "--compare", ref, nproc=4)
    assert "ALL LAYOUTS MATCH" in out, out[-4000:]
    # every layout was really exercised
    for layout in ("TP=2 PP=2 VPP=None DP=1 SP=False", "TP=1 PP=2 VPP=None DP=2", "TP=2 PP=1 VPP=None DP=2 SP=True",
                   "tied TP=2 PP=2", "TP=1 PP=2 VPP=2 DP=2"):
        assert layout in out
