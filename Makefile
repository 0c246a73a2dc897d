# Two commands do all the set-up: `make test` and `make demo` (see README.md).
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.lmk3d-installed
PYTEST_ARGS ?=
PORT ?= 8000

.PHONY: test demo env lint clean-env

env: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt scripts/setup_env.sh
	bash scripts/setup_env.sh

test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests apps
	$(VENV)/bin/mypy src

clean-env:
	rm -rf $(VENV)
