"""Development tooling for megatron_zero, outside the core library: benchmarks, the GPU acceptance check and the
reliability trials. ``tools/*.py`` are thin command-line front ends over these modules; nothing in ``megatron_zero``
imports from here."""
