"""megatron_zero: zero-shot vision encoder grafting via LLM surrogates, on megatron-core."""

__version__ = "0.1.0"
