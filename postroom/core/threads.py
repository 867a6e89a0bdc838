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
    r"^\s*(?:re|fwd?|aw|sv|wg|vs|vl|antw|odp|tr|rif|res|enc|ynt|回复|回覆|答复|转发|轉寄)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*",
    re.IGNORECASE,
)
_LIST_TAG = re.compile(r"^\s*\[[^\[\]]{1,60}\]\s*")  # "[users] ", added by mailing lists
_TRAILER = re.compile(r"\s*\((?:fwd|fw)\)\s*$", re.IGNORECASE)
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
    kept and whitespace collapsed, for grouping a conversation's messages in a listing."""
    text = _WHITESPACE.sub(" ", subject).strip()
    while True:
        stripped = _TRAILER.sub("", text)
        stripped = _LIST_TAG.sub("", stripped, count=1)
        stripped = _PREFIX.sub("", stripped, count=1)
        if stripped == text:
            break
        text = stripped
    if not text:  # "[list]" alone, or "Re:" alone: keep what there was
        return _WHITESPACE.sub(" ", subject).strip()
    return text
