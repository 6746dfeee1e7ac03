"""The floor of each request topology, one request at a time, against the bare echo (same run).

What the one-at-a-time round trip would be with none of the service's own Python, for the
topology it has and for the ones that could replace it. Every row is pyzmq (or a Unix
socketpair) with the same 100-byte payload; rows are interleaved round by round:

- `echo`: client <-> echo (bench/echo.py's shape): 2 ZeroMQ hops;
- `relay`: client <-> relay <-> worker, ZeroMQ both sides, nothing done in either: the
  service's topology (4 hops) with no work at all;
- `relay + execute`: the same, the worker running uppercase.wasm through `Sandbox.execute`;
- `relay, socketpair link` (+ execute): the relay talks to the worker over a Unix socketpair
  read and written by the two main threads (no ZeroMQ I/O threads on that link);
- `direct + execute`: the client talks to the worker itself (a ROUTER running the sandbox):
  the supervisor off the data path;
- `service`: the real service (2 workers), for reference.

    python -m bench.hop_floor [-n 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/hop_floor.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq

from bench.common import PLUGIN, make_input, percentile, service_config
from bench.echo import BlockingEcho, EchoServer

WORKER_ID = b"w"


def _sandbox() -> Callable[[bytes], bytes]:
    from wasmcore.sandbox_worker.runtime import Sandbox

    sandbox = Sandbox()
    module = sandbox.compile(PLUGIN.read_bytes())
    return lambda data: bytes(sandbox.execute(module, data).output)


def zmq_worker(back: str, execute: bool) -> None:
    run = _sandbox() if execute else bytes
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, WORKER_ID)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(back)
    sock.send(b"ready")
    _serve(sock, run)


def _serve(sock: zmq.Socket[bytes], run: Callable[[bytes], bytes]) -> None:
    """Answer [client, header, payload] with `run(payload)`, waking through a poll as the
    service's processes do."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        poller.poll()
        client, header, payload = sock.recv_multipart()
        sock.send_multipart([client, header, run(payload)])


def pair_worker(fd: int, execute: bool) -> None:
    run = _sandbox() if execute else bytes
    link = socket.socket(fileno=fd)
    link.send(b"ready")
    while True:
        message = link.recv(65536)
        client_len = message[0]
        header_len = message[1]
        head = message[:2 + client_len + header_len]
        link.send(head + run(message[2 + client_len + header_len:]))


def relay(front: str, back: str | None, pair_fd: int | None) -> None:
    """A ROUTER for clients; jobs to one worker over ZeroMQ (`back`) or a socketpair."""
    ctx = zmq.Context()
    clients = ctx.socket(zmq.ROUTER)
    clients.setsockopt(zmq.LINGER, 0)
    clients.bind(front)
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    if back is not None:
        worker: Any = ctx.socket(zmq.ROUTER)
        worker.setsockopt(zmq.LINGER, 0)
        worker.bind(back)
        worker.recv_multipart()  # its ready
        poller.register(worker, zmq.POLLIN)
    else:
        assert pair_fd is not None
        worker = socket.socket(fileno=pair_fd)
        worker.recv(16)  # its ready
        poller.register(worker.fileno(), zmq.POLLIN)
    while True:
        for target, _ in poller.poll():
            if target is clients:
                client, header, payload = clients.recv_multipart()
                if back is not None:
                    worker.send_multipart([WORKER_ID, client, header, payload])
                else:
                    worker.send(bytes([len(client), len(header)]) + client + header + payload)
            elif back is not None:
                _, client, header, payload = worker.recv_multipart()
                clients.send_multipart([client, header, payload])
            else:
                message = worker.recv(65536)
                cl, hl = message[0], message[1]
                clients.send_multipart([message[2:2 + cl], message[2 + cl:2 + cl + hl],
                                        message[2 + cl + hl:]])


def direct(front: str, execute: bool) -> None:
    run = _sandbox() if execute else bytes
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(front)
    _serve(sock, run)


class Topology:
    """Server-side processes of one row (forked) and a client."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        # fork for every row, so that the rows differ by their topology only (the socketpair's
        # descriptors can reach the children only through fork); each child makes its own
        # ZeroMQ context.
        fork = multiprocessing.get_context("fork")
        self.endpoint = f"ipc://{tmp}/{name.replace(' ', '_').replace(',', '')}.sock"
        back = self.endpoint + ".back"
        execute = "execute" in name
        self.processes: list[Any] = []
        if name.startswith("relay, socketpair"):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.processes = [
                fork.Process(target=relay, args=(self.endpoint, None, ours.fileno()),
                             daemon=True),
                fork.Process(target=pair_worker, args=(theirs.fileno(), execute), daemon=True)]
            for process in self.processes:
                process.start()
            ours.close()
            theirs.close()
        elif name.startswith("relay"):
            self.processes = [
                fork.Process(target=relay, args=(self.endpoint, back, None), daemon=True),
                fork.Process(target=zmq_worker, args=(back, execute), daemon=True)]
            for process in self.processes:
                process.start()
        else:  # direct
            self.processes = [fork.Process(target=direct, args=(self.endpoint, execute),
                                           daemon=True)]
            self.processes[0].start()
        self.client = BlockingEcho(self.endpoint)
        if self.client.call(b"ping", timeout_ms=30_000) is None:
            raise RuntimeError(f"{name}: no answer")

    def call(self, payload: bytes) -> Any:
        return self.client.call(payload)

    def close(self) -> None:
        self.client.close()
        for process in self.processes:
            process.terminate()
            process.join(5)


def timed(call: Callable[[bytes], Any], payload: bytes, n: int) -> list[float]:
    for _ in range(min(300, n)):
        call(payload)
    samples = []
    for _ in range(n):
        began = time.perf_counter_ns()
        call(payload)
        samples.append((time.perf_counter_ns() - began) / 1000)
    return samples


ROWS = ["echo", "relay", "relay + execute", "relay, socketpair link",
        "relay, socketpair link + execute", "direct + execute", "service"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--iterations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-service", action="store_true")
    args = parser.parse_args(argv)
    from wasmcore.client.launcher import start_service

    payload = make_input(100)
    rows = [r for r in ROWS if not (args.no_service and r == "service")]
    print(f"load average {os.getloadavg()[0]:.2f}; {args.iterations} calls per row per round, "
          f"{args.rounds} rounds, rows interleaved")
    medians: dict[str, list[float]] = {row: [] for row in rows}
    p99s: dict[str, list[float]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory(prefix="wc-floor-") as tmp:
        service = start_service(workers=2, config=service_config()) if "service" in rows else None
        try:
            if service is not None:
                client = service.client()
                binary_id = client.load(PLUGIN).binary_id
            for round_ in range(args.rounds):
                order = rows if round_ % 2 == 0 else list(reversed(rows))
                for row in order:
                    if row == "service":
                        samples = timed(lambda d: client.execute(binary_id, d), payload,
                                        args.iterations)
                    elif row == "echo":
                        with EchoServer(f"ipc://{tmp}/echo{round_}.sock") as echo, \
                                BlockingEcho(echo.endpoint) as bare:
                            samples = timed(bare.call, payload, args.iterations)
                    else:
                        topology = Topology(row, Path(tmp))
                        try:
                            samples = timed(topology.call, payload, args.iterations)
                        finally:
                            topology.close()
                    ordered = sorted(samples)
                    medians[row].append(percentile(ordered, 0.5))
                    p99s[row].append(percentile(ordered, 0.99))
                print(f"round {round_ + 1}: " + ", ".join(
                    f"{row} {medians[row][-1]:.0f}" for row in rows), flush=True)
        finally:
            if service is not None:
                client.close()
                service.cleanup()
    print(f"\n{'row':<36}{'median us (rounds)':>28}{'x echo (rounds)':>26}{'p99 x echo':>16}")
    for row in rows:
        ratios = [m / e for m, e in zip(medians[row], medians["echo"], strict=True)]
        p99_ratios = [m / e for m, e in zip(p99s[row], p99s["echo"], strict=True)]
        print(f"{row:<36}{' / '.join(f'{m:.0f}' for m in medians[row]):>28}"
              f"{' / '.join(f'{r:.2f}' for r in ratios):>26}"
              f"{statistics.median(p99_ratios):>15.2f}x")


if __name__ == "__main__":
    main()
