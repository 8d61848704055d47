# Two commands from a fresh clone: `make demo` (the offline demo) and `make test` (the suite).
# Both create .venv on first use; torch is pinned by .ci/constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := .ci/constraints.txt
OUT ?= out/demo

.PHONY: demo test test-slow lint clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev,cluster]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python -m unlearn_core demo --out $(OUT)

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# the cases marked slow (a minute or more each on 2 cores), apart from the default suite
test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) out
