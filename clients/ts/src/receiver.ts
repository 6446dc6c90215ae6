/**
 * The downstream half of the protocol as a pure state machine (no I/O): a port
 * of the Python SDK's imclient/receiver.py `Receiver`, rule for rule
 * (docs/protocol.md, "Receiving").
 *
 * - `seq` is the highest timeline position applied; everything at or below it
 *   has been handed on, exactly once, in seq order.
 * - After every (re)connect, and whenever a push reveals a gap, the client syncs
 *   from `seq` page by page until `has_more` is false.
 * - A push with seq == this.seq + 1 outside a sync is applied at once; a push at
 *   or below `seq` is a duplicate: dropped and acknowledged again.
 * - A push while a sync is due or running is buffered and applied only after
 *   it, never used to move `seq` past entries the sync has not returned (gim
 *   issue 46). A buffered push that a sync started after its arrival did not
 *   return is a server fault: dropped, never applied across the hole.
 * - ACKs are cumulative: `takeAck()` returns the seq to acknowledge.
 * - A head (Welcome, Pong, Head frames) above `seq` makes a sync due; a sync that
 *   started after the head was known and ends below it is a miss: retried with
 *   backoff (`headBackoff`), given up after `headMissLimit` misses in a row.
 * - `restart()`: another store epoch: back to seq 0 and a sync from the start.
 */

export interface Entry<T> {
  seq: number;
  payload: T;
}

export class Receiver<T> {
  seq: number;
  needSync = true; // nothing is trusted before the first sync
  syncing = false;
  lastAcked = 0;
  head = 0;
  readonly headMissLimit: number;
  // Counters (observability and tests).
  pushes = 0;
  duplicates = 0;
  buffered = 0;
  gaps = 0;
  droppedUnconfirmed = 0;
  headSyncs = 0;
  headMisses = 0;
  headsUnreached = 0;
  restarts = 0;
  private buffer = new Map<number, { entry: Entry<T>; epoch: number }>();
  private syncEpoch = 0;
  private runningEpoch = 0;
  private ackDue = false;
  private headEpoch = 0;
  private headMissRun = 0;

  constructor(lastSeq = 0, headMissLimit = 5) {
    if (lastSeq < 0) throw new RangeError("lastSeq must be >= 0");
    this.seq = lastSeq;
    this.headMissLimit = headMissLimit;
  }

  get bufferedSeqs(): number[] {
    return [...this.buffer.keys()].sort((a, b) => a - b);
  }

  /** A (new) connection: sync before trusting pushes. Buffered pushes are kept. */
  onConnected(): void {
    this.needSync = true;
    this.syncing = false;
    this.lastAcked = 0;
    this.headMissRun = 0;
  }

  /** The timeline now lives in another store (another store epoch). */
  restart(): void {
    this.seq = 0;
    this.buffer.clear();
    this.head = 0;
    this.headMissRun = 0;
    this.ackDue = false;
    this.lastAcked = 0;
    this.syncing = false;
    this.needSync = true;
    this.restarts += 1;
  }

  /** The server's timeline head (0: unknown). True if this made a sync due. */
  onHead(head: number): boolean {
    if (head <= this.seq) return false;
    if (head > this.head) {
      this.head = head;
      this.headEpoch = this.syncEpoch;
    }
    if (this.needSync || this.syncing) return false;
    this.needSync = true;
    this.headSyncs += 1;
    return true;
  }

  /** Syncs in a row that ended below a head they should have reached. */
  get headBackoff(): number {
    return this.headMissRun;
  }

  /** A pushed entry. Returns the entries to hand on now, in order. */
  onPush(entry: Entry<T>): Entry<T>[] {
    this.pushes += 1;
    if (entry.seq <= this.seq) {
      this.duplicates += 1;
      this.ackDue = true;
      return [];
    }
    if (this.needSync || this.syncing) {
      this.hold(entry);
      return [];
    }
    if (entry.seq === this.seq + 1) {
      const out = [entry];
      this.seq = entry.seq;
      out.push(...this.drain());
      this.ackDue = true;
      return out;
    }
    // A gap (or a seq skip, which only a sync can tell apart): sync first.
    this.gaps += 1;
    this.hold(entry);
    this.needSync = true;
    return [];
  }

  /** Begins a sync; returns the after_seq of its first page. */
  startSync(): number {
    this.needSync = false;
    this.syncing = true;
    this.syncEpoch += 1;
    this.runningEpoch = this.syncEpoch;
    return this.seq;
  }

  /** One page of a running sync (ascending seqs). Returns the entries to hand on. */
  onSyncPage(entries: Entry<T>[], hasMore: boolean): Entry<T>[] {
    if (!this.syncing) throw new Error("onSyncPage without startSync");
    for (let i = 1; i < entries.length; i++) {
      if (entries[i].seq <= entries[i - 1].seq) {
        throw new Error(`sync page not in ascending seq order (${entries[i - 1].seq} then ${entries[i].seq})`);
      }
    }
    const out: Entry<T>[] = [];
    for (const entry of entries) {
      if (entry.seq <= this.seq) continue; // an overlap with a push or an earlier page
      out.push(entry);
      this.seq = entry.seq;
      this.buffer.delete(entry.seq);
    }
    if (hasMore && entries.length === 0) hasMore = false; // "more" but nothing: stop
    if (hasMore) return out;
    this.syncing = false;
    for (const s of [...this.buffer.keys()]) if (s <= this.seq) this.buffer.delete(s);
    out.push(...this.drain());
    for (const [s, held] of [...this.buffer.entries()]) {
      if (held.epoch < this.runningEpoch) {
        // This sync started after the push arrived and did not return it: the
        // server broke prefix-closure. Never jump the hole.
        this.buffer.delete(s);
        this.droppedUnconfirmed += 1;
      }
    }
    if (this.buffer.size) this.needSync = true;
    this.checkHead();
    this.ackDue = true;
    return out;
  }

  /** The running sync was abandoned (error, disconnect): sync again later. */
  syncFailed(): void {
    this.syncing = false;
    this.needSync = true;
  }

  /** The cumulative seq to acknowledge now, or null if nothing new. */
  takeAck(): number | null {
    if (!this.ackDue || this.seq === 0) {
      this.ackDue = false;
      return null;
    }
    this.ackDue = false;
    this.lastAcked = this.seq;
    return this.seq;
  }

  get isAckDue(): boolean {
    return this.ackDue && this.seq > 0;
  }

  private checkHead(): void {
    if (this.head <= this.seq) {
      this.headMissRun = 0;
      return;
    }
    if (this.headEpoch < this.runningEpoch) {
      this.headMisses += 1;
      this.headMissRun += 1;
      if (this.headMissRun > this.headMissLimit) {
        this.headsUnreached += 1;
        this.head = 0;
        this.headMissRun = 0;
        return;
      }
    } else if (!this.needSync) {
      this.headSyncs += 1; // announced during the sync: one more is due
    }
    this.needSync = true;
  }

  private hold(entry: Entry<T>): void {
    if (!this.buffer.has(entry.seq)) {
      this.buffered += 1;
      this.buffer.set(entry.seq, { entry, epoch: this.syncEpoch });
    }
  }

  private drain(): Entry<T>[] {
    const out: Entry<T>[] = [];
    for (;;) {
      const held = this.buffer.get(this.seq + 1);
      if (held === undefined) return out;
      this.buffer.delete(this.seq + 1);
      out.push(held.entry);
      this.seq = held.entry.seq;
    }
  }
}
