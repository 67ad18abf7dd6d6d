"""Output events per second through a real Mosquitto into pairs, scored by the lexical comparators.

Run by hand (from the repository root):

    nice .venv/bin/python bench/tap/events.py [--pairs 20000]

A separate process publishes N primary and N candidate events (QoS 1, pre-serialised) as fast as
it can; this process runs :class:`MqttOutputSource` (one thread, so one core) with the comparators
exact, normalized-exact, token-f1, rouge-l, length-ratio, json-valid, json-structure and refusal,
and measures events received per second from the first event to the last pair.
Results go to bench/results/tap_events.json.

The publisher is the load generator, not what is measured, so it must outrun the source: it
writes pre-encoded MQTT 3.1.1 PUBLISH packets (QoS 1) on a plain socket and counts the broker's
PUBACKs (`--publisher raw`, the default). `--publisher aiomqtt` publishes with aiomqtt instead
(as the taps do); on this machine it manages only about 4,000 messages a second on its own, so
with it the benchmark measures the publisher.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shadowctl.compare.comparators import build_comparators
from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.policy.model import Comparator, ComparatorName
from shadowctl.sources.outputs import MqttOutputSource

ROOT = Path(__file__).resolve().parents[2]
LEXICAL = [
    "exact",
    "normalized-exact",
    "token-f1",
    "rouge-l",
    "length-ratio",
    "json-valid",
    "json-structure",
    "refusal",
]
ANSWER = (
    "The capital of France is Paris. It has been the country's political and cultural centre for "
    "centuries, and it is home to about two million people."
)

RAW_PUBLISHER = r"""
import asyncio, os, struct, sys

def varint(n):
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)

def packet(first, body):
    return bytes([first]) + varint(len(body)) + body

async def main(port, path):
    lines = [l.split(b" ", 1) for l in open(path, "rb").read().split(b"\n") if l]
    packets = []
    for i, (topic, payload) in enumerate(lines):  # encoded before connecting: not part of the run
        pid = i % 65535 + 1
        packets.append(packet(0x32, struct.pack("!H", len(topic)) + topic + struct.pack("!H", pid) + payload))
    reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
    cid = b"bench-pub-%d" % os.getpid()
    writer.write(packet(0x10, b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack("!H", len(cid)) + cid))
    if await reader.readexactly(4) != b"\x20\x02\x00\x00":
        raise SystemExit("CONNECT refused")
    acked = 0
    async def acks():
        nonlocal acked
        while acked < len(packets):
            data = await reader.readexactly(4)  # PUBACK: 0x40 0x02 id
            if data[0] != 0x40:
                raise SystemExit(f"unexpected packet {data!r}")
            acked += 1
    reading = asyncio.create_task(acks())
    for i in range(0, len(packets), 500):
        while i - acked > 30000 and not reading.done():  # packet ids must not wrap onto unacked ones
            await asyncio.sleep(0.001)
        writer.write(b"".join(packets[i:i + 500]))
        await writer.drain()
    await reading
    writer.write(b"\xe0\x00")
    await writer.drain()
    writer.close()
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

AIOMQTT_PUBLISHER = r"""
import asyncio, sys, aiomqtt
async def main(port, path):
    lines = open(path, "rb").read().split(b"\n")
    async with aiomqtt.Client("127.0.0.1", int(port), max_inflight_messages=1000) as c:
        items = [l.split(b" ", 1) for l in lines if l]
        for i in range(0, len(items), 500):
            await asyncio.gather(*(c.publish(t.decode(), p, qos=1, timeout=120) for t, p in items[i:i + 500]))
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def events_file(path: Path, pairs: int) -> None:
    with path.open("wb") as f:
        for i in range(pairs):
            answer = f"{ANSWER} (answer {i})"  # distinct texts: no help from the caches across pairs
            for variant, text in ((Variant.primary, answer), (Variant.candidate, answer.replace("two", "2.1"))):
                e = OutputEvent(
                    request_id=f"r{i}",
                    variant=variant,
                    shadow=variant is Variant.candidate,
                    service="b/chat",
                    endpoint=Endpoint.chat,
                    prompt_hash="h",
                    output=text,
                    status=200,
                    started_at=time.time(),
                    e2e_s=0.5,
                )
                f.write(f"shadowctl/outputs/b/chat/{variant.value} ".encode() + e.to_json() + b"\n")


async def measure(port: int, path: Path, pairs: int, publisher: str) -> dict[str, float]:
    comps = build_comparators([Comparator(name=ComparatorName(n), threshold=0.5) for n in LEXICAL])
    source = MqttOutputSource(
        f"mqtt://127.0.0.1:{port}", "shadowctl/outputs/b/chat/+", comps, pair_ttl_s=600, expect_baseline=False
    )
    first: list[float] = []
    original = source.ingest

    def ingest(event: OutputEvent) -> None:
        if not first:
            first.extend((time.perf_counter(), time.process_time()))
        original(event)

    source.ingest = ingest  # type: ignore[method-assign]
    task = asyncio.create_task(source.run())
    await asyncio.wait_for(source.subscribed.wait(), 10)
    # Popen returns at once; the loop below polls it without blocking.
    script = RAW_PUBLISHER if publisher == "raw" else AIOMQTT_PUBLISHER
    pub = subprocess.Popen([sys.executable, "-c", script, str(port), str(path)])  # noqa: ASYNC220
    while pub.poll() is None or pub.returncode == 0:
        counts = source.snapshot().tally.counts.get("exact")
        if counts is not None and counts.candidate_pairs >= pairs:
            break
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - first[0]
    cpu = time.process_time() - first[1]  # this process only: the source is the thing measured
    if pub.wait() != 0:
        raise SystemExit("the publisher failed")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return {
        "events": 2 * pairs,
        "seconds": round(elapsed, 3),
        "events_per_s": round(2 * pairs / elapsed),
        "pairs_per_s": round(pairs / elapsed),
        "source_cpu_share": round(cpu / elapsed, 2),  # 1.0: the source used all of its one core
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--publisher", choices=("raw", "aiomqtt"), default="raw")
    parser.add_argument("--out", default=str(ROOT / "bench/results/tap_events.json"))
    parser.add_argument(
        "--broker-inflight",
        type=int,
        default=20,
        help="Mosquitto's max_inflight_messages (QoS 1 messages sent to the source before its acks)",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    port = free_port()
    (tmp / "m.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
        f"max_inflight_messages {args.broker_inflight}\n"
    )
    broker = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(tmp / "m.conf")], stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        events_file(tmp / "events.txt", args.pairs)
        result = {
            "comparators": LEXICAL,
            "publisher": args.publisher,
            "broker_inflight": args.broker_inflight,
            **asyncio.run(measure(port, tmp / "events.txt", args.pairs, args.publisher)),
        }
        print(result)
        out = Path(args.out)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        broker.terminate()
        broker.wait(timeout=10)


if __name__ == "__main__":
    main()
