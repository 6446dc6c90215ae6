/** The IM client for browsers and Node: the device protocol over WebSocket. */
export * from "./client.js";
export * from "./errors.js";
export { uuid7 } from "./ids.js";
export { IndexedDBStore } from "./idb.js";
export { ReconnectPolicy, RetransmitPolicy } from "./policy.js";
export { Receiver, type Entry } from "./receiver.js";
export { OUT_OF_ORDER, Outgoing, SendWindow, type Frame } from "./sender.js";
export { DEFAULT_MAX_OUTBOX, MemoryStore, type OutboxEntry, type Store } from "./store.js";
export { WebSocketTransport, type Socket, type SocketHandlers, type Transport } from "./transport.js";
