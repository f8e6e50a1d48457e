"""The test node's users are counted by the kernel's locks: the last session ending wipes the node, and a
session killed half way never keeps it from being wiped nor counts as a user."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.node_users import NodeUsers

pytestmark = pytest.mark.unit


def _decide(users: NodeUsers, step: str) -> bool:
    with users.deciding():
        return users.use() if step == "use" else users.stop_using()


def test_the_first_session_is_alone_and_the_last_one_ending_is_the_last(tmp_path: Path) -> None:
    first, second, third = NodeUsers(tmp_path), NodeUsers(tmp_path), NodeUsers(tmp_path)
    assert _decide(first, "use") is True
    assert _decide(second, "use") is False
    assert _decide(first, "stop") is False  # the second one still uses the node
    assert _decide(third, "use") is False
    assert _decide(second, "stop") is False
    assert _decide(third, "stop") is True
    assert _decide(first, "use") is True  # and the next session starts alone again


def test_a_killed_session_does_not_count_as_a_user(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path.cwd())!r})
        from pathlib import Path
        from tests.node_users import NodeUsers
        users = NodeUsers(Path({str(tmp_path)!r}))
        with users.deciding():
            print(users.use(), flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        ours = NodeUsers(tmp_path)
        assert _decide(ours, "use") is False  # the other process uses the node
        holder.kill()
        holder.wait(timeout=30)
        assert _decide(ours, "stop") is True  # killed: no file of its own left behind to count
    finally:
        holder.kill()
        holder.wait(timeout=30)
