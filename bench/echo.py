"""The transport baseline: a bare pyzmq ROUTER that sends every message straight back.

It runs in its own process (as the supervisor does) and does nothing per message but the
recv/send the supervisor must do at least once, so service time / echo time is what the
service adds on top of ZeroMQ + Python on the same endpoint.

    python -m bench.echo ENDPOINT          # serve until SIGTERM
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import signal
import sys
import time
from typing import Any

import zmq
import zmq.asyncio


def serve(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.bind(endpoint)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            # copy=False: large payloads are relayed without copying, as the supervisor does.
            sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
    finally:
        sock.close()
        ctx.term()


class EchoServer:
    """The echo server in a spawned process; `stop()` ends it (bounded)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(target=serve, args=(endpoint,), daemon=True)
        self.process.start()
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        with BlockingEcho(self.endpoint) as client:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if client.call(b"ping", timeout_ms=200) is not None:
                    return
                if not self.process.is_alive():
                    break
            raise RuntimeError(f"echo server on {self.endpoint} did not answer")

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BlockingEcho:
    """A DEALER sending [header, payload] and waiting for it back: what `Client` does."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.header = b"\x81\xa2id\x01"  # a msgpack header of the size of a tiny request

    def call(self, payload: bytes, timeout_ms: int = 10_000) -> bytes | None:
        self.sock.send_multipart([self.header, payload], copy=len(payload) < 65536)
        if not self.sock.poll(timeout_ms):
            return None
        return self.sock.recv_multipart()[-1]

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def __enter__(self) -> BlockingEcho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEcho:
    """Many requests in flight on one DEALER, correlated by id: what `AsyncClient` does,
    minus the protocol (the same futures, reader task and wait_for per call)."""

    def __init__(self, endpoint: str, timeout_s: float = 30.0) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            future = self._pending.pop(int.from_bytes(frames[0], "little"), None)
            if future is not None and not future.done():
                future.set_result(frames[-1])

    async def call(self, payload: bytes) -> bytes:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        await self.sock.send_multipart([request_id.to_bytes(8, "little"), payload],
                                       copy=len(payload) < 65536)
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        finally:
            self._pending.pop(request_id, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self.sock.close()
        self.ctx.term()


if __name__ == "__main__":
    serve(sys.argv[1])
