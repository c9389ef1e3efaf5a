# Two entry points, each self-contained on a fresh machine with python3, pip and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-gpu test-gpu-kernels test-gpu-suite train bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,hf]"
	touch $(STAMP)

# The whole suite on CPU; 8 fake devices are set up by tests/conftest.py.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

# On a GPU: the Triton-backend kernels compiled (the tests above run them in interpret mode), then
# the single-device tests with the GPU as jax's default backend (the pallas_gpu ops compiled; the
# pallas_tpu cases skip; parallel/ and train/ need the 8 fake CPU devices and stay on CPU).
# Needs a Python with jax[cuda] and the dev extras: GPU_PYTHON=...
GPU_PYTHON ?= $(BIN)/python
GPU_ENV := JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
GPU_WORKERS ?= 8
test-gpu: test-gpu-kernels test-gpu-suite
test-gpu-kernels:
	$(GPU_ENV) $(GPU_PYTHON) -m pytest -q -n $(GPU_WORKERS) --dist loadfile \
		tests/pallas_kernels/test_gpu_block_sparse_attention.py tests/pallas_kernels/test_gpu_decode_attention.py \
		tests/pallas_kernels/test_gpu_grouped_matmul.py tests/pallas_kernels/test_gpu_sparse_ffn.py
test-gpu-suite:
	$(GPU_ENV) $(GPU_PYTHON) -m pytest -q -n $(GPU_WORKERS) --dist loadfile \
		tests/ops tests/kv tests/moe tests/nn tests/masks tests/models

# The main job: Spark Transformer (spark-tiny) pretraining on the embedded stdlib corpus, then its
# dense twin on the same data; ends with a report (losses, sparsity, checkpoint and plot paths).
train: $(STAMP)
	$(BIN)/python -m train --preset spark-tiny --steps 500 --compare-dense

# Regenerates BENCHMARKS.md (CPU part; add --gpu on a machine with an H100).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.attention
	$(BIN)/python -m benchmarks.activation_sparsity
	$(BIN)/python -m benchmarks.moe
	$(BIN)/python -m benchmarks.kv_selection
	$(BIN)/python -m benchmarks.parallel
	$(BIN)/python -m train.eval

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
