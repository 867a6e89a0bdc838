"""Content scoring in worker processes gives the in-process classifier's scores, and survives
a worker process dying."""

from __future__ import annotations

import os
import signal

from postroom.core.message import parse_message
from postroom.spam.classifier import ContentClassifier
from postroom.spam.pool import ScoringPool
from tests.corpus import messages

SAMPLES = [
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: lunch\r\n\r\nSee you at noon.\r\n",
    b"From: \"WIN\" <x@cheap.example>\r\nSubject: FREE $$$ now!!!\r\nContent-Type: text/html\r\n"
    b"\r\n<html><a href=\"http://198.51.100.7/win\">CLICK HERE</a> to claim your prize</html>\r\n",
    b"",
]


async def test_pool_scores_as_in_process() -> None:
    classifier = ContentClassifier.default()
    pool = ScoringPool(classifier, None, processes=1)
    pool.start()
    try:
        corpus = [raw for _, raw in messages(limit=40)]
        for raw in SAMPLES + corpus:
            assert await pool.score(raw) == classifier.score(parse_message(raw))
    finally:
        pool.close()


async def test_pool_survives_a_dead_process() -> None:
    classifier = ContentClassifier.default()
    pool = ScoringPool(classifier, None, processes=1)
    try:
        expected = classifier.score(parse_message(SAMPLES[1]))
        assert await pool.score(SAMPLES[1]) == expected
        executor = pool._executor
        assert executor is not None
        for process in list(executor._processes.values()):
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            process.join(10)
        assert await pool.score(SAMPLES[1]) == expected  # in process this once
        assert await pool.score(SAMPLES[1]) == expected  # a new pool
        assert pool._executor is not None and pool._executor is not executor
    finally:
        pool.close()
