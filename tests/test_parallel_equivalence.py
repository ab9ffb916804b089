"""TP/PP/DP (and sequence parallel, uneven pipeline splits, tied embeddings, the interleaved schedule) match
TP=PP=DP=1.

One reference run in a world of one, then one 4-process torchrun that runs several layouts in turn:
logits, loss, grad norm, the loss after one AdamW step and the updated weights must all agree (fp32).
(tests/workers/parallel_equivalence.py, run in the launch the layout-equivalence tests share: the
``layout_checks`` fixture of tests/conftest.py.)
"""
from tests.conftest import layout_check_output


def test_parallel_layouts_match_single_process(layout_checks):
    layout_check_output(layout_checks, "parallel", "reference")
    out = layout_check_output(layout_checks, "parallel", "compare")
    assert "ALL LAYOUTS MATCH" in out, out[-4000:]
    # every layout was really exercised
    for layout in ("TP=2 PP=2 VPP=None DP=1 SP=False", "TP=1 PP=2 VPP=None DP=2", "TP=2 PP=1 VPP=None DP=2 SP=True",
                   "tied TP=2 PP=2", "TP=1 PP=2 VPP=2 DP=2"):
        assert layout in out
