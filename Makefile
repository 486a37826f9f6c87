# propetl — make help lists the targets.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PROFILE ?= cpu

.PHONY: help install link-data test lint check-wheel test-device-smoke test-full train reproduce-tables results tables device-reproduce device-results bench clean-outputs

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

install:  ## install torch (CPU wheel 2.13.0), propetl, its test tools, peft (method=peft) and the T5 metrics; link the local GLUE data
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,peers,t5]'
	@$(MAKE) --no-print-directory link-data

link-data:  ## link a local GLUE folder to data/glue ($$PROPETL_DATA_DIR or ../shared/data/glue)
	@bash scripts/link_data.sh

TEST_JOBS ?= 2
test:  ## the fast tier, what a developer runs in a loop: every test but the `slow` ones (real training runs, sweeps), TEST_JOBS (2) processes at a time (~3 min on 2 CPU cores)
	$(PYTHON) -m pytest -q -n $(TEST_JOBS) -m "not slow"

test-full:  ## the whole test suite, TEST_JOBS (2) processes at a time (pytest-xdist; ~8 min on 2 CPU cores): what CI runs
	$(PYTHON) -m pytest -q -n $(TEST_JOBS)

lint:  ## ruff check, ruff format --check and mypy on propetl/ (pyproject's [tool.ruff], [tool.mypy]; CI runs it)
	$(PYTHON) -m ruff check propetl
	$(PYTHON) -m ruff format --check propetl
	$(PYTHON) -m mypy propetl

check-wheel:  ## build the wheel, install it into a fresh venv, run --help, --config-dir and a 2-step training outside the checkout (CI)
	PYTHON=$(PYTHON) bash scripts/check_wheel.sh

test-device-smoke:  ## scripts/device_reproduce.sh --smoke: every part of the gpu plan end to end on this CPU, then the skips (CI; ~15 min)
	PROPETL_DEVICE_SMOKE=1 $(PYTHON) -m pytest -q tests/test_device_script.py -k smoke_runs_every_part -rP


train:  ## one run with the defaults (ProPETL-adapter on RTE); pass ARGS="task=mrpc prototype=lora"
	propetl-train $(ARGS)

reproduce-tables:  ## run the paper's experiments (PROFILE=cpu|gpu|paper), then `make tables`; re-run to continue
	$(PYTHON) scripts/reproduce.py --profile $(PROFILE)

results:  ## copy the small evidence of outputs/reproduce/$(PROFILE) (or SOURCE=folder) into results/$(PROFILE) and build its tables there
	$(PYTHON) scripts/collect_results.py --profile $(PROFILE) $(if $(SOURCE),--source $(SOURCE))

tables:  ## rebuild tables and plots from outputs/reproduce/$(PROFILE) into outputs/tables/$(PROFILE) (seconds)
	$(PYTHON) -m propetl.report.command outputs/reproduce/$(PROFILE) --out outputs/tables/$(PROFILE) --title "profile $(PROFILE)"

device-reproduce:  ## the gpu reproduction on a lent GPU in parts (PART="a1 a2" | a | all; SMOKE=1: every part briefly, on this CPU)
	bash scripts/device_reproduce.sh $(or $(PART),all) $(if $(SMOKE),--smoke)

device-results:  ## unpack a lent GPU's runs (ARCHIVE=.../gpu-runs.tar.gz) into outputs/, build results/gpu/, keep the archive there for the next loan
	$(PYTHON) scripts/pack_runs.py unpack $(ARCHIVE) outputs
	$(PYTHON) scripts/collect_results.py --profile gpu
	cp $(ARCHIVE) results/gpu/gpu-runs.tar.gz.tmp && mv results/gpu/gpu-runs.tar.gz.tmp results/gpu/gpu-runs.tar.gz

bench:  ## step-time benchmark: propetl against petl per prototype, and merged inference
	$(PYTHON) scripts/bench_step.py

clean-outputs:  ## delete everything under outputs/ (runs, sweeps, W&B offline runs)
	find outputs -mindepth 1 ! -name .gitignore -exec rm -rf {} +
