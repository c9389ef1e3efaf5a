# Two entry points, each self-contained on a fresh machine with python3, pip and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-gpu test-gpu-kernels test-gpu-ops train bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,hf]"
	touch $(STAMP)

# The whole suite on CPU; 8 fake devices are set up by tests/conftest.py.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

# The Triton-backend kernels compiled on a GPU (the tests above run them in interpret mode), and
# the ops that dispatch to them. Needs a Python with jax[cuda] and the dev extras: GPU_PYTHON=...
GPU_PYTHON ?= $(BIN)/python
GPU_ENV := JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false
test-gpu: test-gpu-kernels test-gpu-ops
test-gpu-kernels:
	$(GPU_ENV) $(GPU_PYTHON) -m pytest -q -n 4 --dist loadfile \
		tests/pallas_kernels/test_gpu_block_sparse_attention.py tests/pallas_kernels/test_gpu_decode_attention.py \
		tests/pallas_kernels/test_gpu_grouped_matmul.py tests/pallas_kernels/test_gpu_sparse_ffn.py
test-gpu-ops:
	$(GPU_ENV) $(GPU_PYTHON) -m pytest -q -n 4 -k pallas_gpu \
		tests/ops tests/nn

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
