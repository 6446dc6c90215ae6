/**
 * Durable client state per account (`<user>/<device>`): the sync cursor and the
 * store epoch it belongs to, the msg_ids already handed to the application, and
 * the outbox (messages submitted and not yet acknowledged or refused for good).
 * The same contract as the Python SDK's imclient/store.py `Store`.
 *
 * `MemoryStore` (Node, tests: lives as long as the object) and `IndexedDBStore`
 * (browsers: survives a reload, a crash, a closed tab) implement it.
 */

/** One outgoing message as the outbox keeps it. `order`: submission order. */
export interface OutboxEntry {
  clientMsgId: string;
  conversationId: string;
  contentType: number;
  body: Uint8Array;
  order: number;
  kind?: number;
  targetConvSeq?: number;
}

export const DEFAULT_MAX_OUTBOX = 10_000;

export interface Store {
  /** Most messages an account's outbox may hold (the client enforces it). */
  readonly maxOutbox: number;
  open(): Promise<void>;
  /** Idempotent. */
  close(): Promise<void>;
  /** The highest seq handed to the application (and every one before); 0 if new. */
  loadLastSeq(account: string): Promise<number>;
  /** The subset of `msgIds` already handed to the application. */
  filterSeen(account: string, msgIds: number[]): Promise<Set<number>>;
  /** Atomically records `handed` ([msgId, seq]) as seen and raises the cursor to
   * `lastSeq` (never lowers it). Durable when it resolves. */
  commit(account: string, lastSeq: number, handed: [number, number][]): Promise<void>;
  /** The store epoch of the account's cursor ("" if none recorded). */
  loadEpoch(account: string): Promise<string>;
  /** Records the cursor's epoch; with `reset`, atomically forgets the cursor and
   * the seen msg_ids too (the outbox is kept). */
  setEpoch(account: string, epoch: string, reset: boolean): Promise<void>;
  /** Atomically adds entries (an id already there is left as it was). Durable
   * when it resolves. */
  outboxAdd(account: string, entries: OutboxEntry[]): Promise<void>;
  /** Atomically removes these ids (unknown ids are ignored). */
  outboxDelete(account: string, clientMsgIds: string[]): Promise<void>;
  /** The account's outbox in submission order. */
  outboxLoad(account: string): Promise<OutboxEntry[]>;
}

interface Account {
  lastSeq: number;
  epoch: string;
  seen: Map<number, number>; // msgId -> seq
  outbox: Map<string, OutboxEntry>;
}

/** An in-memory Store: survives Client instances handed the same object, never
 * the process. `keepMsgIds` bounds the remembered ids per account. */
export class MemoryStore implements Store {
  readonly maxOutbox: number;
  readonly keepMsgIds: number;
  commits = 0;
  private accounts = new Map<string, Account>();

  constructor(o: { maxOutbox?: number; keepMsgIds?: number } = {}) {
    this.maxOutbox = o.maxOutbox ?? DEFAULT_MAX_OUTBOX;
    this.keepMsgIds = o.keepMsgIds ?? 100_000;
  }

  private acct(account: string): Account {
    let a = this.accounts.get(account);
    if (a === undefined) {
      a = { lastSeq: 0, epoch: "", seen: new Map(), outbox: new Map() };
      this.accounts.set(account, a);
    }
    return a;
  }

  async open(): Promise<void> {}
  async close(): Promise<void> {}

  async loadLastSeq(account: string): Promise<number> {
    return this.acct(account).lastSeq;
  }

  async filterSeen(account: string, msgIds: number[]): Promise<Set<number>> {
    const seen = this.acct(account).seen;
    return new Set(msgIds.filter((id) => seen.has(id)));
  }

  async commit(account: string, lastSeq: number, handed: [number, number][]): Promise<void> {
    const a = this.acct(account);
    for (const [msgId, seq] of handed) a.seen.set(msgId, seq);
    if (a.seen.size > this.keepMsgIds) {
      const bySeq = [...a.seen.entries()].sort((x, y) => x[1] - y[1]);
      for (const [id] of bySeq.slice(0, a.seen.size - this.keepMsgIds)) a.seen.delete(id);
    }
    a.lastSeq = Math.max(a.lastSeq, lastSeq);
    this.commits += 1;
  }

  async loadEpoch(account: string): Promise<string> {
    return this.acct(account).epoch;
  }

  async setEpoch(account: string, epoch: string, reset: boolean): Promise<void> {
    const a = this.acct(account);
    a.epoch = epoch;
    if (reset) {
      a.lastSeq = 0;
      a.seen.clear();
    }
  }

  async outboxAdd(account: string, entries: OutboxEntry[]): Promise<void> {
    const box = this.acct(account).outbox;
    for (const e of entries) if (!box.has(e.clientMsgId)) box.set(e.clientMsgId, { ...e });
  }

  async outboxDelete(account: string, clientMsgIds: string[]): Promise<void> {
    const box = this.acct(account).outbox;
    for (const id of clientMsgIds) box.delete(id);
  }

  async outboxLoad(account: string): Promise<OutboxEntry[]> {
    return [...this.acct(account).outbox.values()].sort((a, b) => a.order - b.order).map((e) => ({ ...e }));
  }
}
