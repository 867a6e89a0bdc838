"""The single-part shortcut of the parser gives exactly the full parse, on real and odd mail."""

from __future__ import annotations

import random

import pytest

from postroom.core import message
from postroom.core.message import parse_message
from tests.corpus import messages

ODD = [
    b"Subject: x\r\n\r\n",
    b"Subject: x\r\n\r\nbody\r\n\r\nmore\r\n",
    b"Subject: x\n\nbare LF body\r\n\r\nthen CRLF\r\n",
    b"Subject: x\r\nnot a header line\r\n\r\nbody\r\n",
    b"From nobody Mon Jan  1 00:00:00 2024\r\nSubject: mbox\r\n\r\nbody\r\n",
    b"Subject: folded\r\n\tcontinued\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\n"
    b"caf\xe9\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\none\r\n--b--\r\n",
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nhi\r\n",
    b"Content-Type: TEXT/HTML\r\nContent-Transfer-Encoding: base64\r\n\r\nPGI+aGk8L2I+\r\n",
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"a=3Db=\r\nc\r\n",
    b"\r\n\r\nno headers at all\r\n",
    b"Subject: x\r\n \r\n\r\nwhitespace line above\r\n",
    b"X: \xff\xfe\r\n\r\n\x80\x81\x00\r\n",
]


def _full(raw: bytes) -> message.ParsedMessage:
    saved = message._parse_single_part
    message._parse_single_part = lambda raw: None
    try:
        return parse_message(raw)
    finally:
        message._parse_single_part = saved


@pytest.mark.parametrize("raw", ODD)
def test_odd_messages(raw: bytes) -> None:
    assert parse_message(raw) == _full(raw)


def test_corpus_and_mutations() -> None:
    rng = random.Random(3)
    corpus = [raw for _, raw in messages(limit=1500)]
    # as received over SMTP: CRLF line ends (the shortcut's case), and as stored on disk
    samples = corpus + [raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for raw in corpus]
    mutated = []
    for raw in samples[:300]:
        cut = rng.randrange(len(raw) + 1)
        mutated.append(raw[:cut] + rng.choice([b"\r\n\r\n", b"\n", b"\r\n", b":", b" "])
                       + raw[cut:])
    for raw in samples + mutated:
        assert parse_message(raw) == _full(raw)
