"""Shared-memory payloads, batches and the hello handshake, through the real service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from tests.conftest import HOSTILE, PLUGINS, exchange, raw_dealer, wait_for
from wasmcore.client.core import Client, SharedMemory
from wasmcore.client.launcher import start_service
from wasmcore.protocol import errors, shm
from wasmcore.protocol import messages as p

THRESHOLD = 4096


@pytest.fixture(scope="module")
def shm_service():
    svc = start_service(workers=2, config={
        "server": {"shm_threshold_bytes": THRESHOLD},
        "pool": {"heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 1000},
        "limits": {"fuel": 10**13},
    })
    try:
        yield svc
    finally:
        svc.cleanup()


def test_hello_describes_the_server(shm_service):
    with shm_service.client() as c:
        welcome = c.hello()
    assert welcome.shm_dir == str(shm_service.shm_dir)
    assert welcome.shm_threshold_bytes == THRESHOLD
    assert welcome.boot_id == shm.boot_id() and welcome.workers == 2
    assert welcome.protocol_version == p.PROTOCOL_VERSION


def test_large_payloads_travel_through_shared_memory(shm_service):
    data = bytes(range(97, 123)) * 40_000  # ~1 MB of a-z
    with shm_service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        result = c.execute(upper, data)
        assert result.output == data.upper()
        shared = c._shared
        assert shared is not None and shared.enabled
        assert len(shared._free) == 1  # the input went in a segment, kept for reuse
        # The output overwrote the input's segment in place: one segment, ours, for both.
        assert os.listdir(shm_service.shm_dir) == shared._free
        again = c.execute(upper, data[:THRESHOLD * 2])
        assert again.output == data[:THRESHOLD * 2].upper()
        assert os.listdir(shm_service.shm_dir) == shared._free  # the same segment, reused
        small = c.execute(upper, "small")  # under the threshold: inline frames
        assert small.output == b"SMALL"
    assert os.listdir(shm_service.shm_dir) == []  # close() removes what the client kept


def test_output_overwrites_a_lent_segment_only_if_it_is_the_callers(shm_service):
    data = bytes(range(65, 91)) * 1000
    directory = shm_service.shm_dir
    with shm_service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        ours = shm.write(directory, os.getpid(), b"old content, longer than nothing" * 2000)
        try:
            # Lent: the output lands in it, truncated to the output's size.
            reply, _ = c.call(p.Execute(binary_id=upper, output_shm_into=ours.name),
                              data.lower())
            assert isinstance(reply, p.Executed) and reply.output_shm == shm.ShmRef(
                name=ours.name, size=len(data))
            assert (directory / ours.name).read_bytes() == data
            # A lent segment that is not there: the worker creates none, the output is inline.
            gone = shm.new_name(os.getpid())
            reply, frames = c.call(p.Execute(binary_id=upper, output_shm_into=gone),
                                   data.lower())
            assert isinstance(reply, p.Executed) and reply.output_shm is None
            assert frames == [data] and os.listdir(directory) == [ours.name]
            # None lent: inline too.
            reply, frames = c.call(p.Execute(binary_id=upper), data.lower())
            assert isinstance(reply, p.Executed) and reply.output_shm is None
            assert frames == [data] and os.listdir(directory) == [ours.name]
            reply, _ = c.call(p.Execute(binary_id=upper, output_shm_into="../escape"),
                              data.lower())
            assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST"
        finally:
            shm.remove(directory, ours.name)


# Outputs its input 64 times: a small input, a large output.
AMPLIFY_WAT = b"""
(module
  (import "host" "output" (func $output (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "process") (param $in i32) (param $in_len i32) (param $env i32)
        (param $env_len i32) (result i32)
    (local $n i32)
    (loop $again
      (call $output (local.get $in) (local.get $in_len))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $n) (i32.const 64))))
    (i32.const 0)))
"""


@pytest.mark.parametrize("zero_copy", [False, True])
def test_large_output_of_a_small_input_comes_through_a_lent_segment(shm_service, zero_copy):
    """The client lends a segment of its own even for a small input, so a large output stays
    on the fast path; the worker creates none."""
    data = b"0123456789" * 10
    with Client(shm_service.endpoint, zero_copy=zero_copy) as c:
        amplify = c.load(data=AMPLIFY_WAT, name="amplify").binary_id
        for _ in range(3):
            result = c.execute(amplify, data)
            assert bytes(result.output) == data * 64
            if zero_copy:  # a view of the segment's mapping; an inline output is bytes
                assert isinstance(result.output, memoryview)
            del result
            shared = c._shared
            assert shared is not None and len(shared._free) == 1
            assert os.listdir(shm_service.shm_dir) == shared._free  # the one lent segment
    assert os.listdir(shm_service.shm_dir) == []


def test_segments_are_reused_across_requests(shm_service):
    with shm_service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        names = set()
        for i in range(6):
            data = bytes([97 + i]) * (THRESHOLD * (2 + i))
            assert c.execute(upper, data).output == data.upper()
            names.update(os.listdir(shm_service.shm_dir))
        assert len(names) == 1  # one segment carried every input and every output
        # A failed request does not hand its segment back: a worker may still hold it.
        with pytest.raises(errors.PluginError):
            c.execute(c.load(HOSTILE / "nonzero.wat").binary_id, b"n" * THRESHOLD * 2)
        assert c._shared is not None and c._shared._free == []
        assert os.listdir(shm_service.shm_dir) == []


def test_zero_copy_output_is_a_view(shm_service):
    data = b"z" * (THRESHOLD * 8)
    with Client(shm_service.endpoint, zero_copy=True) as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        result = c.execute(upper, data)
        assert isinstance(result.output, memoryview) and result.output.readonly
        assert bytes(result.output) == data.upper()
    assert os.listdir(shm_service.shm_dir) == []


def test_zero_copy_views_stay_intact_and_their_segments_come_back(shm_service):
    first, second = b"a" * (THRESHOLD * 4), b"b" * (THRESHOLD * 4)
    with Client(shm_service.endpoint, zero_copy=True) as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        held = c.execute(upper, first).output
        names = set(os.listdir(shm_service.shm_dir))
        # The held view's segment is never lent again: later outputs cannot change it.
        for _ in range(3):
            assert bytes(c.execute(upper, second).output) == second.upper()
        assert bytes(held) == first.upper()
        names.update(os.listdir(shm_service.shm_dir))
        assert len(names) == 2  # the held one, and one reused for every later request
        del held
        assert c._shared is not None and len(c._shared._free) == 2
        for _ in range(3):
            assert bytes(c.execute(upper, first).output) == first.upper()
        assert set(os.listdir(shm_service.shm_dir)) <= names
    assert os.listdir(shm_service.shm_dir) == []


def test_forged_segment_names_are_refused(shm_service):
    with shm_service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        for name in ("../../etc/passwd", "wc-1-" + "0" * 32, "wc-x"):
            request = p.Execute(binary_id=upper, input_shm=shm.ShmRef(name=name, size=10))
            reply, _ = c.call(request)
            assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
        # A segment whose size differs from its descriptor is refused too.
        ref = shm.write(shm_service.shm_dir, os.getpid(), b"x" * 100)
        try:
            reply, _ = c.call(p.Execute(binary_id=upper,
                                        input_shm=shm.ShmRef(name=ref.name, size=50)))
            assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST"
        finally:
            shm.remove(shm_service.shm_dir, ref.name)
        assert c.execute(upper, "ok").output == b"OK"


def test_crashed_client_leaves_nothing_behind(shm_service, tmp_path: Path):
    with shm_service.client() as c:
        loop = c.load(HOSTILE / "loop.wat").binary_id
    script = tmp_path / "client.py"
    script.write_text(
        "import sys\n"
        "from wasmcore.client.core import Client\n"
        f"c = Client({shm_service.endpoint!r})\n"
        "print('sending', flush=True)\n"
        # 5 s, what it got when a request could only lower [limits]: the abandoned loop
        # must not hold a worker past the next test's wait for an idle pool.
        f"c.execute({loop!r}, b'x' * {THRESHOLD * 4}, timeout_ms=5000)\n"
    )
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"sending\n"
        wait_for(lambda: os.listdir(shm_service.shm_dir), 10, "the client's input segment")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
    # Its segment is swept once the supervisor sees its owner is gone.
    wait_for(lambda: os.listdir(shm_service.shm_dir) == [], 10, "the segment to be swept")


def test_worker_killed_mid_request_leaves_nothing_behind(shm_service):
    with shm_service.client() as c:
        loop = c.load(HOSTILE / "loop.wat").binary_id
        # An earlier test's abandoned loop may still occupy a worker: start from an idle pool.
        wait_for(lambda: c.stats().in_flight == 0, 15, "an idle pool")
        pids = {w.pid for w in c.stats().workers}

        outcome: list[BaseException] = []

        def run() -> None:
            with shm_service.client() as victim:
                try:
                    victim.execute(loop, b"y" * (THRESHOLD * 4), timeout_ms=20000)
                except errors.WasmCoreError as exc:
                    outcome.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        busy = wait_for(lambda: [w.pid for w in c.stats().workers if w.state == "busy"], 10,
                        "a busy worker")
        os.kill(busy[0], signal.SIGKILL)
        thread.join(30)
        assert outcome and isinstance(outcome[0], errors.WorkerLost)
        assert busy[0] in pids
        wait_for(lambda: os.listdir(shm_service.shm_dir) == [], 10, "no segment left")


def test_remote_client_falls_back_to_inline_frames():
    welcome = p.Welcome(id=1, server_version="x", shm_dir="/dev/shm", shm_threshold_bytes=1,
                        boot_id="another-host")
    assert not SharedMemory(welcome).enabled
    welcome = p.Welcome(id=1, server_version="x", shm_dir="", boot_id=shm.boot_id())
    assert not SharedMemory(welcome).enabled


def test_shared_memory_off_in_config():
    svc = start_service(workers=1, config={"server": {"shm_dir": "off",
                                                      "shm_threshold_bytes": 16}})
    try:
        with svc.client() as c:
            assert c.hello().shm_dir == ""
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
            assert c.execute(upper, b"q" * 1000).output == b"Q" * 1000
    finally:
        svc.cleanup()


def test_execute_batch(shm_service):
    with shm_service.client() as c:
        env_reader = c.load(PLUGINS / "env_reader.wat").binary_id
        results = c.execute_batch(env_reader, ["A", "missing", "B", ""],
                                  env={"A": "1", "B": "two"})
        assert [r.output if not isinstance(r, errors.WasmCoreError) else r.code
                for r in results] == [b"1", "PLUGIN_ERROR", b"two", b"A=1\nB=two\n"]
        assert results[1].details["plugin_code"] == 2
        assert all(r.logs for r in results if not isinstance(r, errors.WasmCoreError))
        with pytest.raises(ValueError):
            c.execute_batch(env_reader, [])


def test_batch_frame_count_must_match(shm_service):
    with raw_dealer(shm_service.endpoint) as sock:
        header = msgspec.msgpack.encode(
            {"type": "execute_batch", "id": 9, "binary_id": "x", "count": 3})
        reply = exchange(sock, [header, b"a", b"b"])
        assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST" and reply.id == 9
        assert "count=3" in reply.message  # refused for the count, not for the header


@pytest.fixture
def segments_created(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the segments this process creates from now on."""
    created: list[str] = []
    write = shm.write

    def counting_write(directory, owner_pid, data):
        ref = write(directory, owner_pid, data)
        created.append(ref.name)
        return ref

    monkeypatch.setattr(shm, "write", counting_write)
    return created


@pytest.mark.parametrize("zero_copy", [False, True])
def test_a_client_reuses_its_segments_over_many_calls(shm_service, segments_created,
                                                      zero_copy):
    """Segment reuse as a behaviour: a new segment is a new file whose pages are allocated
    and zeroed, so a client that stopped reusing them would pay that on every large call."""
    data = b"r" * (THRESHOLD * 16)
    with Client(shm_service.endpoint, zero_copy=zero_copy) as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        for _ in range(12):  # each result dropped at once
            assert bytes(c.execute(upper, data).output) == data.upper()
        assert len(segments_created) == 1
        held = None
        for _ in range(12):  # each result held until the next one replaces it
            held = c.execute(upper, data)
        assert held is not None and bytes(held.output) == data.upper()
        # A held zero-copy view keeps its segment out of use: two take turns.
        assert len(segments_created) == (2 if zero_copy else 1)
        del held
        window: list = []
        for _ in range(4):  # the last three results kept, and one more in use: four
            window = [*window[-2:], c.execute(upper, data)]
        before = len(segments_created)
        for _ in range(12):
            window = [*window[-2:], c.execute(upper, data)]
        assert len(segments_created) == before  # the dropped ones were reused
        assert len(set(segments_created)) <= 4


def test_a_released_view_returns_its_segment_at_once(shm_service, segments_created):
    """`memoryview.release()` hands a zero-copy output's segment back without waiting for
    the view to be collected: the next call reuses it."""
    data = b"v" * (THRESHOLD * 16)
    with Client(shm_service.endpoint, zero_copy=True) as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        results = []
        for _ in range(8):
            result = c.execute(upper, data)
            assert bytes(result.output[:1]) == b"V"
            result.output.release()
            results.append(result)  # the Execution is kept, its view released
        assert len(segments_created) == 1


def test_async_client_reuses_its_segments_across_waves(shm_service, segments_created):
    import asyncio

    from wasmcore.client.core import AsyncClient

    data = b"w" * (THRESHOLD * 16)

    async def waves() -> None:
        async with AsyncClient(shm_service.endpoint) as c:
            upper = (await c.load(PLUGINS / "uppercase.wat")).binary_id
            for _ in range(6):
                outs = await asyncio.gather(*(c.execute(upper, data) for _ in range(4)))
                assert all(o.output == data.upper() for o in outs)

    asyncio.run(waves())
    assert len(segments_created) <= SharedMemory._KEEP


@pytest.mark.parametrize("zero_copy", [False, True])
def test_one_segment_carries_inputs_that_grow_and_shrink(shm_service, segments_created,
                                                         zero_copy):
    """The client writes inputs through a mapping it keeps per segment and reads outputs from
    it: a payload larger than the mapping remaps it, a smaller one shrinks the file first."""
    with Client(shm_service.endpoint, zero_copy=zero_copy) as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        for i, pages in enumerate([4, 64, 8, 2, 128, 16, 128, 3]):
            data = bytes([97 + i]) * (THRESHOLD * pages + i)
            assert bytes(c.execute(upper, data).output) == data.upper()
        small = c.execute(upper, "below the threshold")
        assert bytes(small.output) == b"BELOW THE THRESHOLD"
        assert len(segments_created) == 1
    assert os.listdir(shm_service.shm_dir) == []
