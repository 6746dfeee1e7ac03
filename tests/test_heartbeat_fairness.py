"""Heartbeats judged fairly: time the supervisor's own loop was not running never counts
against a worker. Pool-level with a fake clock (as in test_worker_pool.py), and through the
server with a real stall of its loop."""

from __future__ import annotations

import signal

import msgspec

from tests.conftest import PLUGINS, raw_dealer
from tests.test_worker_pool import (  # noqa: F401  (endpoint_dir is a fixture)
    T0,
    endpoint_dir,
    make_config,
    make_pool,
    only_worker,
    wait_exit,
)
from wasmcore.client.launcher import start_service
from wasmcore.protocol import messages as p
from wasmcore.supervisor.worker_process import RestartCause


def test_a_loop_stall_is_not_counted_against_workers(endpoint_dir: str) -> None:  # noqa: F811
    """The loop was stalled for 5 s (longer than the 3 s heartbeat timeout): that time is
    excused, so a worker last heard just before the stall is not killed; the excuse is no
    more than the stall, so a worker that stays silent afterwards is still killed in time."""
    pool = make_pool(make_config(heartbeat_timeout_ms=3000), endpoint_dir)
    try:
        pool.start(T0)
        handle = only_worker(pool)
        assert pool.ready(handle.worker_id, "fp", "fp", T0) is handle

        stalled_until = T0 + 1.0 + 5.0  # heard at T0, the loop stalled from T0 + 1 for 5 s
        pool.excuse(5.0, stalled_until)
        assert pool.tick(stalled_until).killed == []
        assert pool.tick(stalled_until + 1.9).killed == []  # 1 + 1.9 s of real silence

        result = pool.tick(stalled_until + 2.1)  # 3.1 s of silence outside the stall
        assert result.killed == [handle]
        assert handle.kill_cause is RestartCause.HEARTBEAT
        assert wait_exit(handle) == -signal.SIGKILL
    finally:
        pool.close()


def test_an_excuse_never_puts_last_seen_in_the_future(endpoint_dir: str) -> None:  # noqa: F811
    """A worker heard at the end of a stall (its heartbeat was read first) gains nothing."""
    pool = make_pool(make_config(heartbeat_timeout_ms=3000), endpoint_dir)
    try:
        pool.start(T0)
        handle = only_worker(pool)
        pool.ready(handle.worker_id, "fp", "fp", T0)
        pool.heartbeat(handle.worker_id, 0, 0, T0 + 10.0)
        pool.excuse(10.0, T0 + 10.0)
        assert pool.tick(T0 + 13.1).killed == [handle]
    finally:
        pool.close()


def test_workers_survive_a_stalled_loop() -> None:
    """A message of 3,000,000 empty frames: receiving it takes the loop far longer than the
    1 s heartbeat timeout (ZeroMQ has no bound on frames per message). Healthy workers'
    heartbeats queued meanwhile are read before anyone is judged, and the stall itself is
    excused: no worker is killed, and the service serves on."""
    svc = start_service(workers=2, config={"pool": {"heartbeat_interval_ms": 100,
                                                    "heartbeat_timeout_ms": 1000}})
    try:
        with svc.client() as c:
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
        header = msgspec.msgpack.encode({"type": "execute", "id": 5, "binary_id": upper})
        with raw_dealer(svc.endpoint) as sock:
            sock.send_multipart([header] + [b""] * 3_000_000)
            assert sock.poll(120_000), "no reply to the message of many frames"
            reply = p.reply_decoder.decode(sock.recv_multipart()[0])
        assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
        with svc.client() as c:
            assert c.execute(upper, b"after").output == b"AFTER"
            stats = c.stats()
        assert stats.restarts_by_cause == {}, stats.restarts_by_cause
    finally:
        svc.cleanup()
