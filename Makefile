# Quick start: `make demo` (set up, build the demo models, run the suite) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines: torch and torchvision must be a matching pair (transformers' Qwen2-VL processor needs torchvision).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo demo-models test lint gpu-test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,mlflow]"
	touch $@

# The random-weight tiny family the tests use (recipes.toml evaluates the trained one in examples/demo-family).
demo-models: setup
	$(PY) -m tools.make_demo --out demo

# The main job on the committed, trained demo family (tools/train_demo.py made it on a GPU).
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m orchestrator run recipes.toml

test: setup
	$(PY) -m pytest -q

# ruff, the type checker (pyproject's [tool.mypy]: contract, orchestrator, worker, tools, benchmarks) and the import rules
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The GPU acceptance suite (tests/gpu), on a machine with a CUDA GPU and flash-attn: writes .gpu-verified when it
# passes, to be committed beside the change it verified
gpu-test: setup
	$(PY) -m pytest -q -m gpu tests/gpu

clean:
	rm -rf $(VENV) demo runs
