# Every target installs what it needs first, so a fresh clone needs only:
#   make run    serve Ops-Core on 127.0.0.1:50051 with ./opscore.db
#   make test   lint, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
NODE_STAMP := node_modules/.installed-stamp

.PHONY: help install run test lint protos protos-check bench chaos clean postgres

help:
	@echo "make run          serve on 127.0.0.1:50051 (db ./opscore.db, text logs); installs first"
	@echo "make test         lint + full test suite; installs first (PostgreSQL too)"
	@echo "make lint         buf lint (STANDARD) on protos/, ruff on the code"
	@echo "make protos       regenerate generated/ from protos/"
	@echo "make bench        benchmarks (QUICK=1: a few minutes; SCENARIOS=soak,profile: a subset)"
	@echo "make chaos        SIGKILL the server N times under load, then verify (N=100)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NODE_STAMP): package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

install: $(STAMP)

# Development: text logs for people. `opscore serve` itself logs JSON (production);
# OPSCORE_LOG_FORMAT=json make run, or make run ARGS='--log-format json', for that.
run: $(STAMP)
	OPSCORE_LOG_FORMAT=$${OPSCORE_LOG_FORMAT:-text} $(VENV)/bin/opscore serve $(ARGS)

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

protos-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

lint: $(STAMP) $(NODE_STAMP)
	npx --no-install buf lint protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint postgres
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The PostgreSQL tests start a throwaway cluster of their own (tests/support/pg.py)
# with Debian's server binaries: initdb on the PATH or under /usr/lib/postgresql.
# Without them (and root), Debian's postgresql is installed; its own cluster is
# never used.
postgres:
	@if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq postgresql || (apt-get update -qq && apt-get install -y -qq postgresql); \
	  else \
	    echo "postgres: initdb not found and not root: install Debian's postgresql (apt-get install postgresql)"; \
	    exit 1; \
	  fi; \
	fi

BENCH_STAMP := $(VENV)/.bench-installed-stamp

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# The Celery baseline needs Debian's redis-server; without it (and not root) the
# report says so and every other scenario still runs.
bench: $(BENCH_STAMP)
	@if ! command -v redis-server >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq redis-server || (apt-get update -qq && apt-get install -y -qq redis-server)) \
	      || echo "bench: could not install redis-server: the Celery baseline will be skipped"; \
	  else \
	    echo "bench: redis-server missing and not root: the Celery baseline will be skipped"; \
	  fi; \
	fi
	$(PY) -m bench $(if $(QUICK),--quick,) $(if $(SCENARIOS),--scenarios $(SCENARIOS),)

# SIGKILL the server N times at random moments under load, then verify that
# nothing acknowledged was lost or accepted twice (docs/operations.md).
N ?= 100
chaos: $(STAMP)
	$(PY) -m bench.chaos --kills $(N)

clean:
	rm -rf $(VENV) node_modules build dist *.egg-info .pytest_cache .ruff_cache
