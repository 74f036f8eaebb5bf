# `make repro` runs the pipeline, `make test` the tests; both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
# Stages run `python -m pipeline.<stage>`: put the venv first on PATH for DVC's shell.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup repro test lint clean

setup: $(VENV)/.installed plots/page.html

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip -q
	$(VENV)/bin/python -m pip install -r requirements-dev.txt
	touch $@

# `dvc plots show`'s page (.dvc/config names it) with the Vega libraries inlined, no CDN: they come
# from the vl-convert-python wheel that requirements.txt pins, so no Node.js is needed.
plots/page.html: pipeline/plots_page.py $(VENV)/.installed
	python -m pipeline.plots_page --out $@

repro: setup
	dvc repro

# pytest-xdist workers (one per core and one more: tests/conftest.py), each taking whole modules (their module fixtures set up once),
# longest first (tests/conftest.py). `python -m pytest tests/test_stages.py` runs in one process.
test: setup
	python -m pytest -n auto --dist loadfile --no-loadscope-reorder

lint: setup
	ruff check pipeline tests bench
	ruff format --check pipeline tests bench

clean:
	rm -rf data models reports mlflow.db mlartifacts
