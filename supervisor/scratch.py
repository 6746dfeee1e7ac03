"""Where workers make the WASI scratch directories of their executions (sandbox_worker/wasi.py).

One directory per service, `<data_dir>/scratch`: a worker keeps one directory below it
(`s<worker pid>-<random>`, mode 0700), empty between executions and emptied after each. A
worker that dies leaves its directory behind, possibly full (killed in the middle of an
execution): the supervisor removes the directories of workers that are gone (`ScratchSweep`,
off the loop) and empties the root at start, before any worker runs.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wasmcore.supervisor.config import Config

_NAME = re.compile(r"^s([0-9]{1,10})-[0-9a-f]+$")
Offload = Callable[[Callable[[], Any], Callable[[Any, BaseException | None], None]], None]


def scratch_root(config: Config) -> str:
    return str(Path(config.server.data_dir) / "scratch")


def prepare_scratch_root(config: Config) -> str:
    """Create the root (owner only until Confinement shares it) and remove what earlier runs
    of the service left in it. At start only: no worker may be using it."""
    root = Path(scratch_root(config))
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass
    return str(root)


class ScratchSweep:
    """Removes the scratch directories of workers that are gone. `sweep` runs on the loop:
    it only lists the root (one entry per worker) and hands each removal to `offload`."""

    def __init__(self, root: str, offload: Offload) -> None:
        self._root = root
        self._offload = offload
        self._removing: set[str] = set()

    def sweep(self) -> None:
        try:
            with os.scandir(self._root) as entries:
                names = [entry.name for entry in entries]
        except OSError:
            return
        for name in names:
            found = _NAME.match(name)
            path = os.path.join(self._root, name)
            if found is None or path in self._removing or _alive(int(found.group(1))):
                continue
            self._removing.add(path)
            self._offload(lambda path=path: shutil.rmtree(path, ignore_errors=True),
                          lambda _result, _error, path=path: self._removing.discard(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or not a pid: left alone)
    return pid > 0
