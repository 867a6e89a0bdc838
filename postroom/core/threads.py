"""Conversation threading: which earlier messages a message answers, and subject grouping.

Threads are found by message ids (RFC 5322 §3.6.4: In-Reply-To and References), the way
JWZ's algorithm and RFC 5256 REFERENCES threading start; the subject is only a display aid.
"""

from __future__ import annotations

import re

from postroom.core.models import HeaderSummary

__all__ = ["MAX_THREAD_REFS", "normalize_subject", "thread_refs"]

MAX_THREAD_REFS = 50

# Reply and forward markers in the languages mail clients actually write (RFC 5256 §2.1
# lists only Re and Fwd; Outlook translates them). Each may carry a counter: "Re[2]:", "Re(3):".
_PREFIX = re.compile(
    r"\s*(?:re|fwd?|aw|sv|wg|vs|vl|antw|odp|tr|rif|res|enc|ynt|回复|回覆|答复|转发|轉寄)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*",
    re.IGNORECASE,
)
_LIST_TAG = re.compile(r"\s*\[[^\[\]]{1,60}\]\s*")  # "[users] ", added by mailing lists
_WHITESPACE = re.compile(r"\s+")


def thread_refs(headers: HeaderSummary) -> list[str]:
    """The ids of the messages this one follows, oldest first and its parent last.

    References lists the thread's ancestry oldest first (RFC 5322 §3.6.4); In-Reply-To
    names the parent, and is appended when References lacks it (some clients send only one
    of the two). Duplicates are dropped, first place kept; only the newest MAX_THREAD_REFS
    are returned, so a runaway References field costs nothing.
    """
    refs: list[str] = []
    seen: set[str] = set()
    for ref in (*headers.references, headers.in_reply_to):
        ref = ref.strip()
        if ref and ref not in seen:
            seen.add(ref)
            refs.append(ref)
    return refs[-MAX_THREAD_REFS:]


def normalize_subject(subject: str) -> str:
    """"Re: [list] Fwd: Hello (fwd)" -> "Hello": the base subject (RFC 5256 §2.1) with case
    kept and whitespace collapsed, for grouping a conversation's messages in a listing.

    Each pass takes a "(fwd)" or "(fw)" off the end, then a list tag and a reply marker off
    the start, until none is left; worked on as a window over the subject, so a subject of
    thousands of them costs its length, not its length squared."""
    text = _WHITESPACE.sub(" ", subject).strip()
    start, end = 0, len(text)
    while True:
        before = (start, end)
        end = _without_trailer(text, start, end)
        for marker in (_LIST_TAG, _PREFIX):
            found = marker.match(text, start, end)
            if found is not None:
                start = found.end()
        if (start, end) == before:
            break
    if start >= end:  # "[list]" alone, or "Re:" alone: keep what there was
        return text
    return text[start:end]


def _without_trailer(text: str, start: int, end: int) -> int:
    """Where the text ends once a "(fwd)" or "(fw)" (any case) at its end is taken off,
    with the white space around it."""
    cut = end
    while cut > start and text[cut - 1].isspace():
        cut -= 1
    for trailer in ("(fwd)", "(fw)"):
        if cut - start >= len(trailer) and text[cut - len(trailer):cut].lower() == trailer:
            cut -= len(trailer)
            while cut > start and text[cut - 1].isspace():
                cut -= 1
            return cut
    return end
