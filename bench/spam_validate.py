"""Model selection for the spam classifier on set 1 only (set 2 stays unseen until the end).

    .venv/bin/python -m bench.spam_validate [--corpus DIR] [--verdict]

Set 1 (easy-ham-1, hard-ham-1, spam-1) is ordered by the time each message reached its first
recorded relay (else its Date), and split per class: the older part trains, the newer part
validates, at 70/30 and at 50/50. The 50/50 split is harsh on purpose: set 1's newer ham holds
sources (news feeds) its older ham has none of, the situation of mail from other sources.
Feature and training changes are kept only if they help on these splits; `bench.spam_eval`
then reports set 2 once, with the model trained on all of set 1. `--verdict` also scores each
validation part as the service's whole verdict (`bench.spam_eval.verdict_scores`), with the
model `postroom spam train` would make of the training part.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from bench.spam_eval import corpus_directory, metrics, verdict_scores
from postroom.core.message import parse_message
from postroom.spam import corpus
from postroom.spam.classifier import train as train_model
from postroom.spam.corpus import arrival
from postroom.spam.features import extract, vectorize
from postroom.spam.model import Model

SET1 = ("easy-ham-1", "hard-ham-1", "spam-1")


def time_split(samples: list[corpus.Sample], train_share: float
               ) -> tuple[list[corpus.Sample], list[corpus.Sample]]:
    """Per class, the older `train_share` trains and the rest validates."""
    train: list[corpus.Sample] = []
    valid: list[corpus.Sample] = []
    for label in (True, False):
        part = sorted((s for s in samples if s.spam is label), key=lambda s: arrival(s.raw))
        cut = int(len(part) * train_share)
        train += part[:cut]
        valid += part[cut:]
    return train, valid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="corpus directory (default: the test suite's cache)")
    parser.add_argument("--verdict", action="store_true",
                        help="also the whole verdict with the service's own sender reputation")
    args = parser.parse_args(argv)
    directory = corpus_directory(args.corpus)
    samples = list(corpus.load(directory, SET1))
    for share in (0.7, 0.5) if not args.verdict else (0.6, 0.7, 0.8, 0.5):
        train, valid = time_split(samples, share)
        model = Model.empty()
        model.fit([(*vectorize(extract(parse_message(s.raw))), s.spam) for s in train])
        scores = [model.logit(*vectorize(extract(parse_message(s.raw)))) for s in valid]
        labels = [s.spam for s in valid]
        m = metrics(scores, labels, 0.0, 0.0)
        loss = -sum(math.log(max(1e-9, p if y else 1 - p)) for p, y in
                    ((1 / (1 + math.exp(-s)), y) for s, y in zip(scores, labels, strict=True))
                    ) / len(labels)
        print(f"set 1 time split {share:.0%}/{1 - share:.0%}: precision {m.precision:.4f} "
              f"recall {m.recall:.4f} F1 {m.f1:.4f} ham marked spam "
              f"{m.false_positives}/{m.ham} AUC {m.auc:.4f} log loss {loss:.4f}", flush=True)
        if args.verdict:
            with tempfile.TemporaryDirectory(prefix="spam-validate-") as tmp:
                verdicts = verdict_scores(train_model([(s.raw, s.spam) for s in train]), valid,
                                          Path(tmp))
            v = metrics(verdicts, labels, -0.005, 0.0)
            print(f"  verdict (content + own reputation): precision {v.precision:.4f} "
                  f"recall {v.recall:.4f} F1 {v.f1:.4f} ham marked spam "
                  f"{v.false_positives}/{v.ham} AUC {v.auc:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
