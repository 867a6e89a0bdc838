"""The content classifier: parsed message -> hashed features -> log-odds of spam.

`ContentClassifier.default()` loads the model shipped in the package (`data/model.npz`, built
from set 1 of the SpamAssassin public corpus by `postroom spam train`); a model trained by the
operator replaces it through `[spam] model`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from postroom.core.message import ParsedMessage, parse_message
from postroom.spam.corpus import arrival
from postroom.spam.features import extract, hash_features, vectorize
from postroom.spam.model import FLAT, Model, UserModel, Values

SHIPPED_MODEL = "model.npz"


@dataclass(frozen=True, slots=True)
class ContentScore:
    logit: float  # log-odds of spam; 0 is undecided
    reasons: tuple[str, ...]  # the features that pushed hardest towards the verdict


def shipped_model_path() -> Path:
    return Path(str(resources.files("postroom.spam") / "data" / SHIPPED_MODEL))


class ContentClassifier:
    def __init__(self, model: Model) -> None:
        self.model = model

    @classmethod
    def default(cls) -> ContentClassifier:
        return cls(Model.load(shipped_model_path()))

    @classmethod
    def from_file(cls, path: str | Path | None) -> ContentClassifier:
        return cls(Model.load(path)) if path else cls.default()

    def features(self, parsed: ParsedMessage) -> tuple[list[int], Values]:
        """The message's bucket indices and their values, as the model was trained to read."""
        return self.vector(extract(parsed))

    def vector(self, names: Iterable[str]) -> tuple[list[int], Values]:
        if self.model.norm == FLAT:
            return hash_features(names, self.model.bits), None
        return vectorize(names, self.model.bits)

    def score(self, parsed: ParsedMessage, user: UserModel | None = None) -> ContentScore:
        names = extract(parsed)
        indices, values = self.vector(names)
        logit = user.logit(self.model, indices, values) if user else \
            self.model.logit(indices, values)
        return ContentScore(logit, self._reasons(names, indices, values, logit, user))

    def _reasons(self, names: Iterable[str], indices: list[int], values: Values, logit: float,
                 user: UserModel | None, count: int = 3) -> tuple[str, ...]:
        mask = (1 << self.model.bits) - 1
        weights = self.model.weights
        value = dict(zip(indices, values, strict=True)) if values is not None else {}
        sign = 1.0 if logit >= 0 else -1.0
        scored: list[tuple[float, str]] = []
        for name in names:
            i = zlib.crc32(name.encode("utf-8", "surrogatepass")) & mask
            w = (float(weights[i]) + (user.deltas.get(i, 0.0) if user else 0.0)) \
                * value.get(i, 1.0)
            if w * sign > 0:
                scored.append((w * sign, name))
        scored.sort(reverse=True)
        return tuple(_printable(name) for _, name in scored[:count])


def _printable(name: str) -> str:
    """A feature name safe inside a header field: ASCII, no spaces or separators."""
    text = name.encode("ascii", "replace").decode().replace(" ", "_")
    return "".join(c for c in text if c.isprintable() and c not in ",;=\"\\")[:40]


CALIBRATION_SHARE = 0.3  # the newest part of each class, held out to fit the logit's scale
MIN_CALIBRATION = 20  # messages of each class needed to fit it; fewer: scale 1


def train(samples: Sequence[tuple[bytes, bool]], *, epochs: int = 6, seed: int = 0,
          bits: int | None = None) -> Model:
    """A new global model from labelled raw messages.

    First a model of the older 70 % of each class (by arrival, `corpus.arrival`) scores the
    newest 30 %, which fixes the scale that turns margins into calibrated log-odds on mail newer
    than the training (`Model.calibrate`); then the model is trained on everything and given
    that scale."""
    model = Model.empty(bits) if bits else Model.empty()
    vectors = [(*vectorize(extract(parse_message(raw)), model.bits), spam)
               for raw, spam in samples]
    older: list[int] = []
    newer: list[int] = []
    for label in (True, False):
        part = sorted((i for i, (_, spam) in enumerate(samples) if spam is label),
                      key=lambda i: arrival(samples[i][0]))
        cut = len(part) - round(len(part) * CALIBRATION_SHARE)
        if len(part) - cut < MIN_CALIBRATION:
            older, newer = [], []
            break
        older += part[:cut]
        newer += part[cut:]
    if newer:
        held = Model.empty(model.bits)
        held.fit([vectors[i] for i in older], epochs=epochs, seed=seed)
        model.scale = held.calibrate([held.margin(vectors[i][0], vectors[i][1]) for i in newer],
                                     [vectors[i][2] for i in newer])
    model.fit(vectors, epochs=epochs, seed=seed)
    return model


def probability(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, logit))))
