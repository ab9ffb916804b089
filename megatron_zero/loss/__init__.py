"""Training losses: the dynamic length-weighted loss of A.11 and the fused vocab-parallel weighted cross-entropy.

* :mod:`megatron_zero.loss.length_weighted` turns the responses of a global batch into per-token loss weights
  (``--loss-weighting {token-mean,length-weighted,length-weighted-released}``) and the global normaliser;
* :mod:`megatron_zero.loss.fused_cross_entropy` computes ``weight * CE / normaliser`` per token over a
  tensor-parallel shard of the vocabulary, with the compiled kernel from ``csrc/`` when it is available.
"""
