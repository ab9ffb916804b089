"""Generation with the VLM: greedy/sampled decoding with a KV cache, and the binary yes/no mode."""
