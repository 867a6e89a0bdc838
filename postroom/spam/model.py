"""Online logistic regression over hashed features, the content classifier.

Chosen by measurement (bench/spam_eval.py; figures in docs/BENCHMARKS.md): over the same hashed
features it matched or beat naive Bayes and a linear SVM on the SpamAssassin corpus, it learns
one message at a time (so feedback is a single update, no retraining), and its output is a
log-odds score that adds up with the other evidence (authentication, reputation) in the verdict.

Updates use AdaGrad (a per-feature step size that shrinks as the feature is seen), which lets
rare, telling features move fast and keeps frequent ones stable, with an L2 penalty on the
weights a message touches, so no single rare feature (one sender, one odd word) carries a
verdict alone. Inputs are binary and normalised to length 1 per part of the message
(`features.vectorize`: body words, subject, links, structure and headers each count alike), so
long and short messages weigh alike. Models from before the per-part norm (no "norm" in their
file) scale all features by 1/sqrt(number of features), as they were trained.

The global model is a dense float32 vector of `2**bits` weights, saved as a compressed `.npz`
(numpy's own format, no pickle). A user's model is a sparse overlay of weight deltas on top of
it, small enough to store through the metadata seam.
"""

from __future__ import annotations

import io
import json
import math
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from postroom.spam.features import BITS

FloatArray = npt.NDArray[np.float32]
IndexArray = npt.NDArray[np.int64]
# A message's features: sorted bucket indices, and each one's value (None: binary features all
# scaled by 1/sqrt(count), the norm of models trained before `features.vectorize`).
Values = Sequence[float] | None

PARTS, FLAT = "parts", "flat"

# Log-odds are clipped: one message must never be "infinitely" spam or ham.
MAX_LOGIT = 30.0


def _values(indices: Sequence[int], values: Values) -> FloatArray:
    if values is None:
        return np.full(len(indices), 1.0 / math.sqrt(len(indices)), np.float32)
    return np.asarray(values, dtype=np.float32)


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass
class Model:
    """The global content model."""

    bits: int = BITS
    weights: FloatArray = field(default_factory=lambda: np.zeros(1 << BITS, np.float32))
    squares: FloatArray = field(default_factory=lambda: np.zeros(1 << BITS, np.float32))
    bias: float = 0.0
    learning_rate: float = 0.5
    # No learnt intercept by default: a message with little to go on (a short note from a new
    # correspondent) should stay near 0, not inherit the training set's class balance.
    learn_bias: bool = False
    # L2 penalty on the weights of each message's features, at each update (chosen on set 1's
    # time-ordered validation splits, bench/spam_validate.py).
    l2: float = 1e-3
    # How a message's features are scaled: PARTS (`features.vectorize`) or FLAT (1/sqrt(n)).
    norm: str = PARTS
    # The margin w.x times `scale` is the logit: fitted after training so that the logit is a
    # calibrated log-odds on newer mail held out from training (`classifier.train`), since it
    # adds up with the other evidence of the verdict (authentication, reputation, thresholds).
    # The L2 penalty shrinks margins well below the log-odds they stand for (~3.7x on set 1).
    scale: float = 1.0
    trained_on: int = 0
    info: dict[str, object] = field(default_factory=dict)

    @classmethod
    def empty(cls, bits: int = BITS) -> Model:
        return cls(bits=bits, weights=np.zeros(1 << bits, np.float32),
                   squares=np.zeros(1 << bits, np.float32))

    def logit(self, indices: Sequence[int], values: Values = None) -> float:
        if not indices:
            return self.bias
        margin = self._margin(np.asarray(indices, dtype=np.int64), _values(indices, values))
        return max(-MAX_LOGIT, min(MAX_LOGIT, margin * self.scale))

    def margin(self, indices: Sequence[int], values: Values = None) -> float:
        """The logit before `scale`: what training fits."""
        if not indices:
            return self.bias
        return self._margin(np.asarray(indices, dtype=np.int64), _values(indices, values))

    def _margin(self, idx: IndexArray, x: FloatArray) -> float:
        value = float(self.weights[idx] @ x) + self.bias
        return max(-MAX_LOGIT, min(MAX_LOGIT, value))

    def probability(self, indices: Sequence[int], values: Values = None) -> float:
        return sigmoid(self.logit(indices, values))

    def learn(self, indices: Sequence[int], spam: bool, weight: float = 1.0,
              values: Values = None) -> None:
        """One AdaGrad step of the log loss (plus the L2 penalty) for one message."""
        if not indices:
            return
        idx = np.asarray(indices, dtype=np.int64)
        x = _values(indices, values)
        error = (sigmoid(self._margin(idx, x)) - (1.0 if spam else 0.0)) * weight
        gradient = (error * x).astype(np.float32)
        if self.l2:
            gradient += np.float32(self.l2) * self.weights[idx]
        squares = self.squares[idx] + gradient * gradient
        self.squares[idx] = squares
        self.weights[idx] -= (self.learning_rate * gradient / np.sqrt(squares + 1e-8)).astype(
            np.float32)
        if self.learn_bias:
            self.bias -= self.learning_rate * 0.1 * error
        self.trained_on += 1

    def fit(self, samples: Sequence[tuple[Sequence[int], Values, bool]], epochs: int = 6,
            seed: int = 0) -> None:
        """Several shuffled passes over labelled messages, classes weighed to balance."""
        spam = sum(1 for _, _, label in samples if label)
        ham = len(samples) - spam
        if not spam or not ham:
            raise ValueError("training needs both spam and ham")
        # Balanced: each class contributes the same total weight, whatever the corpus mix.
        w_spam, w_ham = len(samples) / (2 * spam), len(samples) / (2 * ham)
        order = list(range(len(samples)))
        rng = random.Random(seed)
        for _ in range(epochs):
            rng.shuffle(order)
            for i in order:
                indices, values, label = samples[i]
                self.learn(indices, label, w_spam if label else w_ham, values)

    def calibrate(self, margins: Sequence[float], labels: Sequence[bool]) -> float:
        """Set `scale` to the factor that makes `margins` (of messages held out from training)
        the best log-odds of their labels: least log loss, classes weighed alike as in `fit`,
        no intercept (the boundary stays at 0). Returns the scale."""
        z = np.asarray(margins, dtype=np.float64)
        y = np.asarray(labels, dtype=bool)
        if not y.any() or y.all():
            raise ValueError("calibration needs both spam and ham")
        scales = np.exp(np.linspace(math.log(0.2), math.log(20.0), 400))
        loss = [0.5 * float(np.mean(np.logaddexp(0.0, -a * z[y])))
                + 0.5 * float(np.mean(np.logaddexp(0.0, a * z[~y]))) for a in scales]
        self.scale = float(scales[int(np.argmin(loss))])
        return self.scale

    # --------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> None:
        """Write the model as a compressed .npz; only the non-zero weights are kept."""
        nonzero = np.flatnonzero(self.weights).astype(np.int32)
        meta = {"bits": self.bits, "bias": self.bias, "learning_rate": self.learning_rate,
                "l2": self.l2, "norm": self.norm, "scale": self.scale,
                "trained_on": self.trained_on,
                "info": self.info, "format": 1}
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, index=nonzero, weight=self.weights[nonzero],
            square=self.squares[nonzero].astype(np.float16),
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
        Path(path).write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Model:
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            bits = int(meta["bits"])
            model = cls.empty(bits)
            index = data["index"].astype(np.int64)
            model.weights[index] = data["weight"]
            model.squares[index] = data["square"].astype(np.float32)
        model.bias = float(meta["bias"])
        model.learning_rate = float(meta["learning_rate"])
        model.l2 = float(meta.get("l2", 0.0))
        model.norm = str(meta.get("norm", FLAT))
        model.scale = float(meta.get("scale", 1.0))
        model.trained_on = int(meta["trained_on"])
        model.info = dict(meta.get("info", {}))
        return model


class UserModel:
    """A user's own weights on top of the global model: a sparse map of deltas.

    Feedback trains only this overlay, so one user's opinion never changes anyone else's
    verdicts. Serialised as packed (index, weight) pairs for the metadata store.
    """

    MAX_FEATURES = 200_000  # about 1.6 MB stored; the smallest deltas go first beyond that

    def __init__(self, deltas: dict[int, float] | None = None, bias: float = 0.0) -> None:
        self.deltas: dict[int, float] = deltas or {}
        self.bias = bias

    def logit(self, base: Model, indices: Sequence[int], values: Values = None) -> float:
        if not indices:
            return base.bias + self.bias
        get = self.deltas.get
        if values is None:
            extra = sum(get(i, 0.0) for i in indices) / math.sqrt(len(indices))
        else:
            extra = sum(get(i, 0.0) * v for i, v in zip(indices, values, strict=True))
        value = base.logit(indices, values) + extra + self.bias
        return max(-MAX_LOGIT, min(MAX_LOGIT, value))

    def learn(self, base: Model, indices: Sequence[int], spam: bool, rate: float = 1.0,
              steps: int = 3, values: Values = None) -> None:
        """A few gradient steps on this message alone: feedback must change the next verdict
        noticeably, not by one small step among thousands."""
        if not indices:
            return
        x = _values(indices, values).tolist()  # length 1, so a step of s moves the logit by s
        target = 1.0 if spam else 0.0
        for _ in range(steps):
            error = sigmoid(self.logit(base, indices, x)) - target
            step = rate * error * 4.0  # moves the logit by up to 4 * rate
            for i, v in zip(indices, x, strict=True):
                self.deltas[i] = self.deltas.get(i, 0.0) - step * v
        if len(self.deltas) > self.MAX_FEATURES:
            keep = sorted(self.deltas.items(), key=lambda kv: -abs(kv[1]))
            self.deltas = dict(keep[: self.MAX_FEATURES // 2])

    def to_bytes(self) -> bytes:
        items = sorted(self.deltas.items())
        head = struct.pack("<Bfi", 1, self.bias, len(items))
        return head + b"".join(struct.pack("<if", i, w) for i, w in items)

    @classmethod
    def from_bytes(cls, data: bytes) -> UserModel:
        if not data:
            return cls()
        version, bias, count = struct.unpack_from("<Bfi", data, 0)
        if version != 1:
            return cls()
        deltas: dict[int, float] = {}
        offset = struct.calcsize("<Bfi")
        for i, w in struct.iter_unpack("<if", data[offset: offset + 8 * count]):
            deltas[i] = w
        return cls(deltas, bias)
