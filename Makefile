# Two commands do all the set-up: `make train` and `make test` create .venv if it is missing.
# torch==2.13.0 is installed first, on its own: pip then takes the CPU wheel and never pulls a CUDA build.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.saelab-installed
# pytest-xdist processes for `make test` (auto: one per core); TEST_WORKERS=0 runs the tests in one process.
TEST_WORKERS ?= auto

.PHONY: train test lint env clean-env

train: $(STAMP)  ## run the main job (offline default: ReLU SAE on MiniLM); extra overrides via ARGS="..."
	$(VENV)/bin/saelab-train $(ARGS)

test: $(STAMP)  ## run the test suite (offline, CPU)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e ".[dev,demo,sweep,s3]"
	touch $(STAMP)

clean-env:
	rm -rf $(VENV)
