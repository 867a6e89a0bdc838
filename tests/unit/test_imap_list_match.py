"""LIST wildcard matching (RFC 3501 §6.3.8) as the plain regex reading says, in linear time."""

from __future__ import annotations

import random
import re
import time

from postroom.imap.session import _match


def _by_regex(pattern: str, name: str) -> bool:
    if name == "INBOX" or name.startswith("INBOX/"):
        if pattern[:5].upper() == "INBOX":
            pattern = "INBOX" + pattern[5:]
    rx = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.DOTALL) is not None


def test_wildcards_as_rfc_3501_reads() -> None:
    assert _match("*", "a/b/c") and _match("%", "Sent") and not _match("%", "a/b")
    assert _match("a/%", "a/b") and not _match("a/%", "a/b/c") and _match("a/*", "a/b/c")
    assert _match("inbox", "INBOX") and _match("InBox/%", "INBOX/x") and not _match("inbox", "x")
    assert _match("", "") and not _match("", "a") and _match("%", "")
    rng = random.Random(17)
    for _ in range(20_000):
        pattern = "".join(rng.choice("ab/*%") for _ in range(rng.randint(0, 7)))
        name = "".join(rng.choice("ab/") for _ in range(rng.randint(0, 8)))
        assert _match(pattern, name) == _by_regex(pattern, name), (pattern, name)


def test_a_pathological_pattern_costs_little() -> None:
    # trying each split in turn takes exponential time on this (minutes)
    name = "a" * 200
    started = time.process_time()
    assert not _match("%*" * 30 + "b", name)
    assert not _match("*a" * 40 + "b", name)
    assert time.process_time() - started < 0.5
