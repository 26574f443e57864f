# Two entry points a new user needs: `make demo` and `make test`. Both build .venv first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
# The local torch wheel (no CUDA) lives here on our machines; pip uses it when present.
WHEELS  := $(wildcard /opt/wheels)
PIPOPTS := -q -c constraints.txt $(if $(WHEELS),--find-links $(WHEELS))

.PHONY: demo test install clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install $(PIPOPTS) --upgrade pip
	$(BIN)/python -m pip install $(PIPOPTS) -e ".[serve,test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/dgemma demo

# One pytest worker per core (pytest-xdist); each takes its share of torch's threads (tests/conftest.py).
test: install
	$(BIN)/python -m pytest -n auto --dist worksteal tests

bench: install
	$(BIN)/dgemma bench

clean:
	rm -rf $(VENV) build *.egg-info
