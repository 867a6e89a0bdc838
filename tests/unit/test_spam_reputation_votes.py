"""The service's own verdicts vote on sender reputation, except for mailing-list mail."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

from postroom.spam.classifier import ContentClassifier
from postroom.spam.filter import Analysis, SpamFilter, from_mailing_list
from postroom.spam.model import Model
from postroom.store.blobs import BlobStore
from postroom.store.metadata import MetadataStore

LIST_MAIL = (b"From: someone@example.org\r\nList-Id: <users.lists.example.org>\r\n"
             b"Subject: hi\r\n\r\nList-Id: not a header here\r\n")
PLAIN = b"From: someone@example.org\nSubject: hi\n\nList-Id: <body, not a header>\n"


class Votes:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], float, float, float]] = []

    async def add_reputation(self, subjects: Sequence[str], *, ham: float, spam: float,
                             now: float, half_life: float) -> None:
        self.calls.append((list(subjects), ham, spam, now))


def spam_filter(votes: Votes) -> SpamFilter:
    return SpamFilter(metadata=cast(MetadataStore, votes), blobs=cast(BlobStore, None),
                      classifier=ContentClassifier(Model.empty(bits=8)), authenticator=None,
                      resolver=None, hostname="mx.example.test", clock=lambda: 1000.0)


def test_mailing_list_is_told_by_its_header_fields_only() -> None:
    assert from_mailing_list(LIST_MAIL)
    assert from_mailing_list(LIST_MAIL.replace(b"List-Id:", b"Mailing-List:"))
    assert not from_mailing_list(PLAIN)
    assert not from_mailing_list(b"")


def test_list_mail_casts_no_vote_and_the_flag_travels_in_json() -> None:
    votes = Votes()
    mine = spam_filter(votes)
    listed = Analysis(1.0, 1.0, [], subjects=["dom:example.org"], vote=False)
    direct = Analysis(1.0, 1.0, [], subjects=["dom:example.net"])
    assert Analysis.from_json(listed.to_json()).vote is False
    assert Analysis.from_json({k: v for k, v in direct.to_json().items() if k != "vote"}).vote

    async def run() -> None:
        await mine.record_verdict(listed, True)
        await mine.record_verdicts([(listed, True), (direct, True)])
        await mine.record_verdict(direct, False)

    asyncio.run(run())
    assert votes.calls == [(["dom:example.net"], 0.0, 0.2, 1000.0),
                           (["dom:example.net"], 0.2, 0.0, 1000.0)]
