"""Checkpoints: HF <-> canonical mappings, readers/writers, megatron torch_dist checkpoints."""
