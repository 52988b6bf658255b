# Set-up and the two commands from the README. `make test` and `make demo` install what they need first.
PYTHON_VERSION ?= 3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV = $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-gpu test lint format demo clean

install: $(STAMP)
	@echo "make install: $(VENV) is ready. Activate it once per shell: source $(VENV)/bin/activate"

# Re-install only when the dependency declaration changes; otherwise this is a no-op.
$(STAMP): pyproject.toml
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || \
		{ echo "make install: installing uv (python3 -m pip install uv)"; python3 -m pip install -q uv; }
	@test -x $(PY) || { echo "make install: creating $(VENV) (Python $(PYTHON_VERSION))"; \
		$(UV) venv -q -p $(PYTHON_VERSION) $(VENV); }
	@echo "make install: installing the pinned stack and shearing (editable, with the dev extra) into $(VENV);"
	@echo "              ~1-2 min on a fresh machine (torch, composer, llm-foundry, transformers, ...)"
	$(UV) pip install -p $(PY) --compile-bytecode -e '.[dev]'
	@touch $(STAMP)

# GPU machines: adds flash-attn (compiles against the installed torch; needs CUDA and a compiler).
install-gpu: install
	@echo "make install-gpu: adding flash-attn to $(VENV) (built against the installed torch, as in the Dockerfile)"
	$(UV) pip install -p $(PY) "setuptools<81" wheel packaging ninja
	$(UV) pip install -p $(PY) --no-build-isolation -e '.[dev,gpu]'

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check src tests data_prep bench train.py
	$(PY) -m ruff format --check src tests data_prep bench train.py

format: install
	$(PY) -m ruff format src tests data_prep bench train.py
	$(PY) -m ruff check --fix src tests data_prep bench train.py

# The whole pipeline on text that ships with the machine (CPU: ~4 min after install; DEVICE=gpu for a GPU, SCALE=4 for longer).
DEVICE ?= cpu
SCALE ?= 1
DEMO_DIR ?= demo_out
demo: install
	OMP_NUM_THREADS=$$(nproc) $(PY) -m shearing.demo --output $(DEMO_DIR) --device $(DEVICE) --scale $(SCALE)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
