"""postroom.core.threads: reference lists and base subjects."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.core.models import HeaderSummary
from postroom.core.threads import MAX_THREAD_REFS, normalize_subject, thread_refs


def test_thread_refs_keeps_order_and_appends_the_parent() -> None:
    headers = HeaderSummary(
        in_reply_to="<parent@x>", references=("<root@x>", "<middle@x>")
    )
    assert thread_refs(headers) == ["<root@x>", "<middle@x>", "<parent@x>"]


def test_thread_refs_deduplicates() -> None:
    headers = HeaderSummary(
        in_reply_to="<middle@x>", references=("<root@x>", "<middle@x>", "<root@x>")
    )
    assert thread_refs(headers) == ["<root@x>", "<middle@x>"]


def test_thread_refs_with_only_one_of_the_two() -> None:
    assert thread_refs(HeaderSummary(in_reply_to="<p@x>")) == ["<p@x>"]
    assert thread_refs(HeaderSummary(references=("<a@x>", "<b@x>"))) == ["<a@x>", "<b@x>"]
    assert thread_refs(HeaderSummary()) == []


def test_thread_refs_bounded_to_the_newest() -> None:
    refs = tuple(f"<r{i}@x>" for i in range(200))
    result = thread_refs(HeaderSummary(in_reply_to="<parent@x>", references=refs))
    assert len(result) == MAX_THREAD_REFS == 50
    assert result[-1] == "<parent@x>"
    assert result[0] == "<r151@x>"


@settings(max_examples=200)
@given(
    st.lists(st.sampled_from([f"<{i}@x>" for i in range(80)]), max_size=150),
    st.sampled_from(["", "<1@x>", "<new@x>"]),
)
def test_thread_refs_properties(refs: list[str], parent: str) -> None:
    result = thread_refs(HeaderSummary(in_reply_to=parent, references=tuple(refs)))
    assert len(result) == len(set(result)) <= MAX_THREAD_REFS
    assert "" not in result
    assert set(result) <= {*refs, parent}
    if parent and len({*refs, parent}) <= MAX_THREAD_REFS:
        assert parent in result


@pytest.mark.parametrize(
    ("subject", "base"),
    [
        ("Hello", "Hello"),
        ("Re: Hello", "Hello"),
        ("RE: re: Hello", "Hello"),
        ("Fwd: Re: Hello", "Hello"),
        ("FW: Hello", "Hello"),
        ("AW: Hello", "Hello"),
        ("SV: Hello", "Hello"),
        ("Re[2]: Hello", "Hello"),
        ("Re(3): Hello", "Hello"),
        ("Re : Hello", "Hello"),
        ("[users] Re: Hello", "Hello"),
        ("Re: [users] Hello", "Hello"),
        ("Re: [users] Re: [users] Hello", "Hello"),
        ("Hello (fwd)", "Hello"),
        ("  Re:   Hello    world  ", "Hello world"),
        ("回复：你好", "你好"),
        ("Reply: Hello", "Reply: Hello"),
        ("Regarding the plan", "Regarding the plan"),
        ("Re:", "Re:"),
        ("[list]", "[list]"),
        ("", ""),
    ],
)
def test_normalize_subject(subject: str, base: str) -> None:
    assert normalize_subject(subject) == base


@settings(max_examples=200)
@given(st.text(max_size=100))
def test_normalize_subject_is_idempotent(subject: str) -> None:
    once = normalize_subject(subject)
    assert normalize_subject(once) == once
