"""Content scoring in the node's analysis processes (postroom.analysis), off the event loop.

Scoring a message (MIME parsing, feature extraction, the global model) is pure CPU, ~1-2 ms for
a 50 KB message: on the event loop it would stall every other SMTP session for that long, and
it would keep the GIL from everything else the node does. Each analysis process loads a model
once, on its first message; the result is the same `ContentScore` the in-process classifier
gives.
"""

from __future__ import annotations

from pathlib import Path

from postroom.analysis import AnalysisPool
from postroom.core.message import parse_message
from postroom.spam.classifier import ContentClassifier, ContentScore

# In each process: the classifiers loaded so far, by model file (None: the shipped model).
_classifiers: dict[str | None, ContentClassifier] = {}


def score_content(model: str | None, raw: bytes) -> ContentScore:
    classifier = _classifiers.get(model)
    if classifier is None:
        classifier = _classifiers[model] = ContentClassifier.from_file(model)
    return classifier.score(parse_message(raw))


class ScoringPool:
    def __init__(self, pool: AnalysisPool, model: Path | None) -> None:
        self.pool = pool
        self.model = str(model) if model is not None else None

    async def score(self, raw: bytes) -> ContentScore:
        return await self.pool.run(score_content, self.model, raw)
