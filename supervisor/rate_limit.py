"""Request rates per tenant: a token bucket each ([tenants.<name>] requests_per_s and burst).

Pure: no clock of its own (the server passes `now`), no sockets. A bucket holds up to `burst`
tokens and gains `requests_per_s` a second; each request takes one, and a request that finds
none is refused with QUOTA_EXCEEDED. A rate of 0 is unlimited.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from wasmcore.protocol.errors import QuotaExceeded
from wasmcore.supervisor.config import TenantConfig

# Tenant names are the clients' to choose: past this many buckets, full ones (which a new
# bucket would equal) are forgotten.
BUCKETS_KEPT = 4096


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens a second
    burst: int  # the most it holds
    tokens: float
    stamp: float  # when `tokens` was last brought up to date

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        """One token if there is one (True), else nothing changes (False)."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait_s(self) -> float:
        """How long until the next token, from the last refill."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


def bucket_size(config: TenantConfig) -> int:
    """`burst`, or one second's worth of requests when it is 0."""
    return config.burst or max(1, math.ceil(config.requests_per_s))


class RateLimits:
    def __init__(self, policy: Callable[[str], TenantConfig]) -> None:
        self._policy = policy
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, tenant: str, now: float) -> None:
        """Count one request of `tenant`; QuotaExceeded if its bucket is empty."""
        config = self._policy(tenant)
        rate = config.requests_per_s
        if rate <= 0:
            return
        burst = bucket_size(config)
        bucket = self._buckets.get(tenant)
        if bucket is None:
            if len(self._buckets) >= BUCKETS_KEPT:
                self._forget_full(now)
            bucket = self._buckets[tenant] = TokenBucket(rate, burst, float(burst), now)
        elif bucket.rate != rate or bucket.burst != burst:  # the config was reloaded
            bucket.refill(now)
            bucket.rate, bucket.burst = rate, burst
            bucket.tokens = min(bucket.tokens, float(burst))
        if not bucket.take(now):
            raise QuotaExceeded(
                f"this tenant may send {rate:g} requests a second (bursts of {burst}); retry "
                f"in {bucket.wait_s() * 1000:.0f} ms",
                {"quota": "requests_per_s", "limit": rate, "used": burst, "burst": burst,
                 "retry_after_ms": math.ceil(bucket.wait_s() * 1000)})

    def reserve(self, tenant: str, most: int, now: float) -> int:
        """Take up to `most` tokens at once (a direct lane's executions, spent later without
        the server): how many were taken; `most` for an unlimited tenant."""
        config = self._policy(tenant)
        if config.requests_per_s <= 0:
            return most
        bucket = self._buckets.get(tenant)
        if bucket is None:
            return 0  # admit() made it for the request that asks: gone means forgotten
        bucket.refill(now)
        taken = min(most, int(bucket.tokens))
        bucket.tokens -= taken
        return taken

    def refund(self, tenant: str, unused: int, now: float) -> None:
        """Tokens reserved and not spent go back (never past the burst)."""
        bucket = self._buckets.get(tenant)
        if bucket is not None and unused > 0:
            bucket.refill(now)
            bucket.tokens = min(float(bucket.burst), bucket.tokens + unused)

    @property
    def tracked(self) -> int:
        return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        for name, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.burst:
                del self._buckets[name]
