"""Outbound delivery: send the outgoing queue to the internet's MX hosts.

One queue item is one message with its remote recipients (put there by MailService._dispatch).
A delivery attempt groups the recipients still pending by domain and sends each group in one
transaction (RFC 5321 §3.3: a transaction carries many recipients) to the first host of the
domain's route that takes it; groups of different domains go out concurrently, within a limit
per domain and an overall one. Connections stay open for a while after a transaction, and the
next message to the same host reuses them.

Each recipient ends an attempt delivered (2xx), failed (5xx, null MX, no such domain) or
deferred (4xx, connection trouble, DNS timeout). Failed recipients get a DSN in the sender's
INBOX; deferred ones are tried again on the schedule until `max_age`, when they fail too.

Durability. The item is acked only after every recipient is delivered or its bounce is filed.
When some remain, the item's state (who is done, the attempt history) is put back on the queue
as a new item with the next attempt's delay *before* the old item is acked, so a crash between
the two leaves two items (a duplicate at worst), never none. The new item's id is the first
one's with `-N` added; `postroom queue show` finds it by either.

A worker holds its item on a short lease (`[delivery] lease`, 30 s) that it extends while the
attempt runs, so the item of a worker that died is due again within seconds of a restart.
Before the put-back counts, the worker checks the item it holds is still queued: an operator
may have run `queue delete` (then the put-back is withdrawn: the message is cancelled) or
`queue retry` (then the operator's due copy is withdrawn instead: the attempt just made was
that retry, and the put-back carries its results).

Once a message has waited `[delivery] delay_notice` (4 h) with recipients still pending, the
sender gets one "delayed" DSN (RFC 3464 Action: delayed); the payload remembers it was sent.

Payload (JSON): mail_from, rcpt_to, blob, user_id, queued_at (as `_dispatch` writes them), and
once tried: id (the first item's id), pending, delivered, failed, attempts (the history),
attempt_count, delay_notified.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from postroom.blob_collector import release_queue_blobs
from postroom.config import DeliverySettings, Settings, parse_hostport
from postroom.mailflow.dkim import DkimKeys, DkimSigner
from postroom.mailflow.dsn import RecipientStatus, build_dsn
from postroom.mailflow.routing import Host, Router, RoutingError, make_resolver
from postroom.mailflow.smtp_client import (
    Reply,
    SmtpClient,
    SmtpError,
    TlsMode,
    needs_smtputf8,
    verifying_context,
    wire_format,
)
from postroom.service import MailService
from postroom.store.queue import OUTGOING, Queue, QueueItem

LIST_LIMIT = 100_000  # as `queue list` (only read when an operator removed an item in flight)

log = logging.getLogger(__name__)

DELIVERED, DEFERRED, FAILED = "delivered", "deferred", "failed"
MAX_RCPTS_PER_TRANSACTION = 100  # RFC 5321 §4.5.3.1.8: every server takes at least 100
MAX_HISTORY = 50  # attempts kept in the payload (the first and the latest ones)


@dataclass(frozen=True, slots=True)
class RecipientResult:
    rcpt: str
    outcome: str  # delivered | deferred | failed
    status: str  # RFC 3463 code
    reply: str  # what the remote host (or we) said
    host: str = ""  # name[address] of the host that said it


@dataclass(slots=True)
class OutgoingMessage:
    """A queue item's payload, decoded."""

    id: str
    mail_from: str
    rcpt_to: list[str]
    blob: str
    user_id: str
    queued_at: float
    pending: list[str]
    delivered: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    attempt_count: int = 0
    delay_notified: bool = False

    @classmethod
    def from_item(cls, item: QueueItem) -> OutgoingMessage:
        data = json.loads(item.payload)
        if not isinstance(data, dict):
            raise ValueError("payload is not a JSON object")
        rcpt_to = [str(r) for r in data["rcpt_to"]]
        return cls(
            id=str(data.get("id") or item.item_id),
            mail_from=str(data.get("mail_from") or ""),
            rcpt_to=rcpt_to,
            blob=str(data["blob"]),
            user_id=str(data.get("user_id") or ""),
            queued_at=float(data.get("queued_at") or item.enqueued_at),
            pending=[str(r) for r in data.get("pending", rcpt_to)],
            delivered=dict(data.get("delivered", {})),
            failed=dict(data.get("failed", {})),
            attempts=list(data.get("attempts", [])),
            attempt_count=int(data.get("attempt_count", len(data.get("attempts", [])))),
            delay_notified=bool(data.get("delay_notified", False)),
        )

    def payload(self) -> bytes:
        return json.dumps({
            "id": self.id, "mail_from": self.mail_from, "rcpt_to": self.rcpt_to,
            "blob": self.blob, "user_id": self.user_id, "queued_at": self.queued_at,
            "pending": self.pending, "delivered": self.delivered, "failed": self.failed,
            "attempts": self.attempts, "attempt_count": self.attempt_count,
            "delay_notified": self.delay_notified,
        }).encode()


class ConnectionPool:
    """Idle SMTP connections by (address, port), kept `idle_timeout` seconds for reuse."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[str, int], list[tuple[SmtpClient, float]]] = {}
        self.reused = 0

    async def take(self, key: tuple[str, int]) -> SmtpClient | None:
        await self.expire()
        while self._idle.get(key):
            client, _ = self._idle[key].pop()
            # The server may have timed the idle session out: RSET proves it is alive.
            try:
                if (await client.command("RSET")).code == 250:
                    self.reused += 1
                    return client
            except SmtpError:
                pass
            client.close()
        return None

    def give_back(self, key: tuple[str, int], client: SmtpClient) -> None:
        if client.broken or self.idle_timeout <= 0:
            client.close()
            return
        self._idle.setdefault(key, []).append((client, time.monotonic() + self.idle_timeout))

    async def expire(self, everything: bool = False) -> None:
        now = time.monotonic()
        for key in list(self._idle):
            keep = []
            for client, until in self._idle[key]:
                if everything or until <= now or client.broken:
                    await client.quit()
                else:
                    keep.append((client, until))
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]


@dataclass(frozen=True, slots=True)
class Destination:
    """How one group of recipients is sent: the hosts to try and how to talk to them."""

    name: str  # the domain (or "smarthost")
    hosts: list[Host]
    port: int
    tls: TlsMode
    username: str = ""
    password: str = ""
    verify: bool = False  # the certificate must verify (no plaintext fallback)


class OutboundDelivery:
    """Sends outgoing queue items; shared by all delivery workers of a node."""

    def __init__(self, service: MailService, queue: Queue, settings: Settings,
                 router: Router | None = None) -> None:
        self.service = service
        self.queue = queue
        self.settings = settings
        self.config: DeliverySettings = settings.delivery
        self.hostname = settings.hostname
        self.router = router or Router(make_resolver(settings.dns.servers, settings.dns.timeout))
        self.signer = DkimSigner(DkimKeys(settings.data_dir / "dkim"))
        self.pool = ConnectionPool(self.config.idle_timeout)
        self._all = asyncio.Semaphore(self.config.max_connections)
        self._per_domain: dict[str, asyncio.Semaphore] = {}
        self._verifying: ssl.SSLContext | None = None

    # ------------------------------------------------------------------------------ an item

    async def handle(self, item: QueueItem) -> None:
        """One delivery attempt of one queue item, ending in ack or a rescheduled item."""
        try:
            message = OutgoingMessage.from_item(item)
        except (ValueError, KeyError, TypeError) as exc:
            # Never dropped: it stays visible in `queue list` for an operator to delete.
            log.error("outgoing item %s has a malformed payload: %s", item.item_id, exc)
            await self.queue.retry(item, self.config.schedule[-1],
                                   error=f"malformed payload: {exc}"[:500])
            return
        raw = await self.service.blobs.get(message.blob)
        wire = self.signer.sign(wire_format(raw), message.mail_from)
        now = time.time()
        results: list[RecipientResult] = []
        if now - message.queued_at >= self.config.max_age:
            results = self._expire(message)
        elif message.pending:
            groups = self._group(message.pending)
            outcomes = await asyncio.gather(*(
                self._deliver_group(name, rcpts, message.mail_from, wire)
                for name, rcpts in groups.items()))
            results = [r for group in outcomes for r in group]
        await self._record(item, message, results, raw, now)

    def _group(self, rcpts: Sequence[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rcpt in rcpts:
            key = "" if self.config.smarthost else rcpt.rpartition("@")[2].lower()
            groups.setdefault(key, []).append(rcpt)
        return groups

    def _expire(self, message: OutgoingMessage) -> list[RecipientResult]:
        last = message.attempts[-1]["results"] if message.attempts else []
        previous = {r["rcpt"]: r for r in last}
        out = []
        for rcpt in message.pending:
            before = previous.get(rcpt, {})
            reason = before.get("reply", "")
            out.append(RecipientResult(
                rcpt, FAILED, "4.4.7",
                f"delivery time expired after {self.config.max_age / 86400:g} days"
                + (f"; last error: {reason}" if reason else ""), before.get("host", "")))
        return out

    async def _record(self, item: QueueItem, message: OutgoingMessage,
                      results: list[RecipientResult], raw: bytes, started: float) -> None:
        """Apply an attempt's results; bounce the failures; ack, or reschedule the rest."""
        now = time.time()
        message.attempt_count += 1
        message.attempts.append({
            "at": started, "results": [
                {"rcpt": r.rcpt, "outcome": r.outcome, "status": r.status, "reply": r.reply,
                 "host": r.host} for r in results]})
        if len(message.attempts) > MAX_HISTORY:
            message.attempts = message.attempts[:1] + message.attempts[-(MAX_HISTORY - 1):]
        newly_failed: list[RecipientResult] = []
        for r in results:
            entry = {"at": now, "status": r.status, "reply": r.reply, "host": r.host}
            if r.outcome == DELIVERED:
                message.delivered[r.rcpt] = entry
            elif r.outcome == FAILED:
                message.failed[r.rcpt] = entry
                newly_failed.append(r)
            else:
                continue
            log.info("outgoing %s to=<%s> relay=%s status=%s (%s)", message.id, r.rcpt,
                     r.host or "none", "sent" if r.outcome == DELIVERED else "bounced", r.reply)
        done = set(message.delivered) | set(message.failed)
        message.pending = [r for r in message.pending if r not in done]
        if newly_failed:
            await self._bounce(message, newly_failed, raw, now)
        if not message.pending:
            await self.queue.ack(item)
            # the collector keeps the bytes while the Sent copy names them
            await release_queue_blobs(self.service.metadata, [item])
            return
        deferred = [r for r in results if r.outcome == DEFERRED]
        for r in deferred:
            log.info("outgoing %s to=<%s> relay=%s status=deferred (%s)", message.id, r.rcpt,
                     r.host or "none", r.reply)
        schedule = self.config.schedule
        delay = schedule[min(message.attempt_count - 1, len(schedule) - 1)]
        # Never wait past the expiry: the last attempt is the one that bounces.
        delay = max(0.0, min(delay, message.queued_at + self.config.max_age - now))
        error = "; ".join(f"<{r.rcpt}> {r.reply}" for r in deferred)[:500]
        await self._notify_delay(message, raw, now)
        new_id = f"{message.id}-{message.attempt_count}"
        await self.queue.put(OUTGOING, message.payload(), item_id=new_id, delay=delay)
        if not await self.queue.exists(OUTGOING, item.item_id):
            await self._removed_meanwhile(message, new_id)
            return
        await self.queue.ack(item)
        log.info("outgoing %s: %d recipient(s) deferred, next attempt in %.0fs (%s)", message.id,
                 len(message.pending), delay, error)

    async def _removed_meanwhile(self, message: OutgoingMessage, new_id: str) -> None:
        """The item vanished while we delivered it: `queue delete` or `queue retry` ran.

        A retry put a copy due now (same first id) before removing ours; we keep our put-back,
        which holds this attempt's results, and withdraw the copy. No copy: it was deleted, and
        so is our put-back. Our put-back is only ours if it holds our payload: when another
        worker, delivering the copy, put back first under the same id, ours was a no-op, and
        that item stays as it is.
        """
        mine = message.payload()
        # A copy's id is its first id (or, made before the first attempt, the item's) + "-…".
        related = [other for other in await self.queue.list(OUTGOING, limit=LIST_LIMIT)
                   if _first_id(other) == message.id or other.item_id.startswith(message.id + "-")]
        ours = [i for i in related if i.item_id == new_id and i.payload == mine]
        others = [i for i in related if not (i.item_id == new_id and i.payload == mine)]
        if others:
            if ours:
                for other in others:
                    await self.queue.remove(OUTGOING, other.item_id)
            log.info("outgoing %s: retried by the operator during an attempt; the attempt "
                     "counts as the retry", message.id)
        elif ours:
            await self.queue.remove(OUTGOING, new_id)
            log.info("outgoing %s: deleted by the operator during an attempt; not retried",
                     message.id)

    async def _notify_delay(self, message: OutgoingMessage, raw: bytes, now: float) -> None:
        """RFC 3464 "delayed" report, once per message, when it has waited delay_notice."""
        notice = self.config.delay_notice
        if (notice <= 0 or message.delay_notified or not message.mail_from
                or now - message.queued_at < notice or not message.pending):
            return
        last = {r["rcpt"]: r for r in (message.attempts[-1]["results"]
                                        if message.attempts else [])}
        recipients = [RecipientStatus(rcpt, str(last.get(rcpt, {}).get("status") or "4.0.0"),
                                      "delayed", str(last.get(rcpt, {}).get("reply") or ""),
                                      str(last.get(rcpt, {}).get("host") or "").partition("[")[0],
                                      now) for rcpt in message.pending]
        dsn = build_dsn(reporting_mta=self.hostname, sender=message.mail_from, original=raw,
                        recipients=recipients, arrival=message.queued_at, now=now)
        # Keyed by the message: a put-back lost in a crash repeats the notice as a no-op.
        record = await self.service.deliver_report(
            message.user_id, message.mail_from, dsn, delivery_key=f"dsn-delay:{message.id}")
        message.delay_notified = True
        log.info("outgoing %s: delay notice %s <%s>", message.id,
                 "sent to" if record is not None else "dropped for non-local sender",
                 message.mail_from)

    async def _bounce(self, message: OutgoingMessage, failed: list[RecipientResult],
                      raw: bytes, now: float) -> None:
        if not message.mail_from:
            # Null sender: this is itself a notification, and a bounce is never bounced.
            log.info("outgoing %s: not bouncing a message with an empty sender", message.id)
            return
        dsn = build_dsn(
            reporting_mta=self.hostname, sender=message.mail_from, original=raw,
            recipients=[RecipientStatus(r.rcpt, r.status, "failed", r.reply,
                                        r.host.partition("[")[0], now) for r in failed],
            arrival=message.queued_at, now=now)
        record = await self.service.deliver_report(
            message.user_id, message.mail_from, dsn,
            delivery_key=f"dsn:{message.id}:{message.attempt_count}")
        if record is None:
            log.warning("outgoing %s: sender <%s> is not a local user; bounce dropped",
                        message.id, message.mail_from)

    # ------------------------------------------------------------------------- one domain

    async def _route(self, domain: str) -> Destination:
        config = self.config
        if config.smarthost:  # a relay host replaces MX routing for every domain
            name, port = parse_hostport(config.smarthost)
            host = Host(name, await self._smarthost_addresses(name))
            verify = config.smarthost_tls_verify and config.smarthost_tls != "none"
            tls: TlsMode = config.smarthost_tls
            if verify and tls == "opportunistic":
                tls = "starttls"  # a certificate to verify needs TLS
            return Destination("smarthost", [host], port, tls,
                               config.smarthost_username, config.smarthost_password, verify)
        hosts = await self.router.hosts_for(domain)
        if config.tls_verify and config.tls != "none":
            # Like Postfix's "verify" level: TLS required, the MX name checked against the
            # certificate (RFC 7672 would bind it to DNSSEC; MTA-STS to a fetched policy).
            return Destination(domain, hosts, config.port, "starttls", verify=True)
        return Destination(domain, hosts, config.port, config.tls)

    def _verifying_context(self) -> ssl.SSLContext:
        if self._verifying is None:
            self._verifying = verifying_context(self.config.tls_ca_file or None)
        return self._verifying

    async def _smarthost_addresses(self, name: str) -> tuple[str, ...]:
        try:
            return (str(ipaddress.ip_address(name)),)
        except ValueError:
            pass
        infos = await asyncio.get_running_loop().getaddrinfo(name, None)
        addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise RoutingError(f"smarthost {name} has no address", permanent=False,
                               status="4.4.3")
        return addresses

    async def _deliver_group(self, domain: str, rcpts: list[str], mail_from: str,
                             wire: bytes) -> list[RecipientResult]:
        try:
            destination = await self._route(domain)
        except RoutingError as exc:
            outcome = FAILED if exc.permanent else DEFERRED
            return [RecipientResult(r, outcome, exc.status, str(exc)) for r in rcpts]
        except OSError as exc:
            return [RecipientResult(r, DEFERRED, "4.4.3", f"lookup failed: {exc}") for r in rcpts]
        limit = self._per_domain.setdefault(destination.name or domain,
                                            asyncio.Semaphore(self.config.connections_per_domain))
        async with limit, self._all:
            return await self._deliver_to_hosts(destination, rcpts, mail_from, wire)

    async def _deliver_to_hosts(self, destination: Destination, rcpts: list[str],
                                mail_from: str, wire: bytes) -> list[RecipientResult]:
        """Try each host and each of its addresses in order until one holds a transaction."""
        last_error = "no host to try"
        permanent_everywhere = True
        for host in destination.hosts:
            for address in host.addresses:
                label = f"{host.name}[{address}]"
                try:
                    client = await self._connection(destination, address, host.name)
                except SmtpError as exc:
                    last_error = f"{label}: {exc}"
                    permanent_everywhere &= exc.permanent
                    log.info("delivery to %s: %s", destination.name, last_error)
                    continue
                key = (address, destination.port)
                try:
                    results = await self._transactions(client, label, rcpts, mail_from, wire)
                except SmtpError as exc:
                    client.close()
                    last_error = f"{label}: {exc}"
                    permanent_everywhere = False
                    log.info("delivery to %s: %s", destination.name, last_error)
                    continue
                self.pool.give_back(key, client)
                return results
        # RFC 5321 §3.1: a 5xx greeting from every host means they will not take this mail.
        outcome = FAILED if permanent_everywhere and destination.hosts else DEFERRED
        status = "5.4.0" if outcome == FAILED else "4.4.1"
        return [RecipientResult(r, outcome, status, last_error) for r in rcpts]

    async def _connection(self, destination: Destination, address: str,
                          name: str) -> SmtpClient:
        key = (address, destination.port)
        if not destination.username:  # an authenticated session is never shared
            reused = await self.pool.take(key)
            if reused is not None:
                return reused
        config = self.config
        args: dict[str, Any] = dict(
            helo=self.hostname, server_name=name, connect_timeout=config.connect_timeout,
            command_timeout=config.command_timeout, data_timeout=config.data_timeout,
            source_address=config.source_address)
        if destination.verify:
            args["tls_context"] = self._verifying_context()
        try:
            client = await SmtpClient.connect(address, destination.port, tls=destination.tls,
                                              **args)
        except SmtpError as exc:
            if destination.tls != "opportunistic" or destination.verify or "TLS" not in str(exc):
                raise
            # RFC 7435: opportunistic TLS that fails falls back to a plaintext session.
            log.info("TLS with %s failed (%s); retrying without TLS", address, exc)
            client = await SmtpClient.connect(address, destination.port, tls="none", **args)
        if destination.username:
            try:
                await client.login(destination.username, destination.password)
            except SmtpError:
                client.close()
                raise
        return client

    async def _transactions(self, client: SmtpClient, label: str, rcpts: list[str],
                            mail_from: str, wire: bytes) -> list[RecipientResult]:
        results: list[RecipientResult] = []
        if client.max_size and len(wire) > client.max_size:
            return [RecipientResult(r, FAILED, "5.3.4",
                                    f"message of {len(wire)} bytes exceeds the size limit "
                                    f"of {client.max_size} of {label}", label) for r in rcpts]
        has_utf8 = "SMTPUTF8" in client.extensions
        if needs_smtputf8(mail_from) and not has_utf8:
            return [self._no_utf8(r, label) for r in rcpts]
        sendable = []
        for rcpt in rcpts:
            if needs_smtputf8(rcpt) and not has_utf8:
                results.append(self._no_utf8(rcpt, label))
            else:
                sendable.append(rcpt)
        smtputf8 = has_utf8 and (not mail_from.isascii() or any(not r.isascii() for r in sendable)
                                 or not _head(wire).isascii())
        for start in range(0, len(sendable), MAX_RCPTS_PER_TRANSACTION):
            chunk = sendable[start:start + MAX_RCPTS_PER_TRANSACTION]
            transaction = await client.send(mail_from, chunk, wire, smtputf8=smtputf8)
            for rcpt in chunk:
                results.append(_result(rcpt, transaction.outcome(rcpt), label))
        return results

    @staticmethod
    def _no_utf8(rcpt: str, label: str) -> RecipientResult:
        return RecipientResult(rcpt, FAILED, "5.6.7",
                               f"{label} does not support SMTPUTF8, which this address needs",
                               label)

    async def close(self) -> None:
        await self.pool.expire(everything=True)


def _head(wire: bytes) -> bytes:
    end = wire.find(b"\r\n\r\n")
    return wire if end < 0 else wire[:end]


def _first_id(item: QueueItem) -> str:
    try:
        data = json.loads(item.payload)
    except ValueError:
        return item.item_id
    return str(data.get("id") or item.item_id) if isinstance(data, dict) else item.item_id


def _result(rcpt: str, reply: Reply, label: str) -> RecipientResult:
    if reply.ok:
        outcome = DELIVERED
    elif reply.permanent:
        outcome = FAILED
    else:
        outcome = DEFERRED
    return RecipientResult(rcpt, outcome, reply.enhanced, str(reply), label)


async def run_delivery_worker(delivery: OutboundDelivery, queue: Queue, stop: asyncio.Event,
                              lease: float | None = None) -> None:
    """Take outgoing items one at a time until `stop` is set."""
    lease = delivery.config.lease if lease is None else lease
    while not stop.is_set():
        try:
            item = await queue.take(OUTGOING, lease=lease, wait=1.0)
        except Exception:
            log.exception("taking from the outgoing queue failed")
            await asyncio.sleep(1.0)
            continue
        if item is None:
            await delivery.pool.expire()
            continue
        holder = asyncio.create_task(_hold_lease(queue, item, lease))
        try:
            try:
                await delivery.handle(item)
            finally:
                await _stop(holder)
        except asyncio.CancelledError:
            # Shutting down mid-delivery: make the item due again soon instead of after the
            # lease (a transaction cut short may be repeated: a duplicate at worst).
            with contextlib.suppress(Exception):
                await asyncio.shield(queue.retry(item, 5.0, "interrupted by shutdown"))
            raise
        except Exception as exc:  # storage trouble: the item is tried again, never lost
            log.exception("outgoing item %s failed", item.item_id)
            with contextlib.suppress(Exception):
                await queue.retry(item, delivery.config.schedule[0], error=repr(exc)[:500])


async def _hold_lease(queue: Queue, item: QueueItem, lease: float) -> None:
    """Keep the item ours while an attempt runs (slow hosts, long DATA): push its due time
    out every third of the lease. A retry with the same attempt number moves `not_before`
    without releasing the item (as incoming.py does); on an item acked or removed meanwhile it
    does nothing."""
    while True:
        await asyncio.sleep(lease / 3)
        try:
            await queue.retry(item, lease, error=item.last_error)
        except Exception:  # the engine is down: the attempt's own calls will say so
            log.warning("extending the lease of outgoing item %s failed", item.item_id)


async def _stop(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
