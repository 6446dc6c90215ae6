// Against a real stack: tests/clients/test_node_grpc.py starts one and runs
// `node --test` with its addresses and two users' tokens in the environment.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { GatewayClient, SeqClient, directConversation, loadApi } from "../src/client.js";

const env = process.env;
const skip = env.IM_GATEWAY_ADDRESS
  ? false
  : "needs a running stack: run it through tests/clients/test_node_grpc.py (or set IM_GATEWAY_ADDRESS, IM_SEQSVC_ADDRESS, IM_USER_A/B, IM_TOKEN_A/B)";
const insecure = env.IM_INSECURE === "1"; // a local stack is plaintext

/** Resolves once `predicate()` holds; rejects with `what` after `timeoutMs`. */
function waitFor(emitter, event, predicate, timeoutMs, what) {
  return new Promise((resolve, reject) => {
    const check = () => {
      if (predicate()) {
        clearTimeout(timer);
        emitter.off(event, check);
        resolve();
      }
    };
    const timer = setTimeout(() => {
      emitter.off(event, check);
      reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
    }, timeoutMs);
    emitter.on(event, check);
    check();
  });
}

describe("gateway over @grpc/grpc-js", { skip }, () => {
  const api = skip ? null : loadApi();
  const N = 20;
  let a;
  let b;

  before(() => {
    a = new GatewayClient({ address: env.IM_GATEWAY_ADDRESS, token: env.IM_TOKEN_A, insecure, api });
    b = new GatewayClient({ address: env.IM_GATEWAY_ADDRESS, token: env.IM_TOKEN_B, insecure, api });
  });
  after(() => {
    a?.close();
    b?.close();
  });

  test("A sends 20; B gets each once, in order, by push, and acknowledges; Sync agrees", async () => {
    const received = [];
    b.on("message", (entry) => received.push(entry));
    const welcomeB = await b.connect();
    assert.equal(welcomeB.user_id, env.IM_USER_B);
    assert.equal(welcomeB.next_client_id, "1");
    const welcomeA = await a.connect();
    assert.equal(welcomeA.user_id, env.IM_USER_A);
    assert.equal(received.length, 0, "B's timeline starts empty");

    const conv = directConversation(env.IM_USER_A, env.IM_USER_B);
    // Pipelined within A's send window: client_ids 1..N, answered in that order.
    const acks = await Promise.all(Array.from({ length: N }, (_, i) => a.send(conv, `m${i}`)));
    assert.deepEqual(acks.map((ack) => Number(ack.client_id)), Array.from({ length: N }, (_, i) => i + 1));
    const convSeqs = acks.map((ack) => BigInt(ack.conv_seq));
    for (let i = 1; i < N; i++) assert.ok(convSeqs[i] > convSeqs[i - 1], "conv_seq follows send order");
    assert.ok(acks.every((ack) => !ack.duplicate));

    await waitFor(b, "message", () => received.length >= N, 30000, `${N} messages at B`);
    assert.equal(received.length, N, "nothing beyond the 20");
    assert.deepEqual(received.map((e) => e.message.body.toString()), acks.map((_, i) => `m${i}`));
    assert.deepEqual(received.map((e) => e.message.client_msg_id), acks.map((ack) => ack.client_msg_id));
    assert.deepEqual(received.map((e) => BigInt(e.message.conv_seq)), convSeqs);
    assert.ok(received.every((e) => e.via === "push"), "delivered by push, not healed by sync");
    assert.ok(received.every((e) => e.message.sender_id === env.IM_USER_A && e.message.conversation_id === conv));
    for (let i = 1; i < N; i++) assert.ok(received[i].seq > received[i - 1].seq, "seq strictly increasing");
    assert.equal(b.local, received[N - 1].seq, "B acknowledged up to its last entry");

    // B's Sync from 0, in pages of 7: the same entries, in the same order.
    const synced = [];
    let cursor = 0n;
    for (let pages = 0; ; pages++) {
      assert.ok(pages < 10, "paging ends");
      const page = await b.sync(cursor, 7);
      assert.ok(page.entries.length <= 7);
      synced.push(...page.entries);
      if (!page.has_more) break;
      cursor = BigInt(page.entries.at(-1).seq);
    }
    assert.deepEqual(synced.map((e) => BigInt(e.seq)), received.map((e) => e.seq));
    assert.deepEqual(synced.map((e) => e.message.msg_id), received.map((e) => e.message.msg_id));

    // A's own devices see their sends in A's timeline too, at SendAck.seq.
    const own = await a.sync(0, 100);
    assert.deepEqual(own.entries.map((e) => e.seq), acks.map((ack) => ack.seq));
  });

  test("a resend of a stored client_msg_id gets the first SendAck (duplicate), not a second message", async () => {
    const conv = directConversation(env.IM_USER_A, env.IM_USER_B);
    const clientMsgId = `retransmit-${Date.now()}`;
    const first = await a.send(conv, "once", { clientMsgId });
    const again = await a.send(conv, "once", { clientMsgId });
    assert.equal(again.msg_id, first.msg_id);
    assert.equal(again.duplicate, true);
  });
});

describe("seqsvc over @grpc/grpc-js", { skip }, () => {
  let seq;
  before(() => {
    seq = new SeqClient({ address: env.IM_SEQSVC_ADDRESS, insecure });
  });
  after(() => seq?.close());

  test("Next on one key is strictly increasing", async () => {
    const key = `node-${process.pid}-${Date.now()}`;
    const values = [];
    for (let i = 0; i < 50; i++) values.push(await seq.next(key));
    for (let i = 1; i < values.length; i++) assert.ok(values[i] > values[i - 1], `${values[i]} > ${values[i - 1]}`);
    assert.ok((await seq.current(key)) >= values.at(-1));
  });

  test("NextBatch: one value per entry, a repeated key increasing in batch order", async () => {
    const k1 = `node-b1-${Date.now()}`;
    const k2 = `node-b2-${Date.now()}`;
    const before1 = await seq.next(k1);
    const values = await seq.nextBatch([k1, k2, k1]);
    assert.equal(values.length, 3);
    assert.ok(values[0] > before1);
    assert.ok(values[2] > values[0]);
  });

  test("a bad key is INVALID_ARGUMENT", async () => {
    await assert.rejects(seq.next(""), (err) => err.code === 3);
  });
});
