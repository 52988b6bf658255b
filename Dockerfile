# GPU image: CUDA PyTorch base, the pinned stack, and flash-attn (the [gpu] extra).
#   docker build -t shearing .
#   docker run --gpus all -v /data:/data -v /models:/models shearing \
#       composer train.py yamls/pruning/llama2_7b_to_2.7b.yaml variables.source_model=/models/Llama-2-7b-hf ...
FROM pytorch/pytorch:2.7.0-cuda12.6-cudnn9-devel

ENV PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false
WORKDIR /workspace/shearing

RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install "setuptools<81" && pip install -e ".[gpu]" --no-build-isolation
COPY . .

CMD ["bash"]
