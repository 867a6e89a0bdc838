"""IMAP SEARCH narrowing: the text keys of a SEARCH program as an index criterion.

The criterion is only ever a necessary condition: AND and OR of text keys carry over, while
NOT and every non-text key (flags, dates, sizes, sequence sets) narrow nothing, so the index
returns a superset of the matches and IMAP applies RFC 3501 to that superset itself.
"""

from __future__ import annotations

from postroom.imap.search import All, Key, Or, Text
from postroom.store.search import AllOf, AnyOf, Contains, Criterion

NO_NARROWING = AllOf()


def criterion(key: Key) -> Criterion:
    if isinstance(key, Text):
        if key.where == "":
            return Contains("body", key.needle)
        if key.where == "*":
            return Contains("text", key.needle)
        if not key.needle:  # HEADER name "": every message with the field
            return NO_NARROWING
        return Contains("headers", key.needle)
    if isinstance(key, All):
        parts = tuple(c for c in (criterion(k) for k in key.keys) if c != NO_NARROWING)
        return AllOf(parts)
    if isinstance(key, Or):
        a, b = criterion(key.a), criterion(key.b)
        if NO_NARROWING in (a, b):
            return NO_NARROWING
        return AnyOf((a, b))
    return NO_NARROWING
