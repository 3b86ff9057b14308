# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv (or uses VENV=...), installs torch==2.13.0 only if no torch is importable
# there (so a CUDA build you installed is kept), then itreg with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.itreg-installed

.PHONY: demo test test-gpu test-slow lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[data,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/itreg demo -o demo-out --force

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not slow and not gpu" -q

test-gpu: $(STAMP)
	$(PY) -m pytest -m "gpu" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" -q

lint: $(STAMP)
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check src tests

# The side-by-side benchmark (never run by CI): itk-elastix goes into the main venv (it works
# with its numpy), ANTsPy into its own venv (antspyx pins numpy<2.4, scipy<1.16).
# Results in bench-out/ (results.md, results.json, results.png); BENCH_ARGS passes options.
ANTS_VENV ?= .venv-ants
BENCH_ARGS ?= --kinds affine,ffd --cases 3 --ffd-cases 1 --spacing 1

$(ANTS_VENV)/.bench-installed:
	test -x $(ANTS_VENV)/bin/python || $(PYTHON) -m venv $(ANTS_VENV)
	$(ANTS_VENV)/bin/python -m pip install antspyx SimpleITK
	touch $@

$(VENV)/.bench-installed: $(STAMP)
	$(PY) -m pip install itk-elastix
	touch $@

bench: $(VENV)/.bench-installed $(ANTS_VENV)/.bench-installed
	uptime
	$(PY) benchmarks/run.py --ants-python $(ANTS_VENV)/bin/python $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(ANTS_VENV) demo-out bench-out .pytest_cache
