"""A refused input is a message, not a traceback.

The checks that run before anything expensive (the run config, an export's checkpoint, an evaluation's
model folder) raise ``ValueError`` and friends with a message naming the key or path and the fix. Inside
``refusing()`` such an exception is marked as a refusal; the entry points (``train.py``, the ``export``,
``evaluate`` and ``report`` CLIs) print a marked one as one block and exit 2 (``exit_on_refusal``). An
error anywhere else, e.g. during training, keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# What a refused input raises: these, from the checks that run before the expensive work (``refusing``).
REFUSALS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
EXIT_CODE = 2


@contextlib.contextmanager
def refusing() -> Iterator[None]:
    """Marks a ``REFUSALS`` exception raised inside as a refusal (``exc.shearing_refusal = True``; type and
    message unchanged). Used only around checks made before the expensive work starts."""
    try:
        yield
    except REFUSALS as e:
        e.shearing_refusal = True
        raise


def _rank_suffix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f" (rank {os.environ.get('RANK', '0')})" if world > 1 else ""


def report_refusal(error: BaseException, what: str = "the run", stream=None) -> bool:
    """Print a refusal (see ``refusing``) as one block and return True; False for any other exception."""
    if not getattr(error, "shearing_refusal", False):
        return False
    stream = stream or sys.stderr
    print(
        f"\nshearing: {what} was refused before it started{_rank_suffix()}:\n  {error}\n",
        file=stream,
        flush=True,
    )
    return True


@contextlib.contextmanager
def exit_on_refusal(what: str) -> Iterator[None]:
    """For a command's ``main``: a refusal raised inside is printed once and the process exits 2."""
    try:
        yield
    except Exception as error:
        if not report_refusal(error, what):
            raise
        sys.exit(EXIT_CODE)


__all__ = ["EXIT_CODE", "REFUSALS", "exit_on_refusal", "refusing", "report_refusal"]
