"""The content classifier: features, the model's learning and files, the shipped model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from postroom.core.message import parse_message
from postroom.spam.classifier import ContentClassifier, train
from postroom.spam.features import extract, feature_group, hash_features, vectorize
from postroom.spam.model import Model, UserModel
from tests.corpus import messages

HAM = (b"From: Alice <alice@example.org>\r\nTo: bob@example.test\r\nSubject: Re: lunch\r\n"
       b"Message-ID: <1@example.org>\r\nDate: Mon, 05 Jan 2026 10:00:00 +0000\r\n"
       b"Received: from mail.example.org ([192.0.2.1]) by mx.example.test with ESMTPS\r\n"
       b"\r\n> are we on?\r\nYes, noon at the usual place.\r\n")


def auc(spam: list[float], ham: list[float]) -> float:
    wins = sum((s > h) + 0.5 * (s == h) for s in spam for h in ham)
    return wins / (len(spam) * len(ham))


def test_features_cover_headers_relays_and_body() -> None:
    features = extract(parse_message(HAM))
    assert {"s:lunch", "s:reply", "f:alice@example.org", "fd:example.org", "h:received",
            "rcv:by:example.test", "b:quoted1", "noon", "mid:from-domain"} <= features
    indices = hash_features(features, bits=16)
    assert indices == sorted(set(indices)) and all(0 <= i < 1 << 16 for i in indices)
    assert indices == hash_features(extract(parse_message(HAM)), bits=16)  # stable


def test_model_learns_and_round_trips(tmp_path: Path) -> None:
    samples = [(raw, name.startswith("spam")) for name, raw in
               messages("spam-1", limit=150) + messages("easy-ham-1", limit=150)]
    model = train(samples, epochs=3, bits=18)
    held_out = ContentClassifier(model)
    spam = [held_out.score(parse_message(r)).logit for _, r in messages("spam-2", limit=60)]
    ham = [held_out.score(parse_message(r)).logit for _, r in messages("easy-ham-2", limit=60)]
    assert auc(spam, ham) > 0.9  # trained on set 1, tested on months-later set 2
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = Model.load(path)
    indices, values = held_out.features(parse_message(HAM))
    assert values is not None  # a new model reads per-part normalised vectors
    assert abs(loaded.logit(indices, values) - model.logit(indices, values)) < 1e-3
    assert (loaded.norm, loaded.l2) == (model.norm, model.l2)


def test_vector_has_length_one_and_each_part_counts_alike() -> None:
    features = extract(parse_message(HAM))
    indices, values = vectorize(features, bits=20)
    assert indices == sorted(set(indices)) == hash_features(features, bits=20)
    assert abs(sum(v * v for v in values) - 1.0) < 1e-6
    parts = {feature_group(f) for f in features}
    assert {"body", "subject", "headers", "structure"} <= parts
    # a body word of a long mail weighs less than one of a short mail; a header feature the same
    long_mail = HAM.replace(b"Yes, noon", b" ".join(b"w%d" % i for i in range(500)) + b" noon")
    for raw in (HAM, long_mail):
        names = extract(parse_message(raw))
        value = dict(zip(*vectorize(names, bits=20), strict=True))
        header = value[hash_features(["h:received"], bits=20)[0]]
        body = value[hash_features(["noon"], bits=20)[0]]
        if raw is HAM:
            short_header, short_body = header, body
    assert abs(header - short_header) < 1e-9 and body < short_body / 5


def test_model_files_without_a_norm_score_as_trained(tmp_path: Path) -> None:
    """A model saved before per-part vectors (flat 1/sqrt(n) scaling) still scores the same."""
    model = Model.empty(bits=16)
    model.norm = "flat"
    indices = hash_features(extract(parse_message(HAM)), bits=16)
    model.learn(indices, spam=True)
    path = tmp_path / "old.npz"
    model.save(path)
    loaded = ContentClassifier.from_file(path)
    assert loaded.model.norm == "flat"
    got, values = loaded.features(parse_message(HAM))
    assert (got, values) == (indices, None)
    assert abs(loaded.score(parse_message(HAM)).logit - model.logit(indices)) < 1e-5


def test_user_model_feedback_moves_only_that_user() -> None:
    base = Model.empty(bits=16)
    indices = hash_features(extract(parse_message(HAM)), bits=16)
    mine = UserModel()
    before = mine.logit(base, indices)
    mine.learn(base, indices, spam=True)
    after = mine.logit(base, indices)
    assert after > before + 2.0
    restored = UserModel.from_bytes(mine.to_bytes())
    assert abs(restored.logit(base, indices) - after) < 1e-3
    assert UserModel().logit(base, indices) == before  # another user is untouched
    restored.learn(base, indices, spam=False)
    assert restored.logit(base, indices) < after


def test_shipped_model_separates_later_mail() -> None:
    classifier = ContentClassifier.default()
    assert classifier.model.info.get("groups") == ["easy-ham-1", "hard-ham-1", "spam-1"]
    spam = [classifier.score(parse_message(r)).logit for _, r in messages("spam-2", limit=100)]
    ham = [classifier.score(parse_message(r)).logit for _, r in messages("easy-ham-2",
                                                                          limit=100)]
    assert auc(spam, ham) > 0.97
    assert sum(1 for h in ham if h >= 0) <= 2


def test_calibration_recovers_the_scale_of_log_odds() -> None:
    """Margins whose true log-odds are 3x larger: `calibrate` finds ~3, and the logit then is
    the margin times it (the boundary stays at 0)."""
    rng = np.random.default_rng(0)
    margins = rng.normal(0.0, 1.5, 20_000)
    labels = rng.random(margins.size) < 1.0 / (1.0 + np.exp(-3.0 * margins))
    model = Model.empty(bits=8)
    assert abs(model.calibrate(margins.tolist(), labels.tolist()) - 3.0) < 0.3
    model.weights[1] = 0.5
    assert abs(model.logit([1], [1.0]) - 0.5 * model.scale) < 1e-6
    assert model.margin([1], [1.0]) == 0.5


def test_shipped_model_logit_is_calibrated_log_odds() -> None:
    model = ContentClassifier.default().model
    assert model.norm == "parts" and 2.0 < model.scale < 6.0
