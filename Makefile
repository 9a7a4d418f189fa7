# The two commands of the README. Both create .venv and install into it when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make demo: the whole chain on the built-in synthetic dataset; results under demo-run/
demo: $(STAMP)
	$(BIN)/lungopacity demo --out demo-run

## make test: the test suite (tests that need ../shared/data skip when it is absent)
test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo-run .pytest_cache
