"""Turn the last reliability run into ``docs/reliability.md``.

``python tests/reliability/report.py`` reads ``.cache/reliability/last-run.json``
(written by the suite's session hook) and rewrites the document, table and all:
the figures are never typed by hand. ``--input`` and ``--output`` choose other
files; ``--check`` also exits 1 unless every row passed with nothing lost.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_INPUT = ROOT / ".cache" / "reliability" / "last-run.json"
DEFAULT_OUTPUT = ROOT / "docs" / "reliability.md"

INTRO = """\
# Reliability: faults, load and bad input, with figures

The gateway promises at least once, per user (DESIGN.md §3): every push message is
written to a socket of its user or kept in PostgreSQL until the user connects, and
nothing is dropped silently. `tests/reliability/` tries to break that promise with
real processes on loopback: the gateway (`python -m service`; two of them through
Redis in scenario 9), Kafka, PostgreSQL and Redis of the suite's own (started with
`scripts/kafka.sh` / `scripts/postgres.sh` / `scripts/redis.sh` on ports 19092/19093,
15432 and 16379, so the shared ones are never restarted), the auth stand-in
`dev/auth_server.py` behind a TCP proxy that can cut it, and real WebSocket clients.

Every scenario sends known `message_id`s to known users, some connected and some
not, lets the fault happen, then connects every user and drains: a message is
**lost** if no connection of its user ever received it, a **duplicate** is a second
copy on one device (one client, across its reconnections). The subject of each test
message is its id and its content names its user and send time, so a frame also
shows who it was for and how late it came.

Run it: `make reliability` (the issue's sizes, `RELIABILITY_SCALE=full`, a few
minutes), or the short sizes, which `make test` runs too: `pytest tests/reliability`.
The table below is written by `python tests/reliability/report.py` from
`.cache/reliability/last-run.json`; gateway logs of the run are kept in
`.cache/reliability/logs/`. Knobs: `RELIABILITY_SEED` (scenario 8c),
`RELIABILITY_KEEP_SERVICES=1` (leave the private Kafka and PostgreSQL running),
`RELIABILITY_KAFKA_PORT`, `RELIABILITY_KAFKA_CONTROLLER_PORT`, `RELIABILITY_PG_PORT`.
"""

SCENARIOS = """\
## The scenarios

1. **Gateway killed**: SIGKILL while thousands of messages are in flight, restart on the
   same port and consumer group; connected clients reconnect by themselves.
2. **Kafka restarted** mid-stream (the suite's broker): the same gateway process must
   resume by itself.
3. **PostgreSQL stopped** while offline users receive: readiness must be 503 and no
   committed offset may pass a message that could not be stored.
4. **Auth service down** (connections cut), **slow** (over `AUTH_TIMEOUT`) and
   **answering 500**: new clients get 4503, connected ones keep receiving, a reconnect
   storm during the outage is served from the cache (auth requests counted).
5. **Slow client**: one client stops reading (its writes stall until `WRITE_TIMEOUT`),
   another gets a burst larger than `SEND_QUEUE_SIZE` (queue overflow); both must be
   closed with 1013 and get what they missed later, while the others' latency is
   measured from send to receipt.
6. **Reconnect storm**: every client (two devices per user) disconnects and reconnects
   at once while messages flow.
7. **Bad input**: (a) one Kafka value of each malformed kind (random bytes, empty and
   null values, deep JSON, strings over 64 KiB, wrong types, null and missing fields,
   invalid ids, non-UTF-8, lone surrogates, NaN, byte order mark, duplicated keys,
   NUL characters, a 1 MiB value), each followed by a good message; (b) the same
   property with random values from hypothesis; (c) handshake garbage: garbage tokens,
   huge query strings and headers, missing upgrade headers, oversized client frames,
   bad frames, bytes that are not HTTP. Each value must be delivered, dead-lettered or
   skipped, the process must stay up, and no traceback may reach the log.
8. **Security**: (a) the exact token in no log line, metric, close reason or HTTP
   error body; (b) a disallowed `Origin` refused with 4403 before the auth service is
   asked; (c) across many users with look-alike ids (case, prefixes, UUID spellings),
   no frame ever reaches a user it does not name; (d) a flood of distinct invalid tokens
   (20,000 at full scale, 2,000 short, 10 at a time, 6 KiB of headers each) through the
   real auth stand-in, the gateway's RSS measured before and after (each cached refusal
   used to keep its handler's request and socket alive); (e) a storm of bad tokens (5,000
   at full scale, 1,000 short, 100 at a time from one address) while good clients connect
   one after another from another loopback address, each timed from connect to its first
   frame (a stored notification, flushed on connect); (f) request heads sent a byte every
   0.5 s (slowloris) against `HANDSHAKE_TIMEOUT=2s`, while a prompt client connects.
9. **Two processes through Redis** (one consumer group, users on either, some with a
   device on each, the rest offline): (a) one process SIGKILLed mid-stream, its clients
   reconnecting to the other (as through a load balancer), which takes over its
   partitions; (b) Redis stopped mid-stream and started again: both processes must turn
   unready, pause, resubscribe and lose nothing; (c) one process frozen with SIGSTOP (a
   hung machine: its sockets stay open) for longer than the presence TTL and Kafka's
   session timeout, then resumed: the other carries on, nothing is lost.
10. **Any record Kafka can hold**, written by real producers: (a) aiokafka with each
   `compression_type` (none, gzip, snappy, lz4, zstd) and Kafka's console producer with
   each `--compression-codec`; (b) record timestamps -1, 0, year 10000 and an hour ahead
   (on topics that take any timestamp, as Kafka 3.x brokers do); (c) a transactional
   producer's committed and aborted transactions; (d) keys (none, empty, binary, 100 KiB),
   headers (null values, repeated, binary, 200 of them, non-ASCII names) and null values.
   Every valid notification must reach the connected user or be stored for the offline
   one with the contract's user, title, body and a representable time; invalid ones
   (null values, user ids no connection can have) must reach the DLQ with their reason;
   aborted records must never be delivered, stored or dead-lettered; the gateway must stay
   up and ready, with no traceback in its log.
11. **A dead-letter topic that cannot be written** (`KAFKA_DLQ_TIMEOUT=3s`): (a) one that
   refuses every write (a compacted topic, records without a key), (b) one that never
   exists (writes time out). A poison record on each partition, good messages behind it:
   the good ones must arrive, each poison record must be logged with its partition and
   offset, counted in `notify_dead_letter_failures_total` and committed past, and readiness
   must show `"dlq": false`. Recovery: from the first poison record sent to the last good
   message received.
12. **One `message_id` sent to several users**: each shared id goes to 2 to 6 users (up to
   20 at full size) as one record per user, keyed by user, a quarter of the users connected
   and the rest offline; every record is produced twice (a producer retrying without
   idempotence). Each user must receive each of its ids once per device, live or from the
   backlog on connect; the second copies must add no row and be counted in
   `notify_store_duplicates_total`.
13. **Clients that flood pings and never read** (raw sockets with a 4 KiB receive buffer
   sending 125-byte pings as fast as they can, at most 20 s and 32 MiB each;
   `WRITE_TIMEOUT`, `PING_INTERVAL` and `PING_TIMEOUT` 2 s): (a) a connected client, while
   five others receive a stream; (b) a connected one sending empty pings instead (the
   kernel takes its tiny pongs for long: it costs CPU, not room, and the unanswered
   keepalive must cut it off), one whose auth answer takes longer than `WRITE_TIMEOUT`
   (in no hub yet) and one refused (invalid token) while its buffer is full. Each must be
   cut off within `WRITE_TIMEOUT + PING_TIMEOUT` (plus 2 s for a loaded machine), the
   gateway's RSS (peak `VmRSS`, sampled every 0.1 s) must grow by less than 50 MB, the
   others lose nothing, and the flooder's messages sent after the cut reach it when it
   returns as an ordinary client. The old gateway never cut them off and grew by
   hundreds of MB.
14. **Acknowledged delivery (protocol v2) through blackholed connections**: every user
   has one `notify.v2` client acknowledging what it receives (batched every 50 ms),
   each through a TCP proxy of its own; halfway through the stream the proxies of half
   the users freeze (bytes vanish both ways, nothing is closed: a phone in a tunnel),
   the second half is sent, then those users connect again directly. Every
   notification must reach a client of its user: what was written into the frozen
   connections was never acknowledged, so it was stored and is sent again. A copy
   received again after its ack was lost in the blackhole counts as a duplicate (at
   least once); one connection must never receive an id twice. With v1 the frames
   written into the frozen connections count as delivered and are lost.
"""


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _note(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else _cell(value)
    return text.replace("|", "\\|")


def _order(row: dict[str, Any]) -> tuple[int, str]:
    match = re.match(r"(\d+)([a-z]?)", row["scenario"])
    return (int(match[1]), match[2]) if match else (99, row["scenario"])


def render(run: dict[str, Any]) -> str:
    """The whole document for one run."""
    rows = sorted(run["rows"], key=_order)
    lines = [
        "<!-- Generated by tests/reliability/report.py from .cache/reliability/last-run.json;",
        "     do not edit by hand: run `make reliability`. -->",
        "",
        INTRO,
        "## Figures of the last run",
        "",
        f"Scale **{run['scale']}**, started {run['started']}, {run['duration_s']:g} s in all, "
        f"commit `{run.get('commit') or 'unknown'}`, {run['machine']['cpus']} CPUs, "
        f"Python {run['machine']['python']}.",
        "",
        "| scenario | messages | lost | duplicates | recovery (s) | result |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['scenario']} | {_cell(row['messages'])} | {_cell(row['lost'])} | "
            f"{_cell(row['duplicates'])} | {_cell(row['recovery_s'])} | {row['outcome']} |"
        )
    failed = [row for row in rows if row["outcome"] != "passed"]
    if failed:
        lines += ["", "### Open problems", ""]
        for row in failed:
            problems = row["notes"].get("problems") or [row.get("failure") or row["outcome"]]
            for problem in problems:
                first = str(problem).strip().splitlines()[0] if str(problem).strip() else ""
                lines.append(f"- {row['scenario']}: {first[:300]}")
    lines += [
        "",
        "Messages: test messages (or bad values, handshakes, answers checked) sent. Lost: "
        "messages no connection of their user received (for 7a/7b: good messages that "
        "never came after bad input). Recovery: as defined per row below.",
        "",
        "## Per scenario",
        "",
    ]
    for row in rows:
        lines.append(f"### {row['scenario']}")
        lines.append("")
        lines.append(f"- test: `{row['test']}` ({row['outcome']}, {row['duration_s']:g} s)")
        lines.append(
            f"- users: {_cell(row['users'])}, connections: {_cell(row['connections'])}, "
            f"duplicates on one connection: {_cell(row['same_connection_duplicates'])}"
        )
        if row.get("recovery"):
            lines.append(f"- recovery: {row['recovery']}")
        for key, value in row["notes"].items():
            lines.append(f"- {key}: {_note(value)}")
        lines.append("")
    lines.append(SCENARIOS)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true", help="exit 1 unless all passed, 0 lost")
    args = parser.parse_args(argv)
    if not args.input.exists():
        print(f"report.py: {args.input} not found: run the suite first", file=sys.stderr)
        return 2
    run = json.loads(args.input.read_text())
    args.output.write_text(render(run))
    print(f"report.py: wrote {args.output} ({len(run['rows'])} scenarios, scale {run['scale']})")
    if args.check:
        bad = [r["scenario"] for r in run["rows"] if r["outcome"] != "passed" or r["lost"]]
        if bad:
            print(f"report.py: not passed or lost > 0: {', '.join(bad)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
