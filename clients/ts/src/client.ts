/**
 * The protocol client: one device's connection to the IM gateways over
 * WebSocket, for browsers and Node. The algorithm is the Python SDK's
 * (libs/imclient/client.py); docs/protocol.md describes the wire side.
 *
 * ```ts
 * const client = new Client({ url: "wss://chat.example/v1/connect", token, store: new IndexedDBStore() });
 * client.on("message", (m) => show(m));          // timeline order, each once
 * await client.start();                          // connected and caught up
 * const ack = await client.send("d:alice:bob", "hi"); // durable when it resolves
 * ```
 *
 * Guarantees
 * - Sending: `submit()`/`send()` write the message to the store's outbox before
 *   its first Send frame; it is kept and retransmitted (same client_msg_id, a
 *   UUIDv7) across retransmits, reconnects and restarts (a page reload, with
 *   `IndexedDBStore`) until the gateway's SendAck (durable) or a refusal for good
 *   (`SendFailed`). Messages are sent, and resent after a reconnect, in submit
 *   order, with new client_ids from 1 on each connection. At most the send window
 *   is unanswered; only the oldest unanswered send runs a retransmit timer, and
 *   after `maxAttempts` the client reconnects. On start the outbox is sent first,
 *   in its order; outcomes of every message (restored ones too) are emitted as
 *   "sendResult" before the outbox forgets them (so at least once across a crash:
 *   key effects on clientMsgId).
 * - Receiving: "message" events in timeline (seq) order with no gap, each msg_id
 *   once per store (dedup by seq in the receiver, by msg_id against the store).
 *   After every (re)connect the client syncs from its cursor before trusting
 *   pushes; pushes during a sync are buffered and never skip what the sync has not
 *   returned. A gap, or a head (Welcome, Pong, Head) above the local seq, starts
 *   the same sync. DeliverAcks are cumulative and coalesced. The cursor is stored
 *   after the listeners returned (at least once across a crash).
 * - Store epoch: when the server names another store epoch than the cursor's, the
 *   cursor and the seen ids are forgotten and the timeline is synced from 0.
 * - Connection: reconnects with exponential backoff and full jitter, rotating
 *   through the URLs; GoAway reconnects after the delay it names; Kick (4001) and
 *   a refused token (4401) stop the client for good (state "closed", `stopped`).
 */
import { create, fromBinary, toBinary, type DescMessage, type MessageShape, type MessageInitShape } from "@bufbuild/protobuf";
import type { Conversation as PbConversation, Message as PbMessage } from "./gen/im/common/v1/common_pb.js";
import {
  ClientFrameSchema,
  CreateGroupRequestSchema,
  CreateGroupResponseSchema,
  GetPresenceRequestSchema,
  GetPresenceResponseSchema,
  GetReceiptsRequestSchema,
  GetReceiptsResponseSchema,
  HistoryRequestSchema,
  HistoryResponseSchema,
  ListConversationsRequestSchema,
  ListConversationsResponseSchema,
  ServerFrameSchema,
  SyncRequestSchema,
  SyncResponseSchema,
  type ClientFrame,
  type ServerFrame,
  type Welcome,
} from "./gen/im/gateway/v1/gateway_pb.js";
import { AuthError, ClientClosed, codeName, Kicked, OutboxFull, RpcError, SendFailed, Status } from "./errors.js";
import { uuid7 } from "./ids.js";
import { ReconnectPolicy, RetransmitPolicy } from "./policy.js";
import { Receiver, type Entry } from "./receiver.js";
import { Outgoing, SendWindow } from "./sender.js";
import { MemoryStore, type OutboxEntry, type Store } from "./store.js";
import { WebSocketTransport, type Socket, type Transport } from "./transport.js";

export type ClientState = "disconnected" | "connecting" | "connected" | "closed";

/** ContentType of im.common.v1 (TEXT = 1). */
export const CONTENT_TEXT = 1;
/** MessageKind of im.common.v1. */
export const Kind = { MESSAGE: 1, EDIT: 2, RECALL: 3, READ: 4, DELIVERED: 5, DELETE_FOR_ME: 6 } as const;

/** A stored message or conversation event, with plain numbers for the ids. */
export interface ChatMessage {
  /** Position in this user's timeline (0 for History results). */
  seq: number;
  msgId: number;
  conversationId: string;
  senderId: string;
  senderDeviceId: string;
  clientMsgId: string;
  convSeq: number;
  contentType: number;
  body: Uint8Array;
  /** The body as UTF-8 text. */
  text: string;
  serverTimeMs: number;
  kind: number;
  targetConvSeq: number;
  editedAtMs: number;
  recalled: boolean;
  deletedForMe: boolean;
}

export interface ConversationInfo {
  conversationId: string;
  kind: number;
  name: string;
  memberIds: string[];
  lastConvSeq: number;
  ownerId: string;
  readConvSeq: number;
  unreadCount: number;
  unreadCapped: boolean;
  lastActivityMs: number;
  peerReadConvSeq: number;
  peerDeliveredConvSeq: number;
}

export interface SendResult {
  clientMsgId: string;
  msgId: number;
  seq: number;
  convSeq: number;
  serverTimeMs: number;
  /** The server had this client_msg_id already (a resend): nothing new stored. */
  duplicate: boolean;
}

/** The final outcome of a message: acknowledged (`result`) or refused (`error`). */
export interface SendOutcome {
  clientMsgId: string;
  conversationId: string;
  result?: SendResult;
  error?: SendFailed;
  /** Loaded from the outbox: submitted by an earlier client on this store. */
  restored: boolean;
}

/** A message not yet acknowledged, as `pending()` lists it. */
export interface PendingMessage {
  clientMsgId: string;
  conversationId: string;
  body: Uint8Array;
  text: string;
  kind: number;
  restored: boolean;
}

export interface SubmitOptions {
  contentType?: number;
  /** Re-send a message under its earlier id (joins it if it was restored). */
  clientMsgId?: string;
  kind?: number;
  targetConvSeq?: number;
}

/** Fault injection for tests of the protocol against a real server. */
export interface DebugHooks {
  /** Called with every Send frame written (retransmits too). */
  onSendFrame?: (clientId: number, clientMsgId: string, retransmit: boolean) => void;
  /** Return true to ignore this push, as if it were lost on the way. */
  dropPush?: (seq: number) => boolean;
}

export interface ClientStats {
  connects: number;
  sendsWritten: number;
  retransmits: number;
  sendAcks: number;
  sendFailures: number;
  pushes: number;
  duplicatePushes: number;
  bufferedPushes: number;
  gaps: number;
  syncs: number;
  syncPages: number;
  syncEntries: number;
  syncFailures: number;
  heads: number;
  pongs: number;
  syncsByHead: number;
  pushesDropped: number;
  acksSent: number;
  duplicatesSuppressed: number;
  handed: number;
  lastSeq: number;
  committedSeq: number;
  outboxRestored: number;
  epochResets: number;
}

export interface ClientOptions {
  /** WebSocket URL(s) of the gateways (".../v1/connect"), tried in turn. */
  url: string | string[];
  /** The device's token, or a function returning it (called before every attempt). */
  token: string | (() => string | Promise<string>);
  /** Cursor, seen ids and outbox: `IndexedDBStore` in browsers; default in memory. */
  store?: Store;
  /** `<user>/<device>` of the token: the outbox is loaded by start() and
   * submits are durable without a connection (a page that starts offline). */
  account?: string;
  sendWindow?: number;
  retransmit?: RetransmitPolicy;
  reconnect?: ReconnectPolicy;
  syncPageSize?: number;
  ackDelayMs?: number;
  commitIntervalMs?: number;
  /** Send a Ping this often (its Pong carries the head); null: never (default). */
  pingIntervalMs?: number | null;
  welcomeTimeoutMs?: number;
  rpcTimeoutMs?: number;
  transport?: Transport;
  random?: () => number;
  hooks?: DebugHooks;
}

type Events = {
  message: (m: ChatMessage) => void | Promise<void>;
  sendResult: (o: SendOutcome) => void | Promise<void>;
  state: (s: ClientState) => void;
  /** Informational: why a connection ended, a sync failed, ... */
  log: (line: string) => void;
};

class SessionLost extends Error {}
class GoAway extends Error {
  constructor(
    readonly delayMs: number,
    reason: string,
  ) {
    super(reason);
  }
}

interface Deferred<T> {
  promise: Promise<T>;
  resolve: (v: T) => void;
  reject: (e: unknown) => void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export function toChatMessage(m: PbMessage | undefined, seq: number): ChatMessage {
  const body = m?.body ?? new Uint8Array();
  return {
    seq,
    msgId: Number(m?.msgId ?? 0n),
    conversationId: m?.conversationId ?? "",
    senderId: m?.senderId ?? "",
    senderDeviceId: m?.senderDeviceId ?? "",
    clientMsgId: m?.clientMsgId ?? "",
    convSeq: Number(m?.convSeq ?? 0n),
    contentType: m?.contentType ?? 0,
    body,
    text: decoder.decode(body),
    serverTimeMs: Number(m?.serverTimeMs ?? 0n),
    kind: m?.kind || Kind.MESSAGE,
    targetConvSeq: Number(m?.targetConvSeq ?? 0n),
    editedAtMs: Number(m?.editedAtMs ?? 0n),
    recalled: m?.recalled ?? false,
    deletedForMe: m?.deletedForMe ?? false,
  };
}

export function toConversationInfo(c: PbConversation): ConversationInfo {
  return {
    conversationId: c.conversationId,
    kind: c.kind,
    name: c.name,
    memberIds: [...c.memberIds],
    lastConvSeq: Number(c.lastConvSeq),
    ownerId: c.ownerId,
    readConvSeq: Number(c.readConvSeq),
    unreadCount: Number(c.unreadCount),
    unreadCapped: c.unreadCapped,
    lastActivityMs: Number(c.lastActivityMs),
    peerReadConvSeq: Number(c.peerReadConvSeq),
    peerDeliveredConvSeq: Number(c.peerDeliveredConvSeq),
  };
}

const RETRYABLE_RPC = new Set<number>([Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED]);

interface PendingCall {
  resolve: (payload: Uint8Array) => void;
  reject: (e: unknown) => void;
  timer: ReturnType<typeof setTimeout>;
}

interface Session {
  id: number;
  socket: Socket;
  welcomed: boolean;
  ended: Deferred<never>;
  /** Frames handled one after another (the Welcome's handling awaits the store). */
  chain: Promise<void>;
  calls: Map<number, PendingCall>;
}

export class Client {
  readonly urls: string[];
  userId: string | null = null;
  deviceId: string | null = null;
  connectionId: string | null = null;
  maxBodyBytes = 0;
  /** Why the last connection attempt failed (null once connected). */
  lastError: string | null = null;
  /** Why the client stopped by itself for good (Kicked, AuthError), or null. */
  stopped: ClientClosed | null = null;
  committedSeq = 0;
  readonly hooks: DebugHooks;

  private readonly token: ClientOptions["token"];
  private readonly store: Store;
  private readonly accountArg: string | undefined;
  private readonly window: SendWindow;
  private readonly reconnectPolicy: ReconnectPolicy;
  private readonly pageSize: number;
  private readonly ackDelayMs: number;
  private readonly commitIntervalMs: number;
  private readonly pingIntervalMs: number | null;
  private readonly welcomeTimeoutMs: number;
  private readonly rpcTimeoutMs: number;
  private readonly transport: Transport;
  private readonly random: () => number;
  private readonly listeners: { [K in keyof Events]: Set<Events[K]> } = {
    message: new Set(),
    sendResult: new Set(),
    state: new Set(),
    log: new Set(),
  };

  private _state: ClientState = "disconnected";
  private account: string | null = null;
  private storeEpoch = "";
  private generation = 0;
  private receiver: Receiver<ChatMessage> | null = null;
  private session: Session | null = null;
  private sessionSeq = 0;
  private started = false;
  private closing = false;
  private runDone: Promise<void> | null = null;
  private wakeSleep: (() => void) | null = null;
  private backoffReset = false;

  // Sending and the outbox.
  private futures = new Map<string, Deferred<SendResult>>();
  private unsaved = new Map<string, Outgoing & { ticket: number }>();
  private finished: SendOutcome[] = [];
  private nextOrder = 0;
  private tickets = 0;
  private persistedTicket = 0;
  private persistWaiters: { target: number; d: Deferred<void> }[] = [];
  private outboxBusy: Promise<void> | null = null;
  private outboxAgain = false;

  // The pump (the only writer of Send, DeliverAck and Ping frames).
  private pumpScheduled = false;
  private pumpTimer: ReturnType<typeof setTimeout> | null = null;
  private ackAt: number | null = null;
  private pingAt: number | null = null;
  private pingNonce = 0n;

  // Sync.
  private syncRunning = false;

  // Delivery to the app.
  private inbox: ChatMessage[] = [];
  private dispatching = false;
  private recent = new Set<number>();
  private commitBatch: [number, number][] = [];
  private commitSeq = 0;
  private commitTimer: ReturnType<typeof setTimeout> | null = null;
  private commitBusy: Promise<void> = Promise.resolve();

  private ready = deferred<void>();
  private readyFlag = false;
  private stats_: ClientStats = {
    connects: 0, sendsWritten: 0, retransmits: 0, sendAcks: 0, sendFailures: 0, pushes: 0,
    duplicatePushes: 0, bufferedPushes: 0, gaps: 0, syncs: 0, syncPages: 0, syncEntries: 0,
    syncFailures: 0, heads: 0, pongs: 0, syncsByHead: 0, pushesDropped: 0, acksSent: 0,
    duplicatesSuppressed: 0, handed: 0, lastSeq: 0, committedSeq: 0, outboxRestored: 0, epochResets: 0,
  };
  private nextCallId = 1;

  constructor(o: ClientOptions) {
    this.urls = typeof o.url === "string" ? [o.url] : [...o.url];
    if (!this.urls.length) throw new RangeError("no gateway URL");
    this.token = o.token;
    this.store = o.store ?? new MemoryStore();
    this.accountArg = o.account;
    this.window = new SendWindow(o.retransmit ?? new RetransmitPolicy(), o.sendWindow ?? 64);
    this.reconnectPolicy = o.reconnect ?? new ReconnectPolicy();
    this.pageSize = o.syncPageSize ?? 500;
    this.ackDelayMs = o.ackDelayMs ?? 10;
    this.commitIntervalMs = o.commitIntervalMs ?? 50;
    this.pingIntervalMs = o.pingIntervalMs ?? null;
    this.welcomeTimeoutMs = o.welcomeTimeoutMs ?? 10_000;
    this.rpcTimeoutMs = o.rpcTimeoutMs ?? 10_000;
    this.transport = o.transport ?? new WebSocketTransport();
    this.random = o.random ?? Math.random;
    this.hooks = o.hooks ?? {};
    this.ready.promise.catch(() => {});
  }

  // -- events ------------------------------------------------------------------

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof Events>(event: K, fn: Events[K]): () => void {
    this.listeners[event].add(fn);
    return () => this.listeners[event].delete(fn);
  }

  private emitSync<K extends keyof Events>(event: K, ...args: Parameters<Events[K]>): void {
    for (const fn of this.listeners[event]) {
      try {
        (fn as (...a: unknown[]) => unknown)(...args);
      } catch (e) {
        console.error(`imclient: a ${event} listener failed`, e);
      }
    }
  }

  private async emitAwait<K extends "message" | "sendResult">(event: K, arg: Parameters<Events[K]>[0]): Promise<void> {
    for (const fn of this.listeners[event]) {
      try {
        await (fn as (a: unknown) => unknown)(arg);
      } catch (e) {
        // A failing listener must not stall the timeline or keep a message in the outbox.
        console.error(`imclient: a ${event} listener failed`, e);
      }
    }
  }

  private log(line: string): void {
    this.emitSync("log", line);
  }

  get state(): ClientState {
    return this._state;
  }

  private setState(s: ClientState): void {
    if (s === this._state) return;
    this._state = s;
    this.emitSync("state", s);
  }

  get isReady(): boolean {
    return this.readyFlag;
  }

  /** The highest seq received in order (in memory). */
  get lastSeq(): number {
    return this.receiver?.seq ?? this.committedSeq;
  }

  get epoch(): string {
    return this.storeEpoch;
  }

  get stats(): ClientStats {
    const s = { ...this.stats_ };
    s.sendsWritten = this.window.writes;
    s.retransmits = this.window.retransmits;
    const r = this.receiver;
    if (r) {
      s.pushes = r.pushes;
      s.duplicatePushes = r.duplicates;
      s.bufferedPushes = r.buffered;
      s.gaps = r.gaps;
      s.lastSeq = r.seq;
      s.syncsByHead = r.headSyncs;
    }
    s.committedSeq = this.committedSeq;
    return s;
  }

  /** Messages submitted (or restored) and not yet acknowledged or refused. */
  pending(): PendingMessage[] {
    const all = [...this.window.list(), ...this.unsaved.values()];
    return all.map((m) => ({
      clientMsgId: m.clientMsgId,
      conversationId: m.conversationId,
      body: m.body,
      text: decoder.decode(m.body),
      kind: m.kind,
      restored: m.restored,
    }));
  }

  // -- lifecycle ---------------------------------------------------------------

  /** Opens the store and starts connecting. With `waitReady` (default), resolves
   * once connected and caught up by the first sync (rejects with the terminal
   * error, or after `timeoutMs`). */
  async start(o: { waitReady?: boolean; timeoutMs?: number } = {}): Promise<void> {
    if (!this.started) {
      this.started = true;
      await this.store.open();
      if (this.accountArg !== undefined) await this.openAccount(this.accountArg);
      this.runDone = this.run();
    }
    if (o.waitReady ?? true) await this.waitReady(o.timeoutMs);
  }

  /** Waits until connected and synced. */
  async waitReady(timeoutMs?: number): Promise<void> {
    if (this.stopped) throw this.stopped;
    if (timeoutMs === undefined) return this.ready.promise;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`not connected to ${this.urls.join(", ")} after ${timeoutMs} ms (${this.lastError ?? "no error yet"})`)),
        timeoutMs,
      );
    });
    try {
      await Promise.race([this.ready.promise, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Stops the client. Pending sends reject with ClientClosed and stay in the
   * store's outbox (written now if they were not yet) for the next client.
   * Idempotent. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    this.endSession(new ClientClosed("client closed"), 1000);
    this.wakeSleep?.();
    await this.runDone;
    this.stop(this.stopped ?? new ClientClosed("client closed"));
    if (this.started) {
      if (this.commitTimer) clearTimeout(this.commitTimer);
      try {
        await this.flushCommits();
        await this.drainOutbox();
      } finally {
        for (const w of this.persistWaiters) w.d.reject(new ClientClosed("closed before these messages were written"));
        this.persistWaiters = [];
        await this.store.close();
      }
    }
    this.setState("closed");
  }

  /** Waits until every message submitted so far (and every restored one) is
   * acknowledged or refused, and the outbox knows it. */
  async flush(): Promise<void> {
    await Promise.allSettled([...this.futures.values()].map((d) => d.promise));
    await this.drainOutbox();
  }

  /** Resolves once every message submitted before this call is in the store's
   * outbox (durable: with IndexedDBStore it survives a reload). */
  persisted(): Promise<void> {
    const target = this.tickets;
    if (this.persistedTicket >= target) return Promise.resolve();
    const d = deferred<void>();
    this.persistWaiters.push({ target, d });
    return d.promise;
  }

  // -- sending -----------------------------------------------------------------

  /** Queues a message without waiting; resolves with its SendResult once the
   * gateway acknowledged it (durable). Rejects with SendFailed (refused for good:
   * not stored) or ClientClosed. */
  submit(conversationId: string, body: Uint8Array | string, o: SubmitOptions = {}): Promise<SendResult> {
    if (this.stopped) return Promise.reject(this.stopped);
    if (this.closing || !this.started) return Promise.reject(new ClientClosed("client is not running"));
    const data = typeof body === "string" ? encoder.encode(body) : body;
    const cmid = o.clientMsgId ?? uuid7();
    const existing = this.futures.get(cmid);
    if (existing) {
      if (this.window.get(cmid)?.restored) return existing.promise;
      return Promise.reject(new Error(`client_msg_id ${cmid} is already pending`));
    }
    if (this.futures.size >= this.store.maxOutbox) {
      return Promise.reject(new OutboxFull(`${this.futures.size} messages pending, the outbox holds ${this.store.maxOutbox}`));
    }
    const d = deferred<SendResult>();
    d.promise.catch(() => {}); // the app may never look
    if (this.maxBodyBytes && data.length > this.maxBodyBytes) {
      const error = new SendFailed(3, `body is ${data.length} bytes, the limit is ${this.maxBodyBytes}`, cmid);
      d.reject(error);
      this.finish({ clientMsgId: cmid, conversationId, error, restored: false });
      return d.promise;
    }
    const m = Object.assign(
      new Outgoing(cmid, conversationId, data, o.contentType ?? CONTENT_TEXT, o.kind ?? 0, o.targetConvSeq ?? 0),
      { ticket: ++this.tickets },
    );
    if (this.account !== null) m.order = this.nextOrder++;
    this.unsaved.set(cmid, m);
    this.futures.set(cmid, d);
    this.kickOutbox();
    return d.promise;
  }

  /** `submit()` under another name, for symmetry with the Python SDK. */
  send(conversationId: string, body: Uint8Array | string, o: SubmitOptions = {}): Promise<SendResult> {
    return this.submit(conversationId, body, o);
  }

  /** Marks a conversation read up to `convSeq` (a READ event, sent like a message). */
  markRead(conversationId: string, convSeq: number): Promise<SendResult> {
    return this.submit(conversationId, new Uint8Array(), { kind: Kind.READ, targetConvSeq: convSeq, contentType: 0 });
  }

  private finish(outcome: SendOutcome): void {
    this.finished.push(outcome);
    this.kickOutbox();
  }

  /** Runs the outbox writer now, or again after the running pass. */
  private kickOutbox(): void {
    if (this.account === null) return;
    if (this.outboxBusy) {
      this.outboxAgain = true;
      return;
    }
    this.outboxBusy = (async () => {
      try {
        do {
          this.outboxAgain = false;
          await this.drainOutboxOnce();
        } while (this.outboxAgain);
      } catch (e) {
        this.log(`outbox: ${String(e)}`);
      } finally {
        this.outboxBusy = null;
      }
    })();
  }

  private async drainOutbox(): Promise<void> {
    while (this.outboxBusy) await this.outboxBusy;
    if (this.account !== null) await this.drainOutboxOnce();
  }

  /** Writes submitted messages to the outbox (then lets them be sent), and
   * reports finished ones to the app (then deletes them). */
  private async drainOutboxOnce(): Promise<void> {
    const account = this.account;
    if (account === null) return;
    if (this.unsaved.size) {
      const batch = [...this.unsaved.values()];
      try {
        await this.store.outboxAdd(
          account,
          batch.map((m) => ({
            clientMsgId: m.clientMsgId,
            conversationId: m.conversationId,
            contentType: m.contentType,
            body: m.body,
            order: m.order,
            kind: m.kind,
            targetConvSeq: m.targetConvSeq,
          })),
        );
      } catch (e) {
        for (const m of batch) {
          if (this.unsaved.get(m.clientMsgId) === m) {
            this.unsaved.delete(m.clientMsgId);
            this.futures.get(m.clientMsgId)?.reject(e);
            this.futures.delete(m.clientMsgId);
          }
        }
        this.advancePersisted(e);
        throw e;
      }
      const sending = !this.closing && this.stopped === null;
      for (const m of batch) {
        if (this.unsaved.get(m.clientMsgId) === m) {
          this.unsaved.delete(m.clientMsgId);
          if (sending && this.futures.has(m.clientMsgId)) this.window.submit(m);
        }
      }
      this.advancePersisted(null);
      this.wake();
    }
    if (this.finished.length) {
      const outcomes = this.finished.splice(0);
      for (const o of outcomes) await this.emitAwait("sendResult", o);
      await this.store.outboxDelete(account, outcomes.map((o) => o.clientMsgId));
    }
  }

  private advancePersisted(error: unknown): void {
    let oldest = Infinity;
    for (const m of this.unsaved.values()) oldest = Math.min(oldest, m.ticket);
    this.persistedTicket = oldest === Infinity ? this.tickets : oldest - 1;
    this.persistWaiters = this.persistWaiters.filter((w) => {
      if (this.persistedTicket < w.target) return true;
      if (error) w.d.reject(error);
      else w.d.resolve();
      return false;
    });
  }

  /** Loads the account's cursor and outbox: restored messages enter the send
   * window first, in their order; what was submitted meanwhile follows. */
  private async openAccount(account: string): Promise<void> {
    const last = await this.store.loadLastSeq(account);
    const epoch = await this.store.loadEpoch(account);
    const entries = await this.store.outboxLoad(account);
    // Nothing awaited from here on.
    this.account = account;
    this.storeEpoch = epoch;
    [this.userId, this.deviceId] = account.split("/", 2) as [string, string];
    this.receiver = new Receiver<ChatMessage>(last);
    this.committedSeq = this.commitSeq = last;
    for (const e of entries) this.restore(e);
    this.nextOrder = entries.reduce((n, e) => Math.max(n, e.order + 1), 0);
    for (const m of this.unsaved.values()) m.order = this.nextOrder++;
    this.stats_.outboxRestored = entries.length;
    if (entries.length) this.log(`resending ${entries.length} messages from the outbox of ${account}`);
    this.kickOutbox();
    this.wake();
  }

  private restore(e: OutboxEntry): void {
    const m = new Outgoing(e.clientMsgId, e.conversationId, e.body, e.contentType, e.kind ?? 0, e.targetConvSeq ?? 0);
    m.order = e.order;
    m.restored = true;
    if (this.futures.has(e.clientMsgId)) {
      this.unsaved.delete(e.clientMsgId); // the app re-submitted it before the account was known
    } else {
      const d = deferred<SendResult>();
      d.promise.catch(() => {});
      this.futures.set(e.clientMsgId, d);
    }
    this.window.submit(m);
  }

  /** Fails every pending send with `exc`; the messages stay in the outbox. */
  private stop(exc: ClientClosed): void {
    for (const [cmid, d] of this.futures) {
      this.window.remove(cmid);
      d.reject(exc);
    }
    this.futures.clear();
    this.ready.reject(exc);
  }

  // -- unary calls on the socket ---------------------------------------------------

  /** Calls one of the Gateway service's unary methods on the socket (waiting for
   * a connection first). Rejects with RpcError (a gRPC status) or on timeout. */
  async call<I extends DescMessage, O extends DescMessage>(
    method: string,
    input: I,
    output: O,
    request: MessageInitShape<I>,
    timeoutMs = this.rpcTimeoutMs,
  ): Promise<MessageShape<O>> {
    const deadline = Date.now() + timeoutMs;
    const session = await this.connectedSession(timeoutMs);
    const payload = await this.callOn(session, method, toBinary(input, create(input, request)), deadline - Date.now());
    return fromBinary(output, payload);
  }

  private async connectedSession(timeoutMs: number): Promise<Session> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (this.stopped) throw this.stopped;
      if (this.closing) throw new ClientClosed("client closed");
      const s = this.session;
      if (s?.welcomed) return s;
      const left = deadline - Date.now();
      if (left <= 0) throw new RpcError(Status.UNAVAILABLE, `not connected (${this.lastError ?? "connecting"})`);
      await new Promise<void>((resolve) => {
        const off = this.on("state", () => {
          off();
          clearTimeout(t);
          resolve();
        });
        const t = setTimeout(() => {
          off();
          resolve();
        }, Math.min(left, 250));
      });
    }
  }

  private callOn(session: Session, method: string, payload: Uint8Array, timeoutMs: number): Promise<Uint8Array> {
    const id = this.nextCallId;
    this.nextCallId = this.nextCallId >= 0xffffffff ? 1 : this.nextCallId + 1;
    if (this.session !== session) {
      return Promise.reject(new RpcError(Status.UNAVAILABLE, "the connection was lost"));
    }
    return new Promise<Uint8Array>((resolve, reject) => {
      const timer = setTimeout(() => {
        session.calls.delete(id);
        reject(new RpcError(Status.DEADLINE_EXCEEDED, `${method}: no answer within ${timeoutMs} ms`));
      }, Math.max(timeoutMs, 1));
      session.calls.set(id, { resolve, reject, timer });
      this.write(session, { frame: { case: "request", value: { id, method, payload } } });
    });
  }

  async listConversations(pageSize = 0, pageToken = ""): Promise<{ conversations: ConversationInfo[]; nextPageToken: string }> {
    const r = await this.call("ListConversations", ListConversationsRequestSchema, ListConversationsResponseSchema, { pageSize, pageToken });
    return { conversations: r.conversations.map(toConversationInfo), nextPageToken: r.nextPageToken };
  }

  /** A conversation's messages, newest first, below `beforeConvSeq` (0: newest). */
  async history(conversationId: string, beforeConvSeq = 0, limit = 50): Promise<{ messages: ChatMessage[]; hasMore: boolean }> {
    const r = await this.call("History", HistoryRequestSchema, HistoryResponseSchema, {
      conversationId,
      beforeConvSeq: BigInt(beforeConvSeq),
      limit,
    });
    return { messages: r.messages.map((m) => toChatMessage(m, 0)), hasMore: r.hasMore };
  }

  async createGroup(name: string, memberIds: string[]): Promise<ConversationInfo> {
    const r = await this.call("CreateGroup", CreateGroupRequestSchema, CreateGroupResponseSchema, { name, memberIds });
    if (!r.conversation) throw new RpcError(Status.INTERNAL, "CreateGroup answered no conversation");
    return toConversationInfo(r.conversation);
  }

  getReceipts(conversationId: string, convSeq: number, listReaders = false) {
    return this.call("GetReceipts", GetReceiptsRequestSchema, GetReceiptsResponseSchema, {
      conversationId,
      convSeq: BigInt(convSeq),
      listReaders,
    });
  }

  getPresence(userIds: string[]) {
    return this.call("GetPresence", GetPresenceRequestSchema, GetPresenceResponseSchema, { userIds });
  }

  // -- the connection loop -------------------------------------------------------

  /** Drops the current connection at once, without a closing handshake, as a
   * network cut would (a page that learns the browser went offline; tests). The
   * client reconnects by itself, with backoff. */
  dropConnection(): void {
    this.session?.socket.abort();
  }

  /** Skips the reconnect backoff: the next attempt starts now (a page that
   * learns the browser is back online). */
  reconnectNow(): void {
    this.backoffReset = true;
    this.wakeSleep?.();
  }

  private async run(): Promise<void> {
    let failures = 0;
    let index = 0;
    while (!this.closing) {
      if (this.backoffReset) {
        this.backoffReset = false;
        failures = 0;
      }
      const url = this.urls[index++ % this.urls.length];
      let delay: number | null = null;
      let welcomed = false;
      try {
        welcomed = await this.runSession(url);
      } catch (e) {
        if (e instanceof GoAway) {
          this.log(`gateway ${url} going away: ${e.message}`);
          welcomed = true;
          delay = e.delayMs + this.random() * (50 + e.delayMs / 10);
        } else if (e instanceof ClientClosed) {
          if (!this.closing) {
            this.stopped = e;
            this.log(`client stopped: ${e.message}`);
            this.stop(e);
            this.setState("closed");
          }
          return;
        } else {
          const reason = e instanceof Error ? e.message : String(e);
          this.lastError = reason;
          this.log(`connection to ${url} lost: ${reason}`);
        }
      }
      if (this.closing) return;
      // A connection that got a Welcome resets the count, also one that ended
      // with GoAway (whose own delay replaces the policy's this time).
      if (welcomed) failures = 0;
      if (delay === null) {
        delay = this.reconnectPolicy.delay(failures, this.random);
        failures += 1;
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, delay);
        this.wakeSleep = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wakeSleep = null;
    }
  }

  /** One connection, from open to its end. Returns whether it got a Welcome
   * (on a normal end); throws why it ended otherwise. */
  private async runSession(url: string): Promise<boolean> {
    this.setState("connecting");
    const token = typeof this.token === "function" ? await this.token() : this.token;
    const ended = deferred<never>();
    const session: Session = {
      id: ++this.sessionSeq,
      socket: null as unknown as Socket,
      welcomed: false,
      ended,
      chain: Promise.resolve(),
      calls: new Map(),
    };
    session.socket = await this.transport.connect(url, {
      onMessage: (data) => this.onData(session, data),
      onClose: (code, reason) => this.onClosed(session, code, reason),
    });
    if (this.closing) {
      session.socket.close(1000, "client closed");
      throw new ClientClosed("client closed");
    }
    this.session = session;
    const welcomeTimer = setTimeout(
      () => this.endSession(new SessionLost(`no Welcome within ${this.welcomeTimeoutMs} ms`), 1000, session),
      this.welcomeTimeoutMs,
    );
    this.write(session, { frame: { case: "hello", value: { token } } });
    try {
      await ended.promise;
      return session.welcomed; // never reached: `ended` only rejects
    } catch (e) {
      if (session.welcomed && !(e instanceof ClientClosed) && !(e instanceof GoAway)) {
        // A connection that got a Welcome resets the backoff (see run()).
        this.lastError = e instanceof Error ? e.message : String(e);
        this.log(`connection to ${url} lost: ${this.lastError}`);
        return true;
      }
      throw e;
    } finally {
      clearTimeout(welcomeTimer);
      this.teardown(session);
    }
  }

  /** Ends `session` (default: the current one) with `why`, closing its socket. */
  private endSession(why: Error, code = 1000, session: Session | null = this.session): void {
    if (session === null || this.session !== session) {
      session?.ended.reject(why);
      return;
    }
    this.session = null;
    try {
      session.socket.close(code, why.message.slice(0, 100));
    } catch {
      session.socket.abort();
    }
    session.ended.reject(why);
  }

  private teardown(session: Session): void {
    if (this.session === session) this.session = null;
    for (const call of session.calls.values()) {
      clearTimeout(call.timer);
      call.reject(new RpcError(Status.UNAVAILABLE, "the connection was lost"));
    }
    session.calls.clear();
    if (this.pumpTimer) clearTimeout(this.pumpTimer);
    this.pumpTimer = null;
    this.ackAt = null;
    this.pingAt = null;
    this.window.onDisconnected();
    if (this.receiver?.syncing) this.receiver.syncFailed();
    if (this.readyFlag) {
      this.readyFlag = false;
      this.ready = deferred<void>();
      this.ready.promise.catch(() => {});
    }
    if (!this.closing && this.stopped === null) this.setState("disconnected");
  }

  private onClosed(session: Session, code: number, reason: string): void {
    let why: Error;
    if (code === 4001) why = new Kicked(`kicked: ${reason || "another connection of this device"}`);
    else if (code === 4401) why = new AuthError(`token refused: ${reason}`);
    else if (code === 1001) why = new GoAway(0, reason || "gateway shutting down");
    else why = new SessionLost(`the gateway closed the socket (${code}${reason ? `: ${reason}` : ""})`);
    if (this.session === session) this.session = null;
    session.ended.reject(why);
  }

  private write(session: Session, frame: MessageInitShape<typeof ClientFrameSchema>): void {
    session.socket.send(toBinary(ClientFrameSchema, create(ClientFrameSchema, frame)));
  }

  private onData(session: Session, data: Uint8Array): void {
    let frame: ServerFrame;
    try {
      frame = fromBinary(ServerFrameSchema, data);
    } catch (e) {
      this.endSession(new SessionLost(`undecodable ServerFrame: ${String(e)}`), 1007, session);
      return;
    }
    session.chain = session.chain
      .then(() => (this.session === session ? this.onFrame(session, frame) : undefined))
      .catch((e: unknown) => this.endSession(e instanceof Error ? e : new Error(String(e)), 1000, session));
  }

  private async onFrame(session: Session, frame: ServerFrame): Promise<void> {
    const f = frame.frame;
    if (!session.welcomed) {
      if (f.case !== "welcome") throw new SessionLost(`first frame was ${f.case}, not welcome`);
      await this.onWelcome(session, f.value);
      return;
    }
    const receiver = this.receiver!;
    switch (f.case) {
      case "sendAck": {
        const a = f.value;
        const m = this.window.onAck(a.clientMsgId);
        if (m) {
          this.stats_.sendAcks += 1;
          const result: SendResult = {
            clientMsgId: a.clientMsgId,
            msgId: Number(a.msgId),
            seq: Number(a.seq),
            convSeq: Number(a.convSeq),
            serverTimeMs: Number(a.serverTimeMs),
            duplicate: a.duplicate,
          };
          this.futures.get(a.clientMsgId)?.resolve(result);
          this.futures.delete(a.clientMsgId);
          this.finish({ clientMsgId: m.clientMsgId, conversationId: m.conversationId, result, restored: m.restored });
        }
        this.wake();
        return;
      }
      case "sendError": {
        const e = f.value;
        const failed = this.window.onError(Number(e.clientId), e.clientMsgId, e.code, e.retryable, Number(e.expectedClientId), Date.now());
        if (failed) {
          this.stats_.sendFailures += 1;
          const error = new SendFailed(e.code, e.reason, e.clientMsgId);
          this.futures.get(e.clientMsgId)?.reject(error);
          this.futures.delete(e.clientMsgId);
          this.finish({ clientMsgId: failed.clientMsgId, conversationId: failed.conversationId, error, restored: failed.restored });
        }
        this.wake();
        return;
      }
      case "push": {
        const p = f.value;
        const seq = Number(p.seq);
        if (this.hooks.dropPush?.(seq)) {
          this.stats_.pushesDropped += 1;
          return;
        }
        this.deliver(receiver.onPush({ seq, payload: toChatMessage(p.message, seq) }));
        if (receiver.needSync) this.requestSync(session);
        if (receiver.isAckDue) this.wake();
        return;
      }
      case "kick":
        throw new Kicked(`kicked: ${f.value.reason || "another connection of this device"}`);
      case "goAway":
        throw new GoAway(Math.max(0, f.value.reconnectAfterMs), f.value.reason || "go away");
      case "head":
        this.stats_.heads += 1;
        this.onHead(session, Number(f.value.seq));
        return;
      case "pong":
        this.stats_.pongs += 1;
        this.onHead(session, Number(f.value.headSeq));
        return;
      case "response": {
        const r = f.value;
        const call = session.calls.get(r.id);
        if (!call) return; // timed out already
        session.calls.delete(r.id);
        clearTimeout(call.timer);
        if (r.code === 0) call.resolve(r.payload);
        else call.reject(new RpcError(r.code, r.message));
        return;
      }
      default:
        // A repeated Welcome, typing, presence, or a frame newer than this client.
        return;
    }
  }

  private async onWelcome(session: Session, w: Welcome): Promise<void> {
    const account = `${w.userId}/${w.deviceId}`;
    if (this.account === null) await this.openAccount(account);
    else if (account !== this.account) throw new AuthError(`the gateway says this token is ${account}, it was ${this.account}`);
    this.connectionId = w.connectionId;
    this.maxBodyBytes = w.maxBodyBytes;
    await this.checkStoreEpoch(w.storeEpoch);
    if (this.session !== session) return;
    session.welcomed = true;
    this.lastError = null;
    this.stats_.connects += 1;
    this.window.onConnected(Number(w.nextClientId) || 1, w.sendWindow);
    this.receiver!.onConnected();
    this.onHead(session, Number(w.headSeq), true);
    if (this.pingIntervalMs !== null) this.pingAt = Date.now() + this.pingIntervalMs;
    this.setState("connected");
    this.requestSync(session);
    this.wake();
  }

  /** Compares the server's store epoch with the cursor's. True if the cursor
   * was of another epoch and has been reset (sync from 0). */
  private async checkStoreEpoch(epoch: string): Promise<boolean> {
    const account = this.account;
    if (!epoch || epoch === this.storeEpoch || account === null) return false;
    const old = this.storeEpoch;
    if (!old) {
      // Nothing recorded: a new account. Its cursor is taken as this epoch's.
      await this.store.setEpoch(account, epoch, false);
      this.storeEpoch = epoch;
      return false;
    }
    this.log(`the server's message store is another one (epoch ${epoch}, the cursor's was ${old}): syncing from the start`);
    this.stats_.epochResets += 1;
    this.generation += 1;
    this.receiver!.restart();
    this.inbox = [];
    this.recent.clear();
    await this.commitBusy;
    this.commitBatch = [];
    this.commitSeq = this.committedSeq = 0;
    await this.store.setEpoch(account, epoch, true);
    this.storeEpoch = epoch;
    return true;
  }

  private onHead(session: Session, head: number, welcome = false): void {
    const receiver = this.receiver;
    if (head <= 0 || receiver === null) return;
    if (receiver.onHead(head) && !welcome) this.requestSync(session);
  }

  // -- the pump --------------------------------------------------------------------

  private wake(): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    queueMicrotask(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  /** The only writer of Send, DeliverAck and Ping frames. */
  private pump(): void {
    const session = this.session;
    if (session === null || !session.welcomed) return;
    const receiver = this.receiver!;
    const now = Date.now();
    if (this.pingAt !== null && this.pingIntervalMs !== null && now >= this.pingAt) {
      this.pingAt = now + this.pingIntervalMs;
      this.write(session, { frame: { case: "ping", value: { nonce: ++this.pingNonce } } });
    }
    for (const fr of this.window.poll(now)) {
      const m = fr.message;
      this.hooks.onSendFrame?.(fr.clientId, m.clientMsgId, fr.retransmit);
      this.write(session, {
        frame: {
          case: "send",
          value: {
            clientId: BigInt(fr.clientId),
            clientMsgId: m.clientMsgId,
            conversationId: m.conversationId,
            body: m.body,
            contentType: m.contentType,
            kind: m.kind,
            targetConvSeq: BigInt(m.targetConvSeq),
          },
        },
      });
    }
    if (this.window.exhausted) {
      this.endSession(new SessionLost("a send went unanswered through every retransmit"), 1000, session);
      return;
    }
    if (receiver.isAckDue) {
      if (this.ackAt === null) this.ackAt = now + this.ackDelayMs;
      if (now >= this.ackAt) {
        this.ackAt = null;
        const seq = receiver.takeAck();
        if (seq !== null) {
          this.write(session, { frame: { case: "deliverAck", value: { seq: BigInt(seq) } } });
          this.stats_.acksSent += 1;
        }
      }
    }
    const deadlines = [this.window.nextDeadline(), this.ackAt, this.pingAt].filter((d): d is number => d !== null);
    if (this.pumpTimer) clearTimeout(this.pumpTimer);
    this.pumpTimer = null;
    if (deadlines.length) {
      this.pumpTimer = setTimeout(() => {
        this.pumpTimer = null;
        this.pump();
      }, Math.max(0, Math.min(...deadlines) - Date.now()));
    }
  }

  // -- sync --------------------------------------------------------------------------

  private requestSync(session: Session): void {
    if (this.syncRunning) return; // the running loop checks needSync again
    this.syncRunning = true;
    this.syncLoop(session)
      .catch((e: unknown) => {
        if (this.session === session) this.endSession(e instanceof Error ? e : new Error(String(e)), 1000, session);
      })
      .finally(() => {
        this.syncRunning = false;
        // A need that arose while the loop was ending, or a new connection that
        // asked while this (older) one's loop was still running.
        const current = this.session;
        if (current?.welcomed && this.receiver?.needSync) this.requestSync(current);
      });
  }

  /** Syncs while the receiver needs it (connect, gap, a head above the local
   * seq); marks the client ready after the first complete sync of the
   * connection. A retryable failure is retried on the same connection. */
  private async syncLoop(session: Session): Promise<void> {
    const receiver = this.receiver!;
    let failures = 0;
    while (this.session === session && receiver.needSync) {
      if (receiver.headBackoff) {
        await sleep(this.reconnectPolicy.delay(receiver.headBackoff, this.random));
        if (this.session !== session) return;
        if (!receiver.needSync) break;
      }
      let after = receiver.startSync();
      this.stats_.syncs += 1;
      const generation = this.generation;
      try {
        for (;;) {
          const payload = await this.callOn(
            session,
            "Sync",
            toBinary(SyncRequestSchema, create(SyncRequestSchema, { afterSeq: BigInt(after), limit: this.pageSize })),
            this.rpcTimeoutMs,
          );
          if (this.session !== session || generation !== this.generation) {
            if (receiver.syncing) receiver.syncFailed();
            break;
          }
          const resp = fromBinary(SyncResponseSchema, payload);
          if (await this.checkStoreEpoch(resp.storeEpoch)) break; // restarted: the next sync is from 0
          this.stats_.syncPages += 1;
          this.stats_.syncEntries += resp.entries.length;
          const entries: Entry<ChatMessage>[] = resp.entries.map((e) => ({
            seq: Number(e.seq),
            payload: toChatMessage(e.message, Number(e.seq)),
          }));
          this.deliver(receiver.onSyncPage(entries, resp.hasMore));
          if (!receiver.syncing) break;
          after = receiver.seq;
        }
      } catch (e) {
        if (receiver.syncing) receiver.syncFailed();
        if (this.session !== session) return;
        if (e instanceof RpcError && e.code === Status.UNAUTHENTICATED) throw new AuthError(`token refused: ${e.details}`);
        if (!(e instanceof RpcError) || !RETRYABLE_RPC.has(e.code)) throw e;
        failures += 1;
        this.stats_.syncFailures += 1;
        this.log(`sync failed (${codeName(e.code)}), retrying`);
        await sleep(this.reconnectPolicy.delay(failures, this.random));
        continue;
      }
      failures = 0;
      this.wake(); // ACK the highest
    }
    if (this.session === session && !receiver.needSync && !this.readyFlag) {
      this.readyFlag = true;
      this.ready.resolve();
    }
  }

  // -- delivery to the application ------------------------------------------------

  private deliver(entries: Entry<ChatMessage>[]): void {
    if (!entries.length) return;
    for (const e of entries) this.inbox.push(e.payload);
    if (!this.dispatching) void this.dispatch();
  }

  /** Hands in-order messages to the listeners, dropping msg_ids already handed
   * (in this client or, per the store, an earlier one), then commits the cursor. */
  private async dispatch(): Promise<void> {
    this.dispatching = true;
    try {
      while (this.inbox.length) {
        const batch = this.inbox.splice(0);
        const account = this.account!;
        const generation = this.generation;
        const unknown = batch.filter((m) => !this.recent.has(m.msgId)).map((m) => m.msgId);
        const seen = unknown.length ? await this.store.filterSeen(account, unknown) : new Set<number>();
        for (const m of batch) {
          if (generation !== this.generation) break; // the cursor was reset for another store
          const duplicate = this.recent.has(m.msgId) || seen.has(m.msgId);
          if (duplicate) {
            this.stats_.duplicatesSuppressed += 1;
          } else {
            this.remember(m.msgId);
            this.stats_.handed += 1;
            await this.emitAwait("message", m);
          }
          if (generation !== this.generation) break;
          if (!duplicate) this.commitBatch.push([m.msgId, m.seq]);
          this.commitSeq = Math.max(this.commitSeq, m.seq);
          this.scheduleCommit();
        }
      }
    } catch (e) {
      this.log(`delivery failed: ${String(e)}`);
    } finally {
      this.dispatching = false;
    }
  }

  private remember(msgId: number): void {
    this.recent.add(msgId);
    if (this.recent.size > 100_000) {
      const first = this.recent.values().next().value;
      if (first !== undefined) this.recent.delete(first);
    }
  }

  private scheduleCommit(): void {
    if (this.commitTimer !== null) return;
    this.commitTimer = setTimeout(() => {
      this.commitTimer = null;
      this.flushCommits().catch((e: unknown) => this.log(`cursor commit failed: ${String(e)}`));
    }, this.commitIntervalMs);
  }

  private flushCommits(): Promise<void> {
    this.commitBusy = this.commitBusy.then(async () => {
      const account = this.account;
      if (account === null) return;
      const batch = this.commitBatch.splice(0);
      const seq = this.commitSeq;
      if (!batch.length && seq <= this.committedSeq) return;
      try {
        await this.store.commit(account, seq, batch);
      } catch (e) {
        this.commitBatch.unshift(...batch);
        throw e;
      }
      this.committedSeq = Math.max(this.committedSeq, seq);
    });
    return this.commitBusy;
  }

  /** Resolves once every message handed so far is recorded in the store. */
  async committed(): Promise<void> {
    if (this.commitTimer) {
      clearTimeout(this.commitTimer);
      this.commitTimer = null;
    }
    await this.flushCommits();
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
