"""Online logistic regression over hashed features, the content classifier.

Chosen by measurement (bench/spam_eval.py; figures in docs/BENCHMARKS.md): over the same hashed
features it matched or beat naive Bayes and a linear SVM on the SpamAssassin corpus, it learns
one message at a time (so feedback is a single update, no retraining), and its output is a
log-odds score that adds up with the other evidence (authentication, reputation) in the verdict.

Updates use AdaGrad (a per-feature step size that shrinks as the feature is seen), which lets
rare, telling features move fast and keeps frequent ones stable. Inputs are binary and scaled by
1/sqrt(number of features), so long and short messages weigh alike.

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

# Log-odds are clipped: one message must never be "infinitely" spam or ham.
MAX_LOGIT = 30.0


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
    trained_on: int = 0
    info: dict[str, object] = field(default_factory=dict)

    @classmethod
    def empty(cls, bits: int = BITS) -> Model:
        return cls(bits=bits, weights=np.zeros(1 << bits, np.float32),
                   squares=np.zeros(1 << bits, np.float32))

    def logit(self, indices: Sequence[int]) -> float:
        if not indices:
            return self.bias
        idx = np.asarray(indices, dtype=np.int64)
        scale = 1.0 / math.sqrt(len(indices))
        value = float(self.weights[idx].sum()) * scale + self.bias
        return max(-MAX_LOGIT, min(MAX_LOGIT, value))

    def probability(self, indices: Sequence[int]) -> float:
        return sigmoid(self.logit(indices))

    def learn(self, indices: Sequence[int], spam: bool, weight: float = 1.0) -> None:
        """One AdaGrad step of the log loss for one message."""
        if not indices:
            return
        idx = np.asarray(indices, dtype=np.int64)
        scale = 1.0 / math.sqrt(len(indices))
        error = (sigmoid(self.logit(indices)) - (1.0 if spam else 0.0)) * weight
        gradient = np.float32(error * scale)
        squares = self.squares[idx] + gradient * gradient
        self.squares[idx] = squares
        self.weights[idx] -= (self.learning_rate * gradient / np.sqrt(squares + 1e-8)).astype(
            np.float32)
        if self.learn_bias:
            self.bias -= self.learning_rate * 0.1 * error
        self.trained_on += 1

    def fit(self, samples: Sequence[tuple[Sequence[int], bool]], epochs: int = 6,
            seed: int = 0) -> None:
        """Several shuffled passes over labelled messages, classes weighed to balance."""
        spam = sum(1 for _, label in samples if label)
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
                indices, label = samples[i]
                self.learn(indices, label, w_spam if label else w_ham)

    # --------------------------------------------------------------------------- files

    def save(self, path: str | Path) -> None:
        """Write the model as a compressed .npz; only the non-zero weights are kept."""
        nonzero = np.flatnonzero(self.weights).astype(np.int32)
        meta = {"bits": self.bits, "bias": self.bias, "learning_rate": self.learning_rate,
                "trained_on": self.trained_on, "info": self.info, "format": 1}
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

    def logit(self, base: Model, indices: Sequence[int]) -> float:
        if not indices:
            return base.bias + self.bias
        scale = 1.0 / math.sqrt(len(indices))
        get = self.deltas.get
        extra = sum(get(i, 0.0) for i in indices) * scale
        value = base.logit(indices) + extra + self.bias
        return max(-MAX_LOGIT, min(MAX_LOGIT, value))

    def learn(self, base: Model, indices: Sequence[int], spam: bool, rate: float = 1.0,
              steps: int = 3) -> None:
        """A few gradient steps on this message alone: feedback must change the next verdict
        noticeably, not by one small step among thousands."""
        if not indices:
            return
        scale = 1.0 / math.sqrt(len(indices))
        target = 1.0 if spam else 0.0
        for _ in range(steps):
            error = sigmoid(self.logit(base, indices)) - target
            step = rate * error * 4.0 * scale  # moves the logit by up to 4 * rate
            for i in indices:
                self.deltas[i] = self.deltas.get(i, 0.0) - step
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
