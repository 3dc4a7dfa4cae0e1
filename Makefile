# Two commands do all set-up on a fresh machine with Python 3.10+ (see the README, Contributing):
#   make demo   - train a tiny agent with an expert, save, audit, load with the expert rebound, check it's exact
#                 (its own light .venv-demo: the package and its dependencies only, no dev toolchain)
#   make test   - lint (ruff), strict types (mypy), the docs (mkdocs build --strict) and the whole test suite (what .ci/run calls)
#   make test-min - the whole suite on the lowest versions pyproject.toml declares, on Python 3.10
#                   (constraints-min.txt; its own .venv-min; not in .ci/run: see docs/supported-versions.md)
#   make test-newest - save/load/audit/CLI/security tests on the newest release of everything, on Python 3.13
#                   (its own .venv-newest, nothing pinned; not in .ci/run: see docs/supported-versions.md)
#   make test-extras - each extra (contrib, remote, zoo, hub) installed alone in a fresh venv under .venv-extras/,
#                   then a smoke run of what it is for (tests/extras_smoke.py); before a release, not in .ci/run
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_VENV ?= .venv-demo
DEMO_STAMP := $(DEMO_VENV)/.installed-stamp

# pyenv keeps 3.10 out of PATH unless selected: use its interpreter directly when it is there
MIN_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10)
MIN_VENV ?= .venv-min
MIN_STAMP := $(MIN_VENV)/.installed-stamp
NEWEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
NEWEST_VENV ?= .venv-newest
NEWEST_STAMP := $(NEWEST_VENV)/.installed-stamp
#: what test-newest runs: save, load, audit, the CLI, the format and the hostile-input tests
NEWEST_TESTS ?= tests/test_roundtrip.py tests/test_scenario.py tests/test_audit.py tests/test_cli.py \
	tests/test_cli_safety.py tests/test_format_compat.py tests/test_bounds.py tests/test_security.py tests/security

#: the extras test-extras installs, one fresh venv each (the package as a user installs it, with that extra only);
#: for the lowest versions: make test-extras EXTRAS_PYTHON=$(MIN_PYTHON) EXTRAS_PIN="-c constraints-min.txt" EXTRAS="contrib remote hub"
#: (rl-zoo3 2.9 needs sb3-contrib >= 2.9.2); for the newest releases: EXTRAS_PYTHON=$(NEWEST_PYTHON) EXTRAS_PIN= (nothing pinned)
EXTRAS ?= contrib remote zoo hub
EXTRAS_DIR ?= .venv-extras
EXTRAS_PYTHON ?= $(PYTHON)
EXTRAS_PIN ?= -c constraints.txt

.PHONY: demo test test-min test-newest test-extras lint bench bench-quick clean

# _version.py too: the editable install's metadata carries the version (test_public_api checks it)
$(STAMP): pyproject.toml constraints.txt tests/resource_plugin/pyproject.toml src/sb3_safe_save/_version.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[contrib,remote,zoo,hub]" \
		pytest pytest-timeout pytest-xdist hypothesis mypy ruff matplotlib "moto[server]" transformers \
		mkdocs mkdocs-material "mkdocstrings[python]" mkdocstrings-python
	$(PY) -m pip install -q -c constraints.txt --no-deps -e tests/resource_plugin
	touch $(STAMP)

# torch 2.3.0 has no CPU-only wheel on PyPI: this pulls the CUDA build and its nvidia-* wheels (~2.8 GB)
$(MIN_STAMP): pyproject.toml constraints-min.txt tests/resource_plugin/pyproject.toml
	$(MIN_PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q -c constraints-min.txt -e ".[contrib]" \
		pytest pytest-timeout pytest-xdist hypothesis
	$(MIN_VENV)/bin/python -m pip install -q -c constraints-min.txt --no-deps -e tests/resource_plugin
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -n 2 -p no:cacheprovider

# Nothing pinned: pip takes the newest release of each (torch's CUDA build, ~3 GB with its nvidia-* wheels).
# Remove $(NEWEST_VENV) to move it to the releases of the day.
$(NEWEST_STAMP): pyproject.toml tests/resource_plugin/pyproject.toml
	$(NEWEST_PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install -q --upgrade -e ".[contrib]" pytest pytest-timeout pytest-xdist hypothesis
	$(NEWEST_VENV)/bin/python -m pip install -q --no-deps -e tests/resource_plugin
	touch $(NEWEST_STAMP)

test-newest: $(NEWEST_STAMP)
	$(NEWEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|stable.baselines3|sb3.contrib|gymnasium|numpy|pydantic|safetensors|xxhash|cloudpickle) '
	$(NEWEST_VENV)/bin/python -m pytest -n 2 -p no:cacheprovider $(NEWEST_TESTS)

# One after another (each venv holds torch); rebuilt every run, so nothing left from an earlier install helps.
# A constraints file pins what pip picks (torch stays the CPU wheel) but installs nothing: the venv holds only the
# package (a regular, non-editable install, as a user gets it) and what the extra declares.
test-extras:
	@set -e; for extra in $(EXTRAS); do \
		venv=$(EXTRAS_DIR)/$$extra; rm -rf $$venv; start=$$(date +%s); \
		echo "== [$$extra] fresh venv $$venv"; \
		$(EXTRAS_PYTHON) -m venv $$venv; \
		$$venv/bin/python -m pip install -q --upgrade pip; \
		$$venv/bin/python -m pip install -q $(EXTRAS_PIN) ".[$$extra]"; \
		$$venv/bin/python tests/extras_smoke.py $$extra; \
		echo "== [$$extra] installed and smoke-tested in $$(( $$(date +%s) - start )) s"; \
	done

# examples/demo.py imports the package, SB3, torch, gymnasium and numpy (all dependencies of the package) and
# examples/lang_dqn.py, next to it: nothing else
$(DEMO_STAMP): pyproject.toml constraints.txt src/sb3_safe_save/_version.py
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install -q -c constraints.txt -e .
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(DEMO_VENV)/bin/python examples/demo.py

test: lint
	$(PY) -m pytest -n 2

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) $(DEMO_VENV) $(MIN_VENV) $(NEWEST_VENV) $(EXTRAS_DIR) .pytest_cache .mypy_cache .ruff_cache site
