"""The search query language, parsed into a tree (one parser for the REST API and webmail).

    query    := or_expr
    or_expr  := and_expr ("OR" and_expr)*
    and_expr := unary (["AND"] unary)*            all must match
    unary    := "-" unary | "(" or_expr ")" | operator ":" value | "phrase" | word

Operators: from: to: cc: bcc: subject: filename: (a word or a "quoted phrase"), has:attachment,
is:unread|read|starred|flagged|answered|draft, in:FOLDER, before: after: (YYYY-MM-DD or
YYYY/MM/DD), older_than: newer_than: (N followed by d, w, m or y), larger: smaller: (N with an
optional K, M or G). A word with a colon whose prefix is no operator ("re:", "http://...") is an
ordinary word. A malformed query raises QuerySyntaxError with the 0-based position of the fault.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

TEXT_OPERATORS = ("from", "to", "cc", "bcc", "subject", "filename")
OPERATORS = (*TEXT_OPERATORS, "has", "is", "in", "before", "after", "older_than",
             "newer_than", "larger", "smaller")
IS_VALUES = ("unread", "read", "starred", "flagged", "answered", "draft")
MAX_QUERY_LENGTH = 2000
MAX_DEPTH = 50

_AGE = re.compile(r"(\d{1,6})([dwmy])", re.IGNORECASE)
_SIZE = re.compile(r"(\d{1,12})([kmg]?)b?", re.IGNORECASE)
_DATE = re.compile(r"(\d{4})[-/](\d{1,2})[-/](\d{1,2})")
_AGE_UNITS = {"d": 1, "w": 7, "m": 30, "y": 365}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


class QuerySyntaxError(ValueError):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at position {position}")
        self.reason = message
        self.position = position


# ---- the tree -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Term:
    """A word or a phrase, in one field (TEXT_OPERATORS) or any."""

    text: str
    field: str | None = None
    phrase: bool = False


@dataclass(frozen=True, slots=True)
class IsFlag:
    name: str  # one of IS_VALUES


@dataclass(frozen=True, slots=True)
class HasAttachment:
    pass


@dataclass(frozen=True, slots=True)
class InFolder:
    name: str
    position: int


@dataclass(frozen=True, slots=True)
class DateBound:
    """before: (until the start of `day`) or after: (from the start of `day`), in UTC."""

    day: datetime.date
    before: bool


@dataclass(frozen=True, slots=True)
class Age:
    """older_than: / newer_than: a number of days."""

    days: int
    older: bool


@dataclass(frozen=True, slots=True)
class Size:
    octets: int
    larger: bool


@dataclass(frozen=True, slots=True)
class AllOf:
    children: tuple[Query, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    children: tuple[Query, ...]


@dataclass(frozen=True, slots=True)
class Exclude:
    child: Query


Query = Term | IsFlag | HasAttachment | InFolder | DateBound | Age | Size | AllOf | AnyOf | Exclude


# ---- tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "(", ")", "-", "OR", "AND", "word", "phrase", "op"
    text: str
    pos: int
    value: str = ""  # an operator's value
    value_pos: int = 0
    quoted: bool = False  # the operator's value was a quoted phrase


def _quoted(q: str, i: int) -> tuple[str, int]:
    """The phrase opening at q[i] == '"' and the index after its closing quote."""
    end = q.find('"', i + 1)
    if end < 0:
        raise QuerySyntaxError("unterminated quoted phrase", i)
    return q[i + 1 : end], end + 1


def _word_end(q: str, i: int) -> int:
    while i < len(q) and not q[i].isspace() and q[i] not in '()"':
        i += 1
    return i


def _tokens(q: str) -> list[_Token]:
    out: list[_Token] = []
    i = 0
    while i < len(q):
        c = q[i]
        if c.isspace():
            i += 1
        elif c in "()":
            out.append(_Token(c, c, i))
            i += 1
        elif c == '"':
            text, end = _quoted(q, i)
            out.append(_Token("phrase", text, i))
            i = end
        elif c == "-" and i + 1 < len(q) and not q[i + 1].isspace():
            out.append(_Token("-", c, i))
            i += 1
        else:
            end = _word_end(q, i)
            word = q[i:end]
            name, colon, _ = word.partition(":")
            if colon and name.lower() in OPERATORS:
                vpos = i + len(name) + 1
                if vpos < len(q) and q[vpos] == '"':
                    value, end = _quoted(q, vpos)
                    out.append(_Token("op", name.lower(), i, value, vpos, True))
                else:
                    vend = _word_end(q, vpos)
                    if vend == vpos:
                        raise QuerySyntaxError(f"{name.lower()}: needs a value", vpos)
                    out.append(_Token("op", name.lower(), i, q[vpos:vend], vpos))
                    end = vend
            elif word in ("OR", "AND"):
                out.append(_Token(word, word, i))
            elif word == "-":
                raise QuerySyntaxError("'-' must be followed by what to exclude", i)
            else:
                out.append(_Token("word", word, i))
            i = end
    return out


# ---- the parser -----------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, tokens: list[_Token]) -> None:
        self.text = text
        self.tokens = tokens
        self.i = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def end_pos(self) -> int:
        return len(self.text)

    def or_expr(self, depth: int) -> Query:
        if depth > MAX_DEPTH:
            tok = self.peek()
            raise QuerySyntaxError("query nested too deeply", tok.pos if tok else 0)
        first = self.peek()
        if first is not None and first.kind == "OR":
            raise QuerySyntaxError("OR needs a term on each side", first.pos)
        children = [self.and_expr(depth)]
        while (tok := self.peek()) is not None and tok.kind == "OR":
            self.i += 1
            nxt = self.peek()
            if nxt is None or nxt.kind in (")", "OR", "AND"):
                raise QuerySyntaxError("OR needs a term on each side",
                                       nxt.pos if nxt else self.end_pos())
            children.append(self.and_expr(depth))
        return children[0] if len(children) == 1 else AnyOf(tuple(children))

    def and_expr(self, depth: int) -> Query:
        children: list[Query] = []
        while (tok := self.peek()) is not None and tok.kind not in (")", "OR"):
            if tok.kind == "AND":
                self.i += 1
                nxt = self.peek()
                if not children or nxt is None or nxt.kind in (")", "OR", "AND"):
                    raise QuerySyntaxError("AND needs a term on each side", tok.pos)
                continue
            children.append(self.unary(depth))
        if not children:
            tok = self.peek()
            raise QuerySyntaxError("expected a search term", tok.pos if tok else self.end_pos())
        return children[0] if len(children) == 1 else AllOf(tuple(children))

    def unary(self, depth: int) -> Query:
        tok = self.peek()
        assert tok is not None
        self.i += 1
        if tok.kind == "-":
            nxt = self.peek()
            if nxt is None or nxt.kind in (")", "OR", "AND"):
                raise QuerySyntaxError("'-' must be followed by what to exclude", tok.pos)
            return Exclude(self.unary(depth + 1))
        if tok.kind == "(":
            inner = self.peek()
            if inner is not None and inner.kind == ")":
                raise QuerySyntaxError("empty parentheses", tok.pos)
            node = self.or_expr(depth + 1)
            close = self.peek()
            if close is None or close.kind != ")":
                raise QuerySyntaxError("unclosed parenthesis", tok.pos)
            self.i += 1
            return node
        if tok.kind == "phrase":
            return Term(tok.text, None, True)
        if tok.kind == "word":
            return Term(tok.text)
        if tok.kind == "op":
            return _operator(tok)
        raise QuerySyntaxError(f"unexpected {tok.text!r}", tok.pos)


def _operator(tok: _Token) -> Query:
    name, value, vpos = tok.text, tok.value, tok.value_pos
    if name in TEXT_OPERATORS:
        if not value.strip():
            raise QuerySyntaxError(f"{name}: needs a value", vpos)
        return Term(value, name, tok.quoted)
    lowered = value.lower()
    if name == "has":
        if lowered not in ("attachment", "attachments"):
            raise QuerySyntaxError(f"has: knows only 'attachment', not {value!r}", vpos)
        return HasAttachment()
    if name == "is":
        if lowered not in IS_VALUES:
            raise QuerySyntaxError(
                f"is: takes one of {', '.join(IS_VALUES)}, not {value!r}", vpos)
        return IsFlag(lowered)
    if name == "in":
        if not value.strip():
            raise QuerySyntaxError("in: needs a folder name", vpos)
        return InFolder(value, vpos)
    if name in ("before", "after"):
        m = _DATE.fullmatch(value)
        if m is None:
            raise QuerySyntaxError(f"{name}: wants a date as YYYY-MM-DD, not {value!r}", vpos)
        try:
            day = datetime.date(int(m[1]), int(m[2]), int(m[3]))
        except ValueError:
            raise QuerySyntaxError(f"{name}: {value!r} is not a calendar date", vpos) from None
        return DateBound(day, name == "before")
    if name in ("older_than", "newer_than"):
        m = _AGE.fullmatch(value)
        if m is None:
            raise QuerySyntaxError(
                f"{name}: wants a number and d, w, m or y (7d, 2m, 1y), not {value!r}", vpos)
        return Age(int(m[1]) * _AGE_UNITS[m[2].lower()], name == "older_than")
    # larger: / smaller:
    m = _SIZE.fullmatch(value)
    if m is None:
        raise QuerySyntaxError(
            f"{name}: wants a size such as 500, 10K or 5M, not {value!r}", vpos)
    return Size(int(m[1]) * _SIZE_UNITS[m[2].lower()], name == "larger")


def parse_query(text: str) -> Query | None:
    """The tree of a query; None for a blank query (everything)."""
    if len(text) > MAX_QUERY_LENGTH:
        raise QuerySyntaxError(f"query longer than {MAX_QUERY_LENGTH} characters",
                               MAX_QUERY_LENGTH)
    tokens = _tokens(text)
    if not tokens:
        return None
    parser = _Parser(text, tokens)
    tree = parser.or_expr(0)
    extra = parser.peek()
    if extra is not None:
        raise QuerySyntaxError(
            "unbalanced ')'" if extra.kind == ")" else f"unexpected {extra.text!r}", extra.pos)
    return tree


def positive_terms(node: Query | None) -> list[Term]:
    """The terms a match can be credited to (not under an exclusion): ranking, highlights."""
    if node is None:
        return []
    if isinstance(node, Term):
        return [node]
    if isinstance(node, AllOf | AnyOf):
        return [t for child in node.children for t in positive_terms(child)]
    return []


def mentions_folder(node: Query | None) -> bool:
    """Does the query ask for a folder (in:)? Then Trash and Junk are not hidden by default.
    An excluded folder (-in:inbox) does not count: it narrows, it does not ask."""
    if isinstance(node, InFolder):
        return True
    if isinstance(node, AllOf | AnyOf):
        return any(mentions_folder(c) for c in node.children)
    return False
