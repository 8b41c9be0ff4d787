#!/usr/bin/env python3
"""ccmon's benchmark: ingestion, queries at 1M and 10M requests, startup, memory and size, in one run.

    .venv/bin/python bench_ccmon.py [--quick] [--rows 1000000,10000000] [--output results.json]

Prints a table whose format stays stable so runs can be compared; BENCHMARKS.md records one.
Uses the standard library and the test requirements only. Needs about 4 GB of free disk at 10M rows.
"""
from __future__ import annotations

import argparse
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

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
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


def export_bytes(first_seq: int, count: int, session: str, now_ms: int, rng: random.Random) -> bytes:
    """One serialized ExportLogsServiceRequest of `count` api_request records."""
    records = []
    for seq in range(first_seq, first_seq + count):
        attrs = claude_attributes(seq, session, now_ms - rng.randint(0, HOUR_MS), rng)
        records.append(logs_pb2.LogRecord(
            body=common_pb2.AnyValue(string_value="claude_code.api_request"),
            attributes=[common_pb2.KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]))
    resource = [common_pb2.KeyValue(key=k, value=any_value(v)) for k, v in
                {"service.name": "claude-code", "service.version": "2.0.14", "os.type": "linux",
                 "host.arch": "amd64"}.items()]
    request = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        resource={"attributes": resource}, scope_logs=[logs_pb2.ScopeLogs(log_records=records)])])
    return request.SerializeToString()


# ---------------------------------------------------------------- processes

class Server:
    """`ccmon --server` (or the do-nothing receiver) as a subprocess on an ephemeral port."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.port = 0
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line)
                match = re.search(r"(?: ready: gRPC|receiver listening on) \S+:(\d+)", line)
                if match:
                    self.port = int(match.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(600) or not self.port:
            raise RuntimeError("server did not start:\n" + "".join(self.lines))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def peak_rss_mb(self) -> float:
        return proc_status_kib(self.proc.pid, "VmHWM") / 1024

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def ccmon_server(db: Path, *extra: str) -> Server:
    return Server([sys.executable, str(ROOT / "ccmon.py"), "--server", "--server-address", "127.0.0.1:0",
                   "--server-http-address", "off", "--database-path", str(db), *extra],
                  env={"PYTHONUNBUFFERED": "1"})


NULL_RECEIVER = r"""
import sys, threading, grpc
from concurrent import futures
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request, context):
        return logs_service_pb2.ExportLogsServiceResponse()
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                     options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"receiver listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
server.wait_for_termination()
"""


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


def make_payloads(clients: int, exports_per_client: int, batch: int, seed: int) -> list[list[bytes]]:
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    return [[export_bytes((c * exports_per_client + e) * batch, batch, f"bench-{seed}-{c}", now, rng)
             for e in range(exports_per_client)] for c in range(clients)]


def drive(target: str, payloads: list[list[bytes]]) -> tuple[float, list[float]]:
    """Send every payload from one process per client; returns records/s and Export latencies."""
    context = multiprocessing.get_context("fork")
    results, barrier = context.Queue(), context.Barrier(len(payloads) + 1)
    workers = [context.Process(target=client_worker, args=(target, p, results, barrier)) for p in payloads]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    latencies = [lat for _ in workers for lat in results.get(timeout=900)]
    elapsed = time.perf_counter() - started
    for worker in workers:
        worker.join()
    records = sum(len(p) for p in payloads) * BATCH
    return records / elapsed, latencies


BATCH = 512


def bench_ingestion(workdir: Path, records: int, clients: int) -> dict:
    exports = max(1, records // (BATCH * clients))
    print(f"  building {clients} x {exports} exports of {BATCH} records ...", flush=True)
    payloads = make_payloads(clients, exports, BATCH, seed=1)
    null = Server([sys.executable, "-c", NULL_RECEIVER])
    ceiling, _ = drive(null.target, payloads)
    null.stop()
    db = workdir / "ingest.db"
    server = ccmon_server(db)
    rate, latencies = drive(server.target, payloads)
    rss = server.peak_rss_mb()
    stored = sqlite3.connect(db).execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    server.stop()
    assert stored == sum(len(p) for p in payloads) * BATCH, f"stored {stored}"
    return {"records": stored, "clients": clients, "ceiling_per_s": ceiling, "ccmon_per_s": rate,
            "ratio": rate / ceiling, "export_p50_ms": percentile(latencies, 50) * 1000,
            "export_p95_ms": percentile(latencies, 95) * 1000, "server_peak_rss_mb": rss}


# ---------------------------------------------------------------- 2. queries on a seeded database

def seed(db: Path, rows: int, end_ms: int, span_ms: int = YEAR_MS) -> float:
    """Fill a fresh ccmon database with `rows` requests over `span_ms` before `end_ms`, through the real
    schema and triggers (so rollups are maintained as in production), without the gRPC path."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    ccmon.Writer(db).close()  # creates the schema
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")  # seeding only; the server itself always runs FULL
    rng = random.Random(2)
    models = [conn.execute("INSERT INTO models (name) VALUES (?) RETURNING id", (m,)).fetchone()[0] for m, _ in MODELS]
    weights = [w for _, w in MODELS]
    sessions = [conn.execute("INSERT INTO sessions (session_id) VALUES (?) RETURNING id",
                             (str(uuid.UUID(int=rng.getrandbits(128))),)).fetchone()[0] for _ in range(5000)]
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
            session = (i // 40) % len(sessions)
            batch.append((ts, sessions[session], i, rng.choices(models, weights)[0], users[session % len(users)],
                          rng.randint(1, 5000), rng.randint(1, 2000), rng.randint(0, 90_000), rng.randint(0, 6000),
                          rng.randint(500_000, 400_000_000), rng.randint(300, 40_000), rng.randint(100, 3000),
                          str(uuid.UUID(int=rng.getrandbits(128))), "req_011CV" + f"{rng.getrandbits(80):020x}",
                          source, extra, 0))
        conn.execute("BEGIN")
        conn.executemany(sql, batch)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
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


def bench_import(workdir: Path, entries: int) -> dict:
    """`ccmon import` of a generated year of transcripts into a fresh local server, end to end; checks its own
    answer (rows stored = answers generated), then imports again (everything already known)."""
    folder = workdir / "projects"
    files, lines = write_transcripts(folder, entries, int(time.time() * 1000))
    db = workdir / "import.db"
    server = ccmon_server(db)
    try:
        command = [sys.executable, str(ROOT / "ccmon.py"), "import", "--monitor-server", server.target, str(folder)]
        load = os.getloadavg()[0]
        server_cpu, client_cpu = cpu_seconds(server.proc.pid), children_cpu_seconds()
        started = time.perf_counter()
        first = subprocess.run(command, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - started
        server_cpu, client_cpu = cpu_seconds(server.proc.pid) - server_cpu, children_cpu_seconds() - client_cpu
        started = time.perf_counter()
        again = subprocess.run(command, capture_output=True, text=True, check=True)
        again_s = time.perf_counter() - started
    finally:
        server.stop()
    stored = sqlite3.connect(db).execute("SELECT COUNT(*), SUM(origin = 2) FROM requests").fetchone()
    if stored != (entries, entries) or f"{entries:,} requests imported" not in first.stdout or \
            f"{entries:,} already known" not in again.stdout:
        raise RuntimeError(f"import stored {stored} of {entries}: {first.stdout} {first.stderr} {again.stdout}")
    db.unlink()
    shutil.rmtree(folder)
    return {"entries": entries, "files": files, "lines": lines, "seconds": seconds, "load": load,
            "client_cpu_s": client_cpu, "server_cpu_s": server_cpu,
            "entries_per_s": entries / seconds, "lines_per_s": lines / seconds, "again_s": again_s}


def timed(call, runs: int) -> list[float]:
    call()  # warm: connections, caches
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def percentile(samples: list[float], p: int) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def bench_queries(server: Server, runs: int) -> dict:
    client = ccmon.Client(server.target, timeout_s=60)
    stub = client._stub
    now = int(time.time() * 1000)
    results = {}
    for label, span in (("GetStats 1h", HOUR_MS), ("GetStats 24h", 24 * HOUR_MS), ("GetStats 30d", 30 * 24 * HOUR_MS),
                        ("GetStats all", None)):
        results[label] = timed(lambda span=span: client.stats(None if span is None else now - span, now), runs)
    results["GetUsage 30 days"] = timed(lambda: stub.GetUsage(ccmon_pb2.GetUsageRequest(timezone="Europe/Berlin"),
                                                              timeout=60), runs)
    results["GetAPIRequests 100"] = timed(lambda: stub.GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(
        start_time=ccmon.timestamp_from_ms(now - 30 * 24 * HOUR_MS), limit=100), timeout=60), runs)
    settings = ccmon.MonitorSettings(server.target, ccmon.ZoneInfo("Europe/Berlin"), 5, 35_000, 5)
    for tab in ("current", "daily"):
        state = ccmon.ViewState(tab=tab, period="d")
        results[f"monitor refresh ({tab})"] = timed(
            lambda state=state: client.snapshot(ccmon.query_for(state, settings, int(time.time() * 1000))), runs)
    client.close()
    return {label: (percentile(s, 50) * 1000, percentile(s, 95) * 1000) for label, s in results.items()}


def bench_retention_stall(workdir: Path, rows: int) -> dict:
    """Ingest steadily while the start-up sweep deletes `rows` old rows; report the worst Export latency."""
    db = workdir / "retention.db"
    now = int(time.time() * 1000)
    seed(db, rows, end_ms=now - 40 * 86400_000, span_ms=30 * 86400_000)
    payloads = make_payloads(1, 400, 64, seed=3)[0]
    server = ccmon_server(db, "--server-retention", "30d")
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
    server.stop()
    deleted = next((line for line in server.lines if "retention: deleted" in line), "")
    return {"old_rows": rows, "worst_export_ms": worst * 1000, "sweep_s": sweep_seconds,
            "deleted": int(re.search(r"deleted (\d+)", deleted).group(1)) if deleted else 0}


# ---------------------------------------------------------------- 3, 4, 5: startup, memory, size

def bench_startup(workdir: Path, server: Server) -> dict:
    pyz = workdir / "ccmon.pyz"
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output", str(pyz)], check=True,
                   capture_output=True)
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


def monitor_rss_mb(server: Server) -> float:
    import pty
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["TERM"] = "xterm"
        os.execv(sys.executable, [sys.executable, str(ROOT / "ccmon.py"), "--monitor-server", server.target,
                                  "-b", "5am"])
    deadline = time.time() + 4
    while time.time() < deadline:
        try:
            os.read(fd, 65536)
        except OSError:
            break
    rss = proc_status_kib(pid, "VmRSS") / 1024
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    return rss


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
    parser.add_argument("--only", choices=("import",), help="run one benchmark only")
    args = parser.parse_args()
    if args.only == "import":
        workdir = Path(tempfile.mkdtemp(prefix="ccmon-bench-"))
        try:
            print(f"machine: {machine()}\n7. import of {args.import_entries} transcript entries", flush=True)
            result = bench_import(workdir, args.import_entries)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(import_report(result))
        return 0
    sizes = [int(n) for n in args.rows.split(",")]
    ingest, runs = args.ingest, args.runs
    if args.quick:
        sizes, ingest, runs = [20_000, 100_000], 40_960, 10
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    workdir = Path(tempfile.mkdtemp(prefix="ccmon-bench-"))
    try:
        print(f"machine: {results['machine']}\n1. ingestion ({ingest} records, {args.clients} clients)", flush=True)
        results["ingestion"] = bench_ingestion(workdir, ingest, args.clients)
        results["queries"] = {}
        for rows in sizes:
            db = workdir / f"seeded-{rows}.db"
            print(f"2. queries at {rows} requests: seeding ...", flush=True)
            seconds = seed(db, rows, end_ms=int(time.time() * 1000))
            print(f"   seeded in {seconds:.0f} s; querying", flush=True)
            server = ccmon_server(db)
            results["queries"][rows] = bench_queries(server, runs)
            results.setdefault("db_mb_per_million", database_mb_per_million(db, rows))
            if rows == sizes[0]:
                print("3. startup, 4. monitor memory", flush=True)
                results["startup"] = bench_startup(workdir, server)
                results["monitor_rss_mb"] = monitor_rss_mb(server)
            server.stop()
            db.unlink()
        print("6. retention sweep under ingestion", flush=True)
        results["retention"] = bench_retention_stall(workdir, min(1_000_000, max(sizes)))
        print("7. import of Claude Code transcripts", flush=True)
        results["import"] = bench_import(workdir, 20_000 if args.quick else args.import_entries)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(results))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict) -> str:
    ing, st = r["ingestion"], r["startup"]
    lines = [f"ccmon benchmark, {r['date']}", f"machine: {r['machine']}", "",
             "| measure | result | target | |", "| --- | --- | --- | --- |",
             f"| ingestion, ccmon ({ing['clients']} clients x 512-record exports) | {ing['ccmon_per_s']:,.0f} records/s "
             f"| | |",
             f"| ingestion, do-nothing grpcio receiver | {ing['ceiling_per_s']:,.0f} records/s | | |",
             f"| ingestion ratio | {ing['ratio']:.2f} | >= 0.40 | {target(ing['ratio'], 0.4, True)} |",
             f"| Export latency p50 / p95 | {ing['export_p50_ms']:.0f} / {ing['export_p95_ms']:.0f} ms | | |"]
    for rows, queries in r["queries"].items():
        limit = 20 if int(rows) <= 1_000_000 else 50
        for label, (p50, p95) in queries.items():
            goal = 50 if label.startswith("monitor") else limit
            lines.append(f"| {label} @ {int(rows):,} | p50 {p50:.1f} ms, p95 {p95:.1f} ms | p50 <= {goal} ms "
                         f"| {target(p50, goal)} |")
    lines += [f"| ccmon.pyz --version, first run / warm | {st['version_cold_s']:.2f} s / {st['version_warm_s']:.2f} s "
              f"| <= 3 s / <= 0.3 s | {target(st['version_cold_s'], 3)} / {target(st['version_warm_s'], 0.3)} |",
              f"| ccmon.pyz --format, first run / warm | {st['format_cold_s']:.2f} s / {st['format_warm_s']:.2f} s "
              f"| - / <= 0.5 s | {target(st['format_warm_s'], 0.5)} |",
              f"| ccmon.pyz size | {st['pyz_mb']:.1f} MB | | |",
              f"| server peak RSS after {ing['records']:,} records | {ing['server_peak_rss_mb']:.0f} MB | <= 100 MB "
              f"| {target(ing['server_peak_rss_mb'], 100)} |",
              f"| monitor RSS | {r['monitor_rss_mb']:.0f} MB | | |",
              f"| database size | {r['db_mb_per_million']:.0f} MB per million requests | <= 250 MB "
              f"| {target(r['db_mb_per_million'], 250)} |",
              f"| retention sweep of {r['retention']['deleted']:,} rows: worst Export latency | "
              f"{r['retention']['worst_export_ms']:.0f} ms | <= 1000 ms "
              f"| {target(r['retention']['worst_export_ms'], 1000)} |", import_report(r["import"])]
    return "\n".join(lines)


def import_report(i: dict) -> str:
    return (f"| ccmon import, {i['entries']:,} answers ({i['lines']:,} lines, {i['files']:,} files), first run | "
            f"{i['entries_per_s']:,.0f} entries/s ({i['seconds']:.1f} s; {i['lines_per_s']:,.0f} lines/s; again: "
            f"{i['again_s']:.1f} s; CPU: ccmon import {i['client_cpu_s']:.1f} s, server {i['server_cpu_s']:.1f} s; load "
            f"average {i['load']:.1f}) | >= 20,000/s | {target(i['entries_per_s'], 20_000, True)} |")


if __name__ == "__main__":
    sys.exit(main())
