"""Which test sessions use the test node, kept by the kernel: each holds a shared lock on one file.

A session starting asks, under the decision lock, whether it is alone (wipe a node nobody runs); a session
ending asks whether it was the last (wipe the node). The kernel drops a session's lock when its process
ends, however it ends, so a killed session never counts as a user and a reused pid means nothing. The
first design, a file per session's pid deleted at its end, left a killed session's file behind, and the
fourth 20k world-test run (2026-11-24) lost its node when another session, ending, found no file for it
and wiped the node under it.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import IO


class NodeUsers:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._held: IO[str] | None = None

    @contextlib.contextmanager
    def deciding(self) -> Iterator[None]:
        """One session at a time decides to wipe, start or keep the node: without it a session ending while
        another started deleted the data directory under the node the other one was starting."""
        self._directory.mkdir(parents=True, exist_ok=True)
        with (self._directory / "lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def use(self) -> bool:
        """Registers this session as a user of the node (call while `deciding`); True when no other uses it."""
        assert self._held is None, "this session already uses the node"
        self._directory.mkdir(parents=True, exist_ok=True)
        users = (self._directory / "users").open("a")
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        # Exclusive locks are only taken while deciding, which this session does now: this never waits.
        fcntl.flock(users, fcntl.LOCK_SH)
        self._held = users
        return alone

    def stop_using(self) -> bool:
        """Ends this session's use of the node (call while `deciding`); True when it was the last user."""
        users, self._held = self._held, None
        assert users is not None, "this session does not use the node"
        try:
            # Converting our shared lock to an exclusive one fails while any other session holds one.
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            users.close()
