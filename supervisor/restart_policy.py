"""Restart backoff and a circuit breaker for workers that cannot start.

A worker that dies before saying ready counts as a start failure. Each consecutive failure
doubles the delay before the next attempt; too many failures inside a window open the breaker
and the supervisor stops with a clear error instead of spinning in a fork loop (Erlang/OTP's
restart intensity, in the small).
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wasmcore.supervisor.config import PoolConfig


class RestartPolicy:
    def __init__(
        self,
        initial_delay_s: float,
        max_delay_s: float,
        max_failures: int,
        window_s: float,
    ) -> None:
        self.initial_delay_s = initial_delay_s
        self.max_delay_s = max_delay_s
        self.max_failures = max_failures
        self.window_s = window_s
        self.consecutive_failures = 0
        self._failures: collections.deque[float] = collections.deque()

    @classmethod
    def from_config(cls, pool: PoolConfig) -> RestartPolicy:
        policy = cls(0.0, 0.0, 1, 1.0)
        policy.configure(pool)
        return policy

    def configure(self, pool: PoolConfig) -> None:
        """Take the pool config's backoff and breaker settings (at start and on reload)."""
        self.initial_delay_s = pool.restart_backoff_initial_ms / 1000
        self.max_delay_s = pool.restart_backoff_max_ms / 1000
        self.max_failures = pool.breaker_failures
        self.window_s = pool.breaker_window_s

    def record_start_failure(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.consecutive_failures += 1
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.window_s:
            self._failures.popleft()

    def record_start_success(self) -> None:
        self.consecutive_failures = 0

    def delay_s(self) -> float:
        """How long to wait before the next start attempt."""
        if self.consecutive_failures == 0:
            return 0.0
        return min(self.max_delay_s, self.initial_delay_s * 2 ** (self.consecutive_failures - 1))

    def tripped(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        while self._failures and now - self._failures[0] > self.window_s:
            self._failures.popleft()
        return len(self._failures) >= self.max_failures
