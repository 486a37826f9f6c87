# propetl — make help lists the targets.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PROFILE ?= cpu

.PHONY: help install link-data test test-fast train reproduce-tables results tables bench clean-outputs

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

install:  ## install torch (CPU wheel 2.13.0), propetl and its test tools; link the local GLUE data
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	@$(MAKE) --no-print-directory link-data

link-data:  ## link a local GLUE folder to data/glue ($$PROPETL_DATA_DIR or ../shared/data/glue)
	@bash scripts/link_data.sh

test:  ## the whole test suite (a few minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q

test-fast:  ## tests without the real training runs
	$(PYTHON) -m pytest -q -m "not slow"

train:  ## one run with the defaults (ProPETL-adapter on RTE); pass ARGS="task=mrpc prototype=lora"
	propetl-train $(ARGS)

reproduce-tables:  ## run the paper's experiments (PROFILE=cpu|gpu|paper), then `make tables`; re-run to continue
	$(PYTHON) scripts/reproduce.py --profile $(PROFILE)

results:  ## copy the small evidence of outputs/reproduce/$(PROFILE) into results/$(PROFILE) and build its tables there
	$(PYTHON) scripts/collect_results.py --profile $(PROFILE)

tables:  ## rebuild tables and plots from outputs/reproduce/$(PROFILE) into outputs/tables/$(PROFILE) (seconds)
	$(PYTHON) scripts/make_tables.py outputs/reproduce/$(PROFILE) --out outputs/tables/$(PROFILE) --title "profile $(PROFILE)"

bench:  ## step-time benchmark: propetl against petl per prototype, and merged inference
	$(PYTHON) scripts/bench_step.py

clean-outputs:  ## delete everything under outputs/ (runs, sweeps, W&B offline runs)
	find outputs -mindepth 1 ! -name .gitignore -exec rm -rf {} +
