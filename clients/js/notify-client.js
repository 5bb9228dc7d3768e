// @notify-ws/client: a dependency-free client of the notify-ws gateway.
//
// One module, no build step: import it from a <script type="module"> or from Node 20+
// (with a global WebSocket, or an implementation passed as the `WebSocket` option).
// The wire contract is docs/protocol.md of the gateway; the close-code table below is
// its "what a client does" column, and nothing else decides what happens after a close.

export const VERSION = "0.1.0";

/** The subprotocol of protocol v2 (acknowledged delivery, gap, refresh). */
export const PROTOCOL_V2 = "notify.v2";

/** The endpoint's path on the gateway. */
export const WS_PATH = "/api/v1/notify/ws";

/** Most ids one `ack` frame may carry (docs/protocol.md: 1 to 500). */
const MAX_ACK_IDS = 500;
/** Most ids the `acked` query parameter may carry (docs/protocol.md: at most 100). */
const MAX_ACKED_PARAM = 100;

/**
 * What the client does after a close, by code: `retry` (backoff and jitter), `now`
 * (at once, with jitter: the gateway is going away), `refresh` (a new token first),
 * `later` (a longer wait), `stop` (retrying cannot succeed).
 */
const CLOSE_ACTIONS = new Map([
  [1000, ["retry", "closed by the gateway"]],
  [1001, ["now", "the gateway is going away (deploy or scale-in)"]],
  [1006, ["retry", "the connection was lost"]],
  [1008, ["retry", "the gateway refused a client frame"]],
  [1009, ["retry", "a client frame was too large"]],
  [1011, ["retry", "unexpected gateway error"]],
  [1012, ["now", "the gateway is restarting"]],
  [1013, ["retry", "the client could not keep up"]],
  [4401, ["refresh", "the token was refused or expired"]],
  [4403, ["stop", "forbidden (origin not allowed, or another user's token)"]],
  [4429, ["later", "too many connections"]],
  [4503, ["retry", "the gateway cannot check the token or route now"]],
]);

/**
 * What the close-code table says about `code`.
 * @param {number} code
 * @returns {{action: "retry"|"now"|"refresh"|"later"|"stop", reason: string}}
 */
export function closeAction(code) {
  const known = CLOSE_ACTIONS.get(code);
  if (known) return { action: known[0], reason: known[1] };
  return { action: "retry", reason: `closed with ${code}` };
}

/**
 * A full-jitter exponential backoff delay: uniform in [0, min(max, base * 2^attempt)].
 * @param {number} attempt 0 for the first retry after a failure
 * @param {{base: number, max: number}} bounds milliseconds
 * @param {() => number} random uniform in [0, 1)
 */
export function backoffDelay(attempt, { base, max }, random = Math.random) {
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

const DEFAULTS = {
  protocol: "auto",
  backoff: { base: 500, max: 30_000 },
  stableAfter: 60_000,
  longWait: { min: 20_000, max: 60_000 },
  connectTimeout: 15_000,
  ackInterval: 100,
  ackBatch: 100,
  dedupeSize: 2000,
};

/**
 * A connection to the gateway that keeps itself open until `close()` or a close code
 * that says stop. See notify-client.d.ts for the options and events.
 */
export class NotifyClient {
  /** @param {import("./notify-client.js").NotifyClientOptions} options */
  constructor(options) {
    if (!options || typeof options.url !== "string") throw new TypeError("url is required");
    if (typeof options.token !== "function" && typeof options.token !== "string") {
      throw new TypeError("token must be a string or a function returning one");
    }
    this._url = options.url;
    this._token = options.token;
    this._protocol = options.protocol ?? DEFAULTS.protocol;
    if (!["auto", "v1", "v2"].includes(this._protocol)) {
      throw new TypeError('protocol must be "auto", "v1" or "v2"');
    }
    this._backoff = { ...DEFAULTS.backoff, ...options.backoff };
    this._longWait = { ...DEFAULTS.longWait, ...options.longWait };
    this._stableAfter = options.stableAfter ?? DEFAULTS.stableAfter;
    this._connectTimeout = options.connectTimeout ?? DEFAULTS.connectTimeout;
    this._ackInterval = options.ackInterval ?? DEFAULTS.ackInterval;
    this._ackBatch = Math.min(options.ackBatch ?? DEFAULTS.ackBatch, MAX_ACK_IDS);
    this._dedupeSize = options.dedupeSize ?? DEFAULTS.dedupeSize;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError(
        "no WebSocket: pass the WebSocket option (Node 20: run with --experimental-websocket)",
      );
    }
    this._random = options.random ?? Math.random;
    this._now = options.now ?? (() => Date.now());
    this._timers = options.timers ?? { setTimeout: globalThis.setTimeout.bind(globalThis), clearTimeout: globalThis.clearTimeout.bind(globalThis) };
    this._handlers = {
      notification: options.onNotification,
      state: options.onStateChange,
      gap: options.onGap,
      error: options.onError,
    };

    this._state = "idle";
    this._ws = null;
    this._version = null; // "v1" | "v2" while open
    // What the gateway speaks, once learned: browsers fail a handshake in which the
    // server selects none of the offered subprotocols, so a v1 gateway is found out by
    // a failed v2 attempt followed by a v1 attempt that opens.
    this._serverVersion = null;
    this._offeredV2 = false;
    this._probeV1 = false; // the next attempt offers no subprotocol
    this._probeSoon = true; // the first v2 failure of an unknown gateway probes v1 at once
    this._v2Failures = 0; // failed v2 attempts in a row against a gateway known to speak v2
    this._attempt = 0; // consecutive failures, for the backoff
    this._openedAt = null;
    this._lastClose = null; // {code, reason}
    this._retryTimer = null;
    this._connectTimer = null;
    this._ackTimer = null;
    this._pendingAcks = []; // ids handled, not yet sent
    this._sentAcks = []; // ids sent on this connection (their ack may be lost with it)
    this._ackedParam = []; // ids to name in ?acked= on the next connection
    this._seen = new Set(); // ids handled, oldest first (insertion order), bounded
    this._needsFreshToken = false;
    this._generation = 0; // bumped per socket: late events of an old socket are dropped
  }

  /** "idle" | "connecting" | "open" | "reconnecting" | "stopped" */
  get state() {
    return this._state;
  }

  /** "v1" or "v2" while open, else null. */
  get protocolVersion() {
    return this._version;
  }

  /** The last close: {code, reason}, or null before the first. */
  get lastClose() {
    return this._lastClose;
  }

  /**
   * Start connecting; returns the client. Calling it again while running does nothing.
   * After `close()` or a stop, it starts afresh.
   */
  connect() {
    if (this._state === "connecting" || this._state === "open" || this._state === "reconnecting") {
      return this;
    }
    this._attempt = 0;
    this._open("starting");
    return this;
  }

  /**
   * Stop for good: pending acks are sent, the socket is closed with 1000, no timer is
   * left and no reconnect follows. Idempotent.
   */
  close() {
    if (this._state === "stopped") return;
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    this._generation++;
    if (ws) {
      this._flushAcks(ws);
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    this._version = null;
    this._setState("stopped", { reason: "closed by the client", action: "stop" });
  }

  // --- connecting ---------------------------------------------------------------------

  async _open(why) {
    const generation = ++this._generation;
    // A first connect is "connecting"; an attempt after a close stays "reconnecting"
    // until it opens, so a page shows one state for the whole outage.
    const state = this._state === "reconnecting" ? "reconnecting" : "connecting";
    this._setState(state, { reason: why, action: "connect", doing: `${state}: opening a connection` });
    let token;
    try {
      token = await this._getToken(this._needsFreshToken ? "refused" : "connect");
    } catch (error) {
      if (generation !== this._generation) return;
      this._emitError(new NotifyClientError("token_provider", "the token provider failed", error));
      this._scheduleRetry({ action: "retry", reason: "the token provider failed" }, null);
      return;
    }
    if (generation !== this._generation) return; // closed meanwhile
    if (!token) {
      this._stop("no token: the token provider returned none", null);
      return;
    }
    this._needsFreshToken = false;

    let ws;
    try {
      this._offeredV2 =
        this._protocol === "v2" ||
        (this._protocol === "auto" && this._serverVersion !== "v1" && !this._probeV1);
      this._probeV1 = false;
      const protocols = this._offeredV2 ? [PROTOCOL_V2] : [];
      ws = new this._WebSocket(this._endpoint(token), protocols);
    } catch {
      // A malformed URL: no retry can fix it. The error is not passed on: its message
      // may quote the URL, and the URL holds the token.
      this._emitError(new NotifyClientError("bad_url", "the WebSocket could not be created"));
      this._stop("the WebSocket could not be created", null);
      return;
    }
    this._ws = ws;
    this._connectTimer = this._timers.setTimeout(() => {
      if (generation !== this._generation || this._state === "open") return;
      try {
        ws.close();
      } catch {
        // ignore
      }
      this._onClose(generation, 1006, "connect timeout");
    }, this._connectTimeout);
    ws.onopen = () => this._onOpen(generation, ws);
    ws.onmessage = (event) => this._onMessage(generation, ws, event.data);
    ws.onclose = (event) => this._onClose(generation, event.code, event.reason);
    // A failed handshake: browsers follow the error with a close event (1006), but
    // Node 20's WebSocket fires the error alone. An error after the open is followed
    // by the close event, which carries the code.
    ws.onerror = () => {
      if (generation === this._generation && this._state !== "open") {
        this._onClose(generation, 1006, "connection failed");
        // Release whatever the implementation still holds; Node's WebSocket may fire
        // another error from inside close(): this socket's events are ignored by now.
        ws.onerror = null;
        try {
          ws.close();
        } catch {
          // already closed
        }
      }
    };
  }

  _endpoint(token) {
    const url = new URL(this._url);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    if (url.pathname === "/" || url.pathname === "") url.pathname = WS_PATH;
    url.searchParams.set("token", token);
    if (this._protocol !== "v1" && this._ackedParam.length > 0) {
      url.searchParams.set("acked", this._ackedParam.slice(-MAX_ACKED_PARAM).join(","));
    }
    return url.toString();
  }

  async _getToken(reason) {
    const token = this._token;
    if (typeof token === "string") {
      // A fixed token cannot be refreshed: after 4401 there is nothing new to try.
      if (reason !== "connect") return null;
      return token;
    }
    return await token({ reason });
  }

  _onOpen(generation, ws) {
    if (generation !== this._generation) return;
    this._timers.clearTimeout(this._connectTimer);
    this._connectTimer = null;
    const selected = ws.protocol === PROTOCOL_V2;
    if (this._protocol === "v2" && !selected) {
      // The caller asked for v2 only; the server speaks v1.
      this._generation++;
      this._ws = null;
      try {
        ws.close(1000, "v2 required");
      } catch {
        // ignore
      }
      this._stop("the gateway does not speak notify.v2", null);
      return;
    }
    this._version = selected ? "v2" : "v1";
    this._serverVersion = this._version;
    this._v2Failures = 0;
    // A gateway known to speak v2 is probed for v1 only at the backoff's pace.
    if (selected) this._probeSoon = false;
    if (!selected) this._pendingAcks = []; // a v1 gateway takes no acks
    // The gateway has had the chance to take `acked`: it treated them as acknowledged.
    this._ackedParam = [];
    this._sentAcks = [];
    this._openedAt = this._now();
    this._setState("open", { reason: `connected (${this._version})`, action: "none" });
    if (this._pendingAcks.length) this._scheduleAcks();
  }

  // --- frames -------------------------------------------------------------------------

  _onMessage(generation, ws, data) {
    if (generation !== this._generation) return;
    if (typeof data !== "string") return; // the gateway sends text only
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this._emitError(new NotifyClientError("bad_frame", "a frame was not JSON"));
      return;
    }
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) return;
    if (this._version === "v1") {
      this._deliver({
        id: null,
        title: String(frame.title ?? ""),
        body: String(frame.body ?? ""),
        createdAt: null,
        raw: frame,
      });
      return;
    }
    switch (frame.type) {
      case "notification":
        this._onNotification(frame);
        break;
      case "gap":
        this._call("gap", { dropped: Number(frame.dropped) || 0 });
        break;
      case "expiring":
        this._refresh(generation, ws);
        break;
      case "refreshed":
        break;
      case "error":
        this._emitError(new NotifyClientError(String(frame.code ?? "error"), String(frame.message ?? "")));
        break;
      default:
        break; // a later version's frame: ignored, as the protocol says
    }
  }

  _onNotification(frame) {
    const id = typeof frame.id === "string" ? frame.id : null;
    if (id === null) return;
    if (this._seen.has(id)) {
      // Sent again because our ack was lost: ack it again, do not show it twice.
      this._queueAck(id);
      return;
    }
    this._remember(id);
    const notification = {
      id,
      title: String(frame.title ?? ""),
      body: String(frame.body ?? ""),
      createdAt: typeof frame.created_at === "string" ? frame.created_at : null,
      raw: frame,
    };
    // Acknowledge once the application has it: after its handler returned (or its
    // promise resolved). A handler that throws leaves it unacknowledged, so the gateway
    // sends it again on the next connection; it is forgotten here so that it is shown.
    Promise.resolve()
      .then(() => this._handlers.notification?.(notification))
      .then(
        () => this._queueAck(id),
        (error) => {
          this._seen.delete(id);
          this._emitError(new NotifyClientError("handler", "onNotification threw", error));
        },
      );
  }

  _deliver(notification) {
    try {
      this._handlers.notification?.(notification);
    } catch (error) {
      this._emitError(new NotifyClientError("handler", "onNotification threw", error));
    }
  }

  _remember(id) {
    this._seen.add(id);
    if (this._seen.size > this._dedupeSize) {
      const oldest = this._seen.values().next().value;
      this._seen.delete(oldest);
    }
  }

  async _refresh(generation, ws) {
    let token;
    try {
      token = await this._getToken("expiring");
    } catch (error) {
      this._emitError(new NotifyClientError("token_provider", "the token provider failed", error));
      return; // the gateway closes with 4401 at exp; the reconnect asks again
    }
    if (!token || generation !== this._generation || ws.readyState !== 1) return;
    ws.send(JSON.stringify({ type: "refresh", token }));
  }

  // --- acks ---------------------------------------------------------------------------

  _queueAck(id) {
    if (this._version === "v1") return;
    this._pendingAcks.push(id);
    if (this._pendingAcks.length >= this._ackBatch) {
      this._flushAcks(this._ws);
    } else {
      this._scheduleAcks();
    }
  }

  _scheduleAcks() {
    if (this._ackTimer !== null) return;
    this._ackTimer = this._timers.setTimeout(() => {
      this._ackTimer = null;
      this._flushAcks(this._ws);
    }, this._ackInterval);
  }

  _flushAcks(ws) {
    if (this._ackTimer !== null) {
      this._timers.clearTimeout(this._ackTimer);
      this._ackTimer = null;
    }
    if (!ws || ws.readyState !== 1 || this._version !== "v2") return; // kept for later
    while (this._pendingAcks.length > 0) {
      const ids = this._pendingAcks.splice(0, MAX_ACK_IDS);
      ws.send(JSON.stringify({ type: "ack", ids }));
      this._sentAcks.push(...ids);
      if (this._sentAcks.length > MAX_ACKED_PARAM) {
        this._sentAcks.splice(0, this._sentAcks.length - MAX_ACKED_PARAM);
      }
    }
  }

  // --- closes and retries -------------------------------------------------------------

  _onClose(generation, code, reason) {
    if (generation !== this._generation) return;
    this._generation++;
    this._clearTimers();
    const wasOpen = this._state === "open";
    this._ws = null;
    this._version = null;
    code = code || 1006;
    this._lastClose = { code, reason: reason || "" };
    // Acks sent just before the drop may be lost; unsent ones surely were. The next
    // connection names them in ?acked= (the newest 100), so they are not sent again.
    this._ackedParam = [...this._ackedParam, ...this._sentAcks, ...this._pendingAcks].slice(
      -MAX_ACKED_PARAM,
    );
    this._sentAcks = [];
    this._pendingAcks = [];
    const openFor = wasOpen && this._openedAt !== null ? this._now() - this._openedAt : 0;
    if (openFor >= this._stableAfter) {
      this._attempt = 0; // a stable connection: the next failure starts small again
    }
    this._openedAt = null;
    const decision = closeAction(code);
    if (decision.action === "now" && this._serverVersion !== "v2") {
      // A new deployment may speak another version: ask a v1 gateway again. The quick
      // v1 probe only after a real session: a draining gateway refuses new connections
      // with 1001 too, and those must not add attempts beyond the backoff's.
      this._serverVersion = null;
      if (openFor >= 1000) this._probeSoon = true;
    }
    // A gateway known to speak v2 that does not answer is down (a restart, a deploy),
    // not a v1 gateway: keep offering v2, or the first attempt to open after the outage
    // could be a v1 probe and the client would stay without acknowledged delivery. Only
    // every fourth failure in a row probes v1, in case the deployment was rolled back.
    let knownV2Failed = false;
    if (!wasOpen && code === 1006 && this._offeredV2 && this._protocol === "auto" &&
        this._serverVersion === "v2") {
      this._v2Failures++;
      if (this._v2Failures % 4 === 0) {
        this._serverVersion = null;
        knownV2Failed = true;
      }
    }
    const v2Failed =
      knownV2Failed ||
      (!wasOpen && code === 1006 && this._offeredV2 && this._protocol === "auto" &&
        this._serverVersion === null);
    if (v2Failed) {
      // A v1 gateway, or no gateway: the next attempt offers v1 (they alternate until
      // one opens). The first time, it comes at once (with jitter): the common case is
      // a v1 gateway that is up. Later, at the backoff's pace, so an outage costs no
      // extra attempts.
      this._probeV1 = true;
      if (this._probeSoon) {
        this._probeSoon = false;
        const delay = backoffDelay(0, this._backoff, this._random);
        this._setState("reconnecting", {
          reason: "the notify.v2 handshake failed (1006)",
          action: "retry",
          delay,
          doing: "trying protocol v1",
        });
        const generation = this._generation;
        this._retryTimer = this._timers.setTimeout(() => {
          this._retryTimer = null;
          if (generation !== this._generation || this._state !== "reconnecting") return;
          this._open("trying protocol v1");
        }, delay);
        return;
      }
    }
    if (decision.action === "stop") {
      this._stop(`${decision.reason} (${code})`, code);
      return;
    }
    if (decision.action === "refresh") {
      if (typeof this._token === "string") {
        this._stop(`${decision.reason} (${code}); a fixed token cannot be refreshed`, code);
        return;
      }
      this._needsFreshToken = true;
    }
    this._scheduleRetry(decision, code);
  }

  _scheduleRetry(decision, code) {
    let delay;
    if (decision.action === "later") {
      const { min, max } = this._longWait;
      delay = Math.floor(min + this._random() * (max - min));
    } else if (decision.action === "refresh" && this._attempt === 0) {
      delay = 0; // a new token is the fix: no reason to wait, unless it keeps failing
    } else {
      delay = backoffDelay(this._attempt, this._backoff, this._random);
    }
    this._attempt++;
    const what =
      decision.action === "refresh"
        ? "getting a new token, then reconnecting"
        : `reconnecting in ${(delay / 1000).toFixed(1)} s`;
    this._setState("reconnecting", {
      reason: code === null ? decision.reason : `${decision.reason} (${code})`,
      action: decision.action,
      delay,
      doing: what,
    });
    const generation = this._generation;
    this._retryTimer = this._timers.setTimeout(() => {
      this._retryTimer = null;
      if (generation !== this._generation || this._state !== "reconnecting") return;
      this._open("reconnecting");
    }, delay);
  }

  _stop(reason, code) {
    this._clearTimers();
    this._generation++;
    const ws = this._ws;
    this._ws = null;
    this._version = null;
    if (ws) {
      try {
        ws.close(1000, "client stopped");
      } catch {
        // ignore
      }
    }
    this._setState("stopped", { reason, action: "stop", closeCode: code });
  }

  _clearTimers() {
    for (const name of ["_retryTimer", "_connectTimer", "_ackTimer"]) {
      if (this[name] !== null) {
        this._timers.clearTimeout(this[name]);
        this[name] = null;
      }
    }
  }

  // --- events -------------------------------------------------------------------------

  _setState(state, detail) {
    this._state = state;
    const change = {
      state,
      reason: detail.reason,
      action: detail.action,
      doing: detail.doing ?? describe(state, detail),
      delay: detail.delay ?? null,
      attempt: this._attempt,
      protocol: this._version,
      closeCode: detail.closeCode !== undefined ? detail.closeCode : (this._lastClose?.code ?? null),
    };
    this._call("state", change);
  }

  _emitError(error) {
    this._call("error", error);
  }

  _call(name, value) {
    const handler = this._handlers[name];
    if (!handler) return;
    try {
      handler(value);
    } catch (error) {
      if (name !== "error") this._emitError(new NotifyClientError("handler", `on${name} threw`, error));
    }
  }
}

function describe(state, detail) {
  switch (state) {
    case "connecting":
      return "connecting";
    case "open":
      return "receiving notifications";
    case "stopped":
      return "stopped: not reconnecting";
    default:
      return detail.reason ?? state;
  }
}

/** An error the client reports through `onError`; `code` says what failed. */
export class NotifyClientError extends Error {
  constructor(code, message, cause) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "NotifyClientError";
    this.code = code;
  }
}
