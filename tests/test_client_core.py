"""The clients' shared core: request building and reply waits without a server, and the
blocking and asyncio clients agreeing with each other, on their requests and against a server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HOSTILE, PLUGINS
from wasmcore.client import AsyncClient, Client
from wasmcore.client import operations as ops
from wasmcore.client.core import ChainExecution, Execution, SharedMemory
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p

# Connecting needs no server, and these tests never send.
NOWHERE = "ipc:///tmp/wasm-core-test-nobody.sock"


def no_shm() -> SharedMemory:
    return SharedMemory(p.Welcome(id=0, server_version="test"))  # no shm_dir: inline frames


# ------------------------------------------------------------------ the core on its own


def test_chain_waits_the_client_timeout_plus_each_step():
    op = ops.chain("acme", 30.0, ["a", "b", "c"], "in", 2000, 64, 10, {"K": "V"})
    assert op.request == p.Chain(binary_ids=["a", "b", "c"], tenant="acme", timeout_ms=2000,
                                 memory_mb=64, fuel=10, env={"K": "V"})
    assert op.payload == b"in"
    assert op.wait_s == 30.0 + 3 * 2.0
    assert ops.chain("acme", 30.0, iter(["a", "b"]), b"", None, None, None, None).wait_s == 30.0


def test_execute_waits_for_the_servers_timeout_answer():
    def wait(client_timeout_s: float, timeout_ms: int | None) -> float:
        return ops.execute(no_shm(), "t", client_timeout_s, "b", b"", timeout_ms, None, None,
                           None, None).wait_s

    assert wait(30.0, None) == 30.0
    assert wait(30.0, 1000) == 30.0  # a short run: the client's own timeout
    assert wait(30.0, 60_000) == 60.0 + ops.TIMEOUT_GRACE_S
    assert wait(1.0, 2000) == 2.0 + ops.TIMEOUT_GRACE_S


def test_execute_request_and_inline_payload():
    op = ops.execute(no_shm(), "acme", 30.0, "bin", "héllo", 500, 32, 7, {"A": "1"}, "main")
    assert op.request == p.Execute(binary_id="bin", tenant="acme", timeout_ms=500, memory_mb=32,
                                   fuel=7, env={"A": "1"}, entry="main")
    assert op.payload == "héllo".encode()
    assert op.lent == ""  # no shared memory: nothing lent, nothing to give back
    op.abandon()


def test_batch_waits_the_client_timeout_plus_each_input():
    op = ops.execute_batch("t", 10.0, "bin", [b"a", "b", bytearray(b"c")], 1500, None, None,
                           None, None)
    assert op.request.count == 3 and op.payload == [b"a", b"b", b"c"]
    assert op.wait_s == 10.0 + 3 * 1.5
    with pytest.raises(ValueError, match="at least one input"):
        ops.execute_batch("t", 10.0, "bin", [], None, None, None, None, None)


def test_load_waits_for_a_compile():
    # A path: the client reads the file and sends it; the resolved path names the binary.
    plugin = Path(__file__).resolve().parent.parent / "plugins" / "uppercase.wat"
    by_path = ops.load("t", 30.0, plugin, None, None)
    assert by_path.request == p.Load(tenant="t", path=str(plugin), name="uppercase")
    assert by_path.payload == plugin.read_bytes() and by_path.wait_s == ops.LOAD_WAIT_S
    by_data = ops.load("t", 300.0, None, bytearray(b"\0asm"), "mine")
    assert by_data.request == p.Load(tenant="t", name="mine") and by_data.payload == b"\0asm"
    assert by_data.wait_s == 300.0
    with pytest.raises(ValueError, match="not both"):
        ops.load("t", 30.0, "x.wat", b"x", "x")
    with pytest.raises(ValueError, match="needs a name"):
        ops.load("t", 30.0, None, b"x", None)


def test_short_requests_wait_the_client_timeout():
    assert ops.hello("t", 30.0).wait_s == ops.HELLO_WAIT_S
    assert ops.hello("t", 2.0).wait_s == 2.0
    for op in (ops.list_binaries("t", 7.0), ops.unload("t", 7.0, "b"), ops.stats("t", 7.0)):
        assert op.wait_s == 7.0 and op.payload is None and op.request.tenant == "t"


def test_frames_and_replies():
    request = p.Unload(id=3, tenant="t", binary_id="b")
    assert ops.encode_frames(request, None) == [p.encode(request)]
    assert ops.encode_frames(request, b"x") == [p.encode(request), b"x"]
    assert ops.encode_frames(request, [b"x", b"y"]) == [p.encode(request), b"x", b"y"]
    op = ops.execute(no_shm(), "t", 30.0, "b", b"x", None, None, None, None, None)
    result = op.finish(p.Executed(id=1, logs=["l"], binary_id="b", version=2), [b"X"])
    assert isinstance(result, Execution) and (result.output, result.logs) == (b"X", ["l"])
    with pytest.raises(errors.NotFound):
        op.finish(p.ErrorReply(id=1, code="NOT_FOUND", message="no such binary"), [])
    chained = ops.chain("t", 30.0, ["b"], b"", None, None, None, None).finish(
        p.Chained(id=1, worker_pid=9), [b"out"])
    assert chained == ChainExecution(output=b"out", worker_pid=9)
    assert ops.list_binaries("t", 1.0).finish(p.Listed(id=1), []) == []
    assert ops.unload("t", 1.0, "b").finish(p.Unloaded(id=1, binary_id="b"), []) is None


# ------------------------------------------------------------------ both clients, same requests

# Each public request, as a call on either client: what both must turn into the same operation.
REQUESTS: dict[str, Callable[[Any], Any]] = {
    "hello": lambda c: c.hello(),
    "load": lambda c: c.load(data=b"\0asm", name="m"),
    "execute": lambda c: c.execute("b", "x", timeout_ms=9000, memory_mb=8, env={"K": "V"}),
    "execute_batch": lambda c: c.execute_batch("b", [b"1", b"2"], timeout_ms=700),
    "chain": lambda c: c.chain(["a", "b", "c"], b"x", timeout_ms=1500, fuel=5),
    "list": lambda c: c.list(),
    "unload": lambda c: c.unload("b"),
    "stats": lambda c: c.stats(),
}


def _answer(op: ops.Operation[Any]) -> Any:
    # hello's caller reads its Welcome; nothing else is looked at.
    return p.Welcome(id=0, server_version="test") if type(op.request) is p.Hello else None


def sync_operation(make: Callable[[Any], Any]) -> ops.Operation[Any]:
    sent: list[ops.Operation[Any]] = []
    # direct=False: the blocking client also asks for a direct lane (`direct` in the header),
    # which AsyncClient never does; everything else must be the same.
    with Client(NOWHERE, tenant="acme", timeout_s=3.0, direct=False) as client:
        client._shared = no_shm()

        def run(op: ops.Operation[Any]) -> Any:
            sent.append(op)
            return _answer(op)

        client._run = run  # type: ignore[method-assign]
        make(client)
    [op] = sent
    return op


def async_operation(make: Callable[[Any], Any]) -> ops.Operation[Any]:
    sent: list[ops.Operation[Any]] = []

    async def main() -> None:
        async with AsyncClient(NOWHERE, tenant="acme", timeout_s=3.0) as client:
            client._shared = no_shm()

            def submit(op: ops.Operation[Any]) -> asyncio.Future[Any]:
                sent.append(op)
                answered = asyncio.get_running_loop().create_future()
                answered.set_result(_answer(op))
                return answered

            client._submit = submit  # type: ignore[method-assign]
            await make(client)

    asyncio.run(main())
    [op] = sent
    return op


@pytest.mark.parametrize("name", list(REQUESTS))
def test_both_clients_build_the_same_request_and_wait(name):
    sync_op, async_op = sync_operation(REQUESTS[name]), async_operation(REQUESTS[name])
    assert type(sync_op) is type(async_op)
    assert sync_op.request == async_op.request
    assert sync_op.payload == async_op.payload
    assert sync_op.wait_s == async_op.wait_s


def test_both_clients_wait_for_every_chain_step():
    for op in (sync_operation(REQUESTS["chain"]), async_operation(REQUESTS["chain"])):
        assert op.wait_s == 3.0 + 3 * 1.5


# ------------------------------------------------------------------ both clients, one server


def _chain_outcome(result: ChainExecution | None, error: Exception | None) -> Any:
    if error is not None:
        return type(error), getattr(error, "details", {}).get("step")
    assert result is not None
    return result.output, [step.binary_id for step in result.steps]


def test_sync_and_async_chain_behave_the_same(service):
    with service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        rot = c.load(PLUGINS / "rot13.wat").binary_id
        loop = c.load(HOSTILE / "loop.wat").binary_id
    # The last one outlives the clients' 1 s timeout: a chain's reply wait allows each step
    # its timeout_ms, so the server's TIMEOUT answer arrives in time for either client.
    cases: list[tuple[list[str], int | None]] = [
        ([upper, rot], None), ([upper, "no-such-binary"], None), ([upper, loop], 1200)]

    sync_outcomes = []
    with Client(service.endpoint, timeout_s=1.0) as client:
        for ids, timeout_ms in cases:
            try:
                sync_outcomes.append(_chain_outcome(
                    client.chain(ids, "hello chain", timeout_ms=timeout_ms), None))
            except errors.WasmCoreError as exc:
                sync_outcomes.append(_chain_outcome(None, exc))

    async def run_async() -> list[Any]:
        outcomes = []
        async with AsyncClient(service.endpoint, timeout_s=1.0) as client:
            for ids, timeout_ms in cases:
                try:
                    outcomes.append(_chain_outcome(
                        await client.chain(ids, "hello chain", timeout_ms=timeout_ms), None))
                except errors.WasmCoreError as exc:
                    outcomes.append(_chain_outcome(None, exc))
        return outcomes

    assert sync_outcomes[0] == (b"URYYB PUNVA", [upper, rot])
    assert sync_outcomes[1][0] is errors.NotFound
    assert sync_outcomes[2] == (errors.Timeout, 1)
    assert asyncio.run(run_async()) == sync_outcomes


def test_async_reply_waits_expire_each_at_its_own_deadline(tmp_path: Path):
    """One timer serves every reply wait: a shorter wait sent after a longer one still
    expires on time, the longer one later, and a reply wait never outlives its request."""
    async def run() -> list[str]:
        order: list[str] = []
        async with AsyncClient(f"ipc://{tmp_path}/nobody.sock") as client:

            async def ask(label: str, wait_s: float) -> None:
                try:
                    await client.call(p.Hello(), timeout_s=wait_s)
                except errors.Unavailable:
                    order.append(label)

            long = asyncio.ensure_future(ask("long", 1.5))
            await asyncio.sleep(0.05)
            short = asyncio.ensure_future(ask("short", 0.2))
            await asyncio.wait_for(short, 5)
            assert order == ["short"] and not long.done()
            await asyncio.wait_for(long, 5)
            assert client._pending == {}
        return order

    assert asyncio.run(run()) == ["short", "long"]


def test_execute_many_answers_every_input_in_order(service):
    with service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
    inputs = [f"input {i}" for i in range(300)]

    async def run() -> tuple[list[Any], list[Any]]:
        async with AsyncClient(service.endpoint) as client:
            done = await client.execute_many(upper, inputs, concurrency=16)
            missing = await client.execute_many("no-such-binary", ["a", "b"], concurrency=4)
            assert client._pending == {}
            return done, missing

    done, missing = asyncio.run(run())
    assert [r.output for r in done] == [i.upper().encode() for i in inputs]
    assert [type(r) for r in missing] == [errors.NotFound, errors.NotFound]


def test_async_execute_is_a_future_that_every_asyncio_idiom_takes(service):
    """`execute` returns the future of a queued request: awaited, gathered, wrapped in a task
    (create_task, TaskGroup), or cancelled; and so does the first one, sent after hello."""
    with service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        loop_plugin = c.load(HOSTILE / "loop.wat").binary_id

    async def run() -> None:
        async with AsyncClient(service.endpoint) as client:
            first = asyncio.create_task(client.execute(upper, "first"))  # before hello
            assert (await first).output == b"FIRST"
            assert (await client.execute(upper, "a")).output == b"A"
            # Queued at once, each a future and none a task; one timer for all their waits
            # (the loop's timer heap does not grow with the requests in flight).
            loop = asyncio.get_running_loop()
            timers = len(loop._scheduled)  # type: ignore[attr-defined]
            sent = [client.execute(upper, str(i)) for i in range(50)]
            assert all(asyncio.isfuture(f) for f in sent) and len(client._pending) == 50
            assert len(loop._scheduled) <= timers + 1  # type: ignore[attr-defined]
            assert [r.output for r in await asyncio.gather(*sent)] == [
                str(i).encode() for i in range(50)]
            gathered = await asyncio.gather(*(client.execute(upper, str(i)) for i in range(50)))
            assert [r.output for r in gathered] == [str(i).encode() for i in range(50)]
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(client.execute(upper, "t")) for _ in range(5)]
            assert all(t.result().output == b"T" for t in tasks)
            with pytest.raises(errors.NotFound):
                await client.execute("no-such-binary", "x")
            slow = client.execute(loop_plugin, "x", timeout_ms=300)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            # The cancelled request's reply (a TIMEOUT) is dropped when it comes; the client
            # goes on serving.
            assert (await client.execute(upper, "after")).output == b"AFTER"
            for _ in range(100):
                if not client._pending:
                    break
                await asyncio.sleep(0.05)
            assert client._pending == {}

    asyncio.run(run())


# ------------------------------------------------------------------ the lean execute path


def test_execute_without_options_builds_what_the_full_path_builds():
    """A plain execute skips the conversions of the options it was not given: the request,
    payload and wait must be those of the same execute with every option spelled out."""
    for client_timeout_s in (30.0, 1.0):
        for data in (b"bytes in", "str in", bytearray(b"bytearray in"), memoryview(b"view")):
            plain = ops.execute(no_shm(), "acme", client_timeout_s, "bin", data, None, None,
                                None, None, None, None)
            full = ops.execute(no_shm(), "acme", client_timeout_s, "bin", data, None, None,
                               None, {}, None, [])
            assert plain.request == full.request
            assert p.encode(plain.request) == p.encode(full.request)
            assert plain.payload == full.payload and type(plain.payload) is bytes
            assert plain.wait_s == full.wait_s == max(client_timeout_s,
                                                      ops.TIMEOUT_GRACE_S)


def test_a_plain_reply_finishes_as_unpack_would():
    """The execute's shortcut for an inline reply with no segment lent gives what `unpack`
    gives; error replies still raise their code's exception class."""
    reply = p.Executed(id=1, logs=["l"], logs_truncated=True, binary_id="b", version=3,
                       worker_pid=7)
    op = ops.execute(no_shm(), "t", 30.0, "b", b"x", None, None, None, None, None)
    assert op.finish(reply, [b"OUT"]) == ops.unpack(reply, [b"OUT"])
    assert op.finish(reply, []).output == b""
    with pytest.raises(errors.NotFound):
        op.finish(p.ErrorReply(id=1, code="NOT_FOUND", message="no such binary"), [])


def test_errors_in_a_reply_pack_raise_their_class_beside_the_results(service):
    """Executes sent in one burst travel in one pack and come back packed: each still gets
    its own result, or its own error's exception class, never another's."""
    with service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id

    async def run() -> list[Any]:
        async with AsyncClient(service.endpoint) as client:
            await client.execute(upper, "warm up")  # hello first: later executes are packed
            burst = [client.execute(upper if i % 3 else "no-such-binary", f"in {i}")
                     for i in range(60)]
            outcomes = await asyncio.gather(*burst, return_exceptions=True)
            assert client._pending == {}
            return outcomes

    outcomes = asyncio.run(run())
    for i, outcome in enumerate(outcomes):
        if i % 3:
            assert isinstance(outcome, Execution) and outcome.output == f"IN {i}".encode()
        else:
            assert type(outcome) is errors.NotFound


def test_a_late_reply_after_the_clients_wait_is_dropped(service):
    """A request whose reply wait is over fails with Unavailable; its reply, when the server
    sends it later, answers nothing (not a later request), and the client goes on."""
    with service.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        loop_plugin = c.load(HOSTILE / "loop.wat").binary_id

    async def run() -> None:
        async with AsyncClient(service.endpoint) as client:
            await client.execute(upper, "warm up")
            with pytest.raises(errors.Unavailable):  # the server answers TIMEOUT at ~1 s
                await client.call(p.Execute(binary_id=loop_plugin, timeout_ms=1000), b"x",
                                  timeout_s=0.2)
            assert client._pending == {}
            # Requests sent while the late TIMEOUT reply is on its way get their own replies.
            for round_ in range(30):
                results = await asyncio.gather(*(client.execute(upper, f"{round_} {i}")
                                                 for i in range(8)))
                assert [r.output for r in results] == [f"{round_} {i}".encode().upper()
                                                       for i in range(8)]
                await asyncio.sleep(0.05)
            assert client._pending == {}

    asyncio.run(run())


def test_a_reply_wait_starts_when_the_request_is_sent():
    """A request's deadline is set when its burst is sent: a sweep before that leaves it
    alone, and once sent it still expires on time (no timer per request)."""
    async def run() -> None:
        async with AsyncClient(NOWHERE) as client:
            future = client._submit(ops.Operation(p.Hello(), None, 0.1))
            client._sweep()  # before the burst is sent: nothing to expire yet
            assert not future.done() and len(client._pending) == 1
            with pytest.raises(errors.Unavailable, match="within 0.1 s"):
                await asyncio.wait_for(future, 5)
            assert client._pending == {}

    asyncio.run(run())


def test_execute_many_without_a_server_returns_each_inputs_error():
    """No server: the hello fails, and every input gets its Unavailable as its result (not
    raised), as with a server that refuses one input."""
    async def run() -> list[Any]:
        async with AsyncClient(NOWHERE, timeout_s=0.2) as client:
            return await client.execute_many("b", ["a", "b", "c"], concurrency=2)

    assert [type(r) for r in asyncio.run(run())] == [errors.Unavailable] * 3


def test_closing_with_a_burst_not_yet_sent_fails_it_and_sends_nothing():
    """close() before the burst's send: its request fails with Unavailable, and the send
    scheduled for it finds the client closed and does nothing (no error in the loop)."""
    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
        client = AsyncClient(NOWHERE)
        future = client._submit(ops.Operation(p.Hello(), None, 5.0))
        await client.close()
        with pytest.raises(errors.Unavailable, match="closed"):
            await asyncio.wait_for(future, 5)
        await asyncio.sleep(0.01)  # the scheduled send has run by now
        assert loop_errors == []

    asyncio.run(run())
