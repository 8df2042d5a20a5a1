# Everything runs in a virtual environment under .venv, made on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test typecheck bench clean

$(VENV)/.installed: setup.cfg setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

demo: $(VENV)/.installed
	$(PY) -m tools.demo

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# Static type check of dsss/ (settings in setup.cfg's [mypy]); CI runs it before the tests.
typecheck: $(VENV)/.installed
	$(PY) -m mypy

# The benchmark against Tahoe-LAFS (root, about 12 to 28 minutes; see docs/performance.md).
bench: $(VENV)/.installed
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
