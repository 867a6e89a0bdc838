"""Content scoring in worker processes, so the SMTP listeners' event loop never runs it.

Scoring a message (MIME parsing, feature extraction, the global model) is pure CPU: ~2 ms for a
50 KB message. Run on the event loop it stalls every other session for that long and, under the
GIL, caps a node at one core however many it has. `ScoringPool` hands the bytes to a process
pool instead (`spawn`ed, so the server's threads are never forked; `start` starts them when the
MX listener opens), each process with the model loaded once. The result is the same
`ContentScore` the in-process classifier gives. If a pool process dies the pool is rebuilt and
that message scored in process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from postroom.core.message import parse_message
from postroom.spam.classifier import ContentClassifier, ContentScore

log = logging.getLogger(__name__)

# In each pool process: the classifier its initializer loaded.
_classifier: ContentClassifier | None = None


def _load(model: str | None) -> None:
    global _classifier
    _classifier = ContentClassifier.from_file(model)


def _ready() -> None:
    """A task that only makes a pool process start (and load its model)."""


def _score(raw: bytes) -> ContentScore:
    if _classifier is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("scoring process without a model")
    return _classifier.score(parse_message(raw))


def default_processes() -> int:
    """One per core but the one the node's own process keeps busy (listeners, workers)."""
    return max(1, (os.cpu_count() or 1) - 1)


class ScoringPool:
    def __init__(self, classifier: ContentClassifier, model: Path | None,
                 processes: int | None = None) -> None:
        self.classifier = classifier  # the same model, in process: the fallback
        self.model = str(model) if model is not None else None
        self.processes = processes or default_processes()
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_load, initargs=(self.model,))
        return self._executor

    def start(self) -> None:
        """Start every process now (a listener opening), so the first messages do not wait
        for interpreters to start and models to load."""
        pool = self._pool()
        for _ in range(self.processes):
            pool.submit(_ready)

    async def score(self, raw: bytes) -> ContentScore:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool(), _score, raw)
        except BrokenProcessPool:
            log.warning("a content scoring process died; starting the pool again")
            self.close()
            return await asyncio.to_thread(self._score_here, raw)

    def _score_here(self, raw: bytes) -> ContentScore:
        return self.classifier.score(parse_message(raw))

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
