"""logic as a team of a seqsvc with namespaces: it sends its token
(IM_LOGIC_SEQSVC_TOKEN) on every call, and its keys (u:, c:) are its team's."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from logic_support import LogicClient

from imdev.servers import ServiceProcess, free_port
from seqsvc.teams import hash_token

TOKEN = "logic-test-token"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


@pytest.fixture
def seqsvc(spawn: Callable[..., ServiceProcess], pg_dsn: str, tmp_path: Path) -> ServiceProcess:
    teams = tmp_path / "teams.yaml"
    teams.write_text(
        json.dumps(
            {
                "teams": [
                    {
                        "name": "im-logic",
                        "token_sha256": hash_token(TOKEN),
                        "prefixes": ["u:", "c:"],
                    },
                    {"name": "other", "token_sha256": hash_token("x"), "prefixes": ["o:"]},
                ]
            }
        )
    )
    return spawn(
        "seqsvc",
        {
            "IM_SEQSVC_DATABASE_URL": pg_dsn,
            "IM_SEQSVC_TEAMS_FILE": str(teams),
            "IM_SEQSVC_METRICS_PORT": str(free_port()),
        },
    )


@pytest.fixture
def logic_env(logic_env: dict[str, str]) -> dict[str, str]:
    return {**logic_env, "IM_LOGIC_SEQSVC_TOKEN": TOKEN}


async def test_logic_calls_seqsvc_as_its_team(client: LogicClient, seqsvc: ServiceProcess) -> None:
    resp = await client.send("alice", "d:alice:bob")
    assert resp.conv_seq > 0
    port = seqsvc.extra_env["IM_SEQSVC_METRICS_PORT"]
    text = await asyncio.to_thread(scrape, int(port))
    calls = [
        line
        for line in text.splitlines()
        if line.startswith('im_seqsvc_team_calls_total{team="im-logic"}')
    ]
    assert calls and float(calls[0].split()[-1]) >= 1, text
    assert 'im_seqsvc_team_refusals_total{reason="unauthenticated",team="(none)"} 0.0' in text
