# samtrain: two commands set everything up on a fresh machine.
#   make train   create .venv if needed, install, run the main job (short fine-tune on CPU)
#   make test    create .venv if needed, install with test extras, run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install install-dev train test lint bench sample-data clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps make the install idempotent: pip runs again only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

# The official sam2 package is a test oracle only (samtrain never imports it). Its sdist builds a
# CUDA extension unless told not to, and its build needs the installed torch, hence no isolation.
SAM2_ORACLE := sam2==1.1.0

$(VENV)/.installed-dev: pyproject.toml Makefile | $(PY)
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q setuptools wheel
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation "$(SAM2_ORACLE)"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

train: $(VENV)/.installed
	$(PY) train.py experiment=sample_cpu $(ARGS)

# Two pytest-xdist workers, a test file each at a time (TEST_WORKERS=0: one process, no workers).
TEST_WORKERS ?= 2

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed-dev
	$(PY) -m bench.run $(ARGS)
	$(PY) -m bench.official $(OFFICIAL_ARGS)
	$(PY) -m bench.official_sam2 --threads 1
	$(PY) -m bench.memory
	$(PY) -m bench.loader
	$(PY) -m bench.cached

sample-data: $(VENV)/.installed
	$(PY) scripts/make_sample_data.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
