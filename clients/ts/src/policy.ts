/**
 * Timing policies: retransmit timers for sends and reconnect backoff (the same
 * values and rules as the Python SDK's imclient/policy.py).
 */

/** When an unanswered send is retransmitted on one connection.
 *
 * Only the oldest unanswered send runs a timer: the gateway answers a
 * connection's sends strictly in client_id order. After `maxAttempts` writes of
 * the same frame without an answer the connection is presumed dead and the
 * client reconnects (where every unacknowledged send is resent). */
export class RetransmitPolicy {
  readonly initialMs: number;
  readonly multiplier: number;
  readonly maxIntervalMs: number;
  readonly maxAttempts: number;
  /** Backoff before resending a send answered with a retryable SendError. */
  readonly retryInitialMs: number;
  readonly retryMaxMs: number;

  constructor(o: Partial<RetransmitPolicy> = {}) {
    this.initialMs = o.initialMs ?? 3000;
    this.multiplier = o.multiplier ?? 2;
    this.maxIntervalMs = o.maxIntervalMs ?? 15000;
    this.maxAttempts = o.maxAttempts ?? 4;
    this.retryInitialMs = o.retryInitialMs ?? 200;
    this.retryMaxMs = o.retryMaxMs ?? 5000;
    if (this.initialMs <= 0 || this.multiplier < 1 || this.maxIntervalMs < this.initialMs) {
      throw new RangeError("retransmit intervals must be positive and non-decreasing");
    }
    if (this.maxAttempts < 1) throw new RangeError("maxAttempts must be at least 1");
  }

  /** Milliseconds to wait for an answer after the `attempts`-th write (1-based). */
  timeout(attempts: number): number {
    const exp = Math.min(Math.max(attempts - 1, 0), 32);
    return Math.min(this.initialMs * this.multiplier ** exp, this.maxIntervalMs);
  }

  /** Milliseconds to wait before resending after the `retries`-th retryable error. */
  retryDelay(retries: number): number {
    const exp = Math.min(Math.max(retries - 1, 0), 32);
    return Math.min(this.retryInitialMs * 2 ** exp, this.retryMaxMs);
  }
}

/** Exponential backoff with full jitter between connection attempts: the n-th
 * consecutive failure waits uniform(0, min(maxMs, initialMs * multiplier**n)). A
 * connection that got as far as Welcome resets the count. */
export class ReconnectPolicy {
  readonly initialMs: number;
  readonly multiplier: number;
  readonly maxMs: number;

  constructor(o: Partial<ReconnectPolicy> = {}) {
    this.initialMs = o.initialMs ?? 100;
    this.multiplier = o.multiplier ?? 2;
    this.maxMs = o.maxMs ?? 5000;
    if (this.initialMs <= 0 || this.multiplier < 1 || this.maxMs < this.initialMs) {
      throw new RangeError("reconnect backoff must be positive and non-decreasing");
    }
  }

  delay(failures: number, random: () => number = Math.random): number {
    const exp = Math.min(Math.max(failures, 0), 32);
    return random() * Math.min(this.maxMs, this.initialMs * this.multiplier ** exp);
  }
}
