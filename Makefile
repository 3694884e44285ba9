# The two set-up commands of README.md. Each creates .venv on first use: torch==2.13.0 first
# (a CPU build; any other spec pulls a multi-GB CUDA build), then the project with its extras.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.snpo-installed
TSTAMP := $(VENV)/.snpo-test-installed

.PHONY: demo test test-slow lint install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# the test extras, and DeepSpeed for its CPU-rank tests: its setup imports torch, so it is
# built against the venv's torch (--no-build-isolation; in isolation pip would fetch another)
$(TSTAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-build-isolation "deepspeed>=0.16"
	touch $(TSTAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/snpo demo

test: $(TSTAMP)
	$(VENV)/bin/ruff check src tests bench tools
	$(PY) -m pytest -q -m "not slow"

test-slow: $(TSTAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
