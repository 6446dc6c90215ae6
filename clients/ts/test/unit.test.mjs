// The pure parts of the client without a server: the receiver's and the send
// window's rules (ports of the Python SDK's, with the cases that matter most),
// and IndexedDBStore on an in-memory IndexedDB (fake-indexeddb).
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { IDBFactory, IDBKeyRange } from "fake-indexeddb";
import { IndexedDBStore, MemoryStore, OUT_OF_ORDER, Outgoing, Receiver, RetransmitPolicy, SendWindow, uuid7 } from "../dist/index.js";

const e = (seq) => ({ seq, payload: `m${seq}` });
const seqs = (entries) => entries.map((x) => x.seq);

describe("Receiver", () => {
  test("pushes during a sync are buffered, never applied past what the sync returned (gim issue 46)", () => {
    const r = new Receiver(0);
    assert.equal(r.startSync(), 0);
    assert.deepEqual(r.onPush(e(3)), []); // seq 3 arrives while the sync runs
    assert.deepEqual(seqs(r.onSyncPage([e(1)], true)), [1]);
    assert.equal(r.seq, 1);
    assert.deepEqual(seqs(r.onSyncPage([e(2)], false)), [2, 3]);
    assert.equal(r.seq, 3);
    assert.equal(r.takeAck(), 3);
    assert.equal(r.takeAck(), null);
  });

  test("a gap makes a sync due; a duplicate is acknowledged again and dropped", () => {
    const r = new Receiver(0);
    r.startSync();
    r.onSyncPage([], false);
    assert.deepEqual(seqs(r.onPush(e(1))), [1]);
    assert.deepEqual(r.onPush(e(3)), []);
    assert.ok(r.needSync);
    assert.equal(r.gaps, 1);
    r.startSync();
    assert.deepEqual(seqs(r.onSyncPage([e(2), e(3)], false)), [2, 3]);
    r.takeAck();
    assert.deepEqual(r.onPush(e(2)), []);
    assert.equal(r.duplicates, 1);
    assert.equal(r.takeAck(), 3);
  });

  test("a head above the local seq makes a sync due; at or below it, nothing", () => {
    const r = new Receiver(5);
    r.startSync();
    r.onSyncPage([], false);
    assert.equal(r.onHead(5), false);
    assert.equal(r.onHead(7), true);
    assert.ok(r.needSync);
    r.startSync();
    r.onSyncPage([e(7)], false);
    assert.equal(r.needSync, false);
  });

  test("restart() forgets the position (another store epoch)", () => {
    const r = new Receiver(40);
    r.restart();
    assert.equal(r.seq, 0);
    assert.ok(r.needSync);
  });
});

describe("SendWindow", () => {
  const msg = (id) => new Outgoing(id, "d:a:b", new Uint8Array([1]), 1);

  test("numbers in submit order within the window; OUT_OF_ORDER renumbers from expected", () => {
    const w = new SendWindow(new RetransmitPolicy(), 2);
    ["a", "b", "c"].forEach((id) => w.submit(msg(id)));
    w.onConnected(1, 0);
    assert.deepEqual(
      w.poll(0).map((f) => [f.clientId, f.message.clientMsgId]),
      [
        [1, "a"],
        [2, "b"],
      ],
    );
    // The gateway expects 1: it never got a. Everything from 1 is resent, in order.
    assert.equal(w.onError(2, "b", OUT_OF_ORDER, false, 1, 0), undefined);
    assert.deepEqual(
      w.poll(0).map((f) => [f.clientId, f.message.clientMsgId]),
      [
        [1, "a"],
        [2, "b"],
      ],
    );
    assert.equal(w.onAck("a")?.clientMsgId, "a");
    assert.deepEqual(
      w.poll(0).map((f) => [f.clientId, f.message.clientMsgId]),
      [[3, "c"]],
    );
  });

  test("a reconnect renumbers every unacknowledged send from 1 with the same ids", () => {
    const w = new SendWindow();
    ["a", "b"].forEach((id) => w.submit(msg(id)));
    w.onConnected();
    w.poll(0);
    w.onAck("a");
    w.onDisconnected();
    w.onConnected();
    assert.deepEqual(
      w.poll(0).map((f) => [f.clientId, f.message.clientMsgId]),
      [[1, "b"]],
    );
  });

  test("only the oldest unanswered send is retransmitted, with backoff, then exhausted", () => {
    const p = new RetransmitPolicy({ initialMs: 100, maxIntervalMs: 400, maxAttempts: 3 });
    const w = new SendWindow(p);
    ["a", "b"].forEach((id) => w.submit(msg(id)));
    w.onConnected();
    assert.equal(w.poll(0).length, 2);
    assert.deepEqual(w.poll(99), []);
    assert.deepEqual(
      w.poll(100).map((f) => [f.message.clientMsgId, f.retransmit]),
      [["a", true]],
    );
    assert.equal(w.nextDeadline(), 300); // 100 + 200 (doubled)
    w.poll(300);
    w.poll(10_000);
    assert.ok(w.exhausted);
  });

  test("a refusal for good frees its client_id for the next send", () => {
    const w = new SendWindow();
    ["a", "b"].forEach((id) => w.submit(msg(id)));
    w.onConnected();
    w.poll(0);
    assert.equal(w.onError(1, "a", 3, false, 0, 0)?.clientMsgId, "a");
    assert.deepEqual(
      w.poll(0).map((f) => [f.clientId, f.message.clientMsgId]),
      [[1, "b"]],
    );
  });
});

test("uuid7: version 7, variant 10, the time in the first 48 bits", () => {
  const id = uuid7(0x0123456789ab);
  assert.match(id, /^01234567-89ab-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.notEqual(uuid7(), uuid7());
});

for (const [name, make] of [
  ["MemoryStore", () => new MemoryStore()],
  ["IndexedDBStore", () => new IndexedDBStore("test", { factory: new IDBFactory(), keyRange: IDBKeyRange })],
]) {
  test(`${name}: outbox in submission order, cursor never lowered, epoch reset keeps the outbox`, async () => {
    const s = make();
    await s.open();
    const entry = (id, order) => ({ clientMsgId: id, conversationId: "d:a:b", contentType: 1, body: new Uint8Array([order]), order });
    await s.outboxAdd("a/d", [entry("x", 2), entry("y", 1)]);
    await s.outboxAdd("a/d", [{ ...entry("x", 9), body: new Uint8Array([42]) }]); // a repeat: left as it was
    await s.outboxAdd("b/d", [entry("z", 0)]);
    const box = await s.outboxLoad("a/d");
    assert.deepEqual(
      box.map((x) => [x.clientMsgId, x.order, [...x.body]]),
      [
        ["y", 1, [1]],
        ["x", 2, [2]],
      ],
    );
    await s.outboxDelete("a/d", ["y", "unknown"]);
    assert.deepEqual(
      (await s.outboxLoad("a/d")).map((x) => x.clientMsgId),
      ["x"],
    );
    await s.commit("a/d", 10, [
      [100, 9],
      [101, 10],
    ]);
    await s.commit("a/d", 5, []);
    assert.equal(await s.loadLastSeq("a/d"), 10);
    assert.deepEqual([...(await s.filterSeen("a/d", [100, 102]))], [100]);
    assert.equal(await s.loadEpoch("a/d"), "");
    await s.setEpoch("a/d", "e1", false);
    assert.equal(await s.loadLastSeq("a/d"), 10);
    await s.setEpoch("a/d", "e2", true);
    assert.equal(await s.loadEpoch("a/d"), "e2");
    assert.equal(await s.loadLastSeq("a/d"), 0);
    assert.deepEqual([...(await s.filterSeen("a/d", [100]))], []);
    assert.equal((await s.outboxLoad("a/d")).length, 1);
    assert.equal((await s.outboxLoad("b/d")).length, 1);
    await s.close();
  });
}
