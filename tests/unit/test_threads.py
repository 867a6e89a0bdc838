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


def _stepwise(subject: str) -> str:
    """normalize_subject as regexes applied to the whole rest at every step (quadratic)."""
    import re

    prefix = re.compile(r"^\s*(?:re|fwd?|aw|sv|wg|vs|vl|antw|odp|tr|rif|res|enc|ynt|回复|回覆|答复"
                        r"|转发|轉寄)\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*", re.IGNORECASE)
    tag = re.compile(r"^\s*\[[^\[\]]{1,60}\]\s*")
    trailer = re.compile(r"\s*\((?:fwd|fw)\)\s*$", re.IGNORECASE)
    text = re.sub(r"\s+", " ", subject).strip()
    while True:
        stripped = prefix.sub("", tag.sub("", trailer.sub("", text), count=1), count=1)
        if stripped == text:
            break
        text = stripped
    return text or re.sub(r"\s+", " ", subject).strip()


def test_normalize_subject_as_the_steps_give_it() -> None:
    import random
    import time

    rng = random.Random(37)
    pieces = ["re", "Re", "fw", "(fwd)", "(FW)", "(", ")", ":", "：", "[2]", "[l]", "[", "]",
              " ", "x", "回复", "aw:", "(3)"]
    for _ in range(30_000):
        subject = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert normalize_subject(subject) == _stepwise(subject), subject
    started = time.process_time()
    for subject in ("re: " * 20_000 + "x", "x" + " (fwd)" * 20_000, "[a] " * 20_000 + "x"):
        normalize_subject(subject)
    assert time.process_time() - started < 1.0
