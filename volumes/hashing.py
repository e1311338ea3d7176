"""The one file-hashing function, with the digest formats stored in records and cache keys.

Three digests are stored on disk and must stay stable, or ``--resume`` would redo every
case and the embedding cache would miss every entry. They differ only in how file names
enter the hash, so one function computes all of them:

* :data:`CONTENT` - the bytes only: a bundle's weights file (``weights_sha256`` and the
  model keys in ``record.json``);
* :data:`NAMED` - each file's name, then its bytes: an encoder's weights file or Hugging
  Face folder (``SliceEncoder.weights_id``, part of every cache key);
* :data:`NAMED_NUL` - each name with a NUL terminator, then its bytes: a case's input file
  or DICOM series (``input_sha256`` in ``record.json``, the cache's source keys).

A new format gets a new constant; an existing one never changes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

__all__ = ["CONTENT", "NAMED", "NAMED_NUL", "sha256_files"]

CONTENT: bytes | None = None
NAMED: bytes = b""
NAMED_NUL: bytes = b"\0"

_CHUNK = 1 << 20


def sha256_files(files: str | Path | Iterable[str | Path], *, names: bytes | None = CONTENT,
                 sort_by_name: bool = False) -> str:
    """Hex SHA-256 over ``files`` in order (or sorted by file name).

    Args:
        files: one path or several; a folder is hashed as every file below it, sorted by
            path (how Hugging Face weight folders are identified).
        names: ``None`` (:data:`CONTENT`): bytes only; else each file's name followed by
            these bytes goes before its content (:data:`NAMED`, :data:`NAMED_NUL`).
        sort_by_name: order the files by name (a DICOM series, whatever the listing order).
    """
    paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    expanded: list[Path] = []
    for path in paths:
        expanded += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if sort_by_name:
        expanded.sort(key=lambda p: p.name)
    digest = hashlib.sha256()
    for path in expanded:
        if names is not None:
            digest.update(path.name.encode() + names)
        with open(path, "rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
    return digest.hexdigest()
