/** Errors of the client. A message refused for good is `SendFailed`; a client
 * that stopped for good is `Kicked` or `AuthError` (both `ClientClosed`). */

/** gRPC status codes that a unary call on the socket may answer with. */
export const Status = {
  OK: 0,
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  UNIMPLEMENTED: 12,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  UNAUTHENTICATED: 16,
} as const;

export class ImClientError extends Error {
  override name = "ImClientError";
}

/** The client is closed (or stopped): pending sends stay in the outbox. */
export class ClientClosed extends ImClientError {
  override name = "ClientClosed";
}

/** Another connection of the same device replaced this one (close code 4001). */
export class Kicked extends ClientClosed {
  override name = "Kicked";
}

/** The gateway refused the token (close code 4401, or UNAUTHENTICATED). */
export class AuthError extends ClientClosed {
  override name = "AuthError";
}

/** The gateway refused a message for good: it was not stored. */
export class SendFailed extends ImClientError {
  override name = "SendFailed";
  constructor(
    readonly code: number,
    readonly reason: string,
    readonly clientMsgId: string,
  ) {
    super(`send ${clientMsgId} refused (code ${code}): ${reason}`);
  }
}

/** A unary call (Sync, History, ...) failed with a gRPC status. */
export class RpcError extends ImClientError {
  override name = "RpcError";
  constructor(
    readonly code: number,
    readonly details: string,
  ) {
    super(`${codeName(code)}: ${details}`);
  }
}

/** submit() past the store's maxOutbox pending messages. */
export class OutboxFull extends ImClientError {
  override name = "OutboxFull";
}

export function codeName(code: number): string {
  for (const [name, value] of Object.entries(Status)) if (value === code) return name;
  return `code ${code}`;
}
