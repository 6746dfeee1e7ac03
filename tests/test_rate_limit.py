"""The per-tenant token bucket (supervisor/rate_limit.py): pure, with a fake clock."""

from __future__ import annotations

import pytest

from wasmcore.protocol.errors import QuotaExceeded
from wasmcore.supervisor.config import TenantConfig
from wasmcore.supervisor.rate_limit import BUCKETS_KEPT, RateLimits, TokenBucket


def test_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3, tokens=3.0, stamp=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.05)  # half a token
    assert bucket.wait_s() == pytest.approx(0.05)
    assert bucket.take(0.1)
    assert not bucket.take(0.1)


def test_bucket_never_holds_more_than_its_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=2, tokens=0.0, stamp=0.0)
    assert bucket.take(1000.0) and bucket.take(1000.0)
    assert not bucket.take(1000.0)


def test_clock_going_backwards_gives_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, tokens=0.0, stamp=10.0)
    assert not bucket.take(5.0)
    assert bucket.stamp == 10.0


def test_rate_limits_per_tenant_with_quota_details() -> None:
    configs = {"slow": TenantConfig(requests_per_s=2.0, burst=2)}
    limits = RateLimits(lambda name: configs.get(name, TenantConfig()))
    limits.admit("slow", 0.0)
    limits.admit("slow", 0.0)
    with pytest.raises(QuotaExceeded) as refused:
        limits.admit("slow", 0.1)
    assert refused.value.details["quota"] == "requests_per_s"
    assert refused.value.details["limit"] == 2.0
    assert refused.value.details["used"] == 2
    assert refused.value.details["retry_after_ms"] == 400
    for _ in range(1000):  # 0: unlimited, and no bucket kept for it
        limits.admit("free", 0.1)
    assert limits.tracked == 1
    limits.admit("slow", 0.5)  # a token again after 0.5 s


def test_burst_zero_is_one_seconds_worth() -> None:
    limits = RateLimits(lambda name: TenantConfig(requests_per_s=2.5))
    for _ in range(3):
        limits.admit("t", 0.0)
    with pytest.raises(QuotaExceeded):
        limits.admit("t", 0.0)


def test_a_reloaded_rate_applies_to_an_existing_bucket() -> None:
    config = {"t": TenantConfig(requests_per_s=1.0, burst=5)}
    limits = RateLimits(lambda name: config[name])
    limits.admit("t", 0.0)
    config["t"] = TenantConfig(requests_per_s=1.0, burst=1)  # holds 4: cut to 1
    limits.admit("t", 0.0)
    with pytest.raises(QuotaExceeded):
        limits.admit("t", 0.0)
    config["t"] = TenantConfig()  # unlimited now
    limits.admit("t", 0.0)


def test_buckets_of_many_tenant_names_stay_bounded() -> None:
    limits = RateLimits(lambda name: TenantConfig(requests_per_s=1000.0, burst=1))
    for i in range(3 * BUCKETS_KEPT):
        limits.admit(f"t{i}", i * 1.0)  # every older bucket has refilled by now
    assert limits.tracked <= BUCKETS_KEPT
