"""Models: the Llama decoder on megatron-core GPTModel, the CLIP vision encoder, the adapter and the VLM."""
