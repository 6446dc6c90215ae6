"""The Node gRPC client (clients/node-grpc, @grpc/grpc-js and no Python) against the
real stack: a device stream per user, 20 sends, pushes and ACKs, Sync paging, and
seqsvc. The assertions are in clients/node-grpc/test/; this test starts the stack,
hands node the addresses and tokens, and fails if node's test runner does (or runs
no test at all)."""

from __future__ import annotations

import os
import re
import subprocess
import uuid

from node_support import ROOT, needs_node, npm_ci

from imdev.stack import Stack

CLIENT = ROOT / "clients" / "node-grpc"

pytestmark = needs_node


def _count(output: str, what: str) -> int:
    match = re.search(rf"^# {what} (\d+)$", output, re.MULTILINE)
    assert match, f"node --test printed no '# {what}' line:\n{output}"
    return int(match.group(1))


def test_node_grpc_client_against_the_stack(stack: Stack) -> None:
    npm_ci(CLIENT)
    tag = uuid.uuid4().hex[:8]
    user_a, user_b = f"node_a_{tag}", f"node_b_{tag}"
    env = {
        **os.environ,
        "IM_GATEWAY_ADDRESS": stack.gateway_addresses[0],
        "IM_SEQSVC_ADDRESS": stack.seqsvc.address,
        "IM_INSECURE": "1",
        "IM_USER_A": user_a,
        "IM_TOKEN_A": stack.mint(user_a, "node-a"),
        "IM_USER_B": user_b,
        "IM_TOKEN_B": stack.mint(user_b, "node-b"),
    }
    result = subprocess.run(
        ["node", "--test", "--test-reporter=tap", "test/stack.test.js"],
        cwd=CLIENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    print(output)  # node's own report, shown with -s or on failure
    assert result.returncode == 0, output
    assert _count(output, "fail") == 0, output
    assert _count(output, "skipped") == 0, output
    assert _count(output, "pass") >= 5, output
