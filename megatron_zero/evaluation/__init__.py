"""Benchmark evaluation with the released harnesses (no patched forks).

* :mod:`~megatron_zero.evaluation.text_model` -- a megatron_zero decoder (any checkpoint kind, TP/PP) that scores
  and greedily continues token sequences in batches; every rank runs the forward, results reach every rank.
* :mod:`~megatron_zero.evaluation.lm_eval_adapter` -- EleutherAI lm-evaluation-harness model ``megatron_zero``.
* :mod:`~megatron_zero.evaluation.vlm_adapter` -- lmms-eval model ``megatron_zero_vlm`` (images through our CLIP
  preprocessing; the paper's binary yes/no prompting for MME/POPE); its registration record is in
  :mod:`~megatron_zero.evaluation.lmms_registration`.
* :mod:`~megatron_zero.evaluation.suites` -- the paper's text suite (Table A.5 few-shot settings and metrics) and
  VLM suite (A.10), and the result tables.
* :mod:`~megatron_zero.evaluation.runner` -- loads a suite's tasks (failing fast when data is unavailable) and
  runs them through the harnesses; ``tools/evaluate.py`` is its command line.
"""
