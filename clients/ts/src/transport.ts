/**
 * The transport under the protocol client: a WebSocket carrying one protobuf
 * frame per binary message (docs/protocol.md, "WebSocket"). In browsers the
 * page's own `WebSocket`; in Node the global one where it exists (Node 22+), else
 * the `ws` package (Node 20 has a global WebSocket only behind a flag). The
 * protocol code only sees `Transport` and `Socket`, so a test or another framing
 * can stand in.
 */

export interface Socket {
  /** Queues one binary message. */
  send(data: Uint8Array): void;
  /** Starts the closing handshake (browser semantics: the close event follows). */
  close(code?: number, reason?: string): void;
  /** Drops the connection at once, without a closing handshake where the
   * platform allows it (a network cut, for tests). */
  abort(): void;
}

export interface SocketHandlers {
  onMessage(data: Uint8Array): void;
  /** Exactly once per socket that opened. */
  onClose(code: number, reason: string): void;
}

export interface Transport {
  /** Opens a socket; resolves once it is open, rejects if it never opens. */
  connect(url: string, handlers: SocketHandlers): Promise<Socket>;
}

/** The subset of the WebSocket API both the browser's and `ws` implement. */
interface WebSocketLike {
  binaryType: string;
  readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  terminate?: () => void;
}
type WebSocketCtor = new (url: string) => WebSocketLike;

let cachedCtor: WebSocketCtor | undefined;

async function defaultWebSocket(): Promise<WebSocketCtor> {
  if (cachedCtor) return cachedCtor;
  const global = (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
  if (global !== undefined) {
    cachedCtor = global;
  } else {
    // Node without a global WebSocket: the `ws` package (never loaded in a browser).
    const mod = "ws";
    const ws = (await import(mod)) as { default: WebSocketCtor };
    cachedCtor = ws.default;
  }
  return cachedCtor;
}

function toBytes(data: unknown): Uint8Array {
  if (data instanceof Uint8Array) return data; // ws's Buffer
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (Array.isArray(data)) {
    // ws may hand fragments as Buffer[]
    const parts = data as Uint8Array[];
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }
  throw new TypeError("a text message: the gateway sends binary frames only");
}

export class WebSocketTransport implements Transport {
  constructor(private readonly ctor?: WebSocketCtor) {}

  async connect(url: string, handlers: SocketHandlers): Promise<Socket> {
    const Ctor = this.ctor ?? (await defaultWebSocket());
    const ws = new Ctor(url);
    ws.binaryType = "arraybuffer";
    return new Promise<Socket>((resolve, reject) => {
      let opened = false;
      let closed = false;
      const socket: Socket = {
        send: (data) => ws.send(data),
        close: (code, reason) => ws.close(code, reason),
        abort: () => {
          if (ws.terminate) ws.terminate();
          else ws.close(4000, "aborted by the client");
        },
      };
      ws.onopen = () => {
        opened = true;
        resolve(socket);
      };
      ws.onmessage = (ev) => {
        let bytes: Uint8Array;
        try {
          bytes = toBytes(ev.data);
        } catch {
          ws.close(1003, "binary messages only");
          return;
        }
        handlers.onMessage(bytes);
      };
      ws.onerror = () => {
        if (!opened && !closed) {
          closed = true;
          reject(new Error(`cannot connect to ${url}`));
        }
      };
      ws.onclose = (ev) => {
        if (!opened) {
          if (!closed) {
            closed = true;
            reject(new Error(`cannot connect to ${url} (close ${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`));
          }
          return;
        }
        if (closed) return;
        closed = true;
        handlers.onClose(ev.code, ev.reason);
      };
    });
  }
}
