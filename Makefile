# Two commands on a fresh machine (see README.md):
#   make demo   create .venv, install the engine, run anomaly detection on the bundled sample
#   make test   create .venv if needed, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= uad-output
# test workers (pytest-xdist): one per core; each keeps torch on one thread (Testing/conftest.py)
TEST_WORKERS ?= auto

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
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile Testing

clean:
	rm -rf $(OUT) .pytest_cache
