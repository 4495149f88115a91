# Two commands: `make demo` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-nodeps.txt | cksum | cut -d' ' -f1)
MODEL ?= $(or $(MONITOR_MODEL),embedded)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

PORT ?= 8501
# BUILD_ARGS: extra options for the background build of `make demo` (python -m precompute build --help),
# e.g. BUILD_ARGS="--profile full"
BUILD_ARGS ?=

.PHONY: setup browser postgres test demo trace build clean-data bench

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

## setup: the virtual environment with every dependency, and the embedded model converted once
setup: $(STAMP)
	$(PY) -m engine prepare --model $(MODEL)

## browser: Debian's chromium for the end-to-end test
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

## postgres: Debian's PostgreSQL server binaries (initdb, pg_ctl) for the Transluce importer's tests
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

## test: set up and run the whole suite
test: setup browser postgres
	$(PY) -m pytest

## trace: the engine's CLI trace on the headline prompt
trace: setup
	$(PY) -m engine trace --model $(MODEL) --prompt "Which is bigger: 9.8 or 9.11?" --top 20 --generate 24

## build: the neuron database for $(MODEL) (skips finished stages; resumes a killed build)
build: setup
	$(PY) -m precompute build --model $(MODEL)

## demo: set up, start (or resume) the database build in the background if the database is missing
## (a quick partial database first, then the full one), and open the dashboard on http://localhost:$(PORT)
## at once (pages pick each database up when it lands)
demo: setup
	-$(PY) -m precompute background --model $(MODEL) $(BUILD_ARGS)  # a failed start is reported; the dashboard opens anyway
	MONITOR_MODEL="$(MODEL)" $(PY) -m streamlit run dashboard/app.py --server.port $(PORT)

## bench: every benchmark, JSON on stdout
bench: setup
	$(PY) -m benchmarks.trace --json
	$(PY) -m benchmarks.precompute --json
	$(PY) -m benchmarks.dashboard --json
	$(PY) -m benchmarks.steering --json
	$(PY) -m benchmarks.importers --json

clean-data:
	rm -rf data/build data/*.duckdb data/*.duckdb.tmp data/*.duckdb.build.*
