"""Per-tenant quotas through the wire: each one exceeded gets QUOTA_EXCEEDED with the quota's
name, its limit and the tenant's use in details; other tenants are untouched. (max_pending and
max_queued_bytes are exceeded in tests/test_fairness.py.)"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PLUGINS, exchange, raw_dealer, wait_for
from tests.test_fairness import spin_module
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import errors
from wasmcore.protocol import messages as p

UPPER = PLUGINS / "uppercase.wat"


@pytest.fixture(scope="module")
def svc() -> Iterator[RunningService]:
    running = start_service(workers=1, config={
        "server": {"log_level": "warning"},
        "limits": {"timeout_ms": 300, "max_timeout_ms": 1000},
        # The old global table: only the tenant named "default" gets it.
        "binaries": {"uppercase": {"entries": ["nope"]}},
        "tenants": {
            "default": {},
            "rated": {"requests_per_s": 0.001, "burst": 2},
            "ceil": {"max_timeout_ms": 5000, "max_fuel": 10**10, "max_memory_mb": 128},
            "few": {"max_binaries": 1},
            "alice": {"binaries": {"uppercase": {"entries": ["nope"]}}},
        },
    })
    try:
        yield running
    finally:
        running.cleanup()


def quota_error(excinfo: pytest.ExceptionInfo[errors.WasmCoreError]) -> dict[str, object]:
    assert isinstance(excinfo.value, errors.QuotaExceeded), excinfo.value
    return excinfo.value.details


def test_request_rate_past_the_burst_is_refused(svc: RunningService) -> None:
    with svc.client(tenant="rated") as rated, svc.client(tenant="other") as other:
        rated.list()
        rated.list()
        with pytest.raises(errors.QuotaExceeded) as refused:
            rated.list()
        details = quota_error(refused)
        assert details["quota"] == "requests_per_s"
        assert details["limit"] == 0.001 and details["used"] == 2
        assert rated.stats().tenant_usage is not None  # stats is never rate limited
        for _ in range(5):
            other.list()


def test_run_limit_ceilings(svc: RunningService) -> None:
    """Under its ceiling a request gets what it asks, even above [limits] (300 ms here) and
    the [limits] maximum (1000 ms); above it, QUOTA_EXCEEDED. A tenant without ceilings of
    its own is held to the [limits] maximum, refused (not clamped) above it."""
    with svc.client(tenant="ceil") as ceil, svc.client(tenant="plain") as plain:
        spin = ceil.load(data=spin_module(600), name="spin600").binary_id
        ceil.execute(spin, timeout_ms=3000)  # raises TIMEOUT if held to 300 ms
        for wish, quota, limit in ((dict(timeout_ms=6000), "max_timeout_ms", 5000),
                                   (dict(fuel=10**11), "max_fuel", 10**10),
                                   (dict(memory_mb=200), "max_memory_mb", 128)):
            with pytest.raises(errors.QuotaExceeded) as refused:
                ceil.execute(spin, **wish)
            assert quota_error(refused) == {"quota": quota, "limit": limit,
                                            "used": next(iter(wish.values()))}
        plain_spin = plain.load(data=spin_module(600), name="spin600").binary_id
        with pytest.raises(errors.QuotaExceeded) as refused:
            plain.execute(plain_spin, timeout_ms=3000)
        assert quota_error(refused) == {"quota": "max_timeout_ms", "limit": 1000,
                                        "used": 3000}
        assert "[limits] max_timeout_ms" in refused.value.message


def test_binary_settings_are_per_tenant(svc: RunningService) -> None:
    """alice's [tenants.alice.binaries.uppercase] and the global [binaries.uppercase] (the
    tenant named default only) allow only an entry that does not exist; bob's binary of the
    same name gets neither."""
    for tenant in ("alice", "default"):
        with svc.client(tenant=tenant) as client:
            binary = client.load(UPPER).binary_id
            with pytest.raises(errors.BadRequest, match="configured entries"):
                client.execute(binary, "x")
    with svc.client(tenant="bob") as bob:
        binary = bob.load(UPPER).binary_id
        assert bob.execute(binary, "x").output == b"X"


def test_max_binaries(svc: RunningService) -> None:
    with svc.client(tenant="few") as few:
        first = few.load(UPPER)
        assert few.load(UPPER).binary_id == first.binary_id  # an update is no new binary
        with pytest.raises(errors.QuotaExceeded) as refused:
            few.load(PLUGINS / "rot13.wat")
        assert quota_error(refused) == {"quota": "max_binaries", "limit": 1, "used": 1}
        few.unload(first.binary_id)
        few.load(PLUGINS / "rot13.wat")


def test_quota_exceeded_on_a_raw_socket(svc: RunningService) -> None:
    """The wire reply itself: code and details as docs/protocol.md says."""
    with svc.client(tenant="ceil") as ceil:
        upper = ceil.load(UPPER).binary_id
    with raw_dealer(svc.endpoint) as sock:
        header = p.encode(p.Execute(id=7, tenant="ceil", binary_id=upper, fuel=10**12))
        reply = exchange(sock, [header, b"x"])
    assert isinstance(reply, p.ErrorReply) and reply.id == 7
    assert reply.code == "QUOTA_EXCEEDED"
    assert reply.details == {"quota": "max_fuel", "limit": 10**10, "used": 10**12}


def test_max_stored_bytes_and_stats_usage() -> None:
    """The sum of a tenant's module sizes is bounded; stats shows it its use and limits."""
    svc = start_service(workers=1, config={"server": {"log_level": "warning"},
                                           "tenants": {"small": {"max_stored_bytes": 1}}})
    try:
        with svc.client(tenant="small") as small:
            with pytest.raises(errors.QuotaExceeded) as refused:
                small.load(UPPER)
            details = quota_error(refused)
            assert details["quota"] == "max_stored_bytes"
            assert details["limit"] == 1 and details["used"] == 0
            assert details["size"] > 0
            usage = small.stats().tenant_usage
            assert usage is not None and usage.tenant == "small"
            assert (usage.binaries, usage.stored_bytes, usage.max_stored_bytes) == (0, 0, 1)
    finally:
        svc.cleanup()


def test_a_tenants_own_load_roots(tmp_path: Path) -> None:
    """[tenants.alice] load_roots: the server reads files there for alice's loads by path
    only (on an endpoint other users may reach); bob asking for the same file gets FORBIDDEN,
    and his binary named by that path (his own bytes) is not reloaded from alice's file."""
    root = tmp_path / "alice"
    root.mkdir()
    module = root / "upper.wat"
    module.write_bytes(UPPER.read_bytes())
    shared = Path(tempfile.mkdtemp(prefix="wcq", dir="/tmp"))
    shared.chmod(0o755)  # not private: paths are read only under load roots
    svc = start_service(workers=1, endpoint=f"ipc://{shared}/s.sock", config={
        "server": {"log_level": "warning"},
        "tenants": {"alice": {"load_roots": [str(root)]}}})
    try:
        with raw_dealer(svc.endpoint) as sock:
            loaded = exchange(sock, [p.encode(p.Load(id=1, tenant="alice", path=str(module)))])
            assert isinstance(loaded, p.Loaded) and loaded.watched, loaded
            refused = exchange(sock, [p.encode(p.Load(id=2, tenant="bob", path=str(module)))])
            assert isinstance(refused, p.ErrorReply) and refused.code == "FORBIDDEN", refused
        with svc.client(tenant="bob") as bob, svc.client(tenant="alice") as alice:
            rot13 = (PLUGINS / "rot13.wasm").read_bytes()
            with raw_dealer(svc.endpoint) as sock:  # his own bytes, known by alice's path
                own = exchange(sock, [p.encode(p.Load(id=3, tenant="bob", path=str(module))),
                                      rot13])
            assert isinstance(own, p.Loaded) and not own.watched, own
            module.write_bytes(UPPER.read_bytes() + b"\n;; changed\n")
            wait_for(lambda: alice.list()[0].version == 2, 20, "alice's hot reload")
            assert [b.version for b in bob.list()] == [1]
            assert bob.execute(own.binary_id, "abc").output == b"nop"
    finally:
        svc.cleanup()
        shutil.rmtree(shared, ignore_errors=True)
