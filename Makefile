# Two commands do all set-up on a fresh machine with Python 3.10+ (see README):
#   make demo   - train a tiny agent with an expert, save, audit, load with the expert rebound, check it's exact
#   make test   - lint (ruff), strict types (mypy) and the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt tests/resource_plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[contrib,remote]" \
		pytest pytest-timeout pytest-xdist hypothesis mypy ruff matplotlib "moto[server]" \
		transformers rl_zoo3 huggingface_hub
	$(PY) -m pip install -q -c constraints.txt --no-deps -e tests/resource_plugin
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: lint
	$(PY) -m pytest -n 2

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
