# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS := $(VENV)/.peers

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# stempy and LiberTEM, the tools whose files the interoperability tests exchange
$(PEERS): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,peers]'
	touch $(PEERS)

demo: $(STAMP)
	$(BIN)/stemstream demo --out demo-out

test: $(PEERS)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(PEERS)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache
