# GPU image: NVIDIA's PyTorch container ships CUDA torch, Transformer Engine, apex, flash-attn and DALI.
#   docker build -t megatron_zero .
#   docker run --gpus all --ipc=host --rm -it megatron_zero make test
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    MEGATRON_ZERO_CONTAINER_TORCH=1 \
    MEGATRON_ZERO_BUILD_EXT=1

WORKDIR /workspace/megatron_zero
COPY . .

# Keep the container's CUDA torch/TE/apex/flash-attn/DALI; install the rest of megatron_zero's dependencies and
# build the fused loss kernel (CUDA extension). The container already provides NVIDIA apex, built from source.
RUN python -c "import torch, transformer_engine, flash_attn, nvidia.dali; print('torch', torch.__version__)" && \
    pip install --no-cache-dir -e '.[dev]' && \
    python -c "import megatron_zero_kernels" && \
    nvcc -c -std=c++17 -arch=sm_90 -Icsrc csrc/weighted_ce_kernel.cu -o /tmp/wce_sm90.o

CMD ["python", "-m", "pytest", "-q", "tests"]
