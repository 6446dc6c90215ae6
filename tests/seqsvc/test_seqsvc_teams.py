"""Team namespaces: the rules (pure, with a fake clock) and a real seqsvc process
with a teams file: tokens, TLS client identities, prefixes, quotas, metrics,
reloads, and the open service without a file."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from tls_support import CertificateAuthority

from imdev.servers import ServiceProcess, free_port
from seqsvc.client import (
    SeqClient,
    SeqInvalidArgument,
    SeqPermissionDenied,
    SeqQuotaExceeded,
    SeqUnauthenticated,
)
from seqsvc.keys import InvalidArgument
from seqsvc.teams import (
    PermissionDenied,
    QuotaExceeded,
    Teams,
    TeamsError,
    TeamsFileWatch,
    Unauthenticated,
    hash_token,
    parse_teams,
)

Spawn = Callable[..., ServiceProcess]

CHAT, JOBS = "chat-token-1", "jobs-token-2"


def teams_doc(**jobs_quota: float) -> dict[str, object]:
    jobs: dict[str, object] = {
        "name": "jobs",
        "token_sha256": hash_token(JOBS),
        "prefixes": ["job:"],
    }
    if jobs_quota:
        jobs["quota"] = jobs_quota
    return {
        "teams": [
            {"name": "chat", "token_sha256": [hash_token(CHAT)], "prefixes": ["u:", "c:"]},
            jobs,
        ]
    }


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the rules ---------------------------------------------------------------------


def test_the_file_is_validated_with_a_message_naming_the_problem() -> None:
    ok = parse_teams(json.dumps(teams_doc(values_per_s=10, burst=20)))
    assert [t.name for t in ok] == ["chat", "jobs"]
    yaml_text = (
        "teams:\n  - name: a\n    token_sha256: " + hash_token("x") + "\n    prefixes: [a/]\n"
    )
    assert parse_teams(yaml_text)[0].prefixes == ["a/"]
    bad = {
        "not a hash": {"teams": [{"name": "a", "token_sha256": "secret", "prefixes": ["a"]}]},
        "overlaps": {
            "teams": [
                {"name": "a", "token_sha256": hash_token("1"), "prefixes": ["u:"]},
                {"name": "b", "token_sha256": hash_token("2"), "prefixes": ["u:al"]},
            ]
        },
        "twice": {
            "teams": [
                {"name": "a", "token_sha256": hash_token("1"), "prefixes": ["a"]},
                {"name": "a", "token_sha256": hash_token("2"), "prefixes": ["b"]},
            ]
        },
        "shares a token": {
            "teams": [
                {"name": "a", "token_sha256": hash_token("1"), "prefixes": ["a"]},
                {"name": "b", "token_sha256": hash_token("1"), "prefixes": ["b"]},
            ]
        },
        "no credential": {"teams": [{"name": "a", "prefixes": ["a"]}]},
        "empty": {"teams": [{"name": "a", "token_sha256": hash_token("1"), "prefixes": [""]}]},
        "unknown field": {"teams": [{"name": "a", "tokens": ["x"], "prefixes": ["a"]}]},
    }
    for why, doc in bad.items():
        with pytest.raises(TeamsError) as err:
            parse_teams(json.dumps(doc), "teams.json")
        assert "teams.json" in str(err.value) and "\n" not in str(err.value), why
    with pytest.raises(TeamsError, match="overlaps 'u:' of team 'a'"):
        parse_teams(json.dumps(bad["overlaps"]))
    with pytest.raises(TeamsError, match="never the token itself"):
        parse_teams(json.dumps(bad["not a hash"]))
    with pytest.raises(TeamsError, match="YAML"):
        parse_teams("teams: [")


def test_admit_credentials_prefixes_and_a_quota_that_refills() -> None:
    clock = Clock()
    teams = Teams(clock)
    assert teams.admit(None, [], ["anything"], 5) is None  # no file: open
    teams.load(parse_teams(json.dumps(teams_doc(values_per_s=10, burst=20))))
    with pytest.raises(Unauthenticated, match="Bearer"):
        teams.admit(None, [], ["u:a"], 1)
    with pytest.raises(Unauthenticated, match="no team"):
        teams.admit("wrong", [], ["u:a"], 1)
    assert teams.anonymous_refusals == 2
    chat = teams.admit(CHAT, [], ["u:a", "c:b"], 2)
    assert chat is not None and chat.name == "chat" and (chat.calls, chat.values) == (1, 2)
    with pytest.raises(PermissionDenied) as denied:
        teams.admit(CHAT, [], ["u:a", "job:1"], 2)
    assert "keys[1] 'job:1'" in str(denied.value) and "['u:', 'c:']" in str(denied.value)
    with pytest.raises(InvalidArgument):  # a bad key stays INVALID_ARGUMENT
        teams.admit(CHAT, [], [""], 1)
    # jobs: 20 at once, then 10 per second.
    jobs = teams.admit(JOBS, [], ["job:1"], 20)
    assert jobs is not None
    with pytest.raises(QuotaExceeded) as over:
        teams.admit(JOBS, [], ["job:1"], 5)
    assert over.value.retry_after_s == pytest.approx(0.5)
    assert "retry in 0.500 s" in str(over.value)
    clock.now += 0.5
    teams.admit(JOBS, [], ["job:1"], 5)
    with pytest.raises(QuotaExceeded) as never:
        teams.admit(JOBS, [], ["job:1"], 21)
    assert never.value.retry_after_s is None and "burst of 20" in str(never.value)
    assert (jobs.calls, jobs.values, jobs.refusals["quota"]) == (2, 25, 2)
    assert chat.refusals["permission_denied"] == 1
    # A reload keeps the counters; a team dropped from the file admits nothing.
    teams.load(parse_teams(json.dumps({"teams": teams_doc()["teams"][:1]})))  # type: ignore[index]
    with pytest.raises(Unauthenticated):
        teams.admit(JOBS, [], ["job:1"], 1)
    assert {t.name: t.values for t in teams} == {"chat": 2, "jobs": 25}


def test_a_broken_file_keeps_the_teams_in_force(tmp_path: Path) -> None:
    path = tmp_path / "teams.json"
    path.write_text(json.dumps(teams_doc()))
    teams = Teams()
    watch = TeamsFileWatch(str(path), teams)
    watch.load()
    assert not watch.poll()  # unchanged
    path.write_text("{not json")
    assert not watch.poll() and watch.failures == 1
    assert teams.admit(CHAT, [], ["u:a"], 1) is not None
    doc = teams_doc()
    doc["teams"][0]["prefixes"] = ["u:", "c:", "g:"]  # type: ignore[index]
    path.write_text(json.dumps(doc))
    assert watch.poll()
    assert teams.admit(CHAT, [], ["g:1"], 1) is not None
    with pytest.raises(TeamsError, match="cannot read"):
        TeamsFileWatch(str(tmp_path / "missing.json"), Teams()).load()


# -- a real seqsvc -----------------------------------------------------------------


def env(dsn: str, teams_file: Path | None, **settings: object) -> dict[str, str]:
    out = {
        "IM_SEQSVC_DATABASE_URL": dsn,
        "IM_SEQSVC_SECTIONS": "8",
        "IM_SEQSVC_LOG_LEVEL": "warning",
    }
    if teams_file is not None:
        out["IM_SEQSVC_TEAMS_FILE"] = str(teams_file)
    out.update({f"IM_SEQSVC_{k.upper()}": str(v) for k, v in settings.items()})
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


async def eventually(check: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result is not False:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_tokens_prefixes_quota_metrics_and_reload(
    pg_dsn: str, spawn: Spawn, tmp_path: Path
) -> None:
    teams_file = tmp_path / "teams.json"
    teams_file.write_text(json.dumps(teams_doc(values_per_s=5, burst=10)))
    metrics = free_port()
    # Reloads on SIGHUP only here (the polling is tested with the certificates).
    svc = spawn("seqsvc", env(pg_dsn, teams_file, metrics_port=metrics, teams_poll_s=0))
    async with (
        SeqClient(svc.address, token=CHAT) as chat,
        SeqClient(svc.address, token=JOBS) as jobs,
        SeqClient(svc.address) as anonymous,
        SeqClient(svc.address, token="not-a-team") as stranger,
    ):
        a = await chat.next("u:alice")
        b, c = await chat.next_batch(["c:x", "c:x"])
        assert c > b and await chat.current("u:alice") == a
        with pytest.raises(SeqPermissionDenied) as denied:
            await chat.next_batch(["u:ok", "job:7"])
        assert "keys[1] 'job:7'" in str(denied.value) and "['u:', 'c:']" in str(denied.value)
        with pytest.raises(SeqPermissionDenied):
            await chat.next("job:7")  # coalesced path: the same error
        with pytest.raises(SeqInvalidArgument):
            await chat.next_batch(["x" * 129])  # checked by the client before sending
        with pytest.raises(SeqUnauthenticated, match="Bearer"):
            await anonymous.next("u:alice")
        with pytest.raises(SeqUnauthenticated, match="no team"):
            await stranger.reserve("job:1", 1)
        # jobs: a burst of 10, then 5 values/s.
        first, last = await jobs.reserve("job:1", 10)
        assert last - first == 9
        with pytest.raises(SeqQuotaExceeded) as over:
            await jobs.reserve("job:1", 3)
        assert over.value.retry_after_s is not None and 0 < over.value.retry_after_s <= 0.7
        await asyncio.sleep(over.value.retry_after_s)
        assert (await jobs.reserve("job:1", 3))[0] > last
        with pytest.raises(SeqQuotaExceeded) as never:
            await jobs.reserve("job:1", 11)
        assert never.value.retry_after_s is None

        text = scrape(metrics)
        assert 'im_seqsvc_team_calls_total{team="chat"} 3.0' in text
        assert 'im_seqsvc_team_values_total{team="chat"} 4.0' in text
        assert 'im_seqsvc_team_values_total{team="jobs"} 13.0' in text
        assert 'im_seqsvc_team_refusals_total{reason="permission_denied",team="chat"} 2.0' in text
        assert 'im_seqsvc_team_refusals_total{reason="quota",team="jobs"} 2.0' in text
        assert 'im_seqsvc_team_refusals_total{reason="unauthenticated",team="(none)"} 2.0' in text

        # SIGHUP: the new file is in force without a restart.
        doc = teams_doc(values_per_s=5, burst=10)
        doc["teams"][0]["prefixes"] = ["u:", "c:", "g:"]  # type: ignore[index]
        teams_file.write_text(json.dumps(doc))
        with pytest.raises(SeqPermissionDenied):
            await chat.next("g:1")
        svc.signal(signal.SIGHUP)
        await eventually(lambda: chat.next("g:1"))
        # A broken file changes nothing.
        teams_file.write_text("{broken")
        svc.signal(signal.SIGHUP)
        await eventually(lambda: "im_seqsvc_teams_reload_failures_total 1.0" in scrape(metrics))
        assert await chat.next("g:1") > 0
        assert svc.running()


async def test_a_team_known_by_its_client_certificate(
    pg_dsn: str, spawn: Spawn, tmp_path: Path
) -> None:
    ca = CertificateAuthority("seqsvc test ca")
    server, client, other = ca.issue(["localhost"]), ca.issue(["billing"]), ca.issue(["nobody"])
    files = {
        "ca.pem": ca.pem,
        "tls.crt": server.cert_pem,
        "tls.key": server.key_pem,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    doc = {"teams": [{"name": "billing", "tls_identities": ["billing"], "prefixes": ["bill:"]}]}
    teams_file = tmp_path / "teams.json"
    teams_file.write_text(json.dumps(doc))
    svc = spawn(
        "seqsvc",
        env(
            pg_dsn,
            teams_file,
            teams_poll_s=0.1,
            tls_cert_file=tmp_path / "tls.crt",
            tls_key_file=tmp_path / "tls.key",
            tls_client_ca_file=tmp_path / "ca.pem",
            health_port=free_port(),
        ),
    )
    address = f"localhost:{svc.port}"

    def creds(leaf: object) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(ca.pem, leaf.key_pem, leaf.cert_pem)  # type: ignore[attr-defined]

    async with (
        SeqClient(address, tls=creds(client)) as billing,
        SeqClient(address, tls=creds(other), max_retries=0) as nobody,
    ):
        assert await billing.next("bill:1") > 0
        with pytest.raises(SeqPermissionDenied, match="'billing'"):
            await billing.next("u:alice")
        with pytest.raises(SeqUnauthenticated):
            await nobody.next("bill:1")
        # The file changes (as a Secret volume does): picked up without a signal.
        doc["teams"].append({"name": "misc", "tls_identities": ["nobody"], "prefixes": ["x:"]})
        teams_file.write_text(json.dumps(doc))
        await eventually(lambda: nobody.next("x:1"))


async def test_without_a_teams_file_every_caller_may_use_every_key(
    pg_dsn: str, spawn: Spawn
) -> None:
    svc = spawn("seqsvc", env(pg_dsn, None))
    async with SeqClient(svc.address, token="ignored") as seq:
        assert await seq.next("anything:at-all") > 0


def test_a_bad_teams_file_stops_the_start_with_one_line(pg_dsn: str, spawn: Spawn) -> None:
    svc = spawn("seqsvc", env(pg_dsn, Path("/nonexistent/teams.yaml")), wait=False)
    assert svc.wait(30) == 1
    log = Path(svc.log_path).read_text()
    assert "cannot read the teams file /nonexistent/teams.yaml" in log
    assert "Traceback" not in log
