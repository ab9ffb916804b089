"""megatron_zero: zero-shot vision encoder grafting via LLM surrogates, on megatron-core."""

__version__ = "0.1.0"

from megatron_zero import platform as _platform  # noqa: E402

_platform.import_megatron_core()
