# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: demo test lint install clean

$(BIN)/pipeline: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ocr,local,ray]'
	touch $@

install: $(BIN)/pipeline

demo: install
	bash scripts/demo.sh

lint: install
	$(BIN)/ruff check pipeline stages tests bench scripts
	$(BIN)/ruff format --check pipeline stages tests bench scripts
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pipeline
