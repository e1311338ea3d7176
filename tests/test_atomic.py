"""``volumes.atomic``: temporary files that name their writer, and the sweep of those a SIGKILL left.

Each test kills a real process (SIGKILL) at a known point of a write: after the temporary
file was written, before its rename (tests/kill_points.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kill_points import kill, wait_for
from volumes.atomic import HOST, atomic_path, is_temporary, sweep_temporaries, writer_alive

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}

WRITER = """
import sys, time
from pathlib import Path
from volumes.atomic import atomic_path
with atomic_path(sys.argv[1], suffix=".png") as tmp:
    tmp.write_bytes(b"half a picture")
    Path(sys.argv[2]).touch()
    time.sleep(3600)
"""


def _writer(target: Path, marker: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(marker)], env=ENV)
    wait_for(marker, process, "the writer never reached its stop point")
    return process


def _kill(process: subprocess.Popen, reap: bool = True) -> None:
    if reap:
        kill(process)
    else:  # killed, left a zombie until its parent waits
        process.send_signal(signal.SIGKILL)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(".*"))


def test_a_killed_writers_temporary_file_is_swept_and_a_live_writers_is_not(tmp_path):
    folder = tmp_path / "case"
    dead = _writer(folder / "a.png", tmp_path / "a.ready")
    live = _writer(folder / "b.png", tmp_path / "b.ready")
    try:
        _kill(dead)
        left = _hidden(folder)
        assert len(left) == 2 and all(is_temporary(name) for name in left)
        assert any(f".~{dead.pid}@{HOST}." in name for name in left)
        (folder / ".keep").write_text("a user's hidden file")  # not ours: never touched
        removed = sweep_temporaries(folder, unknown_after_s=0)
        assert [p.name for p in removed] == [n for n in left if f"~{dead.pid}@" in n]
        assert _hidden(folder) == sorted([".keep", *(n for n in left if f"~{live.pid}@" in n)])
        assert not (folder / "a.png").exists() and not (folder / "b.png").exists()
        # killed but not yet reaped by its parent (a zombie) is dead too
        _kill(live, reap=False)
        deadline = time.time() + 30
        while writer_alive(live.pid) and time.time() < deadline:
            time.sleep(0.02)
        assert writer_alive(live.pid) is False
        assert len(sweep_temporaries(folder, unknown_after_s=None)) == 1
        assert _hidden(folder) == [".keep"]
    finally:
        for process in (dead, live):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def test_owners_that_cannot_be_checked_go_only_after_the_callers_age(tmp_path):
    names = [".x.png.~12@00000000.abcd1234.png",  # another host's writer
             ".overview.png.k2j9x0q_.png", ".record.json.ab_cd123.tmp", ".a_seg.nii.gz.zz9y8x7w.nii.gz"]  # older names
    for name in names:
        (tmp_path / name).write_bytes(b"")
    for name in (".notes.txt", ".cfg.abcdefgh.json", "visible.k2j9x0q_.png"):  # not temporaries of ours
        (tmp_path / name).write_bytes(b"")
    assert all(is_temporary(n) for n in names)
    assert sweep_temporaries(tmp_path, unknown_after_s=None) == []
    assert sweep_temporaries(tmp_path, unknown_after_s=3600) == []  # younger than an hour
    old = time.time() - 7200
    os.utime(tmp_path / names[0], (old, old))
    assert [p.name for p in sweep_temporaries(tmp_path, unknown_after_s=3600)] == [names[0]]
    assert sorted(p.name for p in sweep_temporaries(tmp_path, unknown_after_s=0)) == sorted(names[1:])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cfg.abcdefgh.json", ".notes.txt", "visible.k2j9x0q_.png"]


def test_writer_alive_knows_this_host_only():
    assert writer_alive(os.getpid()) is True
    assert writer_alive(os.getpid(), host="00000000" if HOST != "00000000" else "11111111") is None


def test_an_exception_still_removes_the_temporary_file_at_once(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_opening_the_cache_sweeps_a_put_killed_mid_write(tmp_path):
    from volumes.cache import EmbeddingCache

    key = "ab" * 16
    marker = tmp_path / "stopped"
    code = ("import sys, numpy as np; from pathlib import Path; from kill_points import stop_before_rename; "
            f"stop_before_rename('{key}.npz', Path(sys.argv[2])); "
            "from volumes.cache import EmbeddingCache; "
            f"EmbeddingCache(sys.argv[1]).put('{key}', {{'cls': np.ones((3, 4), np.float32)}})")
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache"), str(marker)], env=ENV)
    try:
        wait_for(marker, process, "the writer never reached its stop point")
        _kill(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    shard = tmp_path / "cache" / key[:2]
    [stray] = [p for p in shard.iterdir()]
    assert is_temporary(stray.name) and stray.stat().st_size > 0
    cache = EmbeddingCache(tmp_path / "cache")
    assert cache.swept == [stray] and list(shard.iterdir()) == []
    cache.put(key, {"cls": np.ones((3, 4), np.float32)})
    assert np.array_equal(cache.get(key)["cls"], np.ones((3, 4), np.float32))


def test_a_pacs_node_sweeps_what_a_killed_node_left_in_storage_and_results(tmp_path):
    pytest.importorskip("pynetdicom")
    from volumes.pacs.config import load_config
    from volumes.pacs.job import PacsNode

    path = tmp_path / "node.json"
    path.write_text('{"storage": "in", "output": "out"}')
    series = tmp_path / "in" / "1.2.3" / "1.2.3.4"
    results = tmp_path / "out" / "results" / "job"
    pulled = _writer(series / "1.2.3.4.5.dcm", tmp_path / "pull.ready")
    _kill(pulled)
    sr = _writer(results / "sr.dcm", tmp_path / "sr.ready")
    _kill(sr)
    assert len(_hidden(series)) == 1 and len(_hidden(results)) == 1
    (series / "1.2.3.4.6.dcm").write_bytes(b"a stored instance")
    node = PacsNode(load_config(path), models=[])
    try:
        assert _hidden(series) == [] and _hidden(results) == []
        assert [p.name for p in series.iterdir()] == ["1.2.3.4.6.dcm"]
    finally:
        node.close()
