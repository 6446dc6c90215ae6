"""A TCP proxy per client and gateway, so the harness can cut a client's
connection the way a network does: both directions reset at once, mid-frame,
with no goodbye from either side.

Every workload device talks to the gateways only through its own proxies, so
`cut()` hits exactly that device's stream (and the unary calls it shares the
HTTP/2 connection with).
"""

from __future__ import annotations

import asyncio
import contextlib

from imdev.servers import free_port


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target` ("host:port"). An async context
    manager; `close()` is idempotent."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target_host, self.target_port = host, int(port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.cuts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        if self._server is not None:
            return
        # free_port() then bind: a tiny race with other binders on this host,
        # accepted in exchange for a stable address across restarts.
        self.port = free_port()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connections(self) -> int:
        return len(self._conns)

    def cut(self) -> int:
        """Resets every connection through this proxy. Returns how many."""
        n = 0
        for down, up in list(self._conns):
            for w in (down, up):
                w.transport.abort()
            n += 1
        self.cuts += n
        return n

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._conns.add(pair)
        a = asyncio.create_task(_pipe(reader, up_writer))
        b = asyncio.create_task(_pipe(up_reader, writer))
        self._tasks |= {a, b}
        try:
            await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in pair:
                w.transport.abort()
            for t in (a, b):
                t.cancel()
            await asyncio.gather(a, b, return_exceptions=True)
            self._tasks -= {a, b}
            self._conns.discard(pair)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while True:
            data = await src.read(65536)
            if not data:
                return
            dst.write(data)
            await dst.drain()
