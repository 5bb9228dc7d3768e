// Unit tests of the client: a fake WebSocket plays the gateway, a virtual clock the time.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { backoffDelay, closeAction, NotifyClient } from "../notify-client.js";
import { FakeClock, fakeWebSocketClass, settle } from "./fakes.js";

/** A client on a fake socket and clock; its events are recorded. */
function harness(options = {}) {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const events = { states: [], notifications: [], gaps: [], errors: [], tokenRequests: [] };
  let issued = 0;
  const client = new NotifyClient({
    url: "ws://gateway.test",
    token: async (request) => {
      events.tokenRequests.push(request.reason);
      issued++;
      return `token-${issued}`;
    },
    WebSocket: FakeWebSocket,
    timers: clock,
    now: clock.now,
    onStateChange: (change) => events.states.push(change),
    onNotification: (n) => events.notifications.push(n),
    onGap: (gap) => events.gaps.push(gap),
    onError: (error) => events.errors.push(error),
    ...options,
  });
  const last = () => sockets[sockets.length - 1];
  return { client, clock, sockets, events, last };
}

async function opened(options) {
  const h = harness(options);
  h.client.connect();
  await settle();
  h.last().accept();
  return h;
}

function notification(id, title = "t") {
  return { type: "notification", id, title, body: "b", created_at: "2026-12-02T10:15:30.123Z" };
}

describe("close codes", () => {
  for (const code of [1000, 1001, 1006, 1011, 1013, 4503, 1008, 1009, 4000]) {
    test(`${code}: reconnects with the same kind of token request, within the first backoff step`, async () => {
      const { clock, sockets, events, last, client } = await opened();
      last().serverClose(code);
      assert.equal(client.state, "reconnecting");
      await clock.advance(500); // the first step of the backoff: [0, 500) ms
      assert.equal(sockets.length, 2, "one new attempt");
      assert.deepEqual(events.tokenRequests, ["connect", "connect"]);
    });
  }

  test("4401: asks the provider for a new token (reason 'refused') and connects with it", async () => {
    const { clock, sockets, events, last } = await opened();
    last().serverClose(4401, "token expired");
    await clock.advance(0);
    assert.equal(sockets.length, 2);
    assert.deepEqual(events.tokenRequests, ["connect", "refused"]);
    assert.equal(sockets[1].token, "token-2");
  });

  test("4401 again and again: the refreshes back off instead of hammering the auth service", async () => {
    const { clock, sockets, last } = await opened();
    for (let i = 0; i < 8; i++) {
      await clock.advance(60_000);
      last().serverClose(4401);
    }
    const before = sockets.length;
    await clock.advance(1000);
    // After 8 consecutive refusals the wait is drawn from [0, 30 s]: one second rarely sees a retry.
    assert.ok(sockets.length - before <= 1);
  });

  test("4401 with a fixed token: stops, since the same token must not be retried", async () => {
    const { clock, sockets, last, client } = await opened({ token: "fixed" });
    last().serverClose(4401);
    await clock.advance(600_000);
    assert.equal(sockets.length, 1);
    assert.equal(client.state, "stopped");
  });

  test("4403: stops for good, with the reason and the code", async () => {
    const { clock, sockets, events, last, client } = await opened();
    last().serverClose(4403, "origin not allowed");
    await clock.advance(600_000);
    assert.equal(sockets.length, 1, "no reconnect");
    assert.equal(client.state, "stopped");
    const stop = events.states.at(-1);
    assert.equal(stop.state, "stopped");
    assert.equal(stop.closeCode, 4403);
    assert.match(stop.reason, /forbidden/);
    assert.equal(clock.pending, 0, "no timer left");
  });

  test("4429: waits tens of seconds before the next attempt", async () => {
    const { clock, sockets, last, events } = await opened({ random: () => 0 });
    last().serverClose(4429);
    assert.ok(events.states.at(-1).delay >= 20_000);
    await clock.advance(19_999);
    assert.equal(sockets.length, 1, "no attempt before 20 s");
    await clock.advance(1);
    assert.equal(sockets.length, 2);
  });

  test("the table itself: every code of the protocol has its action", () => {
    const actions = Object.fromEntries(
      [1001, 1011, 1013, 4401, 4403, 4429, 4503].map((c) => [c, closeAction(c).action]),
    );
    assert.deepEqual(actions, {
      1001: "now",
      1011: "retry",
      1013: "retry",
      4401: "refresh",
      4403: "stop",
      4429: "later",
      4503: "retry",
    });
    assert.equal(closeAction(4999).action, "retry", "an unknown code retries with backoff");
  });

  test("a connect that never opens is abandoned after connectTimeout and retried", async () => {
    const h = harness({ connectTimeout: 5000 });
    h.client.connect();
    await settle();
    await h.clock.advance(5000);
    assert.equal(h.sockets[0].closedByClient !== null, true);
    assert.equal(h.client.state, "reconnecting");
    await h.clock.advance(500);
    assert.equal(h.sockets.length, 2);
  });

  test("a token provider that returns nothing stops the client", async () => {
    const h = harness({ token: async () => null });
    h.client.connect();
    await settle();
    assert.equal(h.sockets.length, 0);
    assert.equal(h.client.state, "stopped");
  });

  test("a token provider that throws is retried with backoff", async () => {
    let calls = 0;
    const h = harness({
      token: async () => {
        calls++;
        if (calls < 3) throw new Error("auth down");
        return "t";
      },
    });
    h.client.connect();
    await h.clock.advance(5000);
    assert.equal(calls, 3);
    assert.equal(h.sockets.length, 1);
    assert.equal(h.events.errors[0].code, "token_provider");
  });
});

describe("backoff", () => {
  test("full jitter stays within [0, min(max, base * 2^attempt)]", () => {
    const bounds = { base: 500, max: 30_000 };
    for (let attempt = 0; attempt < 40; attempt++) {
      const ceiling = Math.min(30_000, 500 * 2 ** attempt);
      assert.equal(backoffDelay(attempt, bounds, () => 0), 0);
      assert.ok(backoffDelay(attempt, bounds, () => 0.999999) < ceiling);
      for (let i = 0; i < 50; i++) {
        const delay = backoffDelay(attempt, bounds);
        assert.ok(delay >= 0 && delay < ceiling, `${delay} at attempt ${attempt}`);
      }
    }
  });

  test("1000 clients dropped at once by a deploy (1001) come back spread out, not in a storm", async (t) => {
    const clock = new FakeClock();
    const { FakeWebSocket, sockets } = fakeWebSocketClass();
    const clients = [];
    for (let i = 0; i < 1000; i++) {
      const client = new NotifyClient({
        url: "ws://gateway.test",
        token: async () => "t",
        WebSocket: FakeWebSocket,
        timers: clock,
        now: clock.now,
      });
      clients.push(client.connect());
    }
    await settle();
    for (const socket of sockets) socket.accept();
    const opened = sockets.length;
    for (const socket of sockets.slice()) socket.serverClose(1001);

    // The gateway stays down for a minute: every attempt fails at once (1006).
    const perSlice = []; // attempts in each 100 ms of the minute
    for (let step = 0; step < 600; step++) {
      const before = sockets.length;
      await clock.advance(100);
      perSlice.push(sockets.length - before);
      for (const socket of sockets.slice(before)) socket.serverClose(1006);
    }
    const total = sockets.length - opened;
    assert.ok(total >= 1000, "every client tried again");
    // A storm is every client in the same slice (a fixed delay, or no jitter). Full
    // jitter spreads the first attempts over [0, 500 ms), about 200 per slice, and the
    // v1 probe that follows each failed v2 attempt over [0, 1 s): about 400 in the
    // busiest slice.
    assert.ok(Math.max(...perSlice) < 500, `busiest 100 ms slice: ${Math.max(...perSlice)}`);
    // Later the window has grown (8 s, then up to 30 s): each second sees a fraction,
    // about 170 at most; without jitter all 1000 would come in the same second.
    const perSecond = [];
    for (let i = 0; i < 600; i += 10) perSecond.push(perSlice.slice(i, i + 10).reduce((a, b) => a + b));
    const late = perSecond.slice(10);
    assert.ok(Math.max(...late) < 250, `attempts per second after 10 s: ${late.join(",")}`);
    // And the clients do not keep hammering: about log2(30 s / 0.5 s) + 60 s / 15 s each.
    assert.ok(total < 1000 * 14, `${total} attempts in a minute`);
    t.diagnostic(
      `1000 clients, gateway down 60 s: ${total} attempts, busiest 100 ms: ${Math.max(...perSlice)}, ` +
        `busiest second after 10 s: ${Math.max(...late)}`,
    );
    for (const client of clients) client.close();
  });

  test("the backoff grows while attempts fail and resets after a stable connection", async () => {
    const { clock, last, events } = await opened({
      random: () => 0.999,
      stableAfter: 60_000,
      connectTimeout: 600_000,
    });
    const delays = [];
    for (let i = 0; i < 8; i++) {
      last().serverClose(1006);
      delays.push(events.states.at(-1).delay);
      await clock.advance(40_000);
    }
    assert.deepEqual(
      delays.map((d) => Math.round(d / 100) * 100),
      [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000],
    );
    last().accept();
    await clock.advance(10_000);
    last().serverClose(1006); // open 10 s: not stable, the backoff goes on
    assert.equal(Math.round(events.states.at(-1).delay / 100) * 100, 30_000);
    await clock.advance(40_000);
    last().accept();
    await clock.advance(60_000);
    last().serverClose(1001); // open a minute: stable, start small again
    assert.ok(events.states.at(-1).delay < 500);
  });
});

describe("delivery (v2)", () => {
  test("offers notify.v2 and speaks v2 when the gateway selects it", async () => {
    const { client, last } = await opened();
    assert.deepEqual(last().protocols, ["notify.v2"]);
    assert.equal(client.protocolVersion, "v2");
  });

  test("a notification sent again (its ack was lost) is shown once and acked again", async () => {
    const { clock, last, events } = await opened();
    last().frame(notification("a"));
    last().frame(notification("b"));
    last().frame(notification("a"));
    await clock.advance(100);
    assert.deepEqual(
      events.notifications.map((n) => n.id),
      ["a", "b"],
    );
    assert.equal(last().sent.length, 1, "one ack frame");
    assert.deepEqual(last().sent[0].ids.sort(), ["a", "a", "b"]);
  });

  test("duplicates are dropped across reconnects too", async () => {
    const { clock, last, events } = await opened();
    last().frame(notification("a"));
    await clock.advance(100);
    last().serverClose(1001);
    await clock.advance(500);
    last().accept();
    last().frame(notification("a"));
    last().frame(notification("c"));
    await clock.advance(100);
    assert.deepEqual(
      events.notifications.map((n) => n.id),
      ["a", "c"],
    );
  });

  test("acks are batched: one frame per interval, or per 100 ids", async () => {
    const { clock, last } = await opened();
    for (let i = 0; i < 3; i++) last().frame(notification(`n${i}`));
    await settle();
    assert.deepEqual(last().sent, [], "nothing before the interval");
    await clock.advance(100);
    assert.deepEqual(last().sent, [{ type: "ack", ids: ["n0", "n1", "n2"] }]);

    for (let i = 0; i < 250; i++) last().frame(notification(`m${i}`));
    await settle();
    assert.deepEqual(
      last().sent.slice(1).map((frame) => frame.ids.length),
      [100, 100],
    );
    await clock.advance(100);
    assert.deepEqual(
      last().sent.slice(1).map((frame) => frame.ids.length),
      [100, 100, 50],
    );
  });

  test("acks that may have been lost with the connection are named in ?acked= on the next", async () => {
    const { clock, last } = await opened();
    last().frame(notification("x"));
    await clock.advance(100); // sent
    last().frame(notification("y"));
    await settle(); // handled, not sent yet
    last().serverClose(1006);
    await clock.advance(500);
    assert.equal(last().acked, "x,y");
    last().accept();
    await clock.advance(1000);
    last().serverClose(1006);
    await clock.advance(1000);
    assert.equal(last().acked, null, "a connection that opened took them");
  });

  test("a handler that throws leaves the notification unacked, to be sent again", async () => {
    let fail = true;
    const { clock, last, events } = await opened({
      onNotification: (n) => {
        if (fail) throw new Error("ui broke");
        events.notifications.push(n);
      },
    });
    last().frame(notification("z"));
    await clock.advance(100);
    assert.deepEqual(last().sent, []);
    fail = false;
    last().frame(notification("z"));
    await clock.advance(100);
    assert.deepEqual(events.notifications.map((n) => n.id), ["z"]);
    assert.deepEqual(last().sent, [{ type: "ack", ids: ["z"] }]);
  });

  test("gap frames reach onGap; unknown frame types are ignored", async () => {
    const { last, events } = await opened();
    last().frame({ type: "gap", dropped: 7 });
    last().frame({ type: "from-the-future", x: 1 });
    await settle();
    assert.deepEqual(events.gaps, [{ dropped: 7 }]);
    assert.deepEqual(events.errors, []);
  });

  test("an expiring frame: asks for a token (reason 'expiring') and sends a refresh", async () => {
    const { last, events } = await opened();
    last().frame({ type: "expiring", in_s: 30 });
    await settle();
    assert.deepEqual(events.tokenRequests, ["connect", "expiring"]);
    assert.deepEqual(last().sent, [{ type: "refresh", token: "token-2" }]);
    last().frame({ type: "error", code: "invalid_token", message: "expired" });
    assert.equal(events.errors[0].code, "invalid_token");
  });
});

describe("v1 fallback", () => {
  test("a gateway that does not select notify.v2 is spoken to in v1: no ids, no acks", async () => {
    const h = harness();
    h.client.connect();
    await settle();
    h.last().accept("");
    h.last().frame({ title: "Новый фильм", body: "теперь доступен" });
    h.last().frame({ title: "Новый фильм", body: "теперь доступен" });
    await h.clock.advance(1000);
    assert.equal(h.client.protocolVersion, "v1");
    assert.deepEqual(
      h.events.notifications.map((n) => [n.id, n.title, n.body]),
      [
        [null, "Новый фильм", "теперь доступен"],
        [null, "Новый фильм", "теперь доступен"],
      ],
      "v1 frames carry no id: equal content may be two notifications, so both are shown",
    );
    assert.deepEqual(h.last().sent, [], "no acks to a v1 gateway");
  });

  test("a v1 gateway fails the notify.v2 handshake (as browsers do): v1 is tried at once and kept", async () => {
    const h = harness();
    h.client.connect();
    await settle();
    assert.deepEqual(h.last().protocols, ["notify.v2"]);
    h.last().failHandshake();
    await h.clock.advance(500);
    assert.equal(h.sockets.length, 2);
    assert.deepEqual(h.last().protocols, [], "the second attempt offers no subprotocol");
    h.last().accept("");
    assert.equal(h.client.protocolVersion, "v1");
    h.last().serverClose(1011);
    await h.clock.advance(1000);
    assert.deepEqual(h.last().protocols, [], "a known v1 gateway is not asked for v2 again");
    h.last().accept("");
    h.last().serverClose(1001);
    await h.clock.advance(1000);
    assert.deepEqual(h.last().protocols, ["notify.v2"], "after a deploy, v2 is offered again");
  });

  test("a v2 gateway that restarts is asked for v2 again: an outage does not downgrade to v1", async () => {
    const h = await opened();
    assert.equal(h.client.protocolVersion, "v2");
    // The next connection attempt, however long the backoff makes it wait.
    const nextAttempt = async () => {
      const before = h.sockets.length;
      while (h.sockets.length === before) await h.clock.advance(100);
      return h.last();
    };
    h.last().serverClose(1001); // a deploy: the gateway goes away
    // While it is down, every attempt fails as a refused v2 handshake looks (1006).
    for (let i = 1; i <= 4; i++) {
      const attempt = await nextAttempt();
      assert.deepEqual(attempt.protocols, ["notify.v2"], `attempt ${i} offers v2`);
      attempt.failHandshake();
    }
    const probe = await nextAttempt(); // after four failures in a row: one v1 probe (a rollback?)
    assert.deepEqual(probe.protocols, [], "the probe offers no subprotocol");
    probe.failHandshake(); // still down
    const back = await nextAttempt();
    assert.deepEqual(back.protocols, ["notify.v2"], "after the probe, v2 again");
    back.accept();
    assert.equal(h.client.protocolVersion, "v2", "back up: acknowledged delivery again");
  });

  test('protocol "v2" stops when the gateway speaks v1 only', async () => {
    const h = harness({ protocol: "v2" });
    h.client.connect();
    await settle();
    h.last().accept("");
    assert.equal(h.client.state, "stopped");
  });
});

describe("close()", () => {
  test("stops for good: pending acks sent, socket closed with 1000, no timers, idempotent", async () => {
    const { client, clock, sockets, last, events } = await opened();
    last().frame(notification("p"));
    await settle();
    client.close();
    client.close();
    assert.deepEqual(last().sent, [{ type: "ack", ids: ["p"] }]);
    assert.deepEqual(last().closedByClient, { code: 1000, reason: "client closed" });
    assert.equal(clock.pending, 0);
    await clock.advance(600_000);
    assert.equal(sockets.length, 1);
    assert.equal(events.states.filter((s) => s.state === "stopped").length, 1);
  });

  test("close() while reconnecting cancels the attempt", async () => {
    const { client, clock, sockets, last } = await opened();
    last().serverClose(1011);
    client.close();
    await clock.advance(600_000);
    assert.equal(sockets.length, 1);
    assert.equal(client.state, "stopped");
  });

  test("the token never appears in a state change or an error", async () => {
    const { clock, last, events } = await opened();
    last().serverClose(4401);
    await clock.advance(0);
    last().serverClose(4403);
    const text = JSON.stringify(events.states) + events.errors.map((e) => e.message).join();
    assert.doesNotMatch(text, /token-\d/);
  });
});
