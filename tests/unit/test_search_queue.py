"""The search index queue of IMAP's writes: queued writes are regrouped into one index call per
kind (and user) without changing what the index ends up holding."""

from __future__ import annotations

from postroom.core.models import Flags, HeaderSummary, MessageRecord
from postroom.search.indexer import _Queued, _regroup


def _record(user: str, mid: str) -> MessageRecord:
    return MessageRecord(user, mid, "f", 1, 1, Flags.parse([]), 0.0, 10, "0" * 64,
                         HeaderSummary(), "", False, mid)


def test_interleaved_writes_become_one_call_per_kind_and_user() -> None:
    a1, a2, b1 = _record("a", "a1"), _record("a", "a2"), _record("b", "b1")
    batch = [
        _Queued("index", "a", [(a1, b"", None)]),
        _Queued("update", "a", [a1]),
        _Queued("index", "b", [(b1, b"", None)]),
        _Queued("remove", "a", ["a0"]),
        _Queued("index", "a", [(a2, b"", None)]),
        _Queued("update", "b", [b1]),
        _Queued("update", "a", [a2, a1]),
    ]
    grouped = _regroup(batch)
    assert [(q.kind, q.user_id) for q in grouped] == [
        ("index", ""), ("update", "a"), ("update", "b"), ("remove", "a")]
    assert [i[0].message_id for i in grouped[0].items] == ["a1", "b1", "a2"]
    # each user's changes keep their order: the last state of a1 is the last queued
    assert [r.message_id for r in grouped[1].items] == ["a1", "a2", "a1"]


def test_a_write_after_a_removal_of_its_message_keeps_the_queued_order() -> None:
    a1 = _record("a", "a1")
    batch = [_Queued("remove", "a", ["a1"]), _Queued("update", "a", [a1])]
    assert _regroup(batch) is batch
    other_user = [_Queued("remove", "b", ["a1"]), _Queued("update", "a", [a1])]
    assert [q.kind for q in _regroup(other_user)] == ["update", "remove"]
