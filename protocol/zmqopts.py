"""ZeroMQ settings every wasm-core socket shares."""

from __future__ import annotations

import zmq

# A plain int: pyzmq does enum arithmetic on Flag values, measurable per message.
NOBLOCK = int(zmq.NOBLOCK)
# pyzmq's zero-copy sends track each frame through a helper thread; below ~1 MiB a plain copy
# is cheaper (64 KiB frames measured ~0.3 ms slower zero-copy). Set as `socket.copy_threshold`.
COPY_THRESHOLD = 1024 * 1024
