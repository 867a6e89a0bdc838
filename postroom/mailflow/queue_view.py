"""What `postroom queue list|show|retry|delete` sees: queue items described for operators.

An outgoing item carries its attempt history in its payload (see mailflow/outgoing.py); a
rescheduled item has a new queue id (`FIRST-N`), so an item is found by either its queue id or
its first id.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from postroom.store.queue import HELD, INCOMING, OUTGOING, Queue, QueueItem

TOPICS = (INCOMING, OUTGOING, HELD)
LIST_LIMIT = 100_000


def describe(item: QueueItem) -> dict[str, Any]:
    """The item as a JSON-able dict: envelope, state per recipient, and attempt history."""
    try:
        payload = json.loads(item.payload)
        if not isinstance(payload, dict):
            payload = {}
    except ValueError:
        payload = {}
    attempts = payload.get("attempts", [])
    last = attempts[-1] if attempts else None
    last_error = item.last_error
    if last is not None and not last_error:
        problems = [f"<{r['rcpt']}> {r['reply']}" for r in last.get("results", [])
                    if r.get("outcome") != "delivered"]
        last_error = "; ".join(problems)
    return {
        "topic": item.topic,
        "id": item.item_id,
        "first_id": payload.get("id", item.item_id),
        "from": payload.get("mail_from", ""),
        "to": payload.get("rcpt_to", []),
        "pending": payload.get("pending", payload.get("rcpt_to", [])),
        "delivered": payload.get("delivered", {}),
        "failed": payload.get("failed", {}),
        # Delivery attempts made (outgoing); for other items, how often the item was taken.
        "attempts": int(payload.get("attempt_count", len(attempts))) if item.topic == OUTGOING
        else item.attempts,
        "history": attempts,
        "enqueued_at": payload.get("queued_at", item.enqueued_at),
        "next_attempt": item.not_before,
        "last_error": last_error,
        "held": payload.get("held", ""),  # why it waits for the admin (topic held)
    }


async def find(queue: Queue, item_id: str, topics: tuple[str, ...] = TOPICS
               ) -> QueueItem | None:
    for topic in topics:
        for item in await queue.list(topic, limit=LIST_LIMIT):
            if item.item_id == item_id:
                return item
        for item in await queue.list(topic, limit=LIST_LIMIT):
            if describe(item)["first_id"] == item_id:
                return item
    return None


async def make_due(queue: Queue, item: QueueItem) -> str:
    """Make a waiting item due now; returns its id afterwards.

    An outgoing item is put again under a new id, due now, before the old one is removed (a
    crash in between leaves two, never none): unlike `retry`, that works for an item no worker
    holds, on every queue engine. Its state travels in the payload, so the new id is harmless.
    An incoming item keeps its id, which its deliveries are keyed by, and is retried in place.
    """
    if item.topic != OUTGOING:
        await queue.retry(item, 0.0, item.last_error)
        return item.item_id
    row = describe(item)
    new_id = f"{row['first_id']}-{row['attempts']}-r{uuid.uuid4().hex[:8]}"
    await queue.put(OUTGOING, item.payload, item_id=new_id)
    await queue.remove(OUTGOING, item.item_id)
    return new_id


async def release(queue: Queue, item: QueueItem) -> str:
    """Send a held item on its way: queued for delivery, due now, under the same id (put
    before the held copy is removed, so a crash in between leaves two, never none)."""
    payload = json.loads(item.payload)
    payload.pop("held", None)
    payload["released_at"] = time.time()
    await queue.put(OUTGOING, json.dumps(payload).encode(), item_id=item.item_id)
    await queue.remove(HELD, item.item_id)
    return item.item_id


def format_line(row: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["next_attempt"]))
    to = ",".join(row["pending"] or row["to"])
    return (f"{row['topic']:8} {row['id']} attempts={row['attempts']} next={when}Z "
            f"from=<{row['from']}> to={to} {row['last_error']}").rstrip()


def format_detail(row: dict[str, Any]) -> str:
    def ts(value: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value)) + "Z"

    lines = [
        f"id:           {row['id']}" + (f" (first queued as {row['first_id']})"
                                        if row["first_id"] != row["id"] else ""),
        f"topic:        {row['topic']}",
        f"from:         <{row['from']}>",
        f"to:           {', '.join(row['to'])}",
        f"queued:       {ts(row['enqueued_at'])}",
        f"next attempt: {ts(row['next_attempt'])}",
        f"attempts:     {row['attempts']}",
        f"pending:      {', '.join(row['pending']) or '-'}",
    ]
    for rcpt, entry in row["delivered"].items():
        lines.append(f"delivered:    <{rcpt}> via {entry.get('host') or '-'}: {entry['reply']}")
    for rcpt, entry in row["failed"].items():
        lines.append(f"failed:       <{rcpt}> {entry['status']}: {entry['reply']}")
    for n, attempt in enumerate(row["history"], 1):
        lines.append(f"attempt {n} at {ts(attempt['at'])}:")
        for r in attempt.get("results", []):
            lines.append(f"  <{r['rcpt']}> {r['outcome']} {r['status']} "
                         f"{r.get('host') or '-'}: {r['reply']}")
    if row["last_error"] and not row["history"]:
        lines.append(f"last error:   {row['last_error']}")
    return "\n".join(lines)
