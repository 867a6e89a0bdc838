"""`postroom spam train`: the command that builds the shipped model, run on a part of the
corpus, gives a model file that `serve` then uses instead of the shipped one."""

from __future__ import annotations

import shutil
from pathlib import Path

from postroom.config import load_settings
from postroom.core.message import parse_message
from postroom.spam.classifier import ContentClassifier
from postroom.spam.model import Model
from postroom.spam.setup import model_path
from tests.corpus import corpus_dir, raw_message
from tests.e2e.server import ServerProcess

PER_GROUP = 150


def test_train_builds_a_model_the_server_loads(tmp_path: Path) -> None:
    source = corpus_dir()
    corpus = tmp_path / "corpus"
    for group in ("easy-ham-1", "spam-1", "easy-ham-2", "spam-2"):
        (corpus / group).mkdir(parents=True)
        for path in sorted((source / group).glob("*.txt"))[:PER_GROUP]:
            shutil.copy(path, corpus / group / path.name)
    server = ServerProcess(tmp_path / "data")
    out = server.cli("spam", "train", "--corpus", str(corpus), "--groups", "easy-ham-1,spam-1")
    assert f"trained on {2 * PER_GROUP} messages" in out.stdout
    model_file = tmp_path / "data" / "spam-model.npz"
    assert model_file.exists()
    # what `serve` on this data dir scores with, instead of the shipped model
    assert model_path(load_settings(None, data_dir=str(tmp_path / "data"))) == model_file

    # It separates mail it was not trained on (the next year's groups).
    classifier = ContentClassifier(Model.load(model_file))
    spam = [classifier.score(parse_message(raw_message(p))).logit
            for p in sorted((corpus / "spam-2").glob("*.txt"))]
    ham = [classifier.score(parse_message(raw_message(p))).logit
           for p in sorted((corpus / "easy-ham-2").glob("*.txt"))]
    assert sum(s > 0 for s in spam) > 0.7 * len(spam)
    assert sum(h < 0 for h in ham) > 0.95 * len(ham)

    bad = server.cli("spam", "train", "--corpus", str(tmp_path / "nowhere"), check=False)
    assert bad.returncode != 0 and "nowhere" in bad.stderr
