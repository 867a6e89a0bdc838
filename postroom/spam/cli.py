"""`postroom spam ...`: train the global model, and the service-wide block and allow lists."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from postroom.spam import corpus
from postroom.spam.classifier import train
from postroom.spam.filter import normalize_list_value
from postroom.store.metadata import MetadataStore

# The shipped model (postroom/spam/data/model.npz) is rebuilt with:
#   postroom spam train --corpus ~/.cache/postroom-corpus/package/data \
#       --groups easy-ham-1,hard-ham-1,spam-1 --out postroom/spam/data/model.npz
SHIPPED_GROUPS = ("easy-ham-1", "hard-ham-1", "spam-1")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    spam = sub.add_parser("spam", help="spam filtering: train the model, block and allow lists")
    ssub = spam.add_subparsers(dest="action", required=True)
    tr = ssub.add_parser("train", help="build the global content model from a labelled corpus")
    tr.add_argument("--corpus", required=True, metavar="DIR",
                    help="folders named for their class (spam-1, easy-ham-1, ...), one raw "
                         "message per file")
    tr.add_argument("--groups", help="comma-separated folders to use (default: all)")
    tr.add_argument("--out", metavar="FILE",
                    help="model file (default DATA_DIR/spam-model.npz, which serve loads)")
    tr.add_argument("--epochs", type=int, default=6)
    for action, text in (("block", "refuse mail from"), ("allow", "always accept mail from")):
        p = ssub.add_parser(action, help=f"{text} an ADDRESS, DOMAIN or IP (whole service)")
        p.add_argument("value")
    ssub.add_parser("unlist", help="remove an entry from the lists").add_argument("value")
    ssub.add_parser("lists", help="show the service-wide block and allow lists")


def run_train(args: argparse.Namespace, data_dir: Path) -> int:
    groups = [g.strip() for g in args.groups.split(",")] if args.groups else None
    start = time.monotonic()
    samples = [(s.raw, s.spam) for s in corpus.load(args.corpus, groups)]
    model = train(samples, epochs=args.epochs)
    model.info = {"groups": groups or corpus.groups(args.corpus), "messages": len(samples),
                  "spam": sum(1 for _, spam in samples if spam), "epochs": args.epochs}
    out = Path(args.out) if args.out else data_dir / "spam-model.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    print(f"trained on {len(samples)} messages in {time.monotonic() - start:.1f}s -> {out}")
    return 0


async def run_lists(args: argparse.Namespace, metadata: MetadataStore) -> int:
    if args.action == "lists":
        for entry in await metadata.list_entries(""):
            print(f"{entry.action}\t{entry.value}")
        return 0
    value = normalize_list_value(args.value)
    if args.action == "unlist":
        if not await metadata.remove_list_entry("", value):
            print(f"{value} is not listed")
            return 1
        return 0
    await metadata.set_list_entry("", value, args.action)
    print(f"{args.action} {value}")
    return 0
