"""Data pipeline: tokenizers, chat templates, datasets, packing, sampling and image loading."""
