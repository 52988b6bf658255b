"""Does a prepared data root belong to a model? The tokenizer fingerprint and the token-id range.

Token ids mean nothing without the tokenizer that wrote them: data from another tokenizer whose ids
happen to fit the model's vocabulary trains silently on garbage, and ids beyond it crash with an
``IndexError`` in the embedding at step 1. So data preparation records in ``manifest.json`` the
tokenizer's fingerprint and the largest token id written, and training (``shearing.train.validate_run``),
evaluation (``shearing.evaluate --data``) and reference losses (``shearing.reference_losses``) check
them against the model before any expensive work.

The fingerprint and the core fingerprint are defined in ``shearing.data.fingerprint``. Across
transformers versions the same files can load with extra special tokens (a default pad token appended),
so the full fingerprint differs; data whose ``max_token_id`` is below the manifest's ``core_vocab_size``
is therefore accepted when the model's tokenizer has the same core fingerprint (every id the data holds
means the same token): a special token one version appends does not make the same tokenizer look
different, while a change of any id the data can hold (another vocabulary, a token moved or renamed) is
still refused.

Checks, in order (each ``ValueError`` names both tokenizers and the fix):

1. the manifest's ``max_token_id`` must be below the model's ``vocab_size`` (an error even without a
   fingerprint: these ids cannot be embedded);
2. the manifest's fingerprint must equal the model tokenizer's, or its core fingerprint must (see above).
   A manifest written before fingerprints
   (or with an older fingerprint method) is a warning, not an error; so is a model without a tokenizer
   (a random-init source), where only the id range can be checked.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from shearing.data.fingerprint import FINGERPRINT_METHOD, tokenizer_fingerprint
from shearing.data.tokenizer import load_hf_tokenizer

log = logging.getLogger(__name__)


def same_core(tokenizer: Any, entry: dict[str, Any], max_token_id: int | None) -> bool:
    """Whether ``tokenizer`` means the same token as the manifest ``entry``'s tokenizer for every id the
    data holds (``max_token_id``): same core fingerprint, and the data's ids all below the core."""
    core, stored = entry.get("core_vocab_size"), entry.get("core_fingerprint")
    if (
        not core
        or not stored
        or max_token_id is None
        or max_token_id >= int(core)
        or len(tokenizer) < int(core)
    ):
        return False
    return tokenizer_fingerprint(tokenizer, below=int(core)) == stored


def _describe(entry: dict[str, Any]) -> str:
    name = entry.get("name") or "?"
    path = entry.get("path") or "?"
    vocab = entry.get("vocab_size", "?")
    return f"{name!r} (path {path}, vocab size {vocab})"


def check_data_tokenizer(
    data: str | os.PathLike,
    *,
    tokenizer: Any | None,
    tokenizer_path: str | os.PathLike | None,
    vocab_size: int | None,
    where: str,
    manifest: Any = None,
) -> None:
    """Refuse data written by another tokenizer than the model's, or holding ids beyond its vocabulary.

    Args:
        data: ``DATA_DIR`` (or its ``train``/``eval``); its ``manifest.json`` is read.
        tokenizer: the model's tokenizer (``None``: none known; only the id range is checked).
        tokenizer_path: where it came from, for the messages.
        vocab_size: the model's embedding rows (``config.vocab_size``); ``None`` skips the range check.
        where: the setting that points at the data (e.g. ``train_loader.dataset.local``), for messages.
        manifest: the data's manifest when the caller has read it (else read here).
    """
    from shearing.data.manifest import load_manifest

    if manifest is None:
        manifest = load_manifest(data)
    entry = dict(manifest.tokenizer or {})
    data_desc = _describe(entry)
    model_desc = f"{tokenizer_path or getattr(tokenizer, 'name_or_path', '?')}"
    if tokenizer is not None:
        model_desc += f" (vocab size {len(tokenizer)})"
    fix = (
        "re-run data_prep/tokenize_domains.py with --tokenizer set to the model's tokenizer, or set "
        "model.tokenizer to the tokenizer the data was prepared with"
    )
    max_id = manifest.max_token_id
    if vocab_size is not None and max_id is not None and max_id >= vocab_size:
        raise ValueError(
            f"{where}={data}: the data holds token id {max_id} but the model's vocab_size is {vocab_size} "
            f"(ids must be below it); the data was tokenized with {data_desc}, the model's tokenizer is "
            f"{model_desc}: {fix}"
        )
    if vocab_size is not None and max_id is None and int(entry.get("vocab_size", 0) or 0) > vocab_size:
        log.warning(
            "%s=%s: manifest.json records no max_token_id and its tokenizer has %s tokens, more than the "
            "model's vocab_size %d: ids beyond it would crash training; re-run data_prep/tokenize_domains.py",
            where,
            data,
            entry.get("vocab_size"),
            vocab_size,
        )
    stored = entry.get("fingerprint")
    if not stored or entry.get("fingerprint_method") != FINGERPRINT_METHOD:
        log.warning(
            "%s=%s: manifest.json has no tokenizer fingerprint (written by an older data_prep); cannot check "
            "that the data was tokenized with the model's tokenizer %s. Re-run data_prep/tokenize_domains.py "
            "to record one",
            where,
            data,
            model_desc,
        )
        return
    if tokenizer is None:
        log.warning(
            "%s=%s: the model has no tokenizer (set model.tokenizer); cannot check the data's tokenizer %s",
            where,
            data,
            data_desc,
        )
        return
    mine = tokenizer_fingerprint(tokenizer)
    if mine != stored and same_core(tokenizer, entry, manifest.max_token_id):
        log.info(
            "%s=%s: the model's tokenizer %s and the data's %s differ only in special tokens appended after "
            "id %s (e.g. a default pad token transformers 5 adds); every id the data holds means the same "
            "token in both",
            where,
            data,
            model_desc,
            data_desc,
            int(entry["core_vocab_size"]) - 1,
        )
    elif mine != stored:
        raise ValueError(
            f"{where}={data} was tokenized with {data_desc}, fingerprint {stored[:16]}, but the model's "
            f"tokenizer is {model_desc}, fingerprint {mine[:16]}: token ids would mean different tokens. "
            f"{fix}"
        )


def load_tokenizer_or_none(path: str | os.PathLike | None) -> Any | None:
    """The tokenizer saved in ``path`` (``shearing.data.tokenizer.load_hf_tokenizer``: transformers 4.x reads
    a folder saved by 5.x too), or ``None`` for no path or a folder without a tokenizer."""
    if path is None:
        return None
    try:
        return load_hf_tokenizer(Path(path))
    except (OSError, ValueError, TypeError):
        return None


def check_run_data(
    cfg: Any,
    tokenizer_path: str | None,
    vocab_size: int | None,
    tokenizer: Any | None = None,
    manifests: Any = None,
) -> None:
    """``check_data_tokenizer`` for every ``domain_mixture`` / ``domain_eval`` loader of a run config.

    ``tokenizer_path`` is the model's tokenizer (``shearing.train.tokenizer_path``); ``tokenizer`` is that
    tokenizer already loaded (the trainer's), else it is loaded here, once. ``manifests``: a function from a
    data folder to its manifest (the run's ``RunFiles.manifest``, which reads each once), else ``load_manifest``.
    """
    loaders = [("train_loader", cfg.train_loader), ("eval_loader", cfg.eval_loader)]
    locals_ = [
        (key, (loader.get("dataset") or {}).get("local"))
        for key, loader in loaders
        if loader and loader.get("name") in ("domain_mixture", "domain_eval")
    ]
    locals_ = [(key, local) for key, local in locals_ if local is not None]
    if not locals_:
        return
    if tokenizer is None:
        tokenizer = load_tokenizer_or_none(tokenizer_path)
    for key, local in locals_:
        check_data_tokenizer(
            local,
            tokenizer=tokenizer,
            tokenizer_path=tokenizer_path,
            vocab_size=vocab_size,
            where=f"{key}.dataset.local",
            manifest=None if manifests is None else manifests(local),
        )


def check_model_dir_data(
    data: str | os.PathLike,
    model_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    where: str = "--data",
) -> None:
    """``check_data_tokenizer`` for an HF model folder (its ``config.json`` and tokenizer), before loading it.

    ``tokenizer_dir`` defaults to ``model_dir``. A data folder without a manifest is not checked.
    """
    from shearing.data.manifest import load_manifest

    try:
        load_manifest(data)
    except FileNotFoundError:
        return
    vocab_size = None
    config = Path(model_dir) / "config.json"
    if config.is_file():
        with open(config) as f:
            vocab_size = json.load(f).get("vocab_size")
    path = tokenizer_dir or model_dir
    check_data_tokenizer(
        data,
        tokenizer=load_tokenizer_or_none(path),
        tokenizer_path=str(path),
        vocab_size=None if vocab_size is None else int(vocab_size),
        where=where,
    )
