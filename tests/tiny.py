"""Helpers for tests: real text from the Python install, tiny random HF LLaMA checkpoints."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512  # the tiny named shapes' vocabulary
SEQ_LEN = 64
# prune_tiny's target from the tiny GQA source (8 heads over 4 KV groups): named shape tiny_gqa_pruned.
TINY_TARGET = {
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
}


def stdlib_files(limit: int = 80) -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]


def write_raw_corpus(root: Path, budget: int = 150_000) -> Path:
    """Two real-text domains as ``root/code.jsonl`` (stdlib sources) and ``root/docs.jsonl`` (their docstrings)."""
    root.mkdir(parents=True, exist_ok=True)
    code, docs = [], []
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="ignore")
        if sum(map(len, code)) < budget:
            code.append(text)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and ast.get_docstring(node):
                docs.append(ast.get_docstring(node))
    for name, texts in (("code", code), ("docs", docs)):
        with open(root / f"{name}.jsonl", "w") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    return root


# The tiny random HF checkpoints' config (named shape tiny_gqa, 256 positions).
TINY_HF_FIELDS = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=176,
    vocab_size=VOCAB,
    head_dim=16,
    max_position_embeddings=256,
)


def make_hf_llama(out: Path, tokenizer_dir: Path | None = None, seed: int = 0, **fields) -> Path:
    """Save a random tiny ``LlamaForCausalLM`` (and the tokenizer) as an HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_HF_FIELDS, **fields}))
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def composer_two_ranks(tmp_path: Path, script: Path) -> list[str]:
    """The start of a ``composer -n 2`` command line whose ranks write ``tmp_path/rank{r}.out|err``."""
    import sys

    return [
        str(Path(sys.executable).parent / "composer"),
        "-n",
        "2",
        "--stdout",
        str(tmp_path / "rank{rank}.out"),
        "--stderr",
        str(tmp_path / "rank{rank}.err"),
        str(script),
    ]


def run_two_ranks(tmp_path: Path, script: Path, *args: str, timeout: float = 600) -> None:
    """``composer -n 2 script args...`` on one thread per rank with the recipes' default FSDP path (no
    ``FSDP_VERSION``); fails with the end of the launcher's and each rank's output unless it exits 0."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FSDP_VERSION", None)
    cmd = [*composer_two_ranks(tmp_path, script), *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    logs = "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("rank*.err")))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs


def run_overrides(source, data, save_folder, *extra: str) -> list[str]:
    """``key=value`` overrides pointing a testing yaml at a source model, a data folder and a save_folder."""
    return [
        f"variables.source_model={source}",
        f"variables.data_local={data}",
        f"variables.save_folder={save_folder}",
        *extra,
    ]


def unit_masks(config) -> dict[str, torch.Tensor]:
    """Every mask family of an HF LLaMA config with all gates at 1 (the masked model must equal the plain one)."""
    L, H, G = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    return {
        "hidden_z": torch.ones(config.hidden_size),
        "head_z": torch.ones(L, H),
        "kv_group_z": torch.ones(L, G),
        "intermediate_z": torch.ones(L, config.intermediate_size),
        "layer_z": torch.ones(L),
    }


def make_hf_family(
    out: Path, model_type: str, tokenizer_dir: Path | None = None, seed: int = 0, **fields
) -> Path:
    """Save a random tiny stock HF model of ``model_type`` (``llama``, ``mistral``, ``qwen2``) as an HF
    directory (``TINY_HF_FIELDS`` unless overridden). Biases, which HF initialises to zero, are drawn at
    random so that tests see them."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**TINY_HF_FIELDS, **fields}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hold_lock(folder):
    """Another process holding the save_folder's flock, as a running train would."""
    code = textwrap.dedent(f"""
        import fcntl, json, os, time
        os.makedirs({str(folder)!r}, exist_ok=True)
        fd = os.open({str(folder / ".shearing.lock")!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({{"host": "testhost", "pid": os.getpid(), "since": "2024-01-01T00:00:00"}}).encode())
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc
