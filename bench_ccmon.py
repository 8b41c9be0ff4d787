#!/usr/bin/env python3
"""ccmon's benchmark: ingestion, queries at 1M and 10M requests, startup, memory and size, in one run.

    .venv/bin/python bench_ccmon.py [--quick] [--rows 1000000,10000000] [--output results.json]

Prints a table whose format stays stable so runs can be compared; BENCHMARKS.md records one.
Uses the standard library and the test requirements only. Needs about 4 GB of free disk at 10M rows.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import bisect
import decimal
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # the client processes fork while gRPC is in use
import grpc  # noqa: E402
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2

import ccmon
import ccmon_pb2

ROOT = Path(__file__).resolve().parent
EXPORT_METHOD = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
MODELS = [("claude-sonnet-4-5-20250929", 0.6), ("claude-haiku-4-5-20251001", 0.3), ("claude-opus-4-1-20250805", 0.1)]
YEAR_MS = 365 * 86400_000
HOUR_MS = 3600_000


# ---------------------------------------------------------------- data shaped like Claude Code's

def claude_attributes(seq: int, session: str, when_ms: int, rng: random.Random) -> dict:
    model = rng.choices([m for m, _ in MODELS], [w for _, w in MODELS])[0]
    return {"event.name": "api_request", "event.sequence": seq, "session.id": session,
            "event.timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when_ms / 1000))
            + f".{when_ms % 1000:03d}Z",
            "user.id": "9f2c" * 16, "user.email": "dev@example.com", "organization.id": str(uuid.UUID(int=7)),
            "user.account_uuid": str(uuid.UUID(int=8)), "terminal.type": "tmux", "prompt.id": str(uuid.uuid4()),
            "request_id": "req_011CV" + uuid.uuid4().hex[:20], "model": model,
            "input_tokens": rng.randint(1, 5000), "output_tokens": str(rng.randint(1, 2000)),
            "cache_read_tokens": rng.randint(0, 90_000), "cache_creation_tokens": rng.randint(0, 6000),
            "cost_usd": round(rng.uniform(0.0005, 0.4), 6), "duration_ms": rng.randint(300, 40_000),
            "ttft_ms": rng.randint(100, 3000), "query_source": "repl_main_thread", "speed": "normal",
            "effort": "high"}


def any_value(value) -> common_pb2.AnyValue:
    if isinstance(value, int):
        return common_pb2.AnyValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AnyValue(double_value=value)
    return common_pb2.AnyValue(string_value=value)


def export_bytes(records: list[tuple[str, int, int]], rng: random.Random) -> tuple[bytes, int]:
    """One serialized ExportLogsServiceRequest of api_request records, one per (session, sequence, time); and
    the sum of their cost_usd in nano-USD, for checking what was stored."""
    messages, cost_nanos = [], 0
    for session, seq, when_ms in records:
        attrs = claude_attributes(seq, session, when_ms, rng)
        cost_nanos += int(decimal.Decimal(repr(attrs["cost_usd"])) * 10 ** 9)
        messages.append(logs_pb2.LogRecord(
            body=common_pb2.AnyValue(string_value="claude_code.api_request"),
            attributes=[common_pb2.KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]))
    resource = [common_pb2.KeyValue(key=k, value=any_value(v)) for k, v in
                {"service.name": "claude-code", "service.version": "2.0.14", "os.type": "linux",
                 "host.arch": "amd64"}.items()]
    request = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        resource={"attributes": resource}, scope_logs=[logs_pb2.ScopeLogs(log_records=messages)])])
    return request.SerializeToString(), cost_nanos


def client_stream(client: int, count: int, now_ms: int, rng: random.Random, seed: int) -> Iterator[tuple]:
    """What one exporter sends, as Claude Code sends it: sessions of 20-200 requests one after another, each
    numbering its events (other events come between its api_requests) in time order over the last hour."""
    session, left, seq = "", 0, 0
    for i in range(count):
        if not left:
            session, left, seq = f"bench-{seed}-{client}-{i}", rng.randint(20, 200), 0
        left, seq = left - 1, seq + rng.randint(1, 3)
        yield session, seq, now_ms - HOUR_MS + i * HOUR_MS // count


BACKFILL_SPAN_MS = 30 * 24 * HOUR_MS


def backfill_stream(client: int, count: int, now_ms: int, rng: random.Random, seed: int) -> Iterator[tuple]:
    """The same requests as a backfill sends them (an import, several machines catching up): each export's records
    anywhere in the last 30 days, in random order."""
    records = list(client_stream(client, count, now_ms, rng, seed))
    rng.shuffle(records)
    for session, seq, _ in records:
        yield session, seq, now_ms - rng.randrange(BACKFILL_SPAN_MS)


def make_payloads(clients: int, exports_per_client: int, batch: int, seed: int,
                  stream=client_stream) -> tuple[list[list[bytes]], int]:
    """Each client's exports of `batch` records (from `stream`), and the cost of them all in nano-USD."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    payloads, cost_nanos = [], 0
    for client in range(clients):
        stream_ = list(stream(client, exports_per_client * batch, now, rng, seed))
        exports = [export_bytes(stream_[i:i + batch], rng) for i in range(0, len(stream_), batch)]
        payloads.append([data for data, _ in exports])
        cost_nanos += sum(cost for _, cost in exports)
    return payloads, cost_nanos


# ---------------------------------------------------------------- processes

class Server:
    """`ccmon --server` (or the do-nothing receiver) as a subprocess on an ephemeral port; used as a context
    manager, so that an error on the way never leaves one running."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.port = self.http_port = 0
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line)
                match = re.search(r"(?: ready: gRPC|receiver listening on) \S+:(\d+)(?:, HTTP \S+:(\d+))?", line)
                if match:
                    self.port, self.http_port = int(match.group(1)), int(match.group(2) or 0)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(600) or not self.port:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended a minute later (and that is an error); twice is harmless."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def ccmon_server(db: Path, *extra: str, http: bool = False) -> Server:
    return Server([sys.executable, str(ROOT / "ccmon.py"), "--server", "--server-address", "127.0.0.1:0",
                   "--server-http-address", "127.0.0.1:0" if http else "off", "--database-path", str(db), *extra],
                  env={"PYTHONUNBUFFERED": "1"})


RECEIVER = r"""
import sys, threading, grpc
from concurrent import futures
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
def read_attributes(request):  # every attribute of every record, as any Python receiver must at least
    for resource_logs in request.resource_logs:
        for kv in resource_logs.resource.attributes:
            getattr(kv.value, kv.value.WhichOneof("value"))
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                record.time_unix_nano, record.body.string_value
                for kv in record.attributes:
                    value = kv.value
                    getattr(value, value.WhichOneof("value"))
class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request, context):
        if READ:
            read_attributes(request)
        return logs_service_pb2.ExportLogsServiceResponse()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                     options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"receiver listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
server.wait_for_termination()
"""
NULL_RECEIVER = "READ = False" + RECEIVER  # grpcio parses each request; Python touches nothing
READING_RECEIVER = "READ = True" + RECEIVER  # and reads every attribute of every record in Python, storing nothing


def proc_status_kib(pid: int, field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1))


# ---------------------------------------------------------------- 1. ingestion

def client_worker(target: str, payloads: list[bytes], results, barrier) -> None:
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    export = channel.unary_unary(EXPORT_METHOD, request_serializer=None,
                                 response_deserializer=logs_service_pb2.ExportLogsServiceResponse.FromString)
    latencies = []
    barrier.wait()
    for payload in payloads:
        started = time.perf_counter()
        response = export(payload, timeout=60)
        latencies.append(time.perf_counter() - started)
        if response.partial_success.rejected_log_records:
            raise RuntimeError(response.partial_success.error_message)
    results.put(latencies)


def drive(target: str, payloads: list[list[bytes]], counted: Callable[[], None] = lambda: None
          ) -> tuple[float, list[float]]:
    """Send every payload from one process per client; returns records/s and Export latencies. The clock stops once
    `counted` returns after the last answer: ccmon's is a query that checks every record is counted (a server may
    acknowledge records before it has applied them to its rollups)."""
    context = multiprocessing.get_context("fork")
    results, barrier = context.Queue(), context.Barrier(len(payloads) + 1)
    workers = [context.Process(target=client_worker, args=(target, p, results, barrier)) for p in payloads]
    finished = False
    try:
        for worker in workers:
            worker.start()
        barrier.wait()
        started = time.perf_counter()
        latencies = [lat for _ in workers for lat in results.get(timeout=900)]
        counted()
        elapsed = time.perf_counter() - started
        finished = True
    finally:
        for worker in workers:
            if worker.pid is not None:  # started
                if not finished:
                    worker.terminate()
                worker.join()
    records = sum(len(p) for p in payloads) * BATCH
    return records / elapsed, latencies


BATCH = 512


def bench_ingestion(workdir: Path, records: int, clients: int) -> dict:
    """ccmon's ingestion rate against two ceilings measured in the same run with the same exports: grpcio alone,
    and grpcio plus reading every attribute in Python. Checks that every record was stored once, with its cost,
    and that every rollup equals the raw rows."""
    exports = max(1, records // (BATCH * clients))
    print(f"  building {clients} x {exports} exports of {BATCH} records ...", flush=True)
    payloads, cost_nanos = make_payloads(clients, exports, BATCH, seed=1)
    sent = sum(len(p) for p in payloads) * BATCH
    ceilings = {}
    for label, script in (("null", NULL_RECEIVER), ("reading", READING_RECEIVER)):
        with Server([sys.executable, "-c", script]) as receiver:
            ceilings[label], _ = drive(receiver.target, payloads)
    db = workdir / "ingest.db"
    with ccmon_server(db) as server:
        with MemorySampler(server.proc.pid) as memory:
            rate, latencies = drive(server.target, payloads, lambda: check_stats(server, None, sent, cost_nanos))
    check_rollups(db)
    db.unlink()
    print("  the same number of records, shaped as a backfill ...", flush=True)
    backfill, backfill_nanos = make_payloads(clients, exports, BATCH, seed=2, stream=backfill_stream)
    with Server([sys.executable, "-c", READING_RECEIVER]) as receiver:
        backfill_ceiling, _ = drive(receiver.target, backfill)
    with ccmon_server(db) as server:
        with MemorySampler(server.proc.pid) as backfill_memory:
            backfill_rate, _ = drive(server.target, backfill, lambda: check_stats(server, None, sent, backfill_nanos))
    check_rollups(db)
    return {"records": sent, "clients": clients, "null_per_s": ceilings["null"], "reading_per_s": ceilings["reading"],
            "ccmon_per_s": rate, "ratio_null": rate / ceilings["null"], "ratio_reading": rate / ceilings["reading"],
            "export_p50_ms": percentile(latencies, 50) * 1000, "export_p95_ms": percentile(latencies, 95) * 1000,
            "server_peak_mb": max(memory.peak_mb, backfill_memory.peak_mb), "backfill_per_s": backfill_rate,
            "backfill_ratio_reading": backfill_rate / backfill_ceiling}


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids += process_tree(int(child))
    return pids


def memory_mb(pid: int) -> float:
    """What a process and its children hold in memory: their proportional set size (a page shared by n of them
    counts 1/n to each), so pages a forked child shares with its parent are counted once."""
    total_kib = 0
    for each in process_tree(pid):
        try:
            total_kib += int(re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{each}/smaps_rollup").read_text(),
                                       re.M).group(1))
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited in between
    return total_kib / 1024


class MemorySampler:
    """The highest memory_mb of a process tree, sampled every 50 ms while the block runs."""

    def __init__(self, pid: int):
        self.pid, self.peak_mb, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, memory_mb(self.pid))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class WrongAnswer(RuntimeError):
    """A timed query answered wrongly: its time is not reported."""


def expect(label: str, got, wanted) -> None:
    if got != wanted:
        raise WrongAnswer(f"{label}: answered {got!r}, the stored rows say {wanted!r}")


def raw_totals(db: Path, start_ms: int | None, end_ms: int) -> tuple[int, int]:
    """(requests, cost in nano-USD) over [start, end) counted from the raw rows, the benchmark's oracle."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*), COALESCE(SUM(cost_nanos), 0) FROM requests WHERE ts >= ? AND ts < ?",
                            (-1 if start_ms is None else start_ms, end_ms)).fetchone()
    finally:
        conn.close()


def series_oracle(db: Path, zone, start_ms: int, end_ms: int) -> list[tuple[int, int, int]]:
    """(local day's start, requests, cost in nano-USD) of each day of [start, end) with requests, oldest first,
    counted from the raw rows by the days GetUsage answers with."""
    days = sorted(lo for _, lo, _ in ccmon.day_bounds(zone, end_ms - 1, 367))
    found: dict[int, list[int]] = {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for ts, cost in conn.execute("SELECT ts, cost_nanos FROM requests WHERE ts >= ? AND ts < ?", (start_ms, end_ms)):
            figures = found.setdefault(days[bisect.bisect_right(days, ts) - 1], [0, 0])
            figures[0] += 1
            figures[1] += cost
    finally:
        conn.close()
    return [(day, *figures) for day, figures in sorted(found.items())]


def check_stats(server: Server, start_ms: int | None, requests: int, cost_nanos: int) -> None:
    client = ccmon.Client(server.target, timeout_s=60)
    total = client.stats(start_ms, int(time.time() * 1000) + HOUR_MS).total
    client.close()
    expect("GetStats", (total.requests, total.cost_nanos), (requests, cost_nanos))


def check_rollups(db: Path) -> None:
    """Every rollup level the server keeps adds up to the raw rows."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        raw = conn.execute("SELECT COUNT(*), SUM(origin != 1), SUM(cost_nanos), SUM(input_tokens) FROM requests")
        wanted = raw.fetchone()
        for table in ("usage_rollup", "usage_daily", "session_usage"):
            got = conn.execute(f"SELECT SUM(rows), SUM(requests), SUM(cost_nanos), SUM(input_tokens) FROM {table}")
            expect(table, got.fetchone(), wanted)
    finally:
        conn.close()


# ---------------------------------------------------------------- 2. queries on a seeded database

SESSION_REQUESTS = 100  # requests per session in a seeded database


def seed(db: Path, rows: int, end_ms: int, span_ms: int = YEAR_MS) -> float:
    """Fill a fresh ccmon database with `rows` requests over `span_ms` before `end_ms`, in sessions of
    SESSION_REQUESTS requests, five users taking turns, in the real schema, without the gRPC path; then build
    every rollup level from the raw rows, and check them."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    ccmon.Writer(db).close()  # creates the schema
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")  # seeding only; the server itself always runs FULL
    rng = random.Random(2)
    models = [conn.execute("INSERT INTO models (name) VALUES (?) RETURNING id", (m,)).fetchone()[0] for m, _ in MODELS]
    weights = [w for _, w in MODELS]
    sessions = range(1, -(-rows // SESSION_REQUESTS) + 1)  # one after another, as Claude Code's sessions come
    conn.executemany("INSERT INTO sessions (id, session_id) VALUES (?, ?)",
                     [(session, str(uuid.UUID(int=rng.getrandbits(128)))) for session in sessions])
    users = [conn.execute("INSERT INTO users (name) VALUES (?) RETURNING id", (f"dev{i}@example.com",)).fetchone()[0]
             for i in range(5)]
    source = conn.execute("INSERT INTO attribute_sets (attributes) VALUES (?) RETURNING id",
                          (json.dumps({"service.name": "claude-code", "user.id": "9f2c" * 16}),)).fetchone()[0]
    extra = conn.execute("INSERT INTO attribute_sets (attributes) VALUES (?) RETURNING id",
                         ('{"effort":"high","query_source":"repl_main_thread","speed":"normal"}',)).fetchone()[0]
    columns = ", ".join(ccmon.REQUEST_COLUMNS)
    sql = f"INSERT INTO requests ({columns}) VALUES ({', '.join('?' * len(ccmon.REQUEST_COLUMNS))})"
    step = span_ms / rows
    started = time.perf_counter()
    chunk = 100_000
    for first in range(0, rows, chunk):
        batch = []
        for i in range(first, min(rows, first + chunk)):
            ts = end_ms - span_ms + int(i * step)
            session = sessions[i // SESSION_REQUESTS]
            batch.append((ts, session, i, rng.choices(models, weights)[0], users[session % len(users)],
                          rng.randint(1, 5000), rng.randint(1, 2000), rng.randint(0, 90_000), rng.randint(0, 6000),
                          rng.randint(500_000, 400_000_000), rng.randint(300, 40_000), rng.randint(100, 3000),
                          str(uuid.UUID(int=rng.getrandbits(128))), "req_011CV" + f"{rng.getrandbits(80):020x}",
                          source, extra, 0, 1))  # origin 0 (an api_request event), agent 1 (claude-code)
        conn.execute("BEGIN")
        conn.executemany(sql, batch)
        conn.execute("COMMIT")
    conn.execute("BEGIN")
    ccmon.rebuild_rollups(conn)  # every rollup level the server keeps, as its writer keeps them
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    check_rollups(db)
    return time.perf_counter() - started


def write_transcripts(folder: Path, entries: int, end_ms: int, seed_: int = 7) -> tuple[int, int]:
    """A heavy user's year of Claude Code transcripts: sessions of 20-200 API answers, each answer written as one
    to three assistant lines (streaming), with user, attachment and system lines around them, as Claude Code 2.1
    writes them. Returns (files, lines)."""
    rng = random.Random(seed_)
    start = end_ms - YEAR_MS
    written = files = lines = 0
    while written < entries:
        session = str(uuid.UUID(int=rng.getrandbits(128)))
        project = f"/home/dev/project-{rng.randint(1, 12)}"
        path = folder / project.replace("/", "-") / f"{session}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        when = start + int((end_ms - start - 6 * HOUR_MS) * written / entries)
        out = []
        for _ in range(min(rng.randint(20, 200), entries - written)):
            when += rng.randint(2_000, 90_000)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when / 1000)) + f".{when % 1000:03d}Z"
            base = {"sessionId": session, "cwd": project, "version": "2.1.328", "gitBranch": "main",
                    "timestamp": stamp, "uuid": str(uuid.UUID(int=rng.getrandbits(128)))}
            out.append(json.dumps({"parentUuid": None, "isSidechain": False, "type": "user", **base, "message": {
                "role": "user", "content": [{"type": "text", "text": "please fix the failing test " * 4}]}},
                separators=(",", ":")))
            out.append(json.dumps({"type": "attachment", **base, "attachment": {"type": "todo", "content": []}},
                                  separators=(",", ":")))
            model = rng.choices([m for m, _ in MODELS], [w for _, w in MODELS])[0]
            message_id, request_id = "msg_" + uuid.uuid4().hex[:24], "req_011CV" + uuid.uuid4().hex[:20]
            usage = {"input_tokens": rng.randint(1, 5000), "cache_creation_input_tokens": rng.randint(0, 6000),
                     "cache_read_input_tokens": rng.randint(0, 90_000), "output_tokens": rng.randint(1, 2000),
                     "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
                     "service_tier": "standard", "cache_creation": {"ephemeral_1h_input_tokens": 0,
                                                                    "ephemeral_5m_input_tokens": 0},
                     "inference_geo": "", "iterations": [], "speed": "standard"}
            for block in range(rng.choice((1, 1, 2, 3))):  # streaming: one line per content block
                out.append(json.dumps({"parentUuid": None, "isSidechain": False, "message": {
                    "id": message_id, "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": "Here is the change. " * 8}] if block == 0 else
                    [{"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:20], "name": "Bash",
                      "input": {"command": "pytest -q"}}], "stop_reason": None, "usage": usage},
                    "requestId": request_id, "type": "assistant", **base}, separators=(",", ":")))
            out.append(json.dumps({"type": "system", "subtype": "turn_duration", **base, "durationMs": 1234},
                                  separators=(",", ":")))
            written += 1
        path.write_text("\n".join(out) + "\n")
        os.utime(path, (when / 1000, when / 1000))  # last written at its last line, as Claude Code leaves it
        files += 1
        lines += len(out)
    return files, lines


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children_cpu_seconds() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_run(command: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float]:
    """Run a command to its end, checked: (its output, seconds, peak memory in MB: the largest resident set of it
    and of the children it waited for, from the kernel's accounting of exactly that process)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        output = out.read().decode()
        if process.returncode:
            raise subprocess.CalledProcessError(process.returncode, command, output, err.read().decode())
    return output, seconds, usage.ru_maxrss / 1024


CCUSAGE = "ccusage@18.0.11"  # the last release that runs without a native binary
CCUSAGE_CACHE = Path.home() / ".cache" / "ccmon-bench"


def ccusage_installed() -> Path | None:
    """ccusage, installed into CCUSAGE_CACHE the first time; None without Node.js and npm, or offline."""
    tool = CCUSAGE_CACHE / "node_modules" / "ccusage" / "dist" / "index.js"
    if not (shutil.which("node") and shutil.which("npm")):
        return None
    if not tool.exists() and subprocess.run(["npm", "install", "--prefix", str(CCUSAGE_CACHE), "--no-audit",
                                             "--no-fund", "--silent", CCUSAGE], capture_output=True).returncode:
        return None  # no registry (offline): the report says ccusage was not run
    return tool


def ccusage_daily(config_dir: Path) -> tuple[float, float, float] | None:
    """ccusage's `daily` report of the transcripts under config_dir/projects (its offline prices): (seconds, total
    cost in USD, peak memory in MB); None without Node.js and npm."""
    tool = ccusage_installed()
    if tool is None:
        return None
    output, seconds, peak_mb = measured_run(["node", str(tool), "daily", "--json", "--offline"],
                                            {**os.environ, "CLAUDE_CONFIG_DIR": str(config_dir)})
    return seconds, json.loads(output)["totals"]["totalCost"], peak_mb


def ccusage_status_line(workdir: Path, entries: int, runs: int) -> dict | None:
    """ccusage's `statusline` (its offline prices) over a generated year of `entries` answers, with Claude Code's
    input for the newest session on stdin: its first run (it reads every transcript), then warm (p50, p95 in ms).
    None without Node.js and npm."""
    tool = ccusage_installed()
    if tool is None:
        return None
    config_dir = workdir / "ccusage-status-line"
    write_transcripts(config_dir / "projects", entries, int(time.time() * 1000))
    newest = max((config_dir / "projects").glob("*/*.jsonl"), key=lambda path: path.stat().st_mtime)
    sample = json.loads((ROOT / "fixtures" / "claude-code-2.1.328" / "statusline-stdin.jsonl").read_text()
                        .splitlines()[3])
    sample.update(session_id=newest.stem, transcript_path=str(newest))
    command, env = ["node", str(tool), "statusline", "--offline"], {**os.environ, "CLAUDE_CONFIG_DIR": str(config_dir)}

    def run() -> float:
        started = time.perf_counter()
        answer = subprocess.run(command, input=json.dumps(sample), capture_output=True, text=True, env=env, check=True)
        expect("ccusage statusline", "Sonnet 4.5" in answer.stdout, True)
        return (time.perf_counter() - started) * 1000

    first = run()
    warm = [run() for _ in range(runs)]
    shutil.rmtree(config_dir)
    return {"entries": entries, "first_s": first / 1000, "warm": (percentile(warm, 50), percentile(warm, 95))}


def bench_import(workdir: Path, entries: int) -> dict:
    """`ccmon import` of a generated year of transcripts into a fresh local server, end to end, then `ccmon report
    monthly` of the year (what a user waits for), both from the pyz as users run it (unpacked by a run before),
    beside ccusage's `daily` of the same files; checks its own answer (rows stored = answers generated), then imports
    again (everything already known), and that both tools total the same cost to the cent."""
    folder = workdir / "projects"
    files, lines = write_transcripts(folder, entries, int(time.time() * 1000))
    db = workdir / "import.db"
    since = (dt.date.today() - dt.timedelta(days=370)).isoformat()
    ccmon_pyz = [str(Path(sys.base_prefix) / "bin" / "python3"), str(build_pyz(workdir))]  # a bare interpreter
    subprocess.run([*ccmon_pyz, "--help"], capture_output=True, check=True)  # unpacked before it is timed
    with ccmon_server(db) as server:
        command = [*ccmon_pyz, "import", "--monitor-server", server.target, str(folder)]
        load = os.getloadavg()[0]
        server_cpu, client_cpu = cpu_seconds(server.proc.pid), children_cpu_seconds()
        first, seconds, client_mb = measured_run(command)
        server_cpu, client_cpu = cpu_seconds(server.proc.pid) - server_cpu, children_cpu_seconds() - client_cpu
        report, report_s, _ = measured_run([*ccmon_pyz, "report", "monthly", "--since", since, "--monitor-server",
                                            server.target, "--json"])
        ccmon_cost = json.loads(report)["totals"]["cost_usd"]
        started = time.perf_counter()
        again = subprocess.run(command, capture_output=True, text=True, check=True)
        again_s = time.perf_counter() - started
    ccusage = ccusage_daily(workdir)
    if ccusage is not None and abs(ccusage[1] - ccmon_cost) >= 0.01:
        raise RuntimeError(f"ccmon's total ${ccmon_cost:.6f} is not ccusage's ${ccusage[1]:.6f}")
    stored = sqlite3.connect(db).execute("SELECT COUNT(*), SUM(origin = 2) FROM requests").fetchone()
    if stored != (entries, entries) or f"{entries:,} requests imported" not in first or \
            f"{entries:,} already known" not in again.stdout:
        raise RuntimeError(f"import stored {stored} of {entries}: {first} {again.stdout}")
    db.unlink()
    shutil.rmtree(folder)
    return {"entries": entries, "files": files, "lines": lines, "seconds": seconds, "load": load,
            "client_cpu_s": client_cpu, "server_cpu_s": server_cpu,
            "entries_per_s": entries / seconds, "lines_per_s": lines / seconds, "again_s": again_s,
            "report_s": report_s, "cost_usd": ccmon_cost, "client_mb": client_mb,
            "ccusage_s": ccusage[0] if ccusage else None, "ccusage_cost_usd": ccusage[1] if ccusage else None,
            "ccusage_mb": ccusage[2] if ccusage else None}


def timed(call, check, runs: int) -> list[float]:
    """`runs` times of call(), each answer checked by check(answer) (which raises WrongAnswer)."""
    check(call())  # warm: connections, caches
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        answer = call()
        samples.append(time.perf_counter() - started)
        check(answer)
    return samples


def percentile(samples: list[float], p: int) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


MONITOR_SETTINGS = dict(zone=ccmon.ZoneInfo("Europe/Berlin"), block_mode=5, limit=35_000, refresh_s=5)


def stats_call(client: ccmon.Client, start_ms: int | None, end_ms: int):
    return lambda: client.stats(start_ms, end_ms).total


def refresh_call(client: ccmon.Client, target: str, tab: str):
    """One full refresh of the monitor's `tab`, as its polling thread does it."""
    settings = ccmon.MonitorSettings(target, **MONITOR_SETTINGS)
    state = ccmon.ViewState(tab=tab, period="d")
    return lambda: ccmon.fetch_snapshot(client, ccmon.query_for(state, settings, int(time.time() * 1000)))


def snapshot_totals(snapshot) -> tuple[int, int]:
    """A refresh's answer as (requests, cost) over its period: the per-user figures every tab shows."""
    return (sum(user.split.total.requests for user in snapshot.users),
            sum(user.split.total.cost_nanos for user in snapshot.users))


FIRST_ASK = ", first ask (each of 25 UTC offsets once: nothing kept)"  # informative: a chart asks again


def bench_queries(server: Server, db: Path, runs: int) -> dict:
    client = ccmon.Client(server.target, timeout_s=60)
    stub = client._stub
    now = int(time.time() * 1000)
    results = {}
    for label, span in (("GetStats 1h", HOUR_MS), ("GetStats 24h", 24 * HOUR_MS), ("GetStats 30d", 30 * 24 * HOUR_MS),
                        ("GetStats all", None)):
        start = None if span is None else now - span
        wanted = raw_totals(db, start, now)
        results[label] = timed(stats_call(client, start, now),
                               lambda total, label=label, wanted=wanted: expect(
                                   label, (total.requests, total.cost_nanos), wanted), runs)
    zone = ccmon.ZoneInfo("Europe/Berlin")
    days = ccmon.day_bounds(zone, now, 30)
    wanted_days = [(date, raw_totals(db, lo, min(hi, now + HOUR_MS))) for date, lo, hi in days]

    def check_days(response) -> None:
        expect("GetUsage 30 days", [(d.date, (ccmon.split_from_stats(d.stats).total.requests,
                                              ccmon.split_from_stats(d.stats).total.cost_nanos))
                                    for d in response.days], wanted_days)
    results["GetUsage 30 days"] = timed(lambda: stub.GetUsage(ccmon_pb2.GetUsageRequest(timezone="Europe/Berlin"),
                                                              timeout=60), check_days, runs)
    year_start, wanted_series = now - 365 * 24 * HOUR_MS, series_oracle(db, zone, now - 365 * 24 * HOUR_MS, now)
    results["GetSeries a year of days"] = timed(lambda: client.series(year_start, now, "day", "Europe/Berlin"),
                                                lambda series: expect("GetSeries a year of days", [
                                                    (p.start_ms, p.split.total.requests, p.split.total.cost_nanos)
                                                    for p in series.points], wanted_series), runs)
    # The same in zones of 25 UTC offsets, each asked once: buckets the server has never read (BucketCache).
    cold, offsets = [], [f"Etc/GMT{offset:+d}" if offset else "UTC" for offset in range(-12, 13)]
    for name in offsets:
        started = time.perf_counter()
        answer = client.series(year_start, now, "day", name)
        cold.append(time.perf_counter() - started)
        expect(f"GetSeries a year of days in {name}", [(p.start_ms, p.split.total.requests, p.split.total.cost_nanos)
                                                       for p in answer.points],
               series_oracle(db, ccmon.ZoneInfo(name), year_start, now))
    results["GetSeries a year of days" + FIRST_ASK] = cold
    newest = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute(
        "SELECT ts FROM requests WHERE ts >= ? ORDER BY ts DESC LIMIT 100", (now - 30 * 24 * HOUR_MS,)).fetchall()
    results["GetAPIRequests 100"] = timed(lambda: stub.GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(
        start_time=ccmon.timestamp_from_ms(now - 30 * 24 * HOUR_MS), limit=100, oldest_first=False), timeout=60),
        lambda response: expect("GetAPIRequests 100", [ccmon.ms_of(r.timestamp) for r in response.requests],
                                [ts for ts, in newest]), runs)
    for tab in ("current", "daily"):
        results[f"monitor refresh ({tab})"] = timed(  # checked over the period each refresh showed
            refresh_call(client, server.target, tab), lambda snapshot, tab=tab: expect(
                f"refresh ({tab})", snapshot_totals(snapshot),
                raw_totals(db, snapshot.query.start_ms, snapshot.query.end_ms)), runs)
    client.close()
    return {label: (percentile(s, 50) * 1000, percentile(s, 95) * 1000) for label, s in results.items()}


def sample_queries(target: str, lowest: int, highest: int, stop, results, ready) -> None:
    """GetStats all and full monitor refreshes, one after another, until `stop` is set; each answer must lie between
    `lowest` and `highest` requests. Runs in a process of its own, started fresh: a process that forks (as drive()
    does) while its gRPC channel is busy leaves that channel's events to its children."""
    client = ccmon.Client(target, timeout_s=60)
    calls = {"GetStats all": stats_call(client, None, int(time.time() * 1000) + HOUR_MS),
             "monitor refresh (current)": refresh_call(client, target, "current")}
    samples: dict[str, list[float]] = {label: [] for label in calls}
    ready.set()
    while not stop.is_set():
        for label, call in calls.items():
            started = time.perf_counter()
            answer = call()
            samples[label].append(time.perf_counter() - started)
            requests = answer.requests if label.startswith("GetStats") else answer.server_requests
            if not lowest <= requests <= highest:
                results.put(f"{label} while ingesting: {requests} requests, not between {lowest} and {highest}")
                return
        time.sleep(0.05)  # pacing: the sampler leaves the server time for the exports it measures under
    client.close()
    results.put(samples)


def bench_busy(server: Server, db: Path, records: int, clients: int) -> dict:
    """GetStats and full monitor refreshes while `clients` send `records` at full speed into a server holding the
    seeded rows; each answer is checked to lie between what was stored before and after, and the final totals
    exactly."""
    before = raw_totals(db, None, int(time.time() * 1000) + HOUR_MS)
    exports = max(1, records // (BATCH * clients))
    payloads, cost_nanos = make_payloads(clients, exports, BATCH, seed=5)
    sent = sum(len(p) for p in payloads) * BATCH
    spawn = multiprocessing.get_context("spawn")
    stop, results, ready = spawn.Event(), spawn.Queue(), spawn.Event()
    sampler = spawn.Process(target=sample_queries, args=(server.target, before[0], before[0] + sent, stop, results,
                                                         ready))
    with MemorySampler(server.proc.pid) as memory:
        sampler.start()
        try:
            if not ready.wait(120):  # its interpreter started and its client is connected
                raise RuntimeError("the query sampler did not start within 120 s")
            rate, _ = drive(server.target, payloads)
        finally:
            stop.set()
            try:
                samples = results.get(timeout=120)
            finally:
                sampler.join(10)
                sampler.terminate()  # only one that never answered is still running
                sampler.join()
    if isinstance(samples, str):
        raise WrongAnswer(samples)
    check_stats(server, None, before[0] + sent, before[1] + cost_nanos)
    return {"records": sent, "rate": rate, "peak_mb": memory.peak_mb, "samples": len(samples["GetStats all"]),
            **{label: (percentile(s, 50) * 1000, percentile(s, 95) * 1000) for label, s in samples.items()}}


def bench_retention_stall(workdir: Path, rows: int) -> dict:
    """Ingest steadily while the start-up sweep deletes `rows` old rows; report the worst Export latency."""
    db = workdir / "retention.db"
    now = int(time.time() * 1000)
    seed(db, rows, end_ms=now - 40 * 86400_000, span_ms=30 * 86400_000)
    payloads = make_payloads(1, 400, 64, seed=3)[0][0]
    with ccmon_server(db, "--server-retention", "30d") as server:
        channel = grpc.insecure_channel(server.target)
        export = channel.unary_unary(EXPORT_METHOD, request_serializer=None,
                                     response_deserializer=logs_service_pb2.ExportLogsServiceResponse.FromString)
        worst, sent = 0.0, 0
        started = time.perf_counter()
        for payload in payloads:
            begun = time.perf_counter()
            export(payload, timeout=60)
            worst = max(worst, time.perf_counter() - begun)
            sent += 1
            if any("retention: deleted" in line for line in server.lines) and sent > 50:
                break
        sweep_seconds = time.perf_counter() - started
    deleted = next((line for line in server.lines if "retention: deleted" in line), "")
    return {"old_rows": rows, "worst_export_ms": worst * 1000, "sweep_s": sweep_seconds,
            "deleted": int(re.search(r"deleted (\d+)", deleted).group(1)) if deleted else 0}


# ---------------------------------------------------------------- 3, 4, 5: startup, memory, size

def bench_startup(workdir: Path, server: Server) -> dict:
    pyz = build_pyz(workdir)
    cache = workdir / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    bare = [sys.executable, "-I", "-S", str(pyz)]

    def run(*args: str) -> float:
        started = time.perf_counter()
        subprocess.run(bare + list(args), check=True, capture_output=True, env=env)
        return time.perf_counter() - started

    shutil.rmtree(cache, ignore_errors=True)
    cold = run("--version")
    warm = statistics.median(run("--version") for _ in range(5))
    shutil.rmtree(cache, ignore_errors=True)
    cold_format = run("--monitor-server", server.target, "--format", "@daily_cost")
    warm_format = statistics.median(run("--monitor-server", server.target, "--format", "@daily_cost")
                                    for _ in range(5))
    return {"pyz_mb": pyz.stat().st_size / 1e6, "version_cold_s": cold, "version_warm_s": warm,
            "format_cold_s": cold_format, "format_warm_s": warm_format}


FIRST_SCREEN_SIZE = (40, 120)  # rows, columns
FIRST_RUN_ENTRIES = 100_000  # a year of a heavy user's answers


def bench_first_screen(workdir: Path, entries: int) -> dict:
    """A first run: `ccmon` from the pyz with a year of transcripts in ~/.claude/projects and nothing else (no
    ~/.ccmon, no settings), in a 120x40 pseudo-terminal. Times the first full screen (the Current tab's figures with
    the newest request on top, while the local server reads the rest) and the screen with everything read (the
    header no longer says it reads the history; the requests counted are every answer); checks both against the rows
    the server stored."""
    import fcntl, pty, select, struct, termios
    import pyte
    home = workdir / "first-run"
    files, lines = write_transcripts(home / ".claude" / "projects", entries, int(time.time() * 1000))
    pyz = build_pyz(workdir)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "CCMON", "OTEL_"))},
           "HOME": str(home), "TERM": "xterm-256color", "TZ": "UTC", "LANG": "C.UTF-8"}
    screen = pyte.Screen(FIRST_SCREEN_SIZE[1], FIRST_SCREEN_SIZE[0])
    stream = pyte.ByteStream(screen)
    started = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:
        try:  # the size set before curses starts
            fcntl.ioctl(sys.stdout.fileno(), termios.TIOCSWINSZ, struct.pack("HHHH", *FIRST_SCREEN_SIZE, 0, 0))
            os.execve(sys.executable, [sys.executable, str(pyz)], env)
        finally:
            os._exit(127)  # never back into the benchmark
    first = whole = None
    frames = {}
    try:
        while whole is None and time.perf_counter() - started < 120:
            if select.select([fd], [], [], 0.5)[0]:
                stream.feed(os.read(fd, 1 << 16))
            text = "\n".join(screen.display)
            table = text.split("Time        Model", 1)[1].splitlines() if "Time        Model" in text else []
            if first is None and len(table) > 1 and table[1].strip():
                first, frames["first"] = time.perf_counter() - started, text
            if "reading history" not in text and f"of {entries} " in text:
                whole, frames["whole"] = time.perf_counter() - started, text
        os.write(fd, b"q")
    finally:
        deadline, ended = time.monotonic() + 10, False
        while not ended and time.monotonic() < deadline:  # until the monitor has quit, or 10 s
            with contextlib.suppress(OSError):  # its terminal closed
                if select.select([fd], [], [], 0.5)[0]:
                    os.read(fd, 1 << 16)
            ended = os.waitpid(pid, os.WNOHANG) != (0, 0)
        if not ended:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
        subprocess.run([sys.executable, str(pyz), "server", "stop"], env=env, capture_output=True, check=True)
    db = home / ".ccmon" / "ccmon.db"
    stored, newest = sqlite3.connect(db).execute("SELECT COUNT(*), MAX(ts) FROM requests").fetchone()
    top = time.strftime("%m-%d %H:%M", time.gmtime(newest / 1000))
    if first is None or whole is None or stored != entries or top not in frames["first"].split("Time        Model")[1]\
            .splitlines()[1]:
        raise WrongAnswer(f"first run: {stored} of {entries} stored, newest {top}, frames {frames}")
    shutil.rmtree(home)
    return {"entries": entries, "files": files, "first_s": first, "whole_s": whole,
            "first_frame_requests": re.search(r"Requests \S+ of (\d+)", frames["first"]).group(1)}


def build_pyz(workdir: Path) -> Path:
    pyz = workdir / "ccmon.pyz"
    if not pyz.exists():
        subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output", str(pyz)], check=True,
                       capture_output=True)
    return pyz


STATUS_LINE_ROWS = 100_000  # a year of a heavy user's requests
CCUSAGE_STATUS_LINE_ENTRIES = 20_000  # ccusage reads every transcript at its first run: a year's, kept short


def bench_status_line(workdir: Path, runs: int) -> dict:
    """`ccmon statusline` from the pyz as `ccmon setup` writes it into Claude Code's settings (the interpreter, the
    pyz, statusline), with a real Claude Code input on stdin, against a local server holding a year of requests:
    the quick route (warm), the full run (its route dropped before each run), and `--format` on its quick route. Every line is
    checked against the stored rows; the interpreter's own start is measured beside them."""
    pyz, python = build_pyz(workdir), str(Path(sys.base_prefix) / "bin" / "python3")  # not the venv's: bare
    db, now = workdir / "statusline.db", int(time.time() * 1000)
    seed(db, STATUS_LINE_ROWS, end_ms=now)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    session, session_nanos = conn.execute(
        "SELECT s.session_id, SUM(r.cost_nanos) FROM requests r JOIN sessions s ON s.id = r.session "
        "GROUP BY r.session ORDER BY MAX(r.ts) DESC LIMIT 1").fetchone()
    conn.close()
    sample = json.loads((ROOT / "fixtures" / "claude-code-2.1.328" / "statusline-stdin.jsonl").read_text()
                        .splitlines()[3])
    now_s = int(time.time())
    sample.pop("cost")  # the session's cost from the server, not from Claude Code's own figure
    sample.update(session_id=session, rate_limits={"five_hour": {"used_percentage": 42, "resets_at": now_s + 3600},
                                                   "seven_day": {"used_percentage": 20.5, "resets_at": now_s + 86400}})
    stdin = json.dumps(sample).encode()
    env = {**os.environ, "HOME": str(workdir), "XDG_CACHE_HOME": str(workdir / "cache")}
    cache = workdir / "cache" / "ccmon"  # a build's quick routes are in its folder there (root/BUILD_ID)

    def routes() -> list[Path]:
        return list(cache.glob("*/quick-routes.json"))
    with ccmon_server(db, http=True) as server:
        command = [python, str(pyz), "statusline", "--monitor-server", server.target]
        expected = f"Sonnet 4.5 | ctx 3% | session {ccmon.format_cost(session_nanos)} | today "

        def timed_line(args: list[str], drop_route: bool) -> tuple[float, str]:
            if drop_route:
                for route in routes():
                    route.unlink()
            started = time.perf_counter()
            done = subprocess.run(args, input=stdin, capture_output=True, env=env, check=True)
            return (time.perf_counter() - started) * 1000, done.stdout.decode()

        def sampled(args: list[str], drop_route: bool = False, count: int = runs) -> tuple[float, float, str]:
            samples = [timed_line(args, drop_route) for _ in range(count)]
            lines = {line for _, line in samples}
            times = [ms for ms, _ in samples]
            return percentile(times, 50), percentile(times, 95), lines.pop() if len(lines) == 1 else repr(lines)

        timed_line(command, True)  # unpacks the pyz and writes the route
        full = sampled(command, drop_route=True, count=max(5, runs // 4))
        quick = sampled(command)
        expect("the status line, full run", full[2].startswith(expected), True)
        expect("the status line, quick route", quick[2], full[2])
        expect("the quick route taken", bool(routes()), True)
        floor = sampled([python, "-c", "pass"])
        format_command = [python, str(pyz), "--monitor-server", server.target, "--format", "@daily_cost"]
        timed_line(format_command, False)  # writes its route
        formatted = sampled(format_command)
        midnight = ccmon.day_bounds(ccmon.ZoneInfo("UTC"), int(time.time() * 1000), 1)[0][1]
        expect("--format @daily_cost", formatted[2], ccmon.format_cost(raw_totals(db, midnight, now + HOUR_MS)[1])
               + "\n")
    db.unlink()
    return {"rows": STATUS_LINE_ROWS, "quick": quick[:2], "full": full[:2], "format": formatted[:2],
            "interpreter": floor[:2], "python": platform.python_version(),
            "ccusage": ccusage_status_line(workdir, CCUSAGE_STATUS_LINE_ENTRIES, runs)}


def monitor_rss_mb(server: Server) -> float:
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["TERM"] = "xterm"
        os.execv(sys.executable, [sys.executable, str(ROOT / "ccmon.py"), "--monitor-server", server.target,
                                  "-b", "5am"])
    try:
        deadline = time.time() + 4
        while time.time() < deadline:
            try:
                os.read(fd, 65536)
            except OSError:
                break
        return proc_status_kib(pid, "VmRSS") / 1024
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        os.close(fd)


def database_mb_per_million(db: Path, rows: int) -> float:
    size = sum(Path(str(db) + suffix).stat().st_size for suffix in ("", "-wal") if Path(str(db) + suffix).exists())
    return size / 1e6 / (rows / 1e6)


# ---------------------------------------------------------------- report

def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024 / 1024
    return (f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, grpcio {grpc.__version__}")


def target(value: float, limit: float, higher_is_better: bool = False) -> str:
    met = value >= limit if higher_is_better else value <= limit
    return "ok" if met else "MISSED"


STEPS = ("ingestion", "queries", "retention", "import", "statusline", "firstrun")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1000000,10000000", help="stored requests for the query benchmark")
    parser.add_argument("--ingest", type=int, default=1_000_000, help="records sent in the ingestion benchmark")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--runs", type=int, default=40, help="samples per query")
    parser.add_argument("--quick", action="store_true", help="small sizes, for trying the script")
    parser.add_argument("--output", help="also write the results as JSON")
    parser.add_argument("--import-entries", type=int, default=300_000, help="API answers in the generated "
                        "transcripts of the import benchmark")
    parser.add_argument("--only", help=f"run these benchmarks only, comma-separated: {', '.join(STEPS)}")
    args = parser.parse_args()
    steps = args.only.split(",") if args.only else list(STEPS)
    if set(steps) - set(STEPS):
        parser.error(f"--only takes {', '.join(STEPS)}")
    sizes = [int(n) for n in args.rows.split(",")]
    ingest, runs, entries = args.ingest, args.runs, args.import_entries
    if args.quick:
        sizes, ingest, runs, entries = [20_000, 100_000], 40_960, 10, 20_000
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    print(f"machine: {results['machine']}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="ccmon-bench-"))
    try:
        if "ingestion" in steps:
            print(f"1. ingestion ({ingest} records, {args.clients} clients)", flush=True)
            results["ingestion"] = bench_ingestion(workdir, ingest, args.clients)
        if "queries" in steps:
            results["queries"] = {}
            for rows in sizes:
                db = workdir / f"seeded-{rows}.db"
                print(f"2. queries at {rows} requests: seeding ...", flush=True)
                seconds = seed(db, rows, end_ms=int(time.time() * 1000))
                print(f"   seeded in {seconds:.0f} s; querying", flush=True)
                with ccmon_server(db) as server:
                    results["queries"][rows] = bench_queries(server, db, runs)
                    results["db_mb_per_million"] = database_mb_per_million(db, rows)  # the largest size's, in the end
                    if rows == sizes[0]:
                        results["server_mb"] = {"rows": rows, "mb": memory_mb(server.proc.pid)}
                        print("3. startup, 4. monitor memory, 5. queries while ingesting", flush=True)
                        results["startup"] = bench_startup(workdir, server)
                        results["monitor_rss_mb"] = monitor_rss_mb(server)
                        results["busy"] = {"rows": rows, **bench_busy(server, db, ingest // 2, args.clients)}
                db.unlink()
        if "retention" in steps:
            print("6. retention sweep under ingestion", flush=True)
            results["retention"] = bench_retention_stall(workdir, min(1_000_000, max(sizes)))
        if "import" in steps:
            print(f"7. import of {entries} transcript entries", flush=True)
            results["import"] = bench_import(workdir, entries)
        if "statusline" in steps:
            print(f"8. the status line from the pyz, {runs} runs each", flush=True)
            results["statusline"] = bench_status_line(workdir, runs)
        if "firstrun" in steps:
            print(f"9. a first run of the monitor with {FIRST_RUN_ENTRIES:,} answers in the transcripts", flush=True)
            results["firstrun"] = bench_first_screen(workdir, FIRST_RUN_ENTRIES)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict) -> str:
    lines = [f"ccmon benchmark, {r['date']}", f"machine: {r['machine']}", "",
             "| measure | result | target | |", "| --- | --- | --- | --- |"]
    if "ingestion" in r:
        ing = r["ingestion"]
        lines += [f"| ingestion, do-nothing grpcio receiver | {ing['null_per_s']:,.0f} records/s | | |",
                  f"| ingestion, receiver reading every attribute in Python | {ing['reading_per_s']:,.0f} records/s "
                  f"| | |",
                  f"| ingestion, ccmon ({ing['clients']} clients x {BATCH}-record exports, {ing['records']:,} records, "
                  f"all checked) | {ing['ccmon_per_s']:,.0f} records/s | | |",
                  f"| ingestion ratio to the attribute-reading receiver | {ing['ratio_reading']:.2f} | >= 0.25 "
                  f"(aim 0.40) | {target(ing['ratio_reading'], 0.25, True)} |",
                  f"| ingestion ratio to the do-nothing receiver | {ing['ratio_null']:.2f} | | |",
                  f"| ingestion of backfill-shaped exports (each export's records anywhere in 30 days, in random "
                  f"order), ratio to the attribute-reading receiver | {ing['backfill_ratio_reading']:.2f} "
                  f"({ing['backfill_per_s']:,.0f} records/s) | >= 0.40 | {target(ing['backfill_ratio_reading'], 0.4, True)} |",
                  f"| Export latency p50 / p95 | {ing['export_p50_ms']:.0f} / {ing['export_p95_ms']:.0f} ms | | |",
                  f"| server memory during ingestion (peak, with its decoders) | {ing['server_peak_mb']:.0f} MB "
                  f"| <= 150 MB | {target(ing['server_peak_mb'], 150)} |"]
    for rows, queries in r.get("queries", {}).items():
        limit = 20 if int(rows) <= 1_000_000 else 50
        for label, (p50, p95) in queries.items():
            goal = 50 if label.startswith("monitor") else limit
            lines.append(f"| {label} @ {int(rows):,} | p50 {p50:.1f} ms, p95 {p95:.1f} ms | " + (
                "| |" if label.endswith(FIRST_ASK) else f"p50 <= {goal} ms | {target(p50, goal)} |"))
    if "busy" in r:
        busy = r["busy"]
        for label, goal in (("GetStats all", 50), ("monitor refresh (current)", 100)):
            p50, p95 = busy[label]
            lines.append(f"| {label} @ {busy['rows']:,} while ingesting {busy['rate']:,.0f} records/s "
                         f"({busy['samples']} samples) | p50 {p50:.1f} ms, p95 {p95:.1f} ms | p95 <= {goal} ms "
                         f"| {target(p95, goal)} |")
        lines.append(f"| server memory while ingesting into {busy['rows']:,} requests (peak) | {busy['peak_mb']:.0f} MB "
                     f"| <= 150 MB | {target(busy['peak_mb'], 150)} |")
    if "startup" in r:
        st = r["startup"]
        lines += [f"| ccmon.pyz --version, first run / warm | {st['version_cold_s']:.2f} s / "
                  f"{st['version_warm_s']:.2f} s | <= 3 s / <= 0.1 s | {target(st['version_cold_s'], 3)} / "
                  f"{target(st['version_warm_s'], 0.1)} |",
                  f"| ccmon.pyz --format, first run / warm | {st['format_cold_s']:.2f} s / {st['format_warm_s']:.2f} s "
                  f"| - / <= 0.3 s | {target(st['format_warm_s'], 0.3)} |",
                  f"| ccmon.pyz size | {st['pyz_mb']:.1f} MB | | |",
                  f"| server memory at {r['server_mb']['rows']:,} requests, after the queries | "
                  f"{r['server_mb']['mb']:.0f} MB | <= 100 MB | {target(r['server_mb']['mb'], 100)} |",
                  f"| monitor RSS | {r['monitor_rss_mb']:.0f} MB | | |",
                  f"| database size | {r['db_mb_per_million']:.0f} MB per million requests | <= 250 MB "
                  f"| {target(r['db_mb_per_million'], 250)} |"]
    if "retention" in r:
        lines.append(f"| retention sweep of {r['retention']['deleted']:,} rows: worst Export latency | "
                     f"{r['retention']['worst_export_ms']:.0f} ms | <= 1000 ms "
                     f"| {target(r['retention']['worst_export_ms'], 1000)} |")
    if "import" in r:
        lines.append(import_report(r["import"]))
    if "statusline" in r:
        sl = r["statusline"]

        def ms(pair: tuple[float, float]) -> str:
            return f"p50 {pair[0]:.0f} ms, p95 {pair[1]:.0f} ms"

        def fast(pair: tuple[float, float]) -> str:  # issue 27's target for the status line and --format
            return f"{ms(pair)} | p50 <= 100 ms, p95 <= 150 ms | {target(pair[0], 100)} / {target(pair[1], 150)}"

        lines += [f"| ccmon.pyz statusline, quick route, server answering ({sl['rows']:,} requests stored) | "
                  f"{fast(sl['quick'])} |",
                  f"| ccmon.pyz statusline, full run (no route yet) | {ms(sl['full'])} | | |",
                  f"| ccmon.pyz --format @daily_cost, quick route | {fast(sl['format'])} |",
                  f"| python3 -c pass (CPython {sl['python']}, the floor of both) | {ms(sl['interpreter'])} | | |"]
        peer = sl["ccusage"]
        lines.append(f"| {CCUSAGE} statusline, {peer['entries']:,} answers: first run / warm | {peer['first_s']:.1f} s "
                     f"/ {ms(peer['warm'])} | | |" if peer else
                     f"| {CCUSAGE} statusline | not run (no Node.js, npm or registry) | | |")
    if "firstrun" in r:
        fr = r["firstrun"]
        lines += [f"| first run of the monitor, {fr['entries']:,} answers in {fr['files']:,} transcripts: first full "
                  f"screen (newest request on top; {int(fr['first_frame_requests']):,} requests stored by then) | "
                  f"{fr['first_s']:.1f} s | <= 5 s | {target(fr['first_s'], 5)} |",
                  f"| first run of the monitor: every answer on the screen | {fr['whole_s']:.1f} s | | |"]
    return "\n".join(lines)


def import_report(i: dict) -> str:
    lines = [f"| ccmon.pyz import, {i['entries']:,} answers ({i['lines']:,} lines, {i['files']:,} files), first run | "
             f"{i['entries_per_s']:,.0f} entries/s ({i['seconds']:.1f} s; {i['lines_per_s']:,.0f} lines/s; again: "
             f"{i['again_s']:.1f} s; CPU: ccmon import {i['client_cpu_s']:.1f} s, server {i['server_cpu_s']:.1f} s; "
             f"load average {i['load']:.1f}) | >= 20,000/s | {target(i['entries_per_s'], 20_000, True)} |",
             f"| ccmon.pyz import, peak memory | {i['client_mb']:,.0f} MB | <= 150 MB | "
             f"{target(i['client_mb'], 150)} |"]
    ours = i["seconds"] + i["report_s"]
    if i["ccusage_s"] is None:
        return "\n".join(lines + ["| import + report monthly, against ccusage daily | ccusage not run (no Node.js, npm "
                                  "or registry) | | |"])
    ratio = i["ccusage_s"] / ours
    return "\n".join(lines + [
        f"| import + report monthly from the pyz ({ours:.2f} s), against {CCUSAGE} daily ({i['ccusage_s']:.2f} s, "
        f"{i['ccusage_mb']:,.0f} MB), same files, both ${i['cost_usd']:,.2f} | {ratio:.2f}x ccusage's speed | >= 3x | "
        f"{target(ratio, 3, True)} |"])


if __name__ == "__main__":
    sys.exit(main())
