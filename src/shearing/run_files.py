"""The small files a run reads before its model is built, each read once per run (``RunFiles``)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from shearing.data.manifest import MANIFEST_NAME, SPLITS, Manifest, load_manifest
from shearing.models.shapes import read_config_json


class RunFiles:
    """The small files a run reads before its model is built, each read once per run (keyed by the resolved
    path): a checkpoint folder's ``config.json`` (checked by ``read_config_json``) and a data folder's
    ``manifest.json`` (``DATA_DIR``, ``DATA_DIR/train`` and ``DATA_DIR/eval`` share one)."""

    def __init__(self) -> None:
        self._configs: dict[Path, dict[str, Any]] = {}
        self._manifests: dict[Path, Manifest] = {}

    def config_json(self, folder: str | os.PathLike) -> dict[str, Any]:
        """``folder/config.json`` as a dict (a copy: the caller may change it)."""
        key = Path(folder).resolve()
        if key not in self._configs:
            self._configs[key] = read_config_json(folder)
        return copy.deepcopy(self._configs[key])

    def manifest(self, data: str | os.PathLike) -> Manifest:
        """The manifest of data folder ``data`` (``load_manifest``'s rules and errors)."""
        root = Path(data).resolve()
        if not (root / MANIFEST_NAME).is_file() and root.name in SPLITS:
            root = root.parent
        if root not in self._manifests:
            self._manifests[root] = load_manifest(data)
        return self._manifests[root]


__all__ = ["RunFiles"]
