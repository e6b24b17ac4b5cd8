"""Where the benchmark and training data live (the shared data folder, outside the package),
and the tuning questions shipped inside it."""

from __future__ import annotations

import os
from typing import TypeAlias

DATA_ENV = "SPECJAX_DATA"
# A filesystem path as the functions that take one accept it (`Path(p)`, `os.fspath(p)`).
StrPath: TypeAlias = str | os.PathLike[str]


def data_file(sub: str) -> str | None:
    """$SPECJAX_DATA/SUB, else ../shared/data/SUB (from the working directory or from the
    repository); None when absent."""
    roots = [
        os.environ.get(DATA_ENV, ""),
        os.path.join(os.getcwd(), "..", "shared", "data"),
        os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"),
    ]
    for root in roots:
        path = os.path.join(root, sub)
        if root and os.path.exists(path):
            return os.path.abspath(path)
    return None


def tune_questions() -> str:
    """Questions for choosing settings (`auto`'s second round, tree shapes, `tune-tree`'s
    default): 16 of our own, 2 per MT-bench category, shipped in the package
    (specjax/configs/tune_questions.jsonl). Settings are never picked on the eval files, which
    only measure; no 6-word n-gram of these occurs in them (`specjax.train.magpie.leaks`)."""
    return os.path.join(os.path.dirname(__file__), "configs", "tune_questions.jsonl")


def cache_root() -> str:
    """Where specjax caches converted models and measurements: $SPECJAX_CACHE, default
    ~/.cache/specjax."""
    return os.environ.get(
        "SPECJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "specjax")
    )


def store_json(path: str, rec: dict) -> None:
    """Write `rec` as JSON at `path` atomically: a crash leaves the old file or none."""
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, path)
