"""The content classifier: features, the model's learning and files, the shipped model."""

from __future__ import annotations

from pathlib import Path

from postroom.core.message import parse_message
from postroom.spam.classifier import ContentClassifier, train
from postroom.spam.features import extract, hash_features
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
    indices = held_out.features(parse_message(HAM))
    assert abs(loaded.logit(indices) - model.logit(indices)) < 1e-3


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
