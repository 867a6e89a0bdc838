"""Message analysis in worker processes: the same results as in process, errors carried back,
and a worker that dies costs no call (it runs here, and the worker is started again)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from postroom.analysis import AnalysisPool, prepare_delivery
from postroom.core.message import parse_message
from postroom.core.models import Flags, MessageRecord
from postroom.search.document import build_document, for_record
from postroom.spam.classifier import ContentClassifier
from postroom.spam.pool import ScoringPool, score_content
from tests.corpus import messages

SAMPLES = [
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n",
    b"From: \"WIN\" <x@cheap.example>\r\nSubject: FREE $$$ now!!!\r\nContent-Type: text/html\r\n"
    b"\r\n<html><a href=\"http://198.51.100.7/win\">CLICK HERE</a> to claim your prize</html>\r\n",
    b"",
]


def _record(raw: bytes) -> MessageRecord:
    parsed = parse_message(raw)
    return MessageRecord(
        user_id="u1", message_id="m1", folder_id="f1", uid=7, modseq=9, flags=Flags(),
        internal_date=1_700_000_000.0, size=len(raw), blob_hash="ab" * 32,
        headers=parsed.headers, snippet=parsed.snippet,
        has_attachments=parsed.has_attachments, thread_id="t1")


async def test_results_are_those_made_in_process() -> None:
    pool = AnalysisPool(processes=2)
    await pool.start()
    try:
        corpus = SAMPLES + [raw for _, raw in messages(limit=30)]
        classifier = ContentClassifier.default()
        scoring = ScoringPool(pool, None)
        scores = await asyncio.gather(*(scoring.score(raw) for raw in corpus))
        assert scores == [classifier.score(parse_message(raw)) for raw in corpus]
        prepared = await pool.run(prepare_delivery, corpus, True)
        for raw, item in zip(corpus, prepared, strict=True):
            assert item.parsed == parse_message(raw)
            record = _record(raw)
            assert item.document is not None
            assert for_record(item.document, record) == build_document(record, raw,
                                                                        item.parsed)
        assert [p.document for p in await pool.run(prepare_delivery, SAMPLES, False)] == [
            None, None, None]
    finally:
        pool.close()


async def test_errors_come_back_as_raised() -> None:
    pool = AnalysisPool(processes=1)
    try:
        with pytest.raises(ZeroDivisionError):
            await pool.run(divmod, 1, 0)
        assert await pool.run(divmod, 7, 2) == (3, 1)
    finally:
        pool.close()


async def test_a_dead_worker_costs_no_call() -> None:
    pool = AnalysisPool(processes=1)
    try:
        assert await pool.run(score_content, None, SAMPLES[1]) == score_content(None,
                                                                                SAMPLES[1])
        (worker,) = pool._workers
        assert worker.process.pid is not None
        os.kill(worker.process.pid, signal.SIGKILL)
        # calls made as it dies, or after, are answered all the same
        results = await asyncio.gather(*(pool.run(divmod, n, 3) for n in range(20)))
        assert results == [divmod(n, 3) for n in range(20)]
        assert await pool.run(os.getpid) != os.getpid()  # a new worker took over
        assert pool._workers and pool._workers[0].process.pid != worker.process.pid
    finally:
        pool.close()
