"""Snippets with the matched words highlighted, as safe HTML (`<mark>` around each match).

Words are compared the way the index compares them (unicode61 with diacritics removed): case
and accents folded, so "resume" highlights "Résumé". Everything else is HTML-escaped.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from collections.abc import Sequence

WORD = re.compile(r"[^\W_]+")
SNIPPET_CHARS = 200
_LEAD_WORDS = 6  # context shown before the first match
SCAN_CHARS = 20_000


def fold(word: str) -> str:
    if word.isascii():
        return word.lower()
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def term_words(text: str) -> tuple[str, ...]:
    return tuple(fold(m.group()) for m in WORD.finditer(text))


@functools.lru_cache(maxsize=4096)
def _fold_char(c: str) -> str:
    folded = fold(c)
    return folded[0] if folded else c


def _folded(text: str) -> str:
    """The text folded as words are, keeping every character at its place."""
    if text.isascii():
        return text.lower()
    return "".join(_fold_char(c) for c in text)


def highlight(text: str, phrases: Sequence[tuple[str, ...]],
              length: int = SNIPPET_CHARS) -> str:
    """About `length` characters of `text` around the first match of any phrase, escaped,
    with every match in it wrapped in <mark>; the start of the text when nothing matches.

    Only the first SCAN_CHARS characters are looked at: a snippet shows where a message
    starts to match, and this runs for every result of every page.
    """
    wanted = sorted({p for p in phrases if p}, key=len, reverse=True)
    spans: list[tuple[int, int]] = []  # character spans of matches
    if wanted:
        pattern = re.compile("|".join(
            r"[\W_]+".join(re.escape(w) for w in phrase) for phrase in wanted))
        folded = _folded(text[:SCAN_CHARS])
        # whole words only (checked here: a leading look-behind would stop the regex
        # engine from scanning for the literal prefix, several times slower)
        spans = [m.span() for m in pattern.finditer(folded)
                 if not _is_word_char(folded, m.start() - 1)
                 and not _is_word_char(folded, m.end())]
    words: list[re.Match[str]] = []
    if spans:  # a few words of context before the first match
        lead = WORD.finditer(text, max(0, spans[0][0] - 20 * _LEAD_WORDS), spans[0][0])
        words = list(lead)[-_LEAD_WORDS:]
    start = words[0].start() if words else (spans[0][0] if spans else 0)
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


def _is_word_char(text: str, i: int) -> bool:
    return 0 <= i < len(text) and text[i].isalnum()


def _squash(text: str) -> str:
    return html.escape(_SPACE.sub(" ", text), quote=False)
