// The real services of the integration tests: the gateway (`python -m service`), the
// development auth stand-in (dev/auth_server.py) and Kafka's console producer
// (scripts/kafka.sh), all on loopback. Kafka and PostgreSQL are the ones `make up`
// started: KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL (or KAFKA_PORT and PG_PORT) say where.
import { spawn, spawnSync } from "node:child_process";
import { createHmac, randomUUID } from "node:crypto";
import { openSync, closeSync, mkdtempSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const PYTHON = process.env.PYTHON ?? join(ROOT, ".venv/bin/python");
export const KAFKA =
  process.env.KAFKA_BOOTSTRAP_SERVERS ?? `127.0.0.1:${process.env.KAFKA_PORT ?? "9092"}`;
export const DATABASE_URL =
  process.env.DATABASE_URL ??
  `postgresql://notify:notify@127.0.0.1:${process.env.PG_PORT ?? "5432"}/notify`;

// dev/auth_server.py's development secret: tokens the stand-in accepts.
const DEV_SECRET = "dev-only-secret-not-for-production";

const LOGS = mkdtempSync(join(tmpdir(), "notify-js-"));

/** Poll `check` (sync or async) every `interval` ms until it is truthy, for at most `timeout` ms. */
export async function until(check, timeout, what, interval = 50) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

/** An HS256 access token for `userId` that the auth stand-in accepts, valid `ttl` seconds. */
export function issueToken(userId, ttl = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const head = encode({ alg: "HS256", typ: "JWT" });
  const claims = encode({ sub: userId, type: "access", iat: now, exp: now + ttl });
  const signature = createHmac("sha256", DEV_SECRET).update(`${head}.${claims}`).digest("base64url");
  return `${head}.${claims}.${signature}`;
}

/** The auth stand-in, in its own process; `stop()` ends it. */
export async function startAuth() {
  const port = await freePort();
  const child = spawn(PYTHON, ["dev/auth_server.py", "--port", String(port)], {
    cwd: ROOT,
    stdio: "ignore",
  });
  await until(() => canConnect(port), 30_000, "the auth stand-in");
  return {
    verifyUrl: `http://127.0.0.1:${port}/api/v1/users/me`,
    stop: () => stopChild(child, "SIGTERM"),
  };
}

function canConnect(port) {
  return new Promise((resolveOk) => {
    fetch(`http://127.0.0.1:${port}/`).then(
      () => resolveOk(true),
      () => resolveOk(false),
    );
  });
}

function stopChild(child, signal) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolveExit) => {
    const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
    child.once("exit", () => {
      clearTimeout(timer);
      resolveExit();
    });
    child.kill(signal);
  });
}

/** Create a fresh topic pair for one test file: `[topic, dead-letter topic]`. */
export function createTopics() {
  const name = `notification.send.js-${randomUUID().slice(0, 8)}`;
  for (const [topic, partitions] of [
    [name, "3"],
    [`${name}.dlq`, "1"],
  ]) {
    kafkaScript(["topics", "--create", "--topic", topic, "--partitions", partitions, "--replication-factor", "1"]);
  }
  return [name, `${name}.dlq`];
}

export function deleteTopics(topics) {
  for (const topic of topics) kafkaScript(["topics", "--delete", "--topic", topic], { check: false });
}

/** Produce lines with Kafka's own console producer, as operators do. */
export function produce(topic, ...records) {
  const input = records.map((record) => JSON.stringify(record)).join("\n") + "\n";
  kafkaScript(["produce", topic], { input });
}

function kafkaScript(args, { input, check = true } = {}) {
  const result = spawnSync("scripts/kafka.sh", args, {
    cwd: ROOT,
    input,
    encoding: "utf8",
    env: { ...process.env, KAFKA_BOOTSTRAP_SERVERS: KAFKA },
    timeout: 120_000,
  });
  if (check && result.status !== 0) {
    throw new Error(`scripts/kafka.sh ${args[0]} failed (${result.status}): ${result.stderr}`);
  }
}

/** A notification record for Kafka, as the platform's producers write it. */
export function record(userId, subject, content = "body") {
  return { message_id: randomUUID(), delivery_method: "push", user_id: userId, subject, content };
}

/**
 * A gateway process: `python -m service` on a fixed loopback port, so that a restart
 * listens where the first start did. Its log goes to a file under the system's temp dir.
 */
export class Gateway {
  constructor(env) {
    this.env = env;
    this.port = null;
    this.child = null;
    this.logPath = join(LOGS, `gateway-${randomUUID().slice(0, 8)}.log`);
  }

  get url() {
    return `ws://127.0.0.1:${this.port}`;
  }

  async start() {
    this.port ??= await freePort();
    const log = openSync(this.logPath, "a");
    this.child = spawn(PYTHON, ["-m", "service"], {
      cwd: ROOT,
      env: {
        ...process.env,
        REDIS_URL: "",
        LOG_LEVEL: "INFO",
        AUTH_TIMEOUT: "5s",
        ...this.env,
        NOTIFY_HOST: "127.0.0.1",
        NOTIFY_PORT: String(this.port),
      },
      stdio: ["ignore", log, log],
    });
    closeSync(log);
    const child = this.child;
    await until(
      async () => {
        if (child.exitCode !== null) throw new Error(`gateway exited:\n${this.logs().slice(-3000)}`);
        try {
          return (await fetch(`http://127.0.0.1:${this.port}/health/ready`)).status === 200;
        } catch {
          return false;
        }
      },
      90_000,
      "the gateway to be ready",
      200,
    );
    return this;
  }

  /** SIGTERM (a deploy: clients get 1001) and wait for the exit. */
  stop() {
    return this.child ? stopChild(this.child, "SIGTERM") : Promise.resolve();
  }

  kill() {
    return this.child ? stopChild(this.child, "SIGKILL") : Promise.resolve();
  }

  logs() {
    try {
      return readFileSync(this.logPath, "utf8");
    } catch {
      return "";
    }
  }

  /** The gateway's count of open connections, from /metrics. */
  async connections() {
    const text = await (await fetch(`http://127.0.0.1:${this.port}/metrics`)).text();
    const line = text.split("\n").find((l) => l.startsWith("notify_connections "));
    return line ? Number(line.split(" ")[1]) : NaN;
  }
}
