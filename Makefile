# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv (or uses VENV=...), installs torch==2.13.0 only if no torch is importable
# there (so a CUDA build you installed is kept), then itreg with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.itreg-installed

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[data,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/itreg demo -o demo-out --force

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -q

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) demo-out .pytest_cache
