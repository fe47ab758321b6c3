# Two commands for a new user: `make demo` trains the embedded default on CPU, `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
LLAUNCH := $(VENV)/bin/llaunch
PYTEST_ARGS ?=

.PHONY: setup demo test
setup: $(VENV)/.installed

# torch is pinned first so pip takes the local CPU wheel where there is one (and a CUDA build elsewhere);
# deepspeed builds against that torch, hence --no-build-isolation.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-build-isolation 'deepspeed>=0.15'
	touch $@

demo: setup
	$(LLAUNCH) run examples/quickstart.yaml --output-dir runs/quickstart --overwrite
	$(LLAUNCH) generate --model runs/quickstart/final --prompt "def main(" --max-new-tokens 48

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)
