"""Quick start: alice sends bob a message with the imclient SDK.

    pip install ./sdk/python        # or use the repository's .venv
    make run                        # a local stack (gateway on 127.0.0.1:17000)
    python examples/quickstart.py

IM_ADDRESS names the gateway (host:port), IM_GATEWAY_TOKEN_SECRET the secret the
gateways check tokens with (default: the dev secret `make run` uses).
"""

import asyncio
import os

from imclient import Client, direct_conversation_id
from imclient.tokens import DEV_TOKEN_SECRET, mint_token

ADDRESS = os.environ.get("IM_ADDRESS", "127.0.0.1:17000")
SECRET = os.environ.get("IM_GATEWAY_TOKEN_SECRET", DEV_TOKEN_SECRET)


def token_for(user_id: str, device_id: str) -> str:
    # This runs on your app's backend, never in the client: after signing the
    # user in its own way, the backend mints a short-lived token with the secret
    # it shares with the gateways and hands the token to the client.
    return mint_token(SECRET, user_id, device_id, ttl_s=3600)


async def main() -> None:
    # Each Client is one device's connection. `async with` returns once it is
    # connected and has synced its timeline; pass store=SQLiteStore("bob.db") to
    # keep its cursor and unsent messages across restarts.
    # insecure=True: the local stack of `make run` is plaintext. Against a TLS
    # gateway leave it out (the system's CAs are trusted), or pass
    # tls=TLSConfig(ca_file=..., server_name=...) for a private CA.
    async with (
        Client(ADDRESS, token_for("alice", "laptop"), insecure=True) as alice,
        Client(ADDRESS, token_for("bob", "phone"), insecure=True) as bob,
    ):
        ack = await alice.send(direct_conversation_id("alice", "bob"), "hello bob")
        print(f"alice sent msg_id {ack.msg_id}: stored, it will reach bob")
        async for msg in bob.messages():  # bob's timeline: in order, each message once
            if msg.msg_id == ack.msg_id:  # (earlier runs left older messages)
                print(f"bob received from {msg.sender_id}: {msg.text}")
                break


if __name__ == "__main__":
    asyncio.run(main())
