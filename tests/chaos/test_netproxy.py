"""The per-device TCP proxy: forwards both ways, and `cut()` resets live
connections (the peer sees the connection die) while new ones still work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from chaos.netproxy import TcpProxy
from imdev.servers import free_port


@pytest.fixture
async def echo_server() -> AsyncIterator[str]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}"
    server.close()
    await server.wait_closed()


async def roundtrip(
    address: str, payload: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    return reader, writer


async def test_forwards_and_cut_resets_live_connections(echo_server: str) -> None:
    async with TcpProxy(echo_server) as proxy:
        reader, writer = await roundtrip(proxy.address, b"hello" * 1000)
        assert proxy.connections == 1
        assert proxy.cut() == 1
        # The client sees its connection die: EOF or a reset, never more data.
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(1024), 5) == b""
        writer.close()
        # A new connection through the same proxy works.
        _, w2 = await roundtrip(proxy.address, b"again")
        w2.close()
        assert proxy.cuts == 1


async def test_a_dead_target_closes_the_client_connection() -> None:
    async with TcpProxy(f"127.0.0.1:{free_port()}") as proxy:  # nothing listens there
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(1024), 5) == b""
        writer.close()
        assert proxy.connections == 0
