PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-local lint typecheck pytest bench demo clean

DEMO := bench/work
DEMO_MODEL := $(DEMO)/digits_cnn.pt
DEMO_DATA := $(DEMO)/digits_cnn_calib.npz

install: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,service]'
	$(BIN)/pip install -q -c constraints.txt -e ./client
	touch $(STAMP)

PACKAGES := mpq_core mpq_service api $(wildcard worker) client/mpq_client
SOURCES := $(PACKAGES) tests bench migrations

lint: install
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy $(PACKAGES)

pytest: install
	$(BIN)/pytest -q

test: lint typecheck pytest

# Only the tests that need no server (no Postgres, Redis, S3 or browser): engine work on a laptop.
test-local: install
	$(BIN)/pytest -q -m "not postgres and not redis and not s3 and not browser"

bench: install
	$(BIN)/python -m bench.run_all

# The main job end to end: train a small digits CNN (scikit-learn data, offline), save it as
# TorchScript, profile it, score its layers, allocate bits, then run the whole job (allocation,
# fine-tuning, evaluation, export) with `mpq quantize`. Then the same job through the service:
# `mpq serve` (API + worker, SQLite, files under bench/work/service) and its REST API.
demo: install
	$(BIN)/python -m bench.digits
	$(BIN)/mpq inspect $(DEMO_MODEL) --data $(DEMO_DATA)
	$(BIN)/mpq analyze $(DEMO_MODEL) --data $(DEMO_DATA) --out $(DEMO)/sensitivity.json
	$(BIN)/mpq allocate $(DEMO)/sensitivity.json --budget avg-bits=3 --pin 'conv1\.weight=8' \
		--out $(DEMO)/allocation.json
	$(BIN)/mpq quantize $(DEMO_MODEL) --data $(DEMO_DATA) --eval-data $(DEMO)/digits_cnn_test.npz \
		--budget avg-bits=2.5 --pin 'conv1\.weight=8' --finetune.epochs 10 --out-dir $(DEMO)/quantized
	$(BIN)/python -m bench.demo_client

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
