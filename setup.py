"""megatron_zero: zero-shot vision encoder grafting via LLM surrogates, on megatron-core."""
import os

from setuptools import find_packages, setup

# Development and CI pin torch (2.13.0 is the CPU wheel our machines carry). GPU images (NVIDIA's PyTorch
# container) bring their own CUDA build: MEGATRON_ZERO_CONTAINER_TORCH=1 keeps it instead of replacing it.
TORCH = "torch>=2.4" if os.environ.get("MEGATRON_ZERO_CONTAINER_TORCH") == "1" else "torch==2.13.0"
CORE = [
    TORCH,
    "megatron-core==0.16.1",
    "safetensors>=0.4",
    "tiktoken>=0.7",
    "sentencepiece>=0.2",
    "Pillow>=10",
    "numpy>=1.26,<3",
    "psutil>=5.9",
    "tqdm>=4.66",
    "einops>=0.7",
    "matplotlib>=3.8",
    "pyyaml>=6",
    "tensorboard>=2.15",
    # sharded training data (tools/prepare_data.py, pretrain_vlm --data-path <shards>): pure Python
    "megatron-energon==7.4.1",
]
GPU = [
    # Present in NVIDIA's PyTorch container; listed for completeness on bare GPU hosts.
    # NVIDIA apex is built from source in the Dockerfile (no usable wheel on PyPI).
    "transformer-engine[pytorch]>=2.4",
    "flash-attn>=2.6",
    "nvidia-dali-cuda120>=1.40",
]
# filelock: lmms-eval 0.7.3's evaluator patches ``filelock._api.FileLockMeta``, which filelock 4 removed; virtualenv
# (a dev dependency) needs >= 3.24.2; torch, datasets and huggingface_hub accept any 3.x >= 3.10.
FILELOCK = "filelock>=3.24.2,<4"
DEV = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "ninja",  # JIT build of the CPU kernel extension in tests
    "ruff>=0.5",
    "transformers>=4.45",
    "llama-models==0.3.0",
    "scikit-image>=0.22",
    "lm-eval==0.4.13",
    FILELOCK,
]
# lmms-eval for the VLM suite. On CPU-only machines install it with torch pinned and then remove torchvision (PyPI's
# wheel is a CUDA build that cannot load beside CPU torch; lmms-eval works without it): `make install` does this.
EVAL = ["lm-eval==0.4.13", "lmms-eval==0.7.3", FILELOCK]
# DALI's CPU operators run without a GPU; the CUDA 13 wheel is the one verified on our CPU machines. (GPU images
# use the DALI that NVIDIA's container ships.)
DALI_CPU = ["nvidia-dali-cuda130==2.4.0"]


def _ext_modules():
    """The fused weighted cross-entropy kernel (``megatron_zero_kernels``), opt-in: MEGATRON_ZERO_BUILD_EXT=1.

    CUDA build (binding + CPU ops + the .cu kernel) when CUDA torch is present, else the CPU build. Without
    it, megatron_zero uses the equivalent PyTorch path. Tests JIT-build the CPU ops themselves.
    """
    if os.environ.get("MEGATRON_ZERO_BUILD_EXT", "0") != "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    csrc = os.path.abspath("csrc")
    sources = ["csrc/weighted_ce_binding.cpp", "csrc/weighted_ce_cpu.cpp"]
    if torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1":
        ext = cpp_extension.CUDAExtension(
            "megatron_zero_kernels", sources + ["csrc/weighted_ce_kernel.cu"],
            include_dirs=[csrc], define_macros=[("WITH_CUDA", None)],
        )
    else:
        ext = cpp_extension.CppExtension("megatron_zero_kernels", sources, include_dirs=[csrc])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(
    name="megatron_zero",
    version="0.1.0",
    description="Zero-shot vision encoder grafting via LLM surrogates, on megatron-core",
    packages=find_packages(include=["megatron_zero", "megatron_zero.*", "megatron_zero_dev", "megatron_zero_dev.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"gpu": GPU, "dev": DEV, "dali-cpu": DALI_CPU, "eval": EVAL},
    entry_points={
        # a tiny module on purpose: lmms-eval loads entry points while building its own registry
        "lmms_eval.models": ["megatron_zero_vlm = megatron_zero.evaluation.lmms_registration:model_manifest"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
