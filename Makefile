# The two commands a user needs: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA ?= demo_data/synthetic
DEMO_RUNS ?= runs

.PHONY: setup demo test test-fast clean-demo

setup: $(STAMP)

# The stamp makes a second `make` install nothing; it is rebuilt when the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m launch.demo --data $(DEMO_DATA) --runs $(DEMO_RUNS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not distributed and not deepspeed" tests

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_RUNS)/demo_*
