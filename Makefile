# Two commands on a fresh machine: `make run` (proxy on its embedded defaults) and
# `make test` (installs what the tests need, then runs the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_PORT ?= 6080

.PHONY: run demo test lint bench system-deps novnc-npm

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,bench]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/twistd -n vncmux

# A local Xvnc desktop behind vncmux; prints the URL to open. Ctrl-C stops everything.
demo: $(STAMP)
	$(PY) scripts/demo.py --port $(DEMO_PORT)

system-deps:
	bash scripts/install-system-deps

# The latest noVNC from npm (pinned in the lock file) for the e2e tests of its core.
novnc-npm:
	npm ci --prefix tests/e2e/npm --no-audit --no-fund

test: system-deps novnc-npm $(STAMP)
	$(VENV)/bin/ruff check setup.py vncmux tests benchmarks twisted
	$(VENV)/bin/mypy vncmux
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/run.py
