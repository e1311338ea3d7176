"""The stored digest formats stay what earlier versions wrote (resume records, cache keys)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from volumes.hashing import CONTENT, NAMED, NAMED_NUL, sha256_files


def _files(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "series"
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "b.dcm", folder / "a.dcm", folder / "sub" / "c.bin"]
    for i, path in enumerate(paths):
        path.write_bytes(bytes(range(i, i + 200)) * (3000 * (i + 1)))  # several read chunks
    return paths


def test_content_digest_is_the_plain_sha256_of_the_bytes(tmp_path):
    path = _files(tmp_path)[0]
    assert sha256_files(path, names=CONTENT) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_named_digest_of_a_folder_walks_it_sorted_by_path(tmp_path):
    paths = _files(tmp_path)
    expected = hashlib.sha256()
    for path in sorted(paths):  # the Hugging Face weights folder format of SliceEncoder.weights_id
        expected.update(path.name.encode() + path.read_bytes())
    assert sha256_files(tmp_path / "series", names=NAMED) == expected.hexdigest()


def test_nul_named_digest_sorts_by_file_name(tmp_path):
    paths = _files(tmp_path)
    expected = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):  # input_sha256 of a DICOM series
        expected.update(path.name.encode() + b"\0" + path.read_bytes())
    assert sha256_files(paths, names=NAMED_NUL, sort_by_name=True) == expected.hexdigest()
    assert sha256_files(paths[::-1], names=NAMED_NUL, sort_by_name=True) == expected.hexdigest()
    assert sha256_files(paths, names=NAMED_NUL) != expected.hexdigest()  # order matters without sorting
