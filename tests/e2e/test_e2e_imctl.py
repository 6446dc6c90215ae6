"""`python -m imctl` as a user runs it, against the real stack: two terminals
chatting, send/sync/history, groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_support import uid

from imclient import direct_conversation_id
from imdev.servers import ROOT
from imdev.stack import Stack


@pytest.fixture
def imctl(stack: Stack, tmp_path: Path):  # type: ignore[no-untyped-def]
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in ("services", "libs", "gen")),
        IM_ADDRESS=",".join(stack.gateway_addresses),
        IM_GATEWAY_TOKEN_SECRET=stack.token_secret,
        IMCTL_STATE_DIR=str(tmp_path / "imctl-state"),
        IMCTL_PLAINTEXT="1",  # the test stack's gateways are plaintext
    )

    def start(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "imctl", *args],
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(*args: str, input: str | None = None, timeout: float = 30) -> str:
        proc = start(*args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL)
        out, err = proc.communicate(input, timeout=timeout)
        assert proc.returncode == 0, f"imctl {' '.join(args)} failed: {err}"
        return out

    run.start = start  # type: ignore[attr-defined]
    return run


def json_lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_two_terminals_chatting(imctl) -> None:  # type: ignore[no-untyped-def]
    alice, bob = uid("alice"), uid("bob")
    lines = ["hi bob", "how are you?", "bye"]
    # Terminal 1: bob waits for three messages.
    listener = imctl.start("listen", "--user", bob, "--count", "3", "--json")
    try:
        # Terminal 2: alice types three lines (from a pipe) into a chat.
        imctl("chat", "--user", alice, "--to", bob, input="\n".join(lines) + "\n")
        out, err = listener.communicate(timeout=30)
    finally:
        listener.kill()
    assert listener.returncode == 0, err
    got = json_lines(out)
    assert [m["text"] for m in got] == lines
    assert {m["sender_id"] for m in got} == {alice}
    assert {m["conversation_id"] for m in got} == {direct_conversation_id(alice, bob)}
    # Bob answers in his own chat; alice's lines are shown to him, his are not echoed.
    out = imctl("chat", "--user", bob, "--to", alice, "--json", "--memory", input="fine, bye\n")
    assert [m["text"] for m in json_lines(out)] == lines
    history = json_lines(
        imctl("history", "--user", alice, direct_conversation_id(alice, bob), "--json")
    )
    assert [m["text"] for m in history] == [*lines, "fine, bye"]


def test_listen_resumes_where_it_stopped(imctl) -> None:  # type: ignore[no-untyped-def]
    alice, bob = uid("alice"), uid("bob")
    for text in ["one", "two"]:
        assert "sent to" in imctl("send", "--user", alice, "--to", bob, text)
    first = json_lines(imctl("listen", "--user", bob, "--count", "2", "--json"))
    assert [m["text"] for m in first] == ["one", "two"]
    imctl("send", "--user", alice, "--to", bob, "three")
    again = json_lines(imctl("listen", "--user", bob, "--count", "1", "--json"))
    assert [m["text"] for m in again] == ["three"]  # the cursor was kept on disk
    synced = json_lines(imctl("sync", "--user", bob, "--all", "--json"))
    assert [m["text"] for m in synced] == ["one", "two", "three"]
    assert [m["seq"] for m in synced] == sorted(int(m["seq"]) for m in synced)  # type: ignore[call-overload]


def test_groups(imctl) -> None:  # type: ignore[no-untyped-def]
    owner, bob, carol = uid("owner"), uid("bob"), uid("carol")
    (group,) = json_lines(imctl("group", "create", "--user", owner, "team", bob, "--json"))
    gid = str(group["conversation_id"])
    assert gid.startswith("g:") and set(group["member_ids"]) == {owner, bob}  # type: ignore[arg-type]
    (group,) = json_lines(imctl("group", "add", "--user", owner, gid, carol, "--json"))
    assert carol in group["member_ids"]  # type: ignore[operator]
    listed = json_lines(imctl("group", "list", "--user", carol, "--json"))
    assert gid in [c["conversation_id"] for c in listed]
    imctl("send", "--user", bob, "-c", gid, "hello team")
    history = json_lines(imctl("history", "--user", carol, gid, "--json"))
    assert [m["text"] for m in history] == ["hello team"]
    (group,) = json_lines(imctl("group", "remove", "--user", owner, gid, carol, "--json"))
    assert carol not in group["member_ids"]  # type: ignore[operator]


def test_bad_token_is_a_clear_error(imctl) -> None:  # type: ignore[no-untyped-def]
    proc = imctl.start("sync", "--token", "not-a-token")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "UNAUTHENTICATED" in err
