# Two commands for a new user: `make demo` trains the embedded default on CPU, `make test` runs the suite.
# Both install from constraints.txt, the exact versions the suite is green with; `make lock` refreshes it.
VENV ?= .venv
PY := $(VENV)/bin/python
LLAUNCH := $(VENV)/bin/llaunch
PYTEST_ARGS ?=
# pytest-xdist processes for make test; tests/conftest.py says which tests each one takes.
TEST_WORKERS ?= 2
CONSTRAINTS ?= constraints.txt
PIP_CONSTRAINT_ARGS := $(if $(wildcard $(CONSTRAINTS)),-c $(CONSTRAINTS))

.PHONY: setup demo test lock
setup: $(VENV)/.installed

# torch is pinned first so pip takes the local CPU wheel where there is one (and a CUDA build elsewhere);
# deepspeed builds against that torch, hence --no-build-isolation.
$(VENV)/.installed: pyproject.toml $(wildcard $(CONSTRAINTS))
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel $(PIP_CONSTRAINT_ARGS)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,qlora,fp8]' $(PIP_CONSTRAINT_ARGS)
	$(PY) -m pip install -q --no-build-isolation 'deepspeed>=0.15' $(PIP_CONSTRAINT_ARGS)
	touch $@

demo: setup
	$(LLAUNCH) run examples/quickstart.yaml --output-dir runs/quickstart --overwrite
	$(LLAUNCH) generate --model runs/quickstart/final --prompt "def main(" --max-new-tokens 48

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The newest releases pyproject.toml allows, in a venv of their own; the suite must pass on them before
# constraints.txt is rewritten (a failing suite leaves it, and .venv, as they were).
lock:
	rm -rf .venv-lock
	$(MAKE) setup VENV=.venv-lock CONSTRAINTS=
	$(MAKE) test VENV=.venv-lock CONSTRAINTS=
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/pip freeze --all --exclude-editable | sed 's/+[a-z0-9.]*$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock
