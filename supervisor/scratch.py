"""Where workers make the WASI scratch directories of their executions (sandbox_worker/wasi.py).

One directory per service, `<data_dir>/scratch`: each execution that gets a scratch directory
creates its own below it (random name, mode 0700) and removes it when it ends. A worker killed
in the middle of an execution cannot remove its own, so the supervisor empties the root at
start, before any worker runs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from wasmcore.supervisor.config import Config


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
