# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv.
PYTHON ?= python3
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS := $(VENV)/.peers
# benchmarks run in their own environment: the peers (stempy, LiberTEM) are not runtime dependencies
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
RESULTS := benchmarks/results

.PHONY: demo test test-all bench clean system-packages

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# stempy and LiberTEM, the tools whose files the interoperability tests exchange, and the
# libraries the cross-checks compare with (tests/test_crosscheck.py)
$(PEERS): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,peers,dectris,crosscheck,deploy]'
	touch $(PEERS)

# Atomap (with hyperspy) for the slow refinement cross-check
ATOMAP := $(VENV)/.atomap
$(ATOMAP): $(PEERS)
	$(BIN)/pip install --quiet -e '.[crosscheck-atomap]'
	touch $(ATOMAP)

demo: $(STAMP)
	$(BIN)/stemstream demo --out demo-out

# Debian packages some tests need (.ci/system-packages.txt); as root they are installed
system-packages:
	bash .ci/install-system-packages

test: $(PEERS) system-packages
	$(BIN)/python -m pytest -m "not slow" -q --durations=25

test-all: $(PEERS) $(ATOMAP) system-packages
	$(BIN)/python -m pytest -q

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -e '.[peers,dectris]'
	touch $(BENCH_STAMP)

# the side-by-side suite (docs: BENCHMARKS.md); JSON in benchmarks/results, report section regenerated
bench: $(BENCH_STAMP)
	mkdir -p $(RESULTS)
	set -o pipefail; $(BENCH_VENV)/bin/python benchmarks/bench_peers.py --wait-for-load 1.0 \
	  --json $(RESULTS)/peers.json | tee $(RESULTS)/peers.md
	set -o pipefail; for b in storage streaming; do \
	  $(BENCH_VENV)/bin/python benchmarks/bench_$$b.py --json $(RESULTS)/$$b.json | tee $(RESULTS)/$$b.md; done
	set -o pipefail; $(BENCH_VENV)/bin/python benchmarks/bench_scaling.py --pipeline --json $(RESULTS)/scaling.json \
	  | tee $(RESULTS)/scaling.md
	set -o pipefail; $(BENCH_VENV)/bin/python benchmarks/bench_counting.py --json $(RESULTS)/counting.json \
	  | tee $(RESULTS)/counting.md
	$(BENCH_VENV)/bin/python benchmarks/bench_plot.py --results $(RESULTS)
	$(BENCH_VENV)/bin/python benchmarks/bench_report.py --results $(RESULTS) --report BENCHMARKS.md

clean:
	rm -rf $(VENV) $(BENCH_VENV) demo-out .pytest_cache
