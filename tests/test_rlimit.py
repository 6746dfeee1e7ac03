"""A hard RLIMIT_DATA below pool.rlimit_data_mb (issue 11 item 14): workers used to fail to
boot ("not allowed to raise maximum limit") until the breaker stopped the service. Now the
limit is clamped to the hard one, and the worker says so on stderr."""

from __future__ import annotations

import resource
from pathlib import Path

from tests.conftest import PLUGINS
from wasmcore.client.launcher import start_service

MiB = 1024 * 1024
HARD = 1024 * MiB  # below the default pool.rlimit_data_mb (4096)


def _lower_hard_data_limit() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (HARD, HARD))


def _data_limit(pid: int) -> tuple[int, int]:
    """From /proc/<pid>/limits, which anyone may read: prlimit(2) on a process of another
    user (workers of a root service run as nobody) needs CAP_SYS_RESOURCE, which a container's
    root may lack."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max data size"):
            soft, hard = line[26:47].strip(), line[47:68].strip()
            return int(soft), int(hard)
    raise AssertionError(f"no data size limit for pid {pid}")


def test_workers_boot_under_a_lower_hard_data_limit(tmp_path: Path) -> None:
    log_path = tmp_path / "stderr.log"
    with log_path.open("wb") as log:
        svc = start_service(workers=1, stderr=log, preexec_fn=_lower_hard_data_limit,
                            ready_timeout_s=30)
        try:
            with svc.client() as c:
                upper = c.load(PLUGINS / "uppercase.wat").binary_id
                assert c.execute(upper, b"fine").output == b"FINE"
                workers = c.stats().workers
                assert c.stats().restarts_by_cause == {}
            assert [_data_limit(w.pid) for w in workers] == [(HARD, HARD)]
        finally:
            svc.cleanup()
    text = log_path.read_text()
    assert "RLIMIT_DATA" in text and "1024 MiB" in text and "4096" in text, text
