# Two commands for a fresh machine: `make run` and `make test`. Both need only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: run test lint browser bench clean

$(INSTALLED): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

run: $(INSTALLED)  ## API + worker + relay on embedded Redis/PostgreSQL (or REDIS_URL/DATABASE_URL)
	$(VENV)/bin/emp run

lint: $(INSTALLED)  ## style, and imports that point down the layers (.importlinter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

test: lint browser  ## the whole suite: real PostgreSQL, Redis and Celery workers
	$(PY) -m pytest

# The dashboard's browser test drives Debian's Chromium; install it when it is missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing Debian's chromium and chromium-driver for the dashboard's browser test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null \
	  || { $$SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
	       $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }; }

bench: $(INSTALLED)  ## throughput and latency beside a bare Celery baseline
	$(PY) -m bench

clean:
	rm -rf $(VENV) .emp test-artifacts
