/**
 * `IndexedDBStore`: the browser's durable Store. One database (default name
 * "imclient") with three object stores, every write one transaction that
 * resolves on `complete` (committed), so the outbox of a page that is reloaded,
 * crashes or is closed is there for the next page of the same origin:
 *
 * - `cursor`: account -> {lastSeq, epoch}
 * - `seen`:   [account, msgId] -> seq (ids handed to the app; index by account)
 * - `outbox`: [account, clientMsgId] -> OutboxEntry (index [account, order])
 *
 * Works wherever `indexedDB` exists (browsers; in Node with an implementation
 * such as fake-indexeddb passed as `factory` and `keyRange`).
 */
import { DEFAULT_MAX_OUTBOX, type OutboxEntry, type Store } from "./store.js";

const VERSION = 1;

function done(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error ?? new Error("IndexedDB transaction failed"));
    tx.onabort = () => reject(tx.error ?? new Error("IndexedDB transaction aborted"));
  });
}

function result<R>(req: IDBRequest<R>): Promise<R> {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error ?? new Error("IndexedDB request failed"));
  });
}

interface StoredOutbox extends OutboxEntry {
  account: string;
}

export class IndexedDBStore implements Store {
  readonly maxOutbox: number;
  private db: IDBDatabase | null = null;
  private readonly factory: IDBFactory;
  private readonly keyRange: typeof IDBKeyRange;

  constructor(
    readonly name = "imclient",
    o: { maxOutbox?: number; factory?: IDBFactory; keyRange?: typeof IDBKeyRange } = {},
  ) {
    this.maxOutbox = o.maxOutbox ?? DEFAULT_MAX_OUTBOX;
    const factory = o.factory ?? (globalThis as { indexedDB?: IDBFactory }).indexedDB;
    if (factory === undefined) throw new Error("no IndexedDB here: pass a factory, or use MemoryStore");
    this.factory = factory;
    this.keyRange = o.keyRange ?? (globalThis as { IDBKeyRange: typeof IDBKeyRange }).IDBKeyRange;
  }

  async open(): Promise<void> {
    if (this.db !== null) return;
    const req = this.factory.open(this.name, VERSION);
    req.onupgradeneeded = () => {
      const db = req.result;
      db.createObjectStore("cursor");
      const seen = db.createObjectStore("seen");
      seen.createIndex("account", "account");
      const outbox = db.createObjectStore("outbox", { keyPath: ["account", "clientMsgId"] });
      outbox.createIndex("order", ["account", "order"]);
    };
    this.db = await result(req);
    // Another page of this origin upgrading the schema: let it, reopen later.
    this.db.onversionchange = () => {
      this.db?.close();
      this.db = null;
    };
  }

  async close(): Promise<void> {
    this.db?.close();
    this.db = null;
  }

  private tx(stores: string[], mode: IDBTransactionMode): IDBTransaction {
    if (this.db === null) throw new Error("IndexedDBStore is not open");
    // "strict": complete only once the data is flushed (browsers that support it).
    return this.db.transaction(stores, mode, { durability: "strict" });
  }

  private async cursor(account: string): Promise<{ lastSeq: number; epoch: string }> {
    const got = await result(this.tx(["cursor"], "readonly").objectStore("cursor").get(account));
    return (got as { lastSeq: number; epoch: string } | undefined) ?? { lastSeq: 0, epoch: "" };
  }

  async loadLastSeq(account: string): Promise<number> {
    return (await this.cursor(account)).lastSeq;
  }

  async loadEpoch(account: string): Promise<string> {
    return (await this.cursor(account)).epoch;
  }

  async filterSeen(account: string, msgIds: number[]): Promise<Set<number>> {
    if (!msgIds.length) return new Set();
    const store = this.tx(["seen"], "readonly").objectStore("seen");
    const found = await Promise.all(msgIds.map((id) => result(store.getKey([account, id]))));
    return new Set(msgIds.filter((_, i) => found[i] !== undefined));
  }

  async commit(account: string, lastSeq: number, handed: [number, number][]): Promise<void> {
    const tx = this.tx(["cursor", "seen"], "readwrite");
    const cursors = tx.objectStore("cursor");
    const seen = tx.objectStore("seen");
    for (const [msgId, seq] of handed) seen.put({ account, seq }, [account, msgId]);
    const req = cursors.get(account);
    req.onsuccess = () => {
      const cur = (req.result as { lastSeq: number; epoch: string } | undefined) ?? { lastSeq: 0, epoch: "" };
      cursors.put({ lastSeq: Math.max(cur.lastSeq, lastSeq), epoch: cur.epoch }, account);
    };
    await done(tx);
  }

  async setEpoch(account: string, epoch: string, reset: boolean): Promise<void> {
    const tx = this.tx(["cursor", "seen"], "readwrite");
    const cursors = tx.objectStore("cursor");
    const req = cursors.get(account);
    req.onsuccess = () => {
      const cur = (req.result as { lastSeq: number } | undefined) ?? { lastSeq: 0 };
      cursors.put({ lastSeq: reset ? 0 : cur.lastSeq, epoch }, account);
    };
    if (reset) {
      const seen = tx.objectStore("seen");
      seen.delete(this.keyRange.bound([account, -Infinity], [account, Infinity]));
    }
    await done(tx);
  }

  async outboxAdd(account: string, entries: OutboxEntry[]): Promise<void> {
    const tx = this.tx(["outbox"], "readwrite");
    const box = tx.objectStore("outbox");
    for (const e of entries) {
      const row: StoredOutbox = { ...e, account };
      // add(), not put(): an id already there is left as it was.
      const req = box.add(row);
      req.onerror = (ev) => {
        ev.preventDefault(); // ConstraintError: a repeat; do not abort the transaction
        ev.stopPropagation();
      };
    }
    await done(tx);
  }

  async outboxDelete(account: string, clientMsgIds: string[]): Promise<void> {
    const tx = this.tx(["outbox"], "readwrite");
    const box = tx.objectStore("outbox");
    for (const id of clientMsgIds) box.delete([account, id]);
    await done(tx);
  }

  async outboxLoad(account: string): Promise<OutboxEntry[]> {
    const index = this.tx(["outbox"], "readonly").objectStore("outbox").index("order");
    const rows = (await result(
      index.getAll(this.keyRange.bound([account, -Infinity], [account, Infinity])),
    )) as StoredOutbox[];
    return rows.map(({ account: _account, ...e }) => ({ ...e, body: new Uint8Array(e.body) }));
  }
}
