"""A persistent, content-addressed cache of slice embeddings.

With a frozen encoder the embeddings of a volume depend only on the voxels (and
their geometry), the encoder and its weights, and the preprocessing, so they are
computed once and reused by training, the evaluation protocols and batch
inference::

    key = cache_key(volume_hash(image, affine), encoder.name, encoder_weights_id(encoder),
                    {"preset": "soft_tissue", "axis": "axial", "channel_mode": "repeat", "size": 224})
    arrays = EmbeddingCache().get_or_compute(key, lambda: embedder.encode(volume), meta={...})

Layout on disk (``root`` is :func:`default_cache_dir` unless given)::

    root/<key[:2]>/<key>.npz     the arrays (uncompressed ``np.savez``)
    root/<key[:2]>/<key>.json    sidecar: encoder, weights_id, preprocessing, case_id,
                                 created, nbytes, shapes, dtypes (informational only)

Decisions worth knowing:

- Writes go through :func:`volumes.atomic.atomic_write_bytes` (temporary file
  in the same folder, then ``os.replace``), the npz first and the sidecar last.
  A reader therefore sees either no entry or a complete one, and two processes
  writing the same key both succeed: the last rename wins, and both wrote a
  complete file for the same key.
- The npz alone is the entry. An npz without its sidecar is valid (the writer
  may have been interrupted between the two renames, or the sidecar lost); a
  sidecar without its npz is an orphan that :meth:`EmbeddingCache.prune` removes.
- A corrupt or truncated npz is a miss: it is removed, a :class:`CacheWarning`
  names the file, and the caller recomputes. ``get`` never raises for a bad entry.
- Recency is the npz's mtime: ``put`` sets it and ``get`` touches it, so pruning
  by size drops the least recently *used* entries, and ``older_than_days`` drops
  entries not used for that long (not merely created that long ago).
- Nothing is locked: two processes that miss the same key at once both compute
  it. That wastes work but never corrupts the cache.
- ``prune`` and ``clear`` only touch files whose names this cache writes
  (``<hex>.npz``, ``<hex>.json``, ``.<hex>.*.tmp`` in two-hex-digit folders), so
  pointing ``--dir`` at the wrong folder cannot delete anything else.
- Sizes are decimal: 1 MB = 10**6 bytes, 1 GB = 10**9 bytes.

``import volumes.cache`` does not import torch; torch tensors are accepted by duck
typing (``.detach().cpu().numpy()``).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from volumes.atomic import atomic_write_bytes, sweep_temporaries
# The keys live in volumes.cache_keys; re-exported here, where callers import them from.
from volumes.cache_keys import _canonical, _storable, cache_key, config_hash, encoder_weights_id, volume_hash

__all__ = [
    "CacheWarning",
    "EmbeddingCache",
    "cache_key",
    "config_hash",
    "default_cache_dir",
    "encoder_weights_id",
    "volume_hash",
]

_SIDECAR_FORMAT = 1

_KEY_RE = re.compile(r"^[0-9a-f]{16,128}$")
_SHARD_RE = re.compile(r"^[0-9a-f]{2}$")
# A stray temporary file younger than this may belong to a writer still running.
_STALE_TMP_SECONDS = 3600.0


class CacheWarning(RuntimeWarning):
    """Something in the cache was unusable (corrupt entry, failed write); the cache carried on."""


# --------------------------------------------------------------------------- storage
def default_cache_dir() -> Path:
    """``$VOLUMES_CACHE_DIR`` when set, else ``~/.cache/volumes/embeddings``."""
    override = os.environ.get("VOLUMES_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "volumes" / "embeddings"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Entry:
    """One cached entry as found on disk."""

    key: str
    npz: Path
    npz_bytes: int
    mtime: float
    sidecar: Path | None
    sidecar_bytes: int = 0
    _meta: dict | None = field(default=None, repr=False)
    _meta_read: bool = field(default=False, repr=False)

    @property
    def size(self) -> int:
        return self.npz_bytes + self.sidecar_bytes

    @property
    def meta(self) -> dict:
        """The sidecar's contents; ``{}`` when it is missing or unreadable (it is only informational)."""
        if not self._meta_read:
            self._meta_read = True
            self._meta = {}
            if self.sidecar is not None:
                try:
                    loaded = json.loads(self.sidecar.read_text())
                    self._meta = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError):
                    pass
        return self._meta or {}


@dataclass
class _Scan:
    entries: list[_Entry]
    stray_tmp: list[tuple[Path, int, float]]  # path, bytes, mtime
    orphan_sidecars: list[tuple[Path, int, float]]


class EmbeddingCache:
    """Embedding arrays on disk, keyed by :func:`cache_key`; safe for concurrent processes.

    Args:
        root: cache folder; :func:`default_cache_dir` when ``None``. Created on the
            first ``put``; a read-only folder works for ``get`` (recency is then not
            recorded).

    ``stats`` counts ``hits``, ``misses``, ``corrupt`` (entries found unreadable,
    also counted as misses), ``writes`` and ``write_errors`` in this process.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.stats: dict[str, int] = {"hits": 0, "misses": 0, "corrupt": 0, "writes": 0, "write_errors": 0}
        self.swept = self.sweep()

    def sweep(self) -> list[Path]:
        """Remove the temporary files of writers that were killed mid-``put``; returns them.

        Other processes may be writing into the same cache, so a temporary file goes only
        when its writer is a dead process of this host, or when it is older than an hour
        and its writer cannot be checked (another host on shared storage). Run when a
        cache is opened; ``prune`` removes the rest.
        """
        removed: list[Path] = []
        try:
            shards = [entry.path for entry in os.scandir(self.root) if _SHARD_RE.match(entry.name)]
        except OSError:
            return removed  # no cache yet, or unreadable
        for shard in shards:
            removed += sweep_temporaries(shard, unknown_after_s=_STALE_TMP_SECONDS)
        return removed

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r})"

    # ------------------------------------------------------------------ paths
    def path(self, key: str) -> Path:
        """Where the npz of ``key`` lives (it may not exist)."""
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"cache key must be 16-128 lowercase hex digits (see cache_key), got {key!r}")
        return self.root / key[:2] / f"{key}.npz"

    def _sidecar_path(self, key: str) -> Path:
        return self.path(key).with_suffix(".json")

    # ------------------------------------------------------------------ read
    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or ``None`` on a miss.

        A corrupt or truncated entry is a miss: it is removed and a
        :class:`CacheWarning` names the file. A hit refreshes the entry's mtime
        (its recency for :meth:`prune`).
        """
        path = self.path(key)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            self.stats["misses"] += 1
            return None
        except OSError as exc:
            self.stats["misses"] += 1
            warnings.warn(f"embedding cache: cannot open {path}: {exc}", CacheWarning, stacklevel=2)
            return None
        with handle:
            try:
                with np.load(handle, allow_pickle=False) as npz:
                    arrays = {name: npz[name] for name in npz.files}
            except Exception as exc:  # noqa: BLE001 - zipfile, zlib, numpy and OS errors all mean "unusable"
                self.stats["misses"] += 1
                self.stats["corrupt"] += 1
                removed = self._discard_corrupt(path, os.fstat(handle.fileno()))
                action = "removed it" if removed else "left it (it was replaced meanwhile or cannot be removed)"
                warnings.warn(
                    f"embedding cache: {path} is unreadable ({type(exc).__name__}: {exc}); {action}; recomputing",
                    CacheWarning,
                    stacklevel=2,
                )
                return None
        if not arrays:
            self.stats["misses"] += 1
            return None
        self.stats["hits"] += 1
        try:
            os.utime(path)
        except OSError:
            pass  # a read-only or shared cache still serves hits; only LRU order suffers
        return arrays

    def _discard_corrupt(self, path: Path, opened: os.stat_result) -> bool:
        """Remove a corrupt npz unless a writer has renamed a fresh file over it since we opened it."""
        try:
            now = os.stat(path)
            if (now.st_ino, now.st_dev) != (opened.st_ino, opened.st_dev):
                return False
            path.unlink()
        except OSError:
            return False
        path.with_suffix(".json").unlink(missing_ok=True)
        return True

    def __contains__(self, key: str) -> bool:
        """Whether an npz exists for ``key`` (not whether it is readable); does not touch stats."""
        return self.path(key).is_file()

    # ------------------------------------------------------------------ write
    def put(self, key: str, arrays: Mapping[str, Any], meta: Mapping | None = None) -> Path:
        """Store ``arrays`` under ``key`` atomically; returns the npz path.

        Args:
            key: from :func:`cache_key`.
            arrays: name -> array or tensor, e.g. ``cls [D, E]``, ``patch_mean [D, E]``.
                Object arrays are refused (the cache never unpickles).
            meta: informational, written to the sidecar; conventionally ``encoder``,
                ``weights_id``, ``preprocessing``, ``case_id``. ``created``,
                ``nbytes``, ``shapes`` and ``dtypes`` are filled in here.
        """
        npz_path = self.path(key)
        plain: dict[str, np.ndarray] = {}
        for name, value in arrays.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"embedding cache: array name {name!r} is not a plain string")
            array, _ = _storable(value)
            plain[name] = array
        if not plain:
            raise ValueError("embedding cache: nothing to store (no arrays)")

        # npz first, sidecar last: an entry is usable the moment its npz exists.
        atomic_write_bytes(npz_path, lambda stream: np.savez(stream, **plain))
        record: dict[str, Any] = {"encoder": None, "weights_id": None, "preprocessing": None, "case_id": None}
        record.update(_jsonable(dict(meta or {})))
        record.update(
            key=key,
            created=_iso(time.time()),
            nbytes=int(sum(a.nbytes for a in plain.values())),
            shapes={n: list(a.shape) for n, a in plain.items()},
            dtypes={n: a.dtype.str for n, a in plain.items()},
            format=_SIDECAR_FORMAT,
        )
        text = json.dumps(record, indent=1, sort_keys=True)
        atomic_write_bytes(npz_path.with_suffix(".json"), lambda stream: stream.write(text.encode()))
        self.stats["writes"] += 1
        return npz_path

    def get_or_compute(
        self, key: str, compute: Callable[[], Mapping[str, Any]], meta: Mapping | None = None
    ) -> dict[str, np.ndarray]:
        """The cached arrays for ``key``, or ``compute()``'s, stored on the way out.

        A failed write (full disk, read-only folder) is a :class:`CacheWarning`, not
        an error: the computed arrays are returned either way.
        """
        cached = self.get(key)
        if cached is not None:
            return cached
        arrays = {name: _storable(value)[0] for name, value in compute().items()}
        try:
            self.put(key, arrays, meta)
        except OSError as exc:
            self.stats["write_errors"] += 1
            warnings.warn(f"embedding cache: could not store {self.path(key)}: {exc}", CacheWarning, stacklevel=2)
        return arrays

    # ------------------------------------------------------------------ inspect
    def _scan(self) -> _Scan:
        """Every file this cache owns, classified; anything else in ``root`` is ignored."""
        scan = _Scan([], [], [])
        if not self.root.is_dir():
            return scan
        for shard in sorted(self.root.iterdir()):
            if not _SHARD_RE.match(shard.name) or not shard.is_dir():
                continue
            npz: dict[str, os.DirEntry] = {}
            sidecars: dict[str, os.DirEntry] = {}
            tmp: list[os.DirEntry] = []
            with os.scandir(shard) as it:
                for item in it:
                    name = item.name
                    if name.endswith(".tmp") and name.startswith(".") and _KEY_RE.match(name[1:].split(".")[0]):
                        tmp.append(item)
                    elif name.endswith(".npz") and _KEY_RE.match(name[:-4]):
                        npz[name[:-4]] = item
                    elif name.endswith(".json") and _KEY_RE.match(name[:-5]):
                        sidecars[name[:-5]] = item
            for key, item in sorted(npz.items()):
                stat = _stat(item)
                if stat is None:
                    continue  # removed meanwhile
                side = sidecars.get(key)
                side_stat = _stat(side) if side is not None else None
                scan.entries.append(
                    _Entry(
                        key=key,
                        npz=Path(item.path),
                        npz_bytes=stat.st_size,
                        mtime=stat.st_mtime,
                        sidecar=Path(side.path) if side_stat is not None else None,
                        sidecar_bytes=side_stat.st_size if side_stat is not None else 0,
                    )
                )
            for key, item in sidecars.items():
                if key not in npz and (stat := _stat(item)) is not None:
                    scan.orphan_sidecars.append((Path(item.path), stat.st_size, stat.st_mtime))
            for item in tmp:
                if (stat := _stat(item)) is not None:
                    scan.stray_tmp.append((Path(item.path), stat.st_size, stat.st_mtime))
        return scan

    def keys(self) -> list[str]:
        """Keys of the entries on disk, sorted."""
        return [entry.key for entry in self._scan().entries]

    def info(self) -> dict[str, Any]:
        """Summary of the cache folder (reads every sidecar).

        Keys: ``root``, ``exists``, ``entries``, ``total_bytes`` (npz + sidecars),
        ``oldest_created``/``newest_created`` (ISO UTC, from sidecars; the npz mtime
        stands in when a sidecar is missing), ``least_recent_use``/``most_recent_use``,
        ``encoders`` (name -> entries; ``"unknown"`` without a sidecar), ``stray_tmp_files``,
        ``orphan_sidecars``.
        """
        scan = self._scan()
        created: list[str] = []
        encoders: dict[str, int] = {}
        for entry in scan.entries:
            meta = entry.meta
            stamp = meta.get("created")
            created.append(stamp if isinstance(stamp, str) else _iso(entry.mtime))
            name = str(meta.get("encoder") or "unknown")
            encoders[name] = encoders.get(name, 0) + 1
        used = [entry.mtime for entry in scan.entries]
        return {
            "root": str(self.root),
            "exists": self.root.is_dir(),
            "entries": len(scan.entries),
            "total_bytes": int(sum(entry.size for entry in scan.entries)),
            "oldest_created": min(created, default=None),
            "newest_created": max(created, default=None),
            "least_recent_use": _iso(min(used)) if used else None,
            "most_recent_use": _iso(max(used)) if used else None,
            "encoders": dict(sorted(encoders.items())),
            "stray_tmp_files": len(scan.stray_tmp),
            "orphan_sidecars": len(scan.orphan_sidecars),
        }

    # ------------------------------------------------------------------ remove
    def prune(
        self,
        *,
        max_bytes: int | None = None,
        older_than_days: float | None = None,
        encoder: str | None = None,
        dry_run: bool = False,
    ) -> list[Path]:
        """Remove entries; returns the removed paths (npz of each entry, plus stray files).

        In order: temporary files and orphan sidecars older than an hour; entries of
        ``encoder`` (by the sidecar's ``encoder``; entries without a sidecar are kept);
        entries not used for ``older_than_days``; then the least recently used
        entries until the rest take at most ``max_bytes``. ``dry_run`` removes
        nothing and returns what would go.
        """
        return [path for path, _ in self.prune_with_sizes(max_bytes, older_than_days, encoder, dry_run)]

    def prune_with_sizes(
        self, max_bytes: int | None = None, older_than_days: float | None = None, encoder: str | None = None,
        dry_run: bool = False,
    ) -> list[tuple[Path, int]]:
        """:meth:`prune`, returning ``(path, bytes)`` of each removed file (what ``volumes cache prune`` prints)."""
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"prune: max_bytes must be >= 0, got {max_bytes}")
        if older_than_days is not None and not (older_than_days >= 0 and math.isfinite(older_than_days)):
            raise ValueError(f"prune: older_than_days must be a finite number >= 0, got {older_than_days}")
        now = time.time()
        scan = self._scan()
        removed: list[tuple[Path, int]] = []

        for path, size, mtime in [*scan.stray_tmp, *scan.orphan_sidecars]:
            # Younger ones may belong to a put still running.
            if now - mtime > _STALE_TMP_SECONDS:
                if dry_run or _unlink(path):
                    removed.append((path, size))

        keep: list[_Entry] = []
        for entry in scan.entries:
            doomed = (encoder is not None and entry.meta.get("encoder") == encoder) or (
                older_than_days is not None and now - entry.mtime > older_than_days * 86400.0
            )
            if doomed:
                if dry_run or self._remove_entry(entry):
                    removed.append((entry.npz, entry.size))
            else:
                keep.append(entry)

        if max_bytes is not None:
            total = sum(entry.size for entry in keep)
            # Oldest use first; the key breaks ties so the order is reproducible.
            for entry in sorted(keep, key=lambda e: (e.mtime, e.key)):
                if total <= max_bytes:
                    break
                if dry_run or self._remove_entry(entry):
                    removed.append((entry.npz, entry.size))
                    total -= entry.size
        return removed

    @staticmethod
    def _remove_entry(entry: _Entry) -> bool:
        # npz first: an interruption leaves an orphan sidecar (cleaned later), never a half entry.
        if not _unlink(entry.npz):
            return False
        if entry.sidecar is not None:
            _unlink(entry.sidecar)
        return True

    def clear(self) -> int:
        """Remove every entry, sidecar and temporary file of this cache; returns the number of entries.

        Only files named like cache files are touched; the folders stay. A ``put``
        running at the same time may then fail with ``OSError`` (``get_or_compute``
        tolerates that).
        """
        scan = self._scan()
        count = sum(self._remove_entry(entry) for entry in scan.entries)
        for path, _, _ in [*scan.stray_tmp, *scan.orphan_sidecars]:
            _unlink(path)
        return count


def _stat(item: os.DirEntry) -> os.stat_result | None:
    try:
        return item.stat()
    except OSError:
        return None


def _unlink(path: Path) -> bool:
    """Remove ``path``; ``False`` when it is gone already (another pruner) or cannot be removed."""
    try:
        path.unlink()
        return True
    except OSError:
        return False


def _jsonable(obj: Any) -> Any:
    """Best-effort JSON for the informational sidecar: canonical where possible, ``str`` otherwise."""
    try:
        return _canonical(obj)
    except TypeError:
        if isinstance(obj, Mapping):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        return str(obj)
