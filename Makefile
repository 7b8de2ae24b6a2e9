# mura-tune: every target sets itself up on a fresh machine (creates .venv, installs the pinned set).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast bench bench-full gpu-check lint clean install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,export,mlflow]"
	touch $(STAMP)

## The main job on the embedded synthetic data (under 10 min on 2 cores, install aside): the default
## config trained once, a 4-minute TPE+ASHA search, its ensemble and report, then the three side by
## side on the same 1,199 test studies. DEMO_BUDGET sets the search's seconds.
DEMO_NAME := demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_BUDGET ?= 240
demo: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/mura-tune data summary --no-image-check
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/mura-tune train --set image_size=48 --out results/$(DEMO_NAME)-default
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/mura-tune --space custom_cnn --name $(DEMO_NAME) --time-budget $(DEMO_BUDGET)
	$(BIN)/mura-tune ensemble --experiment results/$(DEMO_NAME) --name $(DEMO_NAME)
	$(BIN)/mura-tune report --experiment results/$(DEMO_NAME) --ensemble ensembles/$(DEMO_NAME)
	$(BIN)/mura-tune compare results/$(DEMO_NAME)-default results/$(DEMO_NAME) ensembles/$(DEMO_NAME) \
		--names "default config" "search: best single" "search: ensemble"

## Whole test suite (slow tests included).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-full: $(STAMP)
	$(BIN)/python -m benchmarks.run --full

## On a CUDA machine: training, pretraining and a packed search really use the GPU (<= 5 min; else "skipped: no CUDA").
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(BIN)/python -m benchmarks.gpu_check --out benchmarks/gpu_check.json

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
