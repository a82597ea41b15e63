# pdserve: `make serve` and `make test` work on a fresh machine (they install first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint typecheck unit bench protos clean

setup: $(STAMP)

# torch comes first through the constraints file: the pinned local CPU wheel, so that
# nothing later pulls a CUDA build. The project's own requirement stays a range.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

serve: setup
	$(BIN)/pdserve serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q

test: lint typecheck unit

# The API's Python stubs, generated into protos/ (tests/protos checks they are current).
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. protos/pdserve.proto

bench: setup
	$(BIN)/python -m bench.engine

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
