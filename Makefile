# Two entry points for a fresh machine: `make book` (install + smoke book + HTML) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= smoke
STAMP := $(VENV)/.autorule-installed

.PHONY: setup book test lab clean-runs

setup: $(STAMP)

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
