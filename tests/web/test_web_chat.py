"""The web chat page (web/, on the TypeScript client) in headless Chromium against
the real stack: Debian's chromium driven by Playwright for Python (no browser
download). Two browser contexts, alice and bob, chat; bob goes offline while alice
sends 20 messages and shows them all, exactly once and in order, once back online;
a reload shows no duplicates; messages typed offline are sent once the page is
back, also when the page was closed before that (the outbox is in IndexedDB).

Waits are on what the user sees (Playwright's `expect`), never on sleeps. A failing
test leaves a screenshot of each page in its tmp dir."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_support import ROOT, build_ts_client, needs_node

from imdev.stack import Stack
from imdev.web import DevWebServer, WebConfig

CHROMIUM = Path("/usr/bin/chromium")
#: Without the background-networking flags, chromium on a closed network keeps
#: trying to reach its update and sync services.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "web-chat.png"

# `make test` installs chromium (system-deps) and sets IM_REQUIRE_BROWSER, as CI
# does: there a missing browser is a failure, not a skip.
_required = bool(os.environ.get("IM_REQUIRE_BROWSER") or os.environ.get("CI"))
pytestmark = [
    needs_node,
    pytest.mark.skipif(
        not CHROMIUM.exists() and not _required,
        reason=f"{CHROMIUM} is not installed (`make system-deps` installs Debian's chromium)",
    ),
]

expect: Any = None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    global expect
    from playwright.sync_api import expect as pw_expect
    from playwright.sync_api import sync_playwright

    expect = pw_expect
    expect.set_options(timeout=20_000)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def web(stack: Stack) -> Iterator[str]:
    build_ts_client()
    server = DevWebServer(WebConfig(stack.ws_urls, stack.token_secret))
    server.serve_in_thread()
    yield server.url
    server.shutdown()
    server.server_close()


class Chat:
    """One user's page, driven as a user would."""

    def __init__(self, context: Any, url: str, user: str) -> None:
        self.context = context
        self.url = url
        self.user = user
        self.page = context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(m.text))

    def sign_in(self) -> None:
        self.page.goto(self.url)
        self.page.fill("#user", self.user)
        self.page.click("#signin button[type=submit]")
        expect(self.page.locator("#status")).to_have_attribute("data-state", "online")

    def reopen(self) -> None:
        """A new tab of the same browser profile (same IndexedDB, same sign-in)."""
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.console.append(m.text))
        self.page.goto(self.url)

    def open_chat(self, peer: str) -> None:
        self.page.fill("#peer", peer)
        self.page.click("#newchat button")

    def send(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")

    def texts(self) -> Any:
        return self.page.locator("#messages .msg .text")

    def conversation(self, conv: str) -> Any:
        return self.page.locator(f'#conversations li[data-conv="{conv}"]')


@pytest.fixture
def contexts(browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[Chat]]:
    made: list[Chat] = []
    yield made
    failed = getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed
    if failed:
        for chat in made:
            shot = tmp_path / f"{chat.user}.png"
            try:
                chat.page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of {chat.user}'s page: {shot}")
            except Exception as exc:  # the page may be gone
                print(f"no screenshot of {chat.user}'s page: {exc}")
            print(f"{chat.user}'s console:\n" + "\n".join(chat.console[-50:]))
    for chat in made:
        chat.context.close()


def test_two_users_chat_offline_reload_and_outbox(
    web: str, browser: Any, contexts: list[Chat]
) -> None:
    tag = uuid.uuid4().hex[:6]
    alice = Chat(browser.new_context(viewport={"width": 960, "height": 600}), web, f"alice_{tag}")
    bob = Chat(browser.new_context(viewport={"width": 960, "height": 600}), web, f"bob_{tag}")
    contexts += [alice, bob]
    conv = f"d:{alice.user}:{bob.user}"
    alice.sign_in()
    bob.sign_in()

    alice.open_chat(bob.user)
    alice.send("hi bob")
    expect(alice.page.locator("#messages .msg.mine.sent")).to_have_count(1)
    # Bob's list shows the new conversation with one unread message; opening it
    # shows the history and reads it.
    expect(bob.conversation(conv).locator(".unread")).to_have_text("1")
    bob.conversation(conv).click()
    expect(bob.texts()).to_have_text(["hi bob"])
    expect(bob.conversation(conv).locator(".unread")).to_have_text("")
    bob.send("hi alice")
    expect(alice.texts()).to_have_text(["hi bob", "hi alice"])

    # Bob goes offline; alice sends 20, each acknowledged (durable).
    bob.context.set_offline(True)
    expect(bob.page.locator("#status")).to_have_attribute("data-state", "offline")
    burst = [f"while you were away {i}" for i in range(20)]
    for text in burst:
        alice.send(text)
    expect(alice.page.locator("#messages .msg.mine.sent")).to_have_count(21)
    expect(bob.texts()).to_have_count(2)  # nothing reached the offline page
    # Bob types while offline: kept in the outbox (IndexedDB) until it can go.
    bob.send("typed offline")
    expect(bob.page.locator('#messages .msg.pending[data-saved="1"]')).to_have_count(1)

    bob.context.set_offline(False)
    expect(bob.page.locator("#status")).to_have_attribute("data-state", "online")
    everything = ["hi bob", "hi alice", *burst, "typed offline"]
    expect(bob.texts()).to_have_text(everything)  # all 20, once each, in order
    expect(bob.page.locator("#messages .msg.mine.sent")).to_have_count(2)
    expect(alice.texts()).to_have_text(everything)

    # A reload shows the same conversation: no duplicates.
    bob.page.reload()
    expect(bob.page.locator("#status")).to_have_attribute("data-state", "online")
    expect(bob.texts()).to_have_text(everything)

    # Offline again: a message typed, saved to the outbox, and the page closed
    # before it could be sent. The next page of this browser sends it, once.
    bob.context.set_offline(True)
    expect(bob.page.locator("#status")).to_have_attribute("data-state", "offline")
    bob.send("queued before the tab closed")
    expect(bob.page.locator('#messages .msg.pending[data-saved="1"]')).to_have_count(1)
    bob.page.close()
    bob.context.set_offline(False)
    bob.reopen()
    everything.append("queued before the tab closed")
    expect(bob.texts()).to_have_text(everything)
    expect(bob.page.locator("#messages .msg.pending")).to_have_count(0)
    expect(alice.texts()).to_have_text(everything)
    alice.page.reload()
    expect(alice.texts()).to_have_text(everything)

    if os.environ.get("IM_WEB_SCREENSHOT"):
        alice.page.screenshot(path=str(SCREENSHOT))


def test_web_server_serves_only_its_mounts(web: str) -> None:
    import urllib.error
    import urllib.request

    with urllib.request.urlopen(web + "lib/index.js") as r:
        assert r.headers["Content-Type"] == "text/javascript"
    with urllib.request.urlopen(web + "config.json") as r:
        assert b"wsUrls" in r.read()
    for bad in ("../Makefile", "lib/../../../Makefile", "%2e%2e/Makefile", "dev/token?user=a%20b"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(web + bad)
        assert err.value.code in (400, 404)
    assert shutil.which("node")
