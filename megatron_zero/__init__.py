"""megatron_zero: zero-shot vision encoder grafting via LLM surrogates, on megatron-core.

Importing the package changes nothing in the process: entry points prepare megatron-core explicitly
(:func:`megatron_zero.platform.import_megatron_core`,
:func:`megatron_zero.platform.mcore_fixes.setup_megatron_core`)."""

__version__ = "0.1.0"
