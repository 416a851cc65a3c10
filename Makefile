# The two commands: `make demo` (one whole interaction on simulated hardware)
# and `make test`. Both set up what is missing first.
SHELL := /bin/bash
VENV := .venv
export HEIMDALL_MODELS_DIR ?= $(abspath $(firstword $(wildcard ../shared/models) $(HOME)/.local/share/heimdall-edge/models))
export HEIMDALL_STATE_DIR ?= $(abspath .state)
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test bench report models clean pi-check

setup:
	@scripts/bootstrap.sh

models: setup
	@test -d "$(HEIMDALL_MODELS_DIR)" || $(VENV)/bin/python scripts/fetch-models --dest "$(HEIMDALL_MODELS_DIR)"

demo: models
	$(VENV)/bin/heimdall-edge demo $(DEMO_ARGS)

# Tests in parallel, one worker per core, a file's tests on one worker (so a module's
# fixtures, the soak's run among them, are made once), then the time-boxed chaos runs
# (marked serial) alone. Exit code 5 is pytest's "no test selected": PYTEST_ARGS picked
# none of that part.
TEST_WORKERS ?= auto
test: setup
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile -m "not serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(VENV)/bin/pytest -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: models
	$(VENV)/bin/python -m bench.latency
	$(VENV)/bin/python -m bench.fallback
	$(VENV)/bin/python -m bench.sync

report: models
	$(VENV)/bin/python -m bench.report

# Proof on ARM: install and run the appliance in an emulated aarch64 Debian root
# (docs/PI.md). Needs root; tens of minutes; not part of `test` nor of .ci/run.
pi-check:
	scripts/pi-check $(PI_CHECK_ARGS)

clean:
	rm -rf .state .pytest_cache
