"""The service end to end: every operation through the real supervisor, workers and client."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import msgspec
import pytest

from tests.conftest import HOSTILE, PLUGINS, exchange, raw_dealer
from wasmcore.client.core import AsyncClient
from wasmcore.client.launcher import start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p


def test_load_execute_uppercase(service):
    with service.client() as c:
        loaded = c.load(PLUGINS / "uppercase.wat")
        result = c.execute(loaded.binary_id, b"hello world")
    assert result.output == b"HELLO WORLD"
    assert result.metering.fuel_consumed > 0
    assert result.metering.wall_time_us >= 0
    assert result.metering.peak_memory_bytes >= 65536
    assert result.version == loaded.version


def test_load_wasm_and_wat_forms(service):
    with service.client() as c:
        wat = c.load(PLUGINS / "rot13.wat")
        wasm = c.load(PLUGINS / "rot13.wasm")
        assert wat.binary_id != wasm.binary_id  # different paths, different binaries
        assert c.execute(wat.binary_id, "Hello").output == b"Uryyb"
        assert c.execute(wasm.binary_id, "Hello").output == b"Uryyb"


def test_same_path_same_uuid_and_no_recompile(service, plugin_copy):
    path = plugin_copy("uppercase.wat", "same.wat")
    with service.client() as c:
        first = c.load(path)
        again = c.load(path)
    assert again.binary_id == first.binary_id
    assert again.changed is False
    assert again.version == first.version


def test_changed_file_becomes_new_version_under_same_uuid(service, plugin_copy):
    path = plugin_copy("uppercase.wat", "swap.wat")
    with service.client() as c:
        first = c.load(path)
        assert c.execute(first.binary_id, "abc").output == b"ABC"
        path.write_bytes((PLUGINS / "rot13.wat").read_bytes())
        second = c.load(path)
        assert second.binary_id == first.binary_id
        assert second.changed is True
        assert second.version == first.version + 1
        # Every later execution, on any worker, runs the new version.
        for _ in range(8):
            result = c.execute(first.binary_id, "abc")
            assert result.output == b"nop"
            assert result.version == second.version


def test_invalid_update_keeps_old_version(service, plugin_copy):
    path = plugin_copy("uppercase.wat", "keep.wat")
    with service.client() as c:
        first = c.load(path)
        path.write_bytes(b"(module (func $broken")
        with pytest.raises(errors.InvalidModule):
            c.load(path)
        assert c.execute(first.binary_id, "still").output == b"STILL"
        listed = {b.binary_id: b for b in c.list()}
        assert listed[first.binary_id].last_error


def test_load_bytes_by_name(service):
    data = (PLUGINS / "uppercase.wasm").read_bytes()
    with service.client(tenant="bytes-tenant") as c:
        loaded = c.load(data=data, name="up")
        again = c.load(data=data, name="up")
        assert again.binary_id == loaded.binary_id and not again.changed
        updated = c.load(data=(PLUGINS / "rot13.wasm").read_bytes(), name="up")
        assert updated.binary_id == loaded.binary_id and updated.version == loaded.version + 1
        assert c.execute(loaded.binary_id, "a").output == b"n"


def test_env_entry_and_logs(service):
    with service.client() as c:
        env_reader = c.load(PLUGINS / "env_reader.wat").binary_id
        result = c.execute(env_reader, b"", env={"A": "1", "B": "two"})
        assert result.output == b"A=1\nB=two\n"
        assert result.logs and "2 entries" in result.logs[0]
        assert c.execute(env_reader, b"B", env={"A": "1", "B": "two"}).output == b"two"
        multi = c.load(PLUGINS / "multi_entry.wat").binary_id
        assert c.execute(multi, entry="hello").output == b"hello"
        with pytest.raises(errors.PluginError) as info:
            c.execute(multi, entry="fail")
        assert info.value.details.get("plugin_code") == 7


def test_chain(service):
    with service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        rot = c.load(PLUGINS / "rot13.wat").binary_id
        counter = c.load(PLUGINS / "counter.wat").binary_id
        chained = c.chain([upper, rot], "hello chain")
        assert chained.output == b"URYYB PUNVA"
        assert [s.binary_id for s in chained.steps] == [upper, rot]
        assert chained.steps[0].output_bytes == len("hello chain")
        assert c.chain([rot, counter], "a b\n").output == b"bytes=4 words=2 lines=1"


def test_chain_failing_step_is_named(service):
    with service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        bad = c.load(HOSTILE / "nonzero.wat").binary_id
        with pytest.raises(errors.PluginError) as info:
            c.chain([upper, bad, upper], "x")
    assert info.value.details["step"] == 1
    assert info.value.details["binary_id"] == bad
    assert "step 1" in info.value.message


def test_list_unload_stats(service, plugin_copy):
    path = plugin_copy("counter.wat", "gone.wat")
    with service.client(tenant="lister") as c:
        loaded = c.load(path)
        c.execute(loaded.binary_id, "x")
        listed = c.list()
        assert [b.binary_id for b in listed] == [loaded.binary_id]
        assert listed[0].executions == 1 and listed[0].path == str(path)
        stats = c.stats()
        assert len(stats.workers) == 2
        assert all(w.pid > 0 and w.rss_bytes > 0 for w in stats.workers)
        assert stats.binaries[0].binary_id == loaded.binary_id
        c.unload(loaded.binary_id)
        assert c.list() == []
        with pytest.raises(errors.NotFound):
            c.execute(loaded.binary_id, "x")
        with pytest.raises(errors.NotFound):
            c.unload(loaded.binary_id)


def test_tenants_are_separate(service):
    with service.client(tenant="alice") as alice, service.client(tenant="bob") as bob:
        mine = alice.load(PLUGINS / "uppercase.wat").binary_id
        assert mine not in {b.binary_id for b in bob.list()}
        with pytest.raises(errors.NotFound):
            bob.execute(mine, "x")
        with pytest.raises(errors.NotFound):
            bob.unload(mine)
        with pytest.raises(errors.NotFound):
            bob.chain([mine], "x")
        theirs = bob.load(PLUGINS / "uppercase.wat").binary_id
        assert theirs != mine  # same path, other tenant: its own binary
        assert alice.execute(mine, "still mine").output == b"STILL MINE"


def test_unknown_ids_and_invalid_modules(service):
    with service.client() as c:
        with pytest.raises(errors.NotFound):
            c.execute("00000000-0000-0000-0000-000000000000", "x")
        with pytest.raises(FileNotFoundError):  # the client reads its own file
            c.load("/nonexistent/plugin.wasm")
        with pytest.raises(errors.InvalidModule) as invalid:
            c.load(HOSTILE / "invalid.wasm")
        assert invalid.value.message
        with pytest.raises(errors.InvalidModule) as imports:
            c.load(HOSTILE / "unknown_import.wat")
        missing = imports.value.details["missing_imports"]
        assert "env.mystery" in missing and "host.nope" in missing
        # the service is fine afterwards
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        assert c.execute(upper, "ok").output == b"OK"


@pytest.mark.parametrize(
    ("plugin", "kwargs", "error"),
    [
        ("loop.wat", {"timeout_ms": 200}, errors.Timeout),
        ("loop.wat", {"fuel": 100_000}, errors.OutOfFuel),
        ("memory_bomb.wat", {"memory_mb": 4}, errors.MemoryLimit),
        ("recursion.wat", {}, errors.Trap),
        ("trap.wat", {}, errors.Trap),
        ("output_flood.wat", {}, errors.OutputLimit),
        ("nonzero.wat", {}, errors.PluginError),
    ],
)
def test_each_failure_code_then_clean_run(service, plugin, kwargs, error):
    with service.client() as c:
        hostile = c.load(HOSTILE / plugin).binary_id
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        with pytest.raises(error):
            c.execute(hostile, "x", **kwargs)
        for _ in range(4):  # every worker is still healthy
            assert c.execute(upper, "fine").output == b"FINE"


def test_malformed_frames_get_bad_request(service):
    with raw_dealer(service.endpoint) as sock:
        cases = [
            [b"\xc1garbage"],  # not msgpack
            [msgspec.msgpack.encode({"type": "nope", "id": 5})],  # unknown operation
            [msgspec.msgpack.encode({"type": "execute", "id": 6})],  # missing binary_id
            [b"a", b"b", b"c"],  # too many frames
            [msgspec.msgpack.encode([1, 2, 3])],
        ]
        for frames in cases:
            reply = exchange(sock, frames)
            assert isinstance(reply, p.ErrorReply) and reply.code == "BAD_REQUEST", reply
        reply = exchange(sock, [msgspec.msgpack.encode({"type": "execute", "id": 6})])
        assert reply.id == 6 and "binary_id" in reply.message
    with service.client() as c:
        assert c.stats().workers


def test_execute_pack_from_a_raw_socket(service):
    """The packed form of the protocol as docs/protocol.md describes it: one frame of many
    executes, each answered on its own, replies packed; a malformed pack is refused whole."""
    with service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
    with raw_dealer(service.endpoint) as sock:
        pack = p.ExecutePack(
            executes=[p.Execute(id=1, binary_id=upper), p.Execute(id=2, binary_id="nope"),
                      p.Execute(id=3, binary_id=upper), p.Execute(id=4, binary_id=upper)],
            payloads=[b"one", b"two", None, b"x" * 100_000])
        sock.send_multipart([p.encode(pack)])
        replies: dict[int, tuple[Any, bytes | None]] = {}
        while len(replies) < 4:
            assert sock.poll(10_000), f"only {sorted(replies)} answered"
            frames = sock.recv_multipart()
            reply = p.reply_decoder.decode(frames[0])
            if isinstance(reply, p.ReplyPack):
                for one, payload in zip(reply.replies, reply.payloads, strict=True):
                    replies[one.id] = (one, payload)
            else:
                replies[reply.id] = (reply, frames[1] if len(frames) > 1 else None)
        assert replies[1][1] == b"ONE" and isinstance(replies[1][0], p.Executed)
        assert isinstance(replies[2][0], p.ErrorReply) and replies[2][0].code == "NOT_FOUND"
        assert replies[3][1] == b""
        assert replies[4][1] == b"X" * 100_000
        mismatched = msgspec.msgpack.encode(
            {"type": "xpack", "executes": [{"type": "execute", "id": 9, "binary_id": upper}],
             "payloads": []})
        empty = p.encode(p.ExecutePack(executes=[], payloads=[]))
        for frames in ([mismatched], [p.encode(pack), b"extra"], [empty]):
            reply = exchange(sock, frames)
            # This connection has sent a pack: its replies now come packed too.
            assert isinstance(reply, p.ReplyPack) and len(reply.replies) == 1
            error = reply.replies[0]
            assert isinstance(error, p.ErrorReply) and error.code == "BAD_REQUEST", error


def test_packs_stay_under_the_servers_frame_cap():
    """A burst of mid-size inputs is split over several packs: one pack of all of them would be
    over the server's ZMQ_MAXMSGSIZE (2 x max_payload_bytes + 1 MiB), and libzmq would drop the
    connection without a reply."""
    svc = start_service(workers=1, config={
        "server": {"max_payload_bytes": 65_536, "shm_dir": "off"}})
    try:
        async def run() -> None:
            async with AsyncClient(svc.endpoint, timeout_s=20) as c:
                upper = (await c.load(PLUGINS / "uppercase.wat")).binary_id
                inputs = [bytes([97 + i % 26]) * 60_000 for i in range(60)]  # 3.6 MB in all
                results = await asyncio.gather(*(c.execute(upper, x) for x in inputs))
                assert [r.output for r in results] == [x.upper() for x in inputs]

        asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        svc.cleanup()


def test_payload_too_large_and_busy():
    svc = start_service(workers=1, config={"server": {"max_queue": 0, "max_payload_bytes": 4096},
                                           "limits": {"fuel": 10**13}})
    try:
        with svc.client() as c:
            upper = c.load(PLUGINS / "uppercase.wat").binary_id
            loop = c.load(HOSTILE / "loop.wat").binary_id
            with pytest.raises(errors.PayloadTooLarge):
                c.execute(upper, b"x" * 5000)
            assert c.execute(upper, b"y" * 4000).output == b"Y" * 4000

        outcome: list[BaseException] = []

        def hog() -> None:
            with svc.client() as hog_client:
                try:
                    hog_client.execute(loop, "x", timeout_ms=1500)
                except BaseException as exc:  # noqa: BLE001 - recorded for the assert
                    outcome.append(exc)

        thread = threading.Thread(target=hog)
        thread.start()
        deadline = time.monotonic() + 10
        with svc.client() as c:
            while time.monotonic() < deadline and c.stats().in_flight == 0:
                time.sleep(0.02)
            with pytest.raises(errors.Busy):
                c.execute(upper, "x")
            assert thread.is_alive()  # answered at once, not after the hog finished
        thread.join(timeout=30)
        assert outcome and isinstance(outcome[0], errors.Timeout)
        with svc.client() as c:
            assert c.execute(upper, "after").output == b"AFTER"
    finally:
        svc.cleanup()


def test_async_client_many_in_flight(service):
    async def run() -> None:
        async with AsyncClient(service.endpoint) as c:
            upper = (await c.load(PLUGINS / "uppercase.wat")).binary_id
            rot = (await c.load(PLUGINS / "rot13.wat")).binary_id
            inputs = [f"message {i}" for i in range(300)]
            results = await asyncio.gather(
                *(c.execute(upper if i % 2 else rot, text) for i, text in enumerate(inputs))
            )
            for i, (text, result) in enumerate(zip(inputs, results, strict=True)):
                expected = text.upper() if i % 2 else _rot13(text)
                assert result.output == expected.encode()
            stats = await c.stats()
            assert stats.in_flight == 0

    asyncio.run(asyncio.wait_for(run(), 60))


def test_packed_jobs_keep_every_reply_with_its_request(service):
    """Jobs and replies travel packed between the supervisor and a worker; mixing small,
    large (unpacked) and failing requests in flight must still pair every reply correctly."""
    async def run() -> None:
        async with AsyncClient(service.endpoint) as c:
            upper = (await c.load(PLUGINS / "uppercase.wat")).binary_id
            failing = (await c.load(HOSTILE / "nonzero.wat")).binary_id
            sizes = [10, 70_000, 100, 0, 200_000, 65_536, 65_537, 5]
            calls = []
            for i in range(240):
                if i % 7 == 3:
                    calls.append(c.execute(failing, b"n"))
                else:
                    calls.append(c.execute(upper, bytes([97 + i % 26]) * sizes[i % len(sizes)]))
            results = await asyncio.gather(*calls, return_exceptions=True)
            for i, result in enumerate(results):
                if i % 7 == 3:
                    assert isinstance(result, errors.PluginError), result
                else:
                    expected = bytes([65 + i % 26]) * sizes[i % len(sizes)]
                    assert not isinstance(result, BaseException), result
                    assert result.output == expected

    asyncio.run(asyncio.wait_for(run(), 60))


def test_client_timeout_is_bounded(tmp_path):
    from wasmcore.client.core import Client

    with Client(f"ipc://{tmp_path}/nobody.sock", timeout_s=0.3) as c:
        with pytest.raises(errors.Unavailable):
            c.stats()


def _rot13(text: str) -> str:
    import codecs

    return codecs.encode(text, "rot13")


def test_endpoint_from_environment(service, monkeypatch):
    from wasmcore.client.core import Client

    monkeypatch.setitem(os.environ, "WASM_CORE_ENDPOINT", service.endpoint)
    with Client() as c:
        assert c.endpoint == service.endpoint
        assert c.stats().workers
