"""The TypeScript client (clients/ts: the device protocol over WebSocket, the same
code that runs in browsers) against the real stack, with node's test runner: two
clients chat, 200 pipelined sends arrive exactly once in order, a connection cut
mid-send loses and duplicates nothing and resends the same client_msg_ids, a lost
push is healed by a sync on the gap, a lost last push by a head, and the outbox
survives a client. The assertions are in clients/ts/test/; this test builds the
client, starts the stack, hands node the WebSocket URL and one token per role, and
fails if node's test runner does (or runs fewer tests than it should)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid

from node_support import build_ts_client, needs_node

from imdev.stack import Stack

pytestmark = needs_node

ROLES = [
    f"{kind}_{side}" for kind in ("chat", "pipe", "cut", "gap", "head", "outbox") for side in "ab"
]


def _count(output: str, what: str) -> int:
    match = re.search(rf"^# {what} (\d+)$", output, re.MULTILINE)
    assert match, f"node --test printed no '# {what}' line:\n{output}"
    return int(match.group(1))


def _node_test(files: list[str], env: dict[str, str]) -> str:
    client = build_ts_client()
    result = subprocess.run(
        ["node", "--test", "--test-reporter=tap", *files],
        cwd=client,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    print(output)  # node's own report, shown with -s or on failure
    assert result.returncode == 0, output
    assert _count(output, "fail") == 0, output
    assert _count(output, "skipped") == 0, output
    return output


def test_ts_client_units() -> None:
    """Receiver and send-window rules, uuid7, MemoryStore and IndexedDBStore (on
    fake-indexeddb): no server needed."""
    output = _node_test(["test/unit.test.mjs"], {})
    assert _count(output, "pass") >= 10, output


def test_ts_client_against_the_stack(stack: Stack) -> None:
    tag = uuid.uuid4().hex[:8]
    users = {}
    for role in ROLES:
        user = f"ts_{role}_{tag}"
        users[role] = {"user": user, "device": "node", "token": stack.mint(user, "node")}
    output = _node_test(
        ["test/stack.test.mjs"],
        {"IM_WS_URLS": ",".join(stack.ws_urls), "IM_USERS": json.dumps(users)},
    )
    assert _count(output, "pass") >= 6, output
