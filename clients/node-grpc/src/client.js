// A Node client of the native gRPC API, on @grpc/grpc-js alone (no Python, no
// generated code): the message types are loaded at run time from protos/ by
// @grpc/proto-loader, so they cannot drift from the contract.
//
// It follows docs/protocol.md: `authorization: Bearer <token>` on every call;
// sends in client_id order within the server's send window, each kept and
// retransmitted (same client_id, same client_msg_id) until its SendAck; pushes
// applied in seq order (a duplicate is acknowledged again and dropped, a gap or a
// head above `local` triggers a Sync, pushes that arrive during a sync wait for
// it) and acknowledged with cumulative DeliverAcks. It does not reconnect: it is
// a proof of the wire contract and a starting point, not an SDK.
//
// int64 fields are decoded as strings (proto-loader's `longs: String`) and
// handed to callers as BigInt: seq, msg_id and seqsvc values are 64-bit.

import { randomUUID } from "node:crypto";
import { EventEmitter } from "node:events";
import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HERE = path.dirname(fileURLToPath(import.meta.url));
/** protos/ of this repository (override with `protosDir`). */
export const DEFAULT_PROTOS_DIR = path.resolve(HERE, "../../../protos");

const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto files (client_msg_id)
  longs: String,
  enums: String,
  bytes: Buffer,
  defaults: true,
  oneofs: true, // a decoded ServerFrame names its set field in `frame`
};

/** The gRPC package objects of the gateway and seqsvc APIs. */
export function loadApi(protosDir = DEFAULT_PROTOS_DIR) {
  const definition = protoLoader.loadSync(
    ["im/gateway/v1/gateway.proto", "im/seqsvc/v1/seqsvc.proto"],
    { ...LOADER_OPTIONS, includeDirs: [protosDir] },
  );
  const loaded = grpc.loadPackageDefinition(definition);
  return { gateway: loaded.im.gateway.v1, seqsvc: loaded.im.seqsvc.v1 };
}

/** Plaintext only when asked for (a local stack); TLS with the system's CAs otherwise. */
function channelCredentials({ insecure = false, rootCerts } = {}) {
  return insecure ? grpc.credentials.createInsecure() : grpc.credentials.createSsl(rootCerts);
}

function unary(client, method, request, metadata, timeoutMs) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutMs);
    client[method](request, metadata, { deadline }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

/** A `Promise` with its resolve/reject exposed (Promise.withResolvers is Node 22+). */
function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

export class SendFailed extends Error {
  /** A SendError with retryable=false: the message will never be stored. */
  constructor(sendError) {
    super(`send refused: ${sendError.code}: ${sendError.reason}`);
    this.sendError = sendError;
  }
}

/**
 * One device connection to a gateway: `Gateway.Connect` plus the unary `Sync`.
 *
 * Events: "message" ({seq, message, via: "push" | "sync"}) once per timeline entry, in seq order, from
 * pushes or syncs alike; "welcome"; "frame" (every decoded ServerFrame); "closed"
 * (err or null) when the stream ends. Kick and GoAway end the stream.
 */
export class GatewayClient extends EventEmitter {
  constructor({
    address,
    token,
    insecure = false,
    rootCerts,
    protosDir,
    api,
    local = 0n,
    retransmitMs = 3000,
    maxAttempts = 5,
    syncPageSize = 100,
    callTimeoutMs = 10000,
  }) {
    super();
    const { gateway } = api ?? loadApi(protosDir);
    this._stub = new gateway.Gateway(address, channelCredentials({ insecure, rootCerts }));
    this._metadata = new grpc.Metadata();
    this._metadata.add("authorization", `Bearer ${token}`);
    this.local = BigInt(local); // highest applied seq: the sync cursor
    this.welcome = null;
    this.stats = { pushes: 0, duplicatePushes: 0, syncs: 0, retransmits: 0 };
    this._retransmitMs = retransmitMs;
    this._maxAttempts = maxAttempts;
    this._syncPageSize = syncPageSize;
    this._callTimeoutMs = callTimeoutMs;
    this._call = null;
    this._closed = false;
    this._window = 1;
    this._nextClientId = 1;
    this._queue = []; // sends not yet written, in submission order
    this._inFlight = new Map(); // client_id -> send, written and not yet answered
    this._syncing = null; // the running catch-up, if any
    this._buffered = new Map(); // seq -> push that arrived during a sync or past a gap
    this._head = 0n;
    this._firstSync = null;
  }

  /** Opens the stream; resolves with Welcome after the first catch-up sync. */
  async connect() {
    const welcomed = deferred();
    const call = this._stub.Connect(this._metadata);
    this._call = call;
    call.on("data", (frame) => {
      try {
        this._onFrame(frame, welcomed);
      } catch (err) {
        this._fail(err);
      }
    });
    call.on("error", (err) => {
      welcomed.reject(err);
      this._fail(err);
    });
    call.on("end", () => {
      welcomed.reject(new Error("stream ended before Welcome"));
      this._fail(null);
    });
    const welcome = await welcomed.promise;
    await this._firstSync;
    return welcome;
  }

  /**
   * Sends `body` to `conversationId`. Resolves with the SendAck (the message is
   * durable); rejects with SendFailed if the server refuses it for good, or an
   * Error if it stays unanswered after `maxAttempts` transmissions. Messages are
   * stored in the order of the calls.
   */
  send(conversationId, body, { clientMsgId = randomUUID(), contentType = "CONTENT_TYPE_TEXT" } = {}) {
    if (this._closed) return Promise.reject(new Error("client closed"));
    const done = deferred();
    this._queue.push({
      clientId: 0,
      attempts: 0,
      timer: null,
      frame: {
        client_msg_id: clientMsgId,
        conversation_id: conversationId,
        body: Buffer.isBuffer(body) ? body : Buffer.from(String(body)),
        content_type: contentType,
      },
      done,
    });
    this._pump();
    return done.promise;
  }

  /** One page of the caller's timeline after `afterSeq`. */
  sync(afterSeq, limit = this._syncPageSize) {
    const request = { after_seq: String(afterSeq), limit };
    return unary(this._stub, "Sync", request, this._metadata, this._callTimeoutMs);
  }

  /**
   * Syncs from `local` until has_more is false, applying each entry, then applies
   * the buffered pushes that continue it and acknowledges the highest. Concurrent
   * callers share one run; a head or gap seen meanwhile starts another after it.
   */
  catchUp() {
    if (!this._syncing) {
      this._syncing = this._catchUp().finally(() => {
        this._syncing = null;
      });
    }
    return this._syncing;
  }

  async _catchUp() {
    this.stats.syncs += 1;
    for (;;) {
      const page = await this.sync(this.local);
      for (const entry of page.entries) this._apply(BigInt(entry.seq), entry.message, "sync");
      if (!page.has_more) break;
    }
    this._drainBuffer();
    this.ackDelivered();
    if (this._head > this.local) {
      // Entries named by a head are not all visible yet; look again shortly (the
      // gateway's own catch-up pushes them too).
      setTimeout(() => this._closed || this.catchUp().catch((e) => this._fail(e)), 200);
    }
  }

  /** Cumulative: "I have every entry up to `local`". */
  ackDelivered() {
    if (this._call && !this._closed && this.local > 0n) {
      this._call.write({ deliver_ack: { seq: this.local.toString() } });
    }
  }

  close() {
    if (this._closed) return;
    this._closed = true;
    this._call?.end();
    this._call?.cancel();
    this._stub.close();
    this._rejectAll(new Error("client closed"));
  }

  // -- downstream -----------------------------------------------------------

  _onFrame(frame, welcomed) {
    this.emit("frame", frame);
    const body = frame[frame.frame];
    switch (frame.frame) {
      case "welcome":
        this.welcome = body;
        this._window = Math.max(1, body.send_window);
        this._noteHead(BigInt(body.head_seq));
        // Sync from `local` before trusting pushes: they wait in the buffer.
        this._firstSync = this.catchUp();
        this._firstSync.catch(() => {}); // connect() reports it
        this.emit("welcome", body);
        welcomed.resolve(body);
        this._pump();
        break;
      case "send_ack":
        this._onSendAck(body);
        break;
      case "send_error":
        this._onSendError(body);
        break;
      case "push":
        this._onPush(BigInt(body.seq), body.message);
        break;
      case "head":
        this._noteHead(BigInt(body.seq));
        if (this._head > this.local) this.catchUp().catch((e) => this._fail(e));
        break;
      case "pong":
        this._noteHead(BigInt(body.head_seq));
        break;
      case "kick":
      case "go_away":
        this._fail(new Error(`${frame.frame}: ${body.reason}`));
        break;
      default:
        // Frames this client does not know (typing, presence, and any added later)
        // are ignored: the versioning policy in docs/protocol.md relies on it.
        break;
    }
  }

  _noteHead(seq) {
    if (seq > this._head) this._head = seq;
  }

  _onPush(seq, message) {
    this.stats.pushes += 1;
    if (seq <= this.local) {
      this.stats.duplicatePushes += 1;
      this.ackDelivered();
      return;
    }
    this._buffered.set(seq, message);
    if (this._syncing) return; // applied when the sync ends, never ahead of it
    this._drainBuffer();
    if (this._buffered.size > 0) {
      this.catchUp().catch((e) => this._fail(e)); // a gap
    } else {
      this.ackDelivered();
    }
  }

  /** Applies buffered pushes that continue `local` (seqs have gaps only a sync can
   * vouch for, so a push above local + 1 waits for one). */
  _drainBuffer() {
    for (const seq of [...this._buffered.keys()].sort((a, b) => (a < b ? -1 : 1))) {
      if (seq <= this.local) {
        this._buffered.delete(seq);
      } else if (seq === this.local + 1n) {
        this._apply(seq, this._buffered.get(seq), "push");
        this._buffered.delete(seq);
      }
    }
  }

  _apply(seq, message, via) {
    if (seq <= this.local) return;
    this.local = seq;
    this.emit("message", { seq, message, via });
  }

  // -- upstream -------------------------------------------------------------

  /** Writes queued sends while the window has room, with consecutive client_ids. */
  _pump() {
    if (!this.welcome || this._closed) return;
    while (this._queue.length > 0 && this._inFlight.size < this._window) {
      const send = this._queue.shift();
      send.clientId = this._nextClientId++;
      this._inFlight.set(send.clientId, send);
      this._transmit(send);
    }
  }

  _transmit(send) {
    if (send.attempts >= this._maxAttempts) {
      this._inFlight.delete(send.clientId);
      send.done.reject(new Error(`no answer to client_id ${send.clientId} after ${send.attempts} attempts`));
      return;
    }
    if (send.attempts > 0) this.stats.retransmits += 1;
    send.attempts += 1;
    this._call.write({ send: { ...send.frame, client_id: String(send.clientId) } });
    clearTimeout(send.timer);
    const backoff = this._retransmitMs * 2 ** (send.attempts - 1);
    send.timer = setTimeout(() => this._transmit(send), backoff);
  }

  _onSendAck(ack) {
    const send = this._inFlight.get(Number(ack.client_id));
    if (!send || send.frame.client_msg_id !== ack.client_msg_id) return; // a late repeat
    clearTimeout(send.timer);
    this._inFlight.delete(send.clientId);
    send.done.resolve(ack);
    this._pump();
  }

  /**
   * Any SendError frees its client_id, and the gateway drops everything pipelined
   * behind it: take every unanswered send back into the queue, in order, and
   * restart numbering at the refused id (or `expected_client_id`).
   */
  _onSendError(error) {
    const refused = Number(error.client_id);
    const send = this._inFlight.get(refused);
    if (!send || send.frame.client_msg_id !== error.client_msg_id) return;
    const unanswered = [...this._inFlight.values()].sort((a, b) => a.clientId - b.clientId);
    for (const s of unanswered) clearTimeout(s.timer);
    this._inFlight.clear();
    const outOfOrder = error.code === "SEND_ERROR_CODE_OUT_OF_ORDER";
    this._nextClientId = outOfOrder ? Number(error.expected_client_id) : refused;
    const retry = unanswered.filter((s) => {
      if (outOfOrder || error.retryable || s !== send) return true;
      s.done.reject(new SendFailed(error));
      return false;
    });
    this._queue.unshift(...retry);
    if (error.retryable && !outOfOrder) {
      setTimeout(() => this._pump(), this._retransmitMs); // a backend is busy or down
    } else {
      this._pump();
    }
  }

  _rejectAll(err) {
    for (const s of [...this._inFlight.values(), ...this._queue]) {
      clearTimeout(s.timer);
      s.done.reject(err);
    }
    this._inFlight.clear();
    this._queue = [];
  }

  _fail(err) {
    if (!this._closed) {
      this._closed = true;
      this._call?.cancel();
      this._stub.close();
      this._rejectAll(err ?? new Error("stream ended"));
      this.emit("closed", err);
    }
  }
}

/** The sequence-number service (im.seqsvc.v1.SeqService): values as BigInt. */
export class SeqClient {
  constructor({ address, insecure = false, rootCerts, protosDir, api, callTimeoutMs = 5000 }) {
    const { seqsvc } = api ?? loadApi(protosDir);
    this._stub = new seqsvc.SeqService(address, channelCredentials({ insecure, rootCerts }));
    this._metadata = new grpc.Metadata();
    this._timeoutMs = callTimeoutMs;
  }

  /** The next value of `key`: above every value handed out for it before. */
  async next(key) {
    const r = await unary(this._stub, "Next", { key }, this._metadata, this._timeoutMs);
    return BigInt(r.value);
  }

  /** One value per key, in order; a repeated key gets increasing values. */
  async nextBatch(keys) {
    const r = await unary(this._stub, "NextBatch", { keys }, this._metadata, this._timeoutMs);
    return r.values.map(BigInt);
  }

  /** The highest value handed out for `key`, without advancing it. */
  async current(key) {
    const r = await unary(this._stub, "Current", { key }, this._metadata, this._timeoutMs);
    return BigInt(r.value);
  }

  close() {
    this._stub.close();
  }
}

/** `d:<a>:<b>` with the two user ids in byte order (docs/protocol.md). */
export function directConversation(userA, userB) {
  const [a, b] = Buffer.compare(Buffer.from(userA), Buffer.from(userB)) < 0 ? [userA, userB] : [userB, userA];
  return `d:${a}:${b}`;
}
