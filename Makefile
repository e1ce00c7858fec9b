# FedRef-Seg: two commands do all set-up -- `make demo` and `make test`.
# The virtualenv is (re)built only when pyproject.toml changes, so repeat runs start at once.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo_output
POC_DIR ?= poc_output
POC_ARGS ?=
PROJECT_YML ?= app/provision/project.yml
PROVISION_DIR ?= provision_workspace
JOBS_DIR ?= jobs

.PHONY: demo test test-fast lint install clean jobs poc provision bench mutation

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@# torch first and pinned: the CPU wheel; anything else would pull a multi-GB CUDA build
	@$(PY) -m pip install --quiet torch==2.13.0
	@$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fedseg.app demo --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q --durations=20

# ruff: the lint rules and the formatter configured in pyproject.toml (`ruff format .` applies the format)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

# Mutation score of the core modules with mutmut, each on its own unit tests (not part of `make test`; 35
# minutes on 2 busy CPU cores). Scores to bench/results/mutation.json; docs/testing.md explains the survivors.
mutation: $(STAMP)
	@$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install --quiet -e '.[test,mutation]'
	$(PY) -m bench.mutation $(MUTATION_ARGS)

# The demo's sites (made under $(DEMO_DIR) unless `make demo` already did); POC_ARGS adds options, e.g. --rounds 2.
poc: $(STAMP)
	$(PY) -m fedseg.app poc --out $(POC_DIR) --demo-dir $(DEMO_DIR) $(POC_ARGS)

# Each run writes the next prod_NN beside the earlier ones, with the same root CA and the same certificate
# for every participant already provisioned (FLARE keeps them in <workspace>/<project>/state).
provision: $(STAMP)
	$(VENV)/bin/nvflare provision --force -p $(PROJECT_YML) -w $(PROVISION_DIR)
	@echo "startup kits: $$(ls -dt $(PROVISION_DIR)/*/prod_* | head -n 1)/"

jobs: $(STAMP)
	$(PY) -m fedseg.jobs.export --out $(JOBS_DIR)

# Every benchmark in turn (about 1.8 hours on 2 CPU cores; each writes bench/results/<name>.json).
# The site, server and overhead measurements use the demo's sites and run, made first if missing.
bench: $(STAMP)
	@test -d $(DEMO_DIR)/workspace/fedseg_fedref || $(PY) -m fedseg.app demo --out $(DEMO_DIR)
	$(PY) -m bench.prep_speed --subjects 8
	$(PY) -m bench.site_cost --site $(DEMO_DIR)/sites/site-1
	$(PY) -m bench.server_cost --demo-run $(DEMO_DIR)/workspace/fedseg_fedref
	$(PY) -m bench.federation_overhead --data-root $(DEMO_DIR)/sites
	$(PY) -m bench.infer_speed
	$(PY) -m bench.gpu_step
	$(PY) -m bench.site_scale
	$(PY) -m bench.federation_scale
	$(PY) -m bench.communication
	$(PY) -m bench.convergence

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
