"""SORT and THREAD=REFERENCES (RFC 5256) on hand-made records."""

from __future__ import annotations

import random
import re
import time

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
    assert base_subject("[a] [b]") == "[B]" and base_subject("[a] [b] x") == "X"
    assert base_subject("[a] re[2]: [fwd: x (FWD)]  (fwd)") == "X"


# RFC 5256 §2.1 as regexes applied one step at a time (what base_subject did before it
# worked on a window; quadratic in the number of tags and trailers)
_BLOB = r"\[[^\[\]]*\]"
_LEADER = re.compile(rf"^(?:\s*{_BLOB})*\s*(?:re|fwd?)\s*(?:{_BLOB})?\s*:", re.IGNORECASE)
_BLOB_LEAD = re.compile(rf"^\s*{_BLOB}\s*")
_TRAILER = re.compile(r"\s*\(fwd\)\s*$", re.IGNORECASE)
_FWD_WRAP = re.compile(r"^\[fwd:(.*)\]$", re.IGNORECASE | re.DOTALL)


def _stepwise(subject: str) -> str:
    text = " ".join(subject.split())
    while True:
        before = text
        while (stripped := _TRAILER.sub("", text)) != text:
            text = stripped
        while True:
            stripped = _LEADER.sub("", text, count=1).lstrip()
            if stripped == text:
                blobless = _BLOB_LEAD.sub("", text, count=1)
                if blobless and blobless != text:
                    stripped = blobless
            if stripped == text:
                break
            text = stripped
        wrapped = _FWD_WRAP.match(text)
        if wrapped:
            text = wrapped.group(1).strip()
        if text == before:
            return text.upper()


def test_base_subject_as_the_steps_give_it() -> None:
    rng = random.Random(23)
    pieces = ["re", "RE", "fwd", "Fw", "f", ":", "[", "]", "[a]", "[fwd:", "(fwd)", "(FWD)",
              " ", "\t", "x", "re:", "[2]", "\u00e9"]
    for _ in range(40_000):
        subject = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert base_subject(subject) == _stepwise(subject), subject


def test_base_subject_of_thousands_of_tags_costs_little() -> None:
    started = time.process_time()
    for subject in ("[a] " * 20_000 + "x", "x" + " (fwd)" * 20_000, "[fwd: " * 20_000 + "x"
                    + "]" * 20_000, "re: [a] " * 20_000 + "x", "[a]" * 20_000):
        base_subject(subject)
    assert time.process_time() - started < 1.0


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
