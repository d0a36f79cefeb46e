# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch is pinned here so that a fresh machine does not pull
# several GB of CUDA packages; on a GPU machine: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0
# Test processes at once (pytest-xdist): most of the suite waits on SLURM, subprocesses and signals,
# so four fit on two cores; the end-to-end tests of each get a partition of the test cluster.
TEST_WORKERS ?= 4
BIN := $(VENV)/bin

.PHONY: demo test lint install flaky-check exit-check group-stop-check gpu-wheels gpu-check docs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	touch $@

demo: install
	$(BIN)/python -m tools.demo

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# The documentation site from docs/ into site/ (mkdocs-material; a broken link or anchor fails the build).
docs: install
	$(BIN)/python -m tools.generate_docs
	$(BIN)/mkdocs build --strict

# ruff (lint and format) and mypy, as configured in pyproject.toml; .ci/run runs it before the tests.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The tests that wait on time, signals, threads or SLURM, 5 runs in a row beside a busy process per
# core (tools/flaky_check.py); pass FLAKY="--runs 3 tests/e2e" for another selection.
flaky-check: install
	$(BIN)/python -m tools.flaky_check $(FLAKY)

# Finished runs that must exit 0, many times over (an abort at interpreter exit is rare): 200 runs of
# one process and 100 of 2 gloo ranks, each a forked child that ends through the interpreter's shutdown.
exit-check: install
	$(BIN)/python -m tests.integration.exit_repeat --runs 200 --workers 1
	$(BIN)/python -m tests.integration.exit_repeat --runs 100 --ranks 2

# A user's script with DataLoader workers (plain, persistent, StatefulDataLoader) stopped by SIGTERM to its
# whole process group at 3 points mid-epoch, 10 times each: every stop exits 75, nothing is left, results exact.
group-stop-check: install
	$(BIN)/python -m tests.integration.group_stop_repeat --runs 10

# The GPU kit (tools/gpu_kit.py). gpu-wheels, where PyPI can be reached: this project's wheel and what
# a CUDA image lacks, into .whl/. gpu-check, on a CUDA machine that has torch (no network needed):
# installs .whl/ beside its python3 without touching its torch, runs every CUDA check, writes a report.
gpu-wheels: install
	$(BIN)/python -m tools.gpu_wheels

GPU_SITE ?= /tmp/hydra-preempt-site
gpu-check:
	@ls .whl/*.whl >/dev/null 2>&1 || { echo "make gpu-check: no wheels in .whl/: run make gpu-wheels first, where PyPI can be reached" >&2; exit 2; }
	python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) .whl/*.whl
	PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1 python3 -m tools.gpu_kit $(GPU_KIT)
