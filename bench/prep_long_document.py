"""Peak memory and time of data preparation's tokenize phase on one very long document.

Writes ``--mb`` MB of real text (the Python standard library's sources, repeated) as a single JSON line,
then tokenizes that file the way ``tokenize_domains`` does (``shearing.data.prep.tokenize_file``) in a
child process. The parent samples the child's resident memory (``/proc/PID/status``) every 50 ms and
kills it once it passes ``--cap-gb`` or runs past ``--timeout`` seconds, so a measurement of a version
that does not bound its memory cannot take the machine down. Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/prep_long_document.py --tokenizer TOKENIZER_DIR \
        [--mb 50] [--cap-gb 4] [--timeout 600] [--no-bos] [--eos-token '<|im_end|>']

Prints one JSON line: peak RSS (MB), seconds, tokens written (or why the child was stopped).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sysconfig
import tempfile
import time
from pathlib import Path


def write_long_document(path: Path, megabytes: float) -> int:
    """One JSON line holding ``megabytes`` MB of standard-library source text; returns its characters."""
    sources = [
        p.read_text(encoding="utf-8", errors="replace")
        for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    ]
    target = int(megabytes * 1e6)
    parts, size = [], 0
    while size < target:
        for text in sources:
            parts.append(text)
            size += len(text)
            if size >= target:
                break
    text = "".join(parts)[:target]
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": text}) + "\n")
    return len(text)


def _child(raw: str, cache: str, tokenizer: str, no_bos: bool, eos_token: str | None) -> None:
    from shearing.data.prep import _worker_state, choose_token_dtype, tokenize_file
    from shearing.data.raw import RawFile
    from shearing.data.tokenizer import load_tokenizer_info

    info = load_tokenizer_info(tokenizer, None, eos_token, no_bos)
    state = _worker_state(
        info.backend_json, info.bos_token_id, info.eos_token_id, choose_token_dtype(info.vocab_size)
    )
    path = Path(raw)
    tokenize_file(RawFile(path=path, name=path.name, size=path.stat().st_size), Path(cache), **state)


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def measure(raw: Path, cache: Path, args: argparse.Namespace) -> dict:
    context = multiprocessing.get_context("spawn")
    child = context.Process(
        target=_child, args=(str(raw), str(cache), args.tokenizer, args.no_bos, args.eos_token)
    )
    start = time.perf_counter()
    child.start()
    peak, stopped = 0.0, None
    while child.is_alive():
        peak = max(peak, _rss_mb(child.pid))
        elapsed = time.perf_counter() - start
        if peak > args.cap_gb * 1024:
            stopped = f"killed: RSS passed {args.cap_gb} GB after {elapsed:.1f} s"
        elif elapsed > args.timeout:
            stopped = f"killed: still running after {args.timeout} s (RSS {peak:.0f} MB)"
        if stopped:
            child.kill()
            break
        time.sleep(0.05)
    child.join()
    seconds = time.perf_counter() - start
    result = {"peak_rss_mb": round(peak), "seconds": round(seconds, 1), "exit": child.exitcode}
    if stopped:
        result["stopped"] = stopped
    elif child.exitcode == 0:
        import numpy as np

        with np.load(cache.with_suffix(".npz")) as index:
            result["tokens"] = int(index["offsets"][-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--cap-gb", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--no-bos", action="store_true")
    parser.add_argument("--eos-token")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "long.jsonl"
        chars = write_long_document(raw, args.mb)
        result = measure(raw, Path(tmp) / "cache", args)
    print(json.dumps({"tokenizer": args.tokenizer, "characters": chars, **result}))


if __name__ == "__main__":
    main()
