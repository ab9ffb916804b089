# Environment for NCCL on InfiniBand or AWS EFA clusters. Sourced by the launch scripts; override as needed.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}   # required for TP/SP comm overlap
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
if nvidia-smi -L >/dev/null 2>&1; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}  # CPU threads per GPU rank (data loading, host-side ops)
fi  # without a GPU torchrun gives each rank 1 thread: 8 per rank oversubscribes the cores and stalls every collective
if [ -d /opt/amazon/efa ]; then
  # AWS EFA (the paper trained Llama-70B on 128 A100s over EFA): libfabric provider + GPUDirect RDMA.
  export FI_PROVIDER=efa
  export FI_EFA_USE_DEVICE_RDMA=1
  export FI_EFA_FORK_SAFE=1
  export NCCL_PROTO=${NCCL_PROTO:-simple}
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
else
  # InfiniBand clusters: pick the HCAs and the bootstrap interface for your site.
  export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
fi
