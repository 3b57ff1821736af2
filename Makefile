# Every target installs into a local virtual environment first, so a fresh machine needs only python3 and make.
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= recipes/demo.yaml

.PHONY: install demo test test-fast lint ui clean
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/harness demo

# Two pytest-xdist workers: a test is mostly single-threaded Keras overhead and CLI start-ups (a serial run kept one
# of two cores busy: 22.5 CPU-minutes in 23.7), so two workers on 2 cores took the suite from 23:44 to 13:03.
test: install
	$(PY) -m pytest -q -n 2 --durations=15  # the slowest tests, to keep the suite under 20 minutes on 2 cores

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: install
	$(PY) -m pytest -q -n 2 -m "not slow"

ui: install
	$(VENV)/bin/harness ui

clean:
	rm -rf .harness .pytest_cache
