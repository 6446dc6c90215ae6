"""`python -m imctl` as a user runs it, against the real stack: two terminals
chatting, send/sync/history, groups; a wrong address fails fast with the reason;
commands of one user run side by side (each kind its own device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest
from e2e_support import uid

from imclient import direct_conversation_id
from imclient.tokens import ID_PATTERN
from imctl.cli import build_parser, chat_device, device_of
from imdev.servers import ROOT, free_port
from imdev.stack import Stack

#: How long a streaming command may take to give up on an address where nothing
#: listens: its --connect-timeout (5 s) plus the interpreter's start-up, with room
#: for a loaded machine (12.8 s seen with load 9 on 2 cores). Without the timeout it
#: would retry until the test's own 60 s limit.
REFUSED_WITHIN_S = 25.0


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


class Lines:
    """Reads a child's pipe in a thread, so a test can wait for a line."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, needle: str, timeout: float) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if needle in line), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no line with {needle!r} after {timeout}s: {self.lines}")
            line = found()
        assert line is not None
        return line

    @property
    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)


def test_a_refused_connection_fails_fast_with_the_reason(imctl) -> None:  # type: ignore[no-untyped-def]
    address = f"127.0.0.1:{free_port()}"  # nothing listens here
    commands = [
        ["listen", "--user", "nobody"],
        ["chat", "--user", "nobody", "--to", "somebody"],
        ["send", "--user", "nobody", "--to", "somebody", "hi"],
        ["sync", "--user", "nobody"],
    ]
    started = time.monotonic()
    procs = [imctl.start(*args, "--address", address) for args in commands]
    for args, proc in zip(commands, procs, strict=True):
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - started
        assert proc.returncode == 1, f"imctl {args[0]}: {err}"
        assert f"UNAVAILABLE: connection refused at {address}" in err, f"imctl {args[0]}: {err}"
        assert elapsed < REFUSED_WITHIN_S, f"imctl {args[0]} took {elapsed:.1f} s"


def test_commands_of_one_user_do_not_kick_each_other(imctl) -> None:  # type: ignore[no-untyped-def]
    """chat, listen and send of bob at once: each kind connects as its own
    device, so none replaces another's stream (before, listen and chat were
    both device `cli` and the second kicked the first)."""
    alice, bob = uid("alice"), uid("bob")
    chat = imctl.start("chat", "--user", bob, "--to", alice, "--json", stdin=subprocess.PIPE)
    listener = None
    try:
        chat_out, chat_err = Lines(chat.stdout), Lines(chat.stderr)
        chat_err.wait_for("chatting in", 30)
        listener = imctl.start("listen", "--user", bob, "--count", "2")
        listen_err = Lines(listener.stderr)
        listen_err.wait_for("listening as", 30)
        imctl("send", "--user", alice, "--to", bob, "hello bob")
        imctl("send", "--user", bob, "--to", alice, "from bob's other command")
        out, _ = listener.communicate(timeout=30)
        assert listener.returncode == 0, listen_err.text
        assert "hello bob" in out and "from bob's other command" in out
        assert json.loads(chat_out.wait_for("hello bob", 30))["sender_id"] == alice
        chat_out.wait_for("from bob's other command", 30)
        assert chat.stdin is not None
        chat.stdin.close()
        assert chat.wait(timeout=30) == 0, chat_err.text
        assert "kick" not in chat_err.text + listen_err.text
    finally:
        chat.kill()
        if listener is not None:
            listener.kill()


def test_each_command_kind_has_its_own_default_device() -> None:
    parse = build_parser().parse_args
    assert device_of(parse(["listen", "--user", "bob"])) == "cli-listen"
    assert device_of(parse(["send", "--user", "bob", "--to", "al", "x"])) == "cli-send"
    assert device_of(parse(["sync", "--user", "bob"])) == "cli"
    assert device_of(parse(["chat", "--user", "bob", "--to", "al"])) == "cli-chat-d.al.bob"
    assert device_of(parse(["listen", "--user", "bob", "--device", "mine"])) == "mine"
    long = chat_device("g:" + "x" * 60)  # too long to spell out: a digest
    assert ID_PATTERN.fullmatch(long) and long.startswith("cli-chat-")
    assert long == chat_device("g:" + "x" * 60) != chat_device("g:" + "y" * 60)
