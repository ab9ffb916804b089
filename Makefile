# The README's two commands: `make demo` and `make test`. Both set up .venv from scratch if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint kernels-check gpu-check gpu-wheels clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,dali-cpu]'
	@# lmms-eval requires torchvision, whose PyPI wheel is a CUDA build that cannot load beside the CPU torch;
	@# lmms-eval works without it: install with torch pinned, then remove torchvision.
	echo "torch==2.13.0" > $(VENV)/torch-constraint.txt
	@# lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed (the pin is also in setup.py's extras)
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt lmms-eval==0.7.3 'filelock>=3.24.2,<4'
	$(PY) -m pip uninstall -y -q torchvision
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -rfEsx --durations=30 tests

demo: $(STAMP)
	$(PY) examples/demo.py

# Compile the CUDA kernel for Ampere and Hopper (nvcc needs no GPU): a broken kernel cannot land.
# torch's extension builds compile with these (torch.utils.cpp_extension.COMMON_NVCC_FLAGS): no implicit half casts
TORCH_NVCC_FLAGS := -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
	-D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
kernels-check:
	nvcc -c -std=c++17 -arch=sm_80 $(TORCH_NVCC_FLAGS) -Icsrc csrc/weighted_ce_kernel.cu -o /tmp/wce_sm80.o
	nvcc -c -std=c++17 -arch=sm_90 $(TORCH_NVCC_FLAGS) -Icsrc csrc/weighted_ce_kernel.cu -o /tmp/wce_sm90.o

# The GPU acceptance run (one H100/H200, <= 8 minutes): JSON + Markdown in gpu_check_results/, non-zero if a check
# fails (docs/gpu.md). On the project's GPU machine (no network, no megatron-core) first `make gpu-wheels` here.
gpu-check:
	tools/device_gpu_check.sh gpu_check_results

# The wheels the GPU machine lacks (tools/device_wheels.txt) for its Python 3.12, into wheels/cp312 (ignored by git;
# carried to the machine: docs/gpu.md). GPU_WHEEL_PY=3.11 fetches them for another Python.
GPU_WHEEL_PY ?= 3.12
gpu-wheels:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) tools/device_wheels.sh $(GPU_WHEEL_PY)

lint: $(STAMP)
	$(PY) -m ruff check megatron_zero tools tests examples

clean:
	rm -rf $(VENV) build *.egg-info
