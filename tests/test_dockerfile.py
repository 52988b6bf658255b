"""The Dockerfile, checked without Docker: the base image is the canonical profile's (Python 3.11, torch 2.7.0),
it installs that profile's lock hash-checked and complete, every file it copies exists and is not excluded by
.dockerignore (which keeps local environments out), its pins are hash-checked and its flash-attn pin is the
[gpu] extra's and the Makefile's, and flash-attn's build gets what its setup.py reads."""

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from shearing.composer.compat import TESTED_TORCH

ROOT = Path(__file__).resolve().parents[1]
BASE = re.compile(r"pytorch/pytorch:(?P<torch>[\d.]+)-cuda(?P<cuda>[\d.]+)-cudnn\d+-devel")


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def runs() -> str:
    return "\n".join(args for op, args in instructions() if op == "RUN")


def pins(text: str) -> dict[str, str]:
    """``name==version`` requirements of a requirements text (hash lines and comments skipped)."""
    return dict(re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)", text, re.M))


def test_base_image_is_the_canonical_profile():
    (base,) = [args for op, args in instructions() if op == "FROM"]
    match = BASE.fullmatch(base)
    assert match, base
    lock = ROOT / "locks" / "py311-torch270.txt"
    assert pins(lock.read_text())["torch"] == match["torch"] == "2.7.0"
    assert TESTED_TORCH[match["torch"]] == "3.11"  # the profile's Python, asserted in the image too
    assert "(3, 11), '2.7.0+cu126', '12.6'" in runs()


def test_the_canonical_lock_is_installed_hash_checked_and_complete():
    lock = ROOT / "locks" / "py311-torch270.txt"
    assert "pip install --require-hashes --no-deps -r locks/py311-torch270.txt" in runs()
    text = lock.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[-1].strip())
    unhashed = [entry.split()[0] for entry in entries if "--hash=sha256:" not in entry]
    assert not unhashed, f"lock entries without a hash: {unhashed}"
    locked = pins(text)
    # flash-attn's setup.py imports packaging and psutil and, at run time, needs einops: the lock has them
    assert {"packaging", "psutil", "einops", "setuptools"} <= set(locked)
    assert int(locked["setuptools"].split(".")[0]) < 81  # pyproject's build-system: setuptools>=64,<81


def test_every_copied_path_exists_and_reaches_the_build():
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".venv*", ".git"} <= set(ignored)  # local environments (GBs) and history stay out
    copies = [shlex.split(args) for op, args in instructions() if op == "COPY"]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
            if source != ".":
                assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    for needed in ("pyproject.toml", "README.md", "src/shearing/__init__.py", "train.py"):
        assert not any(fnmatch.fnmatch(part, pattern) for part in Path(needed).parts for pattern in ignored)


def test_flash_attn_pin_is_the_gpu_extra_and_the_makefiles():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert extra == ["flash-attn==2.8.3"]
    installed = re.findall(r'"(flash-attn==\S+) --hash=sha256:[0-9a-f]{64}"', runs())
    assert installed == extra
    assert re.findall(r'"(flash-attn==[^"]+)"', (ROOT / "Makefile").read_text()) == extra


def test_flash_attn_build_gets_what_its_setup_py_reads():
    """flash-attn 2.8.3's setup.py: imports torch/packaging/wheel (so no build isolation), ninja for the build,
    FLASH_ATTN_CUDA_ARCHS / MAX_JOBS / NVCC_THREADS for a compile when no prebuilt wheel matches."""
    text = runs()
    order = [
        text.index(s) for s in ("locks/py311-torch270.txt", "/tmp/build-tools.txt", "/tmp/flash-attn.txt")
    ]
    assert order == sorted(order), "the lock, then the build tools, then flash-attn"
    tools = pins(text.replace('"', "\n"))
    assert {"wheel", "ninja"} <= set(tools)
    assert "--no-build-isolation -r /tmp/flash-attn.txt" in text
    env = " ".join(args for op, args in instructions() if op in ("ENV", "ARG"))
    assert "FLASH_ATTN_CUDA_ARCHS=90" in env  # sm90: H100 / H200
    assert re.search(r"MAX_JOBS=\d+", env) and re.search(r"NVCC_THREADS=\d+", env)
    for line in re.findall(r'"[\w.-]+==\S+ --hash=sha256:[^"]*"', text):
        assert re.fullmatch(r'"[\w.-]+==\S+ --hash=sha256:[0-9a-f]{64}"', line), line


@pytest.mark.parametrize("name", ["build-tools", "flash-attn"])
def test_requirement_files_written_in_the_image_are_hash_checked(name):
    text = runs()
    install = re.search(rf"pip install [^&]*-r /tmp/{name}\.txt", text)
    assert install and "--require-hashes" in install.group(0)
