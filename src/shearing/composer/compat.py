"""Workarounds for Composer 0.32 (mosaicml==0.32.1, pinned), applied once by ``apply()`` when
``shearing.train`` is imported. Each one says what Composer does, why that breaks a shearing run, and
what to check when Composer is upgraded.

1. **One signal file per node** (multi-node runs whose ``save_folder`` all nodes share, as the README
   requires). ``composer.utils.dist.get_node_signal_file_name`` builds ``._signal_file_node{N}_{random}``
   and then broadcasts the whole name from global rank 0, so every node gets node 0's name. Its callers
   have each node's local rank 0 create that file, wait on it with the node's other ranks, and delete it:
   ``Trainer._get_autoresume_checkpoint`` in the save_folder (every start with autoresume on),
   ``checkpoint.load_checkpoint`` in a node-local temporary folder, ``dist.busy_wait_for_local_rank_zero``
   and llm-foundry's ``build_tokenizer`` (in the working directory, often shared too). On a shared folder
   two nodes create and delete one path: the second ``os.remove`` raises ``FileNotFoundError`` on one
   node and the others lose their peer. The replacement keeps the broadcast random part (the ranks of a
   node must agree on the name) and puts this node's rank back: ``._signal_file_node{this node}_{random}``.
   Every call site looks the function up through the ``dist`` module when it runs, so replacing the
   module attribute covers them all (``dist.busy_wait_for_local_rank_zero`` reads it from its module's
   globals, the same dict). ``tests/test_multinode.py`` runs two nodes on one shared folder through
   ``scripts/launch_multinode.sh`` and fails without it.
   *On an upgrade*: if ``get_node_signal_file_name`` no longer broadcasts the name from rank 0 (Composer
   fixed it), ``apply`` leaves it alone and this entry can go; if it was renamed or moved, ``apply``
   raises, naming this module; re-read its callers (grep ``get_node_signal_file_name`` in composer and
   llmfoundry) for any new one that bypasses the module attribute.

2. **A torch newer than any tested one** (``warn_if_torch_untested``, called once at the start of
   ``train_from_yaml``). The stack is tested on two profiles (``TESTED_TORCH``, the Makefile's and
   ``locks/``): torch 2.7.0 on Python 3.11 (the canonical lock) and torch 2.11.0 on Python 3.12, where
   Composer and llm-foundry's ``torch<2.7.1`` cap is overridden. A newer torch is not refused (the golden
   trace stays within 1e-4 on 2.15), but ops change behaviour across releases (torch 2.15 changed
   ``clamp``'s gradient at the bound), so global rank 0 says so once per process, as a Python warning and a
   log line, naming the tested versions. *On an upgrade*: when a new profile is tested, add it to
   ``TESTED_TORCH`` (``tests/test_composer_compat.py`` checks it against ``locks/``).
"""

from __future__ import annotations

import inspect
import logging
import re
import warnings

import composer
import torch
from composer.utils import dist
from packaging.version import Version

log = logging.getLogger(__name__)

_SIGNAL_NAME = re.compile(r"^\._signal_file_node\d+_")
TESTED_TORCH = {"2.7.0": "3.11", "2.11.0": "3.12"}  # torch -> Python of each tested profile (locks/)
_torch_warned = False


def per_node_signal_file_name(name: str, node_rank: int) -> str:
    """Composer's broadcast signal-file ``name`` made this node's: same random part, this node's rank."""
    if _SIGNAL_NAME.match(name):
        return _SIGNAL_NAME.sub(f"._signal_file_node{node_rank}_", name, count=1)
    return f"{name}_node{node_rank}"  # an unknown format: still unique per node, still shared within one


def _patch_signal_file_name() -> bool:
    """Workaround 1; True when the replacement is installed (now or by an earlier call)."""
    original = getattr(dist, "get_node_signal_file_name", None)
    if original is None:
        raise RuntimeError(
            f"composer {composer.__version__} has no composer.utils.dist.get_node_signal_file_name: review "
            "workaround 1 in shearing/composer/compat.py (multi-node signal files) for this version"
        )
    if getattr(original, "_shearing_per_node", False):
        return True
    if "broadcast_object_list" not in inspect.getsource(original):
        log.debug(
            "composer %s names signal files per node already; no workaround needed", composer.__version__
        )
        return False

    def get_node_signal_file_name(rng=None) -> str:
        return per_node_signal_file_name(original(rng), dist.get_node_rank())

    get_node_signal_file_name.__doc__ = original.__doc__
    get_node_signal_file_name._shearing_per_node = True
    get_node_signal_file_name.__wrapped__ = original
    dist.get_node_signal_file_name = get_node_signal_file_name
    return True


def apply() -> None:
    """Install every workaround; calling it again changes nothing."""
    _patch_signal_file_name()


def warn_if_torch_untested() -> str | None:
    """Workaround 2: on global rank 0, once per process, warn (and log) when this torch is newer than every
    tested one; returns the message when it warned."""
    global _torch_warned
    installed = Version(torch.__version__)
    newest = max(Version(v) for v in TESTED_TORCH)
    if _torch_warned or installed.release <= newest.release or dist.get_global_rank() != 0:
        return None
    _torch_warned = True
    tested = " and ".join(f"torch {t} (Python {py})" for t, py in TESTED_TORCH.items())
    message = (
        f"torch {torch.__version__} is newer than the versions shearing is tested with ({tested}): the run "
        "goes on, but numerics or Composer/llm-foundry behaviour may differ. For a tested stack install a "
        "lock file (make install, or make install PROFILE=py312-torch211)"
    )
    warnings.warn(message, stacklevel=2)
    log.warning(message)
    return message
