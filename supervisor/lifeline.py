"""End the service when the process that launched it dies (`wasm-core --exit-with-fd FD`).

The launcher (wasmcore.client.launcher.start_service) keeps the write end of a pipe and hands
the read end to the supervisor. Nothing is ever written: the read blocks until every write end
is closed, which the kernel does when the launcher process exits, however it exits (SIGKILL
included). A pipe, unlike PR_SET_PDEATHSIG, follows the launching *process*, not the thread that
forked: a launcher that starts the service from a short-lived thread keeps it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("wasmcore.supervisor.lifeline")


def exit_when_closed(fd: int) -> None:
    """Drain and stop the service, as SIGTERM does, once `fd` reads end of file. The wait is a
    blocking read on a thread of its own: no wake-ups while the launcher lives."""
    os.set_inheritable(fd, False)  # the workers must not hold it (nor need it)
    threading.Thread(target=_wait_for_eof, args=(fd,), name="wasm-core-lifeline",
                     daemon=True).start()


def _wait_for_eof(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass  # a launcher has nothing to say; ignore anything it writes
    except OSError as exc:
        log.warning("launcher pipe: %s; stopping as if the launcher had exited", exc)
    finally:
        os.close(fd)
    log.warning("the process that launched this service exited: stopping")
    os.kill(os.getpid(), signal.SIGTERM)
