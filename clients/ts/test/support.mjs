// Helpers of the tests against the real stack: the users and tokens the pytest
// wrapper (tests/clients/test_ts_client.py) minted, and waiting on conditions.
import { Client } from "../dist/index.js";

export const URLS = (process.env.IM_WS_URLS ?? "").split(",").filter(Boolean);
const USERS = JSON.parse(process.env.IM_USERS ?? "{}");

export const haveStack = URLS.length > 0 && Object.keys(USERS).length > 0;

/** `{user, device, token}` of a role the wrapper minted a token for. */
export function user(role) {
  const u = USERS[role];
  if (!u) throw new Error(`no token for role ${role} (IM_USERS)`);
  return u;
}

export function direct(a, b) {
  return a < b ? `d:${a}:${b}` : `d:${b}:${a}`;
}

/** Waits until `cond()` is true; fails with `what` after `timeoutMs`. */
export async function waitFor(cond, what, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A started client of `role` that records the messages it receives. */
export async function connect(role, options = {}) {
  const u = user(role);
  const client = new Client({ url: URLS, token: u.token, ...options });
  const received = [];
  client.on("message", (m) => {
    received.push(m);
  });
  await client.start({ timeoutMs: 20_000 });
  return { client, received, ...u };
}
