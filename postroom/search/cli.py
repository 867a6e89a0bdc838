"""`postroom import mbox|maildir PATH --user ADDRESS [--folder NAME]` and
`postroom search reindex [--user ADDRESS]` / `postroom search query --user ADDRESS QUERY`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from postroom.search.reindex import Imported, read_maildir, read_mbox, reindex_user
from postroom.service import ConflictError, InvalidInput, MailService, NotFoundError

IMPORT_BATCH = 200  # messages filed in one transaction
IMPORT_BATCH_BYTES = 32 * 1024 * 1024


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    imp = sub.add_parser("import", help="import mail from an mbox file or a Maildir")
    imp.add_argument("format", choices=["mbox", "maildir"])
    imp.add_argument("path", type=Path)
    imp.add_argument("--user", required=True, metavar="ADDRESS", help="whose mailbox")
    imp.add_argument("--folder", default="INBOX", help="target folder (created if missing)")
    imp.set_defaults(action="")

    search = sub.add_parser("search", help="the search index: rebuild it, or try a query")
    ssub = search.add_subparsers(dest="action", required=True)
    re_ = ssub.add_parser("reindex", help="rebuild the index from the mail (serving goes on)")
    re_.add_argument("--user", metavar="ADDRESS", help="only this user (default: everyone)")
    q = ssub.add_parser("query", help="search a user's mail as the API does")
    q.add_argument("--user", required=True, metavar="ADDRESS")
    q.add_argument("--sort", choices=["date", "relevance"], default="date")
    q.add_argument("--limit", type=int, default=20)
    q.add_argument("query")


class ProgressBar:
    """A one-line bar on a terminal; a line every 10 % elsewhere (logs, pipes)."""

    def __init__(self, label: str, out: TextIO | None = None) -> None:
        self.label = label
        # sys.stderr read now, not at import: it may have been replaced since (pytest does)
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty()
        self.start = time.monotonic()
        self._last_tenth = -1

    def __call__(self, done: int, total: int) -> None:
        rate = done / max(time.monotonic() - self.start, 1e-6)
        if self.tty:
            width = 30
            filled = width * done // max(total, 1)
            self.out.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                           f"{done}/{total} {rate:.0f} msg/s")
            if done >= total:
                self.out.write("\n")
            self.out.flush()
            return
        tenth = 10 * done // max(total, 1)
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            print(f"{self.label}: {done}/{total} ({rate:.0f} msg/s)", file=self.out, flush=True)


async def run(args: argparse.Namespace, service: MailService) -> int:
    if args.command == "import":
        return await run_import(args, service)
    if args.action == "reindex":
        users = [await service.resolve_recipient(args.user)] if args.user \
            else await service.list_users()
        if any(u is None for u in users):
            raise NotFoundError(f"no such user {args.user}")
        for user in users:
            assert user is not None
            count = await reindex_user(service, user, ProgressBar(f"reindex {user.address}"))
            print(f"reindexed {count} messages of {user.address}")
        return 0
    user = await service.resolve_recipient(args.user)
    if user is None:
        raise NotFoundError(f"no such user {args.user}")
    page = await service.search(user, args.query, sort=args.sort, limit=args.limit)
    for result in page.results:
        r = result.record
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.internal_date))
        print(f"{r.message_id}  {when}  {r.headers.from_[:30]:30}  {r.headers.subject[:60]}")
    return 0


async def run_import(args: argparse.Namespace, service: MailService) -> int:
    user = await service.resolve_recipient(args.user)
    if user is None:
        raise NotFoundError(f"no such user {args.user}")
    path: Path = args.path
    try:
        total, items = read_mbox(path) if args.format == "mbox" else read_maildir(path)
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None
    try:
        folder = await service.get_folder(user, args.folder)
    except NotFoundError:
        try:
            folder = await service.create_folder(user, args.folder)
        except ConflictError:  # made meanwhile by someone else
            folder = await service.get_folder(user, args.folder)
    bar = ProgressBar(f"import {path.name}")
    done = failed = 0
    batch: list[Imported] = []

    async def file_batch() -> None:
        nonlocal done, failed
        try:  # one commit for the batch
            await service.append_many(user, folder.folder_id,
                                      [(i.raw, i.flags, i.internal_date) for i in batch])
        except InvalidInput:  # one of them is refused: file them one by one, saying which
            for k, item in enumerate(batch):
                try:
                    await service.append(user, folder.folder_id, item.raw, item.flags,
                                         item.internal_date)
                except InvalidInput as exc:  # too large, say: report it and carry on
                    failed += 1
                    print(f"\nskipped message {done + k + 1}: {exc}", file=sys.stderr)
        done += len(batch)
        batch.clear()
        bar(done, total)

    for item in items:
        batch.append(item)
        if len(batch) >= IMPORT_BATCH or sum(len(i.raw) for i in batch) > IMPORT_BATCH_BYTES:
            await file_batch()
    if batch:
        await file_batch()
    print(f"imported {done - failed} messages into {folder.name}"
          + (f" ({failed} skipped)" if failed else ""))
    return 0 if not failed else 1
