# Two commands do all the set-up on a fresh machine:
#   make demo   - a federated simulation on the bundled digits data (creates .venv first)
#   make test   - the import contracts (pyproject.toml) and the test suite (creates .venv first)
#   make test-fast - the same without the end-to-end tests marked slow (real processes, long runs)
# torch is installed as the pinned CPU wheel before the project, so nothing pulls CUDA packages.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test test-fast bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,dp,opacus]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/fedopt simulate --out runs/demo --overwrite
	@echo "fedopt is installed in $(VENV): run '. $(VENV)/bin/activate' to put it on your PATH"

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n 2 --durations=15

test-fast: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/sim_overhead.py

clean:
	rm -rf runs .pytest_cache
