# Tested versions; override on the command line, e.g. `make test TORCH_VERSION=2.14.1`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TRANSFORMERS_VERSION ?= 5.24.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install train test test-slow style quality clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet "transformers==$(TRANSFORMERS_VERSION)" -e ".[dev]"
	touch $@

train: install
	$(BIN)/python scripts/train.py

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

style: install
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

quality: install
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
