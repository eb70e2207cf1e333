# The few commands everyone uses. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines get the pinned CPU build of torch. GPU users: install a CUDA build into $(VENV)
# first (see README); the install step keeps any torch that is already there.
TORCH  ?= torch==2.13.0

.PHONY: install install-test demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	rm -rf runs/demo  # a fresh run each time (a run dir with checkpoints is only continued by --resume)
	$(VENV)/bin/hpcml train --out runs/demo

test: install-test
	$(VENV)/bin/pytest -q

lint: install-test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# the full suite (~10 min on 2 cores); writes benchmarks/results/bench-<host>-<date>.{json,md} + plots
bench: install
	$(VENV)/bin/hpcml bench --suite full --out benchmarks/results

clean:
	rm -rf runs build *.egg-info
