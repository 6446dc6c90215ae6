"""A tiny "app" for the outbox crash tests, run as a child process that the test
kills with SIGKILL: it uses the SDK with an SQLiteStore file, submits `--count`
messages in chunks, and appends to a JSON-lines log (flushed per line, so a
kill -9 loses nothing it wrote):

- {"event": "submit", "cmid", "body"}   before each submit() call
- {"event": "durable", "upto": n}       after `await client.persisted()` for the
                                        first n of this process's messages
- {"event": "outcome", "cmid", "acked", "msg_id", "restored", "duplicate", "code"}
                                        from on_send_result (restored messages too)
- {"event": "done"}                     once everything is acknowledged or failed

Usage: python outbox_app.py GATEWAYS TOKEN STORE CONV PREFIX COUNT LOG [CHUNK]
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any, TextIO

from imclient import Client, SendOutcome, SQLiteStore


def _writer(log: TextIO) -> Any:
    def write(record: dict[str, Any]) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    return write


def main(argv: list[str]) -> int:
    # The log is the app's own record; opened here, written from the loop.
    with open(argv[6], "a", encoding="utf-8") as log:
        return asyncio.run(run(argv, _writer(log)))


async def run(argv: list[str], write: Any) -> int:
    gateways, token, store_path, conv, prefix, count_s = argv[:6]
    chunk = int(argv[7]) if len(argv) > 7 else 10
    count = int(count_s)

    def on_send_result(o: SendOutcome) -> None:
        write(
            {
                "event": "outcome",
                "cmid": o.client_msg_id,
                "acked": o.acked,
                "msg_id": o.result.msg_id if o.result else 0,
                "restored": o.restored,
                "duplicate": bool(o.result and o.result.duplicate),
                "code": o.error.code.name if o.error else "",
            }
        )

    client = Client(
        gateways.split(","),
        token,
        store=SQLiteStore(store_path),
        on_send_result=on_send_result,
        receive=False,
        connect_timeout_s=60,
        insecure=True,
    )
    async with client:
        for start in range(0, count, chunk):
            for i in range(start, min(start + chunk, count)):
                body = f"{prefix}-{i:05d}"
                cmid = str(uuid.uuid4())
                write({"event": "submit", "cmid": cmid, "body": body})
                client.submit(conv, body, client_msg_id=cmid).add_done_callback(_quiet)
            await client.persisted()
            write({"event": "durable", "upto": min(start + chunk, count)})
            # Spread the sends over time, so a kill lands anywhere.
            await asyncio.sleep(0.01)
        await client.flush()
        write({"event": "done"})
    return 0


def _quiet(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
