// Fakes of the unit tests: a WebSocket the test plays the server of, and a virtual clock.

/** A virtual clock: timers run only when the test advances time. */
export class FakeClock {
  constructor() {
    this.time = 0;
    this._timers = new Map();
    this._next = 1;
    this.setTimeout = (callback, ms) => {
      const id = this._next++;
      this._timers.set(id, { at: this.time + Math.max(0, ms), callback });
      return id;
    };
    this.clearTimeout = (id) => {
      this._timers.delete(id);
    };
    this.now = () => this.time;
  }

  /** Move time forward by `ms`, running the timers due on the way, in order. */
  async advance(ms) {
    const end = this.time + ms;
    for (;;) {
      await settle();
      let due = null;
      for (const [id, timer] of this._timers) {
        if (timer.at <= end && (due === null || timer.at < due[1].at)) due = [id, timer];
      }
      if (due === null) break;
      this._timers.delete(due[0]);
      this.time = Math.max(this.time, due[1].at);
      due[1].callback();
    }
    this.time = end;
    await settle();
  }

  /** The number of timers waiting. */
  get pending() {
    return this._timers.size;
  }
}

/** Let promise callbacks (the token provider, handlers) run. */
export async function settle() {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** A WebSocket class whose instances the test drives; `sockets` lists them, newest last. */
export function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.protocol = "";
      this.readyState = 0;
      this.sent = [];
      this.closedByClient = null;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.push(this);
    }

    get token() {
      return new URL(this.url).searchParams.get("token");
    }

    get acked() {
      return new URL(this.url).searchParams.get("acked");
    }

    send(data) {
      if (this.readyState !== 1) throw new Error("not open");
      this.sent.push(JSON.parse(data));
    }

    close(code = 1005, reason = "") {
      this.closedByClient = { code, reason };
      this.readyState = 3;
    }

    // --- the server's side ---
    accept(protocol = "notify.v2") {
      this.protocol = protocol;
      this.readyState = 1;
      this.onopen?.({});
    }

    frame(object) {
      this.onmessage?.({ data: JSON.stringify(object) });
    }

    /** A failed handshake as Node 20's WebSocket reports it: an error event, no close. */
    failHandshake() {
      this.readyState = 3;
      this.onerror?.({});
    }

    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
  }
  return { FakeWebSocket, sockets };
}
