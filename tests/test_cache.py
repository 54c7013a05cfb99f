"""Building cache entries with several processes: one builds, the others wait; no staging is left.

Uses a temporary REGAP_CACHE and a tiny fake weight wheel, never the real cache.
"""

from __future__ import annotations

import pytest

import hashlib
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from regap.cache import clean_stale_staging, staging_path

PARTS = {"fakew/data/part01.bin": b"a" * 3000, "fakew/data/part02.bin": b"b" * 1000}

# Run in two processes at once: a fake asset whose conversion is slow enough for both to be
# inside resolve() together; each process appends "convert PID" to events.log when converting.
SCRIPT = r'''
import hashlib, os, sys, time
from pathlib import Path
from regap.models.loading import sources
from regap.models.converters import _staged_folder
from regap.models.loading.sources import PackagedFile

root = Path(sys.argv[1])
payload = b"a" * 3000 + b"b" * 1000

def convert(source, out):
    with open(root / "events.log", "a") as log:
        log.write(f"convert {os.getpid()}\n")
    time.sleep(1.0)  # a window in which another process could start the same conversion
    with _staged_folder(out) as staging:
        (staging / "weights.bin").write_bytes(source.read_bytes())
    return out

sources.ASSETS["fake-asset"] = sources.OfflineAsset(
    name="fake-asset", description="a tiny fake asset",
    parts=(PackagedFile("fakew", "0.1", "fakew/data/part01.bin"), PackagedFile("fakew", "0.1", "fakew/data/part02.bin")),
    file_name="fake.bin", sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), install="(test)",
    convert=convert)
(root / f"ready-{os.getpid()}").touch()
while len(list(root.glob("ready-*"))) < 2:  # start both builds together
    time.sleep(0.01)
print(sources.resolve("regap:fake-asset"))
'''


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _with_pid(target: Path, pid: int) -> Path:
    """A staging name of `target` as process `pid` on this host would have made it."""
    path = staging_path(target)
    return path.with_name(path.name.replace(f"-{os.getpid()}-", f"-{pid}-"))


def test_stale_staging_is_removed_and_live_staging_kept(tmp_path):
    target = tmp_path / "weights.bin"
    legacy = tmp_path / "weights.bin.partial"  # the fixed name earlier versions used
    dead = _with_pid(target, _dead_pid())
    mine = staging_path(target)
    other_host_fresh = tmp_path / "weights.bin.partial-elsewhere-12-abcd"
    other_host_old = tmp_path / "weights.bin.partial-elsewhere-13-abcd"
    for path in (legacy, dead, mine):
        path.write_bytes(b"x")
    for path in (other_host_fresh, other_host_old):
        path.mkdir()
        (path / "config.json").write_text("{}")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(other_host_old, (two_days_ago, two_days_ago))
    unrelated = tmp_path / "weights.bin.lock"
    unrelated.write_text("")

    removed = clean_stale_staging(target)
    assert sorted(p.name for p in removed) == sorted(p.name for p in (legacy, dead, other_host_old))
    assert mine.exists() and other_host_fresh.exists() and unrelated.exists()
    assert not legacy.exists() and not dead.exists() and not other_host_old.exists()


@pytest.mark.slow
def test_two_processes_on_an_empty_cache_build_once_and_leave_no_staging(tmp_path):
    cache = tmp_path / "cache"
    wheels = cache / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "fakew-0.1-py3-none-any.whl", "w") as wheel:
        for member, data in PARTS.items():
            wheel.writestr(member, data)
    # leftovers of a build killed earlier: the old fixed name and a dead process's staging folder
    (cache / "sources").mkdir()
    (cache / "sources" / "fake.bin.partial").write_bytes(b"half")
    (cache / "assets").mkdir()
    dead = _with_pid(cache / "assets" / "fake-asset", _dead_pid())
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")

    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "REGAP_CACHE": str(cache), "REGAP_OFFLINE_FETCH": "0", "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, results):
        assert process.returncode == 0, err
    folder = cache / "assets" / "fake-asset"
    assert [out.strip() for out, _ in results] == [str(folder)] * 2
    assert len((tmp_path / "events.log").read_text().splitlines()) == 1  # converted once, reused by the other
    assert (folder / "weights.bin").read_bytes() == b"".join(PARTS.values())
    assert (folder / "regap_asset.json").is_file()
    assert hashlib.sha256((cache / "sources" / "fake.bin").read_bytes()).hexdigest() == \
        hashlib.sha256(b"".join(PARTS.values())).hexdigest()
    assert not [p for p in cache.rglob("*") if ".partial" in p.name]  # no staging, stale or new, is left
    errors = "".join(err for _, err in results)
    assert errors.count("assembling fake.bin") == 1 and "converting fake.bin" in errors
    assert "removed 1 unfinished leftover(s) of fake.bin" in errors
