"""The OS sandbox under wasm: what the kernel says about real workers of a real service, and
what a plugin that broke out of wasmtime into a worker's Python could still do.

Plugins cannot make system calls, so the hostile path is the one such an intruder would have:
the worker's own `main()` boots with the settings a real worker of the service was started
with (read from its command line), and where the job loop would start, hostile code runs
instead and tries what the sandbox forbids.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from tests.conftest import PLUGINS, exchange, raw_dealer
from wasmcore.client.launcher import RunningService, start_service
from wasmcore.protocol import messages as p
from wasmcore.protocol.limits import MiB
from wasmcore.protocol.settings import WorkerSettings
from wasmcore.supervisor.config import Config, ConfigError, parse_config
from wasmcore.supervisor.confinement import (
    ConfinementError,
    WorkerUser,
    _first_blocking,
    resolve_user,
)

AS_ROOT = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody")

# Runs the worker's real main() with the given settings; its job loop is replaced by the
# attempts below, whose outcomes go to stdout as JSON.
HOSTILE_WORKER = r'''
import ctypes, errno, json, os, resource, socket, sys, threading
from wasmcore.sandbox_worker import worker

libc = ctypes.CDLL(None, use_errno=True)
sibling = int(sys.argv[2])
scratch_dir = sys.argv[3]


def outcome(call):
    try:
        result = call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    except ValueError as exc:  # setrlimit above the hard limit
        return "refused: " + str(exc)
    return "allowed" if result is None or result == 0 else result


def c_call(function, *args):
    def call():
        if function(*args) == -1:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return call


def sock(family, kind):
    return lambda: socket.socket(family, kind).close()


def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def io_uring_setup():
    params = ctypes.create_string_buffer(120)
    return c_call(libc.syscall, 425, 1, params)()


def big_file():
    path = os.path.join(scratch_dir, "wc-%d-%s" % (os.getpid(), "0" * 32))
    try:
        with open(path, "wb") as handle:
            handle.write(b"x" * (2 * 1024 * 1024))
    finally:
        if os.path.exists(path):
            os.unlink(path)


def new_thread():
    thread = threading.Thread(target=int)
    thread.start()
    thread.join()


# A thread that exists before the filter goes on, as ZeroMQ's and the ticker's do.
early_go, early_done, early = threading.Event(), threading.Event(), {}


def early_thread():
    early_go.wait(30)
    early["socket_inet"] = outcome(sock(socket.AF_INET, socket.SOCK_STREAM))
    early_done.set()


threading.Thread(target=early_thread, daemon=True).start()

ATTEMPTS = {
    "socket_inet": sock(socket.AF_INET, socket.SOCK_STREAM),
    "socket_inet6": sock(socket.AF_INET6, socket.SOCK_DGRAM),
    "socket_netlink": sock(socket.AF_NETLINK, socket.SOCK_RAW),
    "socket_packet": sock(socket.AF_PACKET, socket.SOCK_RAW),
    "socket_unix": sock(socket.AF_UNIX, socket.SOCK_STREAM),
    "fork": fork,
    "spawn": lambda: os.waitpid(os.posix_spawn("/bin/true", ["true"], {}), 0) and None,
    "execve": lambda: os.execv("/bin/true", ["true"]),
    "ptrace_traceme": c_call(libc.ptrace, 0, 0, None, None),
    "ptrace_attach_sibling": c_call(libc.ptrace, 16, sibling, None, None),
    "mount": c_call(libc.mount, b"none", scratch_dir.encode(), b"tmpfs", 0, None),
    "unshare_user": c_call(libc.unshare, 0x10000000),
    "chroot": lambda: os.chroot("/tmp"),
    "kill_sibling": lambda: os.kill(sibling, 0),
    "kill_parent": lambda: os.kill(os.getppid(), 0),
    "read_sibling_memory": lambda: open("/proc/%d/mem" % sibling, "rb").close(),
    "setuid_root": lambda: os.setuid(0),
    "io_uring_setup": io_uring_setup,
    "raise_open_files": lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20)),
    "write_2_mib_file": big_file,
    "new_thread": new_thread,
}


def hostile_run(self, protections=None):
    print("hostile code running", file=sys.stderr, flush=True)
    results = {"protections": protections}
    for name, call in ATTEMPTS.items():
        results[name] = outcome(call)
        print(json.dumps({"after": name}), file=sys.stderr, flush=True)
    early_go.set()
    early_done.wait(30)
    results["early_thread_socket_inet"] = early.get("socket_inet", "no answer")
    print(json.dumps(results), flush=True)
    self.close()
    return 0


worker.Worker.run = hostile_run
sys.exit(worker.main([sys.argv[1]]))
'''


@pytest.fixture(scope="module")
def svc() -> Iterator[RunningService]:
    running = start_service(workers=2)
    try:
        yield running
    finally:
        running.cleanup()


def _status(pid: int, task: str = "") -> dict[str, str]:
    path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    fields = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _limits(pid: int) -> dict[str, tuple[str, str]]:
    """/proc/<pid>/limits: fixed columns (name, soft, hard, units)."""
    lines = Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]
    return {line[:26].strip(): (line[26:47].strip(), line[47:68].strip()) for line in lines}


def _worker_pids(svc: RunningService) -> list[int]:
    with svc.client() as client:
        return [w.pid for w in client.stats().workers if w.state in ("idle", "busy")]


def _settings_of(pid: int) -> WorkerSettings:
    """What the supervisor started this worker with: the JSON on its command line."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    return msgspec.json.decode(argv[-1], type=WorkerSettings)


def _run_hostile(settings: WorkerSettings, sibling: int, scratch_dir: str,
                 expect_json: bool = True) -> tuple[subprocess.CompletedProcess[str],
                                                    dict[str, Any]]:
    # Its own endpoints (nobody answers there): it must not take a real worker's place.
    run_dir = Path(tempfile.mkdtemp(prefix="wch", dir="/tmp"))
    run_dir.chmod(0o711)
    settings = msgspec.structs.replace(
        settings, back_endpoint=f"ipc://{run_dir}/b", pub_endpoint=f"ipc://{run_dir}/p",
        parent_pid=os.getpid())
    try:
        done = subprocess.run(
            [sys.executable, "-c", HOSTILE_WORKER, msgspec.json.encode(settings).decode(),
             str(sibling), scratch_dir],
            capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    results = json.loads(done.stdout.strip().splitlines()[-1]) if expect_json else {}
    return done, results


def test_workers_report_protections_and_the_kernel_agrees(svc: RunningService):
    with svc.client() as client:
        workers = [w for w in client.stats().workers if w.state in ("idle", "busy")]
    assert len(workers) == 2
    for info in workers:
        for protection in ("no_new_privs", "seccomp", "nondumpable", "rlimits"):
            assert protection in info.protections, info.protections
        status = _status(info.pid)
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # filter mode
        # Every thread: ZeroMQ's and the epoch timer's threads started before the filter.
        tasks = os.listdir(f"/proc/{info.pid}/task")
        assert len(tasks) > 1
        for task in tasks:
            assert _status(info.pid, task)["Seccomp"] == "2", task
            assert _status(info.pid, task)["NoNewPrivs"] == "1", task
        limits = _limits(info.pid)
        assert limits["Max core file size"] == ("0", "0")
        assert limits["Max open files"] == ("1024", "1024")
        assert limits["Max file size"] == (str(32 * 64 * MiB),) * 2
        uids = set(status["Uid"].split())
        if AS_ROOT:
            assert uids == {str(NOBODY.pw_uid)}
            assert set(status["Gid"].split()) == {str(NOBODY.pw_gid)}
            assert status["Groups"] == ""
            assert f"uid:{NOBODY.pw_uid}" in info.protections
        else:
            assert uids == {str(os.getuid())}
            assert not any(p.startswith("uid:") for p in info.protections)


def test_wasm_client_stats_shows_each_workers_sandbox(svc: RunningService):
    done = subprocess.run([sys.executable, "-m", "wasmcore.client.cli", "--endpoint",
                           svc.endpoint, "stats"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "no_new_privs" in line]
    executing = [row for row in rows if "compile lane" not in row]
    assert "OS SANDBOX" in done.stdout and len(executing) == 2
    assert len(rows) == 3  # and the compile lane's one worker
    assert all("seccomp" in row for row in rows)


def test_compile_workers_are_sandboxed_too(svc: RunningService):
    """The compile lane's workers parse and compile untrusted modules: the same sandbox."""
    with svc.client() as client:
        (info,) = client.stats().compile_workers
    assert {"no_new_privs", "seccomp", "nondumpable", "rlimits"} <= set(info.protections)
    status = _status(info.pid)
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    if AS_ROOT:
        assert set(status["Uid"].split()) == {str(NOBODY.pw_uid)}
        assert f"uid:{NOBODY.pw_uid}" in info.protections
    else:
        assert set(status["Uid"].split()) == {str(os.getuid())}


def test_a_sandboxed_service_still_compiles_executes_and_shares_memory(svc: RunningService):
    with svc.client() as client:
        upper = client.load(PLUGINS / "uppercase.wat").binary_id
        wasi = client.load(PLUGINS / "wasi_upper.wasm").binary_id
        assert client.execute(upper, "abc").output == b"ABC"
        assert client.execute(wasi, "abc").output == b"ABC"
        large = b"q" * (2 * MiB)  # past the shared-memory threshold both ways
        assert client.execute(upper, large).output == b"Q" * (2 * MiB)
        assert client.execute(upper, large).output == b"Q" * (2 * MiB)  # a lent segment


def test_tcp_front_endpoint_keeps_workers_on_ipc():
    """Workers need no inet socket even when clients come over tcp: their links are ipc."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Plain tcp (this test is about the workers' links, not the clients' keys).
    svc = start_service(workers=1, endpoint=f"tcp://127.0.0.1:{port}",
                        config={"server": {"allow_unauthenticated_tcp": True}})
    try:
        with svc.client() as client:
            (info,) = client.stats().workers
            upper = client.load(PLUGINS / "uppercase.wat").binary_id
            assert client.execute(upper, "tcp").output == b"TCP"
        assert "seccomp" in info.protections
        # Plain tcp peers are nobody in particular: stats shows them no pids; ask the kernel.
        workers = [c.pid for c in psutil.Process(svc.pid).children()
                   if "wasmcore.sandbox_worker" in " ".join(c.cmdline())]
        assert workers
        for pid in workers:
            assert _settings_of(pid).back_endpoint.startswith("ipc://")
    finally:
        svc.cleanup()


def test_forbidden_calls_fail_inside_a_worker(svc: RunningService):
    """The worker's boot with a real worker's settings, then hostile code where jobs run."""
    first, sibling = _worker_pids(svc)
    settings = _settings_of(first)
    done, results = _run_hostile(settings, sibling, settings.shm_dir)
    assert done.returncode == 0, done.stderr
    assert "seccomp" in results["protections"]
    for name in ("socket_inet", "socket_inet6", "socket_netlink", "socket_packet", "fork",
                 "spawn", "execve", "ptrace_traceme", "ptrace_attach_sibling", "mount",
                 "unshare_user", "chroot", "kill_sibling", "kill_parent", "setuid_root",
                 "io_uring_setup", "early_thread_socket_inet"):
        assert results[name] == "EPERM", (name, results)
    assert results["read_sibling_memory"] in ("EACCES", "EPERM"), results
    assert results["raise_open_files"].startswith("refused"), results
    # What a worker needs still works: ipc sockets, threads, files up to the bound.
    assert results["socket_unix"] == "allowed"
    assert results["new_thread"] == "allowed"
    assert results["write_2_mib_file"] == "allowed"


def test_file_size_is_bounded(svc: RunningService):
    first, sibling = _worker_pids(svc)
    settings = _settings_of(first)
    small = msgspec.structs.replace(settings.os_sandbox, max_file_bytes=MiB)
    done, results = _run_hostile(msgspec.structs.replace(settings, os_sandbox=small), sibling,
                                 settings.shm_dir)
    assert done.returncode == 0, done.stderr
    assert results["write_2_mib_file"] == "EFBIG"


def test_kill_action_ends_the_worker_with_sigsys(svc: RunningService):
    first, sibling = _worker_pids(svc)
    settings = _settings_of(first)
    kill = msgspec.structs.replace(settings.os_sandbox, seccomp_action="kill")
    done, _ = _run_hostile(msgspec.structs.replace(settings, os_sandbox=kill), sibling,
                           settings.shm_dir, expect_json=False)
    assert done.returncode == -signal.SIGSYS, done.stderr
    assert "hostile code running" in done.stderr
    # Allowed calls went through; the first forbidden one (an inet socket) was the end.
    assert '"after": "socket_inet"' not in done.stderr


def _fake_python_without_libseccomp(tmp_path: Path) -> Path:
    """An interpreter on which `import pyseccomp` fails the way it does on a host without
    libseccomp.so.2 (pyseccomp raises RuntimeError at import)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "pyseccomp.py").write_text('raise RuntimeError("Unable to find libseccomp")\n')
    python = tmp_path / "python-without-libseccomp"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={fake} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    return python


def test_worker_without_libseccomp_refuses_to_start(tmp_path: Path):
    python = _fake_python_without_libseccomp(tmp_path)
    svc = start_service(workers=1, wait=False, stderr=subprocess.PIPE, config={
        "pool": {"python": str(python), "breaker_failures": 2, "breaker_window_s": 30,
                 "restart_backoff_initial_ms": 50}})
    try:
        _, stderr = svc.process.communicate(timeout=60)
        assert svc.process.returncode == 2
        text = stderr.decode()
        assert "refusing to start: cannot load libseccomp" in text, text
        assert "seccomp = false" in text  # the message says how to run without it
    finally:
        svc.cleanup()


def test_operator_may_turn_the_filter_or_the_sandbox_off(tmp_path: Path):
    python = _fake_python_without_libseccomp(tmp_path)
    svc = start_service(workers=1, config={"pool": {"python": str(python)},
                                           "sandbox": {"seccomp": False}})
    try:
        with svc.client() as client:
            (info,) = client.stats().workers
            upper = client.load(PLUGINS / "uppercase.wat").binary_id
            assert client.execute(upper, "on").output == b"ON"
        assert "seccomp" not in info.protections and "no_new_privs" in info.protections
        assert _status(info.pid)["Seccomp"] == "0"
    finally:
        svc.cleanup()
    svc = start_service(workers=1, config={"sandbox": {"enabled": False}})
    try:
        with svc.client() as client:
            (info,) = client.stats().workers
        assert info.protections == []
        status = _status(info.pid)
        assert status["NoNewPrivs"] == "0" and status["Seccomp"] == "0"
        assert set(status["Uid"].split()) == {str(os.getuid())}
    finally:
        svc.cleanup()


@pytest.mark.skipif(not AS_ROOT, reason="workers switch users only when the service is root")
def test_root_service_refuses_directories_its_workers_cannot_reach(tmp_path: Path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    svc = start_service(workers=1, wait=False, stderr=subprocess.PIPE,
                        config={"server": {"data_dir": str(private / "data")}})
    try:
        _, stderr = svc.process.communicate(timeout=60)
        assert svc.process.returncode == 2
        text = stderr.decode()
        assert f"cannot reach {private}/data/blobs" in text, text
        assert "user = \"\"" in text
    finally:
        svc.cleanup()
    svc = start_service(workers=1, config={"server": {"data_dir": str(private / "data")},
                                           "sandbox": {"user": ""}})
    try:
        with svc.client() as client:
            (info,) = client.stats().workers
        assert "seccomp" in info.protections
        assert not any(p.startswith("uid:") for p in info.protections)
        assert set(_status(info.pid)["Uid"].split()) == {"0"}
    finally:
        svc.cleanup()


def test_user_resolution():
    config = Config()
    assert resolve_user(config, euid=1000) is None  # only root switches users
    user = resolve_user(config, euid=0)
    assert user == WorkerUser("nobody", NOBODY.pw_uid, user.group, NOBODY.pw_gid)
    off = parse_config('[sandbox]\nenabled = false\n')
    assert resolve_user(off, euid=0) is None
    assert resolve_user(parse_config('[sandbox]\nuser = ""\n'), euid=0) is None
    with pytest.raises(ConfinementError, match="does not exist"):
        resolve_user(parse_config('[sandbox]\nuser = "no-such-user-here"\n'), euid=0)
    with pytest.raises(ConfinementError, match="is root"):
        resolve_user(parse_config('[sandbox]\nuser = "root"\n'), euid=0)
    with pytest.raises(ConfigError, match="sandbox.seccomp_action"):
        parse_config('[sandbox]\nseccomp_action = "log"\n')


def test_reachability_is_judged_like_the_kernel():
    user = WorkerUser("nobody", NOBODY.pw_uid, "nogroup", NOBODY.pw_gid)
    closed = Path(tempfile.mkdtemp(prefix="wcr", dir="/tmp"))  # /tmp's children: no 0700 above
    try:
        (closed / "inner").mkdir(mode=0o755)
        closed.chmod(0o700)
        assert f"{closed} is not searchable" in _first_blocking(closed / "inner", "x", user)
        closed.chmod(0o701)
        assert _first_blocking(closed / "inner", "x", user) is None
        assert "lacks 'wx'" in _first_blocking(closed / "inner", "wx", user)
    finally:
        shutil.rmtree(closed)


@pytest.mark.parametrize("enabled", [True, False])
def test_supervisor_is_not_dumpable_when_workers_share_its_user(enabled: bool):
    """Else a worker that broke out could open /proc/<supervisor>/mem (same user)."""
    script = ("import ctypes; from wasmcore.supervisor.confinement import Confinement; "
              f"Confinement(None, enabled={enabled}).grant(sockets=[], data_dir='/tmp', "
              "artifact_dir='/tmp', shm_dir=None); "
              "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))")  # PR_GET_DUMPABLE
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == ("0" if enabled else "1"), done.stderr


# A client of the service that is the workers' user: it imports as root (the interpreter may
# live where nobody cannot read), then becomes nobody and tries the front socket.
AS_NOBODY_CLIENT = r'''
import json, os, socket, sys
import zmq
from wasmcore.protocol import messages as p

endpoint, path = sys.argv[1], sys.argv[2]
os.setgroups([])
os.setgid(int(sys.argv[3]))
os.setuid(int(sys.argv[4]))
result = {}
probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    probe.connect(endpoint[len("ipc://"):])
    result["connect"] = "allowed"
except OSError as exc:
    result["connect"] = type(exc).__name__
probe.close()
if result["connect"] == "allowed":
    dealer = zmq.Context().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    dealer.send(p.encode(p.Load(id=1, tenant="default", path=path)))
    if dealer.poll(20_000):
        result["code"] = p.reply_decoder.decode(dealer.recv_multipart()[0]).code
print(json.dumps(result))
'''


def _as_nobody(endpoint: str, path: Path) -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", AS_NOBODY_CLIENT, endpoint, str(path),
                           str(NOBODY.pw_gid), str(NOBODY.pw_uid)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _path_load_code(endpoint: str, path: Path) -> str:
    with raw_dealer(endpoint) as sock:
        reply = exchange(sock, [p.encode(p.Load(id=1, tenant="default", path=str(path)))],
                         20_000)
    return reply.code if isinstance(reply, p.ErrorReply) else "LOADED"


@pytest.mark.skipif(not AS_ROOT, reason="workers switch users only when the service is root")
def test_the_workers_user_can_reach_its_sockets_but_not_the_client_socket(
        svc: RunningService, tmp_path: Path):
    """The front socket's directory lets the sandbox group in (workers' sockets are beside
    it), so the server trusts its peers only because that group cannot connect to it."""
    secret = tmp_path / "secret.wat"
    secret.write_bytes(b"root:SECRET:0:0\n")
    front = Path(svc.endpoint[len("ipc://"):])
    directory = front.parent.stat()
    assert directory.st_gid == NOBODY.pw_gid and directory.st_mode & 0o077 == 0o010
    assert _as_nobody(svc.endpoint, secret) == {"connect": "PermissionError"}
    # Its own peers are root: the server reads what they name (here: not a module).
    assert _path_load_code(svc.endpoint, secret) == "INVALID_MODULE"


def test_a_client_socket_others_may_write_is_not_trusted(tmp_path: Path):
    """A client socket anyone may write (umask 0): whoever can enter its directory can
    connect, so the server opens no path a peer names, even for root. As root the workers'
    group (nobody's) may enter it: connected as nobody, a load by path is FORBIDDEN."""
    secret = tmp_path / "secret.wat"
    secret.write_bytes(b"root:SECRET:0:0\n")
    svc = start_service(workers=1, preexec_fn=lambda: os.umask(0))
    try:
        front = Path(svc.endpoint[len("ipc://"):])
        assert stat.S_IMODE(front.stat().st_mode) == 0o777
        assert _path_load_code(svc.endpoint, secret) == "FORBIDDEN"
        if AS_ROOT:
            assert _as_nobody(svc.endpoint, secret) == {"connect": "allowed",
                                                         "code": "FORBIDDEN"}
    finally:
        svc.cleanup()


@pytest.mark.skipif(not AS_ROOT, reason="blobs are shared only with workers of another user")
def test_blobs_are_readable_by_the_workers_group_only_while_it_is_used(tmp_path: Path):
    workdir = Path(tempfile.mkdtemp(prefix="wcb", dir="/tmp"))
    blobs = workdir / "data" / "blobs"
    try:
        svc = start_service(workers=1, workdir=workdir)
        try:
            with svc.client() as client:
                sha = client.load(PLUGINS / "uppercase.wat").sha256
                assert client.execute(client.list()[0].binary_id, "ab").output == b"AB"
        finally:
            svc.stop()
        blob = blobs / sha[:2] / sha
        for path, mode in ((blobs, 0o2750), (blob.parent, 0o2750), (blob, 0o640)):
            info = path.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_gid) == (mode, NOBODY.pw_gid), path
        # The same data without the user switch: the group's access is taken back.
        svc = start_service(workers=1, workdir=workdir, config={"sandbox": {"user": ""}})
        try:
            with svc.client() as client:
                assert client.execute(client.list()[0].binary_id, "cd").output == b"CD"
        finally:
            svc.stop()
        for path, mode in ((blobs, 0o700), (blob.parent, 0o700), (blob, 0o600)):
            assert stat.S_IMODE(path.stat().st_mode) == mode, path
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(Path("/dev/shm") / workdir.name, ignore_errors=True)
