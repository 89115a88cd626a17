# Two commands for a newcomer: `make demo` runs the main job, `make test` the suite.
# Both start with `make setup`, which builds .venv/ once from pinned versions.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
SETUP_STAMP := $(VENV)/.setup-complete
DEMO_DIR := .demo
# The demo (edgellm-make-demo, edgellm_steps/workflow/demo_workdir.py) names its own targets.
DEMO := $(BIN)/edgellm-make-demo
SNAKEMAKE := $(BIN)/snakemake --snakefile $(CURDIR)/Snakefile --directory $(DEMO_DIR) --configfile $(DEMO_DIR)/config.yaml
export PATH := $(BIN):$(PATH)

.PHONY: setup demo test lint clean-demo cluster-deps

setup: $(SETUP_STAMP)

# The stamp is rebuilt only when the pins change, so a repeated `make setup` is instant.
# torch comes first and alone: the pinned CPU wheel; a plain `torch` would pull a CUDA build.
$(SETUP_STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $@

# The headline: a tiny Qwen2.5-VL quantized to fp8, its language model and vision encoder exported
# and verified, its accuracy report and Snakemake's report of it all (report.html in the work directory),
# then the plan of its engine target (both engines; building them needs a GPU host).
demo: setup
	$(DEMO) --workdir $(DEMO_DIR)
	$(SNAKEMAKE) --cores 2 $$($(DEMO) --targets build)
	$(SNAKEMAKE) --report report.html $$($(DEMO) --targets build)  # demo_workdir.DEMO_SNAKEMAKE_REPORT
	$(SNAKEMAKE) --dry-run $$($(DEMO) --targets engine)
	@echo
	$(DEMO) --workdir $(DEMO_DIR) --summary

# Test files run side by side (one file per worker at a time: module fixtures such as the Slurm cluster
# are set up once), handed out in tests/conftest.py's order, longest first (xdist would otherwise reorder
# them by test count); `make test PYTEST_WORKERS=0` runs them one after another.
PYTEST_WORKERS ?= auto
test: setup cluster-deps
	$(BIN)/python -m pytest -q --numprocesses $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The Slurm test starts a throwaway single-node cluster; as root, install its Debian packages.
cluster-deps:
	@if [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile rules/

clean-demo:
	rm -rf $(DEMO_DIR)
