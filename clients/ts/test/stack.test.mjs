// The TypeScript client against the real stack (gateway WebSocket, logic,
// pusher, PostgreSQL, NATS, Redis), started by tests/clients/test_ts_client.py.
import assert from "node:assert/strict";
import { after, describe, test } from "node:test";
import { Client, MemoryStore } from "../dist/index.js";
import { connect, direct, haveStack, URLS, user, waitFor } from "./support.mjs";

const clients = [];
async function open(role, options) {
  const c = await connect(role, options);
  clients.push(c.client);
  return c;
}
after(async () => {
  await Promise.all(clients.map((c) => c.close()));
});

/** Chat messages of `conv` from `sender`, in the order they were handed. */
function from(received, conv, sender) {
  return received.filter((m) => m.conversationId === conv && m.senderId === sender && m.kind === 1);
}

function assertExactlyOnceInOrder(got, expected) {
  assert.deepEqual(
    got.map((m) => m.text),
    expected,
  );
  assert.equal(new Set(got.map((m) => m.msgId)).size, got.length, "a msg_id handed twice");
  for (let i = 1; i < got.length; i++) {
    assert.ok(got[i].convSeq > got[i - 1].convSeq, "conv_seq not increasing");
    assert.ok(got[i].seq > got[i - 1].seq, "seq not increasing");
  }
}

describe("TypeScript client on the real stack", { skip: !haveStack && "no stack (IM_WS_URLS, IM_USERS)" }, () => {
  test("two clients chat both ways, and unary calls answer on the socket", async () => {
    const a = await open("chat_a");
    const b = await open("chat_b");
    const conv = direct(a.user, b.user);
    const ack = await a.client.send(conv, "hello bob");
    assert.ok(ack.msgId > 0 && ack.seq > 0 && ack.convSeq === 1, JSON.stringify(ack));
    assert.equal(ack.duplicate, false);
    await waitFor(() => from(b.received, conv, a.user).length === 1, "bob to receive");
    await b.client.send(conv, "hello alice");
    await waitFor(() => from(a.received, conv, b.user).length === 1, "alice to receive");
    // The sender's own timeline holds its message too (the push of its own send).
    await waitFor(() => from(a.received, conv, a.user).length === 1, "alice's own copy");
    assert.equal(from(a.received, conv, a.user)[0].seq, ack.seq);
    const hist = await b.client.history(conv);
    assert.deepEqual(
      hist.messages.map((m) => m.text),
      ["hello alice", "hello bob"],
    );
    const list = await b.client.listConversations();
    const c = list.conversations.find((x) => x.conversationId === conv);
    assert.ok(c, "the conversation is listed");
    assert.equal(c.unreadCount, 1); // alice's message; bob's own does not count
    await b.client.markRead(conv, 2);
    const after = await b.client.listConversations();
    assert.equal(after.conversations.find((x) => x.conversationId === conv).unreadCount, 0);
    await assert.rejects(b.client.history("d:nobody:someone"), (e) => e.code === 7); // PERMISSION_DENIED
  });

  test("200 pipelined sends arrive exactly once, in order", async () => {
    const a = await open("pipe_a");
    const b = await open("pipe_b");
    const conv = direct(a.user, b.user);
    const texts = Array.from({ length: 200 }, (_, i) => `m${i}`);
    const acks = await Promise.all(texts.map((t) => a.client.submit(conv, t)));
    assert.deepEqual(
      acks.map((x) => x.convSeq),
      texts.map((_, i) => i + 1),
    );
    await waitFor(() => from(b.received, conv, a.user).length >= 200, "200 messages at bob");
    assertExactlyOnceInOrder(from(b.received, conv, a.user), texts);
    await waitFor(() => from(a.received, conv, a.user).length >= 200, "200 own copies at alice");
    assertExactlyOnceInOrder(from(a.received, conv, a.user), texts);
  });

  test("a connection cut mid-send: no loss, no duplicate, the same client_msg_ids resent", async () => {
    const frames = []; // [connection number, client_id, client_msg_id]
    let a;
    a = await open("cut_a", {
      hooks: { onSendFrame: (cid, cmid) => frames.push([a?.client.stats.connects ?? 1, cid, cmid]) },
      sendWindow: 16,
    });
    const b = await open("cut_b");
    const conv = direct(a.user, b.user);
    const texts = Array.from({ length: 60 }, (_, i) => `c${i}`);
    const results = texts.map((t) => a.client.submit(conv, t));
    // Cut the socket as soon as some sends are written and some of them are
    // still unanswered.
    await waitFor(() => frames.length >= 5, "the first frames");
    a.client.dropConnection();
    const acks = await Promise.all(results);
    assert.ok(a.client.stats.connects >= 2, "the client reconnected");
    assert.equal(new Set(acks.map((x) => x.msgId)).size, 60, "a message stored twice");
    const before = new Set(frames.filter((f) => f[0] === 1).map((f) => f[2]));
    const resent = frames.filter((f) => f[0] >= 2 && before.has(f[2]));
    assert.ok(resent.length > 0, "nothing written before the cut was resent after it");
    // After the reconnect client_ids start again at 1, in the original order.
    const second = frames.filter((f) => f[0] === 2);
    assert.equal(second[0][1], 1);
    const order = new Map(texts.map((_, i) => [acks[i].clientMsgId, i]));
    for (let i = 1; i < second.length; i++) {
      if (second[i][1] > second[i - 1][1]) assert.ok(order.get(second[i][2]) > order.get(second[i - 1][2]));
    }
    await waitFor(() => from(b.received, conv, a.user).length >= 60, "60 messages at bob");
    assertExactlyOnceInOrder(from(b.received, conv, a.user), texts);
  });

  test("a lost push: the next push reveals the gap and a sync fills it", async () => {
    let pushes = 0;
    const b = await open("gap_b", { hooks: { dropPush: () => ++pushes === 2 } });
    const a = await open("gap_a");
    const conv = direct(a.user, b.user);
    const texts = ["g0", "g1", "g2", "g3", "g4"];
    for (const t of texts) {
      await a.client.send(conv, t);
      // One at a time, so that the dropped push is followed by later ones.
      await waitFor(() => pushes >= texts.indexOf(t) + 1, `push of ${t}`);
    }
    await waitFor(() => from(b.received, conv, a.user).length >= 5, "5 messages at bob");
    assertExactlyOnceInOrder(from(b.received, conv, a.user), texts);
    assert.equal(b.client.stats.pushesDropped, 1);
    assert.ok(b.client.stats.gaps >= 1, "no gap was seen");
    assert.ok(b.client.stats.syncs >= 2, "no sync after the gap");
  });

  test("a lost last push: the head in a Pong is above the local seq and a sync fetches it", async () => {
    let drop = false;
    const b = await open("head_b", { pingIntervalMs: 300, hooks: { dropPush: () => drop } });
    const a = await open("head_a");
    const conv = direct(a.user, b.user);
    drop = true;
    await a.client.send(conv, "quiet");
    await waitFor(() => from(b.received, conv, a.user).length === 1, "the message by a head-driven sync");
    assert.ok(b.client.stats.pushesDropped >= 1);
    assert.ok(b.client.stats.syncsByHead >= 1, "the sync was not caused by a head");
  });

  test("the outbox: messages submitted offline are sent by the next client, once", async () => {
    const store = new MemoryStore();
    const a = user("outbox_a");
    const b = await open("outbox_b");
    const conv = direct(a.user, b.user);
    // The first client never reaches a gateway (a closed port): its sends stay in the outbox.
    const offline = new Client({ url: "ws://127.0.0.1:9/v1/connect", token: a.token, store, account: `${a.user}/${a.device}` });
    await offline.start({ waitReady: false });
    const lost = ["o0", "o1", "o2"].map((t) => offline.submit(conv, t));
    await offline.persisted();
    assert.equal(offline.pending().length, 3);
    await offline.close();
    await Promise.allSettled(lost);
    const outcomes = [];
    const next = new Client({ url: URLS, token: a.token, store });
    next.on("sendResult", (o) => outcomes.push(o));
    clients.push(next);
    await next.start({ timeoutMs: 20_000 });
    await waitFor(() => outcomes.length === 3, "the restored messages' outcomes");
    assert.ok(outcomes.every((o) => o.restored && o.result));
    await waitFor(() => from(b.received, conv, a.user).length >= 3, "3 messages at bob");
    assertExactlyOnceInOrder(from(b.received, conv, a.user), ["o0", "o1", "o2"]);
    // Resending one of them again (same client_msg_id) stores nothing new.
    const again = await next.send(conv, "o0", { clientMsgId: outcomes[0].clientMsgId });
    assert.equal(again.duplicate, true);
    assert.equal(again.msgId, outcomes[0].result.msgId);
    await next.flush(); // the outcome reported, then the outbox forgets it
    assert.deepEqual(await store.outboxLoad(`${a.user}/${a.device}`), []);
  });
});
