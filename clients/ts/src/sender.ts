/**
 * The upstream half of the protocol as a pure state machine (no I/O, no clock):
 * a port of the Python SDK's imclient/sender.py `SendWindow`, rule for rule.
 *
 * - `clientMsgId` is fixed when a message is submitted and never changes: not on
 *   a retransmit, not on a reconnect. It is the server's idempotency key.
 * - `client_id` is per connection: 1, 2, 3, ... in submission order. Messages are
 *   numbered only when they enter the send window, so a reconnect renumbers every
 *   unacknowledged message from `next_client_id` in the original order.
 * - At most `window` numbered messages are unanswered at once.
 * - Only the oldest unanswered message runs a retransmit timer; after
 *   `maxAttempts` writes the window reports `exhausted` and the caller reconnects.
 * - OUT_OF_ORDER{expected}: everything numbered >= expected was refused, so it is
 *   renumbered from `expected` and resent in order.
 * - A retryable error holds that message (and, to keep the order, everything
 *   after it) for a backoff, then resends the same numbers.
 * - A non-retryable error fails that message for good; the gateway reuses its
 *   client_id, so everything after it is renumbered down by one and resent.
 * - An ACK is always believed (ACK means durable) whatever client_id it names; an
 *   error is acted on only if it names the message's current client_id.
 */
import { RetransmitPolicy } from "./policy.js";

/** SendErrorCode values of im.gateway.v1 (kept numeric: they are the wire's). */
export const OUT_OF_ORDER = 1;

/** A message the client holds until the gateway acknowledges it. */
export class Outgoing {
  /** Submission order in the account's outbox. */
  order = 0;
  /** Loaded from the outbox (submitted by an earlier client, e.g. before a reload). */
  restored = false;
  // State on the current connection; reset by onConnected/onDisconnected.
  clientId = 0; // 0: not numbered (not in the window) yet
  sent = false; // the current (clientId, clientMsgId) frame was written
  attempts = 0; // writes of the current frame since its last answer
  notBefore = 0; // hold until (retryable error backoff), ms
  retries = 0; // retryable errors seen, for the backoff
  totalWrites = 0; // across connections

  constructor(
    readonly clientMsgId: string,
    readonly conversationId: string,
    readonly body: Uint8Array,
    readonly contentType: number,
    readonly kind: number = 0,
    readonly targetConvSeq: number = 0,
  ) {}
}

/** One Send frame to write. */
export interface Frame {
  clientId: number;
  message: Outgoing;
  retransmit: boolean;
}

export class SendWindow {
  readonly policy: RetransmitPolicy;
  readonly maxWindow: number;
  window: number;
  connected = false;
  nextClientId = 1;
  /** The oldest send went unanswered maxAttempts times: reconnect. */
  exhausted = false;
  retransmits = 0;
  writes = 0;
  // Insertion order == submission order == send order. Numbered messages are
  // always a prefix, with increasing client_ids.
  private pending = new Map<string, Outgoing>();
  private head: Outgoing | null = null;
  private headDeadline = 0;
  private rewoundTo = 0;

  constructor(policy: RetransmitPolicy = new RetransmitPolicy(), window = 64) {
    if (window < 1) throw new RangeError("window must be at least 1");
    this.policy = policy;
    this.maxWindow = window;
    this.window = window;
  }

  get size(): number {
    return this.pending.size;
  }

  has(clientMsgId: string): boolean {
    return this.pending.has(clientMsgId);
  }

  get(clientMsgId: string): Outgoing | undefined {
    return this.pending.get(clientMsgId);
  }

  /** Unacknowledged messages in send order. */
  list(): Outgoing[] {
    return [...this.pending.values()];
  }

  /** Queues a message behind every earlier one. Its clientMsgId must be new. */
  submit(message: Outgoing): void {
    if (this.pending.has(message.clientMsgId)) {
      throw new Error(`client_msg_id ${message.clientMsgId} is already pending`);
    }
    message.clientId = 0;
    this.pending.set(message.clientMsgId, message);
  }

  /** A new connection said Welcome: every pending message is renumbered from
   * `nextClientId`, in its original order, as the window admits it. */
  onConnected(nextClientId = 1, window = 0): void {
    this.resetConnectionState();
    this.connected = true;
    this.nextClientId = Math.max(1, nextClientId);
    this.window = window > 0 ? Math.min(this.maxWindow, window) : this.maxWindow;
  }

  /** The connection is gone: nothing is numbered any more, nothing is lost. */
  onDisconnected(): void {
    this.resetConnectionState();
    this.connected = false;
  }

  /** Withdraws a message. Returns it if it was pending. */
  remove(clientMsgId: string): Outgoing | undefined {
    const message = this.pending.get(clientMsgId);
    if (message === undefined) return undefined;
    this.pending.delete(clientMsgId);
    if (message.clientId && !message.sent) this.rewind(message.clientId, message.clientId);
    return message;
  }

  /** A SendAck. Returns the acknowledged message, or undefined for a repeat ACK. */
  onAck(clientMsgId: string): Outgoing | undefined {
    const message = this.pending.get(clientMsgId);
    if (message === undefined) return undefined;
    this.pending.delete(clientMsgId);
    return message;
  }

  /** A SendError. Returns the message when it is refused for good (the caller
   * reports it); undefined otherwise (it will be resent). */
  onError(
    clientId: number,
    clientMsgId: string,
    code: number,
    retryable: boolean,
    expectedClientId: number,
    now: number,
  ): Outgoing | undefined {
    const message = this.pending.get(clientMsgId);
    if (message === undefined) return undefined; // already acknowledged or failed
    if (message.clientId !== clientId || clientId === 0) return undefined; // superseded
    message.attempts = 0;
    if (code === OUT_OF_ORDER) {
      if (message.sent && expectedClientId === this.rewoundTo) {
        // Already renumbered from this very `expected` and written since: the
        // refusal is of a frame written before that.
        return undefined;
      }
      if (expectedClientId > 0) {
        this.rewind(Math.min(expectedClientId, clientId), expectedClientId);
      } else {
        this.rewind(clientId, clientId);
      }
      return undefined;
    }
    if (retryable) {
      message.retries += 1;
      this.rewind(clientId, clientId);
      message.notBefore = now + this.policy.retryDelay(message.retries);
      return undefined;
    }
    this.pending.delete(clientMsgId);
    this.rewind(clientId, clientId);
    return message;
  }

  /** Frames to write now, in order. Sets `exhausted` when the oldest unanswered
   * send has used all its attempts (the caller should reconnect). */
  poll(now: number): Frame[] {
    if (!this.connected) return [];
    const frames: Frame[] = [];
    let inWindow = 0;
    let blocked = false;
    let head: Outgoing | null = null;
    for (const m of this.pending.values()) {
      if (m.clientId === 0) {
        if (inWindow >= this.window) break;
        m.clientId = this.nextClientId++;
        m.sent = false;
        m.attempts = 0;
      }
      inWindow += 1;
      if (m.sent) {
        if (head === null) head = m;
        continue;
      }
      // Unsent messages are always a suffix of the window: write them in order,
      // and none after one that is held.
      if (blocked || m.notBefore > now) {
        blocked = true;
        continue;
      }
      frames.push(this.write(m, false));
      if (head === null) head = m;
    }
    if (head !== this.head) {
      this.head = head;
      if (head !== null) this.headDeadline = now + this.policy.timeout(Math.max(head.attempts, 1));
    } else if (head !== null && now >= this.headDeadline) {
      if (head.attempts >= this.policy.maxAttempts) {
        this.exhausted = true;
      } else {
        frames.push(this.write(head, true));
        this.retransmits += 1;
        this.headDeadline = now + this.policy.timeout(head.attempts);
      }
    }
    return frames;
  }

  /** When `poll()` may have something new to do without any event. */
  nextDeadline(): number | null {
    if (!this.connected) return null;
    const deadlines: number[] = [];
    if (this.head !== null) deadlines.push(this.headDeadline);
    for (const m of this.pending.values()) {
      if (m.clientId === 0) break;
      if (!m.sent) {
        if (m.notBefore > 0) deadlines.push(m.notBefore);
        break;
      }
    }
    return deadlines.length ? Math.min(...deadlines) : null;
  }

  private write(m: Outgoing, retransmit: boolean): Frame {
    m.sent = true;
    m.attempts += 1;
    m.totalWrites += 1;
    this.writes += 1;
    return { clientId: m.clientId, message: m, retransmit };
  }

  /** The gateway expects `start` next: every numbered message at or above
   * `fromClientId` is renumbered from `start`, in order, and marked for resending. */
  private rewind(fromClientId: number, start: number): void {
    let cid = start;
    for (const m of this.pending.values()) {
      if (m.clientId === 0) break;
      if (m.clientId < fromClientId) continue;
      if (m.clientId !== cid) m.attempts = 0;
      m.clientId = cid;
      m.sent = false;
      cid += 1;
    }
    this.nextClientId = cid;
    this.rewoundTo = start;
    if (this.head !== null && !this.head.sent) this.head = null;
  }

  private resetConnectionState(): void {
    for (const m of this.pending.values()) {
      m.clientId = 0;
      m.sent = false;
      m.attempts = 0;
      m.notBefore = 0;
    }
    this.head = null;
    this.headDeadline = 0;
    this.rewoundTo = 0;
    this.exhausted = false;
    this.nextClientId = 1;
  }
}
