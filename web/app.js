// The web chat: sign in, a conversation list with unread counts, history, send,
// live receive and an offline indicator, on the TypeScript client (clients/ts)
// with its outbox and cursor in IndexedDB. Every row of the message list is keyed
// by (sender, client_msg_id), the message's idempotency key, so a message met
// again (History, a sync after a reconnect, the push of one's own send, a reload)
// updates its row and is never shown twice.
import { Client, IndexedDBStore, Kind, uuid7 } from "/lib/index.js";

const $ = (id) => document.getElementById(id);
const app = {
  me: "",
  client: null,
  /** conversationId -> {conversationId, name, unreadCount, readConvSeq, lastActivityMs} */
  conversations: new Map(),
  open: "",
  /** key -> {li, convSeq} of the open conversation */
  rows: new Map(),
  readTimer: null,
  listTimer: null,
};

function deviceId() {
  // One device id per browser profile (an installation), kept across reloads.
  let id = localStorage.getItem("im.device");
  if (!id) {
    id = `web-${uuid7().slice(-12)}`;
    localStorage.setItem("im.device", id);
  }
  return id;
}

async function fetchToken(user, device) {
  // Development: the dev server mints tokens. A real app asks its own backend,
  // which signs the user in its own way first.
  const r = await fetch(`/dev/token?user=${encodeURIComponent(user)}&device=${encodeURIComponent(device)}`);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ?? `HTTP ${r.status}`);
  return body.token;
}

function direct(a, b) {
  return a < b ? `d:${a}:${b}` : `d:${b}:${a}`;
}

function titleOf(conv) {
  if (conv.conversationId.startsWith("d:")) {
    const [, a, b] = conv.conversationId.split(":");
    return a === app.me ? b : a;
  }
  return conv.name || conv.conversationId;
}

// -- status ------------------------------------------------------------------

function renderStatus() {
  const el = $("status");
  const s = app.client?.state;
  let state = "offline";
  if (navigator.onLine && s === "connected") state = "online";
  else if (navigator.onLine && s === "connecting") state = "connecting";
  el.dataset.state = state;
  el.textContent = { online: "online", connecting: "connecting…", offline: "offline" }[state];
}

// -- conversation list -----------------------------------------------------------

function renderList() {
  const ul = $("conversations");
  ul.replaceChildren();
  const convs = [...app.conversations.values()].sort((a, b) => b.lastActivityMs - a.lastActivityMs);
  for (const c of convs) {
    const li = document.createElement("li");
    li.dataset.conv = c.conversationId;
    li.className = c.conversationId === app.open ? "active" : "";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = titleOf(c);
    const unread = document.createElement("span");
    unread.className = "unread";
    unread.textContent = c.unreadCount > 0 ? String(c.unreadCount) : "";
    li.append(name, unread);
    li.onclick = () => openConversation(c.conversationId);
    ul.append(li);
  }
}

async function refreshList() {
  try {
    const { conversations } = await app.client.listConversations(100);
    for (const c of conversations) {
      const local = app.conversations.get(c.conversationId);
      // The open conversation counts as read (its READ may still be on its way).
      if (c.conversationId === app.open) c.unreadCount = 0;
      app.conversations.set(c.conversationId, { ...local, ...c });
    }
    renderList();
  } catch (e) {
    console.info("conversation list:", e.message);
  }
}

function refreshListSoon() {
  clearTimeout(app.listTimer);
  app.listTimer = setTimeout(refreshList, 200);
}

// -- messages ----------------------------------------------------------------------

/** Inserts or updates the row of a message of the open conversation, keeping
 * conv_seq order (rows not yet acknowledged stay last, in submit order). */
function upsertRow({ senderId, clientMsgId, convSeq = 0, text, status, recalled = false }) {
  const key = `${senderId}/${clientMsgId}`;
  let row = app.rows.get(key);
  if (!row) {
    const li = document.createElement("li");
    li.dataset.key = key;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = senderId;
    const body = document.createElement("span");
    body.className = "text";
    const tick = document.createElement("span");
    tick.className = "tick";
    li.append(who, body, tick);
    row = { li, convSeq: 0 };
    app.rows.set(key, row);
  }
  const { li } = row;
  if (text !== undefined) li.querySelector(".text").textContent = recalled ? "message recalled" : text;
  const mine = senderId === app.me;
  li.className = ["msg", mine ? "mine" : "", mine ? status ?? (convSeq ? "sent" : "pending") : "", recalled ? "recalled" : ""]
    .filter(Boolean)
    .join(" ");
  if (convSeq && row.convSeq !== convSeq) {
    row.convSeq = convSeq;
    li.dataset.convSeq = String(convSeq);
  }
  placeRow(row);
}

function placeRow(row) {
  const ol = $("messages");
  const { li, convSeq } = row;
  let before = null;
  if (convSeq) {
    for (const other of ol.children) {
      const s = Number(other.dataset.convSeq || 0);
      if (other !== li && (s === 0 || s > convSeq)) {
        before = other;
        break;
      }
    }
  } else if (li.parentNode === ol) {
    return; // a pending row stays where it is
  }
  if (li.nextSibling !== before || li.parentNode !== ol) ol.insertBefore(li, before);
  if (!before) ol.scrollTop = ol.scrollHeight;
}

function rowByConvSeq(convSeq) {
  for (const row of app.rows.values()) if (row.convSeq === convSeq) return row;
  return null;
}

function showMessage(m) {
  if (m.kind === Kind.EDIT || m.kind === Kind.RECALL) {
    const target = rowByConvSeq(m.targetConvSeq);
    if (target) {
      const [senderId, clientMsgId] = target.li.dataset.key.split("/");
      upsertRow({ senderId, clientMsgId, convSeq: target.convSeq, text: m.text, recalled: m.kind === Kind.RECALL });
    }
    return;
  }
  upsertRow({ senderId: m.senderId, clientMsgId: m.clientMsgId, convSeq: m.convSeq, text: m.text, recalled: m.recalled });
}

function isChat(kind) {
  return !kind || kind === Kind.MESSAGE;
}

async function openConversation(conversationId) {
  app.open = conversationId;
  app.rows.clear();
  $("messages").replaceChildren();
  $("composer").hidden = false;
  let conv = app.conversations.get(conversationId);
  if (!conv) {
    conv = { conversationId, name: "", unreadCount: 0, readConvSeq: 0, lastActivityMs: Date.now() };
    app.conversations.set(conversationId, conv);
  }
  $("title").textContent = titleOf(conv);
  // What this device still has to send to it (restored from the outbox after a reload too).
  for (const p of app.client.pending()) {
    if (p.conversationId === conversationId && isChat(p.kind)) {
      upsertRow({ senderId: app.me, clientMsgId: p.clientMsgId, text: p.text, status: "pending" });
    }
  }
  renderList();
  await loadHistory(conversationId);
  $("text").focus();
}

async function loadHistory(conversationId) {
  try {
    const { messages } = await app.client.history(conversationId, 0, 100);
    if (app.open !== conversationId) return;
    for (const m of messages.reverse()) if (isChat(m.kind)) showMessage(m);
    markReadSoon();
  } catch (e) {
    console.info("history:", e.message);
  }
}

function markReadSoon() {
  clearTimeout(app.readTimer);
  app.readTimer = setTimeout(() => {
    const conv = app.conversations.get(app.open);
    if (!conv) return;
    let top = 0;
    for (const row of app.rows.values()) top = Math.max(top, row.convSeq);
    conv.unreadCount = 0;
    renderList();
    if (top > (conv.readConvSeq ?? 0)) {
      conv.readConvSeq = top;
      app.client.markRead(conv.conversationId, top).catch((e) => console.info("read:", e.message));
    }
  }, 300);
}

function onMessage(m) {
  if (m.kind === Kind.READ && m.senderId === app.me) {
    const conv = app.conversations.get(m.conversationId);
    if (conv) {
      conv.readConvSeq = Math.max(conv.readConvSeq ?? 0, m.targetConvSeq);
      if (m.conversationId !== app.open) conv.unreadCount = 0; // read on another device
      renderList();
    }
    return;
  }
  if (!isChat(m.kind) && m.kind !== Kind.EDIT && m.kind !== Kind.RECALL) return;
  const conv = app.conversations.get(m.conversationId);
  if (!conv) {
    refreshListSoon(); // a new conversation: the server knows its name and counts
  } else if (isChat(m.kind)) {
    conv.lastActivityMs = Math.max(conv.lastActivityMs ?? 0, m.serverTimeMs);
    if (m.conversationId !== app.open && m.senderId !== app.me && m.convSeq > (conv.readConvSeq ?? 0)) {
      conv.unreadCount = (conv.unreadCount ?? 0) + 1;
    }
    renderList();
  }
  if (m.conversationId === app.open) {
    showMessage(m);
    if (m.senderId !== app.me) markReadSoon();
  }
}

function onSendResult(o) {
  if (o.conversationId !== app.open) return;
  const key = `${app.me}/${o.clientMsgId}`;
  if (!app.rows.has(key)) return; // a READ event, or a row of another conversation
  if (o.result) upsertRow({ senderId: app.me, clientMsgId: o.clientMsgId, convSeq: o.result.convSeq, status: "sent" });
  else upsertRow({ senderId: app.me, clientMsgId: o.clientMsgId, status: "failed" });
}

function send(text) {
  const conversationId = app.open;
  const clientMsgId = uuid7();
  upsertRow({ senderId: app.me, clientMsgId, text, status: "pending" });
  // Written to the outbox in IndexedDB before its first frame; sent (and resent
  // after a reconnect or a reload) until the gateway acknowledges it.
  app.client.submit(conversationId, text, { clientMsgId }).catch((e) => console.info("send:", e.message));
  const li = app.rows.get(`${app.me}/${clientMsgId}`)?.li;
  app.client.persisted().then(() => li?.setAttribute("data-saved", "1"), () => {});
}

// -- start -------------------------------------------------------------------------

async function start(user) {
  const device = deviceId();
  const config = await (await fetch("/config.json")).json();
  app.me = user;
  $("me").textContent = `${user} (${device})`;
  $("signin").hidden = true;
  $("chat").hidden = false;
  $("signout").hidden = false;
  const client = new Client({
    url: config.wsUrls,
    token: () => fetchToken(user, device), // before every connection attempt
    store: new IndexedDBStore("imclient"),
    account: `${user}/${device}`,
  });
  app.client = client;
  window.imClient = client; // for the browser tests and the console
  client.on("state", (s) => {
    renderStatus();
    if (s === "connected") {
      refreshList();
      if (app.open) loadHistory(app.open);
    }
  });
  client.on("message", onMessage);
  client.on("sendResult", onSendResult);
  client.on("log", (line) => console.info("imclient:", line));
  // The browser knows about a lost network before the socket does.
  window.addEventListener("offline", () => {
    client.dropConnection();
    renderStatus();
  });
  window.addEventListener("online", () => {
    client.reconnectNow();
    renderStatus();
  });
  await client.start({ waitReady: false });
  renderStatus();
  const last = localStorage.getItem("im.open");
  if (last) openConversation(last);
}

$("signin").onsubmit = async (ev) => {
  ev.preventDefault();
  const user = $("user").value.trim();
  try {
    await fetchToken(user, deviceId());
  } catch (e) {
    $("signin-error").textContent = `cannot sign in: ${e.message}`;
    return;
  }
  localStorage.setItem("im.user", user);
  start(user);
};

$("signout").onclick = async () => {
  localStorage.removeItem("im.user");
  localStorage.removeItem("im.open");
  await app.client?.close();
  location.reload();
};

$("newchat").onsubmit = (ev) => {
  ev.preventDefault();
  const peer = $("peer").value.trim();
  if (!peer || peer === app.me) return;
  $("peer").value = "";
  const conversationId = direct(app.me, peer);
  localStorage.setItem("im.open", conversationId);
  openConversation(conversationId);
};

$("composer").onsubmit = (ev) => {
  ev.preventDefault();
  const text = $("text").value;
  if (!text.trim() || !app.open) return;
  $("text").value = "";
  localStorage.setItem("im.open", app.open);
  send(text);
};

$("conversations").addEventListener("click", (ev) => {
  const li = ev.target.closest("li[data-conv]");
  if (li) localStorage.setItem("im.open", li.dataset.conv);
});

const saved = localStorage.getItem("im.user");
if (saved) start(saved);
else $("signin").hidden = false;
renderStatus();
