"""Per-execution limits as users expect them, through the real server (issue 13, Limits):
the wall-clock timeout binds unless fuel is asked for, a request may raise its limits up to
the operator's maximum (and is refused above it, naming the maximum), and `welcome` tells a
client the defaults and maxima that apply to it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import msgspec
import pytest

from tests.conftest import HOSTILE, PLUGINS, raw_dealer
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p


@pytest.fixture(scope="module")
def svc() -> Iterator[RunningService]:
    running = start_service(workers=2, config={
        "server": {"log_level": "warning"},
        "limits": {"timeout_ms": 5000, "max_timeout_ms": 20_000, "max_memory_mb": 128},
        "tenants": {"default": {}, "ceil": {"max_timeout_ms": 4000, "max_memory_mb": 96}},
    })
    try:
        yield running
    finally:
        running.cleanup()


def test_compute_bound_plugin_runs_until_its_timeout(svc: RunningService) -> None:
    """No fuel option: the 3 s timeout binds, not a default fuel cap (which stopped this
    after about 0.3 s with OUT_OF_FUEL)."""
    with svc.client() as c:
        loop = c.load(HOSTILE / "loop.wat").binary_id
        started = time.monotonic()
        with pytest.raises(errors.Timeout) as stopped:
            c.execute(loop, "x", timeout_ms=3000)
        elapsed = time.monotonic() - started
    assert stopped.value.details["timeout_ms"] == 3000
    assert elapsed > 2.0


def test_explicit_fuel_runs_out(svc: RunningService) -> None:
    with svc.client() as c:
        loop = c.load(HOSTILE / "loop.wat").binary_id
        with pytest.raises(errors.OutOfFuel) as stopped:
            c.execute(loop, "x", timeout_ms=3000, fuel=5_000_000)
    assert stopped.value.details["fuel"] == 5_000_000
    assert stopped.value.details["fuel_consumed"] == 5_000_000


def test_fuel_above_any_old_default_is_granted(svc: RunningService) -> None:
    """A fuel wish far above the old 2e9 default is honoured, not clamped back: a small
    plugin finishes well inside it."""
    with svc.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        assert c.execute(upper, "ok", fuel=10**14).output == b"OK"


def test_a_request_may_raise_its_memory_up_to_the_maximum(svc: RunningService) -> None:
    """[limits] memory_mb is 64; asking 100 (under max_memory_mb) is granted, not clamped
    back: the memory bomb is stopped at 100 MiB."""
    with svc.client() as c:
        bomb = c.load(HOSTILE / "memory_bomb.wat").binary_id
        with pytest.raises(errors.MemoryLimit) as stopped:
            c.execute(bomb, "x", memory_mb=100)
    assert stopped.value.details["memory_bytes"] == 100 * 1024 * 1024
    assert stopped.value.details["peak_memory_bytes"] > 64 * 1024 * 1024


def test_asking_above_the_maximum_is_refused_naming_it(svc: RunningService) -> None:
    with svc.client() as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        for wish, quota, limit in ((dict(timeout_ms=20_001), "max_timeout_ms", 20_000),
                                   (dict(memory_mb=129), "max_memory_mb", 128)):
            with pytest.raises(errors.QuotaExceeded) as refused:
                c.execute(upper, "x", **wish)
            assert refused.value.details == {"quota": quota, "limit": limit,
                                             "used": next(iter(wish.values()))}
            assert "[limits]" in refused.value.message
        # up to the maximum is fine
        assert c.execute(upper, "x", timeout_ms=20_000, memory_mb=128).output == b"X"


def test_a_tenant_ceiling_replaces_the_operator_maximum(svc: RunningService) -> None:
    with svc.client(tenant="ceil") as c:
        upper = c.load(PLUGINS / "uppercase.wat").binary_id
        with pytest.raises(errors.QuotaExceeded) as refused:
            c.execute(upper, "x", timeout_ms=4001)
        assert refused.value.details == {"quota": "max_timeout_ms", "limit": 4000,
                                         "used": 4001}
        assert "[tenants.ceil]" in refused.value.message


def test_welcome_carries_the_defaults_and_maxima(svc: RunningService) -> None:
    with svc.client() as c:
        offered = c.hello().limits
    assert offered is not None
    assert (offered.timeout_ms, offered.max_timeout_ms) == (5000, 20_000)
    assert (offered.fuel, offered.max_fuel) == (0, 0)  # 0: no cap / no maximum
    assert (offered.memory_mb, offered.max_memory_mb) == (64, 128)
    assert offered.output_bytes > 0 and offered.log_bytes > 0
    # the tenant's own ceilings, and its default capped by them
    with svc.client(tenant="ceil") as c:
        offered = c.hello().limits
    assert offered is not None
    assert (offered.timeout_ms, offered.max_timeout_ms) == (4000, 4000)
    assert offered.max_memory_mb == 96


def test_welcome_on_a_raw_socket_and_an_old_decoder(svc: RunningService) -> None:
    """The wire reply has `limits`; a decoder of the old Welcome (without it) still reads
    the reply."""
    with raw_dealer(svc.endpoint) as sock:
        sock.send_multipart([p.encode(p.Hello(id=3))])
        assert sock.poll(10_000)
        frame = sock.recv_multipart()[0]
    welcome = p.reply_decoder.decode(frame)
    assert isinstance(welcome, p.Welcome) and welcome.limits is not None
    assert welcome.limits.max_timeout_ms == 20_000

    class OldWelcome(msgspec.Struct, tag="welcome", kw_only=True):
        id: int
        server_version: str
        workers: int = 0

    old = msgspec.msgpack.decode(frame, type=OldWelcome)
    assert old.id == 3 and old.workers == 2


def test_short_timeouts_stop_by_the_clock_never_early(svc: RunningService) -> None:
    """A timeout shorter than ten epoch ticks is checked against the clock when its tick
    comes: TIMEOUT, never before the time asked for (the worker's own wall time)."""
    with svc.client() as c:
        loop = c.load(HOSTILE / "loop.wat").binary_id
        for timeout_ms in (1, 3, 15, 25):
            with pytest.raises(errors.Timeout) as stopped:
                c.execute(loop, "x", timeout_ms=timeout_ms)
            assert stopped.value.details["timeout_ms"] == timeout_ms
            assert stopped.value.details["wall_time_us"] >= timeout_ms * 1000


def test_run_limits_rules() -> None:
    """The pure rules (supervisor/requests.py): defaults, maxima, the tenant's own ceilings,
    a maximum below its default, max_fuel 0 as no maximum, per-binary settings lowering."""
    from wasmcore.protocol.limits import NO_FUEL_CAP
    from wasmcore.supervisor.config import parse_config
    from wasmcore.supervisor.requests import run_limits

    config = parse_config("""
[limits]
timeout_ms = 5000
max_timeout_ms = 0
max_memory_mb = 100
[tenants.t]
max_fuel = 1000
[tenants.t.binaries.small]
timeout_ms = 50
""")
    asked = p.RunOptions
    plain = run_limits(config, "x", "b", asked())
    assert (plain.timeout_ms, plain.fuel, plain.memory_bytes) == (5000, NO_FUEL_CAP, 64 << 20)
    assert run_limits(config, "x", "b", asked(timeout_ms=4000)).timeout_ms == 4000
    with pytest.raises(errors.QuotaExceeded):  # max_timeout_ms 0: counts as timeout_ms
        run_limits(config, "x", "b", asked(timeout_ms=5001))
    assert run_limits(config, "x", "b", asked(memory_mb=100)).memory_bytes == 100 << 20
    assert run_limits(config, "x", "b", asked(fuel=10**15)).fuel == 10**15  # no maximum
    assert run_limits(config, "t", "b", asked()).fuel == 1000  # the default capped by it
    with pytest.raises(errors.QuotaExceeded) as refused:
        run_limits(config, "t", "b", asked(fuel=1001))
    assert "[tenants.t] max_fuel" in refused.value.message
    assert run_limits(config, "t", "small", asked(timeout_ms=4000)).timeout_ms == 50
