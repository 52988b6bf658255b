# Set-up and the two commands from the README. `make test` and `make demo` install what they need first.
#
# Two tested profiles, each installed from its own hashed lock file (locks/PROFILE.txt, made by `make lock`):
#   py311-torch270  Python 3.11 + torch 2.7.0: the canonical set (.venv); `make install`, `make test`
#   py312-torch211  Python 3.12 + torch 2.11.0 (the lent H200 image's): Composer/llm-foundry cap torch < 2.7.1, so
#                   torch is put under them with `uv pip compile --override`; `make test-torch211` runs a subset
PROFILE ?= py311-torch270
PYTHON_VERSION_py311-torch270 := 3.11
PYTHON_VERSION_py312-torch211 := 3.12
VENV_py311-torch270 := .venv
VENV_py312-torch211 := .venv-py312-torch211
PROFILES := py311-torch270 py312-torch211

PYTHON_VERSION ?= $(PYTHON_VERSION_$(PROFILE))
VENV ?= $(VENV_$(PROFILE))
LOCK := locks/$(PROFILE).txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV = $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Never download a Python: use one on this machine (PATH, then pyenv's versions).
export UV_PYTHON_DOWNLOADS ?= never

# The second profile's subset: the pipeline as the README runs it, parity with stock transformers, the masks'
# math and golden trace, multi-process (DDP/FSDP2, two nodes) and resume after SIGKILL.
TORCH211_TESTS ?= tests/test_pipeline_readme.py tests/models tests/pruning tests/test_golden_trace.py \
	tests/test_multiprocess.py tests/test_multinode.py tests/test_resume.py tests/test_distill.py

.PHONY: install install-gpu test test-torch211 lock lint format demo clean

install: $(STAMP)
	@echo "make install: $(VENV) ($(PROFILE)) is ready. Activate it once per shell: source $(VENV)/bin/activate"

# A Python of the profile's version already on the machine (uv's own search misses pyenv versions that are
# not active): python3.X on PATH, else pyenv's; empty when there is none (uv then says what it looked for).
find_python = $(shell for p in python$(1) $$(pyenv root 2>/dev/null)/versions/$(1).*/bin/python$(1); do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, "$(1)".split("."))))' 2>/dev/null \
	&& { command -v "$$p"; break; }; done)

# Re-install only when the lock file or the package declaration changes; otherwise this is a no-op.
$(STAMP): $(LOCK) pyproject.toml
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || \
		{ echo "make install: installing uv (python3 -m pip install uv)"; python3 -m pip install -q uv; }
	@test -x $(PY) || { echo "make install: creating $(VENV) (Python $(PYTHON_VERSION))"; \
		$(UV) venv -q -p $(or $(call find_python,$(PYTHON_VERSION)),$(PYTHON_VERSION)) $(VENV); }
	@echo "make install: installing $(LOCK) (every package pinned and hash-checked) and shearing (editable)"
	@echo "              into $(VENV); ~1-2 min on a fresh machine (torch, composer, llm-foundry, transformers, ...)"
	$(UV) pip sync -p $(PY) --compile-bytecode --require-hashes $(LOCK)
	$(UV) pip install -p $(PY) --no-deps -e .
	@touch $(STAMP)

# GPU machines: adds flash-attn (compiles against the installed torch; needs CUDA and a compiler).
install-gpu: install
	@echo "make install-gpu: adding flash-attn to $(VENV) (built against the installed torch, as in the Dockerfile)"
	$(UV) pip install -p $(PY) "setuptools<81" wheel packaging ninja psutil
	$(UV) pip install -p $(PY) --no-build-isolation --no-deps "flash-attn==2.8.3"

# One pytest-xdist worker per core, at most 4 (tests/conftest.py keeps the multi-process tests on one worker).
# nproc without OMP_NUM_THREADS, which it would otherwise report (this Makefile exports 1).
TEST_WORKERS ?= $(shell n=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1); \
	echo $$(( n < 4 ? n : 4 )))

test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-torch211:
	$(MAKE) --no-print-directory test PROFILE=py312-torch211 PYTEST_ARGS="$(TORCH211_TESTS) $(PYTEST_ARGS)"

# Re-resolve both lock files from pyproject.toml (needs the package index; review the diff, then run the tests).
lock:
	@for p in $(PROFILES); do \
		python_version=$$(case $$p in py311-*) echo 3.11;; py312-*) echo 3.12;; esac); \
		overrides=$$(test -f locks/overrides-$${p#*-}.txt && echo "--override locks/overrides-$${p#*-}.txt"); \
		echo "make lock: locks/$$p.txt (Python $$python_version $$overrides)"; \
		$(UV) pip compile -q pyproject.toml --extra dev --generate-hashes --python-version $$python_version \
			--python-platform x86_64-manylinux_2_28 $$overrides -o locks/$$p.txt || exit 1; \
	done

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
	rm -rf .venv .venv-py312-torch211 .pytest_cache build *.egg-info src/*.egg-info
