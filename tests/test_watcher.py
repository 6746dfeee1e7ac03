"""The file watcher on its own: what it reports, that it sleeps while nothing changes, and
that it stops at once."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from wasmcore.supervisor.watcher import FileWatcher

ADDRESS = "inproc://test-watch"


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[FileWatcher, zmq.Socket[bytes], Path]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    events = ctx.socket(zmq.PAIR)
    events.bind(ADDRESS)
    watcher = FileWatcher(ctx, ADDRESS)
    target = tmp_path / "live.wasm"
    target.write_bytes(b"v1")
    watcher.set_files({str(target)})
    try:
        yield watcher, events, target
    finally:
        watcher.stop()
        events.close(linger=0)
        ctx.term()


def next_path(events: zmq.Socket[bytes], timeout_ms: int = 10_000) -> str:
    assert events.poll(timeout_ms), "no change reported"
    return events.recv_string()


def watcher_thread() -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == "wasm-core-watch")


def context_switches(thread: threading.Thread) -> int:
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


def test_reports_in_place_writes_and_renames_of_watched_files_only(watched):
    watcher, events, target = watched
    assert next_path(events) == str(target)  # every file is offered once when set up
    target.write_bytes(b"v2")
    assert next_path(events) == str(target)
    (target.parent / "other.wasm").write_bytes(b"not watched")
    temp = target.parent / ".live.wasm.swp"
    temp.write_bytes(b"v3")
    os.replace(temp, target)
    assert next_path(events) == str(target)
    os.unlink(target)  # a deletion is no change to load
    assert not events.poll(300)


def test_follows_a_new_directory(watched, tmp_path: Path):
    watcher, events, target = watched
    assert next_path(events) == str(target)
    elsewhere = tmp_path / "sub" / "moved.wasm"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"v1")
    watcher.set_files({str(elsewhere)})
    assert next_path(events) == str(elsewhere)  # offered once in its new directory
    elsewhere.write_bytes(b"v2")
    assert next_path(events) == str(elsewhere)


def test_does_not_wake_while_nothing_changes(watched):
    watcher, events, target = watched
    assert next_path(events) == str(target)  # set up
    thread = watcher_thread()
    before = context_switches(thread)
    assert not events.poll(1000)
    # A thread blocked until an event wakes for none of them (a polling loop wakes ~100
    # times a second): a couple at most, for a late start-up step.
    assert context_switches(thread) - before <= 2


def test_stop_ends_the_thread_at_once(watched):
    watcher, events, target = watched
    assert next_path(events) == str(target)
    thread = watcher_thread()
    watcher.stop()
    assert not thread.is_alive()


def test_a_directory_removed_and_made_again_is_watched_again(watched):
    watcher, events, target = watched
    assert next_path(events) == str(target)
    shutil.rmtree(target.parent)
    target.parent.mkdir()
    target.write_bytes(b"v2")
    assert next_path(events) == str(target)  # offered again once its directory is back
    target.write_bytes(b"v3")
    assert next_path(events) == str(target)
