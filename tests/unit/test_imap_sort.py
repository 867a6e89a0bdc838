"""SORT and THREAD=REFERENCES (RFC 5256) on hand-made records."""

from __future__ import annotations

from postroom.core.models import Flags, HeaderSummary, MessageRecord
from postroom.imap.sort import base_subject, sort_records, thread_references, thread_text


def rec(uid: int, subject: str = "", date: float = 0.0, mid: str = "", parent: str = "",
        refs: tuple[str, ...] = (), sender: str = "", size: int = 1) -> MessageRecord:
    return MessageRecord(
        user_id="u", message_id=f"m{uid}", folder_id="f", uid=uid, modseq=1, flags=Flags(),
        internal_date=float(uid), size=size, blob_hash="0" * 64,
        headers=HeaderSummary(from_=sender, subject=subject, date=date or None, message_id=mid,
                              in_reply_to=parent, references=refs),
        snippet="", has_attachments=False, thread_id="t")


def test_base_subject() -> None:
    assert base_subject("Re: [list] Fwd: Hello  there (fwd)") == "HELLO THERE"
    assert base_subject("[Fwd: re: lunch]") == "LUNCH"
    assert base_subject("RE:RE: x") == "X"
    assert base_subject("[only a tag]") == "[ONLY A TAG]"


def test_sort_keys_reverse_and_ties() -> None:
    records = [rec(1, "b", 30, sender="Zed <z@x>", size=5), rec(2, "Re: a", 10, sender="a@x"),
               rec(3, "c", 20, sender="m@x", size=5)]
    assert [r.uid for r in sort_records(records, [("SUBJECT", False)])] == [2, 1, 3]
    assert [r.uid for r in sort_records(records, [("DATE", True)])] == [1, 3, 2]
    assert [r.uid for r in sort_records(records, [("FROM", False)])] == [2, 3, 1]
    assert [r.uid for r in sort_records(records, [("DISPLAYFROM", False)])] == [2, 3, 1]
    assert [r.uid for r in sort_records(records, [("SIZE", True), ("ARRIVAL", False)])] == [
        1, 3, 2]


def test_thread_references() -> None:
    records = [
        rec(1, "party", 1, "<a>"),
        rec(2, "Re: party", 2, "<b>", "<a>", ("<a>",)),
        rec(3, "other", 3, "<c>"),
        rec(4, "Re: party", 4, "<d>", "<a>", ("<a>",)),
        rec(5, "Re: party", 5, "<e>", "<b>", ("<a>", "<b>")),
        rec(6, "Re: lost parent", 6, "<f>", "<zz>", ("<zz>",)),
        rec(7, "Re: lost parent", 7, "<g>", "<zz>", ("<zz>",)),
        rec(8, "Re: other", 8, "<h>"),  # joined to 3 by subject
    ]
    roots = thread_references(records)
    assert thread_text(roots, lambda r: r.uid) == b"(1 (2 5)(4))(3 8)((6)(7))"
    assert thread_text(thread_references([]), lambda r: r.uid) == b""
