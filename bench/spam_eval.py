"""Spam classifier evaluation on the Apache SpamAssassin public corpus, beside SpamAssassin.

    .venv/bin/python -m bench.spam_eval [--corpus DIR] [--no-spamassassin] [--split NAME]
                                        [--verdict]

Two splits, each trained only on its training part:

- temporal: train on set 1 (easy-ham-1, hard-ham-1, spam-1), test on set 2 (easy-ham-2,
  spam-2), mail from months later;
- random: a stratified 80/20 split of all 6,046 messages with seed 0.

Prints precision, recall, F1, false-positive rate (ham marked spam), ROC AUC and messages/s
(one core, MIME parsing included) for Postroom's content classifier at its natural decision
boundary (p = 0.5), and, when Debian's `spamassassin` is installed, for SpamAssassin 4 scored
offline in the same run: network tests off, Bayes trained with sa-learn on the same training
messages, required score 5.0. Nothing is tuned on the test parts.

`--verdict` adds a row for the service's whole verdict, as `SpamFilter` computes it for a user
with no lists, contacts or feedback: the test messages replayed in order of arrival through
`SpamFilter.analyse`, `decide` and `record_verdict` (SQLite metadata store, the filter's clock
set to each message's arrival), so the score is the content logit plus the sender reputation
the service accumulated from its own earlier verdicts; no labels of test messages are used.
The envelope is what the recipient's MX saw: MAIL FROM is the Return-Path, the client is the
address in the hop the MX added (the first hop below the collector's fetchmail and local
ones); with none found, an unknown remote client (no network subject). SPF/DKIM/DMARC and
DNSBLs are not checked (mail from 2002-2003, no DNS of the time), so they add nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import ipaddress
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from postroom.core.message import parse_message
from postroom.core.models import Envelope
from postroom.spam import corpus
from postroom.spam.classifier import ContentClassifier
from postroom.spam.classifier import train as train_model
from postroom.spam.corpus import arrival
from postroom.spam.features import extract, vectorize
from postroom.spam.filter import FilterSettings, SpamFilter
from postroom.spam.model import Model
from postroom.store.blobs import BlobStore
from postroom.store.sqlite_metadata import SqliteMetadataStore

SET1 = ("easy-ham-1", "hard-ham-1", "spam-1")
SET2 = ("easy-ham-2", "spam-2")


@dataclass(frozen=True, slots=True)
class Metrics:
    precision: float
    recall: float
    f1: float
    fpr: float
    auc: float
    false_positives: int
    ham: int
    per_second: float


def metrics(scores: Sequence[float], labels: Sequence[bool], threshold: float,
            per_second: float) -> Metrics:
    tp = sum(1 for s, y in zip(scores, labels, strict=True) if s > threshold and y)
    fp = sum(1 for s, y in zip(scores, labels, strict=True) if s > threshold and not y)
    fn = sum(1 for s, y in zip(scores, labels, strict=True) if s <= threshold and y)
    ham = sum(1 for y in labels if not y)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Metrics(precision, recall, f1, fp / ham if ham else 0.0, roc_auc(scores, labels), fp,
                   ham, per_second)


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Probability that a random spam scores above a random ham (ties count half)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    positives = sum(labels)
    negatives = len(labels) - positives
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def splits(samples: list[corpus.Sample], only: str | None
           ) -> list[tuple[str, list[corpus.Sample], list[corpus.Sample]]]:
    out = []
    if only in (None, "temporal"):
        out.append(("temporal set1->set2",
                    [s for s in samples if s.group in SET1],
                    [s for s in samples if s.group in SET2]))
    if only in (None, "random"):
        rng = random.Random(0)
        train: list[corpus.Sample] = []
        test: list[corpus.Sample] = []
        for label in (True, False):
            part = [s for s in samples if s.spam is label]
            rng.shuffle(part)
            cut = round(len(part) * 0.2)
            test += part[:cut]
            train += part[cut:]
        out.append(("random 80/20 seed 0", train, test))
    return out


_BRACKET_IP = re.compile(r"\[(\d{1,3}(?:\.\d{1,3}){3})\]")
UNKNOWN_CLIENT = "::1"  # remote (nothing is trusted here) but no network subject


def envelope_of(raw: bytes) -> Envelope:
    """MAIL FROM and client address as the recipient's MX saw them (see the module text)."""
    head = email.message_from_bytes(raw.split(b"\n\n", 1)[0] + b"\n\n")
    mail_from = str(head.get("return-path", "")).strip().strip("<>")
    hops = [str(v) for v in head.get_all("received") or []]
    mx_hop = 0
    for i, hop in enumerate(hops[:4]):
        if "fetchmail" in hop.lower():
            mx_hop = i + 1
    client = UNKNOWN_CLIENT
    match = _BRACKET_IP.search(hops[mx_hop]) if mx_hop < len(hops) else None
    if match:
        try:
            address = ipaddress.ip_address(match.group(1))
        except ValueError:
            address = None
        if address is not None and not (address.is_private or address.is_loopback):
            client = str(address)
    return Envelope(mail_from, ("user@bench.test",), client)


def verdict_scores(model: Model, test: Sequence[corpus.Sample], work: Path) -> list[float]:
    """Each test message's verdict score (junk at >= 0), replayed in order of arrival."""
    order = sorted(range(len(test)), key=lambda i: arrival(test[i].raw))
    scores = [0.0] * len(test)

    async def replay() -> None:
        metadata = SqliteMetadataStore(str(work / "metadata.db"))
        await metadata.open()
        now = [0.0]
        spam_filter = SpamFilter(
            metadata=metadata, blobs=cast(BlobStore, None), classifier=ContentClassifier(model),
            authenticator=None, resolver=None, hostname="mx.bench.test",
            settings=FilterSettings(check_auth=False, trusted_networks=()),
            clock=lambda: now[0])
        user = await metadata.create_user("user@bench.test", "x")
        try:
            for i in order:
                sample = test[i]
                now[0] = arrival(sample.raw)
                envelope = envelope_of(sample.raw)
                analysis = await spam_filter.analyse(envelope, sample.raw)
                decision = await spam_filter.decide(analysis, envelope, sample.raw, user)
                await spam_filter.record_verdict(analysis, decision.junk)
                scores[i] = decision.score  # rounded to 0.01; junk at >= 0
        finally:
            await metadata.close()

    work.mkdir(parents=True, exist_ok=True)
    asyncio.run(replay())
    return scores


def postroom_run(train: list[corpus.Sample], test: list[corpus.Sample],
                 verdict_dir: Path | None = None) -> tuple[Metrics, Metrics | None]:
    model = train_model([(s.raw, s.spam) for s in train])  # as `postroom spam train` does
    start = time.process_time()
    scores = [model.logit(*vectorize(extract(parse_message(s.raw)))) for s in test]
    elapsed = time.process_time() - start
    content = metrics(scores, [s.spam for s in test], 0.0, len(test) / elapsed)
    if verdict_dir is None:
        return content, None
    start = time.monotonic()
    verdicts = verdict_scores(model, test, verdict_dir)
    return content, metrics(verdicts, [s.spam for s in test], -0.005,
                            len(test) / (time.monotonic() - start))


# ---------------------------------------------------------------------------- SpamAssassin

_SA_SCORER = r"""
use strict; use warnings;
use Mail::SpamAssassin;
use Time::HiRes qw(time);
my ($prefs) = @ARGV;
my $sa = Mail::SpamAssassin->new({ userprefs_filename => $prefs, local_tests_only => 1,
                                   dont_copy_prefs => 1 });
$sa->init(1);
my $busy = 0;
$| = 1;
while (my $path = <STDIN>) {
    chomp $path;
    open(my $fh, '<', $path) or die "$path: $!";
    local $/; my $raw = <$fh>; close $fh;
    my $t = time;
    my $msg = $sa->parse($raw);
    my $status = $sa->check($msg);
    printf "%s\t%.3f\n", $path, $status->get_score();
    $status->finish; $msg->finish;
    $busy += time - $t;
}
printf STDERR "busy %.3f\n", $busy;
"""


def spamassassin_available() -> bool:
    return shutil.which("sa-learn") is not None and shutil.which("perl") is not None \
        and subprocess.run(["perl", "-MMail::SpamAssassin", "-e", "1"],
                           capture_output=True).returncode == 0


def spamassassin_run(train: list[corpus.Sample], test: list[corpus.Sample], work: Path,
                     workers: int = 2) -> Metrics:
    work.mkdir(parents=True)
    prefs = work / "user_prefs"
    prefs.write_text(
        "use_bayes 1\nbayes_auto_learn 0\n"
        f"bayes_path {work}/bayes/bayes\n"
        "use_razor2 0\nuse_pyzor 0\nuse_dcc 0\nskip_rbl_checks 1\ndns_available no\n"
        "use_auto_whitelist 0\nrequired_score 5.0\n")
    (work / "bayes").mkdir()
    for name, part in (("train", train), ("test", test)):
        for label in ("spam", "ham"):
            (work / name / label).mkdir(parents=True)
        for i, s in enumerate(part):
            (work / name / ("spam" if s.spam else "ham") / f"{i:05d}").write_bytes(s.raw)
    for label in ("spam", "ham"):
        subprocess.run(["sa-learn", "--local", "--prefspath", str(prefs), "--dbpath",
                        str(work / "bayes"), f"--{label}", str(work / "train" / label)],
                       check=True, capture_output=True)
    paths = [p for label in ("spam", "ham") for p in sorted((work / "test" / label).iterdir())]
    scorer = work / "score.pl"
    scorer.write_text(_SA_SCORER)
    procs = []
    for n in range(workers):
        chunk = "".join(f"{p}\n" for p in paths[n::workers])
        proc = subprocess.Popen(["perl", str(scorer), str(prefs)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((proc, chunk))
    scores: dict[str, float] = {}
    busy = 0.0
    with ThreadPoolExecutor(len(procs)) as pool:  # feed the workers side by side
        outputs = list(pool.map(lambda pc: pc[0].communicate(pc[1]), procs))
    for (proc, _), (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"SpamAssassin scorer failed: {err[-2000:]}")
        for line in out.splitlines():
            path, score = line.rsplit("\t", 1)
            scores[path] = float(score)
        busy += float(err.strip().rsplit("busy ", 1)[1])
    values = [scores[str(p)] for p in paths]
    labels = [p.parent.name == "spam" for p in paths]
    return metrics(values, labels, 5.0 - 1e-9, len(paths) / busy)


def table(rows: list[tuple[str, str, Metrics]]) -> str:
    head = ("| split | filter | precision | recall | F1 | ham marked spam | ROC AUC | msg/s |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for split, name, m in rows:
        lines.append(f"| {split} | {name} | {m.precision:.4f} | {m.recall:.4f} | {m.f1:.4f} | "
                     f"{m.fpr * 100:.2f} % ({m.false_positives}/{m.ham}) | {m.auc:.4f} | "
                     f"{m.per_second:.0f} |")
    return "\n".join(lines)


def corpus_directory(given: str | None) -> Path:
    """The corpus directory given, else the test suite's cache (fetched when missing)."""
    if given:
        return Path(given)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.corpus import corpus_dir

    return corpus_dir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="corpus directory (default: the test suite's cache)")
    parser.add_argument("--no-spamassassin", action="store_true")
    parser.add_argument("--split", choices=("temporal", "random"))
    parser.add_argument("--verdict", action="store_true",
                        help="also the whole verdict with the service's own sender reputation")
    args = parser.parse_args(argv)
    directory = corpus_directory(args.corpus)
    samples = list(corpus.load(directory))
    print(f"corpus: {len(samples)} messages from {directory}", flush=True)
    use_sa = not args.no_spamassassin and spamassassin_available()
    if not use_sa:
        print("SpamAssassin: not run (install Debian's spamassassin to compare)")
    rows: list[tuple[str, str, Metrics]] = []
    with tempfile.TemporaryDirectory(prefix="spam-eval-") as tmp:
        for n, (name, train, test) in enumerate(splits(samples, args.split)):
            print(f"{name}: train {len(train)}, test {len(test)}", flush=True)
            content, verdict = postroom_run(train, test,
                                            Path(tmp) / f"verdict{n}" if args.verdict else None)
            rows.append((name, "Postroom", content))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if verdict is not None:
                rows.append((name, "Postroom verdict (content + own reputation)", verdict))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
            if use_sa:
                rows.append((name, "SpamAssassin 4 + Bayes",
                             spamassassin_run(train, test, Path(tmp) / f"sa{n}",
                                              workers=min(2, os.cpu_count() or 1))))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
