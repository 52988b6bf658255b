"""The per-step loss trace of ``yamls/testing/prune_tiny.yaml``, for the golden-trace test.

Everything the run depends on is built here from a seed, not from files on the machine: a synthetic
two-domain corpus (pseudo-words drawn from two seeded Zipf-like distributions), a BPE tokenizer trained
on it, the MDS data ``tokenize_domains`` writes, and the yaml's random-init ``tiny_gqa`` source. The run
executes in a fresh process with one thread and with the CPU's kernels pinned, so the trace is a pure
function of the code, the same on any x86-64 machine.

Why the pins: PyTorch picks its elementwise/reduction kernels by the CPU's vector width (AVX2, AVX-512) and
MKL picks its GEMM kernels by the CPU too; each choice sums in another order, so losses differ in the last
bit from step 4 and the difference grows over 300 steps (4.30469 vs 4.30473 eval loss at the end). The
first golden file, recorded on another machine, failed on this project's CI for exactly that reason.
``ATEN_CPU_CAPABILITY=default`` takes PyTorch's scalar kernels and ``MKL_CBWR=COMPATIBLE`` MKL's
conditional-numerical-reproducibility path, which give the same bits on every x86-64 CPU (checked here:
the trace is unchanged with MKL held to SSE4.2 and oneDNN to SSE4.1, while unpinned AVX2 kernels change it).

    python tests/golden/prune_tiny_trace.py OUT_DIR            # prints the trace as JSON
    python tests/golden/prune_tiny_trace.py OUT_DIR --write    # rewrites prune_tiny_trace.json

Regenerate the golden file only for a change that is *meant* to change the numbers, and say so in the commit.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
from pathlib import Path

# Read by PyTorch and MKL when they start: set before anything imports torch (see the module docstring).
KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}
os.environ.update(KERNEL_PINS)

GOLDEN = Path(__file__).with_suffix(".json")
REPO = Path(__file__).resolve().parents[2]
KEYS = ("loss/train/total", "loss/train/lm_loss", "loss/train/lagrangian")
# Logged in other calls of the same step: the expected size of the masked model and the eval loss.
EXTRA = ("pruning/expected_num_params", "metrics/eval/LanguageCrossEntropy")


def write_corpus(root: Path, docs_per_domain: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    root.mkdir(parents=True, exist_ok=True)
    for domain, size in (("code", 300), ("docs", 900)):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(size)]
        weights = [1.0 / (rank + 1) for rank in range(size)]
        with open(root / f"{domain}.jsonl", "w") as f:
            for _ in range(docs_per_domain):
                text = " ".join(rng.choices(words, weights, k=rng.randint(40, 160)))
                f.write(json.dumps({"text": text}) + "\n")
    return root


def build_data(work: Path) -> Path:
    from shearing.data.prep import PrepConfig, prepare
    from shearing.data.tokenizer import train_bpe_tokenizer

    raw = write_corpus(work / "raw")
    tokenizer = train_bpe_tokenizer(raw, 512, work / "tokenizer", progress=False)
    data = work / "data"
    prepare(
        PrepConfig(input=raw, tokenizer=str(tokenizer), output=data, seq_len=64, eval_seqs=16, progress=False)
    )
    return data


def run_trace(work: Path) -> list[dict[str, float]]:
    from shearing.train import train_from_yaml

    data = build_data(work)
    run = work / "run"
    overrides = [f"variables.data_local={data}", f"variables.save_folder={run}", "log_to_console=false"]
    train_from_yaml(str(REPO / "yamls/testing/prune_tiny.yaml"), overrides)
    steps: dict[int, dict[str, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in (*KEYS, *EXTRA):
            if key in record:
                steps.setdefault(int(record["step"]), {"step": int(record["step"])})[key] = record[key]
    return [steps[step] for step in sorted(steps)]


def check_pins() -> None:
    """Fail loudly rather than record or compare a trace from unpinned kernels."""
    import torch

    if platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit(f"the golden trace is defined for x86-64 CPUs, not {platform.machine()}")
    if torch.backends.cpu.get_cpu_capability() not in ("NO AVX", "DEFAULT"):  # the name varies by version
        raise SystemExit(
            f"ATEN_CPU_CAPABILITY=default did not take: {torch.backends.cpu.get_cpu_capability()}"
        )
    torch.set_num_threads(1)


def main(argv: list[str]) -> int:
    check_pins()
    trace = run_trace(Path(argv[0]))
    if "--write" in argv:
        GOLDEN.write_text(json.dumps(trace, indent=0) + "\n")
    print(json.dumps(trace))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
