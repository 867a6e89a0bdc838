# One command to run the server, one to run every test (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup run test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/bootstrap
	scripts/bootstrap "$(PYTHON)" "$(VENV)"
	touch $@

# The embedded server on 127.0.0.1:8080 with its data in ./postroom-data.
run: setup
	$(BIN)/postroom serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
