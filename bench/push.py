"""Push benchmark: N WebSocket clients on one `postroom serve` node, mail delivered over SMTP;
the delay from the SMTP 250 (end of DATA) to each client's `message.new` frame, and the node's
memory for the connections.

    .venv/bin/python -m bench.push -c 1000 -u 10 -m 20

C clients are spread over U users (one token each); each of M messages goes to all U users in
one SMTP transaction, one message at a time. By default the clients run in this process, on
the same machine, so their own work (parsing 1,000 frames per message) is inside the figures;
`--procs P` runs them in P other processes instead (times are CLOCK_MONOTONIC, one clock for
the whole machine), so with P about the number of spare cores the figure is the server's.
Not a test: run it by hand; figures go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import smtplib
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

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
    protocols = [Subprotocol("postroom.v1"), Subprotocol(f"bearer.{token}")]
    ws: ClientConnection = await connect(url, subprotocols=protocols, max_queue=None,
                                         open_timeout=60,
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


async def _worker_main(url: str, tokens: list[str], count: int, offset: int, deflate: bool,
                       ready_q: multiprocessing.Queue, stop_ev: object,  # type: ignore[type-arg]
                       out_q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ready = asyncio.Event()
    stop = asyncio.Event()
    counter = [0, count]
    arrivals: dict[str, list[float]] = {}
    tasks = []
    for n in range(count):
        tasks.append(asyncio.create_task(client(url, tokens[(offset + n) % len(tokens)], ready,
                                                counter, arrivals, stop, deflate)))
        if n % 50 == 49:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(ready.wait(), 120)
    ready_q.put(os.getpid())
    await asyncio.to_thread(stop_ev.wait)  # type: ignore[attr-defined]
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out_q.put(arrivals)


def _worker(*args: object) -> None:
    asyncio.run(_worker_main(*args))  # type: ignore[arg-type]


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
        procs: list[Any] = []
        ctx = multiprocessing.get_context("spawn")
        ready_q, out_q, stop_ev = ctx.Queue(), ctx.Queue(), ctx.Event()
        for w in range(args.procs):
            share = args.clients // args.procs + (1 if w < args.clients % args.procs else 0)
            offset = w * (args.clients // args.procs) + min(w, args.clients % args.procs)
            proc = ctx.Process(target=_worker, args=(url, tokens, share, offset,
                                                     not args.no_deflate, ready_q, stop_ev,
                                                     out_q), daemon=True)
            proc.start()
            procs.append(proc)
        for _ in range(args.procs):
            await asyncio.to_thread(ready_q.get, True, 180)
        if procs:
            ready.set()
        for n in range(args.clients if not procs else 0):
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
            deadline = time.monotonic() + (30 if not procs else 1.0)
            while time.monotonic() < deadline and not procs:  # every client has it, or give up
                if len(arrivals.get(subject, [])) >= args.clients:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(args.pause)
        peak = rss_mib(server.proc.pid)
        stop.set()
        stop_ev.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in procs:
            for subject, times in (await asyncio.to_thread(out_q.get, True, 120)).items():
                arrivals.setdefault(subject, []).extend(times)
        for proc in procs:
            proc.join(10)
        load = os.getloadavg()

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
        print(f"  clients in {'this process' if not procs else f'{len(procs)} other processes'}"
              f"; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
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
    parser.add_argument("--procs", type=int, default=0,
                        help="run the clients in this many other processes (0: in this one)")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between messages")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
