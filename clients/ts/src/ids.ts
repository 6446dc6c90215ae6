/**
 * client_msg_id: the idempotency key the client makes for every message. UUIDv7
 * (RFC 9562), like the Python SDK: the first 48 bits are the Unix time in
 * milliseconds, which the server reads to apply its dedup window
 * (docs/protocol.md, "Idempotency and the dedup window").
 */

function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  globalThis.crypto.getRandomValues(out);
  return out;
}

/** A new UUIDv7 in canonical lowercase form, made at `timeMs` (default now). */
export function uuid7(timeMs: number = Date.now()): string {
  const b = randomBytes(16);
  let ms = Math.floor(timeMs);
  for (let i = 5; i >= 0; i--) {
    b[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  b[6] = (b[6] & 0x0f) | 0x70; // version 7
  b[8] = (b[8] & 0x3f) | 0x80; // variant 10
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
