"""A component's `process-file` entry: the input on stdin, the output a file the guest writes
in the execution's scratch directory (wit/wasm-core.wit, world `file-plugin`).

Why a file: wasmtime's WASI stdout takes 4-8 KiB per call at tens of microseconds each, and a
`list<u8>` value crosses the C API one byte at a time; a `wasi:filesystem` `descriptor.write`
moves a whole buffer in one native call. (Stdin already moves in bulk: one `blocking-read`
returns as much as the guest asks for. An input file was measured too: reading it back in
the guest cost about 3x a stdin read, docs/performance.md, "A 1 MiB round trip".)

What the host trusts of the guest: nothing. The guest can put anything at the output's name
(a symlink to a host file, a directory, a file over the output cap), so the host opens it
relative to the directory it made itself (no path walk), with O_NOFOLLOW (a symlink is refused,
never followed), checks that it is a regular file and reads at most its size, checked against
the output cap first.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat

from wasmcore.protocol.errors import PluginError

from .host import HostState, OutputSink, output_limit_error
from .wasi import SCRATCH_GUEST_PATH

OUTPUT_NAME = "output"
OUTPUT_PATH = f"{SCRATCH_GUEST_PATH}/{OUTPUT_NAME}"  # what the guest is told
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should anything but a regular file be there, opening it must not wait.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class FileExchange:
    """The output file of one execution, in its (private, empty) scratch dir."""

    def __init__(self, scratch_path: str) -> None:
        self._dir = os.open(scratch_path, _DIR_FLAGS)

    def close(self) -> None:
        if self._dir >= 0:
            os.close(self._dir)
            self._dir = -1

    def output_size(self) -> int:
        """The size of what is at the output's name now (0: nothing, or not a file)."""
        try:
            info = os.stat(OUTPUT_NAME, dir_fd=self._dir, follow_symlinks=False)
        except OSError:
            return 0
        return info.st_size if stat.S_ISREG(info.st_mode) else 0

    def read_output(self, state: HostState, sink: OutputSink | None) -> None:
        """The output file into `state` (and `sink` once large, as stdout would go). No file:
        an empty output. OUTPUT_LIMIT past the output cap; PLUGIN_ERROR for anything but a
        regular file."""
        try:
            fd = os.open(OUTPUT_NAME, _READ_FLAGS, dir_fd=self._dir)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _not_a_file("a symlink") from None
            raise _not_a_file(f"unreadable ({exc.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _not_a_file("not a regular file")
            if info.st_size > state.output_cap:
                raise output_limit_error(state.output_cap)
            if info.st_size:
                # Mapped read-only with MAP_POPULATE: the page cache's own pages, mapped in one
                # go rather than a page fault per 4 KiB (on this VM those cost as much as the
                # copy); the one copy is into the output segment or the output bytes. Nothing
                # shrinks the file while it is mapped: the guest that wrote it cannot run
                # again, and only this worker's thread touches its scratch directory.
                with mmap.mmap(fd, info.st_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                               prot=mmap.PROT_READ) as mapped, memoryview(mapped) as view:
                    if not state.add_output_buffer(view, sink):
                        raise state.failure or output_limit_error(state.output_cap)
        finally:
            os.close(fd)


def _not_a_file(what: str) -> PluginError:
    message = (f"the plugin's output {OUTPUT_PATH} is {what}: the service reads only a regular "
               "file there; write the output into a new file at the output path")
    return PluginError(message, {"plugin_message": message})
