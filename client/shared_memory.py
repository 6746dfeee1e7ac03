"""`SharedMemory`: the client's segments in the server's shared-memory directory. It knows
segments, not replies: the execute operation (`operations`) says when a lent one comes back.
"""

from __future__ import annotations

import mmap
import os
import stat
import weakref

from wasmcore.protocol import messages as p
from wasmcore.protocol import shm
from wasmcore.protocol.errors import Unavailable
from wasmcore.protocol.shm import ShmRef


class SharedMemory:
    """The client's side of shared-memory payloads, settled once per client by `hello`.

    Used only when the server's boot id matches this host's and its segment directory is
    writable here. This client creates its segments (named for its own pid) and removes them;
    the server never creates one for it. Every execute lends the worker a segment for a large
    output, which overwrites it in place once the input is read: the input's own segment when
    the input is large, else a spare one from a small free list, else a new empty one. Reused
    tmpfs pages cost no allocation, zeroing or freeing. A segment goes back to the free list
    (at most `_KEEP` of them) only after a successful reply (the worker is then done with it);
    after anything else it is removed. A `zero_copy` output is a read-only view of its
    segment's mapping: the segment returns to the free list when the caller drops the last
    reference to that view. Whatever a crash leaves behind, the server sweeps (segments carry
    this process's pid).
    """

    _KEEP = 4

    def __init__(self, welcome: p.Welcome, zero_copy: bool = False) -> None:
        self.pid = os.getpid()
        self.zero_copy = zero_copy
        self.directory: str | None = None
        self.threshold = welcome.shm_threshold_bytes
        if (welcome.shm_dir and welcome.boot_id and welcome.boot_id == shm.boot_id()
                and os.access(welcome.shm_dir, os.W_OK)):
            self.directory = welcome.shm_dir
        self._free: list[str] = []
        self._lent: set[str] = set()  # lent to requests in flight
        self._viewed: set[str] = set()  # behind zero-copy views the caller still holds
        # Writable mappings of this client's segments, kept while a segment is kept: copying
        # 16 MiB into an existing mapping took 1.6-1.8 ms of CPU against 3.5-4.0 ms for
        # `pwrite` into the same tmpfs file, and reading into bytes from it likewise beats
        # `pread` (docs/performance.md, "Large payloads"). A new mapping would fault in every
        # page, so one is made once per segment and grown only when a larger payload needs it.
        self._maps: dict[str, mmap.mmap] = {}
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def wants(self, data: bytes) -> bool:
        return self.directory is not None and len(data) >= self.threshold

    def put(self, data: bytes) -> ShmRef:
        assert self.directory is not None
        while self._free:
            name = self._free.pop()
            try:
                return self._overwrite(name, data)
            except (OSError, ValueError):
                self._unmap(name)
                continue  # swept or removed: make a new one
        return shm.write(self.directory, self.pid, data)

    def _overwrite(self, name: str, data: bytes) -> ShmRef:
        """`data` into our free segment `name`, through its kept mapping. Safe from SIGBUS:
        a free segment is lent to no worker, so nothing else resizes it meanwhile, and the
        file is sized before the copy."""
        assert self.directory is not None
        size = len(data)
        fd = os.open(os.path.join(self.directory, name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"segment {name} is not a regular file")
            os.ftruncate(fd, size)
            mapping = self._maps.get(name)
            if size and (mapping is None or len(mapping) < size):
                self._unmap(name)
                mapping = self._maps[name] = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        if size:
            mapping[:size] = data  # type: ignore[index]
        return ShmRef(name=name, size=size)

    def _read(self, ref: ShmRef) -> bytes:
        """The output in our segment `ref`: from its kept mapping when there is one that
        covers it (the file checked to be exactly `ref.size` first: the worker that wrote it
        is done, so nothing resizes it meanwhile), else with `pread`."""
        assert self.directory is not None
        mapping = self._maps.get(ref.name)
        if mapping is None or len(mapping) < ref.size or not ref.size:
            return shm.read(self.directory, ref)
        fd = os.open(os.path.join(self.directory, ref.name), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != ref.size:
            return shm.read(self.directory, ref)  # refuses it with the reason
        return mapping[:ref.size]

    def _unmap(self, name: str) -> None:
        mapping = self._maps.pop(name, None)
        if mapping is not None:
            mapping.close()

    def attach(self, request: p.Execute, data: bytes) -> tuple[bytes | None, str]:
        """Ready `request` for shared memory. Returns (the inline payload, or None when the
        input went into a segment; the name of the segment lent to the request, or "").
        Once the request is over, hand that name to `release`: reusable only after a
        successful reply, when the worker is done with the segment."""
        if self.directory is None:
            return data, ""
        if not self._free and len(self._lent) + len(self._viewed) >= self._KEEP:
            if len(data) < self.threshold:
                return data, ""  # small, and no segment to lend (see `_spare`)
        if self.wants(data):
            request.input_shm = self.put(data)
            lent, payload = request.input_shm.name, None
        else:
            lent, payload = self._spare(), data
        if lent:
            self._lent.add(lent)
            request.output_shm_into = lent
        return payload, lent

    def _spare(self) -> str:
        """A segment to lend for a large output: a free one, else a new empty one while this
        client holds fewer than its keep (`_KEEP`) of them; else "": a large output then comes
        back inline. Bounded because most requests' outputs are small: creating and removing
        a file for each of 512 requests in flight cost a third of the throughput (measured,
        35k -> 24k executions/s), while a few segments, returned after each reply, serve the
        requests whose outputs are large."""
        if self._free:
            return self._free.pop()
        if len(self._lent) + len(self._viewed) >= self._KEEP:
            return ""
        assert self.directory is not None
        try:
            return shm.write(self.directory, self.pid, b"").name
        except OSError:
            return ""

    def release(self, name: str, reusable: bool = False) -> None:
        if self.directory is None or not name:
            return
        self._lent.discard(name)
        if name not in self._viewed:  # else it comes back when its view is dropped
            self._keep(name, reusable)

    def _keep(self, name: str, reusable: bool) -> None:
        assert self.directory is not None
        if reusable and not self._closed and len(self._free) < self._KEEP:
            self._free.append(name)
        else:
            self._unmap(name)
            shm.remove(self.directory, name)

    def take_output(self, ref: ShmRef) -> bytes:
        """The output in `ref`, a segment lent to the request (`release` takes it back)."""
        if self.directory is None or ref.name not in self._lent:
            raise Unavailable(f"the server answered with segment {ref.name!r}, which this "
                              "client did not lend; its output is lost")
        if self.zero_copy:
            return self._view(ref)  # type: ignore[return-value]
        return self._read(ref)

    def _view(self, ref: ShmRef) -> memoryview:
        assert self.directory is not None
        region = shm.map_readonly(self.directory, ref)
        if region is None:
            return memoryview(b"")
        self._viewed.add(ref.name)
        weakref.finalize(region, self._view_dropped, ref.name)
        return memoryview(region)

    def _view_dropped(self, name: str) -> None:
        self._viewed.discard(name)
        if name not in self._lent:
            self._keep(name, True)

    def close(self) -> None:
        self._closed = True
        if self.directory is not None:
            # Views still held stay readable: a mapping outlives its name.
            for name in [*self._free, *self._viewed]:
                shm.remove(self.directory, name)
        for name in list(self._maps):
            self._unmap(name)
        self._free.clear()
