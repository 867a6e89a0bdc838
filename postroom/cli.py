"""The `postroom` command: serve, and manage domains, users, aliases and the queues.

Management commands open the same storage as the server (SQLite in WAL mode takes a second
writer), so they work while the server runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from postroom import __version__
from postroom.app import Postroom
from postroom.config import ROLES, ConfigError, Settings, load_settings, parse_hostport, parse_roles
from postroom.listeners import PROTOCOLS as LISTENER_FLAGS
from postroom.service import ServiceError
from postroom.store.queue import HELD, INCOMING, OUTGOING

log = logging.getLogger("postroom")



def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed, else on the standard event loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="postroom", description="Postroom mail server")
    parser.add_argument("--version", action="version", version=f"postroom {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="data directory (default ./postroom-data, or POSTROOM_DATA_DIR)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server (HTTP API and workers)")
    serve.add_argument("--http", metavar="HOST:PORT", help="HTTP listener (default 127.0.0.1:8080)")
    serve.add_argument("--hostname", help="this server's host name (HELO, Message-IDs)")
    serve.add_argument("--roles", metavar="ROLE,...",
                       help=f"what this node runs: {','.join(ROLES)} (default: all)")
    for name in LISTENER_FLAGS:
        serve.add_argument(f"--{name}", metavar="HOST:PORT", help=f"{name.upper()} listener")

    domain = sub.add_parser("domain", help="local mail domains")
    dsub = domain.add_subparsers(dest="action", required=True)
    dsub.add_parser("add", help="add a local domain").add_argument("name")
    dsub.add_parser("remove", help="remove a domain without users").add_argument("name")
    dsub.add_parser("list", help="list local domains")

    user = sub.add_parser("user", help="mail users")
    usub = user.add_subparsers(dest="action", required=True)
    add = usub.add_parser("add", help="add a user (prompts for the password when omitted)")
    add.add_argument("address")
    add.add_argument("--password", help="the password (avoid: it shows in the process list)")
    passwd = usub.add_parser("passwd", help="change a user's password")
    passwd.add_argument("address")
    passwd.add_argument("--password")
    ulist = usub.add_parser("list", help="list users")
    ulist.add_argument("--domain")
    usub.add_parser("remove", help="remove a user and all their mail").add_argument("address")

    alias = sub.add_parser("alias", help="address aliases")
    asub = alias.add_subparsers(dest="action", required=True)
    aadd = asub.add_parser("add", help="deliver mail for ALIAS to TARGET")
    aadd.add_argument("alias")
    aadd.add_argument("target")
    asub.add_parser("remove", help="remove an alias").add_argument("alias")
    asub.add_parser("list", help="list aliases")

    queue = sub.add_parser("queue", help="inspect the mail queues")
    qsub = queue.add_subparsers(dest="action", required=True)
    qlist = qsub.add_parser("list", help="list queued items")
    qlist.add_argument("--topic", choices=[INCOMING, OUTGOING], default=None)
    qlist.add_argument("--json", action="store_true", help="machine-readable output")
    qshow = qsub.add_parser("show", help="one item with its delivery attempts and outcomes")
    qshow.add_argument("id", help="queue id (or the id it was first queued with)")
    qshow.add_argument("--json", action="store_true", help="machine-readable output")
    qretry = qsub.add_parser("retry", help="make items due for delivery now")
    qretry_which = qretry.add_mutually_exclusive_group(required=True)
    qretry_which.add_argument("id", nargs="?", help="queue id")
    qretry_which.add_argument("--all", action="store_true", help="every outgoing item")
    qsub.add_parser("delete", help="remove an item for good (no bounce is sent)"
                    ).add_argument("id", help="queue id")
    qheld = qsub.add_parser("held", help="outgoing mail held for the admin (bursts, spam)")
    qheld.add_argument("--json", action="store_true", help="machine-readable output")
    qsub.add_parser("release", help="send a held message on its way"
                    ).add_argument("id", help="queue id")

    dkim = sub.add_parser("dkim", help="DKIM signing keys")
    dkimsub = dkim.add_subparsers(dest="action", required=True)
    dkgen = dkimsub.add_parser("generate", help="make a signing key for DOMAIN and print the "
                               "DNS TXT record to publish")
    dkgen.add_argument("domain")
    dkgen.add_argument("--selector", default="postroom", help="DKIM selector (default postroom)")
    dkgen.add_argument("--bits", type=int, default=2048, choices=[1024, 2048, 3072, 4096])

    dnsrec = sub.add_parser("dns-records", help="print the MX, SPF, DKIM and DMARC records a "
                            "domain needs")
    dnsrec.add_argument("domain")
    dnsrec.set_defaults(action="")

    migrate = sub.add_parser("migrate", help="bring the metadata schema up to date (servers also"
                             " do this when they start)")
    migrate.add_argument("--status", action="store_true",
                         help="only show the schema version and the steps still to apply")
    migrate.add_argument("--to", type=int, metavar="VERSION",
                         help="apply the steps up to VERSION only")
    blobs = sub.add_parser("blobs", help="stored message bytes")
    bsub = blobs.add_subparsers(dest="action", required=True)
    bcollect = bsub.add_parser("collect", help="delete blobs no message or queue item refers to"
                               " (the server does this every [storage] blob_collect_interval)")
    bcollect.add_argument("--grace", type=float, metavar="SECONDS",
                          help="only blobs released this long ago ([storage] blob_grace)")
    bcollect.add_argument("--settle", type=float, default=10.0, metavar="SECONDS",
                          help="wait between quarantine and the final check (default 10)")
    bcollect.add_argument("--scan", action="store_true",
                          help="first look through the whole blob store for bytes no message "
                          "names (a long read of a big store)")
    from postroom.spam.cli import add_parser as add_spam_parser

    add_spam_parser(sub)
    from postroom.search.cli import add_parser as add_search_parser

    add_search_parser(sub)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    if args.command == "serve":
        overrides["http.listen"] = args.http
        overrides["hostname"] = args.hostname
        overrides["roles"] = args.roles
        for name in LISTENER_FLAGS:
            overrides[f"listeners.{name}"] = getattr(args, name)
    return load_settings(args.config, **overrides)


def read_password(given: str | None) -> str:
    if given is not None:
        return given
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise ServiceError("passwords do not match")
    return first


async def with_node(settings: Settings, job: Callable[[Postroom], Awaitable[int]]) -> int:
    async with Postroom(settings) as node:
        return await job(node)


async def manage(args: argparse.Namespace, node: Postroom) -> int:
    service = node.service
    cmd, action = args.command, args.action
    if cmd == "domain":
        if action == "add":
            added = await service.add_domain(args.name)
            print(f"added domain {added.name}")
        elif action == "remove":
            await service.remove_domain(args.name)
            print(f"removed domain {args.name}")
        else:
            for domain in await service.list_domains():
                print(domain.name)
    elif cmd == "user":
        if action == "add":
            user = await service.add_user(args.address, read_password(args.password))
            print(f"added user {user.address}")
        elif action == "passwd":
            await service.set_password(args.address, read_password(args.password))
            print(f"password changed for {args.address}")
        elif action == "remove":
            await service.remove_user(args.address)
            print(f"removed user {args.address}")
        else:
            for u in await service.list_users(args.domain):
                print(u.address)
    elif cmd == "alias":
        if action == "add":
            alias = await service.add_alias(args.alias, args.target)
            print(f"added alias {alias.alias} -> {alias.target}")
        elif action == "remove":
            await service.remove_alias(args.alias)
            print(f"removed alias {args.alias}")
        else:
            for a in await service.list_aliases():
                print(f"{a.alias} -> {a.target}")
    elif cmd == "queue":
        return await manage_queue(args, node)
    elif cmd in ("import", "search"):
        from postroom.search.cli import run as run_search_command

        return await run_search_command(args, service)
    elif cmd == "spam":
        from postroom.spam.cli import run_lists

        try:
            return await run_lists(args, node.metadata)
        except ValueError as exc:
            raise ServiceError(str(exc)) from None
    elif cmd == "dkim":
        from postroom.mailflow.dkim import DkimError, DkimKeys

        try:
            key = DkimKeys(node.settings.data_dir / "dkim").generate(
                args.domain, args.selector, bits=args.bits)
        except DkimError as exc:
            raise ServiceError(str(exc)) from None
        print(f"; DKIM key for {key.domain}, selector {key.selector}: publish this TXT record")
        print(key.zone_line())
    elif cmd == "dns-records":
        from postroom.mailflow.dns_records import records_for

        print(records_for(args.domain, node.settings))
    elif cmd == "blobs":
        import time

        from postroom.blob_collector import collect_backlog, find_unreleased

        grace = node.settings.storage.blob_grace if args.grace is None else args.grace
        released_before = None
        if args.scan:  # what the scan finds was untouched for `grace` already: take it now
            released_before = time.time() + 1
            print(f"scan: {await find_unreleased(node.metadata, node.blobs, grace=grace)} "
                  "blob(s) named by no message")
        reports = await collect_backlog(node.metadata, node.blobs, node.queue, grace=grace,
                                        settle=args.settle, released_before=released_before)
        for report in reports:
            print(f"examined {report.examined}: deleted {report.collected}, referenced again "
                  f"{report.referenced}, queued {report.queued}, put lately {report.recent}, "
                  f"already gone {report.missing}")
        print(f"{sum(r.collected for r in reports)} blob(s) deleted")
    return 0


async def manage_queue(args: argparse.Namespace, node: Postroom) -> int:
    from postroom.mailflow import queue_view

    queue = node.queue
    if args.action == "list":
        topics = [args.topic] if args.topic else [INCOMING, OUTGOING]
        rows = [queue_view.describe(item) for topic in topics
                for item in await queue.list(topic, limit=queue_view.LIST_LIMIT)]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(queue_view.format_line(row))
            print(f"{len(rows)} item(s)")
        return 0
    if args.action == "held":
        rows = [queue_view.describe(item)
                for item in await queue.list(HELD, limit=queue_view.LIST_LIMIT)]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for row in rows:
                print(queue_view.format_line(row) + f"  held: {row['held']}")
            print(f"{len(rows)} held item(s)")
        return 0
    if args.action == "release":
        held = await queue_view.find(queue, args.id, (HELD,))
        if held is None:
            raise ServiceError(f"no held item {args.id}")
        print(f"{held.item_id}: released as {await queue_view.release(queue, held)}")
        return 0
    if args.action == "retry" and args.all:
        items = await queue.list(OUTGOING, limit=queue_view.LIST_LIMIT)
    else:
        found = await queue_view.find(queue, args.id)
        if found is None:
            raise ServiceError(f"no queued item {args.id}")
        items = [found]
    for item in items:
        if args.action == "show":
            row = queue_view.describe(item)
            print(json.dumps(row, indent=2) if args.json else queue_view.format_detail(row))
        elif args.action == "retry":
            print(f"{item.item_id}: due now as {await queue_view.make_due(queue, item)}")
        elif args.action == "delete":
            if not await queue.remove(item.topic, item.item_id):
                raise ServiceError(f"no queued item {item.item_id}")
            from postroom.blob_collector import release_queue_blobs

            await release_queue_blobs(node.metadata, [item])
            print(f"{item.item_id}: deleted")
    if args.action == "retry" and args.all:
        print(f"{len(items)} item(s) due now")
    return 0


async def serve(settings: Settings) -> int:
    import uvicorn

    from postroom.http.api import create_app
    from postroom.http.server import HttpServer
    from postroom.listeners import start_listeners

    roles = parse_roles(settings.roles)
    host, port = parse_hostport(settings.http.listen)
    sock: socket.socket | None = None
    if "http" in roles:
        # Bind here, not inside uvicorn, so a taken port is a clear error before we serve.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen for HTTP on {host}:{port}: {exc.strerror}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with Postroom(settings) as node:
        await node.offload_search_writes()
        if node.service.indexer is not None:  # index writes IMAP queued before a crash
            node.service.indexer.claim_journal(settings.data_dir)
            await node.service.indexer.recover(node.metadata)
        if "workers" in roles:
            await node.start_workers()
        listeners = await start_listeners(node, roles)
        stop_task = asyncio.create_task(stop.wait())
        server: HttpServer | None = None
        http_task: asyncio.Task[None] | None = None
        if sock is not None:
            app = create_app(node.service, settings.http.max_request_bytes)
            config = uvicorn.Config(app, host=host, port=port, log_level=settings.log_level,
                                    lifespan="off", access_log=False, server_header=False,
                                    # Push frames are small JSON, written once for all
                                    # connections (http/events_ws.py): no zlib per socket.
                                    ws_per_message_deflate=False)
            server = HttpServer(config)
            await app.state.event_hub.start()  # the push channel's log starts now
            http_task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
            log.info("postroom %s serving HTTP on http://%s:%d (data in %s)", __version__, host,
                     port, settings.data_dir.resolve())
        log.info("postroom %s roles: %s", __version__,
                 ",".join(role for role in ROLES if role in roles))
        await asyncio.wait({stop_task} | ({http_task} if http_task else set()),
                           return_when=asyncio.FIRST_COMPLETED)
        if server is not None:
            server.should_exit = True
            await app.state.event_hub.stop()  # closes the WebSockets, so uvicorn can stop
        stop_task.cancel()
        for listener in listeners:
            listener.close()
        if http_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await http_task
        for listener in listeners:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.wait_closed(), 5)
        log.info("postroom stopped")
    return 0


async def migrate(args: argparse.Namespace, settings: Settings) -> int:
    """`postroom migrate`: apply the missing schema steps (expand-then-contract, so running
    nodes of the previous release keep working), or with --status only report."""
    from postroom.app import migrate_metadata
    from postroom.store.errors import StoreError
    from postroom.store.migrations import STEPS

    try:
        outcome = await migrate_metadata(settings.storage_url("metadata"), args.to, args.status)
    except (StoreError, OSError) as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        return 2
    before, after = outcome.before, outcome.after
    names = {s.version: s.name for s in STEPS}
    if args.status:
        print(f"metadata schema at version {before.version}; this code knows {before.latest}")
        for version in before.pending:
            print(f"  pending: {version} {names[version]}")
        if not before.compatible:
            print(f"  this code is too old: the schema needs version {before.oldest_compatible}")
        return 0
    for version in outcome.applied:
        print(f"applied {version} {names[version]}")
    if outcome.applied:
        print(f"metadata schema: version {before.version} -> {after.version}")
    else:
        print(f"metadata schema: version {after.version}, nothing to do")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(args)
        logging.getLogger().setLevel(settings.log_level.upper())
        if args.command == "serve":
            return run_async(serve(settings))
        if args.command == "migrate":
            return run_async(migrate(args, settings))
        if args.command == "spam" and args.action == "train":
            from postroom.spam.cli import run_train

            return run_train(args, settings.data_dir)
        return run_async(with_node(settings, lambda node: manage(args, node)))
    except (ConfigError, ServiceError) as exc:
        print(f"postroom: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
