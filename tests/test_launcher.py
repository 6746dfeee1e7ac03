"""A service started by `start_service` lives exactly as long as the process that started it."""

from __future__ import annotations

import select
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from tests.conftest import PLUGINS, wait_for
from wasmcore.client.launcher import RunningService, start_service

LAUNCHER = """
import sys
from wasmcore.client.launcher import start_service
svc = start_service(workers=2, config={"server": {"log_level": "error"}})
print(svc.pid, svc.workdir, svc.shm_dir, flush=True)
sys.stdin.read()  # until the test kills this process
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_service_exits_when_its_launcher_dies(how: signal.Signals):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    supervisor = 0
    dirs: list[str] = []
    try:
        assert select.select([launcher.stdout], [], [], 90)[0], "the launcher never started"
        pid, *dirs = launcher.stdout.readline().decode().split()
        supervisor = int(pid)
        workers = [p.pid for p in psutil.Process(supervisor).children(recursive=True)]
        assert len(workers) >= 2
        launcher.send_signal(how)  # no stop(): SIGTERM's default action, or SIGKILL
        launcher.wait(timeout=10)
        wait_for(lambda: gone(supervisor), 30, "the supervisor to exit with its launcher")
        wait_for(lambda: all(gone(w) for w in workers), 10, "its workers to exit")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)
        if supervisor and not gone(supervisor):
            psutil.Process(supervisor).kill()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_service_started_from_a_thread_outlives_the_thread():
    started: list[RunningService] = []
    thread = threading.Thread(target=lambda: started.append(start_service(workers=1)))
    thread.start()
    thread.join(timeout=90)
    assert not thread.is_alive() and started, "start_service did not finish"
    svc = started[0]
    try:
        with svc.client() as c:
            binary = c.load(PLUGINS / "uppercase.wat").binary_id
            for _ in range(3):
                assert c.execute(binary, "abc").output == b"ABC"
        assert svc.process.poll() is None
    finally:
        svc.cleanup()
    assert svc.process.returncode == 0  # stopped by stop(), not by the thread's end
