"""The scale-out backends across a restart of their engine: throwaway nats-server and
redis-server processes of our own, killed with SIGKILL and started again on the same port.

While the engine is down every operation fails with StoreError (never an engine exception, never
a hang); once it is back the same backend objects work again by themselves, and nothing the
queue acknowledged is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from postroom.store.errors import StoreError
from postroom.store.events import MESSAGE_NEW, Event
from postroom.store.queue import INCOMING


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Engine:
    """A server process of our own that can be killed and started again on the same port."""

    def __init__(self, command: Callable[[int], list[str]], log: Path) -> None:
        self.port = _free_port()
        self._command = command
        self._log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(self._command(self.port), stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self._command(self.port)[0]} did not start: {self._log.read_text()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest_asyncio.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[Engine]:
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed")
    store = tmp_path / "jetstream"
    engine = Engine(lambda port: [binary, "-js", "-p", str(port), "-a", "127.0.0.1",
                                  "-sd", str(store)], tmp_path / "nats.log")
    engine.start()
    yield engine
    engine.kill()


@pytest_asyncio.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[Engine]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    engine = Engine(lambda port: [binary, "--port", str(port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no"], tmp_path / "redis.log")
    engine.start()
    yield engine
    engine.kill()


async def _eventually(check: Callable[[], object], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                await result
            return
        except StoreError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_nats_queue_survives_a_server_kill(nats_server: Engine) -> None:
    from postroom.store.nats_queue import NatsQueue

    # After a server restart JetStream redelivers what was leased when ack_wait runs out (the
    # NAK timers of the leases were in the old process's memory): keep it short here.
    queue = NatsQueue(f"nats://127.0.0.1:{nats_server.port}", stream_prefix="restart",
                      request_timeout=2.0, ack_wait=3.0)
    await queue.open()
    try:
        for n in range(20):
            await queue.put(INCOMING, f"m{n}".encode(), item_id=f"m{n:02}")
        leased = await queue.take(INCOMING, lease=0.5)
        assert leased is not None and leased.item_id == "m00"

        nats_server.kill()
        started = time.monotonic()
        with pytest.raises(StoreError):
            await queue.put(INCOMING, b"lost", item_id="while-down")
        with pytest.raises(StoreError):
            await queue.take(INCOMING)
        assert time.monotonic() - started < 15  # a clear failure (SMTP says 451), not a hang

        nats_server.start()
        await _eventually(lambda: queue.size(INCOMING))
        assert await queue.size(INCOMING) == 20  # every acknowledged put survived the kill
        taken: dict[str, int] = {}
        deadline = time.monotonic() + 30
        while len(taken) < 20 and time.monotonic() < deadline:
            item = await queue.take(INCOMING, lease=30.0, wait=1.0)
            if item is not None:
                taken[item.item_id] = item.attempts
                await queue.ack(item)
        assert sorted(taken) == [f"m{n:02}" for n in range(20)]
        assert taken["m00"] == 2  # its lease from before the kill ran out: taken again
        assert await queue.size(INCOMING) == 0
    finally:
        await queue.close()


async def test_redis_cache_and_events_survive_a_server_kill(redis_server: Engine) -> None:
    from postroom.store.redis_cache import RedisCache
    from postroom.store.redis_events import RedisEventBus

    url = f"redis://127.0.0.1:{redis_server.port}/0"
    cache, bus = RedisCache(url), RedisEventBus(url)
    await cache.open()
    await bus.open()
    try:
        await cache.set("u:1:list", b"x")
        subscription = await bus.subscribe("alice")
        reader = asyncio.create_task(anext(aiter(subscription), None))
        await asyncio.sleep(0.05)

        redis_server.kill()
        assert await asyncio.wait_for(reader, 10) is None  # ended, not hanging
        # The subscriber knows it missed events, as if it had fallen behind: resynchronise.
        assert subscription.interrupted and subscription.overflowed
        with pytest.raises(StoreError):
            await cache.get("u:1:list")
        with pytest.raises(StoreError):
            await bus.publish(Event(MESSAGE_NEW, "alice"))

        redis_server.start()
        await _eventually(lambda: cache.get("u:1:list"))
        assert await cache.get("u:1:list") is None  # an empty server: a miss, not an error
        await cache.set("u:1:list", b"y")
        await cache.delete_prefix("u:1:")
        assert await cache.get("u:1:list") is None
        again = await bus.subscribe("alice")
        await bus.publish(Event(MESSAGE_NEW, "alice", uid=7))
        event = await asyncio.wait_for(anext(aiter(again)), 5)
        assert event.uid == 7
    finally:
        await bus.close()
        await cache.close()


async def test_imap_hub_resubscribes_after_redis_comes_back(redis_server: Engine) -> None:
    """The IMAP sessions of a node keep waking for new mail across a Redis restart: the hub
    sees its subscription end as missed events, wakes every session (they re-read their
    folders) and subscribes again."""
    from postroom.imap.hub import SessionHub
    from postroom.store.redis_events import RedisEventBus

    url = f"redis://127.0.0.1:{redis_server.port}/0"
    bus, publisher = RedisEventBus(url), RedisEventBus(url)
    await bus.open()
    await publisher.open()
    hub = SessionHub(bus)
    woken: asyncio.Queue[Event | None] = asyncio.Queue()
    hub.watch("alice", "inbox", woken.put_nowait)
    hub.start()
    try:
        async def deliver_until_woken(uid: int) -> Event | None:
            # The hub subscribes in the background: publish until it hears one.
            for _ in range(100):
                with contextlib.suppress(StoreError):
                    await publisher.publish(Event(MESSAGE_NEW, "alice", "inbox", uid=uid))
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(woken.get(), 0.2)
            raise AssertionError("the hub never woke the session")

        first = await deliver_until_woken(1)
        assert first is not None and first.uid == 1
        redis_server.kill()
        assert await asyncio.wait_for(woken.get(), 10) is None  # "look again": events missed
        redis_server.start()
        again = await deliver_until_woken(2)
        while again is None or again.uid != 2:
            again = await asyncio.wait_for(woken.get(), 10)
    finally:
        await hub.stop()
        await publisher.close()
        await bus.close()
