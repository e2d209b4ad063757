# A newcomer types `make demo` or `make test` on a fresh machine with Python 3.11.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-ray demo test lint bench clean

install: $(STAMP)
	@# put `datadistill` on the PATH when a user bin folder on it is writable (else: source .venv/bin/activate)
	@for d in "$$HOME/.local/bin" /usr/local/bin; do \
	  case ":$$PATH:" in *":$$d:"*) \
	    if [ -d "$$d" ] && [ -w "$$d" ]; then \
	      ln -sf "$(CURDIR)/$(BIN)/datadistill" "$$d/datadistill" && echo "datadistill -> $$d/datadistill"; break; \
	    fi;; \
	  esac; \
	done; true

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is needed, found {sys.version.split()[0]}; set PYTHON=/path/to/python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install-ray: install
	$(BIN)/pip install --quiet -e '.[dev,ray]'

demo: install
	$(BIN)/datadistill demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
