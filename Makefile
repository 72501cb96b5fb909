# stock-monitoring-db: `make demo` to see it work, `make test` for everything CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
SCENARIOS := default adopt failing-migration no-psycopg2 cd-over-ssh
# Offline-built images by default; on a machine with a registry set these to the official images
# (postgres:15 and debian:bookworm), as the GitHub workflow does.
export MOLECULE_POSTGRES_IMAGE ?= stock-monitoring-db/postgres:15
export MOLECULE_DEPLOY_HOST_IMAGE ?= stock-monitoring-db/deploy-host:12

.PHONY: help setup host-deps servers lint unit pytest molecule images test demo demo-stop bench schema clean

help:
	@echo "make demo       throwaway PostgreSQL + deploy twice + verify (make demo-stop to end it)"
	@echo "make test       lint, pytest against real PostgreSQL, every Molecule scenario (what CI runs)"
	@echo "make unit       the tests that need no server (tests/unit), in seconds"
	@echo "make setup      the .venv with ansible, psycopg2 and the test tools"
	@echo "make schema     regenerate roles/stock_monitoring_db/files/schema.json after adding a migration"
	@echo "make servers    fetch the server binaries of the PostgreSQL majors the tests use (13 to 18)"
	@echo "make lint | pytest | molecule | bench | clean"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

host-deps:
	scripts/host-deps.sh

lint: setup host-deps
	ansible-lint
	yamllint --strict .
	ruff check .
	shellcheck scripts/*.sh .ci/run molecule/images/*.sh
	python scripts/lint-migrations.py
	python scripts/schema.py --check
	for module in library/*.py; do ansible-doc -M library "$$(basename "$$module" .py)" >/dev/null || exit 1; done
	scripts/validate-modules.sh
	zizmor --offline .github
	check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	check-jsonschema --builtin-schema vendor.github-actions .github/actions/*/action.yml

# The tests that need no server: planning, reading SQL, the .env, the outcome and report, schema comparison.
unit: setup
	python -m pytest -q tests/unit

# The server binaries of the other supported majors (and 13), fetched once into a cache (see scripts/pgcluster.py).
servers: setup
	python scripts/pgcluster.py fetch

# The whole suite on the machine's PostgreSQL major and, beside it on the second core, the tests that depend
# on the server (every_major) on each other supported major; `python -m pytest tests` runs both in one process.
pytest: setup host-deps servers
	@mkdir -p build; echo "pytest: the every_major tests on the other majors run beside, in build/pytest-majors.log"
	@python -m pytest -q tests --pg-majors=others > build/pytest-majors.log 2>&1 & majors=$$!; \
	trap 'kill $$majors 2>/dev/null' INT TERM; \
	python -m pytest -q tests --pg-majors=none; main=$$?; wait $$majors; others=$$?; \
	echo "pytest, the every_major tests on the other supported PostgreSQL majors:"; cat build/pytest-majors.log; \
	[ $$main -eq 0 ] && [ $$others -eq 0 ]

images:
	scripts/docker-up.sh
	scripts/build-images.sh

molecule: setup images
	@passed=0; failed=0; for scenario in $(SCENARIOS); do \
	  start=$$(date +%s); \
	  if molecule test -s $$scenario; then passed=$$((passed + 1)); result=passed; else failed=$$((failed + 1)); result=FAILED; fi; \
	  echo "molecule scenario $$scenario: $$result in $$(( $$(date +%s) - start )) s"; \
	done; echo "molecule: $$passed passed, $$failed failed"; [ $$failed -eq 0 ]

test: lint pytest molecule

demo: setup host-deps
	scripts/demo.sh start

demo-stop:
	scripts/demo.sh stop

bench: setup host-deps
	python scripts/bench.py $(BENCH)

schema: setup host-deps
	python scripts/schema.py

clean:
	-scripts/demo.sh stop
	rm -rf $(VENV) build .demo .pytest_cache .ruff_cache
