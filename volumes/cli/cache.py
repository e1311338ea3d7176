"""``volumes cache info|prune``: inspect or trim the embedding cache (:class:`volumes.cache.EmbeddingCache`)."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Mapping

from volumes.errors import VolumesError


def add_parser(sub) -> None:
    parser = sub.add_parser("cache", help="inspect or prune the embedding cache",
                            description="Inspect and prune the slice-embedding cache.")
    actions = parser.add_subparsers(dest="action", required=True)
    dir_help = "cache folder (default: $VOLUMES_CACHE_DIR or ~/.cache/volumes/embeddings)"

    info = actions.add_parser("info", help="entries, size, age and encoders of the cache")
    info.add_argument("--dir", default=None, help=dir_help)
    info.add_argument("--json", action="store_true", help="print the summary as JSON")

    prune = actions.add_parser("prune", help="remove entries by size (least recently used first), age or encoder")
    prune.add_argument("--dir", default=None, help=dir_help)
    prune.add_argument("--max-gb", type=float, default=None, help="keep at most this many GB (10^9 bytes)")
    prune.add_argument("--older-than-days", type=float, default=None, help="remove entries not used for N days")
    prune.add_argument("--encoder", default=None, help="remove the entries of this encoder name")
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    parser.set_defaults(run=run)


def human_bytes(n: float) -> str:
    """Decimal MB below 1 GB, GB above."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _print_info(info: Mapping[str, Any]) -> None:
    print(f"embedding cache: {info['root']}" + ("" if info["exists"] else " (does not exist)"))
    print(f"entries: {info['entries']}, {human_bytes(info['total_bytes'])}")
    if info["entries"]:
        print(f"created: {info['oldest_created']} .. {info['newest_created']}")
        print(f"last used: {info['least_recent_use']} .. {info['most_recent_use']}")
        print("encoders: " + ", ".join(f"{name} ({count})" for name, count in info["encoders"].items()))
    if info["stray_tmp_files"] or info["orphan_sidecars"]:
        print(f"stray files: {info['stray_tmp_files']} temporary, {info['orphan_sidecars']} sidecars without npz")


def run(args: argparse.Namespace) -> int:
    from volumes.cache import EmbeddingCache

    cache = EmbeddingCache(args.dir)
    if args.action == "info":
        summary = cache.info()
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            _print_info(summary)
        return 0

    if not cache.root.is_dir():
        raise VolumesError(f"prune: no cache folder at {cache.root}")
    for name, value in (("--max-gb", args.max_gb), ("--older-than-days", args.older_than_days)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise VolumesError(f"prune: {name} must be a number >= 0, got {value}")
    max_bytes = None if args.max_gb is None else int(args.max_gb * 1e9)
    removed = cache.prune_with_sizes(max_bytes, args.older_than_days, args.encoder, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    if args.dry_run:
        for path, size in removed:
            print(f"  {path}  {human_bytes(size)}")
    entries = sum(1 for path, _ in removed if path.suffix == ".npz")
    stray = len(removed) - entries
    print(
        f"{verb} {entries} entries ({human_bytes(sum(size for _, size in removed))})"
        + (f" and {stray} stray files" if stray else "")
        + f" from {cache.root}"
    )
    if not args.dry_run:
        after = cache.info()
        print(f"{after['entries']} entries, {human_bytes(after['total_bytes'])} remain")
    return 0
