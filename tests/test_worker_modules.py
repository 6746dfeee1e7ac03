"""A worker keeps a bounded number of compiled modules, however many distinct binaries it has
run (issue 11 item 13: every module it ever loaded used to stay, 2,000 binaries grew its RSS
35 -> 87 MiB). A real Worker driven through its command handling, with a ROUTER standing in
for the supervisor; modules are counted by weak references to their wasmtime Modules."""

from __future__ import annotations

import gc
import hashlib
import os
import tempfile
import weakref
from pathlib import Path

import pytest
import zmq

from tests.conftest import PLUGINS
from wasmcore.protocol import messages as p
from wasmcore.protocol.settings import SandboxConfig, WorkerSettings
from wasmcore.sandbox_worker.worker import Worker

CACHE = 4
DISTINCT = 24


@pytest.fixture
def worker_and_supervisor():
    tmp = Path(tempfile.mkdtemp(prefix="wc", dir="/tmp"))
    back = f"ipc://{tmp}/back"
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(back)
    settings = WorkerSettings(worker_id="wtest", back_endpoint=back,
                              pub_endpoint=f"ipc://{tmp}/pub", parent_pid=os.getpid(),
                              sandbox=SandboxConfig(cache_size=CACHE))
    worker = Worker(settings)
    try:
        yield worker, router, tmp
    finally:
        worker.close()
        router.close()
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()


def _distinct_module(tmp: Path, index: int) -> p.ModuleRef:
    """The uppercase plugin made distinct by a trailing comment: another sha256, another
    binary as far as anyone can tell."""
    wat = (PLUGINS / "uppercase.wat").read_bytes() + f"\n;; variant {index}\n".encode()
    sha = hashlib.sha256(wat).hexdigest()
    blob = tmp / f"{sha}.wat"
    blob.write_bytes(wat)
    return p.ModuleRef(binary_id=f"b{index}", version=1, sha256=sha, blob_path=str(blob),
                       artifact_path=str(tmp / f"{sha}.cwasm"))


def _replies(router: zmq.Socket) -> list[list[bytes]]:
    out = []
    while router.poll(5_000 if not out else 50):
        out.append(router.recv_multipart())
    return out


def test_worker_keeps_no_more_modules_than_its_cache(worker_and_supervisor) -> None:
    worker, router, tmp = worker_and_supervisor
    alive: list[weakref.ref] = []
    for index in range(DISTINCT):
        ref = _distinct_module(tmp, index)
        if index % 2:  # a load: compiled, its artifact written for the other workers
            command = p.CompileJob(token=index, request_id=index, module=ref)
            worker._handle([zmq.Frame(p.encode(command))])
        else:  # a run of a binary this worker has not seen: compiled from its blob
            job = p.RunJob(token=index, request_id=index, modules=[ref], timeout_ms=1000,
                           fuel=10**9, memory_bytes=16 << 20)
            worker._handle([zmq.Frame(p.encode(job)), zmq.Frame(b"abc")])
        worker._flush()
        alive.append(weakref.ref(worker.sandbox.compile(Path(ref.blob_path).read_bytes())
                                 .module))
    replies = _replies(router)
    assert len(replies) >= DISTINCT // 2  # run replies may come packed
    gc.collect()
    retained = sum(1 for r in alive if r() is not None)
    assert retained <= CACHE, f"{retained} of {DISTINCT} modules still held"


def test_removed_broadcast_drops_a_module(worker_and_supervisor) -> None:
    """A module unloaded everywhere (Broadcast removed) is not kept by the worker."""
    worker, _, tmp = worker_and_supervisor
    ref = _distinct_module(tmp, 0)
    held = weakref.ref(worker._module(ref).module)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(worker.settings.pub_endpoint)
    try:
        message = p.encode(p.Broadcast(sha256=ref.sha256, artifact_path="", removed=True))
        for _ in range(200):  # a SUB joins late: publish until it has seen one
            pub.send(message)
            if worker.sub.poll(20):
                break
        worker._drain_broadcasts()
    finally:
        pub.close()
    gc.collect()
    assert held() is None
