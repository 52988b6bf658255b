# Set-up and the two commands from the README. `make test` and `make demo` install what they need first.
PYTHON_VERSION ?= 3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV = $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test lint format demo clean

install: $(STAMP)

# Re-install only when the dependency declaration changes; otherwise this is a no-op.
$(STAMP): pyproject.toml
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv
	@test -x $(PY) || $(UV) venv -q -p $(PYTHON_VERSION) $(VENV)
	$(UV) pip install -q -p $(PY) --compile-bytecode -e '.[dev]'
	@touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check src tests data_prep bench train.py
	$(PY) -m ruff format --check src tests data_prep bench train.py

format: install
	$(PY) -m ruff format src tests data_prep bench train.py
	$(PY) -m ruff check --fix src tests data_prep bench train.py

demo: install
	@echo "make demo: the end-to-end demo (data -> source model -> prune -> export -> CPT -> report)"
	@echo "is not built yet; it arrives with the pipeline work (issue 4). Nothing was run." >&2
	@exit 2

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
