"""The query language parser: the tree it builds and where it reports a fault."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.search.query import (
    Age,
    AllOf,
    AnyOf,
    DateBound,
    Exclude,
    HasAttachment,
    InFolder,
    IsFlag,
    QuerySyntaxError,
    Size,
    Term,
    mentions_folder,
    parse_query,
    positive_terms,
)


@pytest.mark.parametrize(("text", "tree"), [
    ("", None),
    ("   ", None),
    ("hello", Term("hello")),
    ("hello world", AllOf((Term("hello"), Term("world")))),
    ("hello AND world", AllOf((Term("hello"), Term("world")))),
    ('"hello world"', Term("hello world", None, True)),
    ("-spam", Exclude(Term("spam"))),
    ("a OR b c", AnyOf((Term("a"), AllOf((Term("b"), Term("c")))))),
    ("(a OR b) c", AllOf((AnyOf((Term("a"), Term("b"))), Term("c")))),
    ("-(a b)", Exclude(AllOf((Term("a"), Term("b"))))),
    ("from:alice@example.org", Term("alice@example.org", "from")),
    ('subject:"big news"', Term("big news", "subject", True)),
    ("FROM:Bob", Term("Bob", "from")),
    ("filename:report.pdf", Term("report.pdf", "filename")),
    ("has:attachment", HasAttachment()),
    ("is:Unread", IsFlag("unread")),
    ("in:Projects/Apollo", InFolder("Projects/Apollo", 3)),
    ("before:2024-03-05", DateBound(datetime.date(2024, 3, 5), True)),
    ("after:2024/3/5", DateBound(datetime.date(2024, 3, 5), False)),
    ("older_than:2w", Age(14, True)),
    ("newer_than:1y", Age(365, False)),
    ("larger:10K", Size(10 * 1024, True)),
    ("smaller:5mb", Size(5 * 1024 * 1024, False)),
    ("larger:300", Size(300, True)),
    # a colon after a word that is no operator is part of the word
    ("re:meeting", Term("re:meeting")),
    ("http://example.org/x", Term("http://example.org/x")),
    ("e-mail", Term("e-mail")),
    ("or and", AllOf((Term("or"), Term("and")))),  # only upper-case OR/AND are operators
])
def test_trees(text: str, tree: object) -> None:
    assert parse_query(text) == tree


@pytest.mark.parametrize(("text", "position", "words"), [
    ("(a", 0, "unclosed parenthesis"),
    ("a (b OR c", 2, "unclosed parenthesis"),
    ("a)", 1, "unbalanced"),
    ("()", 0, "empty parentheses"),
    ('x "open', 2, "unterminated"),
    ('from:"open', 5, "unterminated"),
    ("from:", 5, "needs a value"),
    ("subject: x", 8, "needs a value"),
    ("OR x", 0, "OR needs"),
    ("x OR", 4, "OR needs"),
    ("x OR OR y", 5, "OR needs"),
    ("x -", 2, "'-'"),
    ("-", 0, "'-'"),
    ("is:", 3, "needs a value"),
    ("is:spam", 3, "is: takes"),
    ("has:link", 4, "has:"),
    ("before:today", 7, "YYYY-MM-DD"),
    ("before:2023-02-29", 7, "not a calendar date"),
    ("older_than:7", 11, "older_than:"),
    ("newer_than:1h", 11, "newer_than:"),
    ("larger:big", 7, "larger:"),
    ("AND x", 0, "AND needs"),
])
def test_errors_carry_their_position(text: str, position: int, words: str) -> None:
    with pytest.raises(QuerySyntaxError) as err:
        parse_query(text)
    assert err.value.position == position
    assert words in str(err.value)
    assert str(err.value).endswith(f"at position {position}")


def test_deep_nesting_and_long_queries_are_refused() -> None:
    with pytest.raises(QuerySyntaxError, match="nested too deeply"):
        parse_query("(" * 200 + "x" + ")" * 200)
    with pytest.raises(QuerySyntaxError, match="longer than"):
        parse_query("x " * 2000)


def test_terms_for_ranking_skip_exclusions() -> None:
    tree = parse_query('a -b (c OR -d) from:e "f g"')
    assert [t.text for t in positive_terms(tree)] == ["a", "c", "e", "f g"]


def test_a_folder_asked_for_lifts_the_default_scope() -> None:
    assert mentions_folder(parse_query("x in:trash"))
    assert mentions_folder(parse_query("x OR in:junk"))
    assert not mentions_folder(parse_query("x -in:inbox"))
    assert not mentions_folder(parse_query("x"))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('ab :()"-ORANDfromis')), max_size=40))
def test_any_text_parses_or_fails_with_a_position_inside_it(text: str) -> None:
    try:
        parse_query(text)
    except QuerySyntaxError as exc:
        assert 0 <= exc.position <= len(text)
