// The live page: a notification list on top of the JS client, served by the gateway
// with DEMO_PAGE=true. The token comes from #token= (never sent to a server), ?token=,
// or the field; it is removed from the address bar at once.
import { closeAction, NotifyClient } from "./notify-client.js";

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("state"),
  protocol: $("protocol"),
  closeCode: $("close-code"),
  closeMeaning: $("close-meaning"),
  doing: $("doing"),
  token: $("token"),
  form: $("connect-form"),
  connect: $("connect"),
  disconnect: $("disconnect"),
  events: $("events"),
  list: $("list"),
  empty: $("empty"),
  unread: $("unread"),
  markRead: $("mark-read"),
};

const params = new URLSearchParams(location.hash.slice(1));
const query = new URLSearchParams(location.search);
const initialToken = params.get("token") || query.get("token") || "";
const gateway =
  params.get("gateway") ||
  query.get("gateway") ||
  `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}`;
if (params.has("token") || query.has("token")) {
  // Out of the address bar, the history and any screenshot.
  query.delete("token");
  const rest = query.toString();
  history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : ""));
}

let client = null;
let lastToken = null;
let unread = 0;

function tokenProvider({ reason }) {
  const token = ui.token.value.trim();
  // A token the gateway refused (4401), or one about to expire, would fail again:
  // without a new one in the field, stop and say so.
  if (reason !== "connect" && token === lastToken) return null;
  lastToken = token;
  return token || null;
}

function logEvent(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  ui.events.prepend(item);
  while (ui.events.children.length > 30) ui.events.lastChild.remove();
}

function showState(change) {
  ui.state.textContent = change.state;
  ui.state.dataset.state = change.state;
  ui.protocol.textContent = change.protocol ? `protocol ${change.protocol}` : "";
  if (change.closeCode !== null) {
    ui.closeCode.textContent = String(change.closeCode);
    ui.closeMeaning.textContent = closeAction(change.closeCode).reason;
  }
  let doing = change.doing;
  if (change.state === "stopped" && change.closeCode === 4401 && /no token/.test(change.reason)) {
    doing = "stopped: the token was refused; paste a new one and connect";
  }
  ui.doing.textContent = doing;
  ui.connect.disabled = change.state !== "stopped";
  ui.disconnect.disabled = change.state === "stopped";
  // Each attempt while reconnecting says "connect"; the close before it said why.
  if (change.state === "reconnecting" && change.action === "connect") return;
  logEvent(`${change.state}: ${change.reason}${change.delay !== null ? ` (next try in ${(change.delay / 1000).toFixed(1)} s)` : ""}`);
}

function setUnread(count) {
  unread = count;
  ui.unread.textContent = String(unread);
  document.title = unread ? `(${unread}) notify-ws live` : "notify-ws live";
}

function showNotification(notification) {
  const item = document.createElement("li");
  item.className = "unread";
  if (notification.id) item.dataset.id = notification.id;
  const title = document.createElement("div");
  title.className = "title";
  title.textContent = notification.title;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = notification.body;
  const meta = document.createElement("div");
  meta.className = "meta";
  const when = notification.createdAt ? new Date(notification.createdAt) : new Date();
  meta.textContent = `${when.toLocaleString()}${notification.id ? ` · ${notification.id.slice(0, 8)}` : ""}`;
  item.append(title, body, meta);
  item.addEventListener("click", () => {
    if (item.classList.contains("unread")) {
      item.classList.remove("unread");
      setUnread(unread - 1);
    }
  });
  ui.list.prepend(item);
  ui.empty.hidden = true;
  setUnread(unread + 1);
}

function start() {
  if (client) client.close();
  lastToken = null;
  client = new NotifyClient({
    url: gateway,
    token: tokenProvider,
    onNotification: showNotification,
    onStateChange: showState,
    onGap: ({ dropped }) => logEvent(`gap: ${dropped} notification(s) expired before they were read`),
    onError: (error) => logEvent(`error: ${error.code}`),
  });
  client.connect();
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (ui.token.value.trim()) start();
});
ui.disconnect.addEventListener("click", () => client?.close());
ui.markRead.addEventListener("click", () => {
  for (const item of ui.list.querySelectorAll("li.unread")) item.classList.remove("unread");
  setUnread(0);
});

ui.token.value = initialToken;
if (initialToken) start();

// For tests and the console: the client of this page.
window.notifyDemo = { get client() { return client; } };
