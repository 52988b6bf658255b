# GPU image: the canonical profile (Python 3.11, torch 2.7.0, locks/py311-torch270.txt) plus flash-attn 2.8.3
# (the [gpu] extra), for H100/H200.
#   docker build -t shearing .
#   docker run --rm --gpus all shearing python -c "import shearing, flash_attn; print(flash_attn.__version__)"
#   docker run --gpus all -v /data:/data -v /models:/models shearing \
#       composer train.py yamls/pruning/llama2_7b_to_2.7b.yaml variables.source_model=/models/Llama-2-7b-hf ...
#
# The base image's Python lives in /opt/conda: Python 3.11 with torch 2.7.0+cu126, torchvision 0.22.0+cu126 and
# their CUDA 12.6 libraries (nvidia-*-cu12, triton 3.3.0), pip-installed from download.pytorch.org/whl/cu126;
# devel: nvcc 12.6 in /usr/local/cuda, for flash-attn's fallback build.
FROM pytorch/pytorch:2.7.0-cuda12.6-cudnn9-devel

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*

# What the steps below rely on; a base image that differs stops the build here, naming what it found.
RUN python -c "import sys, torch; \
found = (sys.version_info[:2], torch.__version__, torch.version.cuda, torch._C._GLIBCXX_USE_CXX11_ABI); \
assert found == ((3, 11), '2.7.0+cu126', '12.6', True), f'unexpected base image: {found}'"

# The locked set, hash-checked, on top of the image's torch. The lock pins torch==2.7.0 (PyPI's wheel, the
# same CUDA 12.6 build); the image has 2.7.0+cu126, which satisfies ==2.7.0 (PEP 440 ignores the local
# label), so pip keeps it instead of downloading a second 800 MB torch; likewise torchvision, triton and the
# nvidia-* libraries where the image's versions equal the lock's (they are torch 2.7.0's own pins). Those
# come from the image (not hash-checked, not re-downloaded); everything else is the lock's file, hash-checked.
# A venv over the image's site-packages (--system-site-packages) sees that torch, and pip installs every
# other pin into the venv, shadowing an image version that differs, so nothing conda installed is
# uninstalled or changed. --no-deps: the lock is complete; nothing outside it is installed.
RUN python -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv
WORKDIR /workspace/shearing
COPY locks/py311-torch270.txt locks/
RUN pip install --require-hashes --no-deps -r locks/py311-torch270.txt \
    && python -c "import torch; assert torch.__file__.startswith('/opt/conda/'), torch.__file__"

# flash-attn's setup.py imports torch, packaging and wheel, and builds with ninja (psutil sizes MAX_JOBS when
# unset), so it installs with --no-build-isolation after them. packaging and psutil are pinned in the lock
# (installed above); wheel and ninja are not, so they are pinned and hash-checked here (PyPI's files).
RUN printf '%s\n' \
        "wheel==0.45.1 --hash=sha256:708e7481cc80179af0e556bbf0cc00b8444c7321e2700b8d8580231d13017248" \
        "ninja==1.11.1.4 --hash=sha256:096487995473320de7f65d622c3f1d16c3ad174797602218ca8c967f51ec38a0" \
        > /tmp/build-tools.txt \
    && pip install --require-hashes --no-deps -r /tmp/build-tools.txt \
    && python -c "import packaging, psutil, wheel.bdist_wheel" && ninja --version

# flash-attn 2.8.3 is an sdist on PyPI (hash-checked). Its setup.py first downloads the prebuilt wheel from
# the v2.8.3 GitHub release named for this torch: flash_attn-2.8.3+cu12torch2.7cxx11abiTRUE-cp311-cp311-
# linux_x86_64.whl (torch major.minor, CUDA major of torch.version.cuda, C++11 ABI, Python tag; built by
# its CI against torch 2.7.1 and CUDA 12.9 for sm80/90/100/120), and compiles only when no such wheel exists
# (or FLASH_ATTENTION_FORCE_BUILD=TRUE). For that compile: FLASH_ATTN_CUDA_ARCHS=90 builds sm90 alone
# (H100/H200; its default 80;90;100;120 would also build sm80), MAX_JOBS parallel nvcc jobs of NVCC_THREADS
# threads, about 9 GB of RAM each (flash-attn's estimate): lower MAX_JOBS on a small builder.
ARG MAX_JOBS=4
ARG NVCC_THREADS=4
ENV FLASH_ATTN_CUDA_ARCHS=90
RUN echo "flash-attn==2.8.3 --hash=sha256:1e71dd64a9e0280e0447b8a0c2541bad4bf6ac65bdeaa2f90e51a9e57de0370d" \
        > /tmp/flash-attn.txt \
    && MAX_JOBS=${MAX_JOBS} NVCC_THREADS=${NVCC_THREADS} \
        pip install --require-hashes --no-deps --no-build-isolation -r /tmp/flash-attn.txt \
    && python -c "from importlib.metadata import version; assert version('flash-attn') == '2.8.3'"

# The project last (it changes most often): editable, so a mounted src/ is what runs.
COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
    && python -c "import shearing, composer, llmfoundry, transformers; print('shearing', shearing.__file__)"

CMD ["bash"]
