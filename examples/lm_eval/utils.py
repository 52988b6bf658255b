"""The ``tiny_facts`` task's documents: ``tiny_facts.jsonl`` next to this file, read without the hub.

lm-eval calls ``load`` through ``custom_dataset: !function utils.load`` with the task's metadata and
``dataset_kwargs`` as keyword arguments (ignored here) and takes the ``test`` split of what it returns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DATA = Path(__file__).with_name("tiny_facts.jsonl")


def load(**_: Any) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
