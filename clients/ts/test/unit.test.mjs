// The pure parts of the client without a server: the receiver's and the send
// window's rules (ports of the Python SDK's, with the cases that matter most),
// the reconnect backoff (the policy, and the client's connection loop against a
// scripted transport), and IndexedDBStore on an in-memory IndexedDB
// (fake-indexeddb).
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { IDBFactory, IDBKeyRange } from "fake-indexeddb";
import {
  Client,
  IndexedDBStore,
  MemoryStore,
  OUT_OF_ORDER,
  Outgoing,
  ReconnectPolicy,
  Receiver,
  RetransmitPolicy,
  SendWindow,
  uuid7,
} from "../dist/index.js";
import { ClientFrameSchema, ServerFrameSchema, SyncResponseSchema } from "../dist/gen/im/gateway/v1/gateway_pb.js";

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

describe("ReconnectPolicy", () => {
  // delay(n) is uniform(0, ceiling(n)); random() = 1 reads the ceiling itself.
  const ceiling = (p, failures) => p.delay(failures, () => 1);

  test("defaults: 0.1 s doubling up to 5 s (docs/protocol.md, the Python SDK)", () => {
    const p = new ReconnectPolicy();
    assert.deepEqual([p.initialMs, p.multiplier, p.maxMs], [100, 2, 5000]);
    assert.deepEqual(
      [0, 1, 2, 3, 4, 5, 6, 7].map((n) => ceiling(p, n)),
      [100, 200, 400, 800, 1600, 3200, 5000, 5000],
    );
  });

  test("the ceiling grows by the multiplier per failure and stops at maxMs, whatever the count", () => {
    const p = new ReconnectPolicy({ initialMs: 10, multiplier: 3, maxMs: 1000 });
    assert.deepEqual(
      [0, 1, 2, 3, 4, 5].map((n) => ceiling(p, n)),
      [10, 30, 90, 270, 810, 1000],
    );
    for (const n of [6, 33, 1e6, Number.MAX_SAFE_INTEGER, Infinity]) assert.equal(ceiling(p, n), 1000, `failures ${n}`);
    assert.equal(ceiling(p, -5), 10); // a negative count is the first failure
    const flat = new ReconnectPolicy({ initialMs: 50, multiplier: 1, maxMs: 50 });
    assert.deepEqual([0, 1, 10].map((n) => ceiling(flat, n)), [50, 50, 50]);
  });

  test("full jitter: the delay is the ceiling times random(), from 0 up to the ceiling", () => {
    const p = new ReconnectPolicy();
    assert.equal(p.delay(3, () => 0), 0);
    assert.equal(p.delay(3, () => 0.25), 200);
    assert.equal(p.delay(10, () => 0.5), 2500);
  });

  test("with Math.random the delays spread uniformly over [0, ceiling)", () => {
    const p = new ReconnectPolicy();
    const n = 4000;
    const delays = Array.from({ length: n }, () => p.delay(4)); // ceiling 1600
    assert.ok(delays.every((d) => d >= 0 && d < 1600));
    const mean = delays.reduce((a, b) => a + b, 0) / n;
    assert.ok(Math.abs(mean - 800) < 60, `mean ${mean}`); // sd of the mean: about 7
    for (let q = 0; q < 4; q++) {
      const share = delays.filter((d) => d >= q * 400 && d < (q + 1) * 400).length / n;
      assert.ok(share > 0.2 && share < 0.3, `quarter ${q}: ${share}`);
    }
    // Clients that failed together do not retry together.
    assert.ok(new Set(delays.map((d) => Math.floor(d))).size > 1000);
  });

  test("refuses settings that would not back off", () => {
    assert.throws(() => new ReconnectPolicy({ initialMs: 0 }), RangeError);
    assert.throws(() => new ReconnectPolicy({ initialMs: -1 }), RangeError);
    assert.throws(() => new ReconnectPolicy({ multiplier: 0.5 }), RangeError);
    assert.throws(() => new ReconnectPolicy({ initialMs: 200, maxMs: 100 }), RangeError);
  });
});

/** A Transport whose gateways follow a script, one step per connection attempt:
 * "refuse" (the socket never opens), "drop" (Welcome, an empty sync, then the
 * connection breaks: 1006) or "goAway" (Welcome, an empty sync, then GoAway with
 * no delay). Past the script's end every attempt is refused. */
class ScriptedTransport {
  constructor(script) {
    this.script = script;
    this.attempts = [];
  }

  async connect(url, handlers) {
    const step = this.script[this.attempts.length] ?? "refuse";
    this.attempts.push(url);
    if (step === "refuse") throw new Error(`cannot connect to ${url}`);
    let open = true;
    const later = (fn) =>
      setImmediate(() => {
        if (open) fn();
      });
    const end = (code, reason) => {
      if (!open) return;
      open = false;
      handlers.onClose(code, reason);
    };
    const reply = (frame) => handlers.onMessage(toBinary(ServerFrameSchema, create(ServerFrameSchema, { frame })));
    return {
      send: (data) => {
        const f = fromBinary(ClientFrameSchema, data).frame;
        if (f.case === "hello") {
          later(() =>
            reply({
              case: "welcome",
              value: { userId: "u", deviceId: "d", connectionId: `c${this.attempts.length}`, nextClientId: 1n, sendWindow: 8, storeEpoch: "e" },
            }),
          );
        } else if (f.case === "request" && f.value.method === "Sync") {
          const payload = toBinary(SyncResponseSchema, create(SyncResponseSchema, { hasMore: false, storeEpoch: "e" }));
          later(() => reply({ case: "response", value: { id: f.value.id, code: 0, payload } }));
          if (step === "drop") later(() => later(() => end(1006, "")));
          if (step === "goAway") later(() => later(() => reply({ case: "goAway", value: { reconnectAfterMs: 0, reason: "draining" } })));
        }
      },
      close: (code, reason) => setImmediate(() => end(code ?? 1000, reason ?? "")),
      abort: () => setImmediate(() => end(1006, "")),
    };
  }
}

/** Records the failure count of every reconnect delay asked for; waits as
 * `wait(failures)` says (0: at once). */
class RecordingPolicy extends ReconnectPolicy {
  constructor(wait = () => 0) {
    super();
    this.wait = wait;
    this.counts = [];
  }

  delay(failures) {
    this.counts.push(failures);
    return this.wait(failures);
  }
}

async function until(cond, what, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe("Client reconnect backoff", () => {
  const client = (transport, reconnect) =>
    new Client({ url: ["ws://g1/v1/connect", "ws://g2/v1/connect"], token: "t", transport, reconnect, random: () => 0 });

  test("consecutive failures grow the count; a connection that got a Welcome resets it; gateways rotate", async () => {
    const script = ["refuse", "refuse", "refuse", "drop", "refuse", "refuse", "drop", "refuse"];
    const transport = new ScriptedTransport(script);
    const policy = new RecordingPolicy();
    const c = client(transport, policy);
    try {
      await c.start({ waitReady: false });
      await until(() => policy.counts.length >= script.length, "the scripted attempts");
    } finally {
      await c.close();
    }
    assert.deepEqual(policy.counts.slice(0, script.length), [0, 1, 2, 0, 1, 2, 0, 1]);
    assert.deepEqual(transport.attempts.slice(0, 4), ["ws://g1/v1/connect", "ws://g2/v1/connect", "ws://g1/v1/connect", "ws://g2/v1/connect"]);
  });

  test("reconnectNow() ends the wait at once and starts the count again", async () => {
    const transport = new ScriptedTransport([]);
    // No wait for the first three failures, then an hour.
    const policy = new RecordingPolicy((failures) => (failures < 3 ? 0 : 3_600_000));
    const c = client(transport, policy);
    try {
      await c.start({ waitReady: false });
      await until(() => policy.counts.length === 4, "four refused attempts");
      assert.equal(transport.attempts.length, 4); // waiting the hour now
      c.reconnectNow();
      await until(() => policy.counts.length === 8, "four more attempts from a count of 0");
      assert.equal(transport.attempts.length, 8);
    } finally {
      await c.close();
    }
    assert.deepEqual(policy.counts, [0, 1, 2, 3, 0, 1, 2, 3]);
  });

  test("a GoAway waits its own delay (not the policy's), and its Welcome resets the count", async () => {
    const transport = new ScriptedTransport(["refuse", "refuse", "goAway", "refuse"]);
    const policy = new RecordingPolicy();
    const c = client(transport, policy);
    try {
      await c.start({ waitReady: false });
      await until(() => policy.counts.length >= 3, "the attempt after the GoAway");
    } finally {
      await c.close();
    }
    // Two refusals (0, 1); the GoAway's reconnect asks the policy nothing; the
    // refusal after it is the first failure since a Welcome.
    assert.deepEqual(policy.counts.slice(0, 3), [0, 1, 0]);
    assert.ok(transport.attempts.length >= 4);
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
