"""Push benchmark: N WebSocket clients on one `postroom serve` node, mail delivered over SMTP;
the delay from the SMTP 250 (end of DATA) to each client's `message.new` frame, and the node's
memory for the connections.

    .venv/bin/python -m bench.push -c 1000 -u 10 -m 20

C clients are spread over U users (one token each); each of M messages goes to all U users in
one SMTP transaction, one message at a time. The clients run in this process, on the same
machine, so their own work (parsing 1,000 frames per message) is inside the figures. Not a
test: run it by hand; figures go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import smtplib
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.e2e.server import ServerProcess

DOMAIN = "example.test"
PASSWORD = "bench-password-1"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


async def client(url: str, token: str, ready: asyncio.Event, counter: list[int],
                 arrivals: dict[str, list[float]], stop: asyncio.Event, deflate: bool) -> None:
    ws: ClientConnection = await connect(url, subprotocols=[  # type: ignore[list-item]
        "postroom.v1", f"bearer.{token}"], max_queue=None, open_timeout=60,
        compression="deflate" if deflate else None)
    try:
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "ready":
                counter[0] += 1
                if counter[0] == counter[1]:
                    ready.set()
            elif frame["type"] == "message.new" and frame.get("message"):
                now = time.monotonic()
                arrivals.setdefault(frame["message"]["subject"], []).append(now)
                if stop.is_set():
                    break
    except Exception:
        pass
    finally:
        await ws.close()


async def run(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="postroom-push-"))
    server = ServerProcess(base / "data")
    server.cli("domain", "add", DOMAIN)
    users = [f"push{n}@{DOMAIN}" for n in range(args.users)]
    for user in users:
        server.cli("user", "add", user, "--password", PASSWORD)
    server.start()
    assert server.proc is not None
    try:
        tokens = []
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            for user in users:
                r = await http.post("/v1/auth/token", auth=(user, PASSWORD))
                tokens.append(r.json()["token"])
        await asyncio.sleep(1)
        before = rss_mib(server.proc.pid)
        url = f"ws://127.0.0.1:{server.http_port}/v1/events"
        ready = asyncio.Event()
        stop = asyncio.Event()
        counter = [0, args.clients]
        arrivals: dict[str, list[float]] = {}
        started = time.monotonic()
        tasks = []
        for n in range(args.clients):
            tasks.append(asyncio.create_task(
                client(url, tokens[n % len(tokens)], ready, counter, arrivals, stop,
                       not args.no_deflate)))
            if n % 50 == 49:
                await asyncio.sleep(0.05)  # no SYN flood against the listen backlog
        await asyncio.wait_for(ready.wait(), 120)
        connect_time = time.monotonic() - started
        await asyncio.sleep(2)
        connected = rss_mib(server.proc.pid)

        sent: dict[str, float] = {}
        for n in range(args.messages):
            subject = f"push {n} {uuid.uuid4().hex[:8]}"
            raw = (f"From: Carol <carol@example.org>\r\nTo: {users[0]}\r\nSubject: {subject}\r\n"
                   f"Message-ID: <{uuid.uuid4().hex}@example.org>\r\n\r\nHello.\r\n").encode()

            def deliver(subject: str = subject, raw: bytes = raw) -> None:
                with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=60) as smtp:
                    smtp.sendmail("carol@example.org", users, raw)
                    sent[subject] = time.monotonic()  # the 250 after DATA has been read

            await asyncio.to_thread(deliver)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # every client has it, or give up
                if len(arrivals.get(subject, [])) >= args.clients:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(args.pause)
        peak = rss_mib(server.proc.pid)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        delays = [(t - sent[s]) * 1000 for s, times in arrivals.items() if s in sent
                  for t in times]
        expected = args.clients * args.messages
        print(f"Postroom push: {args.clients} WebSocket clients over {args.users} users, "
              f"{args.messages} messages over SMTP (each to every user)")
        print(f"  connected in {connect_time:.1f} s; frames received {len(delays)}/{expected}")
        print(f"  delay SMTP 250 -> message.new: p50 {statistics.median(delays):.1f} ms, "
              f"p99 {percentile(delays, 99):.1f} ms, max {max(delays):.1f} ms")
        print(f"  node RSS: {before:.1f} MiB idle, {connected:.1f} MiB with the connections "
              f"(+{connected - before:.1f} MiB, {(connected - before) * 1024 / args.clients:.1f} "
              f"KiB each), {peak:.1f} MiB after the mail")
        print("  target (issue 10): p99 < 100 ms, < 200 MiB for the connections")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--clients", type=int, default=1000)
    parser.add_argument("-u", "--users", type=int, default=10)
    parser.add_argument("-m", "--messages", type=int, default=20)
    parser.add_argument("--no-deflate", action="store_true",
                        help="clients do not offer permessage-deflate (browsers always do)")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between messages")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
