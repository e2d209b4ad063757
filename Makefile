# A newcomer types `make demo` or `make test` on a fresh machine with Python 3.10 or newer.
# Everything goes into .venv inside this clone (nothing outside it changes), with the versions that CI
# tests (constraints.txt). Python 3.11 is preferred when present: it is what CI runs.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet -c constraints.txt
VENV_STAMP := $(VENV)/.created
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev install-ray demo test lint clean

# the package and what it needs at run time, not the dev tools
install: $(RUN_STAMP)
	@echo "datadistill is in $(BIN)/; to put it on PATH: source $(VENV)/bin/activate  (or: export PATH=$(CURDIR)/$(BIN):\$$PATH)"

install-dev: $(DEV_STAMP)

install-ray: $(DEV_STAMP)
	$(PIP) -e '.[dev,ray]'

$(VENV_STAMP):
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), f"Python 3.10 or newer is needed, found {sys.version.split()[0]}; set PYTHON=/path/to/python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	@touch $@

$(RUN_STAMP): $(VENV_STAMP) pyproject.toml constraints.txt
	$(PIP) -e .
	@touch $@

$(DEV_STAMP): $(VENV_STAMP) pyproject.toml constraints.txt
	$(PIP) -e '.[dev]'
	@touch $@

demo: install
	$(BIN)/datadistill demo

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
