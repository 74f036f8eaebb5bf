# `make repro` runs the pipeline, `make test` the tests; both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
NPM ?= npm
# Stages run `python -m pipeline.<stage>`: put the venv first on PATH for DVC's shell.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup repro test lint clean

setup: $(VENV)/.installed plots/page.html

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip -q
	$(VENV)/bin/python -m pip install -r requirements-dev.txt
	touch $@

# `dvc plots show`'s page (.dvc/config names it) with the Vega libraries inlined, no CDN: `npm ci`
# installs exactly plots/package-lock.json's versions and checks their integrity hashes.
plots/node_modules/.package-lock.json: plots/package.json plots/package-lock.json
	cd plots && $(NPM) ci --ignore-scripts --no-audit --no-fund

plots/page.html: plots/node_modules/.package-lock.json pipeline/plots_page.py $(VENV)/.installed
	python -m pipeline.plots_page --modules plots/node_modules --lock plots/package-lock.json --out $@

repro: setup
	dvc repro

test: setup
	python -m pytest

lint: setup
	ruff check pipeline tests
	ruff format --check pipeline tests

clean:
	rm -rf data models reports mlflow.db mlartifacts
