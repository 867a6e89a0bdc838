"""Snippets with the matched words highlighted, as safe HTML (`<mark>` around each match).

Words are compared the way the index compares them (unicode61 with diacritics removed): case
and accents folded, so "resume" highlights "Résumé". Everything else is HTML-escaped.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Sequence

WORD = re.compile(r"[^\W_]+")
SNIPPET_CHARS = 200
_LEAD_WORDS = 6  # context shown before the first match


def fold(word: str) -> str:
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def term_words(text: str) -> tuple[str, ...]:
    return tuple(fold(m.group()) for m in WORD.finditer(text))


def highlight(text: str, phrases: Sequence[tuple[str, ...]],
              length: int = SNIPPET_CHARS) -> str:
    """About `length` characters of `text` around the first match of any phrase, escaped,
    with every match in it wrapped in <mark>; the start of the text when nothing matches."""
    words = list(WORD.finditer(text[:200_000]))
    folded = [fold(m.group()) for m in words]
    spans: list[tuple[int, int]] = []  # character spans of matches
    wanted = [p for p in phrases if p]
    for i in range(len(folded)):
        for phrase in wanted:
            n = len(phrase)
            if tuple(folded[i : i + n]) == phrase:
                spans.append((words[i].start(), words[i + n - 1].end()))
                break
    if spans:
        first = next(i for i, m in enumerate(words) if m.start() == spans[0][0])
        start = words[max(0, first - _LEAD_WORDS)].start()
    else:
        start = 0
    end = min(len(text), start + length)
    if end < len(text):  # do not cut a word
        cut = text.rfind(" ", start, end)
        end = cut if cut > start else end
    out: list[str] = ["…" if start > 0 else ""]
    pos = start
    for s, e in spans:
        if s < pos or s >= end:
            continue
        e = min(e, end)
        out.append(_squash(text[pos:s]))
        out.append("<mark>" + _squash(text[s:e]) + "</mark>")
        pos = e
    out.append(_squash(text[pos:end]))
    if end < len(text):
        out.append("…")
    return "".join(out).strip()


_SPACE = re.compile(r"\s+")


def _squash(text: str) -> str:
    return html.escape(_SPACE.sub(" ", text), quote=False)
