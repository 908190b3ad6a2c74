# Two commands on a fresh machine (see README.md):
#   make demo   create .venv, install the engine, run anomaly detection on the bundled sample
#   make test   create .venv if needed, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= uad-output
# TEST_WORKERS=N (or auto): run the suite on N pytest-xdist workers, whole test files each (torch on one thread
# in each, Testing/conftest.py); unset: one process (on the 2-vCPU CI machine two workers were not faster)
TEST_WORKERS ?=

.PHONY: demo test env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: env
	$(VENV)/bin/uad detect --sample --method disyre -o $(OUT)

test: env
	$(PY) -m pytest -q $(if $(TEST_WORKERS),-n $(TEST_WORKERS) --dist loadfile,) Testing

clean:
	rm -rf $(OUT) .pytest_cache
