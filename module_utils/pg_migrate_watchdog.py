# Copyright: (c) 2026, Stock Monitoring team
# MIT License (see LICENSE)
"""The watchdog: no lock outlives the controller. When ansible-playbook goes away (Ctrl-C, a kill, a closed
SSH session) or a stop signal reaches the module, the running statement is cancelled and the module exits."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def parent_of(pid: int) -> int | None:
    """The parent of a process, or None when it is gone (Linux /proc; elsewhere only our own parent is known)."""
    if pid == os.getpid():
        return os.getppid()
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def controller_chain(controller: int | None) -> list[tuple[int, int]]:
    """(pid, parent) of our process and of each ancestor up to `controller`, the ansible-playbook worker that
    runs this task on a local connection (the action plugin sends its pid): a new parent anywhere on that
    chain means a process between us and ansible-playbook died, the worker's parent ansible-playbook itself
    included. The worker outlives a killed ansible-playbook and keeps reading our stdout, so the pipe alone
    does not tell there. Over SSH the controller is on another machine: no chain, the pipe tells.

    Nothing here depends on process names or on what is above ansible-playbook (nohup, a shell that exits).
    """
    if not controller:
        return []
    chain, pid = [], os.getpid()
    for _ in range(16):
        parent = parent_of(pid)
        if parent is None or parent <= 1:
            return []
        chain.append((pid, parent))
        if pid == controller:
            return chain
        pid = parent
    return []  # not our ancestor: another process namespace (a container), become through a daemon


def controller_gone(fd: int, chain: list[tuple[int, int]]) -> bool:
    """Our stdout lost its reader (signal, closed SSH session), or a process of the controller died."""
    poller = select.poll()
    poller.register(fd, select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0)) or any(parent_of(pid) != parent for pid, parent in chain)


def watch_controller(conn_of: Callable[[], object], controller: int | None, tick: Callable[[], None],
                     cleanup: Callable[[], None], interval: float = 0.5) -> None:
    """Cancel the running statement and exit when the controller goes away, so no lock outlives it.

    Without this, ansible-playbook exits on Ctrl-C while the module's server session runs on to the end
    of its statement, holding the migration lock and the table locks. Cancelling rolls the file back;
    exiting closes the connection, which ends the session and releases the migration lock. `tick` runs
    every interval in a thread of its own (Database.watch_server); `cleanup` runs before the exit (the
    progress file goes).
    """
    fd, chain = sys.stdout.fileno(), controller_chain(controller)

    def cancel_and_exit() -> None:
        conn = conn_of()
        if conn is not None and not conn.closed:
            with contextlib.suppress(Exception):
                conn.cancel()
        with contextlib.suppress(Exception):
            cleanup()
        os._exit(1)

    def watch() -> None:
        while not controller_gone(fd, chain):
            time.sleep(interval)
        cancel_and_exit()

    def watch_server() -> None:  # a thread of its own: a hung server must not delay the checks above
        while True:
            with contextlib.suppress(Exception):  # a connection closed meanwhile: the next tick sees the new one
                tick()
            time.sleep(interval)

    def wait_for_signal() -> None:
        signal.sigwait(STOP_SIGNALS)
        cancel_and_exit()

    # A stop signal sent to the module itself (the worker stopping its children, a process group) is
    # taken by a thread: the main thread sits in libpq until the statement ends and could not act on it.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=watch, name="pg_migrate-watchdog", daemon=True).start()
    threading.Thread(target=watch_server, name="pg_migrate-server-watch", daemon=True).start()
    threading.Thread(target=wait_for_signal, name="pg_migrate-signals", daemon=True).start()
