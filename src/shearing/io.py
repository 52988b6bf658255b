"""Small file-writing and process helpers shared across the package.

Files and folders made through ``tempfile`` (``mkstemp`` 0600, ``mkdtemp`` 0700) are private to their
owner, unlike what ``open``/``mkdir`` (and so ``save_pretrained``) make: 0666/0777 less the umask. On
shared storage a teammate then cannot read a manifest or an exported model. Everything written here
through a temporary sibling is therefore given the umask's permissions (``apply_umask``) before it is
renamed into place, so it ends up exactly as if it had been created directly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux, else set and restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore (briefly process-wide)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool | None = None) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have: 0666 (files) / 0777 (dirs) less the umask."""
    path = Path(path)
    is_dir = path.is_dir() if directory is None else directory
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON through a temporary sibling file (fsynced) renamed over ``path``.

    Readers see the old file or the new one, never a half-written one; a failed write leaves no temp file.
    The file gets the umask's permissions (0644 under the usual 022), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json_or_none(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; None when it is missing, empty or not valid JSON (for files that may be half-written
    by a process that died: a lock's owner note, an export summary)."""
    try:
        return json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
