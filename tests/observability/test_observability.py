"""Observability of the running system: one trace per message across every
process, metrics that move, and logs that never hold a body or a token.

The whole stack runs as real processes (PostgreSQL, Redis, NATS, seqsvc, logic,
pusher, gateway), configured only through OTEL_* variables to export spans to an
OTLP/gRPC collector inside this test process, with a metrics port each and debug
logs. The tests of this module share that stack; each uses its own users.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from obs_support import Collector, Samples, Span, names, scrape, value, wait_until

from imclient import Client, DebugHooks, Message, direct_conversation_id
from imdev.servers import free_port
from imdev.stack import Stack

SERVICES = ("seqsvc", "logic", "pusher", "gateway")


@dataclass
class Observed:
    stack: Stack
    collector: Collector
    metrics_ports: dict[str, int]

    async def scrape(self, service: str) -> Samples:
        return await asyncio.to_thread(scrape, self.metrics_ports[service])


@pytest.fixture(scope="module")
def observed() -> Iterator[Observed]:
    collector = Collector().start()
    ports = {svc: free_port() for svc in SERVICES}
    env: dict[str, dict[str, str]] = {}
    for svc in SERVICES:
        prefix = f"IM_{svc.upper()}_"
        env[svc] = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            f"{prefix}METRICS_PORT": str(ports[svc]),
            f"{prefix}LOG_LEVEL": "debug",
        }
    env["logic"]["IM_LOGIC_METRICS_SAMPLE_S"] = "0.2"
    env["pusher"]["IM_PUSHER_METRICS_SAMPLE_S"] = "0.2"
    # A dropped delivery ACK is retransmitted soon (test_retransmit_span_links...).
    env["pusher"]["IM_PUSHER_RETRANSMIT_SCHEDULE_MS"] = "500"
    workdir = Path(tempfile.mkdtemp(prefix="imstack-obs-"))
    workdir.chmod(0o755)
    stack = Stack(workdir, env=env)
    try:
        stack.start()
        yield Observed(stack, collector, ports)
    finally:
        stack.kill()
        collector.stop()
        if not os.environ.get("IM_KEEP_TEST_DIRS"):
            shutil.rmtree(workdir, ignore_errors=True)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def receive(client: Client, msg_id: int, timeout: float = 20.0) -> Message:
    """The first message with msg_id handed out by `client.messages()`."""

    async def find() -> Message:
        async for m in client.messages():
            if m.msg_id == msg_id:
                return m
        raise AssertionError("messages() ended")

    return await asyncio.wait_for(find(), timeout)


def by_name(spans: list[Span]) -> dict[tuple[str, str, str], list[Span]]:
    out: dict[tuple[str, str, str], list[Span]] = {}
    for s in spans:
        out.setdefault((s.service, s.name, s.kind), []).append(s)
    return out


#: What one message's trace must hold: (service, span name, kind), in flow order.
MESSAGE_TRACE = [
    ("gateway", "gateway.Send", "SERVER"),
    ("gateway", "im.logic.v1.Logic/SendMessage", "CLIENT"),
    ("logic", "im.logic.v1.Logic/SendMessage", "SERVER"),
    ("logic", "logic.db.send", "CLIENT"),
    ("logic", "im.seqsvc.v1.SeqService/NextBatch", "CLIENT"),
    ("seqsvc", "im.seqsvc.v1.SeqService/NextBatch", "SERVER"),
    ("logic", "jetstream.publish", "PRODUCER"),
    ("pusher", "pusher.consume", "CONSUMER"),
    ("pusher", "im.logic.v1.Logic/Fanout", "CLIENT"),
    ("logic", "im.logic.v1.Logic/Fanout", "SERVER"),
    ("logic", "logic.db.fanout", "CLIENT"),
    ("pusher", "pusher.push", "INTERNAL"),
    ("pusher", "pusher.deliver", "INTERNAL"),
    ("pusher", "im.gateway.v1.GatewayInternal/Deliver", "CLIENT"),
    ("gateway", "im.gateway.v1.GatewayInternal/Deliver", "SERVER"),
]


def trace_of(collector: Collector, msg_id: int) -> str:
    """The trace id of the gateway Send span that stored msg_id ("" if none yet)."""
    sends = collector.spans(lambda s: s.name == "gateway.Send" and s.has_id("im.msg_id", msg_id))
    return sends[0].trace_id if sends else ""


async def test_one_trace_follows_a_message_through_every_process(observed: Observed) -> None:
    stack, collector = observed.stack, observed.collector
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    async with (
        Client(stack.gateway_addresses, stack.mint(alice, "a1"), insecure=True) as a,
        Client(stack.gateway_addresses, stack.mint(bob, "b1"), insecure=True) as b,
    ):
        sent = await a.send(conv, "follow me")
        got = await receive(b, sent.msg_id)
    assert got.seq > 0

    def complete() -> bool:
        trace_id = trace_of(collector, sent.msg_id)
        return bool(trace_id) and set(MESSAGE_TRACE) <= set(by_name(collector.trace(trace_id)))

    def missing() -> str:
        trace_id = trace_of(collector, sent.msg_id)
        have = set(by_name(collector.trace(trace_id))) if trace_id else set()
        lacking = [k for k in MESSAGE_TRACE if k not in have]
        return f"spans of msg {sent.msg_id} (trace {trace_id or '?'}): missing {lacking}"

    try:
        await wait_until(complete, 20, "every span of the message's trace")
    except AssertionError:
        raise AssertionError(missing()) from None

    trace_id = trace_of(collector, sent.msg_id)
    spans = collector.trace(trace_id)
    named = by_name(spans)
    by_id = {s.span_id: s for s in spans}

    # One tree: every span but the root hangs off a span of this same trace.
    roots = [s for s in spans if s.parent_id not in by_id]
    assert [(r.service, r.name) for r in roots] == [("gateway", "gateway.Send")], roots

    # Each hop is a parent-child edge, across processes included.
    def parent(span: Span) -> Span:
        return by_id[span.parent_id]

    def first(service: str, name: str, kind: str) -> Span:
        return named[(service, name, kind)][0]

    logic_send = first("logic", "im.logic.v1.Logic/SendMessage", "SERVER")
    assert parent(logic_send).service == "gateway"
    seq_calls = named[("seqsvc", "im.seqsvc.v1.SeqService/NextBatch", "SERVER")]
    assert {parent(s).service for s in seq_calls} == {"logic"}
    publish = first("logic", "jetstream.publish", "PRODUCER")
    assert parent(publish) == logic_send
    consume = first("pusher", "pusher.consume", "CONSUMER")
    assert consume.parent_id == publish.span_id, "the consume span continues the publish"
    fanout = first("logic", "im.logic.v1.Logic/Fanout", "SERVER")
    assert parent(parent(fanout)) == consume
    deliver = first("gateway", "im.gateway.v1.GatewayInternal/Deliver", "SERVER")
    assert parent(parent(deliver)).name == "pusher.deliver"

    # The ids an operator searches by are on the spans; the body is on none.
    assert logic_send.has_id("im.msg_id", sent.msg_id)
    assert first("logic", "logic.db.send", "CLIENT").has_id("im.msg_id", sent.msg_id)
    assert publish.has_id("im.msg_id", sent.msg_id)
    assert publish.attributes["im.conversation_id"] == conv
    assert consume.has_id("im.msg_ids", sent.msg_id)
    assert first("logic", "logic.db.fanout", "CLIENT").has_id("im.msg_ids", sent.msg_id)
    assert deliver.has_id("im.msg_ids", sent.msg_id) and deliver.has_id("im.user_ids", bob)
    for s in spans:
        assert "follow me" not in json.dumps(s.attributes), s


async def test_metrics_move_for_one_message(observed: Observed) -> None:
    stack = observed.stack
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    async with (
        Client(
            stack.gateway_addresses, stack.mint(alice, "a1"), insecure=True, auto_delivered=False
        ) as a,
        # No automatic DELIVERED receipt: it is a send of its own (one message here).
        Client(
            stack.gateway_addresses, stack.mint(bob, "b1"), insecure=True, auto_delivered=False
        ) as b,
    ):
        # Warm: both streams are open and routed; the counters settle.
        first = await a.send(conv, "warm-up")
        await receive(b, first.msg_id)
        before = {svc: await observed.scrape(svc) for svc in SERVICES}
        sent = await a.send(conv, "count me")
        await receive(b, sent.msg_id)
        gw = await observed.scrape("gateway")
        assert value(gw, "im_gateway_connections") >= 2

        after: dict[str, Samples] = {}

        def delta(svc: str, name: str, **labels: str) -> float:
            return value(after[svc], name, **labels) - value(before[svc], name, **labels)

        send_rpc = {"method": "/im.logic.v1.Logic/SendMessage", "code": "OK"}
        fanout_rpc = {"method": "/im.logic.v1.Logic/Fanout", "code": "OK"}
        expected = {
            ("gateway", "im_gateway_sends_total", (("result", "ok"),)): 1,
            ("gateway", "im_gateway_pushes_total", (("status", "written"),)): 1,
            ("gateway", "im_gateway_delivery_acks_total", ()): 1,
            ("gateway", "im_rpc_client_handled_total", tuple(send_rpc.items())): 1,
            ("logic", "im_logic_sends_total", (("result", "new"),)): 1,
            ("logic", "im_logic_publishes_total", (("result", "ok"), ("source", "send"))): 1,
            ("logic", "im_logic_fanout_rows_total", (("result", "written"),)): 1,
            ("logic", "im_logic_db_seconds_count", (("op", "send"),)): 1,
            ("logic", "im_rpc_server_handled_total", tuple(send_rpc.items())): 1,
            ("logic", "im_rpc_server_handled_total", tuple(fanout_rpc.items())): 1,
            ("pusher", "im_pusher_fanout_deliveries_total", ()): 1,
            ("pusher", "im_pusher_pushes_total", (("kind", "first"), ("result", "written"))): 1,
            ("pusher", "im_pusher_commit_to_push_seconds_count", ()): 1,
            ("pusher", "im_pusher_acks_cancelled_total", ()): 1,
            ("pusher", "im_rpc_client_handled_total", tuple(fanout_rpc.items())): 1,
            (
                "seqsvc",
                "im_rpc_server_handled_total",
                (("code", "OK"), ("method", "/im.seqsvc.v1.SeqService/NextBatch")),
            ): 1,
        }

        def moved() -> list[str]:
            return [
                f"{svc} {name}{dict(labels)} moved by "
                f"{delta(svc, name, **dict(labels))}, expected at least {n}"
                for (svc, name, labels), n in expected.items()
                if delta(svc, name, **dict(labels)) < n
            ]

        async def rescrape() -> None:
            for svc in SERVICES:
                after[svc] = await observed.scrape(svc)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        await rescrape()
        while moved() and loop.time() < deadline:
            await asyncio.sleep(0.2)
            await rescrape()
        assert not moved(), moved()

    # Exactly one new message was stored and published for this send.
    assert delta("logic", "im_logic_sends_total", result="new") == 1
    assert delta("logic", "im_logic_publishes_total", source="send", result="ok") == 1
    # Gauges sampled in the background exist and, with nothing stuck, drain to 0.
    for name in ("im_logic_outbox_rows", "im_logic_fanout_pending_conversations"):
        assert name in names(after["logic"])
    assert "im_pusher_jetstream_pending" in names(after["pusher"])
    for svc, name in [
        ("logic", "im_logic_outbox_rows"),
        ("logic", "im_logic_fanout_pending_conversations"),
        ("pusher", "im_pusher_jetstream_pending"),
        ("pusher", "im_pusher_jetstream_ack_pending"),
    ]:
        for _ in range(100):
            if value(await observed.scrape(svc), name) == 0:
                break
            await asyncio.sleep(0.1)
        assert value(await observed.scrape(svc), name) == 0, f"{svc} {name} stays above 0"
    # seqsvc's own gauges are on its endpoint.
    seq = names(after["seqsvc"])
    assert {
        "im_seqsvc_store_writes_total",
        "im_seqsvc_waits_total",
        "im_seqsvc_allocated_total",
        "im_seqsvc_serving",
        "im_seqsvc_store_write_seconds_count",
    } <= seq


async def test_retransmit_span_links_to_the_first_push(observed: Observed) -> None:
    stack, collector = observed.stack, observed.collector
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    hooks = DebugHooks(drop_deliver_acks=1)
    async with (
        Client(stack.gateway_addresses, stack.mint(alice, "a1"), insecure=True) as a,
        # No automatic receipt: its push's (cumulative) ACK would cover the dropped one.
        Client(
            stack.gateway_addresses,
            stack.mint(bob, "b1"),
            hooks=hooks,
            insecure=True,
            auto_delivered=False,
        ) as b,
    ):
        sent = await a.send(conv, "ack me late")
        await receive(b, sent.msg_id)

        def retransmits() -> list[Span]:
            return collector.spans(
                lambda s: s.name == "pusher.retransmit" and s.has_id("im.msg_ids", sent.msg_id)
            )

        await wait_until(lambda: bool(retransmits()), 20, "a retransmit span for the message")
    trace_id = trace_of(collector, sent.msg_id)
    pushes = [
        s
        for s in collector.trace(trace_id)
        if s.name == "pusher.push" and s.has_id("im.msg_ids", sent.msg_id)
    ]
    assert pushes, "the first push is in the message's trace"
    retransmit = retransmits()[0]
    assert retransmit.trace_id != trace_id, "a retransmit starts a trace of its own"
    assert (trace_id, pushes[0].span_id) in retransmit.links
    assert retransmit.attributes["im.max_attempt"] >= 2


async def test_logs_are_json_tied_to_traces_and_hold_no_body_or_token(observed: Observed) -> None:
    stack, collector = observed.stack, observed.collector
    alice, bob = uid("alice"), uid("bob")
    conv = direct_conversation_id(alice, bob)
    body = f"BODY-{uuid.uuid4().hex}"
    tokens = [stack.mint(alice, "a1"), stack.mint(bob, "b1")]
    async with Client(stack.gateway_addresses, tokens[0], insecure=True) as a:
        async with Client(stack.gateway_addresses, tokens[1], insecure=True) as b:
            sent = await a.send(conv, body)
            await receive(b, sent.msg_id)
        # And a send that fails validation (the body is in the refused frame too).
        group = await a.create_group("obs", [bob])
        await a.remove_members(group.conversation_id, [alice])
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the logs are the point
            await a.send(group.conversation_id, body + "-refused")
    await wait_until(lambda: bool(trace_of(collector, sent.msg_id)), 20, "the message's trace")
    trace_id = trace_of(collector, sent.msg_id)

    logs = sorted((stack.workdir / "logs").glob("*.log"))
    ours = [p for p in logs if p.name.split("-")[0].split(".")[0] in SERVICES]
    assert {p.name.split("-")[0].split(".")[0] for p in ours} == set(SERVICES), logs

    secrets = [body, *tokens, stack.token_secret]
    tied: dict[str, list[dict[str, object]]] = {}

    def check() -> None:
        tied.clear()
        for path in ours:
            text = path.read_text(errors="replace")
            for secret in secrets:
                assert secret not in text, f"{path.name} holds a body or token"
            for line in text.splitlines():
                if not line.strip():
                    continue
                entry = json.loads(line)  # every line is one JSON object
                assert isinstance(entry, dict) and {"ts", "level", "msg"} <= entry.keys(), line
                listed = entry.get("msg_ids")
                if entry.get("msg_id") == sent.msg_id or (
                    isinstance(listed, list) and sent.msg_id in listed
                ):
                    tied.setdefault(path.name.split("-")[0], []).append(entry)

    # The debug lines of the message's path, each written inside a span of its trace.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    check()
    while not {"gateway", "logic", "pusher"} <= tied.keys() and loop.time() < deadline:
        await asyncio.sleep(0.2)
        check()
    assert {"gateway", "logic", "pusher"} <= tied.keys(), tied.keys()
    for service, entries in tied.items():
        for entry in entries:
            assert entry.get("trace_id") == trace_id, (service, entry)
            assert len(str(entry.get("span_id", ""))) == 16, (service, entry)
    messages = {str(e["msg"]) for entries in tied.values() for e in entries}
    assert {"send stored", "message stored", "fanned out", "push written"} <= messages
