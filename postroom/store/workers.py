"""Functions run in worker processes, reached over socket pairs the event loop reads itself.

`WorkerPool` runs module-level functions of picklable arguments in a few `spawn`ed worker
processes (the server's threads and event loop are never forked into them). Each worker is
reached over a socket pair that the event loop itself reads and writes: calls are pickled
(`(id, function, arguments)`), pipelined (a worker always has its next call waiting) and
answered in order. No helper threads stand between the loop and the workers: with
`concurrent.futures.ProcessPoolExecutor`, every hand-off waits for a feeder or a result thread
to get the GIL from the busy event loop, and the workers idle between calls (measured here:
the pool could not pass ~200 calls/s, its one worker a third busy).

`run` falls back to a thread here if a worker dies with the call out (the worker is started
again on the next call); `call` raises WorkerLost instead, for a caller with a fallback of its
own. Users: the node's message analysis (`postroom/analysis.py`) and the embedded search
index's writer process (`postroom/store/sqlite_search.py`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def default_processes() -> int:
    """One per core but the one the node's own process keeps busy (listeners, workers)."""
    return max(1, (os.cpu_count() or 1) - 1)


class WorkerLost(Exception):
    """The worker process ended with the call still out."""


# ---- in the worker process ---------------------------------------------------------------


def _serve(conn: Connection) -> None:
    """A worker's life: answer each call in turn until the node closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when we stop
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        call_id = -1
        try:
            call_id, fn, args = pickle.loads(request)
            answer: tuple[int, bool, Any] = (call_id, True, fn(*args))
        except Exception as exc:
            answer = (call_id, False, exc)
        try:
            payload = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an unpicklable result or exception
            payload = pickle.dumps((call_id, False, RuntimeError(repr(exc))))
        try:
            conn.send_bytes(payload)
        except OSError:
            return


# ---- in the node ---------------------------------------------------------------------------


def _frame(payload: bytes) -> list[bytes]:
    """multiprocessing.Connection's framing, which the worker reads."""
    size = len(payload)
    if size > 0x7FFFFFFF:
        return [struct.pack("!i", -1), struct.pack("!Q", size), payload]
    return [struct.pack("!i", size), payload]


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack("!i", await reader.readexactly(4))
    if size == -1:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    return await reader.readexactly(size)


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    calls: dict[int, asyncio.Future[tuple[bool, Any]]] = field(default_factory=dict)
    alive: bool = True


class WorkerPool:
    """Worker processes that run module-level functions of picklable arguments (above)."""

    def __init__(self, processes: int | None = None, name: str = "postroom-worker") -> None:
        self.processes = processes or default_processes()
        self.name = name
        self._workers: list[_Worker] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._ids = itertools.count()
        self._starting: asyncio.Lock | None = None

    async def start(self) -> None:
        """Start the workers now rather than at the first call."""
        await self._ensure_workers()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker (in a thread here if the worker died meanwhile)."""
        try:
            return await self.call(fn, *args)
        except WorkerLost as exc:
            log.warning("%s worker lost (%s); this call runs in the node", self.name, exc)
            return await asyncio.to_thread(fn, *args)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker; WorkerLost if none could answer it (the worker died with
        the call out, or could not be reached), for a caller that falls back its own way."""
        try:
            await self._ensure_workers()
            worker = min(self._workers, key=lambda w: len(w.calls))
            ok, value = await self._call(worker, fn, args)
        except (OSError, ValueError) as exc:
            raise WorkerLost(str(exc)) from exc
        if not ok:
            raise value
        result: T = value
        return result

    async def _call(self, worker: _Worker, fn: Callable[..., Any],
                    args: tuple[Any, ...]) -> tuple[bool, Any]:
        if not worker.alive:
            raise WorkerLost(f"pid {worker.process.pid} ended")
        call_id = next(self._ids)
        future: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        worker.calls[call_id] = future
        try:
            worker.writer.writelines(
                _frame(pickle.dumps((call_id, fn, args), protocol=pickle.HIGHEST_PROTOCOL)))
            await worker.writer.drain()
            return await future
        finally:
            worker.calls.pop(call_id, None)

    async def _ensure_workers(self) -> None:
        if len(self._workers) >= self.processes:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            while len(self._workers) < self.processes:
                self._workers.append(await self._spawn())

    async def _spawn(self) -> _Worker:
        ours, theirs = multiprocessing.Pipe(duplex=True)
        process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(theirs,), name=self.name, daemon=True)
        await asyncio.to_thread(process.start)
        theirs.close()
        sock = socket.socket(fileno=os.dup(ours.fileno()))
        ours.close()
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        worker = _Worker(process, reader, writer)
        task = asyncio.create_task(self._answers(worker), name=f"{self.name}-answers")
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)
        return worker

    async def _answers(self, worker: _Worker) -> None:
        try:
            while True:
                call_id, ok, value = pickle.loads(await _read_frame(worker.reader))
                future = worker.calls.get(call_id)
                if future is not None and not future.done():
                    future.set_result((ok, value))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception:
            log.exception("reading an answer of a %s worker failed", self.name)
        finally:
            self._retire(worker)

    def _retire(self, worker: _Worker) -> None:
        worker.alive = False
        if worker in self._workers:
            self._workers.remove(worker)
        worker.writer.close()
        for future in worker.calls.values():
            if not future.done():
                future.set_exception(WorkerLost(f"pid {worker.process.pid} ended"))

    def close(self) -> None:
        """Stop the workers: each ends when it sees its socket closed."""
        for worker in list(self._workers):
            self._retire(worker)
        for task in list(self._readers):
            task.cancel()

    async def stop(self) -> None:
        """`close`, then wait for the workers to end (a worker that holds a file's write lock
        has let go of it when this returns)."""
        processes = [worker.process for worker in self._workers]
        self.close()
        for process in processes:
            await asyncio.to_thread(process.join, 10.0)
