"""ccmon's test suite: a real server on a loopback port, real OpenTelemetry SDK exporters,
a real SQLite file, the real monitor in a pseudo-terminal. Run: python -m pytest -q"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import decimal
import errno
import gc
import io
import json
import os
import queue
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import tomllib
import zlib
from pathlib import Path

import grpc
import pytest
from opentelemetry._logs import LogRecord
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk.metrics import Counter, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

import ccmon
import ccmon_pb2
import ccmon_pb2_grpc

ROOT = Path(__file__).resolve().parent
CCMON = [sys.executable, str(ROOT / "ccmon.py")]
FIXTURES = ROOT / "fixtures"  # the project's own test material: the stand-in Anthropic API, real samples


def go_ccmon_binary() -> Path:
    """The original Go ccmon v0.9.4, built for this kind of machine: `$CCMON_GO_PEER`, else the one in the shared/
    folder beside the clone. It is not part of the repository: without it, its interoperability tests skip."""
    path = Path(os.environ.get("CCMON_GO_PEER") or ROOT.parent / "shared" / "peers" / "go-ccmon" / "ccmon")
    if not os.access(path, os.X_OK):
        pytest.skip(f"the Go ccmon peer is not here ({path}): set CCMON_GO_PEER to its binary to run this test")
    return path


# Fixtures that start an external program or need the network: a test using one is marked e2e (pytest.ini).
E2E_FIXTURES = {"node_emitter", "go_server", "pyz", "pythons", "claude_code", "chromium", "prometheus"}


def e2e(test):
    """Marks a test that starts an external program. The tests run on a worker per core (pytest-xdist, pytest.ini);
    these share programs and caches (tmux's server, npm's install, the pyz build), so they run one at a time, on
    one worker."""
    return pytest.mark.xdist_group("e2e")(pytest.mark.e2e(test))


@pytest.fixture(autouse=True)
def e2e_tests_are_marked(request):
    """Keeps the fast tier (-m "not e2e") free of external programs: a test using an E2E_FIXTURES one says @e2e."""
    uses = E2E_FIXTURES & set(request.fixturenames)
    marked = request.node.get_closest_marker("e2e") and request.node.get_closest_marker("xdist_group")
    assert not uses or marked, f"uses {sorted(uses)}: mark it @e2e"


CLAUDE_RESOURCE = {"service.name": "claude-code", "service.version": "2.0.14", "os.type": "linux",
                   "host.arch": "amd64"}


class ServerProcess:
    """`ccmon --server` as a subprocess on an ephemeral loopback port, its stderr written to a file: a line the
    server logged before it answered is in `log` once the answer is in, with no reader thread to lag behind."""

    def __init__(self, workdir: Path, *extra: str, db: Path | None = None, address: str = "127.0.0.1:0",
                 command: list[str] | None = None, env: dict | None = None):
        self.workdir, self.db, self.env = workdir, db or workdir / "ccmon.db", env or {}
        self.args = [*(command or CCMON), "--server", "--server-address", address, "--server-http-address",
                     "127.0.0.1:0", "--database-path", str(self.db), *extra]
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.port = self.http_port = 0

    def start(self) -> "ServerProcess":
        self.log_path = Path(tempfile.mkstemp(prefix="server-", suffix=".log", dir=self.workdir)[1])
        with open(self.log_path, "w") as stderr:
            self.proc = subprocess.Popen(self.args, cwd=self.workdir, stderr=stderr, text=True,
                                         env={**os.environ, "HOME": str(self.workdir), **self.env})

        def ready() -> re.Match | bool:
            match = re.search(r" ready: gRPC \S+:(\d+)(?:, HTTP \S+:(\d+))?$", self.log, re.M)
            return match or self.proc.poll() is not None  # or it exited before it was ready

        match = wait_until(ready, f"the server to start: {self.log}", 60, 0.02)
        assert match is not True, f"server failed to start: {self.log}"
        self.port, self.http_port = int(match.group(1)), int(match.group(2) or 0)
        # Ready means a stop signal is caught from then on: a supervisor may stop it the moment it says so.
        assert signal.SIGTERM in caught_signals(self.proc.pid), "ready before its SIGTERM handler"
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    @property
    def lines(self) -> list[str]:
        return self.log.splitlines(keepends=True)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(20)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def query(self) -> ccmon_pb2_grpc.QueryServiceStub:
        return ccmon_pb2_grpc.QueryServiceStub(grpc.insecure_channel(self.target))

    def logs_stub(self):
        return logs_service_pb2_grpc.LogsServiceStub(grpc.insecure_channel(self.target))


@pytest.fixture
def server(tmp_path):
    proc = ServerProcess(tmp_path).start()
    yield proc
    if proc.proc.poll() is None:
        proc.stop()


def api_request(seq: int, when: str, model: str = "claude-sonnet-4-5", session: str = "sess-1", **figures):
    """Attributes shaped like Claude Code's api_request event."""
    attrs = {"event.name": "api_request", "event.timestamp": when, "event.sequence": seq,
             "session.id": session, "user.id": "u" * 64, "organization.id": "org-1",
             "terminal.type": "tmux", "prompt.id": f"p-{seq}", "request_id": f"req_{seq}", "model": model,
             "query_source": "repl_main_thread"}
    attrs.update(figures)
    return attrs


class RecordingExporter:
    """Passes batches to a real exporter and keeps each export's result."""

    def __init__(self, exporter):
        self.exporter, self.results = exporter, []

    def export(self, batch):
        result = self.exporter.export(batch)
        self.results.append(result.name)
        return result

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True

    def shutdown(self) -> None:
        self.exporter.shutdown()


def sdk_export(port: int, events: list[tuple[str, dict]], resource: dict = CLAUDE_RESOURCE, protocol: str = "grpc",
               gzip: bool = False, headers: dict | None = None, ca: Path | None = None) -> list[str]:
    """Send events through the real OpenTelemetry Python SDK and its OTLP exporter for `protocol`
    (grpc or http/protobuf), batched as the SDK batches them; returns each export's result."""
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    scheme = "https" if ca else "http"
    compression = grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression
    if protocol == "grpc":
        credentials = grpc.ssl_channel_credentials(ca.read_bytes()) if ca else None
        exporter = OTLPLogExporter(endpoint=f"{scheme}://127.0.0.1:{port}", insecure=not ca, credentials=credentials,
                                   headers=headers, compression=compression, timeout=10)
    else:
        from opentelemetry.exporter.otlp.proto.http import Compression as HTTPCompression
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter as HTTPLogExporter
        exporter = HTTPLogExporter(endpoint=f"{scheme}://127.0.0.1:{port}/v1/logs", headers=headers, timeout=10,
                                   certificate_file=str(ca) if ca else None,
                                   compression=HTTPCompression.Gzip if gzip else HTTPCompression.NoCompression)
    recording = RecordingExporter(exporter)
    provider = LoggerProvider(resource=Resource.create(resource))
    provider.add_log_record_processor(BatchLogRecordProcessor(recording, schedule_delay_millis=60_000))
    logger = provider.get_logger("com.anthropic.claude_code.events")
    for name, attrs in events:
        logger.emit(LogRecord(body=f"claude_code.{name}", attributes=attrs))
    provider.force_flush()
    provider.shutdown()
    return recording.results


def any_value(value) -> common_pb2.AnyValue:
    if isinstance(value, bool):
        return common_pb2.AnyValue(bool_value=value)
    if isinstance(value, int):
        return common_pb2.AnyValue(int_value=value)
    if isinstance(value, float):
        return common_pb2.AnyValue(double_value=value)
    return common_pb2.AnyValue(string_value=value)


def logs_request(events: list[tuple[str, dict]], resource: dict = CLAUDE_RESOURCE):
    """A raw ExportLogsServiceRequest, for tests that need the response or exact bytes."""
    records = [logs_pb2.LogRecord(body=common_pb2.AnyValue(string_value=f"claude_code.{name}"),
                                  attributes=[common_pb2.KeyValue(key=k, value=any_value(v))
                                              for k, v in attrs.items()])
               for name, attrs in events]
    return logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        resource={"attributes": [common_pb2.KeyValue(key=k, value=any_value(v)) for k, v in resource.items()]},
        scope_logs=[logs_pb2.ScopeLogs(log_records=records)])])


def ts(iso: str):
    return ccmon.timestamp_from_ms(ccmon.parse_iso_ms(iso))


def stats(srv: ServerProcess, start: str | None = None, end: str | None = None):
    """Every agent's usage in the period, as the server stored it."""
    request = ccmon_pb2.GetStatsRequest(agent=ccmon.ALL_AGENTS)
    if start:
        request.start_time.CopyFrom(ts(start))
    if end:
        request.end_time.CopyFrom(ts(end))
    return srv.query().GetStats(request).stats


READABLE_VIEWS = """
CREATE TEMP VIEW r AS SELECT requests.*, s.session_id, m.name AS model_name, u.name AS user_name,
    src.attributes AS source_json, x.attributes AS extra_json FROM requests JOIN sessions s ON s.id = requests.session
    JOIN models m ON m.id = requests.model JOIN users u ON u.id = requests.user
    LEFT JOIN attribute_sets src ON src.id = requests.source
    LEFT JOIN attribute_sets x ON x.id = requests.extra;
CREATE TEMP VIEW e AS SELECT events.*, s.session_id FROM events JOIN sessions s ON s.id = events.session;
CREATE TEMP VIEW mp AS SELECT metric_points.*, s.session_id FROM metric_points
    JOIN sessions s ON s.id = metric_points.session;
"""


def db_rows(db: Path, sql: str, params=()) -> list[tuple]:
    """Query the server's database, with views r, e and mp that spell interned ids out."""
    with sqlite3.connect(db) as conn:
        conn.executescript(READABLE_VIEWS)
        return conn.execute(sql, params).fetchall()


def hours_ago(hours: float) -> str:
    moment = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def earlier_today(hours: float) -> str:
    """hours_ago(hours), except just after UTC midnight, when that would be yesterday: then a time between midnight
    and now, in the same order (more hours, earlier). For records a test counts in today's figures."""
    now = dt.datetime.now(dt.timezone.utc)
    midnight, moment = now.replace(hour=0, minute=0, second=0, microsecond=0), now - dt.timedelta(hours=hours)
    if moment < midnight:
        moment = midnight + (now - midnight) * (1 - hours / 24)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_today() -> str:
    """Today's date in UTC, as hours_ago's times begin: a test's recent times may fall on yesterday after midnight."""
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


# The mixed shapes real Claude Code versions send: strings, ints, doubles.
MIXED_EVENTS = [
    ("api_request", api_request(1, "2026-03-01T10:00:00.000Z", input_tokens="1200", output_tokens="340",
                                cache_read_tokens="15000", cache_creation_tokens="2200", cost_usd="0.0421",
                                duration_ms="5120")),
    ("api_request", api_request(2, "2026-03-01T10:05:30.250Z", input_tokens=800, output_tokens=95,
                                cache_read_tokens=0, cache_creation_tokens=0, cost_usd=0.000975,
                                duration_ms=830, model="claude-haiku-4-5-20251001", ttft_ms=210)),
    ("api_request", api_request(3, "2026-03-01T23:59:59.999Z", input_tokens=10.0, output_tokens=2048.0,
                                cache_read_tokens=30123.0, cache_creation_tokens=512.0, cost_usd=0.1,
                                duration_ms=22000.0, model="claude-opus-4-1")),
    ("user_prompt", {"event.name": "user_prompt", "event.timestamp": "2026-03-01T09:59:58.000Z",
                     "event.sequence": 0, "session.id": "sess-1", "prompt_length": "42", "prompt.id": "p-1"}),
    ("tool_result", {"event.name": "tool_result", "event.timestamp": "2026-03-01T10:00:10.000Z",
                     "event.sequence": 4, "session.id": "sess-1", "tool_name": "Bash", "success": "true",
                     "duration_ms": "88"}),
]


# ---------------------------------------------------------------- domain: numbers, time, 5-hour blocks and limits

def test_number_parsing_accepts_every_anyvalue_shape():
    assert [ccmon.parse_count(v, "k") for v in ("12", " 7 ", 12, 12.0, "3.0", "1e3")] == [12, 7, 12, 12, 3, 1000]
    assert [ccmon.parse_usd_nanos(v, "c") for v in ("0.0421", 0.1, 3, "1e-9", 0.000975)] == \
        [42_100_000, 100_000_000, 3_000_000_000, 1, 975_000]
    for bad, message in ((True, "is not a number"), ("", "is not a number"), ("inf", "is not a finite number"),
                         (float("nan"), "is not a finite number"), (2 ** 63, "is too large"), ([1], "is not a number"),
                         (10 ** 12, "is too large"), (b"\x12", "is not a number"), ("١٢", "is not a number"),
                         ("1e1000000", "is too large"), ("1.5", "is not a whole number"), (-3, "is negative")):
        with pytest.raises(ccmon.BadValue, match=message):
            ccmon.parse_count(bad, "k")
    for bad, message in (("Infinity", "is not a finite number"), (-0.5, "is negative"), (None, "is not a number"),
                         ("1,5", "is not a number"), (1e12, "is too large"), ("9" * 30, "is too large")):
        with pytest.raises(ccmon.BadValue, match=message):
            ccmon.parse_usd_nanos(bad, "c")



def test_number_parsing_quick_paths_agree_with_exact_arithmetic():
    """Counts as digits and costs as plain decimals skip Decimal (the decoders' hot path): the same answers as exact
    arithmetic, at the edges of the quick paths and at random."""
    rng = random.Random(27)
    counts = ["007", "0", "9" * 12, *(str(rng.randrange(10 ** rng.randint(1, 12))) for _ in range(2000))]
    assert [ccmon.parse_count(text, "k") for text in counts] == [int(text) for text in counts]
    assert ccmon.parse_count("+5", "k") == 5  # past the quick path, as before it
    for bad, message in (("9" * 13, "is too large"), ("１２", "is not a number")):
        with pytest.raises(ccmon.BadValue, match=message):
            ccmon.parse_count(bad, "k")

    def exact(text: str) -> int:
        return int((decimal.Decimal(text) * 10 ** 9).to_integral_value(decimal.ROUND_HALF_EVEN))
    costs = ["0.0421", "999999.999999999", "0.1234567895", "0.1234567885", "12", "000001.5", "0.000000001",
             *(f"{rng.randrange(10 ** 6)}.{rng.randrange(10 ** 12):0{rng.randint(1, 12)}d}" for _ in range(2000))]
    assert [ccmon.parse_usd_nanos(text, "c") for text in costs] == [exact(text) for text in costs]
    doubles = [rng.uniform(0, 50) for _ in range(2000)] + [round(rng.uniform(0.0005, 0.4), 6) for _ in range(2000)]
    assert [ccmon.parse_usd_nanos(value, "c") for value in doubles] == [exact(repr(value)) for value in doubles]
    with pytest.raises(ccmon.BadValue, match="is too large"):
        ccmon.parse_usd_nanos("1000000", "c")

def test_day_bounds_across_dst():
    zone = ccmon.ZoneInfo("Europe/Berlin")
    end = ccmon.parse_iso_ms("2026-03-30T12:00:00Z")
    bounds = ccmon.day_bounds(zone, end, 3)
    assert [(d, (hi - lo) // 3600_000) for d, lo, hi in bounds] == [
        ("2026-03-30", 24), ("2026-03-29", 23), ("2026-03-28", 24)]
    assert bounds[1][1] == ccmon.parse_iso_ms("2026-03-28T23:00:00Z")


def test_premium_split():
    assert not ccmon.is_premium("claude-3-5-HAIKU-20241022")
    assert ccmon.is_premium("claude-opus-4-1") and ccmon.is_premium("unknown")


BERLIN = ccmon.ZoneInfo("Europe/Berlin")


def local_ms(text: str, zone=BERLIN) -> int:
    return ccmon.ms_from_datetime(dt.datetime.fromisoformat(text).replace(tzinfo=zone))


@pytest.mark.parametrize("text,hour", [("5am", 5), ("11pm", 23), ("12am", 0), ("12pm", 12), ("1AM", 1),
                                       (" 07pm ", 19), ("10 am", 10)])
def test_block_hour_forms(text, hour):
    assert ccmon.parse_block_mode(text) == hour


@pytest.mark.parametrize("now,hour,expected", [
    ("2026-01-15 05:00", 5, ("2026-01-15 05:00", "2026-01-15 10:00")),
    ("2026-01-15 09:59", 5, ("2026-01-15 05:00", "2026-01-15 10:00")),
    ("2026-01-15 16:20", 5, ("2026-01-15 15:00", "2026-01-15 20:00")),
    ("2026-01-16 00:30", 5, ("2026-01-15 20:00", "2026-01-16 01:00")),
    ("2026-01-16 04:30", 5, ("2026-01-16 01:00", "2026-01-16 05:00")),  # cut short by the next cycle
    ("2026-01-16 01:00", 23, ("2026-01-15 23:00", "2026-01-16 04:00")),
    ("2026-03-29 01:30", 23, ("2026-03-28 23:00", "2026-03-29 05:00")),  # spring forward: 5 real hours
    ("2026-10-25 02:30", 23, ("2026-10-24 23:00", "2026-10-25 03:00")),  # fall back: 5 real hours
    ("2026-03-29 12:00", 2, ("2026-03-29 08:00", "2026-03-29 13:00")),   # 2am does not exist that day
])
def test_current_block_examples(now, hour, expected):
    start, end = ccmon.current_block(local_ms(now), BERLIN, hour)
    assert [dt.datetime.fromtimestamp(ms / 1000, BERLIN).strftime("%Y-%m-%d %H:%M") for ms in (start, end)] == \
        list(expected)


@pytest.mark.parametrize("zone_name", ["Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe",
                                       "UTC"])
def test_blocks_tile_time_for_every_start_hour(zone_name):
    zone = ccmon.ZoneInfo(zone_name)
    # Two days around each DST change of 2026 in the northern and southern hemispheres.
    starts = [ccmon.parse_iso_ms(d) for d in ("2026-03-07T00:00:00Z", "2026-03-28T00:00:00Z",
                                               "2026-04-04T00:00:00Z", "2026-10-24T00:00:00Z")]
    for hour in range(24):
        for origin in starts:
            moment = origin
            start, end = ccmon.current_block(moment, zone, hour)
            while moment < origin + 2 * 86400_000:
                assert start <= moment < end and 0 < end - start <= ccmon.BLOCK_MS
                next_start, next_end = ccmon.current_block(end, zone, hour)
                assert next_start == end  # blocks tile time: no gaps, no overlaps
                cycle_start = ccmon.ms_from_datetime(dt.datetime.combine(
                    dt.datetime.fromtimestamp(end / 1000, zone).date(), dt.time(hour), zone))
                assert end - start == ccmon.BLOCK_MS or end == cycle_start  # short only where a cycle restarts
                assert ccmon.current_block(cycle_start, zone, hour)[0] == cycle_start
                moment, start, end = end, next_start, next_end


def test_block_status_projection():
    start = local_ms("2026-01-15 10:00")
    status = ccmon.BlockStatus(start, start + ccmon.BLOCK_MS, start + 30 * 60_000, used=21_000, limit=35_000)
    assert status.burn_rate == 700.0
    assert status.limit_reached_ms() == start + 50 * 60_000
    slow = ccmon.BlockStatus(start, start + ccmon.BLOCK_MS, start + 60 * 60_000, used=3_000, limit=35_000)
    assert slow.limit_reached_ms() is None and slow.projected_at_end() == 15_000
    over = ccmon.BlockStatus(start, start + ccmon.BLOCK_MS, start + 60_000, used=40_000, limit=35_000)
    assert over.limit_reached_ms() == start + 60_000
    assert ccmon.token_limit("max", 0) == 35_000 and ccmon.token_limit("pro", 9) == 9
    assert ccmon.token_limit("unset", 0) is None and ccmon.token_limit("max20", 0) == 140_000


def test_limit_math():
    assert ccmon.learned_limit([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], 35) == (90, 10)
    assert ccmon.learned_limit([10, 20, 0, 40], 35) == (40, 3)
    assert ccmon.learned_limit([5, 6], 7_000) == (7_000, 2)  # never below the plan's limit
    assert ccmon.learned_limit([], 7_000) == (7_000, 0) and ccmon.learned_limit([], None) == (None, 0)
    zone = ccmon.ZoneInfo("UTC")
    assert ccmon.block_window("auto", 150, zone, [(0, 100), (120, 200)]) == (120, 200)
    assert ccmon.block_window("auto", 210, zone, [(0, 100), (120, 200)]) is None
    assert ccmon.block_window(5, local_ms("2026-01-15 12:00", zone), zone, []) == \
        (local_ms("2026-01-15 10:00", zone), local_ms("2026-01-15 15:00", zone))
    assert [ccmon.model_family(m) for m in ("claude-opus-4-1", "claude-sonnet-4-5", "claude-3-5-haiku", "x")] == \
        ["opus", "sonnet", "haiku", "other"]
    start = local_ms("2026-01-15 10:00")
    recent = ccmon.BlockStatus(start, start + ccmon.BLOCK_MS, start + 60 * 60_000, used=3_000, limit=10_000,
                               recent_rate=100.0)
    assert recent.burn_rate == 100.0 and recent.projected_at_end() == 27_000
    assert recent.limit_reached_ms() == start + 60 * 60_000 + 70 * 60_000


def test_weekly_gauge_and_its_projection():
    settings = ccmon.MonitorSettings("x:1", BERLIN, "auto", 10_000, 5, weekly_limit=100_000)
    now = local_ms("2026-05-04 09:00")  # a Monday
    limits = ccmon.LimitFigures(None, ccmon.Split(), 50.0, 10_000, None,
                                {"opus": ccmon.Usage(3, 20_000, 5_000), "sonnet": ccmon.Usage(9, 40_000, 5_000),
                                 "haiku": ccmon.Usage(2, 999, 1)})
    def line(width):
        return line_text(ccmon.weekly_line(limits, ccmon.Screen(settings, width, 24, now,
                                                                      ccmon.Glyphs.for_terminal(False)), 101))

    # 70,000 used; 30,000 left at 50 tokens/min: 600 minutes, Monday 19:00
    assert line(118) == ("Week        #####################.........  70%  70.0K / 100K, limit Mon 19:00 at "
                         "this pace (opus 25.0K, sonnet 45.0K)")
    assert line(117) == line(118).removesuffix(" (opus 25.0K, sonnet 45.0K)")
    assert ccmon.weekly_reached_ms(100, 100, 0.0, now) == now and ccmon.weekly_reached_ms(1, 100, 0.0, now) is None


# ---------------------------------------------------------------- configuration: files, flags, environment, validation

def run_main(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = ccmon.main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def config_for(tmp_path, monkeypatch, args: list[str] = ()) -> ccmon.Config:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return ccmon.load_config(ccmon.build_parser().parse_args(list(args)))


def test_config_defaults(tmp_path, monkeypatch):
    config = config_for(tmp_path, monkeypatch)
    assert config == ccmon.Config(
        database_path=tmp_path / "home" / ".ccmon" / "ccmon.db", server_address="127.0.0.1:4317",
        server_retention_s=None, server_http_address="127.0.0.1:4318", server_token="", server_tls=None,
        max_message_bytes=16 * 1024 * 1024, monitor_server="127.0.0.1:4317", monitor_token="", monitor_tls=None,
        monitor_timezone="UTC", refresh_interval_s=5, plan="unset", max_tokens=0, source="defaults", block_mode=None,
        weekly_max_tokens=0, alert_percents=(), alert_command="", monitor_autostart=True, status_line_wait_s=0.25)


def test_config_file_search_order_and_flag_precedence(tmp_path, monkeypatch):
    home_dir = tmp_path / "home" / ".ccmon"
    home_dir.mkdir(parents=True)
    (home_dir / "config.toml").write_text('[claude]\nplan = "pro"\n')
    assert config_for(tmp_path, monkeypatch).plan == "pro"
    (tmp_path / "config.json").write_text(json.dumps({"claude": {"plan": "max", "max_tokens": 9000},
                                                      "server": {"retention": "30d"}}))
    config = config_for(tmp_path, monkeypatch)
    assert (config.plan, config.max_tokens, config.server_retention_s) == ("max", 9000, 30 * 86400)
    assert config.source == str(tmp_path / "config.json")
    (tmp_path / "config.toml").write_text('[monitor]\ntimezone = "Asia/Taipei"\nrefresh_interval = "1m"\n'
                                          '[database]\npath = "~/data/x.db"\n')
    config = config_for(tmp_path, monkeypatch, ["--monitor-timezone", "Europe/Berlin"])
    assert (config.monitor_timezone, config.refresh_interval_s, config.plan) == ("Europe/Berlin", 60, "unset")
    assert config.database_path == tmp_path / "home" / "data" / "x.db"
    yaml_file = tmp_path / "elsewhere.yaml"
    yaml_file.write_text("claude:\n  plan: max20\nserver:\n  address: 0.0.0.0:4317\n")
    config = config_for(tmp_path, monkeypatch, ["--config", str(yaml_file), "--claude-max-tokens", "5"])
    assert (config.plan, config.server_address, config.max_tokens) == ("max20", "0.0.0.0:4317", 5)


TOKEN_RULE = "a token must be printable ASCII without spaces (letters, digits, punctuation)"


FILE_ERRORS = [
    ("config.toml", '[claude]\nplan = "gold"\n', "{path}: claude.plan: unknown plan 'gold' (accepted: unset, pro, "
                                                 "max, max20)"),
    ("config.toml", '[claude]\nmax_tokens = -1\n',
     "{path}: claude.max_tokens: invalid token limit -1 (use a whole number >= 0, 0 meaning the plan's default, or "
     "'auto' to learn it)"),
    ("config.toml", '[server]\nport = 4317\n', "{path}: unknown key server.port (known in [server]: address, "
                                               "http_address, retention, token, tls_cert, tls_key, tls_client_ca, "
                                               "max_message_size, cache.stats.enabled, cache.stats.ttl)"),
    ("config.toml", '[mointor]\nserver = "x:1"\n', "{path}: unknown section [mointor] (known: database, server, "
                                                   "monitor, claude, pricing)"),
    ("config.toml", '[pricing]\nmy-model = 3\n',
     "{path}: [pricing] 'my-model': expected a table such as {{input = 3, output = 15}}, got 3"),
    ("config.toml", '[pricing]\nmy-model = {input = 3}\n',
     "{path}: [pricing] 'my-model': needs at least input and output (USD per million tokens)"),
    ("config.toml", '[pricing]\nmy-model = {input = 3, output = -1}\n',
     "{path}: [pricing] 'my-model': output must be a price in USD per million tokens from 0 to 10000, got -1"),
    ("config.toml", '[pricing]\nmy-model = {input = 3, output = "x"}\n',
     "{path}: [pricing] 'my-model': output must be a price in USD per million tokens from 0 to 10000, got 'x'"),
    ("config.toml", '[pricing]\nmy-model = {input = 3, output = 15, cache_write = 4}\n',
     "{path}: [pricing] 'my-model': unknown key cache_write (known: input, output, cache_read, cache_write_5m, "
     "cache_write_1h)"),
    ("config.toml", '[monitor]\ntimezone = 3\n', "{path}: monitor.timezone: expected a non-empty string, got 3"),
    ("config.toml", 'plan = \n', "{path}: not valid TOML: "),
    ("config.json", '{"claude": ', "{path}: not valid JSON: "),
    ("config.yaml", 'claude: [unclosed', "{path}: not valid YAML: "),
    ("config.json", '[1, 2]', "{path}: the top level must be a table of sections"),
    ("config.toml", 'claude = 5\n', "{path}: [claude] must be a table of settings"),
    ("config.toml", '[monitor]\ntoken = 5\n', "{path}: monitor.token: " + TOKEN_RULE),
    # what no Authorization header or gRPC metadata can carry
    ("config.toml", '[monitor]\ntoken = "t\u00f6k\u00e9n"\n', "{path}: monitor.token: " + TOKEN_RULE),
    ("config.toml", '[server]\ntoken = "a\\u0000b"\n', "{path}: server.token: " + TOKEN_RULE),
    ("config.json", '{"a":' * 100_000 + '1' + '}' * 100_000,
     "{path}: nested too deeply to be a ccmon config (it has sections of settings)"),
    ("config.toml", '[monitor]\ntls_ca = true\n', "{path}: monitor.tls_ca: expected a file path, got True"),
    ("config.toml", '[database]\npath = "db\\u0000"\n',
     "{path}: database.path: a path cannot hold a NUL character, got 'db\\x00'"),
    ("config.json", '{"database": {"path": "db\\ud800"}}',
     "{path}: database.path: not a file name this system can use: 'db\\ud800'"),
]


@pytest.mark.parametrize("name,content,message", FILE_ERRORS)
def test_config_file_errors(name, content, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / ".ccmon").mkdir(parents=True)
    path = tmp_path / "home" / ".ccmon" / name
    path.write_text(content)
    code, err = run_main(["--server"], capsys)
    assert code == 2
    assert err.startswith("ccmon: config error: " + message.format(path=path))


def test_a_home_where_no_config_file_can_be_looked_for_is_a_config_error(tmp_path, monkeypatch, capsys):
    """A HOME ccmon may not look into (another user's, without permission; here a name longer than the system
    takes, which root cannot look into either) is said in one line: it ended in a traceback."""
    monkeypatch.chdir(tmp_path)
    home = "/" + "h" * 5000
    monkeypatch.setenv("HOME", home)
    code, err = run_main(["--server"], capsys)
    assert (code, err) == (2, f"ccmon: config error: cannot look for a config file at {home}/.ccmon/config.toml: "
                              "File name too long\n")


@pytest.mark.parametrize("name,content", [
    ("config.toml", 'baseURL = "https://example.org/"\ntitle = "My blog"\n[params]\nauthor = "me"\n'),  # Hugo's
    ("config.json", '{"port": 8080, "debug": true}'),
    ("config.yaml", "version: 2\njobs: {}\n"),
    ("config.toml", "this is [not toml"),
])
def test_another_tools_config_in_the_current_folder_is_passed_over(name, content, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / name).write_text(content)
    config = ccmon.load_config(ccmon.build_parser().parse_args([]))
    assert (config.source, config.plan) == ("defaults", "unset")
    (tmp_path / "home" / ".ccmon").mkdir(parents=True)
    (tmp_path / "home" / ".ccmon" / "config.toml").write_text('[claude]\nplan = "max"\n')
    config = ccmon.load_config(ccmon.build_parser().parse_args([]))
    assert (config.source, config.plan) == (str(tmp_path / "home" / ".ccmon" / "config.toml"), "max")


def test_ccmons_config_in_the_current_folder_stays_strict(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "config.toml").write_text('[claude]\nplan = "max"\n[mointor]\nserver = "x:1"\n')
    assert run_main(["--server"], capsys) == (2, f"ccmon: config error: {tmp_path / 'config.toml'}: unknown section "
                                                 "[mointor] (known: database, server, monitor, claude, pricing)\n")
    (tmp_path / "config.toml").write_text('[claude\nplan = "max"\n')  # broken, but it names a section of ccmon's
    code, err = run_main(["--server"], capsys)
    assert code == 2 and err.startswith(f"ccmon: config error: {tmp_path / 'config.toml'}: not valid TOML: ")


def test_the_original_go_ccmon_config_is_accepted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "config.toml").write_text('[server]\naddress = "127.0.0.1:4317"\nretention = "30d"\n\n'
                                          '[server.cache.stats]\nenabled = true\nttl = "1m"\n')
    config = ccmon.load_config(ccmon.build_parser().parse_args(["--server-cache-stats-enabled=false",
                                                                 "--server-cache-stats-ttl", "30s"]))
    assert config.server_retention_s == 30 * 86400
    (tmp_path / "config.toml").write_text('[server.cache.stats]\nttl = "soon"\n')
    assert run_main(["--server"], capsys) == (
        2, f"ccmon: config error: {tmp_path / 'config.toml'}: server.cache.stats.ttl: invalid duration 'soon' (use "
           "seconds, minutes or hours such as '1m')\n")
    assert run_main(["--server-cache-stats-enabled", "maybe", "--server"], capsys) == (
        2, "ccmon: config error: --server-cache-stats-enabled: expected true or false\n")


def test_yaml_without_pyyaml_says_how_to_get_it(tmp_path):
    (tmp_path / "config.yaml").write_text("claude:\n  plan: pro\n")
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['yaml'] = None; "
                             f"sys.path.insert(0, {str(ROOT)!r}); import ccmon; sys.exit(ccmon.main(['-s']))"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "config.yaml: YAML config needs PyYAML: run 'pip install pyyaml'" in result.stderr


@pytest.mark.parametrize("text", ["25am", "5", "noon", "13pm", "0am", "5 o'clock", "automatic"])
def test_block_hour_errors(text, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["-b", text], capsys)
    assert code == 2
    assert err == (f"ccmon: config error: -b/--block: invalid block start {text!r} (use auto, or an hour from 1 to "
                   "12 followed by am or pm, such as 5am or 11pm)\n")


def test_token_precedence_flag_then_environment_then_file(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text('[server]\ntoken = "from-file"\n[monitor]\ntoken = "from-file"\n')
    monkeypatch.delenv("CCMON_TOKEN", raising=False)
    assert config_for(tmp_path, monkeypatch).server_token == "from-file"
    monkeypatch.setenv("CCMON_TOKEN", "from-env")
    config = config_for(tmp_path, monkeypatch)
    assert (config.server_token, config.monitor_token) == ("from-env", "from-env")
    config = config_for(tmp_path, monkeypatch, ["--server-token", "from-flag", "--monitor-token", "m"])
    assert (config.server_token, config.monitor_token) == ("from-flag", "m")
    tls = config_for(tmp_path, monkeypatch, ["--monitor-server", "https://ccmon.example.com:443"])
    assert tls.monitor_tls == ccmon.TLSFiles()  # TLS with the system's roots


# config.toml.example and the table in docs/configuration.md are made from ccmon.SETTINGS; after changing a setting,
# CCMON_WRITE_GENERATED=1 python -m pytest -q -k generated writes them anew (and the tests below then pass).
EXAMPLE_HEAD = """\
# ccmon configuration. Copy to ./config.toml or ~/.ccmon/config.toml (YAML and JSON work too,
# as config.yaml / config.yml / config.json). Every key is optional; shown are the defaults.
# Flags override this file; docs/configuration.md has the whole table. Generated from SETTINGS in ccmon.py.
"""
EXAMPLE_PRICING = """\
[pricing]                         # USD per million tokens, for models ccmon's table lacks or to override it
# "claude-sonnet-4-5" = {input = 3, output = 15, cache_read = 0.3, cache_write_5m = 3.75, cache_write_1h = 6}
# "my-gateway-model" = {input = 2, output = 8}   # cache prices default to 0.1, 1.25 and 2 x input
"""
DOCS_TABLE_BEGIN = "<!-- settings:begin (generated from SETTINGS in ccmon.py; do not edit) -->"
DOCS_TABLE_END = "<!-- settings:end -->"


def toml_value(value) -> str:
    return "true" if value is True else "false" if value is False else json.dumps(value)


def example_config_text() -> str:
    """config.toml.example: each setting at its default, with its flag (and variable) and what it does."""
    lines = [EXAMPLE_HEAD]
    for section in ccmon.SECTIONS[:-1]:
        lines.append(f"[{section}]")
        for setting in (s for s in ccmon.SETTINGS if s.section == section):
            where = " or ".join([setting.label] + ([f"${setting.env}"] if setting.env else []))
            words = textwrap.wrap(f"{where}; {setting.help}", 116 - 36)
            assignment = f"{setting.name} = {toml_value(setting.default)}"
            lines.append(f"{assignment:<33} # {words[0]}")
            lines.extend(f"{'':<33} # {more}" for more in words[1:])
        lines.append("")
    return "\n".join(lines) + "\n" + EXAMPLE_PRICING


def docs_settings_table() -> str:
    """The table in docs/configuration.md, between its markers."""
    rows = ["| Setting | Flag | Default | What it does |", "| --- | --- | --- | --- |"]
    for setting in ccmon.SETTINGS:
        flags = ", ".join(f"`{flag}`" for flag in setting.options) + (f", `${setting.env}`" if setting.env else "") \
            + (" (repeatable)" if setting.repeatable else "")
        default = f"`{toml_value(setting.default)}`"
        rows.append(f"| `{setting.key}` | {flags} | {default} | {setting.help.replace('|', '&#124;')} |")
    return "\n".join([DOCS_TABLE_BEGIN, *rows, DOCS_TABLE_END])


def generated(path: Path, expected: str, actual: str):
    """Holds a generated file to what it is made from; CCMON_WRITE_GENERATED=1 writes it anew instead."""
    if os.environ.get("CCMON_WRITE_GENERATED") == "1":
        path.write_text(path.read_text().replace(actual, expected) if actual else expected)
        actual = expected
    assert actual == expected, f"{path.name} is not what SETTINGS makes; see the comment above EXAMPLE_HEAD"


def test_config_example_is_generated_from_the_settings():
    path = ROOT / "config.toml.example"
    generated(path, example_config_text(), path.read_text())


def test_docs_settings_table_is_generated_from_the_settings():
    path = ROOT / "docs" / "configuration.md"
    text = path.read_text()
    begin, end = text.index(DOCS_TABLE_BEGIN), text.index(DOCS_TABLE_END) + len(DOCS_TABLE_END)
    generated(path, docs_settings_table(), text[begin:end])


def test_a_setting_is_declared_once():
    """Every Config field but the few made of several settings is one setting's; every setting is a flag of
    ccmon and of each command that reads its scope, and nowhere else."""
    derived = {"server_tls", "monitor_tls", "source", "monitor_server_given", "pricing",
               "figure_settings", "server_flags"}
    fields = {field.name for field in dataclasses.fields(ccmon.Config)}
    assert fields - derived == {s.field for s in ccmon.SETTINGS if s.field}
    assert set(ccmon.COMMAND_SCOPES) == set(ccmon.COMMAND_PARSERS)
    for command, scopes in [("", tuple(ccmon.SCOPES)), *ccmon.COMMAND_SCOPES.items()]:
        parser = ccmon.COMMAND_PARSERS[command]() if command else ccmon.build_parser()
        flags = set(parser._option_string_actions)
        for setting in ccmon.SETTINGS:
            assert (set(setting.options) <= flags) == (setting.scope in scopes), (command, setting.key)


@pytest.mark.parametrize("command,shown,hidden", [
    ("import", ["--since", "--follow", "--monitor-server", "--monitor-token", "--monitor-tls-ca",
                "--monitor-timezone", "--config"], ["--server-tls-client-ca", "--database-path", "--block",
                                                    "--monitor-refresh-interval", "--alert"]),
    ("statusline", ["--format", "--monitor-server", "--monitor-token", "--claude-plan", "--block"],
     ["--server-tls-cert", "--server-retention", "--alert", "--monitor-refresh-interval"]),
    ("report", ["--since", "--csv", "--monitor-server", "--block", "--monitor-timezone"],
     ["--server-address", "--server-max-message-size", "--monitor-alert-command"]),
    ("doctor", ["--json", "--monitor-server", "--monitor-token", "--monitor-autostart", "--config"],
     ["--server-address", "--database-path", "--block", "--monitor-refresh-interval"]),
])
def test_each_command_shows_the_options_it_uses(command, shown, hidden, capsys):
    with pytest.raises(SystemExit):
        ccmon.main([command, "--help"])
    out = capsys.readouterr().out
    for flag in shown:
        assert f"{flag} " in out or f"{flag}," in out, flag
    for flag in hidden:
        assert flag not in out, flag


def test_ccmons_help_groups_options_by_mode(capsys):
    with pytest.raises(SystemExit):
        ccmon.main(["--help"])
    out = capsys.readouterr().out
    groups = [group.title for group in ccmon.build_parser()._action_groups if group._group_actions]
    assert all(f"\n{title}:\n" in out for title in groups)
    assert groups == ["options", "modes (none: the monitor)", ccmon.SCOPES["server"], ccmon.SCOPES["connection"],
                      ccmon.SCOPES["time"], ccmon.SCOPES["monitor"], ccmon.SCOPES["limits"]]
    server_part = out.split(ccmon.SCOPES["server"] + ":")[1].split(ccmon.SCOPES["connection"] + ":")[0]
    assert "--server-tls-client-ca" in server_part and "--monitor-server" not in server_part


def test_example_config_is_valid_and_shows_the_defaults(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text((ROOT / "config.toml.example").read_text())
    example = config_for(tmp_path, monkeypatch)
    (tmp_path / "config.toml").unlink()
    assert dataclasses.replace(example, source="defaults", monitor_server_given=False) == config_for(tmp_path, monkeypatch)


@pytest.mark.parametrize("args,env,message", [
    (["--server-token", ""], {}, "--server-token: the token is empty; give a token, or leave --server-token out "
                                 "for none"),
    (["--monitor-token", ""], {}, "--monitor-token: the token is empty; give a token, or leave --monitor-token out "
                                  "for none"),
    ([], {"CCMON_TOKEN": ""}, "CCMON_TOKEN: the token is empty; give a token, or unset CCMON_TOKEN for none"),
    (["--monitor-token", "m"], {"CCMON_TOKEN": ""},  # the server's token still comes from the variable
     "CCMON_TOKEN: the token is empty; give a token, or unset CCMON_TOKEN for none"),
    ([], {"CCMON_TOKEN": "t\u00f6ken"}, "CCMON_TOKEN: " + TOKEN_RULE),
    (["--monitor-token", "a\x07b"], {}, "--monitor-token: " + TOKEN_RULE),
])
def test_an_empty_token_given_on_the_command_line_or_environment_is_a_config_error(args, env, message, tmp_path,
                                                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CCMON_TOKEN", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = run_main(["--format", "@daily_cost", "--monitor-server", "127.0.0.1:9", *args], capsys)
    assert (code, err) == (2, f"ccmon: config error: {message}\n")


def test_an_empty_token_in_a_config_file_means_none(tmp_path, monkeypatch):
    monkeypatch.delenv("CCMON_TOKEN", raising=False)
    (tmp_path / "config.toml").write_text('[server]\ntoken = ""\n[monitor]\ntoken = ""\n')
    config = config_for(tmp_path, monkeypatch)
    assert (config.server_token, config.monitor_token) == ("", "")


def test_tls_files_that_cannot_work_are_config_errors(tmp_path, monkeypatch):
    cert, key = make_certificate(tmp_path, "server")
    other_cert, other_key = make_certificate(tmp_path, "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    locked = tmp_path / "locked.pem"
    locked.write_bytes(cert.read_bytes())
    locked.chmod(0)
    encrypted = tmp_path / "encrypted-key.pem"
    subprocess.run(["openssl", "ec", "-in", str(key), "-aes256", "-passout", "pass:x", "-out", str(encrypted)],
                   check=True, capture_output=True)
    pair = ["--server-tls-cert", str(cert), "--server-tls-key", str(key)]
    cases = [
        (["--server-tls-cert", str(cert), "--server-tls-key", str(other_key)],
         f"--server-tls-key: {other_key} does not match the certificate in {cert}"),
        (["--server-tls-cert", str(junk), "--server-tls-key", str(key)],
         f"--server-tls-cert: {junk} holds no PEM certificate"),
        (["--server-tls-cert", str(key), "--server-tls-key", str(key)],
         f"--server-tls-cert: {key} holds no PEM certificate"),
        (["--server-tls-cert", str(cert), "--server-tls-key", str(junk)],
         f"--server-tls-key: {junk} holds no unencrypted PEM private key"),
        (["--server-tls-cert", str(cert), "--server-tls-key", str(encrypted)],
         f"--server-tls-key: {encrypted} holds no unencrypted PEM private key"),
        ([*pair, "--server-tls-client-ca", str(junk)], f"--server-tls-client-ca: {junk} holds no PEM certificate"),
        (["--monitor-tls-ca", str(other_key)], f"--monitor-tls-ca: {other_key} holds no PEM certificate"),
        (["--monitor-tls-cert", str(other_cert), "--monitor-tls-key", str(key)],
         f"--monitor-tls-key: {key} does not match the certificate in {other_cert}"),
    ]
    if os.geteuid() != 0:  # root reads any file
        cases.append((["--server-tls-cert", str(locked), "--server-tls-key", str(key)],
                      f"--server-tls-cert: cannot read {locked}: Permission denied"))
    for args, message in cases:
        with pytest.raises(ccmon.ConfigError) as err:
            config_for(tmp_path, monkeypatch, args)
        assert str(err.value) == message
    assert config_for(tmp_path, monkeypatch, pair).server_tls == ccmon.TLSFiles(cert, key)
    # End to end: a mismatched pair is a config error, not "the port is in use".
    result = run_ccmon(["--server", "--server-address", "127.0.0.1:0", "--server-http-address", "off",
                        "--database-path", str(tmp_path / "tls.db"), "--server-tls-cert", str(cert),
                        "--server-tls-key", str(other_key)], tmp_path, timeout=20)
    assert (result.returncode, result.stderr) == \
        (2, f"ccmon: config error: --server-tls-key: {other_key} does not match the certificate in {cert}\n")


LIMIT_CONFIG_ERRORS = [
    ("[claude]\nblock = \"dawn\"\n", "claude.block: invalid block start 'dawn' (use auto, or an hour from 1 to 12 "
                                     "followed by am or pm, such as 5am or 11pm)"),
    ("[claude]\nweekly_max_tokens = -3\n", "claude.weekly_max_tokens: invalid token limit -3 (use a whole number >= "
                                           "0; 0 means none)"),
    ("[monitor]\nalert_percent = [80, 120]\n", "monitor.alert_percent: invalid alert threshold 120 (use "
                                               "whole percentages from 1 to 100, such as 80)"),
    ("[monitor]\nalert_command = 5\n", "monitor.alert_command: expected a shell command as a string"),
]


@pytest.mark.parametrize("content,message", LIMIT_CONFIG_ERRORS)
def test_limit_config_errors(content, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "config.toml").write_text(content)
    code, err = run_main(["--server"], capsys)
    assert (code, err) == (2, f"ccmon: config error: {tmp_path / 'config.toml'}: {message}\n")


def test_limit_config_values(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text('[claude]\nblock = "auto"\nmax_tokens = "auto"\nweekly_max_tokens = 9\n'
                                          '[monitor]\nalert_percent = 75\nalert_command = "notify-send ccmon"\n')
    config = config_for(tmp_path, monkeypatch)
    assert (config.block_mode, config.max_tokens, config.weekly_max_tokens, config.alert_percents,
            config.alert_command) == ("auto", "auto", 9, (75,), "notify-send ccmon")
    config = config_for(tmp_path, monkeypatch, ["-b", "11pm", "--alert", "80", "--alert", "95%"])
    assert (config.block_mode, config.alert_percents) == (23, (80, 95))


# ---------------------------------------------------------------- storage: schema, upgrades, the writer, a database that changes or breaks, files

def test_restart_keeps_data_and_sigterm_is_graceful(tmp_path):
    srv = ServerProcess(tmp_path).start()
    sdk_export(srv.port, MIXED_EVENTS)
    assert srv.stop(signal.SIGTERM) == 0
    assert "stopped; database closed" in srv.log
    srv.start()
    try:
        assert stats(srv).total_requests == 3
        assert stats(srv).total_cost.amount == 0.143075
    finally:
        srv.stop()


def test_a_stopped_server_leaves_its_database_in_one_file(tmp_path):
    """Once queried over gRPC and HTTP (each answer on a reader connection of its own thread), a server stopped by
    SIGTERM closes every connection, the writer's last: SQLite copies the -wal into the database and removes the
    -wal and -shm files."""
    srv = ServerProcess(tmp_path).start()
    sdk_export(srv.port, MIXED_EVENTS)
    assert stats(srv).total_requests == 3
    response, data = web(srv.http_port, "/metrics")
    assert response.status == 200 and b"ccmon_requests_total" in data
    assert srv.stop(signal.SIGTERM) == 0
    assert "stopped; database closed" in srv.log
    assert sorted(path.name for path in tmp_path.glob("ccmon.db*")) == ["ccmon.db"]
    assert db_rows(srv.db, "SELECT COUNT(*) FROM requests") == [(3,)]


def test_a_query_under_way_when_the_reader_closes_finishes_and_then_closes_its_connection(tmp_path):
    """At the stop, a query may still be running on its thread's connection (an RPC past gRPC's grace): closing the
    connection under it would crash the process (Python's sqlite3 reads the closed handle once the step returns).
    Reader.close() leaves that connection to the query, which answers and closes it; the idle ones it closes."""
    db = tmp_path / "closing.db"
    store = ccmon.Writer(db)
    assert store.write(one_request_batch(1)) == (1, 0)
    reader = ccmon.Reader(db)
    idle = reader._reader()  # the main thread's, no query on it
    inside, closed, answers = threading.Event(), threading.Event(), []

    def query():
        conn = reader._reader()

        def pause() -> int:  # SQLite calls it within the query's steps
            conn.set_progress_handler(None, 1)
            inside.set()
            closed.wait(30)
            return 0
        conn.set_progress_handler(pause, 1)
        answers.append(reader.totals().requests)
        answers.append(conn)

    thread = threading.Thread(target=query)
    thread.start()
    try:
        assert inside.wait(30)
        reader.close()
        with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
            idle.execute("SELECT 1")
    finally:
        closed.set()
        thread.join(30)
    assert answers[0] == 1
    with pytest.raises(sqlite3.ProgrammingError, match="closed database"):
        answers[1].execute("SELECT 1")
    with pytest.raises(sqlite3.ProgrammingError, match="the server is stopping"):
        reader.totals()
    store.close()
    assert sorted(path.name for path in tmp_path.glob("closing.db*")) == ["closing.db"]


def decoder_pids(srv: ServerProcess) -> list[int]:
    """The server's child processes: its decoders."""
    return [int(pid) for pid in Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()]


def has_ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


def test_a_decoder_that_dies_costs_no_record(tmp_path):
    """Exports are decoded in processes of their own, one per core (at most 4). When they die (killed, out of
    memory), the server decodes exports itself: every record is still stored, once, and the log says so."""
    srv = ServerProcess(tmp_path).start()
    try:
        decoders = decoder_pids(srv)
        assert len(decoders) == ccmon.DECODERS == min(4, os.cpu_count())
        stub, when = srv.logs_stub(), hours_ago(1)
        stub.Export(logs_request([("api_request", api_request(0, when, input_tokens=1))]))
        for pid in decoders:
            os.kill(pid, signal.SIGKILL)
        for seq in range(1, 6):
            stub.Export(logs_request([("api_request", api_request(seq, when, input_tokens=10))]))
        stub.Export(logs_request([("api_request", api_request(5, when, input_tokens=10))]))  # a resend
        assert stats(srv).total_tokens.input == 51
        assert decoder_pids(srv) == []
        for pid in decoders:
            assert f"a decoder process (pid {pid}) ended (killed by SIGKILL)" in srv.log
        assert srv.log.count("exports are decoded in the server from now on") == 1
    finally:
        srv.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_decoders_end_with_the_server(tmp_path, sig):
    srv = ServerProcess(tmp_path).start()
    decoders = decoder_pids(srv)
    assert decoders
    srv.stop(sig)
    wait_until(lambda: all(has_ended(pid) for pid in decoders), "the decoders to end", 10, interval=0.05)


@pytest.mark.parametrize("service", ["logs.v1.LogsService", "metrics.v1.MetricsService"])
def test_a_grpc_export_that_is_not_protobuf_is_refused(server, service):
    export = grpc.insecure_channel(server.target).unary_unary(
        f"/opentelemetry.proto.collector.{service}/Export", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as refused:
        export(b"\x0a\xff\xff\xff", timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("not valid OTLP protobuf: Error parsing message")
    assert stats(server).total_requests == 0


def test_kill_9_loses_no_acknowledged_record(tmp_path):
    srv = ServerProcess(tmp_path).start()
    stub = srv.logs_stub()
    for batch in range(20):
        events = [("api_request", api_request(batch * 50 + i, "2026-05-01T00:00:00Z", input_tokens=1))
                  for i in range(50)]
        stub.Export(logs_request(events))  # returns only after the commit
    srv.stop(signal.SIGKILL)
    assert db_rows(srv.db, "PRAGMA integrity_check") == [("ok",)]
    srv.start()
    try:
        assert stats(srv).total_tokens.input == 1000
    finally:
        srv.stop()


def test_retention_sweep_deletes_old_rows_at_start(tmp_path):
    srv = ServerProcess(tmp_path).start()
    events = [("api_request", api_request(1, hours_ago(24 * 10), input_tokens=100)),
              ("api_request", api_request(2, hours_ago(24 * 8), input_tokens=200)),
              ("api_request", api_request(3, hours_ago(24 * 6), input_tokens=400)),
              ("tool_result", {"session.id": "sess-1", "event.sequence": 4, "event.timestamp": hours_ago(200)}),
              ("tool_result", {"session.id": "sess-1", "event.sequence": 5, "event.timestamp": hours_ago(1)})]
    sdk_export(srv.port, events)
    srv.stop()
    srv.args += ["--server-retention", "7d"]
    srv.start()
    try:
        wait_until(lambda: "retention: deleted" in srv.log, "the retention sweep", 10)
        assert "retention: deleted 3 rows older than" in srv.log
        s = stats(srv)
        assert (s.total_requests, s.total_tokens.input) == (1, 400)
        assert db_rows(srv.db, "SELECT SUM(requests), SUM(input_tokens) FROM usage_rollup") == [(1, 400)]
        assert db_rows(srv.db, "SELECT COUNT(*) FROM events") == [(1,)]
    finally:
        srv.stop()


def test_port_in_use_and_foreign_database_are_refused(server, tmp_path):
    second = subprocess.run([sys.executable, str(ROOT / "ccmon.py"), "--server", "--server-address",
                             server.target, "--server-http-address", "off", "--database-path",
                             str(tmp_path / "other.db")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert second.stderr == (f"ccmon: cannot listen on {server.target}: the port is in use or the address is not "
                             "on this machine (set --server-address)\n")  # and no line of gRPC's own
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    for path, message in ((foreign, "is an SQLite database of something else"),
                          (garbage, "is not an SQLite database")):
        result = subprocess.run([sys.executable, str(ROOT / "ccmon.py"), "-s", "--server-address",
                                 "127.0.0.1:0", "--server-http-address", "off", "--database-path", str(path)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        assert message in result.stderr and str(path) in result.stderr
    assert garbage.read_bytes() == b"this is not a database" * 100


def test_locked_database_answers_retry_and_recovers(server):
    blocker = sqlite3.connect(server.db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(grpc.RpcError) as err:
            server.logs_stub().Export(logs_request(MIXED_EVENTS))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details().startswith("ccmon cannot store data right now (database write failed: ")
        details = dict(err.value.trailing_metadata())["grpc-status-details-bin"]
        status = ccmon_pb2.RpcStatus.FromString(details)
        assert status.details[0].type_url == "type.googleapis.com/google.rpc.RetryInfo"
        assert ccmon_pb2.RetryInfo.FromString(status.details[0].value).retry_delay.seconds == 5
        response, data = http_post(server.http_port, body=logs_request(MIXED_EVENTS).SerializeToString())
        assert (response.status, response.getheader("Retry-After")) == (503, "5")
        assert status_of(data)[0] == 14
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert not server.logs_stub().Export(logs_request(MIXED_EVENTS)).HasField("partial_success")
    assert stats(server).total_requests == 3
    assert server.log.count("cannot write to the database") == 1
    assert "is writable again" in server.log


def test_second_server_on_the_same_database_refuses(server, tmp_path):
    result = run_ccmon(["--server", "--server-address", "127.0.0.1:0", "--server-http-address", "127.0.0.1:0",
                        "--database-path", str(server.db)], tmp_path)
    assert result.returncode == 1
    assert result.stderr == (f"ccmon: another ccmon server (pid {server.proc.pid}) is already using {server.db}; "
                             "stop it or choose another --database-path\n")
    taken = run_ccmon(["--server", "--server-address", "127.0.0.1:0", "--server-http-address",
                       f"127.0.0.1:{server.http_port}", "--database-path", str(tmp_path / "other.db")], tmp_path)
    assert taken.returncode == 1
    assert taken.stderr == (f"ccmon: cannot listen on 127.0.0.1:{server.http_port}: Address already in use "
                            "(set --server-http-address, or 'off')\n")


def test_kill_9_during_sustained_ingestion(tmp_path):
    """Kill the server at random moments while exporters keep sending; every acknowledged record survives."""
    srv = ServerProcess(tmp_path).start()
    acknowledged: set[int] = set()
    rng = random.Random(7)
    next_seq, seq_lock = 0, threading.Lock()
    for round_number in range(3):
        stop = threading.Event()
        before = len(acknowledged)

        def send(port=srv.port):
            nonlocal next_seq
            stub = logs_service_pb2_grpc.LogsServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            while not stop.is_set():
                with seq_lock:  # three senders: each batch its own sequence numbers
                    seqs = list(range(next_seq, next_seq + 100))
                    next_seq += 100
                events = [("api_request", api_request(seq, "2026-06-01T00:00:00Z", input_tokens=1)) for seq in seqs]
                try:
                    stub.Export(logs_request(events), timeout=5)
                except grpc.RpcError:
                    return
                acknowledged.update(seqs)

        senders = [threading.Thread(target=send) for _ in range(3)]
        for sender in senders:
            sender.start()
        # The kill lands in sustained ingestion: once 300 records of this round were acknowledged, then at a random
        # moment (the sleep picks the moment; it waits for nothing).
        wait_until(lambda: len(acknowledged) >= before + 300, "300 acknowledged records", 60, interval=0.02)
        time.sleep(rng.uniform(0, 0.9))
        srv.proc.kill()
        srv.proc.wait()
        stop.set()
        for sender in senders:
            sender.join()
        assert len(acknowledged) >= before + 300  # so the checks below are about acknowledged records
        assert db_rows(srv.db, "PRAGMA integrity_check") == [("ok",)]
        srv.start()
        stored = db_rows(srv.db, "SELECT seq, COUNT(*) FROM requests GROUP BY seq")
        stored_seqs = {seq for seq, _ in stored}
        print(f"round {round_number}: {len(acknowledged)} acknowledged, {len(stored_seqs)} stored")
        assert all(count == 1 for _, count in stored)
        assert acknowledged <= stored_seqs
        assert stats(srv).total_tokens.input == len(stored_seqs)
    srv.stop()


def writer_and_reader(db: Path, monkeypatch, staged_from: int | None = None) -> tuple[ccmon.Writer, ccmon.Reader]:
    """A Writer and a Reader it catches up. With `staged_from`, a batch of that many of Claude Code's api_request
    events or more waits in the log, whatever its span, until the next job or read (see STAGE_MIN_REQUESTS)."""
    if staged_from is not None:
        monkeypatch.setattr(ccmon, "STAGE_MIN_REQUESTS", staged_from)
        monkeypatch.setattr(ccmon, "STAGE_MIN_SPAN_MS", 0)
        monkeypatch.setattr(ccmon, "APPLY_IDLE_S", 3600)
    store = ccmon.Writer(db)
    return store, ccmon.Reader(db, catch_up=store.catch_up)


@pytest.mark.parametrize("staged", [False, True])
def test_rollups_always_agree_with_raw_rows(tmp_path, monkeypatch, staged):
    """Random inserts (with duplicates) and retention sweeps; every period, in any timezone, answered from the
    rollups equals the brute-force sum over the raw rows. Staged: a batch of Claude Code's api_request events waits
    in the log from 4 requests on, and is applied only before another job or a read (see
    STAGE_MIN_REQUESTS): with the other batches, metric-derived rows among them, and the sweeps in between."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    store, reader = writer_and_reader(tmp_path / "rollups.db", monkeypatch, 4 if staged else None)
    base = ccmon.parse_iso_ms("2026-03-01T00:00:00Z")
    span = 40 * 86400_000
    moments = st.integers(min_value=base - 86400_000, max_value=base + span)
    row = st.tuples(moments, st.sampled_from(["s1", "s2", ""]), st.integers(min_value=0, max_value=50),
                    st.sampled_from(["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"]),
                    st.sampled_from(["ana@example.com", "bo@example.com", ""]),
                    *[st.integers(min_value=0, max_value=10 ** 6)] * 6,
                    st.one_of(st.none(), st.integers(min_value=0, max_value=5000)),  # ttft_ms
                    st.none(), st.sampled_from([None, None, "req_1", "req_3"]), st.none(), st.none(),  # ..., request_id
                    st.sampled_from([0, 0, 1, 2, 3, 4, 5]),  # origin
                    st.sampled_from(["claude-code", "claude-code", "codex"]))  # agent
    api_request = row.map(lambda r: (*r[:12], "prompt", f"req_{r[2]}" if r[2] % 2 else None, None, None, 0,
                                     "claude-code"))
    operation = st.one_of(st.tuples(st.just("insert"), st.lists(row, min_size=1, max_size=30)),
                          st.tuples(st.just("insert"), st.lists(api_request, min_size=1, max_size=30)),
                          st.tuples(st.just("sweep"), moments))
    zones = st.sampled_from(["UTC", "Europe/Berlin", "Asia/Kolkata", "America/St_Johns", "Australia/Lord_Howe"])

    def brute_force(start, end, by="model_name", user=None):
        rows = db_rows(store.path, f"SELECT {by}, SUM(origin IN (0, 2, 3, 4)), SUM(input_tokens), SUM(output_tokens), "
                                   "SUM(cache_read_tokens), SUM(cache_creation_tokens), SUM(cost_nanos), "
                                   "SUM(duration_ms), SUM(COALESCE(ttft_ms, 0)), COUNT(ttft_ms) FROM r "
                                   "WHERE ts >= ? AND ts < ? AND user_name = COALESCE(?, user_name) GROUP BY 1",
                       (start, end, user))
        return {key: ccmon.Usage(*figures) for key, *figures in rows}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(operation, min_size=1, max_size=6), st.lists(st.tuples(moments, moments), max_size=6), zones)
    def check(operations, periods, zone_name):
        for kind, payload in operations:
            if kind == "insert":
                store.write(ccmon.Batch(requests=list(payload) * 2))  # every row twice: de-duplicated
            else:
                store.sweep(payload)
        store.catch_up()  # for brute_force, which reads the file
        for start, end in periods:
            lo, hi = min(start, end), max(start, end)
            assert reader.usage(lo, hi) == brute_force(lo, hi)
            assert reader.usage(lo, hi, by="user") == brute_force(lo, hi, by="user_name")
            assert reader.usage(lo, hi, user="ana@example.com") == brute_force(lo, hi, user="ana@example.com")
        zone = ccmon.ZoneInfo(zone_name)
        for _, lo, hi in ccmon.day_bounds(zone, base + span, 42)[::7]:
            assert reader.usage(lo, hi) == brute_force(lo, hi)
        assert reader.usage(0, base + 2 * span) == brute_force(0, base + 2 * span)
        for bucket, (lo, hi) in [("hour", (base + span // 2, base + span // 2 + 86400_000)),
                                 ("week", (base - 86400_000, base + span)), *(("day", sorted(p)) for p in periods[:1])]:
            starts = ccmon.bucket_starts(zone, bucket, lo, hi, 1000)  # everyone's (totals) and one user's (by user)
            for user in (None, "bo@example.com"):
                assert {(point.start_ms, point.group): point.split.total
                        for point in reader.series(starts, lo, hi, "model", user)} == \
                    {(start, model): usage for start, end in zip(starts, starts[1:])
                     for model, usage in brute_force(max(start, lo), min(end, hi), user=user).items()
                     if usage != ccmon.Usage()}
        for table, bucket in (("total_hourly", ccmon.HOUR_MS), ("total_daily", ccmon.DAY_MS)):
            assert db_rows(store.path, f"SELECT bucket, model, {ccmon.USAGE_SUMS} FROM {table} GROUP BY 1, 2") == \
                db_rows(store.path, f"SELECT ts - ts % {bucket}, model, {ccmon.RAW_SUMS} FROM requests GROUP BY 1, 2")

    check()
    assert db_rows(store.path, "SELECT COUNT(*) FROM usage_rollup WHERE rows <= 0") == [(0,)]
    assert db_rows(store.path, "SELECT COUNT(*) FROM total_hourly WHERE rows <= 0") == [(0,)]
    store.close()


def test_block_chains_and_edges(tmp_path):
    store, reader = ccmon.Writer(tmp_path / "chain.db"), ccmon.Reader(tmp_path / "chain.db")
    base = ccmon.parse_iso_ms("2026-06-01T00:05:00Z")
    # One request every 40 minutes for 80 hours: never a pause of 5 hours.
    rows = [(base + i * 40 * 60_000, "s", i, "claude-sonnet-4-5", "", 100, 0, 0, 0, 0, 0, None, None, None, None,
             None, 0, "claude-code") for i in range(120)]
    store.write(ccmon.Batch(requests=rows))
    for hours in (30.5, 60.33, 61.0, 61.33, 63.0, 63.33):
        now = base + int(hours * 3600_000)
        near = reader.blocks(now - ccmon.DAY_MS, now)[-1]
        far = reader.blocks(now - 30 * ccmon.DAY_MS, now)[-1]
        assert (near.start_ms, near.end_ms) == (far.start_ms, far.end_ms)
        assert (near.start_ms - ccmon.parse_iso_ms("2026-06-01T00:00:00Z")) % ccmon.BLOCK_MS == 0
    store.close()
    # No usage yet in a new block but a fast recent pace: the limit is near, not "within limit".
    status = ccmon.BlockStatus(0, ccmon.BLOCK_MS, 60_000, used=0, limit=35_000, recent_rate=3_000.0)
    assert status.limit_reached_ms() == 60_000 + int(35_000 / 3_000 * 60_000)
    assert ccmon.block_window(None, 0, BERLIN, [(0, ccmon.BLOCK_MS)]) is None


def test_which_origin_replaces_which():
    event, metrics, transcript, transcript_cost, agent_event, agent_metrics = origins = (
        ccmon.ORIGIN_EVENT, ccmon.ORIGIN_METRICS, ccmon.ORIGIN_TRANSCRIPT, ccmon.ORIGIN_TRANSCRIPT_COST,
        ccmon.ORIGIN_EVENT_ESTIMATED, ccmon.ORIGIN_METRICS_ESTIMATED)
    assert origins == (0, 1, 2, 3, 4, 5)  # stored in requests.origin
    lower = {metrics, transcript, transcript_cost, agent_metrics}
    assert {origin: ccmon.replaced_by(origin) for origin in ccmon.ORIGIN_RULES} == {
        event: lower, metrics: set(), transcript: {metrics, agent_metrics},
        transcript_cost: {metrics, agent_metrics}, agent_event: lower, agent_metrics: set()}
    assert ccmon.REQUEST_ORIGINS == {event, transcript, transcript_cost, agent_event}
    assert ccmon.TRANSCRIPT_ORIGINS == {transcript, transcript_cost}
    assert ccmon.EVENT_ORIGINS == {event, agent_event}
    assert min(ccmon.TRANSCRIPT_ORIGINS) == transcript  # a session's lowest imported origin: whether ccmon priced any
    assert [ccmon.origin_in(chosen) for chosen in ({metrics}, {event, transcript, transcript_cost, agent_event},
                                                   {transcript, transcript_cost}, {event, transcript},
                                                   {agent_event, agent_metrics}, {metrics, agent_metrics})] == \
        ["origin = 1", "origin IN (0, 2, 3, 4)", "origin IN (2, 3)", "origin IN (0, 2)", "origin >= 4",
         "origin IN (1, 5)"]
    assert ccmon.origin_in(iter([event, transcript, transcript_cost, agent_event]), "r.origin") == \
        "r.origin IN (0, 2, 3, 4)"


def test_the_schema_selects_origins_as_the_policy_renders_them(tmp_path):
    """The partial indexes, written by migrations, select origins with the SQL the policy
    renders (SQLite uses a partial index only for a query stating its condition): a policy change that alters
    it needs a migration recreating them."""
    conn = ccmon.open_database(tmp_path / "ccmon.db")
    schema = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE tbl_name = 'requests'"))
    from_metrics = ccmon.origin_in(ccmon.replaced_by(ccmon.ORIGIN_EVENT) - ccmon.REQUEST_ORIGINS)
    transcripts = ccmon.origin_in(ccmon.TRANSCRIPT_ORIGINS)
    assert schema["requests_from_metrics"].endswith(f" WHERE {from_metrics}")
    assert schema["requests_imported"].endswith(f" WHERE {transcripts}")
    assert schema["requests_imported_request"].endswith(f" WHERE {transcripts}")
    assert schema["requests_estimated"].endswith(f" WHERE {ccmon.origin_in(ccmon.AGENT_ESTIMATED_ORIGINS)}")
    assert not [name for name in schema if name.endswith(("_insert", "_delete"))]  # the writer sums (version 14)

    def plan(sql: str) -> str:
        return " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))

    assert "requests_from_metrics" in plan(f"DELETE FROM requests WHERE session = 1 AND {from_metrics}")
    assert "requests_imported_request" in plan(f"DELETE FROM requests WHERE request_id = 'r' AND {transcripts}")
    assert "requests_imported" in plan(f"SELECT session, MIN(origin) FROM requests WHERE {transcripts} "
                                       "AND session IN (1, 2) GROUP BY session")
    estimated = ccmon.origin_in(ccmon.AGENT_ESTIMATED_ORIGINS, "r.origin")
    assert "requests_estimated" in plan(f"SELECT EXISTS (SELECT 1 FROM requests r WHERE r.session = 1 AND {estimated})")
    conn.close()


V1 = ROOT / "fixtures" / "v1"


def v1_answers(srv: ServerProcess) -> dict:
    """What `srv` answers to the queries fixtures/make_v1_database.py asked the schema-1 release."""
    sys.path.insert(0, str(ROOT / "fixtures"))
    from make_v1_database import queries
    from google.protobuf import json_format
    stub = srv.query()
    return {name: json_format.MessageToDict(getattr(stub, method)(request))
            for name, (method, request) in queries().items()}


def test_a_version_1_database_is_upgraded_with_a_backup_and_identical_figures(tmp_path):
    db = tmp_path / "ccmon.db"
    shutil.copyfile(V1 / "ccmon.db", db)
    srv = ServerProcess(tmp_path, db=db).start()
    try:
        backup = tmp_path / "ccmon.db.v1.bak"
        assert f"upgrading {db} from schema 1 to {ccmon.SCHEMA_VERSION}; a copy of the old database is at " \
               f"{backup}" in srv.log
        old, new = json.loads((V1 / "answers.json").read_text()), v1_answers(srv)
        # Asked without oldest_first, GetAPIRequests now answers the same page in the Go ccmon's order, oldest first.
        new["requests"]["requests"].reverse()
        # schema 8 names each request's and session's agent (a field schema 1 did not have): all Claude Code's
        named = [*new["requests"]["requests"], *new["sessions"]["sessions"], *new["models"]["models"],
                 *(entry["request"] for entry in new["timeline"]["entries"] if "request" in entry)]
        assert {item.pop("agent") for item in named} == {"claude-code"}
        # Every figure is what schema 1 answered; only s-cy-1's user is now the email its resource gave
        # instead of the hashed user.id (schema 3 names users readably).
        assert {k: v for k, v in new.items() if k not in ("sessions", "users")} == \
            {k: v for k, v in old.items() if k not in ("sessions", "users")}
        renamed = [s for s in new["sessions"]["sessions"] if s["sessionId"] == "s-cy-1"]
        assert renamed[0]["user"] == "cy@example.com"
        renamed[0]["user"] = "u" * 64
        # schema 5 says where each session's usage comes from (a field schema 1 did not have)
        sources = {s["sessionId"]: s.pop("source") for s in new["sessions"]["sessions"]}
        assert sources == {s["sessionId"]: "metrics" if s.get("fromMetrics") else "events"
                           for s in old["sessions"]["sessions"]}
        assert new["sessions"] == old["sessions"]
        users = {u["user"]: u for u in new["users"]["users"]}
        assert users["cy@example.com"]["stats"]["totalCost"] == {"amount": 0.02}
        assert users["u" * 64]["stats"]["totalCost"] == {"amount": 0.143075}
        assert sorted(users) == sorted({u["user"] for u in old["users"]["users"]} | {"cy@example.com"})
        assert db_rows(db, "PRAGMA user_version") == [(ccmon.SCHEMA_VERSION,)]
        assert db_rows(db, "SELECT name FROM sqlite_master WHERE name LIKE 'requests_%request%' ORDER BY 1") == \
            [("requests_imported_request",)]
        assert db_rows(db, "SELECT a.name, COUNT(*) FROM requests r JOIN agents a ON a.id = r.agent GROUP BY 1") == \
            [("claude-code", db_rows(db, "SELECT COUNT(*) FROM requests")[0][0])]
        with sqlite3.connect(backup) as copy:  # the backup is the old database, whole
            assert copy.execute("PRAGMA user_version").fetchone() == (1,)
            assert copy.execute("SELECT COUNT(*), SUM(cost_nanos) FROM requests").fetchone() == \
                db_rows(db, "SELECT COUNT(*), SUM(cost_nanos) FROM requests")[0]
        copy.close()
        assert backup.stat().st_mode & 0o777 == 0o600
        sdk_export(srv.port, [("api_request", api_request(1, hours_ago(1), session="after-upgrade",
                                                          input_tokens=7, cost_usd=0.5))])
        assert stats(srv, start=hours_ago(2)).total_tokens.input == 7
        assert stats(srv).total_tokens.input == 3657 + 7
    finally:
        srv.stop()
    srv.start()  # a second start finds the current schema: no second upgrade
    srv.stop()
    assert "upgrading" not in srv.log


def v1_database_at(folder: Path, version: int) -> Path:
    """The schema-1 fixture database taken to `version` by the migrations, as the release of that version left it."""
    db = folder / "ccmon.db"
    shutil.copyfile(V1 / "ccmon.db", db)
    with sqlite3.connect(db, isolation_level=None) as conn:
        for to, migration in enumerate(ccmon.MIGRATIONS[:version - 1], 2):
            conn.execute("BEGIN")
            migration(conn)
            conn.execute(f"PRAGMA user_version = {to}")
            conn.execute("COMMIT")
    conn.close()
    return db


def test_a_version_9_database_is_upgraded_with_a_backup_its_readings_claudes(tmp_path):
    """Schema 10 names whose limits a reading reads: every reading stored before is Claude's (its status line's),
    and still answers Claude's limits; Codex's are stored apart."""
    db = v1_database_at(tmp_path, 9)
    now = ccmon.now_ms()
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("INSERT INTO sessions (session_id) VALUES ('s-claude')")
        conn.execute("INSERT INTO limit_readings (ts, session, five_hour_percent, five_hour_resets) SELECT ?, id, "
                     "63.0, ? FROM sessions WHERE session_id = 's-claude'", (now - 60_000, now + 3600_000))
    conn.close()
    srv = ServerProcess(tmp_path, db=db).start()
    try:
        backup = tmp_path / "ccmon.db.v9.bak"
        assert f"upgrading {db} from schema 9 to {ccmon.SCHEMA_VERSION}; a copy of the old database is at {backup}" in srv.log
        assert db_rows(db, "SELECT a.name, lr.five_hour_percent FROM limit_readings lr JOIN agents a "
                           "ON a.id = lr.agent") == [("claude-code", 63.0)]
        answer = srv.query().GetLimits(ccmon_pb2.GetLimitsRequest())
        assert (answer.five_hour_now.session_id, answer.five_hour_now.five_hour.used_percentage, len(answer.agents)) \
            == ("s-claude", 63.0, 0)
    finally:
        srv.stop()


def test_a_failed_upgrade_leaves_the_database_untouched(tmp_path):
    db = tmp_path / "ccmon.db"
    shutil.copyfile(V1 / "ccmon.db", db)
    with sqlite3.connect(db) as conn:  # an object in the way of version 2's index: the upgrade cannot finish
        conn.execute("CREATE TABLE requests_request_id (x)")
    conn.close()
    before = db.read_bytes()
    result = run_ccmon(["--server", "--server-address", "127.0.0.1:0", "--server-http-address", "off",
                        "--database-path", str(db)], tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"ccmon: cannot upgrade {db} from schema 1 to {ccmon.SCHEMA_VERSION} (there is already a table named "
        f"requests_request_id); the database is unchanged and a copy is at {db}.v1.bak")
    assert db.read_bytes() == before
    assert db_rows(db, "PRAGMA user_version") == [(1,)]


def test_a_database_from_a_newer_ccmon_is_refused(tmp_path):
    db = tmp_path / "ccmon.db"
    shutil.copyfile(V1 / "ccmon.db", db)
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {ccmon.SCHEMA_VERSION + 1}")
    conn.close()
    result = run_ccmon(["--server", "--server-address", "127.0.0.1:0", "--database-path", str(db)], tmp_path)
    assert (result.returncode, result.stderr) == (
        1, f"ccmon: {db} was written by a newer ccmon (schema {ccmon.SCHEMA_VERSION + 1}); upgrade ccmon\n")


def test_sigterm_stops_the_server_promptly_under_load(tmp_path):
    """gRPC and HTTP exports arrive together; SIGTERM (or SIGINT) stops the server within 10 s, with every
    acknowledged record stored once."""
    srv = ServerProcess(tmp_path)
    acknowledged: set[int] = set()
    counter = iter(range(10 ** 9))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        srv.start()
        stop = threading.Event()

        def send(over_http: bool):
            stub = srv.logs_stub()
            while not stop.is_set():
                seqs = [next(counter) for _ in range(50)]
                body = logs_request([("api_request", api_request(seq, "2026-06-01T00:00:00Z", input_tokens=1))
                                     for seq in seqs])
                try:
                    if over_http:
                        response, _ = http_post(srv.http_port, body=body.SerializeToString())
                        if response.status != 200:
                            continue
                    else:
                        stub.Export(body, timeout=10)
                except (grpc.RpcError, OSError):
                    continue
                acknowledged.update(seqs)

        senders = [threading.Thread(target=send, args=(i % 2 == 0,)) for i in range(6)]
        for sender in senders:
            sender.start()
        wait_until(lambda: len(acknowledged) >= 500, "500 acknowledged records", 60, interval=0.05)
        srv.proc.send_signal(signum)
        try:
            assert srv.proc.wait(10) == 0, srv.log
        finally:
            stop.set()
            for sender in senders:
                sender.join()
        assert "stopped; database closed" in srv.log
    stored = db_rows(srv.db, "SELECT seq, COUNT(*) FROM requests GROUP BY seq")
    assert all(count == 1 for _, count in stored)
    assert acknowledged <= {seq for seq, _ in stored}


def test_deleted_database_files_stop_acknowledgements(server):
    stub = server.logs_stub()
    stub.Export(logs_request(MIXED_EVENTS))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{server.db}{suffix}").unlink()
    events = [("api_request", api_request(9, "2026-06-01T00:00:00Z", session="after-delete", input_tokens=1))]
    with pytest.raises(grpc.RpcError) as err:
        stub.Export(logs_request(events))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"{server.db} was moved or deleted" in err.value.details()
    response, data = http_post(server.http_port, body=logs_request(events).SerializeToString())
    assert (response.status, status_of(data)[0]) == (503, 14)
    assert server.log.count("THE DATABASE FILE IS GONE") == 1
    assert f"THE DATABASE FILE IS GONE: {server.db} was moved or deleted." in server.log


def test_one_server_per_database_whatever_the_path(server, tmp_path):
    hard = tmp_path / "hard.db"
    os.link(server.db, hard)
    soft = tmp_path / "soft.db"
    soft.symlink_to(server.db)
    for path in (hard, soft):
        result = run_ccmon(["--server", "--server-address", "127.0.0.1:0", "--server-http-address", "off",
                            "--database-path", str(path)], tmp_path)
        assert (result.returncode, result.stderr) == (1, f"ccmon: another ccmon server (pid {server.proc.pid}) "
                                                         f"is already using {path}; stop it or choose another "
                                                         "--database-path\n")


def zero_page(db: Path, table: str) -> None:
    """Overwrite the first page of `table`'s b-tree with zeros, as a disk or a careless tool might."""
    with sqlite3.connect(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    conn.close()
    with open(db, "r+b") as handle:
        handle.seek((page - 1) * page_size)
        handle.write(bytes(page_size))


def test_a_damaged_database_is_refused_at_start(tmp_path):
    srv = ServerProcess(tmp_path).start()
    sdk_export(srv.port, MIXED_EVENTS)
    srv.stop()
    zero_page(srv.db, "requests")
    result = run_ccmon(["--server", "--server-address", "127.0.0.1:0", "--database-path", str(srv.db)], tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"ccmon: {srv.db} is damaged (")
    assert result.stderr.endswith(f"); keep {srv.db} as it is, and restore a backup, or recover what SQLite can "
                                  f"still read with: sqlite3 {srv.db} .recover | sqlite3 recovered.db\n")
    assert len(result.stderr.splitlines()) == 1


def test_damage_found_while_running_is_answered_not_raised(server):
    server.logs_stub().Export(logs_request(MIXED_EVENTS))
    with sqlite3.connect(server.db) as conn:  # the rows move from the WAL into the main file, which then breaks
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    conn.close()
    zero_page(server.db, "usage_rollup")
    zero_page(server.db, "requests")
    with pytest.raises(grpc.RpcError) as err:
        server.logs_stub().Export(logs_request([("api_request", api_request(9, "2026-03-01T11:00:00Z"))]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as err:
            stats(server)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        assert err.value.details().startswith("the database is damaged: ")
    assert server.log.count("it is damaged: stop the server, keep") == 1
    assert server.log.count("the database is damaged (") == 1
    assert "Traceback" not in server.log


def test_a_version_12_database_gets_everyones_totals_with_a_backup(tmp_path):
    """Schema 13 keeps everyone's usage per hour and per UTC day (see total_everyone): filled from the stored rows
    at the upgrade, kept by every write after it, and the series read from them agrees with GetUsage's figures."""
    db = v1_database_at(tmp_path, 12)
    store, reader = ccmon.Writer(db), ccmon.Reader(db)
    try:
        assert (tmp_path / "ccmon.db.v12.bak").exists()
        first, last = db_rows(db, "SELECT MIN(ts), MAX(ts) FROM requests")[0]
        store.write(ccmon.Batch(requests=[(last + 3600_000, "after", 1, "claude-opus-4-1", "", 10, 0, 0, 0, 7, 0, None,
                                           None, None, None, None, 0, "claude-code")]))
        for table, bucket in (("total_hourly", ccmon.HOUR_MS), ("total_daily", ccmon.DAY_MS)):
            stored = db_rows(db, f"SELECT bucket, model, {ccmon.USAGE_SUMS} FROM {table} GROUP BY 1, 2")
            assert len(stored) > 1 and stored == \
                db_rows(db, f"SELECT ts - ts % {bucket}, model, {ccmon.RAW_SUMS} FROM requests GROUP BY 1, 2")
        start, end = first - ccmon.DAY_MS, last + 2 * ccmon.HOUR_MS
        points = reader.series(ccmon.bucket_starts(BERLIN, "day", start, end, 100), start, end)
        assert [(point.start_ms, point.split) for point in points] == \
            [(lo, reader.split(reader.usage(lo, hi))) for _, lo, hi in ccmon.day_bounds(BERLIN, end, 100)[::-1]
             if reader.usage(lo, hi)]
    finally:
        store.close()


def test_an_older_server_still_running_is_not_upgraded_under(tmp_path):
    """Releases of schema 1 locked ccmon.db.lock: while one holds it, a new server must not touch the file."""
    import fcntl
    db = tmp_path / "ccmon.db"
    shutil.copyfile(V1 / "ccmon.db", db)
    with open(tmp_path / "ccmon.db.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        result = run_ccmon(["--server", "--server-address", "127.0.0.1:0", "--database-path", str(db)], tmp_path)
        assert (result.returncode, result.stderr) == (1, f"ccmon: an older ccmon server (pid 4242) is using {db}; "
                                                         "stop it first\n")
        assert db_rows(db, "PRAGMA user_version") == [(1,)] and not (tmp_path / "ccmon.db.v1.bak").exists()
    srv = ServerProcess(tmp_path, db=db).start()  # once it has stopped, its lock file goes with the upgrade
    srv.stop()
    assert not (tmp_path / "ccmon.db.lock").exists() and db_rows(db, "PRAGMA user_version") == \
        [(ccmon.SCHEMA_VERSION,)]


def test_a_database_reached_by_a_symlink_and_one_left_unnumbered(tmp_path):
    real = tmp_path / "data" / "real.db"
    real.parent.mkdir()
    link = tmp_path / "link.db"
    link.symlink_to(real)
    srv = ServerProcess(tmp_path, db=link).start()
    try:
        srv.logs_stub().Export(logs_request(MIXED_EVENTS))
        assert stats(srv).total_requests == 3
    finally:
        srv.stop()
    # A schema-1 release stopped between creating its tables and numbering them left user_version 0.
    unnumbered = tmp_path / "unnumbered.db"
    shutil.copyfile(V1 / "ccmon.db", unnumbered)
    with sqlite3.connect(unnumbered) as conn:
        conn.execute("PRAGMA user_version = 0")
    conn.close()
    srv = ServerProcess(tmp_path, db=unnumbered).start()
    try:
        assert stats(srv).total_requests == 8
    finally:
        srv.stop()


def test_files_are_private_and_a_failed_start_leaves_none(server, tmp_path):
    server.logs_stub().Export(logs_request(MIXED_EVENTS))
    for suffix in ("", "-wal", "-shm"):
        assert Path(f"{server.db}{suffix}").stat().st_mode & 0o777 == 0o600, suffix
    fresh = tmp_path / "fresh"
    result = run_ccmon(["--server", "--server-address", server.target, "--database-path",
                        str(fresh / "ccmon.db")], tmp_path)
    assert result.returncode == 1 and "the port is in use" in result.stderr
    assert not fresh.exists()  # nor the folder it made for the database
    too_long = tmp_path / "made" / ("h" * 300) / "ccmon.db"  # a folder it cannot even look for
    result = run_ccmon(["--server", "--server-address", "127.0.0.1:0", "--database-path", str(too_long)], tmp_path)
    assert (result.returncode, result.stderr) == (1, f"ccmon: cannot use the database folder {too_long.parent}: "
                                                     "File name too long\n")
    assert not (tmp_path / "made").exists()
    made = ccmon.Writer(fresh / "ccmon.db")  # one made for a database that is kept is the owner's alone
    made.close()
    assert fresh.stat().st_mode & 0o777 == 0o700
    server.stop()
    assert sorted(p.name for p in server.db.parent.iterdir() if p.name.startswith("ccmon.db")) == ["ccmon.db"]



def test_a_database_renamed_under_the_server_keeps_every_acknowledged_row(tmp_path):
    """A query after `mv ccmon.db moved.db` neither creates a new ccmon.db nor loses the -wal: it is refused, and
    at the stop what was acknowledged is in moved.db itself. Files are private whatever the umask."""
    umask_0 = ["sh", "-c", 'umask 000 && exec "$0" "$@"', *CCMON]
    srv = ServerProcess(tmp_path, command=umask_0).start()
    try:
        events = [("api_request", api_request(seq, "2026-06-01T00:00:00Z", input_tokens=seq)) for seq in range(10)]
        srv.logs_stub().Export(logs_request(events))
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ccmon.db")) == \
            ["ccmon.db", "ccmon.db-shm", "ccmon.db-waiting-a", "ccmon.db-waiting-b", "ccmon.db-wal"]
        for path in tmp_path.glob("ccmon.db*"):
            assert path.stat().st_mode & 0o777 == 0o600, path
        srv.db.rename(tmp_path / "moved.db")
        with pytest.raises(grpc.RpcError) as refused:
            srv.query().GetStats(ccmon_pb2.GetStatsRequest())
        assert (refused.value.code(), refused.value.details()) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the database file the server writes is no longer at its path ({srv.db} was moved or deleted); stop "
            f"the server and put the file back at {srv.db}: it holds everything acknowledged")
        client = run_ccmon(["--monitor-server", srv.target, "--format", "@daily_cost"], tmp_path)
        assert client.returncode == 1 and "the server cannot answer: the database file the server writes is no " \
            "longer at its path" in client.stderr, client.stderr
        assert not srv.db.exists()
    finally:
        assert srv.stop() == 0, srv.log
    assert not srv.db.exists() and not list(tmp_path.glob("ccmon.db-waiting*")) and "Traceback" not in srv.log
    assert srv.log.count(f"CRITICAL queries are refused: the database file the server writes is no longer at its "
                         f"path ({srv.db} was moved or deleted)") == 1, srv.log
    assert (tmp_path / "moved.db").stat().st_mode & 0o777 == 0o600
    assert db_rows(tmp_path / "moved.db", "SELECT COUNT(*), SUM(input_tokens) FROM requests") == [(10, 45)]


def test_database_paths_ccmon_cannot_use_are_refused_in_one_line(tmp_path):
    """No traceback, no hang on a FIFO, no migration or backup of a schema version no ccmon writes, for a
    destroyed header what to do: restore the newest upgrade backup when there is one, and for a folder where the
    waiting log goes, what it is."""
    fifo, folder, blocked = tmp_path / "fifo", tmp_path / "folder", tmp_path / "blocked.db"
    os.mkfifo(fifo)
    folder.mkdir()
    (tmp_path / "blocked.db-waiting-a").mkdir()
    negative, headless = tmp_path / "negative.db", tmp_path / "headless.db"
    for path in (negative, headless):
        shutil.copyfile(V1 / "ccmon.db", path)
    with sqlite3.connect(negative) as conn:
        conn.execute("PRAGMA user_version = -1")
    conn.close()
    with open(headless, "r+b") as damaged:
        damaged.write(b"\0" * 100)
    shutil.copyfile(V1 / "ccmon.db", tmp_path / "headless.db.v1.bak")
    os.utime(tmp_path / "headless.db.v1.bak", (1_700_000_000, 1_700_000_000))
    shutil.copyfile(V1 / "ccmon.db", tmp_path / "headless.db.v3.bak")
    before = sorted(p.name for p in tmp_path.iterdir())
    usage = "names ccmon's database file, created when missing"
    keep = "(keep it: sqlite3 may still recover rows from it)"
    cases = {Path("/proc/self/mem"): "cannot use /proc/self/mem as ccmon's database: disk I/O error",
             folder: f"{folder} is a folder; --database-path (database.path) {usage}",
             fifo: f"{fifo} is not a regular file; --database-path (database.path) {usage}",
             negative: f"{negative} has schema version -1, which no ccmon writes; move {negative} aside {keep} to "
                       "start a new database there",
             headless: f"{headless} is not an SQLite database (file is not a database); if it was ccmon's, move "
                       f"{headless} aside {keep} and restore the newest backup, {headless}.v3.bak, in its place",
             blocked: f"cannot use {blocked}-waiting-a (Is a directory): the server keeps the exports waiting to be "
                      "applied there, beside the database; move it aside"}
    for path, message in cases.items():
        result = run_ccmon(["--server", "--server-address", "127.0.0.1:0", "--server-http-address", "off",
                            "--database-path", str(path)], tmp_path, timeout=20)
        assert (result.returncode, result.stderr) == (1, f"ccmon: {message}\n"), path
    assert sorted(p.name for p in tmp_path.iterdir()) == before

# ---------------------------------------------------------------- OTLP ingestion and the query service

def test_sdk_exporter_mixed_value_types_recorded_exactly(server):
    sdk_export(server.port, MIXED_EVENTS)
    s = stats(server)
    assert (s.base_requests, s.premium_requests, s.total_requests) == (1, 2, 3)
    assert s.premium_tokens == ccmon_pb2.Token(input=1210, output=2388, cache_read=45123, cache_creation=2712,
                                               limited=3598, cache=47835, total=51433)
    assert s.base_tokens == ccmon_pb2.Token(input=800, output=95, limited=895, total=895)
    assert s.premium_cost.amount == 0.1421
    assert s.base_cost.amount == 0.000975
    assert s.total_cost.amount == 0.143075
    assert s.total_tokens.total == 51433 + 895


def test_api_requests_page_order_and_fields(server):
    sdk_export(server.port, MIXED_EVENTS)
    page = server.query().GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(limit=2, oldest_first=False))
    assert page.total_count == 3
    assert [r.model for r in page.requests] == ["claude-opus-4-1", "claude-haiku-4-5-20251001"]
    newest = page.requests[0]
    assert (newest.session_id, newest.input_tokens, newest.output_tokens, newest.cache_read_tokens,
            newest.cache_creation_tokens, newest.total_tokens, newest.cost_usd, newest.duration_ms) == \
        ("sess-1", 10, 2048, 30123, 512, 32693, 0.1, 22000)
    assert newest.timestamp == ts("2026-03-01T23:59:59.999Z")
    oldest = server.query().GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(limit=1, offset=0, oldest_first=True))
    assert oldest.requests[0].timestamp == ts("2026-03-01T10:00:00.000Z")
    second = server.query().GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(limit=5, offset=2))
    assert [r.model for r in second.requests] == ["claude-sonnet-4-5"]


def test_period_filters_use_half_open_ranges(server):
    sdk_export(server.port, MIXED_EVENTS)
    assert stats(server, "2026-03-01T10:00:00Z", "2026-03-01T10:05:30.250Z").total_requests == 1
    assert stats(server, "2026-03-01T10:00:00.001Z", "2026-03-02T00:00:00Z").total_requests == 2
    assert stats(server, end="2026-03-01T10:00:00Z").total_requests == 0
    assert stats(server, start="2026-03-02T00:00:00Z").total_requests == 0


def test_daily_usage_in_a_timezone(server):
    sdk_export(server.port, MIXED_EVENTS)
    request = ccmon_pb2.GetUsageRequest(timezone="Asia/Taipei", start_time=ts("2026-02-28T16:00:00Z"),
                                        end_time=ts("2026-03-02T16:00:00Z"))
    days = server.query().GetUsage(request).days
    # Taipei is UTC+8: the 23:59:59.999Z request falls on March 2nd there.
    assert [d.date for d in days] == ["2026-03-02", "2026-03-01"]
    assert (days[0].stats.premium_requests, days[0].stats.premium_tokens.output) == (1, 2048)
    assert (days[1].stats.total_requests, days[1].stats.premium_cost.amount) == (2, 0.0421)
    with pytest.raises(grpc.RpcError) as err:
        server.query().GetUsage(ccmon_pb2.GetUsageRequest(timezone="Mars/Olympus"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown timezone 'Mars/Olympus'" in err.value.details()


def test_a_quarter_hour_inside_a_period_counts_only_the_rows_inside_it(server):
    """A period's edges inside a quarter hour come from that quarter hour's rollup only when none of its rows lies
    outside the period (as for a period ending now); else from the rows themselves."""
    at = lambda minutes: f"2026-03-01T10:{minutes:02d}:00Z"  # noqa: E731  (10:00-10:15 is one quarter hour)
    sdk_export(server.port, [("api_request", api_request(seq, at(minutes), input_tokens=10 ** seq))
                             for seq, minutes in ((0, 1), (1, 5), (2, 10))])
    assert stats(server, at(2), at(7)).total_tokens.input == 10
    assert stats(server, at(0), at(7)).total_tokens.input == 11
    assert stats(server, at(2), at(15)).total_tokens.input == 110
    assert stats(server, at(1), "2026-03-01T10:10:00.001Z").total_tokens.input == 111  # every row: the rollup
    assert stats(server, at(1), at(10)).total_tokens.input == 11
    assert stats(server, "2026-03-01T09:59:00Z", at(11)).total_tokens.input == 111


def test_model_stats_ranked_by_cost(server):
    sdk_export(server.port, MIXED_EVENTS)
    models = server.query().GetModelStats(ccmon_pb2.GetModelStatsRequest()).models
    assert [(m.model, m.premium, m.requests, m.cost.amount) for m in models] == [
        ("claude-opus-4-1", True, 1, 0.1), ("claude-sonnet-4-5", True, 1, 0.0421),
        ("claude-haiku-4-5-20251001", False, 1, 0.000975)]
    assert models[1].tokens.cache_creation == 2200 and models[1].duration_ms == 5120


def test_other_events_and_attributes_are_kept(server):
    sdk_export(server.port, MIXED_EVENTS + [("mystery_event", {"session.id": "sess-1", "event.sequence": 9})])
    events = db_rows(server.db, "SELECT name, session_id, prompt_id, attributes FROM e ORDER BY ts")
    assert [e[:3] for e in events] == [("user_prompt", "sess-1", "p-1"), ("tool_result", "sess-1", None),
                                       ("mystery_event", "sess-1", None)]
    tool = next(e for e in events if e[0] == "tool_result")
    assert json.loads(tool[3]) == {"event.sequence": 4, "tool_name": "Bash", "success": "true", "duration_ms": "88"}
    haiku = db_rows(server.db, "SELECT ttft_ms, prompt_id, request_id, extra_json, source_json FROM r "
                               "WHERE model_name LIKE '%haiku%'")[0]
    assert haiku[:3] == (210, "p-2", "req_2")
    assert json.loads(haiku[3]) == {"query_source": "repl_main_thread"}
    source = json.loads(haiku[4])
    expected = {**CLAUDE_RESOURCE, "user.id": "u" * 64, "organization.id": "org-1", "terminal.type": "tmux",
                "telemetry.sdk.name": "opentelemetry"}
    assert {key: source[key] for key in expected} == expected
    assert "storing events of a kind ccmon does not know yet: 'mystery_event'" in server.log


def test_duplicate_exports_are_counted_once(server):
    request = logs_request(MIXED_EVENTS)
    first = server.logs_stub().Export(request)
    again = server.logs_stub().Export(request)
    assert not first.HasField("partial_success") and not again.HasField("partial_success")
    assert stats(server).total_requests == 3
    assert db_rows(server.db, "SELECT COUNT(*) FROM events") == [(2,)]
    # Records without session/sequence are de-duplicated by content.
    anonymous = logs_request([("api_request", {"model": "claude-sonnet-4-5", "input_tokens": 7,
                                                "event.timestamp": "2026-03-05T00:00:00Z"})])
    server.logs_stub().Export(anonymous)
    server.logs_stub().Export(anonymous)
    assert stats(server).total_requests == 4
    wait_for_log(server, "logs: 1 records, 1 api requests, 0 new, 0 rejected")  # stderr reaches the test a bit later


def test_a_large_export_is_acknowledged_before_it_is_applied_and_every_read_counts_it(server):
    """An export of STAGE_MIN_REQUESTS api_request events or more over days (a backfill's) is acknowledged once it
    waits in the log; the query after the acknowledgement counts every one of them (the writer applies
    them first), and the same export sent again adds nothing. A smaller export, or one within a day, is stored at
    once, as before."""
    count = ccmon.STAGE_MIN_REQUESTS
    records = [("api_request", api_request(n, f"2026-04-{1 + n % 28:02d}T{n % 24:02d}:00:00Z", session=f"s-{n % 7}",
                                           cost_usd=0.001 * n, input_tokens=n)) for n in range(1, count + 1)]
    assert not server.logs_stub().Export(logs_request(records)).HasField("partial_success")
    wait_for_log(server, f"logs: {count} records, {count} api requests, 0 new, {count} to be applied, 0 rejected")
    answer = stats(server)
    assert (answer.total_requests, answer.total_tokens.input) == (count, count * (count + 1) // 2)
    assert db_rows(server.db, "SELECT COUNT(*), SUM(cost_nanos) FROM requests") == \
        [(count, 1_000_000 * count * (count + 1) // 2)]
    assert db_rows(server.db, "SELECT applied FROM waiting_log") == [(1,)]  # it waited: the log's first frame
    assert db_rows(server.db, "SELECT protocol, signal, accepted, rejected FROM receiver_counts") == \
        [("grpc", "logs", count, 0)]  # the export's counts, waiting with its rows
    server.logs_stub().Export(logs_request(records))
    assert stats(server).total_requests == count
    server.logs_stub().Export(logs_request(records[:count - 1]))
    wait_for_log(server, f"logs: {count - 1} records, {count - 1} api requests, 0 new, 0 rejected")
    within_a_day = [("api_request", api_request(n, f"2026-05-01T{n % 24:02d}:{n % 60:02d}:00Z", session="s-day"))
                    for n in range(1, count + 1)]
    server.logs_stub().Export(logs_request(within_a_day))
    wait_for_log(server, f"logs: {count} records, {count} api requests, {count} new, 0 rejected")
    assert stats(server).total_requests == 2 * count
    assert_rollups_are_their_rows(server.db)


def many_requests(first: int, count: int) -> ccmon.Batch:
    """`count` api_request events numbered from `first`, each costing 1000 nano-dollars times its number."""
    return ccmon.Batch(requests=[row for n in range(first, first + count) for row in one_request_batch(n).requests])


def stopped_before_applying(store: ccmon.Writer, monkeypatch) -> None:
    """Stop a writer as a crash would: before it applies what waits."""
    monkeypatch.setattr(store, "_apply", lambda: None)
    store.close()


def test_requests_waiting_when_the_writer_stopped_are_applied_at_its_next_start(tmp_path, monkeypatch, caplog):
    """Acknowledged exports that wait in the log survive a stop before they are applied (a crash, a power cut): the
    next start applies them before anything else, and a read waits for that. A frame a crash cut short (never
    acknowledged) is cut off, saying so; a stop with nothing waiting removes the log's files."""
    monkeypatch.setattr(ccmon, "APPLY_IDLE_S", 3600)
    db = tmp_path / "pending.db"
    store = ccmon.Writer(db)
    assert store.write(many_requests(1, 200)) == (0, 200)
    stopped_before_applying(store, monkeypatch)
    assert db_rows(db, "SELECT COUNT(*) FROM requests") == [(0,)]
    assert db_rows(db, "SELECT applied FROM waiting_log") == [(0,)]
    log_file = tmp_path / "pending.db-waiting-a"
    with open(log_file, "ab") as torn:
        torn.write(ccmon.WAITING_FRAME.pack(2, 1000, 0) + b"cut short")
    store = ccmon.Writer(db)
    try:
        reader = ccmon.Reader(db, catch_up=store.catch_up)
        assert sum(reader.usage(0, 2 ** 50).values(), ccmon.Usage()).requests == 200
        assert db_rows(db, "SELECT COUNT(*), SUM(cost_nanos) FROM requests") == [(200, 1000 * 200 * 201 // 2)]
        assert db_rows(db, "SELECT applied FROM waiting_log") == [(1,)]
        reader.close()
    finally:
        store.close()
    assert f"{log_file} ends with {ccmon.WAITING_FRAME.size + 9} bytes that are not a whole frame (a write a crash " \
           "cut short, never acknowledged): cut off" in caplog.text
    assert not list(tmp_path.glob("pending.db-waiting*"))  # nothing waits: the files are gone
    assert_rollups_are_their_rows(db)


def test_waiting_files_of_another_database_are_kept_aside_and_never_applied(tmp_path, monkeypatch, caplog):
    """A database removed (to start afresh) while exports waited: the new one at its path does not apply the old
    one's frames; their files are kept aside, saying so."""
    monkeypatch.setattr(ccmon, "APPLY_IDLE_S", 3600)
    db = tmp_path / "fresh.db"
    store = ccmon.Writer(db)
    assert store.write(many_requests(1, 200)) == (0, 200)
    stopped_before_applying(store, monkeypatch)
    db.unlink()
    store = ccmon.Writer(db)
    try:
        assert store.waiting == 0
        assert ccmon.Reader(db, catch_up=store.catch_up).usage(0, 2 ** 50) == {}
    finally:
        store.close()
    aside = [path for path in tmp_path.iterdir() if path.name.startswith("fresh.db-waiting-a.")]
    assert len(aside) == 1 and aside[0].stat().st_size > ccmon.WAITING_HEADER.size + ccmon.WAITING_FRAME.size
    assert f"{tmp_path / 'fresh.db-waiting-a'} was not written for this database: it is kept as {aside[0]}, and " \
           "not applied" in caplog.text


def test_exports_are_stored_at_once_after_the_log_cannot_be_written(tmp_path, monkeypatch, caplog):
    """A write to the log that fails (here: its file open read-only) answers "retry" for the exports it held, and
    the exports after it are stored at once; what waited before is applied as usual."""
    monkeypatch.setattr(ccmon, "APPLY_IDLE_S", 3600)
    db = tmp_path / "unwritable.db"
    store = ccmon.Writer(db)
    try:
        assert store.write(many_requests(1, 150)) == (0, 150)
        slot = store._log._slot
        os.close(store._log._fds[slot])
        store._log._fds[slot] = os.open(store._log.paths[slot], os.O_RDONLY)
        with pytest.raises(ccmon.StorageUnavailable, match=r"^database write failed: Bad file descriptor$"):
            store.write(many_requests(151, 150))
        assert f"cannot write {store._log.paths[slot]} (Bad file descriptor); exports are stored at once from now " \
               "on" in caplog.text
        assert store.write(many_requests(151, 150)) == (150, 0)
        assert db_rows(db, "SELECT COUNT(*), SUM(cost_nanos) FROM requests") == [(300, 1000 * 300 * 301 // 2)]
        assert store.waiting == 0
    finally:
        store.close()
    assert_rollups_are_their_rows(db)


def test_the_log_goes_on_in_its_other_file_and_a_start_applies_both_in_order(tmp_path, monkeypatch):
    """Past WAITING_FILE_BYTES the log goes on in its other file once that one holds nothing waiting; a start after
    a crash applies the frames of both files in the order they came (the first sent of a key is stored)."""
    monkeypatch.setattr(ccmon, "APPLY_IDLE_S", 3600)
    monkeypatch.setattr(ccmon, "WAITING_FILE_BYTES", 1)
    db = tmp_path / "turns.db"
    store = ccmon.Writer(db)
    resent = many_requests(101, 150)
    resent.requests = [(*row[:9], 1, *row[10:]) for row in resent.requests]  # the same keys, another cost
    for batch in (many_requests(1, 150), many_requests(151, 150), resent):
        assert store.write(batch) == (0, 150)
    assert [store._log._last_in[0], store._log._last_in[1]] == [1, 3]  # b once a had a frame; a still waited
    stopped_before_applying(store, monkeypatch)
    store = ccmon.Writer(db)
    try:
        assert store.waiting == 450
        store.catch_up()
        assert db_rows(db, "SELECT COUNT(*), SUM(cost_nanos) FROM requests") == [(300, 1000 * 300 * 301 // 2)]
        assert db_rows(db, "SELECT applied FROM waiting_log") == [(3,)]
        assert store.write(many_requests(301, 150)) == (0, 150)  # both files emptied, a first again
        assert [store._log._last_in[0], store._log._last_in[1]] == [4, 0]
    finally:
        store.close()
    assert_rollups_are_their_rows(db)


def test_an_export_waiting_that_cannot_be_applied_is_dropped_saying_so_and_the_rest_are_stored(tmp_path, monkeypatch,
                                                                                                caplog):
    """A waiting export whose apply fails for a reason of its own (here: rows of the wrong shape, as a bug of ccmon's
    could make) would fail every transaction after it: it is dropped, saying so, and the exports around it, and
    the writes after, are stored."""
    monkeypatch.setattr(ccmon, "APPLY_IDLE_S", 3600)
    db = tmp_path / "poisoned.db"
    store = ccmon.Writer(db)
    try:
        assert store.write(many_requests(1, 150)) == (0, 150)
        broken = ccmon.futures.Future()
        store._staging.put((ccmon.Batch(requests=[(1, "s1", 1)] * 150), broken))
        assert broken.result(timeout=10) == (0, 150)
        assert store.write(many_requests(151, 150)) == (0, 150)
        store.catch_up()
        assert db_rows(db, "SELECT COUNT(*), SUM(cost_nanos) FROM requests") == [(300, 1000 * 300 * 301 // 2)]
        assert store.waiting == 0 and db_rows(db, "SELECT applied FROM waiting_log") == [(3,)]
        assert store.write(one_request_batch(999)) == (1, 0)
    finally:
        store.close()
    assert "an export waiting to be applied could not be (IndexError('list index out of range')): its 150 requests " \
           "are dropped" in caplog.text
    assert_rollups_are_their_rows(db)


def test_requests_a_version_16_server_left_waiting_are_applied_after_the_upgrade(tmp_path, monkeypatch):
    """Schema 16 kept waiting requests in pending_requests; a database it left with some is upgraded, and they are
    applied before the first read."""
    db = tmp_path / "sixteen.db"
    store = ccmon.Writer(db)
    rows = many_requests(1, 150).requests
    store._job(lambda conn: conn.executemany(ccmon.STAGE, store._resolve(conn, "requests", ccmon.REQUEST_COLUMNS,
                                                                         rows)), 10)
    store.close()
    with sqlite3.connect(db) as conn:
        conn.executescript("DROP TABLE waiting_log; PRAGMA user_version = 16;")
    conn.close()
    store = ccmon.Writer(db)
    try:
        assert store.waiting == 150
        reader = ccmon.Reader(db, catch_up=store.catch_up)
        assert sum(reader.usage(0, 2 ** 50).values(), ccmon.Usage()).requests == 150
        assert (store.waiting, db_rows(db, "SELECT COUNT(*) FROM pending_requests")) == (0, [(0,)])
        reader.close()
    finally:
        store.close()
    assert_rollups_are_their_rows(db)


def test_requests_waiting_replace_what_telemetry_replaces_once_applied(tmp_path, monkeypatch):
    """Applied in bulk, waiting api_request events replace their sessions' metric-derived usage and a transcript's
    copy of one of them (its request_id, in any session), as they do stored at once."""
    monkeypatch.setattr(ccmon, "APPLY_IDLE_S", 3600)
    db, at = tmp_path / "replaced.db", ccmon.parse_iso_ms("2026-03-01T10:00:00Z")

    def row(ts, session, seq, cost_nanos, request_id, origin):
        return (ts, session, seq, "claude-sonnet-4-5", "", 10, 1, 0, 0, cost_nanos, 0, None, None, request_id, None,
                None, origin, "claude-code")

    store = ccmon.Writer(db)
    try:
        store.write(ccmon.Batch(requests=[row(at, "s1", 1, 500, None, ccmon.ORIGIN_METRICS)]))
        store.import_requests([row(at, "s9", 100, 700, "req_2", ccmon.ORIGIN_TRANSCRIPT)], {}, "ana@example.com")
        events = [row(at + n * 3600_000, f"s{1 + n % 2}", n, 1000, f"req_{n}", ccmon.ORIGIN_EVENT)
                  for n in range(1, 201)]
        assert store.write(ccmon.Batch(requests=events)) == (0, 200)
        assert db_rows(db, "SELECT origin, cost_nanos FROM requests ORDER BY 1") == [(1, 500), (2, 700)]  # waiting
        store.catch_up()
        assert db_rows(db, "SELECT origin, COUNT(*), SUM(cost_nanos) FROM requests GROUP BY 1") == [(0, 200, 200_000)]
    finally:
        store.close()
    assert_rollups_are_their_rows(db)


def test_requests_waiting_are_applied_once_enough_wait_and_a_read_that_cannot_apply_them_says_so(tmp_path,
                                                                                                monkeypatch):
    """Without a read or another job, the writer applies what waits once APPLY_ROWS do; the project an export names
    for a session its waiting rows make is kept. A read that finds requests waiting while the writer cannot apply
    them (here: it has stopped) fails saying so, rather than answering without them."""
    monkeypatch.setattr(ccmon, "APPLY_IDLE_S", 3600)
    monkeypatch.setattr(ccmon, "APPLY_ROWS", 300)
    db = tmp_path / "applied.db"
    store = ccmon.Writer(db)
    batches = [many_requests(first, 150) for first in (1, 151, 301)]
    batches[0].projects = {"s1": "alpha"}
    try:
        assert store.write(batches[0]) == (0, 150)
        assert (store.waiting, db_rows(db, "SELECT COUNT(*) FROM requests")) == (150, [(0,)])
        assert store.write(batches[1]) == (0, 150)
        wait_until(lambda: db_rows(db, "SELECT COUNT(*) FROM requests") == [(300,)], "300 requests applied", 30)
        store.catch_up()
        assert store.waiting == 0
        assert db_rows(db, "SELECT project FROM sessions WHERE session_id = 's1'") == [("alpha",)]
        assert store.write(batches[2]) == (0, 150)
    finally:
        stopped_before_applying(store, monkeypatch)
    reader = ccmon.Reader(db, catch_up=store.catch_up)
    with pytest.raises(sqlite3.OperationalError, match=r"^150 requests received are not counted yet \(the server "
                                                       r"is shutting down\)$"):
        reader.usage(0, 2 ** 50)
    reader.close()


def test_malformed_values_are_rejected_with_partial_success(server):
    bad = [
        ("api_request", api_request(1, "2026-03-01T10:00:00Z", input_tokens="12k", cost_usd=0.5)),
        ("api_request", api_request(2, "2026-03-01T10:00:01Z", input_tokens=5, cost_usd="NaN")),
        ("api_request", api_request(3, "2026-03-01T10:00:02Z", output_tokens=-4)),
        ("api_request", api_request(4, "2026-03-01T10:00:03Z", cache_read_tokens=1.5)),
        ("api_request", api_request(5, "2026-03-01T10:00:04Z", input_tokens=9, output_tokens="11",
                                    cost_usd="0.25")),
    ]
    response = server.logs_stub().Export(logs_request(bad))
    assert response.partial_success.rejected_log_records == 4
    assert response.partial_success.error_message == (
        "rejected 4 of 5 log records: api_request in session sess-1: input_tokens='12k' is not a number; "
        "api_request in session sess-1: cost_usd='NaN' is not a finite number; "
        "api_request in session sess-1: output_tokens=-4 is negative; and 1 more")
    s = stats(server)
    assert (s.total_requests, s.total_tokens.limited, s.total_cost.amount) == (1, 20, 0.25)
    assert "WARNING rejected 4 of 5 log records: api_request in session sess-1" in server.log


def test_timestamp_fallbacks(server):
    record_time = ccmon.parse_iso_ms("2026-04-01T12:00:00Z") * 1_000_000
    request = logs_request([("api_request", {"session.id": "s", "event.sequence": 1, "model": "m",
                                             "input_tokens": 1})])
    request.resource_logs[0].scope_logs[0].log_records[0].time_unix_nano = record_time
    server.logs_stub().Export(request)
    page = server.query().GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest())
    assert page.requests[0].timestamp == ts("2026-04-01T12:00:00Z")


def test_metrics_from_the_sdk_are_stored(server):
    exporter = OTLPMetricExporter(endpoint=server.target, insecure=True,
                                  preferred_temporality={Counter: AggregationTemporality.DELTA})
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=60_000)
    provider = MeterProvider(resource=Resource.create(CLAUDE_RESOURCE), metric_readers=[reader])
    meter = provider.get_meter("com.anthropic.claude_code")
    cost = meter.create_counter("claude_code.cost.usage", unit="USD")
    tokens = meter.create_counter("claude_code.token.usage", unit="tokens")
    cost.add(0.25, {"session.id": "sess-9", "model": "claude-sonnet-4-5"})
    tokens.add(1500, {"session.id": "sess-9", "model": "claude-sonnet-4-5", "type": "input"})
    tokens.add(90, {"session.id": "sess-9", "model": "claude-sonnet-4-5", "type": "output"})
    provider.shutdown()
    rows = db_rows(server.db, "SELECT name, temporality, value, session_id, model, type FROM mp "
                              "ORDER BY name, type")
    assert rows == [("claude_code.cost.usage", 1, 0.25, "sess-9", "claude-sonnet-4-5", None),
                    ("claude_code.token.usage", 1, 1500.0, "sess-9", "claude-sonnet-4-5", "input"),
                    ("claude_code.token.usage", 1, 90.0, "sess-9", "claude-sonnet-4-5", "output")]


def test_bad_metric_points_get_partial_success_and_traces_are_accepted(server):
    def point(value):
        return metrics_pb2.NumberDataPoint(as_double=value, time_unix_nano=1_700_000_000_000_000_000)

    request = metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
        scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metrics_pb2.Metric(
            name="claude_code.cost.usage",
            sum=metrics_pb2.Sum(aggregation_temporality=1, data_points=[point(0.5), point(float("nan")),
                                                                         point(-1.0)]))])])])
    stub = metrics_service_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(server.target))
    response = stub.Export(request)
    assert response.partial_success.rejected_data_points == 2
    assert "claude_code.cost.usage: value nan is not a number from 0 to 1e+12" in \
        response.partial_success.error_message
    assert db_rows(server.db, "SELECT value FROM metric_points") == [(0.5,)]
    traces = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(server.target))
    assert traces.Export(trace_service_pb2.ExportTraceServiceRequest()) == \
        trace_service_pb2.ExportTraceServiceResponse()


def test_query_edge_cases(server):
    sdk_export(server.port, [("api_request", api_request(1, "2026-01-01T23:30:00Z", input_tokens=100)),
                             ("api_request", api_request(2, "2026-01-02T00:30:00Z", input_tokens=5))])
    request = ccmon_pb2.GetUsageRequest(timezone="UTC", start_time=ts("2026-01-01T23:00:00Z"),
                                        end_time=ts("2026-01-02T01:00:00Z"))
    days = server.query().GetUsage(request).days
    assert [(d.date, d.stats.total_tokens.input) for d in days] == [("2026-01-02", 5), ("2026-01-01", 100)]
    for zone in ("America", "a" * 300, "../../etc/passwd"):
        with pytest.raises(grpc.RpcError) as err:
            server.query().GetUsage(ccmon_pb2.GetUsageRequest(timezone=zone))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    huge = ccmon_pb2.GetStatsRequest()
    huge.end_time.seconds = 2 ** 60
    assert server.query().GetStats(huge).stats.total_requests == 2
    usage = ccmon_pb2.GetUsageRequest()
    usage.end_time.seconds = 2 ** 40
    assert len(server.query().GetUsage(usage).days) == 30
    epoch = ccmon_pb2.GetStatsRequest()
    epoch.end_time.CopyFrom(ts("1970-01-01T00:00:00Z"))  # set to the epoch is not "unset"
    assert server.query().GetStats(epoch).stats.total_requests == 0


def test_records_from_the_future_are_stored_at_the_time_received(server):
    now = int(time.time() * 1000)
    ahead = now + 3 * 86400_000  # a clock three days fast
    request = logs_request([
        ("api_request", api_request(1, iso(ahead), session="fast-clock", input_tokens=10, cost_usd=1.0)),
        ("api_request", api_request(2, iso(now + 60_000), session="a-minute-ahead", input_tokens=20)),
        ("user_prompt", {"event.name": "user_prompt", "event.timestamp": iso(ahead), "event.sequence": 3,
                         "session.id": "fast-clock"}),
        ("api_request", {"session.id": "no-event-timestamp", "event.sequence": 4, "model": "m", "input_tokens": 5}),
        ("api_request", api_request(5, "not a time", session="bad-time", input_tokens=1))])
    request.resource_logs[0].scope_logs[0].log_records[3].time_unix_nano = ahead * 1_000_000
    request.resource_logs[0].scope_logs[0].log_records[4].time_unix_nano = (ahead + 1) * 1_000_000
    sent = int(time.time() * 1000)
    response = server.logs_stub().Export(request)
    answered = int(time.time() * 1000)
    assert response.partial_success.rejected_log_records == 0  # stored, not rejected
    assert response.partial_success.error_message == (
        "4 of 5 log records were dated more than 5 minutes ahead of the server's clock: stored at the time "
        "received, their own time kept as ccmon.original_timestamp")
    requests = {session: (ts, json.loads(extra or "{}")) for session, ts, extra in
                db_rows(server.db, "SELECT session_id, ts, extra_json FROM r")}
    assert requests["a-minute-ahead"] == (now + 60_000, {"query_source": "repl_main_thread"})
    for session, original in (("fast-clock", ahead), ("no-event-timestamp", ahead), ("bad-time", ahead + 1)):
        ts, extra = requests[session]
        assert sent <= ts <= answered
        assert extra["ccmon.original_timestamp"] == iso(original)
    (ts, attributes), = db_rows(server.db, "SELECT ts, attributes FROM e WHERE name = 'user_prompt'")
    assert sent <= ts <= answered and json.loads(attributes)["ccmon.original_timestamp"] == iso(ahead)
    assert stats(server, end=iso(now + 3600_000)).total_tokens.input == 36  # exact: every record counted once
    # A session that starts later is the most recent one (@session_cost follows it), not the fast clock's.
    sdk_export(server.port, [("api_request", api_request(6, iso(now + 120_000), session="later", cost_usd=0.25))])
    assert server.query().GetSessionStats(ccmon_pb2.GetSessionStatsRequest()).session_id == "later"


def test_metric_points_from_the_future_are_stored_at_the_time_received(server):
    ahead = int(time.time() * 1000) + 86400_000
    request = metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
        scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metrics_pb2.Metric(
            name="claude_code.cost.usage", sum=metrics_pb2.Sum(aggregation_temporality=1, data_points=[
                metrics_pb2.NumberDataPoint(as_double=0.5, time_unix_nano=ahead * 1_000_000, attributes=[
                    common_pb2.KeyValue(key="session.id", value=any_value("metrics-only"))]),
                metrics_pb2.NumberDataPoint(as_double=0.25, time_unix_nano=1_700_000_000_000_000_000)]))])])])
    sent = int(time.time() * 1000)
    response = metrics_service_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(server.target)).Export(request)
    answered = int(time.time() * 1000)
    assert (response.partial_success.rejected_data_points, response.partial_success.error_message) == (
        0, "1 of 2 data points were dated more than 5 minutes ahead of the server's clock: stored at the time "
           "received, their own time kept as ccmon.original_timestamp")
    (ts, attributes), (old_ts, old_attributes) = db_rows(server.db, "SELECT ts, attributes FROM mp ORDER BY value DESC")
    assert sent <= ts <= answered and json.loads(attributes) == {"ccmon.original_timestamp": iso(ahead)}
    assert (old_ts, old_attributes) == (1_700_000_000_000, "{}")
    assert server.query().GetSessionStats(ccmon_pb2.GetSessionStatsRequest()).session_id == "metrics-only"


def team_events() -> list[tuple[str, dict]]:
    """Two users, three sessions, with tool calls, decisions, errors and retries, shaped like Claude Code's."""
    def request(seq, session, email, when, model, **figures):
        return ("api_request", {**api_request(seq, when, model=model, session=session, **figures),
                                "user.email": email})

    def event(name, seq, session, email, when, **attrs):
        return (name, {"event.name": name, "event.sequence": seq, "session.id": session, "user.email": email,
                       "event.timestamp": when, **attrs})

    return [
        request(1, "s-ana-1", "ana@example.com", "2026-05-04T09:00:00Z", "claude-sonnet-4-5", input_tokens=1000,
                output_tokens=200, cost_usd=0.5, duration_ms=4000, ttft_ms=800),
        request(2, "s-ana-1", "ana@example.com", "2026-05-04T09:05:00Z", "claude-haiku-4-5", input_tokens=300,
                output_tokens=30, cost_usd=0.01, duration_ms=900, ttft_ms=200),
        event("tool_result", 3, "s-ana-1", "ana@example.com", "2026-05-04T09:01:00Z", tool_name="Bash",
              success="true", duration_ms="120"),
        event("tool_result", 4, "s-ana-1", "ana@example.com", "2026-05-04T09:02:00Z", tool_name="Bash",
              success="false", duration_ms="3000"),
        event("tool_result", 5, "s-ana-1", "ana@example.com", "2026-05-04T09:03:00Z", tool_name="Read",
              success=True, duration_ms=15),
        event("tool_decision", 6, "s-ana-1", "ana@example.com", "2026-05-04T09:01:30Z", tool_name="Edit",
              decision="accept", source="config"),
        event("tool_decision", 7, "s-ana-1", "ana@example.com", "2026-05-04T09:01:40Z", tool_name="Bash",
              decision="reject", source="user_reject"),
        request(8, "s-ana-2", "ana@example.com", "2026-05-05T10:00:00Z", "claude-opus-4-1", input_tokens=50,
                output_tokens=5000, cost_usd=2.25, duration_ms=60000),
        event("api_error", 9, "s-ana-2", "ana@example.com", "2026-05-05T09:59:00Z", model="claude-opus-4-1",
              error="Overloaded", status_code="529", attempt=1),
        event("api_retries_exhausted", 10, "s-ana-2", "ana@example.com", "2026-05-05T09:59:30Z"),
        request(11, "s-bo-1", "bo@example.com", "2026-05-05T11:00:00Z", "claude-sonnet-4-5", input_tokens=7,
                output_tokens=3, cost_usd=0.125, duration_ms=1000, ttft_ms=500),
        event("tool_result", 12, "s-bo-1", "bo@example.com", "2026-05-05T11:00:10Z", tool_name="Bash",
              success="true", duration_ms="200"),
        event("api_error", 13, "s-bo-1", "bo@example.com", "2026-05-05T11:00:20Z", model="claude-sonnet-4-5",
              error="rate limited", status_code=429, attempt=2),
    ]


MAY = dict(start_time=ts("2026-05-01T00:00:00Z"), end_time=ts("2026-06-01T00:00:00Z"))


def test_insight_queries_match_the_raw_data(server):
    assert sdk_export(server.port, team_events()) == ["SUCCESS"]
    q = server.query()
    models = {m.model: m for m in q.GetModelStats(ccmon_pb2.GetModelStatsRequest(**MAY)).models}
    assert (models["claude-sonnet-4-5"].ttft_ms_total, models["claude-sonnet-4-5"].ttft_count) == (1300, 2)
    assert (models["claude-opus-4-1"].ttft_ms_total, models["claude-opus-4-1"].ttft_count) == (0, 0)
    sessions = q.GetSessions(ccmon_pb2.GetSessionsRequest(**MAY)).sessions
    assert [s.session_id for s in sessions] == ["s-bo-1", "s-ana-2", "s-ana-1"]
    ana1 = sessions[2]
    assert (ana1.user, list(ana1.models), ana1.tool_calls, ana1.tool_failures, ana1.api_errors, ana1.from_metrics) \
        == ("ana@example.com", ["claude-sonnet-4-5", "claude-haiku-4-5"], 3, 1, 0, False)
    assert (ana1.stats.total_requests, ana1.stats.total_tokens.limited, ana1.stats.total_cost.amount) == \
        (2, 1530, 0.51)
    assert ana1.first_request_at == ts("2026-05-04T09:00:00Z") and ana1.last_request_at == ts("2026-05-04T09:05:00Z")
    assert (sessions[1].api_errors, sessions[0].tool_calls, sessions[0].api_errors) == (1, 1, 1)
    only_bo = q.GetSessions(ccmon_pb2.GetSessionsRequest(**MAY, user="bo@example.com")).sessions
    assert [s.session_id for s in only_bo] == ["s-bo-1"]
    tools = q.GetToolStats(ccmon_pb2.GetToolStatsRequest(**MAY))
    assert [(t.tool, t.calls, t.successes, t.p50_duration_ms, t.p95_duration_ms) for t in tools.tools] == \
        [("Bash", 3, 2, 200, 3000), ("Read", 1, 1, 15, 15)]
    assert [(d.decision, d.source, d.count) for d in tools.decisions] == \
        [("accept", "config", 1), ("reject", "user_reject", 1)]
    assert [(e.status_code, e.model, e.count) for e in tools.errors] == \
        [("429", "claude-sonnet-4-5", 1), ("529", "claude-opus-4-1", 1)]
    assert tools.retries_exhausted == 1
    bo_tools = q.GetToolStats(ccmon_pb2.GetToolStatsRequest(**MAY, user="bo@example.com"))
    assert [(t.tool, t.calls) for t in bo_tools.tools] == [("Bash", 1)] and bo_tools.retries_exhausted == 0
    users = q.GetUsers(ccmon_pb2.GetUsersRequest(**MAY)).users
    assert [(u.user, u.sessions, u.stats.total_requests, u.stats.total_cost.amount, u.stats.base_requests)
            for u in users] == [("ana@example.com", 2, 3, 2.76, 1), ("bo@example.com", 1, 1, 0.125, 0)]
    ana = q.GetStats(ccmon_pb2.GetStatsRequest(**MAY, user="ana@example.com")).stats
    assert (ana.total_requests, ana.total_tokens.input, ana.total_cost.amount) == (3, 1350, 2.76)
    assert q.GetStats(ccmon_pb2.GetStatsRequest(user="nobody@example.com")).stats.total_requests == 0
    page = q.GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(**MAY, user="bo@example.com"))
    assert (page.total_count, [r.session_id for r in page.requests]) == (1, ["s-bo-1"])
    timeline = q.GetSessionTimeline(ccmon_pb2.GetSessionTimelineRequest(session_id="s-ana-1")).entries
    assert [e.kind for e in timeline] == ["api_request", "tool_result", "tool_decision", "tool_decision",
                                          "tool_result", "tool_result", "api_request"]
    assert timeline[0].request.cost_usd == 0.5 and json.loads(timeline[1].details)["tool_name"] == "Bash"


def test_metrics_only_sessions_count_and_events_win(server):
    def export(temporality, steps, session):
        exporter = OTLPMetricExporter(endpoint=server.target, insecure=True,
                                      preferred_temporality={Counter: temporality})
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
        provider = MeterProvider(resource=Resource.create(CLAUDE_RESOURCE), metric_readers=[reader])
        meter = provider.get_meter("com.anthropic.claude_code")
        cost = meter.create_counter("claude_code.cost.usage", unit="USD")
        tokens = meter.create_counter("claude_code.token.usage", unit="tokens")
        attrs = {"session.id": session, "model": "claude-sonnet-4-5", "user.email": "m@example.com"}
        for dollars, counts in steps:
            cost.add(dollars, attrs)
            for kind, n in counts.items():
                tokens.add(n, {**attrs, "type": kind})
            provider.force_flush()
        provider.shutdown()

    export(AggregationTemporality.DELTA, [(0.25, {"input": 100, "output": 20, "cacheRead": 1000}),
                                          (0.5, {"input": 50, "cacheCreation": 7})], "delta-session")
    export(AggregationTemporality.CUMULATIVE, [(1.0, {"input": 100}), (0.5, {"input": 50, "output": 5})],
           "cumulative-session")
    stats = server.query().GetStats(ccmon_pb2.GetStatsRequest()).stats
    assert (stats.total_requests, stats.total_tokens.input, stats.total_tokens.output, stats.total_tokens.cache_read,
            stats.total_tokens.cache_creation, stats.total_cost.amount) == (0, 300, 25, 1000, 7, 2.25)
    sessions = {s.session_id: s for s in server.query().GetSessions(ccmon_pb2.GetSessionsRequest()).sessions}
    assert sessions["cumulative-session"].from_metrics and sessions["cumulative-session"].stats.total_tokens.input \
        == 150
    assert sessions["delta-session"].stats.total_cost.amount == 0.75
    # Now the api_request events of the delta session arrive: they replace its metric figures.
    now = hours_ago(0)
    sdk_export(server.port, [("api_request", api_request(1, now, session="delta-session", input_tokens=150,
                                                         output_tokens=20, cost_usd=0.7))])
    sessions = {s.session_id: s for s in server.query().GetSessions(ccmon_pb2.GetSessionsRequest()).sessions}
    assert not sessions["delta-session"].from_metrics
    assert (sessions["delta-session"].stats.total_requests, sessions["delta-session"].stats.total_cost.amount) == \
        (1, 0.7)
    stats = server.query().GetStats(ccmon_pb2.GetStatsRequest()).stats
    assert (stats.total_requests, stats.total_tokens.input, stats.total_cost.amount) == (1, 300, 2.2)
    # More metrics for that session are stored but no longer counted.
    export(AggregationTemporality.DELTA, [(9.0, {"input": 9999})], "delta-session")
    assert server.query().GetStats(ccmon_pb2.GetStatsRequest()).stats.total_cost.amount == 2.2
    assert db_rows(server.db, "SELECT COUNT(*) FROM mp WHERE session_id = 'delta-session'") == [(9,)]
    # A transcript of the cumulative session is imported: its requests replace the metric figures too.
    write_transcript(server.workdir / "projects", "cumulative-session", [transcript_line(
        "cumulative-session", hours_ago(0), "req_c1", "msg_c1", usage=(150, 5, 0, 0))])
    assert "1 request imported" in ccmon_import(server, str(server.workdir / "projects")).stdout
    sessions = {s.session_id: s for s in server.query().GetSessions(ccmon_pb2.GetSessionsRequest()).sessions}
    assert (sessions["cumulative-session"].source, sessions["cumulative-session"].stats.total_requests,
            sessions["cumulative-session"].stats.total_cost.amount) == ("transcript*", 1, 0.000525)
    export(AggregationTemporality.DELTA, [(9.0, {"input": 9999})], "cumulative-session")
    assert server.query().GetStats(ccmon_pb2.GetStatsRequest()).stats.total_cost.amount == 0.700525


# ---------------------------------------------------------------- other agents: Gemini CLI, Codex, Qwen Code

# What each stand-in model API (../shared/tools/) answers every call, as ccmon counts it (docs/agents.md):
# (input without cache, output, cache read, cache write), which add up to the call's total tokens.
STANDIN_CALL = {"gemini-cli": (1234 - 456 + 11, 78 + 90, 456, 0),  # prompt - cached + tool-use prompt; + thoughts
                "codex": (2345 - 678, 89, 678, 0),                 # output includes the 34 reasoning tokens
                "qwen-code": (3456 - 789, 91, 789, 0)}             # output includes the 23 thoughts
STANDIN_TOTAL = {"gemini-cli": 1413, "codex": 2434, "qwen-code": 3547}
# The captures of the tools exporting to a receiver (fixtures/<tool>/otlp/<protocol>.jsonl.gz, traces left out):
# (tool, protocol) -> (agent, model calls, sessions) in them.
AGENT_CAPTURES = {("gemini-cli-0.61.0", "grpc"): ("gemini-cli", 6, 3),
                  ("gemini-cli-0.61.0", "http-json"): ("gemini-cli", 6, 3),
                  ("codex-0.169.0", "grpc"): ("codex", 6, 5),
                  ("codex-0.169.0", "http-protobuf"): ("codex", 3, 2),
                  ("codex-0.169.0", "http-json"): ("codex", 3, 2),
                  ("qwen-code-0.24.4", "grpc"): ("qwen-code", 10, 5),
                  ("qwen-code-0.24.4", "http-json"): ("qwen-code", 7, 3)}
EXPORT_STUBS = {"logs": (logs_service_pb2_grpc.LogsServiceStub, logs_service_pb2.ExportLogsServiceRequest),
                "metrics": (metrics_service_pb2_grpc.MetricsServiceStub,
                            metrics_service_pb2.ExportMetricsServiceRequest)}


def agent_capture(tool: str, protocol: str) -> list[dict]:
    """A capture's export requests, as the tool sent them: over gRPC its request as protobuf-JSON (`body`), over
    HTTP its raw body (`raw_text` for JSON, `raw_b64` for protobuf) with its path and content type."""
    import gzip
    with gzip.open(FIXTURES / tool / "otlp" / f"{protocol}.jsonl.gz", "rt") as lines:
        return [json.loads(line) for line in lines]


def replay(srv: ServerProcess, exports: list[dict], signals: tuple[str, ...] = ("logs", "metrics")) -> None:
    """Send each export of `signals` to `srv` as the tool sent it (the same protocol, body and content type), and
    check that every record was stored (no partial success)."""
    from google.protobuf import json_format
    channel = grpc.insecure_channel(srv.target)
    for export in exports:
        if export["signal"] not in signals:
            continue
        stub, message = EXPORT_STUBS[export["signal"]]
        if export["protocol"] == "grpc":
            answer = stub(channel).Export(json_format.ParseDict(export["body"], message()))
            assert not answer.partial_success.error_message, answer
            continue
        body = export["raw_text"].encode() if "raw_text" in export else base64.b64decode(export["raw_b64"])
        response, data = http_post(srv.http_port, export["path"], body, {"Content-Type": export["content_type"]})
        assert response.status == 200 and b"rejected" not in data, data


def events_sources(tool: str, protocol: str) -> set[str]:
    """Where the sessions of a capture get their usage from: events priced by ccmon (events*), and in Codex's gRPC
    capture, whose TUI run lived long enough for Codex to price its turns, events with Codex's own cost."""
    return {"events*", "events"} if (tool, protocol) == ("codex-0.169.0", "grpc") else {"events*"}


def agent_totals(srv: ServerProcess) -> tuple:
    total = stats(srv)
    tokens = total.total_tokens
    return total.total_requests, (tokens.input, tokens.output, tokens.cache_read, tokens.cache_creation), tokens.total


@pytest.mark.parametrize("tool, protocol", list(AGENT_CAPTURES))
def test_every_model_call_of_another_agent_is_stored_once_with_the_standins_usage(server, tool, protocol):
    """Replaying what the real CLI sent over each protocol it supports: every model call (Gemini's router call,
    Qwen's memory sub-agent, both of Codex's responses to a tool call) is one request with exactly the usage the
    stand-in answered, once, whatever else came (Codex's second response.completed, the token metrics)."""
    agent, calls, sessions = AGENT_CAPTURES[tool, protocol]
    replay(server, agent_capture(tool, protocol))
    assert agent_totals(server) == (calls, tuple(calls * n for n in STANDIN_CALL[agent]), calls * STANDIN_TOTAL[agent])
    found = server.query().GetSessions(ccmon_pb2.GetSessionsRequest(
        agent=ccmon.ALL_AGENTS, start_time=ts("2026-01-01T00:00:00Z"))).sessions
    assert len(found) == sessions
    assert {(s.agent, s.source, s.from_metrics) for s in found} == {(agent, source, False)
                                                                    for source in events_sources(tool, protocol)}
    assert sum(s.stats.total_requests for s in found) == calls
    requests = server.query().GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(
        agent=ccmon.ALL_AGENTS, start_time=ts("2026-01-01T00:00:00Z"), limit=100)).requests
    assert {(r.agent, r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_creation_tokens)
            for r in requests} == {(agent, *STANDIN_CALL[agent])}
    assert {r.session_id for r in requests} == {s.session_id for s in found}
    replay(server, agent_capture(tool, protocol))  # sent again (an exporter's retry): nothing new
    assert agent_totals(server)[0] == calls


def test_the_stored_call_keeps_the_tools_figures_prompt_and_duration(server):
    replay(server, agent_capture("qwen-code-0.24.4", "grpc"), ("logs",))
    replay(server, agent_capture("gemini-cli-0.61.0", "grpc"), ("logs",))
    replay(server, agent_capture("codex-0.169.0", "grpc"), ("logs",))
    rows = db_rows(server.db, "SELECT a.name, r.session_id, r.prompt_id, r.request_id, r.duration_ms, r.ttft_ms, "
                              "r.origin, r.extra_json FROM r JOIN agents a ON a.id = r.agent ORDER BY r.ts")
    qwen = [row for row in rows if row[0] == "qwen-code"]
    assert qwen[0][1:7] == ("d8f47574-eaa5-4e1e-aada-948cf23da699",
                            "d8f47574-eaa5-4e1e-aada-948cf23da699########0", "chatcmpl-bec6829176d248e2", 665, 562,
                            ccmon.ORIGIN_EVENT_ESTIMATED)
    extra = json.loads(qwen[0][7])
    assert (extra["thoughts_token_count"], extra["total_token_count"]) == (23, 3547)  # kept as the tool sent them
    gemini = [row for row in rows if row[0] == "gemini-cli"]
    assert {json.loads(row[7])["role"] for row in gemini} == {"main", "utility_router"}
    # Gemini's thoughts and tool-use prompt, summed into the output and input columns, are kept apart too.
    assert {tuple(json.loads(row[7]).get(key) for key in ("thoughts_token_count", "tool_token_count"))
            for row in gemini} == {(90, 11)}  # the stand-in's thoughtsTokenCount, toolUsePromptTokenCount
    assert gemini[0][1] == gemini[0][2] == "d5de2ac9-a711-4e76-96d7-dbf7eaad9898"  # -p mode: prompt id = session
    codex = [row for row in rows if row[0] == "codex"]
    assert codex[0][1] == "01a2419c-29ba-7ec3-a23f-f4d7c693747e"  # conversation.id
    assert {(json.loads(row[7])["reasoning_token_count"], json.loads(row[7])["tool_token_count"])
            for row in codex} == {(34, "2434")}
    # Codex's first response.completed of each response, without usage, is an event like its other SSE events.
    assert db_rows(server.db, "SELECT COUNT(*) FROM e WHERE name = 'codex.sse_event' AND "
                              "json_extract(attributes, '$.\"event.kind\"') = 'response.completed'") == [(6,)]


@pytest.mark.parametrize("tool, protocol", list(AGENT_CAPTURES))
def test_another_agents_token_metrics_count_without_events_and_events_win(server, tool, protocol):
    """Metrics-only users: Gemini's and Qwen's cumulative sums and Codex's delta histogram alone give the same
    exact totals (Codex's and Qwen's name no session: they count in the agent's metrics session); once the model
    calls' events arrive, they replace what the metrics counted, and metrics sent again count nothing."""
    agent, calls, sessions = AGENT_CAPTURES[tool, protocol]
    exports = agent_capture(tool, protocol)
    replay(server, exports, ("metrics",))
    assert agent_totals(server) == (0, tuple(calls * n for n in STANDIN_CALL[agent]), calls * STANDIN_TOTAL[agent])
    found = server.query().GetSessions(ccmon_pb2.GetSessionsRequest(
        agent=ccmon.ALL_AGENTS, start_time=ts("2026-01-01T00:00:00Z"))).sessions
    session_less = agent != "gemini-cli"
    assert len(found) == (1 if session_less else sessions)
    assert {(s.agent, s.source, s.from_metrics) for s in found} == {(agent, "metrics*", True)}
    if session_less:
        assert found[0].session_id == f"{agent} metrics"
    replay(server, exports, ("logs",))
    assert agent_totals(server) == (calls, tuple(calls * n for n in STANDIN_CALL[agent]), calls * STANDIN_TOTAL[agent])
    found = server.query().GetSessions(ccmon_pb2.GetSessionsRequest(
        agent=ccmon.ALL_AGENTS, start_time=ts("2026-01-01T00:00:00Z"))).sessions
    assert (len(found), {(s.source, s.from_metrics) for s in found}) == \
        (sessions, {(source, False) for source in events_sources(tool, protocol)})
    replay(server, exports, ("metrics",))
    assert agent_totals(server)[0:2] == (calls, tuple(calls * n for n in STANDIN_CALL[agent]))


def codex_token_metrics(when_ms: int, input_tokens: int,
                        user: str = "") -> metrics_service_pb2.ExportMetricsServiceRequest:
    """One Codex turn's codex.turn.token_usage points (a DELTA histogram naming no conversation), as Codex sends."""
    attrs = {"model": "gpt-5.5", "originator": "codex_exec", **({"user.email": user} if user else {})}
    points = [metrics_pb2.HistogramDataPoint(
        time_unix_nano=when_ms * 1_000_000, start_time_unix_nano=(when_ms - 1000) * 1_000_000, count=1, sum=value,
        attributes=[common_pb2.KeyValue(key=k, value=any_value(v)) for k, v in {**attrs, "token_type": kind}.items()])
        for kind, value in (("input", input_tokens), ("cached_input", 600), ("output", 80),
                            ("total", input_tokens + 80))]
    metric = metrics_pb2.Metric(name="codex.turn.token_usage", histogram=metrics_pb2.Histogram(
        data_points=points, aggregation_temporality=metrics_pb2.AGGREGATION_TEMPORALITY_DELTA))
    return metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
        resource={"attributes": [common_pb2.KeyValue(key="service.name", value=any_value("codex_exec"))]},
        scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metric])])])


def agent_logs_request(events: list[dict], resource: dict) -> logs_service_pb2.ExportLogsServiceRequest:
    """Log records named by their event.name attribute, as Gemini CLI, Codex and Qwen Code send them."""
    records = [logs_pb2.LogRecord(attributes=[common_pb2.KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()])
               for attrs in events]
    return logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        resource={"attributes": [common_pb2.KeyValue(key=k, value=any_value(v)) for k, v in resource.items()]},
        scope_logs=[logs_pb2.ScopeLogs(log_records=records)])])


def codex_response(when: str, conversation: str, user: str = "", **figures) -> dict:
    return {"event.name": "codex.sse_event", "event.kind": "response.completed", "event.timestamp": when,
            "conversation.id": conversation, "model": "gpt-5.5", "input_token_count": "2345",
            "output_token_count": "89", "cached_token_count": 678, "cache_write_token_count": 0,
            "reasoning_token_count": 34, "tool_token_count": "2434", **({"user.email": user} if user else {}),
            **figures}


def test_session_less_metrics_give_way_to_the_same_agents_events_of_the_same_user_within_an_hour(server):
    metrics = metrics_service_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(server.target))
    base = ccmon.parse_iso_ms(hours_ago(5))
    metrics.Export(codex_token_metrics(base, 1000))                        # events come 30 minutes later: replaced
    metrics.Export(codex_token_metrics(base + 3 * 3_600_000, 2000))          # 2.5 hours after them: counts
    metrics.Export(codex_token_metrics(base + 30 * 60_000, 4000, "ann@example.com"))  # another user's: counts
    assert agent_totals(server)[1] == (400 + 1400 + 3400, 240, 1800, 0)
    server.logs_stub().Export(agent_logs_request([codex_response(ccmon.iso_from_ms(base + 30 * 60_000), "c-1")],
                                                 {"service.name": "codex_exec"}))
    assert agent_totals(server) == (1, (1400 + 3400 + 1667, 160 + 89, 1200 + 678, 0), 2080 + 4080 + 2434)
    metrics.Export(codex_token_metrics(base + 50 * 60_000, 8000))          # within the hour of the events: not counted
    assert agent_totals(server)[1][0] == 1400 + 3400 + 1667
    sessions = {s.session_id: s.stats.total_tokens.input for s in server.query().GetSessions(
        ccmon_pb2.GetSessionsRequest(agent=ccmon.ALL_AGENTS, start_time=ts(hours_ago(24)))).sessions}
    assert sessions == {"c-1": 1667, "codex metrics": 1400, "codex metrics of ann@example.com": 3400}


def test_another_agents_unreadable_figures_are_rejected_with_partial_success(server):
    gemini = {"event.name": "gemini_cli.api_response", "event.timestamp": hours_ago(1), "session.id": "g-1",
              "model": "gemini-2.5-flash", "input_token_count": 100, "cached_content_token_count": 456,
              "output_token_count": 7}
    response = server.logs_stub().Export(agent_logs_request([
        gemini, {**gemini, "input_token_count": 1234},
        codex_response(hours_ago(1), "c-1", input_token_count="2k"),
        codex_response(hours_ago(1), "c-1", duration_ms="-3")], {"service.name": "gemini-cli"}))
    assert response.partial_success.rejected_log_records == 3
    assert response.partial_success.error_message == (
        "rejected 3 of 4 log records: gemini_cli.api_response in session g-1: cached_content_token_count (456) is more "
        "than the input it is part of (100); codex.sse_event in session c-1: input_token_count='2k' is not a number; "
        "codex.sse_event in session c-1: duration_ms='-3' is negative")
    cost = {"event.name": "codex.turn_cost", "conversation.id": "c-1", "turn.id": "t", "usage.estimated_usd": "0.1"}
    response = server.logs_stub().Export(agent_logs_request([
        {**cost, "usage.estimated_usd": "lots"}, {**cost, "turn.id": ""}, {**cost, "usage.estimated_usd": "1e9"}],
        {"service.name": "codex_exec"}))
    assert response.partial_success.error_message == (
        "rejected 3 of 3 log records: codex.turn_cost in session c-1: usage.estimated_usd='lots' is not a number; "
        "codex.turn_cost in session c-1: a turn cost needs its conversation.id and turn.id; "
        "codex.turn_cost in session c-1: usage.estimated_usd='1e9' is too large")
    assert agent_totals(server)[0:2] == (1, (778, 7, 456, 0))


# LiteLLM's model_prices_and_context_window.json (BerriAI/litellm at 00035b69f416be24e2e323c13198d9b7d2d1bdf9), as
# written there, per token: the entry, then input, output, cache read, cache write (None: not listed), and each
# (prompt tokens above which, input, output, cache read, cache write) as listed. docs/agents.md names the entries.
LITELLM_PRICES = {
    "gpt-5": ("gpt-5", "1.25e-06", "1e-05", "1.25e-07", None, ()),
    "gpt-5.1": ("gpt-5.1", "1.25e-06", "1e-05", "1.25e-07", None, ()),
    "gpt-5.2": ("gpt-5.2", "1.75e-06", "1.4e-05", "1.75e-07", None, ()),
    "gpt-5.5": ("gpt-5.5", "5e-06", "3e-05", "5e-07", None, ((272_000, "1e-05", "4.5e-05", "1e-06", None),)),
    "gpt-5.6": ("gpt-5.6", "5e-06", "3e-05", "5e-07", "6.25e-06",
                ((272_000, "1e-05", "4.5e-05", "1e-06", "1.25e-05"),)),
    "gpt-5.6-sol": ("gpt-5.6-sol", "5e-06", "3e-05", "5e-07", "6.25e-06",
                    ((272_000, "1e-05", "4.5e-05", "1e-06", "1.25e-05"),)),
    "gpt-5.6-terra": ("gpt-5.6-terra", "2.5e-06", "1.5e-05", "2.5e-07", "3.125e-06",
                      ((272_000, "5e-06", "2.25e-05", "5e-07", "6.25e-06"),)),
    "gpt-5.6-luna": ("gpt-5.6-luna", "1e-06", "6e-06", "1e-07", "1.25e-06",
                     ((272_000, "2e-06", "9e-06", "2e-07", "2.5e-06"),)),
    "gemini-2.5-flash": ("gemini-2.5-flash", "3e-07", "2.5e-06", "3e-08", None, ()),
    "gemini-2.5-flash-lite": ("gemini-2.5-flash-lite", "1e-07", "4e-07", "1e-08", None, ()),
    "gemini-2.5-pro": ("gemini-2.5-pro", "1.25e-06", "1e-05", "1.25e-07", None,
                       ((200_000, "2.5e-06", "1.5e-05", "2.5e-07", None),)),
    "gemini-3-flash-preview": ("gemini-3-flash-preview", "5e-07", "3e-06", "5e-08", None, ()),
    "gemini-3.1-flash-lite": ("gemini-3.1-flash-lite", "2.5e-07", "1.5e-06", "2.5e-08", None, ()),
    "gemini-3.1-pro-preview": ("gemini-3.1-pro-preview", "2e-06", "1.2e-05", "2e-07", None,
                               ((200_000, "4e-06", "1.8e-05", "4e-07", None),)),
    "gemini-3.5-flash": ("gemini/gemini-3.5-flash", "1.5e-06", "9e-06", "1.5e-07", None, ()),
    "qwen3-coder-plus": ("dashscope/qwen3-coder-plus", "1e-06", "5e-06", "1e-07", None,  # tiered_pricing
                         ((32_000, "1.8e-06", "9e-06", "1.8e-07", None), (128_000, "3e-06", "1.5e-05", "3e-07", None),
                          (256_000, "6e-06", "6e-05", "6e-07", None))),
}


def test_other_agents_prices_are_bundled_exactly_as_litellm_lists_them():
    """Every bundled price of another agent's model is LiteLLM's figure (per token there, per million here), at
    every prompt size it lists; a cache write costs the input price where LiteLLM lists none."""
    from decimal import Decimal
    claude = {model for model in ccmon.PRICES if model.startswith("claude-")}
    assert set(ccmon.PRICES) - claude == set(LITELLM_PRICES)
    for model, (_, *figures, tiers) in LITELLM_PRICES.items():
        found = ccmon.PRICES[model]
        for above, *tier in ((0, *figures), *tiers):
            if above:
                assert found.long_prompt[0] == above, model
                found = found.long_prompt[1]
            listed = [Decimal(v) * 10 ** 6 for v in tier[:3]] + [Decimal(tier[3] or tier[0]) * 10 ** 6] * 2
            assert [found.input, found.output, found.cache_read, found.cache_write_5m, found.cache_write_1h] == \
                listed, (model, above)
        assert found.long_prompt is None, model
    # the stand-ins' usage: Codex's response at gpt-5.5, Qwen's call at the first tier, and just above it
    assert ccmon.cost_nanos(ccmon.price_of("gpt-5.5"), 1667, 89, 678, 0) == 11_344_000
    assert ccmon.cost_nanos(ccmon.price_of("qwen3-coder-plus"), 2667, 91, 789, 0) == 3_200_900
    assert ccmon.cost_nanos(ccmon.price_of("qwen3-coder-plus"), 32_001, 0, 0, 0) == 57_601_800
    assert ccmon.cost_nanos(ccmon.price_of("gemini-2.5-pro"), 100_000, 0, 100_001, 0) == 275_000_250
    assert ccmon.price_of("gemini-3.8-flash") is None  # not in LiteLLM's list at that commit: $0, unless [pricing]


def test_codexs_own_turn_cost_replaces_ccmons_estimate_of_its_responses(server):
    """The TUI's two conversations had their turns priced by Codex's backend ($0.012345 each, from the stand-in):
    that is their cost; the exec runs, never priced, keep ccmon's estimate at gpt-5.5's (and gpt-5.6-sol's) price."""
    exports = agent_capture("codex-0.169.0", "grpc")
    replay(server, exports)
    sessions = {s.session_id: s for s in server.query().GetSessions(ccmon_pb2.GetSessionsRequest(
        agent=ccmon.ALL_AGENTS, start_time=ts("2026-01-01T00:00:00Z"))).sessions}
    tui = {"01a2419c-f77d-7560-a635-0779905e56e1", "01a2419d-0b88-7f01-8227-1627155c7a5d"}
    assert {sid: (s.source, round(s.stats.total_cost.amount, 9)) for sid, s in sessions.items()} == {
        **{sid: ("events", 0.012345) for sid in tui},
        "01a2419c-29ba-7ec3-a23f-f4d7c693747e": ("events*", 0.011344),
        "01a2419c-7f63-7241-8ee3-592fa9d20fbb": ("events*", 0.022688),  # the tool call's two responses
        "01a2419c-82e1-72c1-b967-61381461c2d5": ("events*", 0.011344)}
    assert db_rows(server.db, "SELECT SUM(cost_nanos), SUM(origin = 0), SUM(origin = 4) FROM requests") == \
        [(4 * 11_344_000 + 2 * 12_345_000, 2, 4)]
    replay(server, exports)  # sent again: the turns are priced once
    assert stats(server).total_cost.amount == pytest.approx(0.070066, abs=1e-12)
    assert db_rows(server.db, "SELECT COUNT(*) FROM e WHERE name = 'codex.turn_cost'") == [(2,)]


def uuid7(ms: int) -> str:
    digits = f"{ms:012x}7abc8def0123456789ab"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def test_a_turn_cost_covers_the_responses_from_its_start_to_the_next_prompt(server):
    assert ccmon.shares(10, [1, 1, 1]) == [3, 3, 4] and ccmon.shares(7, [0, 0]) == [3, 4]
    assert ccmon.uuid7_ms("01a2419d-0b41-7c62-9c64-d73d443f5666") == ccmon.parse_iso_ms("2026-12-04T15:12:20.801Z")
    assert [ccmon.uuid7_ms(text) for text in ("01a2419d-0b41-4c62-9c64-d73d443f5666", "turn-1", "")] == [None] * 3
    base = ccmon.parse_iso_ms(hours_ago(2))

    def at(ms: int) -> str:
        return ccmon.iso_from_ms(ms)

    prompt = {"event.name": "codex.user_prompt", "conversation.id": "c-9", "prompt": "hi", "model": "gpt-5.5"}
    server.logs_stub().Export(agent_logs_request([
        {**prompt, "event.timestamp": at(base + 100)}, codex_response(at(base + 200), "c-9"),
        codex_response(at(base + 300), "c-9", input_token_count="4690", cached_token_count=1356),  # $0.020018
        {**prompt, "event.timestamp": at(base + 5000)}, codex_response(at(base + 5100), "c-9")],
        {"service.name": "codex-app-server"}))
    assert stats(server).total_cost.amount == pytest.approx(0.011344 + 0.020018 + 0.011344, abs=1e-12)
    server.logs_stub().Export(agent_logs_request([
        {"event.name": "codex.turn_cost", "event.timestamp": at(base + 150_000), "conversation.id": "c-9",
         "turn.id": uuid7(base), "usage.estimated_usd": "0.012345", "turn.interrupted": False}],
        {"service.name": "codex-app-server"}))
    assert db_rows(server.db, "SELECT ts - ?, cost_nanos, origin FROM requests ORDER BY ts", (base,)) == [
        (200, 4_465_330, ccmon.ORIGIN_EVENT), (300, 7_879_670, ccmon.ORIGIN_EVENT),  # $0.012345 as 11344 : 20018
        (5100, 11_344_000, ccmon.ORIGIN_EVENT_ESTIMATED)]
    assert stats(server).total_cost.amount == pytest.approx(0.012345 + 0.011344, abs=1e-12)
    [session] = server.query().GetSessions(ccmon_pb2.GetSessionsRequest(agent=ccmon.ALL_AGENTS,
                                                                        start_time=ts(hours_ago(3)))).sessions
    assert (session.source, session.stats.total_requests) == ("events*", 3)  # one request still estimated


def test_report_session_names_each_sessions_agent_and_tells_codexs_conversations_apart(server, tmp_path):
    for tool, protocol in (("gemini-cli-0.61.0", "grpc"), ("codex-0.169.0", "http-json"), ("qwen-code-0.24.4", "grpc")):
        replay(server, agent_capture(tool, protocol), ("logs",))
    rows = json.loads(run_report(server, "session", "--since", "2026-12-01", "--json", cwd=tmp_path).stdout)["rows"]
    assert sorted((r["agent"], r["source"], r["requests"]) for r in rows) == sorted(
        [("gemini-cli", "events*", 1), ("gemini-cli", "events*", 2), ("gemini-cli", "events*", 3),
         ("codex", "events*", 1), ("codex", "events*", 2),
         *(("qwen-code", "events*", n) for n in (2, 2, 2, 2, 2))])
    table = run_report(server, "session", "--since", "2026-12-01", cwd=tmp_path).stdout
    # Codex's conversation ids (UUIDv7) begin with the time: their last 8 characters tell them apart
    assert {"e1b6dd8c", "3a736a7e"} <= {line.split()[0] for line in table.splitlines()[3:]}, table


def test_claude_codes_figures_do_not_change_by_a_cent_when_other_agents_are_used_too(server):
    """Base and premium (what Claude's plans and limits count) and Claude's 5-hour blocks are Claude Code's alone;
    the totals add the other agents' usage, which a client reads as what the total has beyond the two."""
    claude = [("api_request", api_request(n, f"2026-12-04T15:0{n}:00.000Z", model=model, session="s-claude",
                                          input_tokens=1000, output_tokens=100, cost_usd=0.5))
              for n, model in ((1, "claude-sonnet-4-5"), (2, "claude-haiku-4-5"))]
    sdk_export(server.port, claude)
    december = ccmon_pb2.GetStatsRequest(agent=ccmon.ALL_AGENTS, start_time=ts("2026-12-01T00:00:00Z"))
    blocks_request = ccmon_pb2.GetBlocksRequest(start_time=ts("2026-12-04T00:00:00Z"),
                                                end_time=ts("2026-12-05T00:00:00Z"))
    before = (server.query().GetStats(december).stats, server.query().GetBlocks(blocks_request).blocks)
    for tool, protocol in (("codex-0.169.0", "http-json"), ("gemini-cli-0.61.0", "grpc")):
        replay(server, agent_capture(tool, protocol))  # 3 and 6 calls within the same hour
    after = server.query().GetStats(december).stats
    for field in ("base_requests", "premium_requests", "base_tokens", "premium_tokens", "base_cost", "premium_cost"):
        assert getattr(after, field) == getattr(before[0], field), field
    assert (after.total_requests, after.total_tokens.total) == (2 + 3 + 6, 2200 + 3 * 2434 + 6 * 1413)
    split = ccmon.split_from_stats(after)
    assert (split.other.requests, split.other.total, split.other.cost_nanos) == (9, 3 * 2434 + 6 * 1413,
                                                                                3 * 11_344_000 + 670_380)
    assert list(server.query().GetBlocks(blocks_request).blocks) == list(before[1])
    assert ccmon.split_from_stats(before[0]).other == ccmon.Usage()
    # Claude's weekly caps are by family of Claude's models: the other agents' models are no family's, nor premium
    models = server.query().GetModelStats(ccmon_pb2.GetModelStatsRequest(
        agent=ccmon.ALL_AGENTS, start_time=ts("2026-12-01T00:00:00Z")))
    assert {(m.model, m.agent, m.premium) for m in models.models} == {
        ("claude-sonnet-4-5", "claude-code", True), ("claude-haiku-4-5", "claude-code", False),
        ("gpt-5.5", "codex", False), ("gemini-2.5-flash", "gemini-cli", False),
        ("gemini-3.8-flash", "gemini-cli", False), ("gemini-3.5-flash-lite", "gemini-cli", False)}
    assert ccmon.usage_by_family(map(ccmon.model_usage_of, models.models)) == {
        "haiku": ccmon.Usage(1, 1000, 100, 0, 0, 500_000_000), "sonnet": ccmon.Usage(1, 1000, 100, 0, 0, 500_000_000)}
    # Claude Code's status line says what Claude Code cost today
    assert ccmon.status_values({}, ccmon.LimitReading("s", 0), None, split, ccmon.ZoneInfo("UTC"), 0) == \
        {"daily_cost": ccmon.format_cost(split.claude.cost_nanos)} and split.claude.cost_nanos == 1_000_000_000


def test_every_tab_and_report_shows_other_agents_usage(server, tmp_path):
    """The monitor's tabs and every report, on a server holding Claude Code's and the three other agents' usage:
    each answers, and the period's total is every agent's."""
    sdk_export(server.port, [("api_request", api_request(1, hours_ago(0.5), session="s-claude", input_tokens=1000,
                                                         output_tokens=100, cost_usd=0.5))])
    later = ccmon.parse_iso_ms(hours_ago(0.2))
    server.logs_stub().Export(agent_logs_request([codex_response(ccmon.iso_from_ms(later), "c-now")],
                                                 {"service.name": "codex_exec"}))
    client, settings, now = ccmon.Client(server.target), _settings(block_hour=None), int(time.time() * 1000)
    try:
        current = ccmon.fetch_snapshot(client, ccmon.query_for(ccmon.ViewState(period="d"), settings, now))
        lines = frame_text(ccmon.ViewState(period="d"), current, settings, 120, 30, now)[0]
        rows = {line.split()[0]: line.split()[1] for line in lines if line.split()[:1] in
                (["Premium"], ["Others"], ["Codex"], ["Total"])}
        assert rows == {"Premium": "1", "Codex": "1", "Total": "2"}, "\n".join(lines)  # a row per other agent
        for tab in ("daily", "models", "sessions", "tools", "users", "blocks", "projects"):
            state = ccmon.ViewState(tab=tab, period="d")
            snap = ccmon.fetch_snapshot(client, ccmon.query_for(state, settings, now))
            assert not snap.unanswered, tab
            frame_text(state, snap, settings, 120, 30, now)
    finally:
        client.close()
    for kind in ccmon.REPORT_KINDS:
        report = run_ccmon(["report", kind, "--monitor-server", server.target, "--json"], tmp_path)
        assert report.returncode == 0, (kind, report.stderr)
        if kind not in ("blocks", "session", "model", "limits"):  # limits: readings, no totals
            assert json.loads(report.stdout)["totals"]["requests"] == 2, kind
    assert json.loads(run_ccmon(["report", "blocks", "--monitor-server", server.target, "--json"], tmp_path).stdout
                      )["totals"]["requests"] == 1  # Claude's blocks: Claude Code's request alone


def test_reports_by_agent_and_of_one_agent(server, tmp_path):
    """`report agent` gives each agent's usage; `--agent` keeps one agent's in every report, exactly (the server's
    agent filter); blocks are Claude's alone; a misspelt agent is named."""
    sdk_export(server.port, [("api_request", api_request(n, f"2026-12-04T15:0{n}:00.000Z", model=model,
                                                         session="s-claude", input_tokens=1000, output_tokens=100,
                                                         cost_usd=0.5))
                             for n, model in ((1, "claude-sonnet-4-5"), (2, "claude-haiku-4-5"))])
    for tool, protocol in (("codex-0.169.0", "http-json"), ("gemini-cli-0.61.0", "grpc")):
        replay(server, agent_capture(tool, protocol))

    def report(*args: str) -> dict:
        answer = run_report(server, *args, "--since", "2026-12-01", "--json", cwd=tmp_path)
        assert answer.returncode == 0, answer.stderr
        return json.loads(answer.stdout)

    agents = report("agent")
    assert [(r["agent"], r["models"], r["requests"], r["total_tokens"], r["cost_usd"]) for r in agents["rows"]] == [
        ("claude-code", 2, 2, 2200, 1.0), ("codex", 1, 3, 3 * 2434, 0.034032), ("gemini-cli", 3, 6, 6 * 1413, 0.00067038)]
    assert agents["totals"]["requests"] == 11 and agents["agent"] is None
    for agent, requests, tokens, cost in (("claude-code", 2, 2200, 1.0), ("codex", 3, 3 * 2434, 0.034032),
                                          ("gemini-cli", 6, 6 * 1413, 0.00067038), ("qwen-code", 0, 0, 0)):
        for kind in ("daily", "weekly", "monthly", "model", "project", "session", "agent"):
            one = report(kind, "--agent", agent)
            assert one["agent"] == agent
            assert (one["totals"]["requests"], one["totals"]["total_tokens"], one["totals"]["cost_usd"]) == \
                (requests, tokens, cost), (agent, kind, one)
        assert sum(r["sessions"] for r in report("project", "--agent", agent)["rows"]) == \
            len(report("session", "--agent", agent)["rows"]) == {"claude-code": 1, "codex": 2, "gemini-cli": 3,
                                                                 "qwen-code": 0}[agent]
    assert {r["model"] for r in report("model", "--agent", "gemini-cli")["rows"]} == {
        "gemini-2.5-flash", "gemini-3.8-flash", "gemini-3.5-flash-lite"}
    assert report("blocks", "--agent", "claude-code")["totals"]["requests"] == 2
    # A project of Claude Code's beside its sessions without one: each row the agent's own, none counted twice
    sdk_export(server.port, [("api_request", api_request(3, "2026-12-04T16:00:00.000Z", model="claude-sonnet-4-5",
                                                         session="s-alpha", input_tokens=10, cost_usd=0.25))],
               resource={**CLAUDE_RESOURCE, "project": "alpha"})
    sdk_export(server.port, [("api_request", api_request(4, "2026-12-04T16:01:00.000Z", model="claude-sonnet-4-5",
                                                         session="s-alpha-dir", input_tokens=10, cost_usd=0.125))],
               resource={**CLAUDE_RESOURCE, "project": "/home/dev/alpha"})  # a folder ending like the name above
    assert [(r["project"], r["sessions"], r["requests"], r["cost_usd"])
            for r in report("project", "--agent", "claude-code")["rows"]] == [
        ("", 1, 2, 1.0), ("alpha", 1, 1, 0.25), ("/home/dev/alpha", 1, 1, 0.125)]
    assert [(r["project"], r["sessions"], r["requests"]) for r in report("project", "--agent", "codex")["rows"]] == \
        [("", 2, 3)]
    table = run_report(server, "agent", "--since", "2026-12-01", "--chart", cwd=tmp_path).stdout
    assert [line.split()[0] for line in table.splitlines()[3:6]] == ["claude-code", "codex", "gemini-cli"], table
    refused = run_report(server, "blocks", "--agent", "codex", cwd=tmp_path)
    assert (refused.returncode, refused.stderr) == (2, "ccmon: config error: --agent codex: blocks are Claude's "
                                                       "5-hour windows, "
                                                       "Claude Code's usage alone (use --agent claude-code, or the "
                                                       "daily report)\n")
    for args, message in ((["limits", "--agent", "codex", "--chart"], "--chart: the limits report charts Claude's "
                           "own limits, not codex's plan's (leave out --chart or --agent)"),
                          (["daily", "--agent", "codex", "--since", "2000-01-01", "--until", "2010-01-08"],
                           "--since 2000-01-01: the daily report covers at most 3660 days, this period 3661: give "
                           "a later --since or an earlier --until")):
        refused = run_report(server, *args, cwd=tmp_path)
        assert (refused.returncode, refused.stderr) == (2, f"ccmon: config error: {message}\n")
    misspelt = run_report(server, "daily", "--agent", "copilot", cwd=tmp_path)
    assert misspelt.returncode == 2 and "argument --agent: invalid choice: 'copilot' (choose from 'claude-code', " \
        "'gemini-cli', 'codex', 'qwen-code')" in misspelt.stderr, misspelt.stderr


def test_other_agents_tool_calls_count_in_the_tools_and_sessions_figures(server):
    """Gemini CLI's and Qwen Code's tool_call events and Codex's tool_result are tool calls, as Claude Code's
    tool_result is: by tool (their function_name or tool_name), with their outcome and time, per agent with the
    agent filter, and in each session's figures and timeline."""
    for tool, protocol in (("gemini-cli-0.61.0", "grpc"), ("codex-0.169.0", "http-json"),
                           ("qwen-code-0.24.4", "http-json")):
        replay(server, agent_capture(tool, protocol))
    gemini_session = "cb9e9094-e2b9-4be9-863c-c14f28e48205"  # a failed call in the capture's Gemini session
    server.logs_stub().Export(agent_logs_request([{
        "event.name": "gemini_cli.tool_call", "event.timestamp": "2026-12-04T15:08:30.000Z", "session.id": gemini_session,
        "function_name": "read_file", "duration_ms": 40, "success": False, "decision": "accept"}],
        {"service.name": "gemini-cli"}))
    query = server.query()
    report = {agent: [(t.tool, t.calls, t.successes, t.p50_duration_ms, t.p95_duration_ms) for t in query.GetToolStats(
        ccmon_pb2.GetToolStatsRequest(start_time=ts("2026-12-01T00:00:00Z"), agent=agent)).tools]
        for agent in (ccmon.ALL_AGENTS, "claude-code", "gemini-cli", "codex", "qwen-code")}
    assert report == {  # each as the capture has it: its one call, its time and outcome
        ccmon.ALL_AGENTS: [("exec_command", 1, 1, 62, 62), ("glob", 1, 1, 67, 67), ("list_directory", 1, 1, 18, 18),
             ("read_file", 1, 0, 40, 40)],
        "claude-code": [], "gemini-cli": [("list_directory", 1, 1, 18, 18), ("read_file", 1, 0, 40, 40)],
        "codex": [("exec_command", 1, 1, 62, 62)], "qwen-code": [("glob", 1, 1, 67, 67)]}
    sessions = query.GetSessions(ccmon_pb2.GetSessionsRequest(
        agent=ccmon.ALL_AGENTS, start_time=ts("2026-12-01T00:00:00Z"))).sessions
    assert sorted((s.agent, s.session_id, s.tool_calls, s.tool_failures) for s in sessions if s.tool_calls) == [
        ("codex", "01a2419c-b185-7341-aec7-b1dae1b6dd8c", 1, 0), ("gemini-cli", gemini_session, 2, 1),
        ("qwen-code", "08f64f90-5de8-4db9-8019-8dbb054d5aad", 1, 0)]
    client = ccmon.Client(server.target)
    try:
        calls = [ccmon.timeline_cells(entry) for entry in client.timeline(gemini_session)
                 if entry.kind == "gemini_cli.tool_call"]
    finally:
        client.close()
    assert calls == [("list_directory", "", "ok, 18ms"), ("read_file", "", "failed, 40ms")]


def one_request_batch(n: int) -> ccmon.Batch:
    at = ccmon.parse_iso_ms("2026-03-01T10:00:00Z")
    return ccmon.Batch(requests=[(at + n * 3600_000, f"s{n}", n, "claude-sonnet-4-5", "", 10 * n, 1, 0, 0, 1000 * n,
                                  0, None, None, None, None, None, 0, "claude-code")])


def test_a_rollup_key_made_and_emptied_in_one_transaction_is_not_kept(tmp_path):
    """Claude Code's cost metric of a session, then its first api_request event a quarter hour later, in one group
    of jobs: the metric-derived row is made and replaced in the same transaction (the rollups are summed once a
    transaction), and its quarter hour, hour and day keys are left with no rows: none of them is kept as a row of
    zeros (a day of zeros in total_daily would also say the model had usage)."""
    at = ccmon.parse_iso_ms("2026-03-01T10:05:00Z")
    metric = ccmon.Batch(metrics=[(at, at - 60_000, "s1", 1, "", "claude_code.cost.usage", 1, 0.25,
                                   "claude-sonnet-4-5", None, None, "{}")])
    event = ccmon.Batch(requests=[(at + 20 * 60_000, "s1", 7, "claude-sonnet-4-5", "", 10, 1, 0, 0, 250_000_000, 0,
                                   None, None, None, None, None, 0, "claude-code")])
    store = ccmon.Writer(tmp_path / "emptied.db")
    try:
        running, release = threading.Event(), threading.Event()
        holding = store.submit(lambda conn: running.set() or release.wait(30))
        assert running.wait(30)  # the writer is busy: the two jobs below make one group
        jobs = [store.submit(lambda conn, batch=batch: store._insert(conn, batch)) for batch in (metric, event)]
        release.set()
        holding.result(30)
        assert [job.result(30) for job in jobs] == [1, 1]
    finally:
        store.close()
    assert db_rows(tmp_path / "emptied.db", "SELECT origin, ts FROM requests") == [(0, at + 20 * 60_000)]
    assert db_rows(tmp_path / "emptied.db", "SELECT COUNT(*) FROM usage_rollup WHERE rows = 0") == [(0,)]
    assert_rollups_are_their_rows(tmp_path / "emptied.db")


def test_a_write_is_answered_only_once_the_wal_is_on_disk(tmp_path, monkeypatch):
    """The writer commits without an fsync and goes on; its syncer thread answers a group only after the -wal's
    fsync returns: while that fsync waits, the rows are committed (a reader sees them) and their writer is not
    answered, and the writer commits the next group meanwhile."""
    store = ccmon.Writer(tmp_path / "sync.db")
    syncing, disk = threading.Event(), threading.Event()
    fsync = os.fsync

    def slow_disk(fd):
        syncing.set()
        assert disk.wait(30)
        fsync(fd)

    monkeypatch.setattr(ccmon.os, "fsync", slow_disk)
    try:
        first = store.submit(lambda conn: store._insert(conn, one_request_batch(1)))
        assert syncing.wait(30)  # committed, and the syncer is in its fsync
        second = store.submit(lambda conn: store._insert(conn, one_request_batch(2)))
        deadline = time.monotonic() + 30  # the writer, not waiting for the disk, commits the second too
        while db_rows(tmp_path / "sync.db", "SELECT COUNT(*) FROM requests") != [(2,)] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert db_rows(tmp_path / "sync.db", "SELECT seq FROM requests ORDER BY seq") == [(1,), (2,)]
        assert not first.done() and not second.done()
        disk.set()
        assert (first.result(30), second.result(30)) == (1, 1)
    finally:
        disk.set()
        store.close()


def test_a_wal_grown_under_an_open_read_is_cut_back_to_its_working_size(tmp_path, monkeypatch):
    """A read kept open stops the checkpoints from copying the -wal, which grows past WAL_CHECKPOINT_PAGES; once the
    read ends and the -wal is copied, the next commits start it over and cut the file back to exactly that many
    pages with their headers (the size it keeps while busy), even when the writer never rests."""
    monkeypatch.setattr(ccmon, "WAL_CHECKPOINT_PAGES", 50)
    monkeypatch.setattr(ccmon.Writer, "_rest", lambda self: None)
    db, wal = tmp_path / "grown.db", tmp_path / "grown.db-wal"
    store = ccmon.Writer(db)
    reader = ccmon.connect(db, readonly=True)
    try:
        page_size = store.submit(lambda conn: conn.execute("PRAGMA page_size").fetchone()[0]).result(30)
        working_size = 32 + 50 * (24 + page_size)
        reader.execute("BEGIN")
        assert reader.execute("SELECT COUNT(*) FROM requests").fetchone() == (0,)
        many = ccmon.Batch(requests=[row for n in range(1, 3001) for row in one_request_batch(n).requests])
        assert store.write(many) == (0, 3000)  # waiting to be applied: see STAGE_MIN_REQUESTS
        store.catch_up()
        assert wal.stat().st_size > 4 * working_size
        reader.execute("COMMIT")
        for n in (3001, 3002):  # the first copies the -wal, the second starts it over
            assert store.write(one_request_batch(n)) == (1, 0)
        assert wal.stat().st_size == working_size
    finally:
        reader.close()
        store.close()
    assert db_rows(db, "SELECT COUNT(*) FROM requests") == [(3002,)]


def test_the_wal_is_cut_to_nothing_when_the_writer_rests_unless_a_read_still_uses_it(tmp_path, monkeypatch):
    """While busy, the writer leaves the -wal at its size (commits overwrite it in place); once it rests, the -wal is
    copied into the database and cut to nothing. A read still using the -wal is not waited for: the file stays,
    the next job is written, and a later rest cuts it."""
    rests = queue.Queue()
    rest = ccmon.Writer._rest
    monkeypatch.setattr(ccmon.Writer, "_rest", lambda self: (rest(self), rests.put(None)))
    db = tmp_path / "rest.db"
    wal = tmp_path / "rest.db-wal"
    store = ccmon.Writer(db)
    reader = ccmon.connect(db, readonly=True)
    busy_timeout = lambda conn: conn.execute("PRAGMA busy_timeout").fetchone()[0]  # noqa: E731
    try:
        waits = store.submit(busy_timeout).result(30)
        assert waits > 0
        assert store.write(one_request_batch(1)) == (1, 0)
        rests.get(timeout=30)
        assert wal.stat().st_size == 0
        reader.execute("BEGIN")  # a read from the database file alone, kept open
        assert reader.execute("SELECT COUNT(*) FROM requests").fetchone() == (1,)
        assert store.write(one_request_batch(2)) == (1, 0)
        rests.get(timeout=30)
        assert wal.stat().st_size > 0  # its frames could not be copied under the open read
        assert store.write(one_request_batch(3)) == (1, 0)  # the writer did not wait for the read
        assert store.submit(busy_timeout).result(30) == waits  # for the writes: the rest did without
        reader.execute("COMMIT")
        rests.get(timeout=30)
        assert wal.stat().st_size == 0
        assert db_rows(db, "SELECT seq FROM requests ORDER BY seq") == [(1,), (2,), (3,)]
    finally:
        reader.close()
        store.close()


def test_a_failed_fsync_stops_acknowledging_until_a_restart(tmp_path, monkeypatch, caplog):
    """When the -wal cannot be made durable, what was committed is not acknowledged, and nothing after it is, even
    once fsync works again (the kernel may have dropped the pages it failed to write, and SQLite's recovery stops at
    the first frame missing): exporters are told to retry until the server restarts; then what they send again is
    stored once."""
    store = ccmon.Writer(tmp_path / "eio.db")
    refusal = r"^the database could not be written to disk \(Input/output error\); check the disk, then restart the " \
        r"server$"

    def failing_disk(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    try:
        monkeypatch.setattr(ccmon.os, "fsync", failing_disk)
        with pytest.raises(ccmon.StorageUnavailable, match=refusal):
            store.write(one_request_batch(1))
        monkeypatch.undo()
        for n in (2, 1):  # a new export, and the first sent again
            with pytest.raises(ccmon.StorageUnavailable, match=refusal) as refused:
                store.write(one_request_batch(n))
            assert refused.value.retry_after_s == 30
    finally:
        monkeypatch.undo()
        store.close()
    assert "COULD NOT BE WRITTEN TO DISK: [Errno 5] Input/output error" in caplog.text
    store = ccmon.Writer(tmp_path / "eio.db")  # restarted
    try:
        assert store.write(one_request_batch(1)) in ((0, 0), (1, 0))  # on disk or not, it is there once now
        assert store.write(one_request_batch(2)) == (1, 0)
    finally:
        store.close()
    assert db_rows(tmp_path / "eio.db", "SELECT seq, input_tokens FROM requests ORDER BY seq") == [(1, 10), (2, 20)]


def test_a_job_that_fails_is_rolled_back_alone_and_its_group_is_stored_once(tmp_path, caplog):
    """The writer commits a group of jobs without a savepoint per job; when one fails, the group runs again with
    them: the failed job's answer is its error (logged once), every other job's rows are stored once, and the
    rollups are exactly those rows' (nothing of the first, rolled-back run is left in them)."""
    store = ccmon.Writer(tmp_path / "group.db")

    def failing(conn):
        store._insert(conn, one_request_batch(9))  # written, then undone with its job
        raise ValueError("a bug of ccmon's")

    try:
        running, release = threading.Event(), threading.Event()
        holding = store.submit(lambda conn: running.set() or release.wait(30))
        assert running.wait(30)  # the writer is busy: the jobs below queue up and make one group
        jobs = [store.submit(lambda conn, n=n: store._insert(conn, one_request_batch(n))) for n in (1, 2)]
        jobs.insert(1, store.submit(failing))
        jobs.append(store.submit(lambda conn: store._insert(conn, one_request_batch(3))))
        release.set()
        holding.result(30)
        assert [jobs[i].result(30) for i in (0, 2, 3)] == [1, 1, 1]
        with pytest.raises(ccmon.StorageUnavailable, match="the write failed: a bug of ccmon's"):
            jobs[1].result(30)
    finally:
        store.close()
    assert db_rows(tmp_path / "group.db", "SELECT seq, input_tokens FROM requests ORDER BY seq") == \
        [(1, 10), (2, 20), (3, 30)]
    assert db_rows(tmp_path / "group.db", "SELECT SUM(rows), SUM(input_tokens), SUM(cost_nanos) FROM usage_rollup"
                   ) == [(3, 60, 6000)]
    assert_rollups_are_their_rows(tmp_path / "group.db")
    assert [r.message for r in caplog.records].count("a write failed and was rolled back: ValueError(\"a bug of "
                                                     "ccmon's\")") == 1


def test_a_model_stays_the_agent_whose_usage_first_named_it(tmp_path):
    """Qwen Code naming claude-sonnet-4-5 (through an Anthropic-compatible endpoint) after Claude Code used it takes
    none of Claude Code's usage away: the model stays Claude Code's (and Qwen's calls of it count as Claude Code's:
    the rollups tell agents apart by model); a model no usage named before is the naming agent's."""
    store, reader = ccmon.Writer(tmp_path / "own.db"), ccmon.Reader(tmp_path / "own.db")
    at = ccmon.parse_iso_ms("2026-03-01T10:00:00Z")

    def row(n, session, model, agent, cost):
        return (at + n, session, n, model, "", 10, 1, 0, 0, cost, 0, None, None, None, None, None,
                0 if agent == "claude-code" else 4, agent)

    try:
        store.write(ccmon.Batch(requests=[row(1, "s-claude", "claude-sonnet-4-5", "claude-code", 5000)]))
        store.write(ccmon.Batch(requests=[row(2, "s-qwen", "claude-sonnet-4-5", "qwen-code", 9),
                                          row(3, "s-qwen", "qwen3-coder-plus", "qwen-code", 7)]))
        assert reader.model_agents() == {"qwen3-coder-plus": "qwen-code"}
        assert {agent: sum(u.cost_nanos for u in reader.usage(at, at + 60_000, agent=agent).values())
                for agent in ("claude-code", "qwen-code")} == {"claude-code": 5009, "qwen-code": 7}
    finally:
        store.close()


AGENT_FILTERED = ("GetStats", "GetAPIRequests", "GetUsage", "GetModelStats", "GetSessions", "GetToolStats",
                  "GetUsers", "GetBlocks", "GetProjects", "GetSeries")


def test_every_query_keeps_one_agents_usage_when_asked(server):
    """The QueryService's `agent` field keeps one agent's usage in every figure, exactly as `report agent` sums it
    (the same rows: its models'); "all" keeps every agent's, and no agent Claude Code's alone, as every call meant
    before other agents were received (the Go monitor sees what it saw); an unknown agent is refused by every call,
    and blocks by another agent."""
    sdk_export(server.port, [("api_request", api_request(n, f"2026-12-04T15:0{n}:00.000Z", model=model,
                                                         session="s-claude", input_tokens=1000, output_tokens=100,
                                                         cost_usd=0.5))
                             for n, model in ((1, "claude-sonnet-4-5"), (2, "claude-haiku-4-5"))] +
               [("tool_result", {"event.name": "tool_result", "event.timestamp": "2026-12-04T15:03:00.000Z",
                                 "event.sequence": 3, "session.id": "s-claude", "tool_name": "Bash", "success": "true",
                                 "duration_ms": "88"})])
    for tool, protocol in (("codex-0.169.0", "http-json"), ("gemini-cli-0.61.0", "grpc")):
        replay(server, agent_capture(tool, protocol))
    query, start = server.query(), ts("2026-12-01T00:00:00Z")
    for agent, requests, tokens, cost_nanos, sessions in (
            ("claude-code", 2, 2200, 1_000_000_000, 1), ("codex", 3, 3 * 2434, 34_032_000, 2),
            ("gemini-cli", 6, 6 * 1413, 670_380, 3), ("qwen-code", 0, 0, 0, 0), ("", 2, 2200, 1_000_000_000, 1),
            ("all", 11, 2200 + 3 * 2434 + 6 * 1413, 1_034_702_380, 6)):
        kept = {"": "claude-code", "all": None}.get(agent, agent)  # the agent whose usage is kept, None: all
        def total(stats):
            usage = ccmon.split_from_stats(stats).total
            return usage.requests, usage.total, usage.cost_nanos

        def summed(splits):
            usage = sum((split.total for split in splits), ccmon.Usage())
            return usage.requests, usage.total, usage.cost_nanos

        wanted, period = (requests, tokens, cost_nanos), {"start_time": start, "agent": agent}
        assert total(query.GetStats(ccmon_pb2.GetStatsRequest(**period)).stats) == wanted, agent
        page = query.GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(**period, oldest_first=True))
        assert (page.total_count, len(page.requests)) == (requests, requests)
        assert {r.agent for r in page.requests} == ({kept} if kept and requests else
                                                    {"claude-code", "codex", "gemini-cli"} if not kept else set())
        days = query.GetUsage(ccmon_pb2.GetUsageRequest(**period, timezone="Asia/Tokyo")).days
        assert summed(ccmon.split_from_stats(day.stats) for day in days) == wanted
        models = query.GetModelStats(ccmon_pb2.GetModelStatsRequest(**period)).models
        assert summed(ccmon.Split(ccmon.model_usage_of(m).usage) for m in models) == wanted
        assert {m.agent for m in models} <= {kept} | ({"claude-code", "codex", "gemini-cli"} if not kept else set())
        found = query.GetSessions(ccmon_pb2.GetSessionsRequest(**period)).sessions
        assert (len(found), summed(ccmon.split_from_stats(s.stats) for s in found)) == (sessions, wanted)
        users = query.GetUsers(ccmon_pb2.GetUsersRequest(**period)).users
        assert summed(ccmon.split_from_stats(u.stats) for u in users) == wanted
        projects = query.GetProjects(ccmon_pb2.GetProjectsRequest(**period)).projects
        assert (sum(p.sessions for p in projects), summed(ccmon.split_from_stats(p.stats) for p in projects)) == \
            (sessions, wanted)
        series = query.GetSeries(ccmon_pb2.GetSeriesRequest(**period, bucket="hour", group_by="model"))
        assert summed(ccmon.split_from_stats(p.stats) for p in series.points) == wanted
        tools = query.GetToolStats(ccmon_pb2.GetToolStatsRequest(**period)).tools
        assert [(t.tool, t.calls) for t in tools] == {
            "claude-code": [("Bash", 1)], "codex": [("exec_command", 1)], "gemini-cli": [("list_directory", 1)],
            "qwen-code": [], None: [("Bash", 1), ("exec_command", 1), ("list_directory", 1)]}[kept]
    # The monitor: `g` cycles through the period's agents (and back to all); every tab then shows that one's
    client, settings, now = ccmon.Client(server.target), _settings(block_hour=None), ccmon.parse_iso_ms(
        "2026-12-04T16:00:00Z")
    try:
        state, names = ccmon.ViewState(period="d"), []
        for _ in range(4):
            snap = ccmon.fetch_snapshot(client, ccmon.query_for(state, settings, now))
            lines, frame = frame_text(state, snap, settings, 120, 30, now)
            total = next(line.split() for line in lines if line.split()[:1] == ["Total"])
            names.append((state.agent, total[1], frame.agent_names))
            assert ("| agent " + str(state.agent) + " |" in lines[2]) == (state.agent is not None), lines[2]
            for tab in ("daily", "models", "sessions", "tools", "users", "blocks", "projects", "charts"):
                tab_state = dataclasses.replace(state, tab=tab)
                tab_snap = ccmon.fetch_snapshot(client, ccmon.query_for(tab_state, settings, now))
                assert not tab_snap.unanswered, tab
                frame_text(tab_state, tab_snap, settings, 120, 30, now)
            assert ccmon.handle_key(state, "g", settings, frame)[1] == "refresh"
            state = ccmon.handle_key(state, "g", settings, frame)[0]
        assert names == [(agent, requests, ("claude-code", "gemini-cli", "codex"))
                         for agent, requests in ((None, "11"), ("claude-code", "2"), ("gemini-cli", "6"), ("codex", "3"))]
        assert state.agent is None  # after the last agent, every agent's again
        alone = ccmon.handle_key(state, "g", settings, dataclasses.replace(frame, agent_names=("claude-code",)))
        assert alone == (dataclasses.replace(state, notice="one agent's usage in this period: nothing to filter by"), "")
    finally:
        client.close()
    blocks = query.GetBlocks(ccmon_pb2.GetBlocksRequest(start_time=start, agent="claude-code")).blocks
    assert [b.stats.total_requests for b in blocks] == [2]
    with pytest.raises(grpc.RpcError) as refused:
        query.GetBlocks(ccmon_pb2.GetBlocksRequest(start_time=start, agent="codex"))
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "blocks are Claude's 5-hour windows, of Claude Code's usage alone: not "
                                          "codex's")
    for method in AGENT_FILTERED:
        with pytest.raises(grpc.RpcError) as refused:
            getattr(query, method)(getattr(ccmon_pb2, f"{method}Request")(agent="copilot", **(
                {"bucket": "day"} if method == "GetSeries" else {})))
        assert (refused.value.code(), refused.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, "unknown agent 'copilot' (known: claude-code, gemini-cli, codex, "
                                              "qwen-code), or 'all'"), method


def test_pricing_in_the_config_prices_another_agents_model(tmp_path):
    """Gemini 3.8 Flash is not in the bundled table (its calls cost $0 there); [pricing] gives it one, and
    overrides the bundled price of Gemini 2.5 Flash."""
    config = tmp_path / "config.toml"
    config.write_text('[pricing]\n"gemini-3.8-flash" = {input = 0.5, output = 3, cache_read = 0.05}\n'
                      '"gemini-2.5-flash" = {input = 1, output = 10, cache_read = 0.1}\n'
                      '"gemini-3.5-flash-lite" = {input = 0.1, output = 0.4}\n')
    srv = ServerProcess(tmp_path, "--config", str(config)).start()
    try:
        replay(srv, agent_capture("gemini-cli-0.61.0", "grpc"))
        models = {m.model: (m.requests, round(m.cost.amount, 9)) for m in srv.query().GetModelStats(
            ccmon_pb2.GetModelStatsRequest(agent=ccmon.ALL_AGENTS, start_time=ts("2026-01-01T00:00:00Z"))).models}
    finally:
        srv.stop()
    # 789 input, 168 output, 456 cache read a call; the router's cache read at 0.1 x input, [pricing]'s default
    assert models == {"gemini-3.8-flash": (3, 0.0027639), "gemini-2.5-flash": (1, 0.0025146),  # $921.3, $2514.6 and
                      "gemini-3.5-flash-lite": (2, 0.00030132)}                             # $150.66 a million calls


def test_a_readable_name_from_the_resource_wins_over_the_hashed_user_id(server):
    """Claude Code puts a hashed user.id on every event; OTEL_RESOURCE_ATTRIBUTES=user.email=... names the user."""
    hashed = "f" * 64
    events = [("api_request", {**api_request(1, hours_ago(1), session="s-dee", cost_usd=0.5), "user.id": hashed})]
    assert sdk_export(server.port, events, resource={**CLAUDE_RESOURCE, "user.email": "dee@example.com"}) == \
        ["SUCCESS"]
    assert sdk_export(server.port, [("api_request", {**api_request(2, hours_ago(1), session="s-anon"),
                                                     "user.id": hashed})]) == ["SUCCESS"]
    users = {u.user: u.stats.total_cost.amount for u in server.query().GetUsers(ccmon_pb2.GetUsersRequest()).users}
    assert users == {"dee@example.com": 0.5, hashed: 0.0}


# Every attribute ccmon reads: on log records (api_request and the other events), on a resource, on metric points.
RECORD_KEYS = ["event.name", "event.timestamp", "event.sequence", "session.id", "model", "input_tokens",
               "output_tokens", "cache_read_tokens", "cache_creation_tokens", "cost_usd", "cost_usd_micros",
               "duration_ms", "ttft_ms", "prompt.id", "request_id", *ccmon.IDENTITY_KEYS]
RESOURCE_KEYS = [*ccmon.USER_KEYS, "project"]
POINT_KEYS = ["session.id", "model", "type", *ccmon.IDENTITY_KEYS]


def every_any_value_kind():
    """AnyValues of each kind OTLP has: string, bool, int, double, array (empty or not), kvlist, bytes, unset."""
    from hypothesis import strategies as st
    scalar = st.one_of(st.text(max_size=8).map(lambda v: common_pb2.AnyValue(string_value=v)),
                       st.booleans().map(lambda v: common_pb2.AnyValue(bool_value=v)),
                       st.integers(-2 ** 63, 2 ** 63 - 1).map(lambda v: common_pb2.AnyValue(int_value=v)),
                       st.floats().map(lambda v: common_pb2.AnyValue(double_value=v)))
    return st.one_of(
        scalar, st.just(common_pb2.AnyValue()), st.binary(max_size=8).map(lambda v: common_pb2.AnyValue(bytes_value=v)),
        st.lists(scalar, max_size=3).map(lambda vs: common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=vs))),
        st.dictionaries(st.text(max_size=4), scalar, max_size=3).map(lambda kv: common_pb2.AnyValue(
            kvlist_value=common_pb2.KeyValueList(values=[common_pb2.KeyValue(key=k, value=v) for k, v in kv.items()]))))


def with_value(key_values, key: str, value: common_pb2.AnyValue) -> None:
    """Set `key` in a repeated KeyValue field to `value`, added if absent."""
    found = next((kv for kv in key_values if kv.key == key), None) or key_values.add(key=key)
    found.value.CopyFrom(value)


def test_any_value_of_any_kind_in_any_attribute_read_costs_at_most_its_own_record(tmp_path):
    """One attribute of an unexpected kind (user.id as an empty array used to fail the whole export in the
    decoder's memo) is taken as text, or rejects its record with a reason naming it: never the export, never
    the good record beside it; and every JSON stored stays readable by SQLite's json functions."""
    from hypothesis import HealthCheck, example, given, settings, strategies as st
    receiver, when, numbers = ccmon.Receiver(ccmon.Writer(tmp_path / "fuzz.db")), hours_ago(1), iter(range(10 ** 6))
    where = st.one_of(st.tuples(st.just("record"), st.sampled_from(RECORD_KEYS)),
                      st.tuples(st.just("resource"), st.sampled_from(RESOURCE_KEYS)),
                      st.tuples(st.just("point"), st.sampled_from(POINT_KEYS)))

    def rows(table: str) -> int:
        return db_rows(tmp_path / "fuzz.db", f"SELECT COUNT(*) FROM {table}")[0][0]

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(where, every_any_value_kind(), st.sampled_from(["api_request", "tool_result"]))
    @example(("record", "session.id"), common_pb2.AnyValue(), "api_request")  # unset: no session, not 'None'
    @example(("record", "user.id"), common_pb2.AnyValue(array_value=common_pb2.ArrayValue()), "api_request")
    def check(place, value, name):
        (part, key), n = place, next(numbers)
        if part == "point":
            points = [metrics_pb2.NumberDataPoint(as_int=3, time_unix_nano=time.time_ns() - 10 ** 12 + n,
                                                  attributes=[common_pb2.KeyValue(key="session.id",
                                                                                  value=any_value(f"s-{n}-{i}"))])
                      for i in range(2)]
            with_value(points[0].attributes, key, value)
            request = metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
                scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metrics_pb2.Metric(
                    name="claude_code.lines_of_code.count", sum=metrics_pb2.Sum(aggregation_temporality=1,
                                                                                 data_points=points))])])])
            before = rows("metric_points")
            answer = receiver.metrics(request.SerializeToString(), "grpc")
            rejected, stored = answer.partial_success.rejected_data_points, rows("metric_points") - before
            assert db_rows(tmp_path / "fuzz.db", "SELECT COUNT(*) FROM mp WHERE session_id = ?", (f"s-{n}-1",)) == \
                [(1,)]
        else:
            bad = {**api_request(n, when, session=f"bad-{n}", input_tokens=1), "event.name": name}
            request = logs_request([(name, bad), ("api_request", api_request(1, when, session=f"good-{n}",
                                                                            input_tokens=7))])
            target = request.resource_logs[0].resource.attributes if part == "resource" else \
                request.resource_logs[0].scope_logs[0].log_records[0].attributes
            with_value(target, key, value)
            before = rows("requests") + rows("events")
            answer = receiver.logs(request.SerializeToString(), "grpc")
            rejected, stored = answer.partial_success.rejected_log_records, rows("requests") + rows("events") - before
            good = db_rows(tmp_path / "fuzz.db", "SELECT input_tokens FROM r WHERE session_id = ?", (f"good-{n}",))
            if part == "record":
                assert good == [(7,)]
            if part == "record" and key in ("session.id", "model") and name == "api_request" and not rejected:
                kind = value.WhichOneof("value")  # a scalar (others are rejected): stored as its text
                text = "" if kind is None else str(getattr(value, kind))
                column = "session_id" if key == "session.id" else "model_name"
                assert db_rows(tmp_path / "fuzz.db", f"SELECT {column} FROM r WHERE session_id != ? AND seq = ?",
                               (f"good-{n}", n)) == [(text or "unknown" if key == "model" else text,)]
        records = 2 if part == "resource" else 1  # a resource's attribute is every record's
        assert (rejected, stored) in ((0, 2), (records, 2 - records))
        if rejected:
            assert re.search(rf"\b{re.escape(key)}( is |=)", answer.partial_success.error_message)

    check()
    for table, column in (("attribute_sets", "attributes"), ("events", "attributes"),
                          ("metric_points", "attributes")):
        assert db_rows(tmp_path / "fuzz.db", f"SELECT COUNT(*) FROM {table} WHERE NOT json_valid({column})") == [(0,)]


def test_a_record_with_an_array_user_id_costs_only_itself_over_grpc_and_http(server):
    """The export of issue #22: records whose user.id is an array (empty or not) among good ones. The decoder
    used to fail on it, then the server decoding it again, and the export failed whole with UNKNOWN."""
    when, answers = hours_ago(1), []
    for protocol in ("grpc", "http"):
        request = logs_request([("api_request", api_request(seq, when, session=protocol, input_tokens=10 ** seq))
                                for seq in range(4)])
        for record, values in zip(request.resource_logs[0].scope_logs[0].log_records[1::2], ([], ["u1", "u2"])):
            with_value(record.attributes, "user.id", common_pb2.AnyValue(array_value=common_pb2.ArrayValue(
                values=[any_value(v) for v in values])))
        if protocol == "grpc":
            answers.append(server.logs_stub().Export(request, timeout=10))
        else:
            response, data = http_post(server.http_port, body=request.SerializeToString())
            assert response.status == 200
            answers.append(logs_service_pb2.ExportLogsServiceResponse.FromString(data))
    for answer in answers:
        assert answer.partial_success.rejected_log_records == 2
        assert answer.partial_success.error_message == \
            "rejected 2 of 4 log records: log record: user.id is an array, not text; " \
            "log record: user.id is an array, not text"
    assert db_rows(server.db, "SELECT session_id, SUM(input_tokens), COUNT(*) FROM r GROUP BY 1 ORDER BY 1") == \
        [("grpc", 101, 2), ("http", 101, 2)]
    assert "Traceback" not in server.log and "a decoder failed" not in server.log


def test_a_record_ccmon_fails_on_costs_only_itself(tmp_path, monkeypatch):
    """Should decoding a record meet a bug of ccmon's (as user.id arrays did, in issue #22), that record is
    rejected with what went wrong, and the records beside it are stored."""
    decode = ccmon.request_row

    def buggy(attrs: dict, *args):
        if attrs["session.id"] == "bug":
            raise KeyError("a bug")
        return decode(attrs, *args)

    monkeypatch.setattr(ccmon, "request_row", buggy)
    receiver, when = ccmon.Receiver(ccmon.Writer(tmp_path / "ccmon.db")), hours_ago(1)
    answer = receiver.logs(logs_request([("api_request", api_request(seq, when, session=session, input_tokens=seq))
                                         for seq, session in ((1, "good"), (2, "bug"), (3, "good"))])
                           .SerializeToString(), "grpc")
    assert (answer.partial_success.rejected_log_records, answer.partial_success.error_message) == \
        (1, "rejected 1 of 3 log records: log record: ccmon failed to decode it (KeyError: 'a bug')")
    assert db_rows(tmp_path / "ccmon.db", "SELECT session_id, input_tokens FROM r ORDER BY seq") == \
        [("good", 1), ("good", 3)]

def test_one_record_cannot_claim_more_than_an_api_call_and_sums_stay_exact(server):
    """Issue #22: 20,000 records of 10^12-1 tokens and $999,999 each made the quarter hour's cost_nanos a float
    past int64, and GetStats from inside that quarter hour UNAVAILABLE for good. Such records are rejected;
    records at the caps are stored and summed exactly, from inside the quarter hour and over the day."""
    quarter = (ccmon.now_ms() - 3 * ccmon.HOUR_MS) // ccmon.BUCKET_MS * ccmon.BUCKET_MS
    when, inside = ccmon.iso_from_ms(quarter + 7 * 60_000), ccmon.iso_from_ms(quarter + 60_000)
    tokens = dict.fromkeys(["input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens"])

    def export(count: int, session: str, each: int, cost) -> logs_service_pb2.ExportLogsServiceResponse:
        figures = {key: each for key in tokens}
        return server.logs_stub().Export(logs_request([("api_request", api_request(
            seq, when, session=session, cost_usd=cost, **figures)) for seq in range(count)]), timeout=120)

    too_much = export(20_000, "too-much", 10 ** 12 - 1, 999999)
    assert too_much.partial_success.rejected_log_records == 20_000
    assert too_much.partial_success.error_message.startswith(
        "rejected 20000 of 20000 log records: api_request in session too-much: input_tokens=999999999999 is "
        f"more than one API call can use ({ccmon.MAX_REQUEST_TOKENS:,} tokens of a kind)")
    dearest = export(1, "dearest", 1, ccmon.MAX_REQUEST_USD + 0.001)
    assert dearest.partial_success.error_message == \
        f"rejected 1 of 1 log records: api_request in session dearest: cost_usd={ccmon.MAX_REQUEST_USD + 0.001!r} " \
        f"is more than one API call can cost (${ccmon.MAX_REQUEST_USD:,})"
    for session in ("at-the-caps", "again-that-day"):  # two exports into the same quarter hour and day
        assert not export(2_000, session, ccmon.MAX_REQUEST_TOKENS, ccmon.MAX_REQUEST_USD).HasField(
            "partial_success")
    for start in (inside, ccmon.iso_from_ms(quarter - ccmon.DAY_MS)):
        figures = stats(server, start=start)
        assert figures.total_requests == 4_000
        assert figures.total_tokens.input == figures.total_tokens.cache_read == 4_000 * ccmon.MAX_REQUEST_TOKENS
        assert figures.total_cost.amount == 4_000 * ccmon.MAX_REQUEST_USD
    assert db_rows(server.db, "SELECT typeof(SUM(cost_nanos)) FROM usage_rollup") == [("integer",)]


def test_a_metric_point_counts_as_usage_only_up_to_what_a_call_can_claim(server):
    """As for api_request records (issue #22): 20,000 cost points of $999,999 each would overflow the quarter
    hour's sum; points over MAX_REQUEST_USD are stored as points, not counted as usage."""
    quarter = (ccmon.now_ms() - 3 * ccmon.HOUR_MS) // ccmon.BUCKET_MS * ccmon.BUCKET_MS
    stub = metrics_service_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(server.target))

    def export(count: int, value: float) -> None:
        stub.Export(metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
            scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metrics_pb2.Metric(
                name="claude_code.cost.usage", sum=metrics_pb2.Sum(aggregation_temporality=1, data_points=[
                    metrics_pb2.NumberDataPoint(
                        as_double=value, time_unix_nano=(quarter + 7 * 60_000) * 10 ** 6 + i,
                        start_time_unix_nano=quarter * 10 ** 6 + i, attributes=[common_pb2.KeyValue(
                            key="session.id", value=any_value("metrics-only"))]) for i in range(count)]))])])]),
            timeout=120)

    export(20_000, 999999.0)
    export(3, float(ccmon.MAX_REQUEST_USD))
    assert db_rows(server.db, "SELECT COUNT(*) FROM mp") == [(20_003,)]
    figures = stats(server, start=ccmon.iso_from_ms(quarter + 60_000))
    assert (figures.total_requests, figures.total_cost.amount) == (0, 3 * ccmon.MAX_REQUEST_USD)

def test_records_without_any_time_count_once_however_often_sent(server):
    """Issue #22: records with no event.timestamp, no time and no observed time are stored at the time received;
    50 sent three times were 150. Their content is their identity: a re-send counts once, a different record
    (here only its figures differ) is another, and so for metric points without a time."""
    requests = [("api_request", {"event.name": "api_request", "event.sequence": seq, "session.id": "undated",
                                 "model": "claude-sonnet-4-5", "input_tokens": 10 + seq}) for seq in range(30)]
    events = [("tool_result", {"event.name": "tool_result", "event.sequence": 100 + seq, "session.id": "undated",
                               "tool_name": "Bash"}) for seq in range(20)]
    twins = [("api_request", {"session.id": "twins", "input_tokens": tokens}) for tokens in (1, 2)]
    points = metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
        scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metrics_pb2.Metric(
            name="claude_code.lines_of_code.count", sum=metrics_pb2.Sum(aggregation_temporality=1, data_points=[
                metrics_pb2.NumberDataPoint(as_int=value, attributes=[common_pb2.KeyValue(
                    key="session.id", value=any_value("undated"))]) for value in (3, 4)]))])])])
    metrics_stub = metrics_service_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(server.target))
    for _ in range(3):
        assert not server.logs_stub().Export(logs_request(requests + events + twins), timeout=10).HasField(
            "partial_success")
        assert not metrics_stub.Export(points, timeout=10).HasField("partial_success")
    assert db_rows(server.db, "SELECT session_id, COUNT(*), SUM(input_tokens) FROM r GROUP BY 1 ORDER BY 1") == \
        [("twins", 2, 3), ("undated", 30, sum(range(10, 40)))]
    assert db_rows(server.db, "SELECT COUNT(*) FROM e WHERE session_id = 'undated'") == [(20,)]
    assert db_rows(server.db, "SELECT COUNT(*), SUM(value) FROM mp") == [(2, 7.0)]


@contextlib.contextmanager
def stopped(pids: list[int]):
    """These decoders stopped (SIGSTOP) meanwhile; those still alive after are let go on (SIGCONT), never left
    stopped."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            if not has_ended(pid):
                os.kill(pid, signal.SIGCONT)


def test_a_stopped_decoder_is_killed_and_its_export_decoded_in_the_server(tmp_path):
    """Issue #22: with the last decoder stopped (SIGSTOP), every export waited for its deadline. A decoder that
    answers nothing and uses no CPU for DECODER_PATIENCE_S is killed, and the server decodes the export."""
    srv = ServerProcess(tmp_path).start()
    decoders = decoder_pids(srv)
    try:
        with stopped(decoders):
            for seq in range(len(decoders) + 2):  # one export per decoder finds it hung; the rest go to the server
                answer = srv.logs_stub().Export(logs_request([("api_request", api_request(
                    seq, hours_ago(1), input_tokens=10 ** seq))]), timeout=3 * ccmon.DECODER_PATIENCE_S)
                assert not answer.HasField("partial_success")
            assert all(has_ended(pid) for pid in decoders) and decoder_pids(srv) == []
        assert stats(srv).total_tokens.input == int("1" * (len(decoders) + 2))
        for pid in decoders:
            assert f"a decoder process (pid {pid}) ended (it hung (no answer and no CPU used for " \
                   f"{ccmon.DECODER_PATIENCE_S:g} s) and was killed: killed by SIGKILL)" in srv.log
        assert srv.log.count("exports are decoded in the server from now on") == 1
    finally:
        srv.stop()


def caught_signals(pid: int) -> set[int]:
    """The signals the process has handlers for (SigCgt in /proc/PID/status)."""
    mask = int(re.search(r"SigCgt:\s+([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text())[1], 16)
    return {number for number in range(1, 65) if mask >> (number - 1) & 1}


@pytest.mark.parametrize("busy", [False, True])
def test_sigterm_ends_the_server_at_once_while_a_decoder_is_stopped(tmp_path, busy):
    """Issue #22: with one of the decoders stopped, the server logged "stopped; database closed" and did not
    exit until the decoder went on. Stopped idle, or stopped while it decodes an export in flight."""
    srv = ServerProcess(tmp_path).start()
    decoders = decoder_pids(srv)
    try:
        with stopped(decoders if busy else decoders[:1]):
            if busy:  # an export in flight: the server has written it to a (stopped) decoder's pipe
                request = logs_request([("api_request", api_request(1, hours_ago(1), input_tokens=5))])
                written = lambda: int(re.search(r"wchar: (\d+)", Path(f"/proc/{srv.proc.pid}/io").read_text())[1])
                before, call = written(), srv.logs_stub().Export.future(request, timeout=30)
                wait_until(lambda: written() - before >= request.ByteSize(), "the export sent to a decoder")
            srv.proc.send_signal(signal.SIGTERM)
            try:
                assert srv.proc.wait(10) == 0
            except subprocess.TimeoutExpired:  # which step stalled: the log says how far the shutdown got
                pytest.fail(f"the server did not stop within 10 s; its log: {srv.log[-3000:]}")
            if busy:
                assert not call.result().HasField("partial_success")  # decoded in the server in time
        assert all(has_ended(pid) for pid in decoders)
        assert "stopped; database closed" in srv.log
    finally:
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)


def length_delimited(field: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field, as its bytes on the wire."""
    length, size = bytearray(), len(payload)
    while True:
        length.append(size & 0x7F | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            return bytes([field << 3 | 2]) + bytes(length) + payload


def test_counting_an_exports_records_keeps_nothing_of_it():
    """Counting an export's records on the wire (for exports big enough to hold too many) held a view of its bytes
    in a reference cycle, so every export's bytes stayed in memory until the cyclic garbage collector ran: 35 MB
    more at the peak of the ingestion benchmark. Counted, and refused, the export is referenced by no one else."""
    record = logs_pb2.LogRecord(body=common_pb2.AnyValue(string_value="x" * 600))
    export = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        scope_logs=[logs_pb2.ScopeLogs(log_records=[record] * 512)])]).SerializeToString()
    too_many = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
        scope_logs=[logs_pb2.ScopeLogs(log_records=[logs_pb2.LogRecord()] * (ccmon.MAX_RECORDS_PER_EXPORT + 1))])]
    ).SerializeToString()
    assert len(export) > ccmon.EMPTY_RECORD_BYTES * ccmon.MAX_RECORDS_PER_EXPORT  # so it is counted
    gc.disable()
    try:
        for data, refused in ((export, False), (too_many, True)):
            before = sys.getrefcount(data)
            with pytest.raises(ccmon.BadExport) if refused else contextlib.nullcontext():
                ccmon.check_record_count("logs", data)
            assert sys.getrefcount(data) == before
    finally:
        gc.enable()


def test_exports_of_millions_of_empty_records_are_refused_before_parsing(tmp_path):
    """Issue #22: 16 MiB of empty records (5.6 million in OTLP/JSON, 8.4 million in protobuf) took the server to
    1.24 GB (3.5 GB for three at once) and a decoder to 1.15 GB. An export has at most MAX_RECORDS_PER_EXPORT
    records, counted on the wire before parsing, and an OTLP/JSON body at most MAX_JSON_VALUES values, counted
    before json.loads: every process stays under the 250 MB the docs promise."""
    limit, most = 16 * 1024 * 1024, ccmon.MAX_RECORDS_PER_EXPORT
    empty_json = b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[' + b",".join([b"{}"] * ((limit - 64) // 3)) + \
        b"]}]}]}"
    fewer_json = b'{"resource_logs":[{"scope_logs":[{"log_records":[' + b",".join([b"{}"] * (most + 1)) + b"]}]}]}"
    empty_protobuf = length_delimited(1, length_delimited(2, b"\x12\x00" * ((limit - 16) // 2)))
    assert len(empty_json) <= limit and len(empty_protobuf) <= limit
    one_over = export_of([logs_pb2.LogRecord(body=any_value("claude_code.user_prompt"))] * (most + 1))
    points = metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
        scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metrics_pb2.Metric(name="m", gauge=metrics_pb2.Gauge(
            data_points=[metrics_pb2.NumberDataPoint()] * (most + 1)))])])])
    srv = ServerProcess(tmp_path).start()
    try:
        processes = [srv.proc.pid, *decoder_pids(srv)]
        for export, items in ((srv.logs_stub().Export, "log records"), (metrics_service_pb2_grpc.MetricsServiceStub(
                grpc.insecure_channel(srv.target)).Export, "data points")):
            with pytest.raises(grpc.RpcError) as refused:
                export(one_over if items == "log records" else points, timeout=60)
            assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, (
                f"over {most} {items} in one export (ccmon takes at most {most} at a time)"))
        answers = [None] * 3
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, http_post(
            srv.http_port, body=empty_json, headers={"Content-Type": "application/json"}))) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for response, data in answers:
            assert (response.status, status_of(data, as_json=True)) == (413, (8, (
                f"body has over {ccmon.MAX_JSON_VALUES} JSON values (ccmon takes at most {ccmon.MAX_JSON_VALUES} "
                "in one OTLP/JSON export)")))
        response, data = http_post(srv.http_port, body=fewer_json, headers={"Content-Type": "application/json"})
        assert (response.status, status_of(data, as_json=True)) == (400, (3, (
            f"body has over {most} records (ccmon takes at most {most} in one export)")))
        response, data = http_post(srv.http_port, body=empty_protobuf)
        assert (response.status, status_of(data)) == (400, (3, (
            f"body is over {most} log records in one export (ccmon takes at most {most} at a time)")))
        for pid in processes:
            assert process_rss_kib(pid) < 250 * 1024, "the peak (VmHWM)"
        assert stats(srv).total_requests == 0 and db_rows(srv.db, "SELECT COUNT(*) FROM events") == [(0,)]
    finally:
        srv.stop()


def test_json_values_are_counted_without_parsing():
    """What json_values counts: strings (quotes inside them, escaped or not, count for nothing), objects, arrays,
    and what commas separate; a string left open ends the body, as does its count."""
    assert ccmon.json_values(json.dumps({"a": ['x\\"y', 1, {"b": "c,{[", "d": [True, None]}]}).encode()) == 14
    assert ccmon.json_values(b'"\\' * 1000) == 2 and ccmon.json_values(b'{"a":"open, {[') == 4
    assert ccmon.json_values(b",".join([b"{}"] * 1000)) == 2000



def series_events() -> tuple[list, list]:
    """Around Berlin's spring DST change (2026-03-29 is a 23-hour day there): ana's sessions in project alpha, bo's
    in none; Monday 2026-04-06's week has no request."""
    def request(seq, session, email, when, model, **figures):
        return ("api_request", {**api_request(seq, when, model=model, session=session, **figures),
                                "user.email": email})

    alpha = [request(1, "s-ana-1", "ana@example.com", "2026-03-28T22:30:00Z", "claude-sonnet-4-5",  # Sat 23:30 CET
                     input_tokens=1000, output_tokens=200, cost_usd=0.5),
             request(2, "s-ana-1", "ana@example.com", "2026-03-28T23:10:00Z", "claude-haiku-4-5",  # Sun 00:10 CET
                     input_tokens=300, output_tokens=30, cost_usd=0.01),
             request(5, "s-ana-2", "ana@example.com", "2026-04-14T09:00:00Z", "claude-sonnet-4-5",  # Tue 11:00 CEST
                     input_tokens=40, output_tokens=4, cost_usd=1.0)]
    other = [request(3, "s-bo-1", "bo@example.com", "2026-03-29T21:59:59.999Z", "claude-sonnet-4-5",  # Sun 23:59 CEST
                     input_tokens=7, output_tokens=3, cost_usd=0.125),
             request(4, "s-bo-1", "bo@example.com", "2026-03-29T22:00:00Z", "claude-opus-4-1",  # Mon 00:00 CEST
                     input_tokens=50, output_tokens=5000, cost_usd=2.25)]
    return alpha, other


def series_figures(series: ccmon.UsageSeries) -> list[tuple]:
    return [(ccmon.iso_from_ms(p.start_ms), p.group, p.split.total.requests, p.split.total.input,
             p.split.total.output, p.split.total.cost_nanos, p.split.premium.requests) for p in series.points]


def test_series_by_hour_day_and_week_grouped_and_filtered(server):
    alpha, other = series_events()
    assert sdk_export(server.port, alpha, resource={**CLAUDE_RESOURCE, "project": "alpha"}) == ["SUCCESS"]
    assert sdk_export(server.port, other) == ["SUCCESS"]
    client = ccmon.Client(server.target)
    start, end = ccmon.parse_iso_ms("2026-03-27T23:00:00Z"), ccmon.parse_iso_ms("2026-04-19T22:00:00Z")
    days = client.series(start, end, "day", "Europe/Berlin")
    assert days.bucket == "day" and days.readings == ()
    assert series_figures(days) == [  # local midnights, the 23-hour day's included; days without requests left out
        ("2026-03-27T23:00:00.000Z", "", 1, 1000, 200, 500_000_000, 1),
        ("2026-03-28T23:00:00.000Z", "", 2, 307, 33, 135_000_000, 1),
        ("2026-03-29T22:00:00.000Z", "", 1, 50, 5000, 2_250_000_000, 1),
        ("2026-04-13T22:00:00.000Z", "", 1, 40, 4, 1_000_000_000, 1)]
    assert series_figures(client.series(start, end, "week", "Europe/Berlin")) == [  # Mondays; 6 April's week empty
        ("2026-03-22T23:00:00.000Z", "", 3, 1307, 233, 635_000_000, 2),
        ("2026-03-29T22:00:00.000Z", "", 1, 50, 5000, 2_250_000_000, 1),
        ("2026-04-12T22:00:00.000Z", "", 1, 40, 4, 1_000_000_000, 1)]
    assert series_figures(client.series(start, end, "day", "Europe/Berlin", "user")) == [
        ("2026-03-27T23:00:00.000Z", "ana@example.com", 1, 1000, 200, 500_000_000, 1),
        ("2026-03-28T23:00:00.000Z", "ana@example.com", 1, 300, 30, 10_000_000, 0),
        ("2026-03-28T23:00:00.000Z", "bo@example.com", 1, 7, 3, 125_000_000, 1),
        ("2026-03-29T22:00:00.000Z", "bo@example.com", 1, 50, 5000, 2_250_000_000, 1),
        ("2026-04-13T22:00:00.000Z", "ana@example.com", 1, 40, 4, 1_000_000_000, 1)]
    assert series_figures(client.series(start, end, "week", "Europe/Berlin", "project")) == [
        ("2026-03-22T23:00:00.000Z", "", 1, 7, 3, 125_000_000, 1),
        ("2026-03-22T23:00:00.000Z", "alpha", 2, 1300, 230, 510_000_000, 1),
        ("2026-03-29T22:00:00.000Z", "", 1, 50, 5000, 2_250_000_000, 1),
        ("2026-04-12T22:00:00.000Z", "alpha", 1, 40, 4, 1_000_000_000, 1)]
    assert series_figures(client.series(start, end, "week", "Europe/Berlin", "model", user="ana@example.com")) == [
        ("2026-03-22T23:00:00.000Z", "claude-haiku-4-5", 1, 300, 30, 10_000_000, 0),
        ("2026-03-22T23:00:00.000Z", "claude-sonnet-4-5", 1, 1000, 200, 500_000_000, 1),
        ("2026-04-12T22:00:00.000Z", "claude-sonnet-4-5", 1, 40, 4, 1_000_000_000, 1)]
    assert series_figures(client.series(start, end, "day", "Europe/Berlin", project="alpha")) == [
        ("2026-03-27T23:00:00.000Z", "", 1, 1000, 200, 500_000_000, 1),
        ("2026-03-28T23:00:00.000Z", "", 1, 300, 30, 10_000_000, 0),
        ("2026-04-13T22:00:00.000Z", "", 1, 40, 4, 1_000_000_000, 1)]
    # A period starting inside a day: its first bucket still starts at midnight, with the usage from the start on.
    cut = client.series(ccmon.parse_iso_ms("2026-03-28T23:15:00Z"), ccmon.parse_iso_ms("2026-03-29T22:00:00.001Z"),
                        "day", "Europe/Berlin")
    assert series_figures(cut) == [("2026-03-28T23:00:00.000Z", "", 1, 7, 3, 125_000_000, 1),
                                   ("2026-03-29T22:00:00.000Z", "", 1, 50, 5000, 2_250_000_000, 1)]
    # Hours are the clock's: at :30 UTC in India (UTC+5:30), on the hour in UTC.
    night = (ccmon.parse_iso_ms("2026-03-28T22:00:00Z"), ccmon.parse_iso_ms("2026-03-29T00:00:00Z"))
    assert series_figures(client.series(*night, "hour", "Asia/Kolkata", "model")) == [
        ("2026-03-28T22:30:00.000Z", "claude-haiku-4-5", 1, 300, 30, 10_000_000, 0),
        ("2026-03-28T22:30:00.000Z", "claude-sonnet-4-5", 1, 1000, 200, 500_000_000, 1)]
    assert [p[0] for p in series_figures(client.series(*night, "hour", ""))] == ["2026-03-28T22:00:00.000Z",
                                                                                 "2026-03-28T23:00:00.000Z"]
    client.close()


def test_series_days_agree_with_get_usage_in_every_kind_of_zone(server):
    """Day buckets are read from UTC days corrected by quarter hours at their edges: every zone's days add up to
    what GetUsage (day by day) answers."""
    alpha, other = series_events()
    sdk_export(server.port, alpha + other)
    client = ccmon.Client(server.target)
    start, end = ccmon.parse_iso_ms("2026-03-20T00:00:00Z"), ccmon.parse_iso_ms("2026-04-20T00:00:00Z")
    for zone in ("UTC", "Europe/Berlin", "Asia/Kolkata", "America/St_Johns", "Pacific/Kiritimati", "Etc/GMT+12"):
        days = {ccmon.dt.datetime.fromtimestamp(p.start_ms / 1000, ccmon.ZoneInfo(zone)).date().isoformat(): p.split
                for p in client.series(start, end, "day", zone).points}
        assert days == {d.date: d.split for d in client.days(start, end, zone) if d.split.total.requests}, zone
    client.close()


def test_series_answers_what_later_commits_changed_in_days_asked_before(server):
    """The server keeps the buckets it read (BucketCache) until a commit changes a row in their time: asked again
    after rows arrive in a past day, or leave it (telemetry replacing an imported copy), a series answers the rows
    as they are now, each shape (grouping, user) as a reader without a cache reads them from the same file."""
    alpha, other = series_events()
    assert sdk_export(server.port, alpha) == ["SUCCESS"]
    client = ccmon.Client(server.target)
    start, end = ccmon.parse_iso_ms("2026-03-20T00:00:00Z"), ccmon.parse_iso_ms("2026-04-20T00:00:00Z")
    shapes = [("day", "", None), ("day", "model", None), ("week", "", "ana@example.com"), ("hour", "user", None)]

    def answers() -> list[list[tuple]]:
        return [series_figures(client.series(start, end, bucket, "Europe/Berlin", by, user=user))
                for bucket, by, user in shapes]

    def uncached() -> list[list[tuple]]:
        reader, zone = ccmon.Reader(server.db), ccmon.ZoneInfo("Europe/Berlin")
        return [series_figures(ccmon.UsageSeries(bucket, tuple(reader.series(
            ccmon.bucket_starts(zone, bucket, start, end, ccmon.MAX_SERIES_BUCKETS), start, end, by, user))))
            for bucket, by, user in shapes]

    before = answers()
    assert before == answers() == uncached() and before[0] == [
        ("2026-03-27T23:00:00.000Z", "", 1, 1000, 200, 500_000_000, 1),
        ("2026-03-28T23:00:00.000Z", "", 1, 300, 30, 10_000_000, 0),
        ("2026-04-13T22:00:00.000Z", "", 1, 40, 4, 1_000_000_000, 1)]
    assert sdk_export(server.port, other) == ["SUCCESS"]  # into 29 and 30 March, days already read
    added = answers()
    assert added == uncached() and added[0] == [
        ("2026-03-27T23:00:00.000Z", "", 1, 1000, 200, 500_000_000, 1),
        ("2026-03-28T23:00:00.000Z", "", 2, 307, 33, 135_000_000, 1),
        ("2026-03-29T22:00:00.000Z", "", 1, 50, 5000, 2_250_000_000, 1),
        ("2026-04-13T22:00:00.000Z", "", 1, 40, 4, 1_000_000_000, 1)]
    # A transcript's copy of a request, then its telemetry: the copy is removed, the request counted once.
    copy = ccmon_pb2.ImportedRequest(session_id="s-cy-1", timestamp_ms=ccmon.parse_iso_ms("2026-04-02T10:00:00Z"),
                                     model="claude-sonnet-4-5", input_tokens=9, output_tokens=1, cost_nanos=70_000_000,
                                     request_id="req_cy", message_id="msg_cy")
    client._stub.ImportRequests(ccmon_pb2.ImportRequestsRequest(requests=[copy]), timeout=10)
    with_copy = answers()
    assert with_copy == uncached() and ("2026-04-01T22:00:00.000Z", "", 1, 9, 1, 70_000_000, 1) in with_copy[0]
    event = api_request(6, "2026-04-02T10:00:00.100Z", session="s-cy-1", input_tokens=9, output_tokens=1,
                        cost_usd=0.08)
    assert sdk_export(server.port, [("api_request", {**event, "request_id": "req_cy"})]) == ["SUCCESS"]
    replaced = answers()
    assert replaced == uncached() and ("2026-04-01T22:00:00.000Z", "", 1, 9, 1, 80_000_000, 1) in replaced[0]
    client.close()


def test_the_bucket_cache_keeps_only_what_no_commit_changed_and_so_many_buckets(monkeypatch):
    def points(start: int, count: int) -> tuple:
        return tuple(ccmon.SeriesPoint(start, str(n), ccmon.Split()) for n in range(count))

    day, week = ("day", "", ""), ("week", "", "")
    cache = ccmon.BucketCache()
    started = cache.commits()
    cache.keep(started, day, {(0, 10): points(0, 1), (10, 20): points(10, 2)})
    cache.forget(15, 15)  # a commit into the second bucket
    assert cache.points(day, 0, 10) == points(0, 1)
    assert cache.points(day, 10, 20) is None and cache.points(week, 0, 10) is None
    # Read before that commit, kept after it: it may hold the rows as they were, so it is not kept.
    cache.keep(started, day, {(10, 20): points(10, 2)})
    assert cache.points(day, 10, 20) is None
    cache.keep(cache.commits(), day, {(10, 20): points(10, 2)})
    assert cache.points(day, 10, 20) == points(10, 2)
    cache.forget(20, 30)  # ends where the bucket does not: [lo, hi] against [start, end)
    cache.forget(-ccmon.BucketCache.LONGEST_BUCKET_MS, 9)  # a week back: the first bucket
    assert cache.points(day, 10, 20) == points(10, 2) and cache.points(day, 0, 10) is None
    # Past MOST (a bucket counts its points, an empty one 1), the least recently used buckets go, of any shape.
    monkeypatch.setattr(ccmon.BucketCache, "MOST", 5)
    cache.keep(cache.commits(), week, {(0, 70): points(0, 2), (70, 140): ()})  # 2 + 2 + 1
    assert cache.points(day, 10, 20) == points(10, 2)  # used: the week's first bucket is the least recent now
    cache.keep(cache.commits(), day, {(20, 30): ()})
    assert cache.points(week, 0, 70) is None
    assert (cache.points(week, 70, 140), cache.points(day, 20, 30), cache.points(day, 10, 20)) == ((), (), points(10, 2))


def test_a_series_keeps_only_its_whole_buckets(tmp_path):
    """A period ending now cuts its first and last bucket at every ask: those are read every time, not kept (they
    would pile up), the whole buckets between them are."""
    db = tmp_path / "ccmon.db"
    ccmon.Writer(db).close()
    cache = ccmon.BucketCache()
    reader, zone = ccmon.Reader(db, buckets=cache), ccmon.ZoneInfo("UTC")
    start, end = ccmon.parse_iso_ms("2026-05-01T10:00:00Z"), ccmon.parse_iso_ms("2026-05-04T10:00:00Z")
    for shift in range(3):
        lo, hi = start + shift * 60_000, end + shift * 60_000
        assert reader.series(ccmon.bucket_starts(zone, "day", lo, hi, 10), lo, hi) == []
    days = [ccmon.parse_iso_ms(f"2026-05-0{n}T00:00:00Z") for n in range(1, 6)]
    assert [cache.points(("", "", ""), a, b) for a, b in zip(days, days[1:])] == [None, (), (), None]


def test_series_includes_claudes_limit_readings_of_the_user(server):
    alpha, other = series_events()
    sdk_export(server.port, alpha + other)
    now = ccmon.now_ms() // 1000 * 1000
    readings = [ccmon.LimitReading("s-ana-1", now - 7200_000, five_hour=ccmon.LimitWindow(42.0, now + 3600_000),
                                   seven_day=ccmon.LimitWindow(12.5, now + 3 * 86400_000)),
                ccmon.LimitReading("s-ana-1", now - 3600_000),  # no limits (an API key): not Claude's figures
                ccmon.LimitReading("s-bo-1", now - 1800_000, seven_day=ccmon.LimitWindow(80.0, now + 86400_000)),
                ccmon.LimitReading("s-ana-2", now - 600_000, five_hour=ccmon.LimitWindow(55.5, now + 3600_000))]
    for reading in readings:
        server.query().ReportStatusLine(ccmon_pb2.ReportStatusLineRequest(reading=ccmon.reading_message(reading)))
    client = ccmon.Client(server.target)

    def shown(series):
        return [(r.session_id, r.read_ms - now, r.user, r.five_hour and (r.five_hour.percent, r.five_hour.resets_ms - now),
                 r.seven_day and (r.seven_day.percent, r.seven_day.resets_ms - now)) for r in series.readings]
    everyone = client.series(now - 86400_000, now + 1, "hour", "UTC")
    assert (everyone.points, shown(everyone)) == ((), [  # oldest first
        ("s-ana-1", -7200_000, "ana@example.com", (42.0, 3600_000), (12.5, 3 * 86400_000)),
        ("s-bo-1", -1800_000, "bo@example.com", None, (80.0, 86400_000)),
        ("s-ana-2", -600_000, "ana@example.com", (55.5, 3600_000), None)])
    assert [r[0] for r in shown(client.series(now - 86400_000, now + 1, "day", "UTC", user="ana@example.com"))] == \
        ["s-ana-1", "s-ana-2"]
    assert shown(client.series(now - 86400_000, now - 600_000, "day", "UTC"))[-1][0] == "s-bo-1"  # [start, end)
    client.close()


@pytest.mark.parametrize("fields,message", [
    (dict(bucket="minute"), "unknown bucket 'minute' (hour, day or week)"),
    (dict(bucket=""), "unknown bucket '' (hour, day or week)"),
    (dict(bucket="day", group_by="session"), "unknown group_by 'session' (model, user, project, or empty)"),
    (dict(bucket="day", timezone="Mars/Olympus"), "unknown timezone 'Mars/Olympus'"),
    (dict(bucket="day", start_time=ts("2026-03-02T00:00:00Z"), end_time=ts("2026-03-01T00:00:00Z")),
     "the period ends before it starts"),
    (dict(bucket="hour", start_time=ts("2025-01-01T00:00:00Z"), end_time=ts("2026-01-01T00:00:00Z")),
     "the period has more than 5000 hours: ask for a shorter period or a larger bucket"),
    (dict(bucket="week", timezone="Pacific/Kiritimati", start_time=ts("9999-12-01T00:00:00Z"),
          end_time=ts("9999-12-31T23:59:59Z")),
     "the period has weeks past the year 9999 in Pacific/Kiritimati; end it earlier"),
])
def test_series_refuses_what_it_cannot_answer(server, fields, message):
    with pytest.raises(grpc.RpcError) as err:
        server.query().GetSeries(ccmon_pb2.GetSeriesRequest(**fields))
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    year_of_days = ccmon_pb2.GetSeriesRequest(bucket="day", start_time=ts("2025-01-01T00:00:00Z"),
                                              end_time=ts("2026-01-01T00:00:00Z"))
    assert server.query().GetSeries(year_of_days).bucket == "day"  # 365 buckets are fine


def test_bucket_starts_across_dst_and_odd_offsets():
    berlin = ccmon.ZoneInfo("Europe/Berlin")
    days = ccmon.bucket_starts(berlin, "day", local_ms("2026-10-24 12:00"), local_ms("2026-10-26 00:00"), 10)
    assert [ccmon.iso_from_ms(ms) for ms in days] == ["2026-10-23T22:00:00.000Z", "2026-10-24T22:00:00.000Z",
                                                      "2026-10-25T23:00:00.000Z"]  # a 25-hour day
    hours = ccmon.bucket_starts(berlin, "hour", ccmon.parse_iso_ms("2026-10-25T00:00:00Z"),
                                ccmon.parse_iso_ms("2026-10-25T01:30:00Z"), 10)
    assert [ccmon.iso_from_ms(ms) for ms in hours] == ["2026-10-25T00:00:00.000Z", "2026-10-25T01:00:00.000Z",
                                                       "2026-10-25T02:00:00.000Z"]  # 02:00 CEST, then 02:00 CET
    lord_howe = ccmon.ZoneInfo("Australia/Lord_Howe")  # DST moves its clock by 30 minutes
    hours = ccmon.bucket_starts(lord_howe, "hour", ccmon.parse_iso_ms("2026-04-04T14:00:00Z"),
                                ccmon.parse_iso_ms("2026-04-04T16:30:00Z"), 10)
    assert [ccmon.iso_from_ms(ms) for ms in hours] == [  # 01:00 +11:00, 02:00 +10:30 (90 minutes later), 03:00
        "2026-04-04T14:00:00.000Z", "2026-04-04T15:30:00.000Z", "2026-04-04T16:30:00.000Z"]
    assert ccmon.bucket_starts(berlin, "week", 0, 365 * 86400_000, 52) is None  # 53 weeks
    assert len(ccmon.bucket_starts(berlin, "week", 0, 364 * 86400_000, 53)) == 54


def test_get_usage_at_the_end_of_time_is_an_invalid_argument_in_any_zone(server):
    """Days in a zone ahead of UTC can end past year 9999: INVALID_ARGUMENT, never UNKNOWN with a traceback."""
    from google.protobuf.timestamp_pb2 import Timestamp
    from hypothesis import HealthCheck, given, settings, strategies as st
    query = server.query()
    with pytest.raises(grpc.RpcError) as raised:
        query.GetUsage(ccmon_pb2.GetUsageRequest(timezone="Pacific/Kiritimati",
                                                 end_time=Timestamp(seconds=253402300799)))
    assert (raised.value.code(), raised.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "the period has days past the year 9999 in Pacific/Kiritimati; end it earlier")
    extremes = st.sampled_from([-62135596800, -1, 0, 1, 253402214400, 253402300799, 253402300800, 2 ** 62])

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(zone=st.sampled_from(["Pacific/Kiritimati", "Etc/GMT-14", "Etc/GMT+12", "UTC", "America/St_Johns"]),
           start=st.none() | extremes, end=st.none() | extremes)
    def answers_or_refuses(zone, start, end):
        request = ccmon_pb2.GetUsageRequest(timezone=zone)
        if start is not None:
            request.start_time.seconds = start
        if end is not None:
            request.end_time.seconds = end
        try:
            query.GetUsage(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (zone, start, end, exc.details())

    answers_or_refuses()
    assert "Traceback" not in server.log


def test_api_requests_in_the_go_ccmons_order_when_oldest_first_is_unset(server):
    """The Go ccmon's client sends no oldest_first and reverses what it gets for "Latest First": its server answers
    the newest `limit` requests (offset counted from the newest) oldest first. Pages hold at most 1000 requests."""
    first = ccmon.parse_iso_ms("2026-05-06T10:00:00Z")
    rows = [ccmon_pb2.ImportedRequest(session_id="s-page", timestamp_ms=first + i * 1000, model="claude-haiku-4-5",
                                      input_tokens=i, request_id=f"req_{i}") for i in range(1005)]
    assert server.query().ImportRequests(ccmon_pb2.ImportRequestsRequest(requests=rows)).imported == 1005
    query = server.query()

    def tokens(**fields) -> list[int]:
        page = query.GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(**fields))
        assert page.total_count == 1005
        return [r.input_tokens for r in page.requests]

    assert tokens(limit=3) == [1002, 1003, 1004]
    assert tokens(limit=3, offset=2) == [1000, 1001, 1002]
    assert tokens(limit=3, oldest_first=False) == [1004, 1003, 1002]
    assert tokens(limit=3, offset=1, oldest_first=True) == [1, 2, 3]
    for limit in (0, -1, 1001, 2 ** 31 - 1):
        assert tokens(limit=limit) == list(range(5, 1005)), limit
        assert tokens(limit=limit, oldest_first=True) == list(range(1000)), limit


def test_a_timeline_of_huge_attributes_fits_what_clients_accept(server):
    """Six events of 1 MiB attributes each (and a 100 KB key): the timeline answer fits gRPC's default 4 MB, each
    event's details cut to 1 KiB of valid JSON that keeps its short attributes and counts those left out."""
    big = "x" * (1024 * 1024 - 1)
    events = [("tool_result", {"event.name": "tool_result", "event.timestamp": f"2026-05-06T10:00:0{i}Z",
                               "session.id": "s-huge", "tool_name": "Bash", "success": "true", "output": big,
                               "k" * 100_000: "v", **{f"part{p}": "y" * 100_000 for p in range(4)}})
              for i in range(6)]
    assert server.logs_stub().Export(logs_request(events)).partial_success.rejected_log_records == 0
    client = ccmon.Client(server.target)  # gRPC's default receive limit, 4 MB
    entries = client.timeline("s-huge")
    client.close()
    assert [(entry.kind, entry.ts_ms) for entry in entries] == \
        [("tool_result", ccmon.parse_iso_ms(f"2026-05-06T10:00:0{i}Z")) for i in range(6)]
    for entry in entries:
        assert entry.details["tool_name"] == "Bash" and entry.details["success"] == "true"
        assert sorted(entry.details) == ["ccmon.omitted_attributes", "k" * 199 + "…", "part0", "part1", "part2",
                                         "success", "tool_name"], sorted(entry.details)
        assert entry.details["part0"] == "y" * 199 + "…"
        assert entry.details["ccmon.omitted_attributes"] == 2  # output and part3
        assert len(ccmon.compact_json(entry.details).encode()) <= ccmon.DETAILS_MAX_BYTES


class Aborted(Exception):
    pass


class AbortingContext:
    """What a servicer method is given in place of gRPC's context: abort raises, as gRPC's does."""

    def abort(self, code, details):
        raise Aborted(code, details)


class ListingReader:
    """A Reader standing in for a big database: MAX_LIST + 1 of everything, huge timelines, a totals() that waits."""

    def __init__(self):
        self.entered, self.release, self.lock, self.waiting = threading.Event(), threading.Event(), threading.Lock(), 0

    def users(self, start_ms, end_ms, project=None, agent=""):
        return [ccmon.UserUsage(f"user-{i:04}", ccmon.Split(), 1) for i in range(ccmon.MAX_LIST + 1)]

    def projects(self, start_ms, end_ms, user=None, project=None, agent=""):
        return [ccmon.ProjectUsage(f"project-{i:04}", ccmon.Split(), 1) for i in range(ccmon.MAX_LIST + 1)]

    def blocks(self, start_ms, end_ms, user=None, project=None, agent=""):
        return [ccmon.UsageBlock(i * ccmon.BLOCK_MS, (i + 1) * ccmon.BLOCK_MS, ccmon.Split(), i * ccmon.BLOCK_MS)
                for i in range(ccmon.MAX_LIST + 1)]

    def series(self, starts, start_ms, end_ms, by="", user=None, project=None, agent=""):
        return [ccmon.SeriesPoint(start, "", ccmon.Split()) for start in starts[:-1]]

    def readings(self, user, since_ms, until_ms, limit=1, with_limits=False, agent=ccmon.CLAUDE_CODE):
        self.limit = limit
        return [ccmon.LimitReading("s", until_ms - i, five_hour=ccmon.LimitWindow(1.0, until_ms), agent=agent)
                for i in range(limit)]

    def timeline(self, session_id, limit):
        self.limit = limit
        request = ccmon.ApiRequest(0, "claude-haiku-4-5", session_id, ccmon.Usage())
        return [ccmon.TimelineEntry(i, "api_request", request, {}) for i in range(limit)]

    def totals(self):
        with self.lock:
            self.waiting += 1
            if self.waiting == ccmon.QUERY_SLOTS:
                self.entered.set()
        self.release.wait(30)
        return ccmon.StoreTotals(0, 0)

    def last_request_ms(self):
        return None

    def receiver_counts(self):
        return []

    path = Path("big.db")


def test_every_list_answer_is_bounded():
    reader = ListingReader()
    service, context = ccmon.QueryService(reader, 0, None), AbortingContext()
    users = service.GetUsers(ccmon_pb2.GetUsersRequest(), context).users
    assert (len(users), users[0].user, users[-1].user) == (1000, "user-0000", "user-0999")
    projects = service.GetProjects(ccmon_pb2.GetProjectsRequest(), context).projects
    assert (len(projects), projects[-1].project) == (1000, "project-0999")
    blocks = service.GetBlocks(ccmon_pb2.GetBlocksRequest(), context).blocks  # the newest
    assert (len(blocks), ccmon.ms_of(blocks[0].start_time)) == (1000, ccmon.BLOCK_MS)
    series = service.GetSeries(ccmon_pb2.GetSeriesRequest(bucket="hour", start_time=ccmon.timestamp_from_ms(0),
                                                          end_time=ccmon.timestamp_from_ms(5000 * ccmon.HOUR_MS)), context)
    assert (len(series.points), reader.limit, len(series.readings)) == (5000, 5000, 5000)
    assert [len([r for r in series.agent_readings if r.agent == agent]) for agent in ccmon.AGENTS[1:]] == [5000] * 3
    assert ccmon.ms_of(series.readings[0].read_at) < ccmon.ms_of(series.readings[-1].read_at)  # oldest first
    for limit in (0, -1, 2001, 2 ** 31 - 1):
        timeline = service.GetSessionTimeline(ccmon_pb2.GetSessionTimelineRequest(session_id="s", limit=limit),
                                              context)
        assert (reader.limit, len(timeline.entries)) == (2000, 2000)
    with pytest.raises(Aborted) as refused:  # a timeline of 2000 requests of a 3000-character session id
        service.GetSessionTimeline(ccmon_pb2.GetSessionTimelineRequest(session_id="s" * 3000), context)
    code, details = refused.value.args
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.fullmatch(r"the answer would be [\d,]+ bytes, over the 4,194,304 clients accept: ask for less", details)


def test_queries_beyond_the_slots_are_refused_not_queued():
    """A query waiting for a slot would hold an RPC thread that an export needs."""
    reader = ListingReader()
    service = ccmon.QueryService(reader, 0, None)
    answers = []
    running = [threading.Thread(target=lambda: answers.append(
        service.GetServerInfo(ccmon_pb2.GetServerInfoRequest(), AbortingContext()).version))
        for _ in range(ccmon.QUERY_SLOTS)]
    for thread in running:
        thread.start()
    try:
        assert reader.entered.wait(30)
        with pytest.raises(Aborted) as refused:
            service.GetServerInfo(ccmon_pb2.GetServerInfoRequest(), AbortingContext())
        assert refused.value.args == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      "the server is answering 8 queries already; ask again in a moment")
    finally:
        reader.release.set()
        for thread in running:
            thread.join()
    assert answers == [ccmon.VERSION] * 8
    assert service.GetServerInfo(ccmon_pb2.GetServerInfoRequest(), AbortingContext()).version == ccmon.VERSION


def test_a_server_busy_with_looping_queries_stores_exports_and_stops_within_10_s(tmp_path):
    """24 clients looping on the largest page leave exports their threads, and SIGTERM ends the server in time."""
    srv = ServerProcess(tmp_path).start()
    first = ccmon.parse_iso_ms("2026-05-06T10:00:00Z")
    rows = [ccmon_pb2.ImportedRequest(session_id="s-load", timestamp_ms=first + i, model="claude-haiku-4-5",
                                      input_tokens=1, request_id=f"req_{i}") for i in range(2000)]
    assert srv.query().ImportRequests(ccmon_pb2.ImportRequestsRequest(requests=rows)).imported == 2000
    stop, answered, acknowledged, failures = threading.Event(), [], set(), []

    def loop_queries():
        query = srv.query()
        while not stop.is_set():
            try:
                answered.append(len(query.GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(limit=0), timeout=10)
                                    .requests))
            except grpc.RpcError:
                continue  # refused while the slots are taken, or the server stopping

    loopers = [threading.Thread(target=loop_queries) for _ in range(24)]
    for looper in loopers:
        looper.start()
    try:
        wait_until(lambda: len(answered) >= 24, "24 answered queries", 60, interval=0.05)
        stub = srv.logs_stub()
        for seq in range(5):
            try:
                stub.Export(logs_request([("api_request", api_request(seq, "2026-06-01T00:00:00Z",
                                                                      session="s-export", input_tokens=1))]),
                            timeout=10)
                acknowledged.add(seq)
            except grpc.RpcError as exc:
                failures.append(exc.code())
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 0
    finally:
        stop.set()
        for looper in loopers:
            looper.join()
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert (failures, sorted(acknowledged)) == ([], [0, 1, 2, 3, 4]), srv.log
    assert set(answered) == {1000}
    assert db_rows(srv.db, "SELECT COUNT(*) FROM requests s JOIN sessions ss ON ss.id = s.session "
                           "WHERE ss.session_id = 's-export'") == [(5,)]

# ---------------------------------------------------------------- OTLP/HTTP receiver: framing, status codes, bursts, slow clients

def http_post(port: int, path: str = "/v1/logs", body: bytes = b"", headers: dict | None = None,
              method: str = "POST", context=None):
    import http.client
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30) if context
            else http.client.HTTPConnection("127.0.0.1", port, timeout=30))
    conn.request(method, path, body=body, headers={"Content-Type": "application/x-protobuf", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def status_of(data: bytes, as_json: bool = False) -> tuple[int, str]:
    if as_json:
        parsed = json.loads(data)
        return parsed.get("code", 0), parsed["message"]
    status = ccmon_pb2.RpcStatus.FromString(data)
    return status.code, status.message


def test_http_receiver_status_codes_and_bodies(server):
    good = logs_request(MIXED_EVENTS).SerializeToString()
    response, data = http_post(server.http_port, body=good)
    assert response.status == 200 and response.getheader("Content-Type") == "application/x-protobuf"
    assert logs_service_pb2.ExportLogsServiceResponse.FromString(data) == logs_service_pb2.ExportLogsServiceResponse()
    bad = logs_request([("api_request", api_request(7, "2026-03-01T10:00:00Z", input_tokens="lots"))])
    response, data = http_post(server.http_port, body=bad.SerializeToString())
    partial = logs_service_pb2.ExportLogsServiceResponse.FromString(data).partial_success
    assert response.status == 200 and partial.rejected_log_records == 1
    assert partial.error_message == ("rejected 1 of 1 log records: api_request in session sess-1: "
                                     "input_tokens='lots' is not a number")
    cases = [
        (dict(body=b"\x0a\xff\xff\xff"), 400, 3, "body is not valid OTLP protobuf: "),
        (dict(body=b"{not json", headers={"Content-Type": "application/json"}), 400, 3,
         "body is not valid OTLP/JSON: "),
        (dict(body=json.dumps({"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "zz"}]}]}]}).encode(),
              headers={"Content-Type": "application/json"}), 400, 3, "traceId 'zz' is not hex"),
        (dict(body=good, headers={"Content-Type": "text/plain"}), 415, 3,
         "unsupported Content-Type 'text/plain'; use application/x-protobuf or application/json"),
        (dict(body=good, headers={"Content-Encoding": "br"}), 415, 3,
         "unsupported Content-Encoding 'br'; use gzip or none"),
        (dict(body=b"not gzip", headers={"Content-Encoding": "gzip"}), 400, 3, "body is not valid gzip: "),
        (dict(body=good, path="/v1/profiles"), 404, 12,
         "no such path '/v1/profiles'; use /v1/logs, /v1/metrics or /v1/traces"),
        (dict(body=b"", method="GET"), 405, 12, "GET is not supported; OTLP/HTTP exports use POST"),
    ]
    for kwargs, status, code, message in cases:
        response, data = http_post(server.http_port, **kwargs)
        as_json = response.getheader("Content-Type") == "application/json"
        assert response.status == status, kwargs
        got_code, got_message = status_of(data, as_json)
        assert got_code == code and got_message.startswith(message), (kwargs, got_message)
    assert http_post(server.http_port, method="GET")[0].getheader("Allow") == "POST"
    # no exporter's (a form, curl -d) to a path that is no route: told in plain text, as a page is
    response, data = http_post(server.http_port, body=b"a=1", path="/v1/profile",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (response.status, response.getheader("Content-Type"), data) == \
        (404, "text/plain; charset=utf-8", b"no such page '/v1/profile'; the dashboard is at /\n")
    assert stats(server).total_requests == 3


def test_http_json_rules_keepalive_and_chunked(server):
    import http.client
    record = {"timeUnixNano": "1772359200000000000", "traceId": "5b8efff798038103d269b633813fc60c",
              "spanId": "eee19b7ec3c1b174", "severityNumber": 9, "futureField": {"x": 1},
              "body": {"stringValue": "claude_code.api_request"},
              "attributes": [{"key": "session.id", "value": {"stringValue": "json-1"}},
                             {"key": "event.sequence", "value": {"intValue": 1}},
                             {"key": "model", "value": {"stringValue": "claude-sonnet-4-5"}},
                             {"key": "input_tokens", "value": {"intValue": 1500}},
                             {"key": "output_tokens", "value": {"intValue": "25"}},
                             {"key": "cost_usd", "value": {"doubleValue": 0.0125}}]}
    body = json.dumps({"resourceLogs": [{"resource": {"attributes": []}, "scopeLogs": [{"logRecords": [record]}]}]})
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    conn.request("POST", "/v1/logs", body=body, headers={"Content-Type": "application/json; charset=utf-8"})
    first = conn.getresponse()
    assert (first.status, first.getheader("Content-Type"), json.loads(first.read())) == (200, "application/json", {})
    chunks = [body[:50], body[50:]]
    conn.putrequest("POST", "/v1/logs")  # the same connection: keep-alive
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for chunk in chunks:
        conn.send(f"{len(chunk):x}\r\n{chunk}\r\n".encode())
    conn.send(b"0\r\n\r\n")
    second = conn.getresponse()
    assert second.status == 200 and json.loads(second.read()) == {}
    conn.close()
    rows = db_rows(server.db, "SELECT ts, input_tokens, output_tokens, cost_nanos FROM r "
                              "WHERE session_id = 'json-1'")
    assert rows == [(1772359200000, 1500, 25, 12_500_000)]


def raw_http(port: int, data: bytes, half_close: bool = False, timeout: float = 20) -> list[tuple[int, dict, bytes]]:
    """Send raw bytes on one connection, keep it open (or only `half_close` it) and read until the server closes
    it; the responses, parsed. Fails when the server still holds the connection open after `timeout` seconds."""
    import http.client
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # answered before all of it was sent
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closed with bytes of ours unread: what arrived before the reset is the answer
        except TimeoutError:
            pytest.fail(f"the server kept the connection open; it sent {bytes(received)[:300]!r}")
    stream, responses = io.BytesIO(bytes(received)), []
    while stream.tell() < len(received):
        status = int(stream.readline().split()[1])
        headers = http.client.parse_headers(stream)
        responses.append((status, headers, stream.read(int(headers.get("Content-Length", 0)))))
    return responses


def raw_post(headers: str, body: bytes, version: str = "HTTP/1.1") -> bytes:
    return (f"POST /v1/logs {version}\r\nHost: ccmon\r\nContent-Type: application/x-protobuf\r\n{headers}\r\n"
            .encode() + body)


def test_http_framing_follows_rfc_9112(server):
    """A body framed two ways is how one request hides another behind a proxy: every ambiguous framing gets
    400 (501 for a transfer coding ccmon does not speak) and the connection closes; nothing in it is stored."""
    export = logs_request([("api_request", api_request(1, "2026-03-01T10:00:00Z", session="smuggled"))])
    data = export.SerializeToString()
    hidden = raw_post(f"Content-Length: {len(data)}\r\n", data)  # a whole second request inside the body
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    cases = [
        (f"Content-Length: 0\r\nContent-Length: {len(hidden)}\r\n", hidden, 400, "more than one Content-Length"),
        (f"Content-Length: {len(hidden)}\r\nContent-Length: 0\r\n", hidden, 400, "more than one Content-Length"),
        (f"Content-Length: {len(hidden)}, {len(hidden)}\r\n", hidden, 400, "Content-Length '"),
        ("Content-Length: +0\r\n", hidden, 400, "Content-Length '+0' is not a byte count"),
        ("Content-Length: -1\r\n", hidden, 400, "Content-Length '-1' is not a byte count"),
        ("Content-Length: 0x10\r\n", hidden, 400, "Content-Length '0x10' is not a byte count"),
        (f"Content-Length: {len(chunked)}\r\nTransfer-Encoding: chunked\r\n", chunked, 400,
         "both Transfer-Encoding and Content-Length"),
        ("Transfer-Encoding: chunked\r\nContent-Length: 0\r\n", chunked, 400,
         "both Transfer-Encoding and Content-Length"),
        (f"Content-Length: {len(chunked)}\r\nTransfer-Encoding : chunked\r\n", chunked, 400,
         "malformed header field line"),
        ("Transfer-Encoding: xchunked\r\n", chunked, 400, "Transfer-Encoding 'xchunked': chunked must be"),
        ("Transfer-Encoding: chunked, identity\r\n", chunked, 400, "Transfer-Encoding 'chunked, identity': chunked"),
        ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", chunked, 400,
         "Transfer-Encoding 'chunked, chunked': chunked must be"),
        ("Transfer-Encoding: gzip, chunked\r\n", chunked, 501, "Transfer-Encoding 'gzip, chunked' is not supported"),
        ("Transfer-Encoding: chunked\r\n", b"+%x\r\n%s\r\n0\r\n\r\n" % (len(data), data), 400,
         "chunked body: b'+"),
        ("Transfer-Encoding: chunked\r\n", b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(data), data), 400,
         "chunked body: b'0x"),
        ("Transfer-Encoding: chunked\r\n", b" %x\r\n%s\r\n0\r\n\r\n" % (len(data), data), 400, "chunked body: b' "),
        ("Transfer-Encoding: chunked\r\n", b"%x\n%s\n0\n\n" % (len(data), data), 400, "chunked body: a line"),
        ("Transfer-Encoding: chunked\r\n", b"%x\r\n%sXX0\r\n\r\n" % (len(data) - 2, data), 400,
         "chunked body: chunk data not followed by CRLF"),
    ]
    for headers, body, status, message in cases:
        [(got, response_headers, answer)] = raw_http(server.http_port, raw_post(headers, body))
        assert (got, response_headers["Connection"]) == (status, "close"), headers
        assert status_of(answer)[1].startswith(message), (headers, status_of(answer))
    for headers, body, message in ((f"Content-Length: {len(data) + 10}\r\n", data,
                                    f"body ended after {len(data)} of its {len(data) + 10} bytes"),
                                   ("Transfer-Encoding: chunked\r\n", b"%x\r\n%s" % (len(data) + 10, data),
                                    "chunked body ended early")):
        [(got, _, answer)] = raw_http(server.http_port, raw_post(headers, body), half_close=True)
        assert (got, status_of(answer)[1]) == (400, message)
    [(got, _, answer)] = raw_http(server.http_port, raw_post("Transfer-Encoding: chunked\r\n", chunked, "HTTP/1.0"))
    assert (got, status_of(answer)[1]) == (400, "Transfer-Encoding is not allowed in HTTP/1.0")
    # Unauthenticated, unknown paths and other errors answered before the body is read close the connection
    # too, so an unread body is never taken for the next request.
    [(got, _, _)] = raw_http(server.http_port, raw_post(f"Content-Length: {len(hidden)}\r\n", hidden)
                             .replace(b"/v1/logs", b"/v1/nothing", 1))
    assert got == 404
    assert stats(server).total_requests == 0
    # Correct framing, with a chunk extension and a trailer, is accepted on a connection kept open.
    fine = logs_request([("api_request", api_request(2, "2026-03-01T10:00:00Z", session="framed"))])
    data = fine.SerializeToString()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=20) as sock:
        sock.sendall(raw_post("Transfer-Encoding: chunked\r\n", b"%x;part=1\r\n%s\r\n0\r\nX-Checksum: 1\r\n\r\n"
                              % (len(data), data)))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert db_rows(server.db, "SELECT session_id FROM r") == [("framed",)]


def test_chunked_bodies_are_held_to_the_size_limit(tmp_path):
    """Chunk sizes count toward --server-max-message-size before their bytes are read: a body that would pass
    it is refused at once, with the client still sending; so are over-long chunk lines and trailer floods."""
    srv = ServerProcess(tmp_path, "--server-max-message-size", "1MiB").start()
    limit = 1024 * 1024
    try:
        rss_before = process_rss_kib(srv.proc.pid)
        chunked = "Transfer-Encoding: chunked\r\n"
        cases = [
            (b"-1\r\n" + b"\0" * 65536, 400, "chunked body: b'-1' is not a hex chunk size"),
            (b"%x\r\n" % (limit + 1) + b"\0" * 65536, 413, f"body is over the {limit} byte limit"),
            (b"f" * 40 + b"\r\n" + b"\0" * 65536, 413, f"body is over the {limit} byte limit"),
            (b"80000\r\n" + b"\0" * 0x80000 + b"\r\n80001\r\n" + b"\0" * 65536, 413,
             f"body is over the {limit} byte limit"),
            (b"1;" + b"x" * 100_000 + b"\r\n", 400, "chunked body: a line is not ended by CRLF within 4096 bytes"),
            (b"0\r\n" + b"X-Trailer: 1\r\n" * 1000, 400, "chunked body: more than 64 trailer lines"),
        ]
        for body, status, message in cases:
            [(got, _, answer)] = raw_http(srv.http_port, raw_post(chunked, body))
            assert (got, status_of(answer)[1]) == (status, message), body[:40]
        assert process_rss_kib(srv.proc.pid) - rss_before < 60 * 1024
        assert stats(srv).total_requests == 0
    finally:
        srv.stop()


def test_a_client_refused_mid_upload_reads_its_answer(tmp_path):
    """An answer given before the body is read (here 413) is followed by reading and dropping the rest of the
    upload, so a client still sending sees the answer rather than a connection reset under it."""
    srv = ServerProcess(tmp_path, "--server-max-message-size", "1MiB").start()
    try:
        body, answer = b"\0" * (1024 * 1024 + 1), bytearray()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # still sending when the answer comes
            sock.settimeout(20)
            sock.connect(("127.0.0.1", srv.http_port))
            sock.sendall(raw_post(f"Content-Length: {len(body)}\r\n", body))
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 413 ") and b"body of 1048577 bytes is over" in answer
    finally:
        srv.stop()


def test_otlp_json_body_must_be_an_object(server):
    for body in (b"null", b"true", b"12", b"1.5", b'"x"', b"[]", b"[{}]"):
        response, data = http_post(server.http_port, body=body, headers={"Content-Type": "application/json"})
        assert response.status == 400, body
        assert status_of(data, as_json=True) == (3, "body is not valid OTLP/JSON: the top level is not an object")


async def async_export(port: int, body: bytes) -> tuple[int, dict]:
    """One OTLP/HTTP export on a fresh connection, with asyncio's raw streams; its status and headers."""
    import http.client
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw_post(f"Content-Length: {len(body)}\r\n", body))
        status = int((await reader.readline()).split()[1])
        head = b""
        while (line := await reader.readline()) not in (b"\r\n", b""):
            head += line
        return status, http.client.parse_headers(io.BytesIO(head + b"\r\n"))
    finally:
        writer.close()


def test_a_burst_of_1000_exports_is_answered_and_kept(server):
    """1,000 exports at once: each is answered within 30 s, 200 or 503 with Retry-After, and every one
    acknowledged is stored."""
    async def export(index: int) -> tuple[int, dict]:
        body = logs_request([("api_request", api_request(index, "2026-03-01T10:00:00Z", session=f"burst-{index}",
                                                         input_tokens=1))]).SerializeToString()
        async with asyncio.timeout(30):
            return await async_export(server.http_port, body)

    async def burst() -> list:
        return await asyncio.gather(*(export(index) for index in range(1000)), return_exceptions=True)

    answers = asyncio.run(burst())
    failures = [repr(answer) for answer in answers if isinstance(answer, BaseException)]
    assert not failures, f"{len(failures)} exports got no answer, e.g. {failures[:3]}"
    assert {status for status, _ in answers} <= {200, 503}
    assert all(headers["Retry-After"] for status, headers in answers if status == 503)
    acknowledged = {f"burst-{index}" for index, (status, _) in enumerate(answers) if status == 200}
    stored = {session for (session,) in db_rows(server.db, "SELECT session_id FROM r")}
    assert acknowledged <= stored and len(acknowledged) > 0


def server_threads(pid: int) -> int:
    return int(re.search(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def test_slow_clients_cannot_keep_others_out(server):
    """1,000 connections trickling a request a byte at a time hold no more than the listener's bounded
    threads, and an export sent meanwhile is answered promptly."""
    async def trickle(connected: list, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
        connected.append(writer)
        try:
            writer.write(b"POST /v1/logs HTTP/1.1\r\nX-Slow: ")
            while not stop.is_set():
                writer.write(b"s")
                await writer.drain()
                await asyncio.sleep(0.5)
        except ConnectionError:
            pass  # the server closed it
        finally:
            writer.close()

    async def scenario() -> tuple[int, int]:
        connected, stop = [], asyncio.Event()
        slow = [asyncio.create_task(trickle(connected, stop)) for _ in range(1000)]
        async with asyncio.timeout(60):
            while len(connected) < 1000 and not any(task.done() for task in slow):
                await asyncio.sleep(0.05)
        assert len(connected) == 1000, [task.exception() for task in slow if task.done()][:3]
        body = logs_request([("api_request", api_request(1, "2026-03-01T10:00:00Z", session="patient"))])
        try:
            async with asyncio.timeout(10):  # an exporter's default timeout
                status, _ = await async_export(server.http_port, body.SerializeToString())
            return status, server_threads(server.proc.pid)
        finally:
            stop.set()
            await asyncio.gather(*slow, return_exceptions=True)

    status, threads = asyncio.run(scenario())
    assert status == 200
    assert threads <= ccmon.HTTP_MAX_CONNECTIONS + 64
    assert db_rows(server.db, "SELECT session_id FROM r") == [("patient",)]


def test_idle_and_slow_connections_are_closed_at_their_deadline(tmp_path):
    """A connection must deliver each whole request within the client timeout of opening or of its last
    answer: one that sends nothing, trickles bytes, or idles after an answer is closed; those never answered
    are told 503 with Retry-After first (an exporter retries that), an idle keep-alive one nothing."""
    store = ccmon.Writer(tmp_path / "ccmon.db")
    httpd = ccmon.OTLPHTTPServer(("127.0.0.1", 0), ccmon.Receiver(store), "", 1024 * 1024, client_timeout_s=1.5)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port, stop = httpd.server_address[1], threading.Event()

    def last_words(sock: socket.socket) -> bytes | None:
        """What the server sent before it closed the connection (None: it did not close it in time)."""
        said = b""
        try:
            while chunk := sock.recv(65536):
                said += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            return None
        return said

    def trickle(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(b"POST /v1/logs HTTP/1.1\r\nX-Slow: ")
            while not stop.wait(0.1):
                sock.sendall(b"s")

    try:
        idle, trickling, answered = (socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(3))
        threading.Thread(target=trickle, args=(trickling,), daemon=True).start()
        data = logs_request([("api_request", api_request(1, "2026-03-01T10:00:00Z"))]).SerializeToString()
        for _ in range(4):  # each answer restarts the clock: a connection in use stays open past it
            answered.sendall(raw_post(f"Content-Length: {len(data)}\r\n", data))
            assert answered.recv(65536).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.5)  # pacing, not a wait: 4 answers 0.5 s apart outlast the 1.5 s timeout of the first one
        busy = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n")
        for sock, said in ((idle, busy), (trickling, busy), (answered, b"")):
            assert last_words(sock) == said
            sock.close()
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()
        store.close()


# ---------------------------------------------------------------- server: every protocol end to end, tokens, TLS, limits, faults, start and stop

NODE_PACKAGES = {"@opentelemetry/api": "1.10.0", "@opentelemetry/sdk-logs": "3.1.0",
                 "@opentelemetry/resources": "3.1.0", "@opentelemetry/exporter-logs-otlp-http": "0.301.0",
                 "@opentelemetry/exporter-logs-otlp-proto": "0.301.0",
                 "@opentelemetry/exporter-logs-otlp-grpc": "0.301.0"}


NODE_EMITTER = r"""
// Claude-Code-shaped events through the real OpenTelemetry JS SDK and exporters (Claude Code is Node.js).
const { LoggerProvider, SimpleLogRecordProcessor, InMemoryLogRecordExporter } = require('@opentelemetry/sdk-logs');
const { resourceFromAttributes } = require('@opentelemetry/resources');
const spec = JSON.parse(process.argv[2]);
const compression = spec.gzip ? 'gzip' : 'none';
let exporter;
if (spec.protocol === 'grpc') {
  const { OTLPLogExporter } = require('@opentelemetry/exporter-logs-otlp-grpc');
  const grpc = require('@grpc/grpc-js');
  const metadata = new grpc.Metadata();
  for (const [k, v] of Object.entries(spec.headers || {})) metadata.set(k, v);
  exporter = new OTLPLogExporter({ url: spec.endpoint, compression, metadata });
} else {
  const name = spec.protocol === 'http/json' ? 'http' : 'proto';
  const { OTLPLogExporter } = require('@opentelemetry/exporter-logs-otlp-' + name);
  exporter = new OTLPLogExporter({ url: spec.endpoint + '/v1/logs', compression, headers: spec.headers || {} });
}
const memory = new InMemoryLogRecordExporter();
const provider = new LoggerProvider({ resource: resourceFromAttributes(spec.resource || {}),
                                      processors: [new SimpleLogRecordProcessor({ exporter: memory })] });
const logger = provider.getLogger('com.anthropic.claude_code.events');
for (const e of spec.events) logger.emit({ body: e.body, attributes: e.attributes });
provider.forceFlush().then(() => exporter.export(memory.getFinishedLogRecords(), (result) => {
  const error = result.error ? String(result.error.message || result.error) : null;
  process.stdout.write(JSON.stringify({ code: result.code, error }) + '\n');
  exporter.shutdown().then(() => provider.shutdown());
}));
"""


def npm_install_once(name: str, packages: dict[str, str]) -> Path:
    """Install exact versions of npm packages from the registry once, into a cache folder named after them
    (`$XDG_CACHE_HOME` or `~/.cache`, then `ccmon-tests/NAME-HASH`), and return that folder. A file lock keeps
    concurrent test runs from installing over each other, and a marker written last tells a complete install
    from an interrupted one. Without npm or the registry this fails (never skips), saying what is missing:
    CI has both."""
    import fcntl
    import hashlib
    key = hashlib.sha256(json.dumps(packages, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ccmon-tests" / f"{name}-{key}"
    marker = cache / ".installed"
    if marker.exists():
        return cache
    if not shutil.which("npm"):
        pytest.fail("npm is not installed: these tests install Node.js packages from the npm registry "
                    "(.ci/run installs nodejs and npm with apt-get when they are missing)")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / f"{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            wanted = [f"{package}@{version}" for package, version in packages.items()]
            try:
                result = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                                         "--prefix", str(cache), *wanted], capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                pytest.fail(f"npm install {' '.join(wanted)} took over 15 minutes (is the npm registry reachable?)")
            if result.returncode != 0:
                pytest.fail(f"npm install {' '.join(wanted)} failed (exit {result.returncode}; is the npm registry "
                            f"reachable?):\n{result.stderr[-3000:]}")
            marker.write_text(json.dumps(packages))
    return cache


@pytest.fixture(scope="session")
def node_emitter() -> Path:
    """The OpenTelemetry JS SDK installed from the npm registry once into a cache folder."""
    script = npm_install_once("node-otel", NODE_PACKAGES) / "emit.js"
    script.write_text(NODE_EMITTER)
    return script


def node_export(script: Path, protocol: str, endpoint: str, events, gzip=False, headers=None) -> dict:
    spec = {"protocol": protocol, "endpoint": endpoint, "gzip": gzip, "headers": headers or {},
            "resource": CLAUDE_RESOURCE,
            "events": [{"body": f"claude_code.{name}", "attributes": attrs} for name, attrs in events]}
    result = subprocess.run(["node", str(script), json.dumps(spec)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def events_for(session: str):
    return [(name, {**attrs, "session.id": session}) for name, attrs in MIXED_EVENTS]


def session_figures(srv: ServerProcess, session: str) -> tuple:
    rows = db_rows(srv.db, "SELECT COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cache_read_tokens), "
                           "SUM(cache_creation_tokens), SUM(cost_nanos), SUM(duration_ms), GROUP_CONCAT(model_name) "
                           "FROM (SELECT * FROM r WHERE session_id = ? ORDER BY ts)", (session,))
    events = db_rows(srv.db, "SELECT name, attributes FROM e WHERE session_id = ? ORDER BY ts", (session,))
    return rows[0], events


@e2e
def test_every_claude_code_protocol_is_recorded_identically(server, node_emitter):
    http = f"http://127.0.0.1:{server.http_port}"
    for gzip in (False, True):
        suffix = "-gz" if gzip else ""
        assert sdk_export(server.port, events_for(f"py-grpc{suffix}"), gzip=gzip) == ["SUCCESS"]
        assert sdk_export(server.http_port, events_for(f"py-http{suffix}"), protocol="http/protobuf",
                          gzip=gzip) == ["SUCCESS"]
        for protocol, endpoint in (("grpc", f"http://127.0.0.1:{server.port}"), ("http/protobuf", http),
                                   ("http/json", http)):
            session = f"node-{protocol}{suffix}"
            assert node_export(node_emitter, protocol, endpoint, events_for(session), gzip=gzip) == \
                {"code": 0, "error": None}
    reference = session_figures(server, "py-grpc")
    assert reference[0] == (3, 1210 + 800, 2388 + 95, 45123, 2712, 143_075_000, 27950,
                            "claude-sonnet-4-5,claude-haiku-4-5-20251001,claude-opus-4-1")
    assert [name for name, _ in reference[1]] == ["user_prompt", "tool_result"]
    for session in ("py-grpc-gz", "py-http", "py-http-gz", "node-grpc", "node-grpc-gz", "node-http/protobuf",
                    "node-http/protobuf-gz", "node-http/json", "node-http/json-gz"):
        assert session_figures(server, session) == reference, session
    assert "logs: 5 records, 3 api requests, 5 new, 0 rejected" in server.log


def wait_for_log(srv: ServerProcess, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in srv.log:
        assert time.monotonic() < deadline, f"{text!r} not logged: {srv.log}"
        time.sleep(0.05)


def test_refused_calls_are_logged_once_a_minute_per_address_and_reason(tmp_path):
    """A forgotten token shows in the server's log, once a minute per listener, address and reason; the token
    and what was sent in its place never do."""
    token = "s3cret-token-value"
    srv = ServerProcess(tmp_path, env={"CCMON_TOKEN": token}).start()
    try:
        request = logs_request(MIXED_EVENTS)
        for _ in range(3):  # GetStats comes from the same address for the same reason as Export: not logged again
            assert http_post(srv.http_port, body=request.SerializeToString())[0].status == 401
            assert http_post(srv.http_port, body=request.SerializeToString(),
                             headers={"Authorization": "Bearer nope"})[0].status == 401
            for metadata in ((), (("authorization", "Bearer wrong-token"),)):
                with pytest.raises(grpc.RpcError):
                    srv.logs_stub().Export(request, metadata=metadata)
            with pytest.raises(grpc.RpcError):
                srv.query().GetStats(ccmon_pb2.GetStatsRequest())
        srv.logs_stub().Export(request, metadata=(("authorization", f"Bearer {token}"),))
        wait_for_log(srv, "logs: 5 records")  # logged after every refusal above
        hint = ("; Claude Code sends the token with OTEL_EXPORTER_OTLP_HEADERS=\"Authorization=Bearer <token>\", "
                "the monitor with CCMON_TOKEN (logged once a minute per address and reason)")
        refusals = [line.split(" WARNING ", 1)[1] for line in srv.lines if " refused " in line]
        assert refusals == [
            f"refused OTLP/HTTP /v1/logs from 127.0.0.1: no bearer token{hint}\n",
            f"refused OTLP/HTTP /v1/logs from 127.0.0.1: wrong bearer token{hint}\n",
            f"refused gRPC /opentelemetry.proto.collector.logs.v1.LogsService/Export from 127.0.0.1: no bearer "
            f"token{hint}\n",
            f"refused gRPC /opentelemetry.proto.collector.logs.v1.LogsService/Export from 127.0.0.1: wrong bearer "
            f"token{hint}\n",
        ]
        assert token not in srv.log and "nope" not in srv.log and "wrong-token" not in srv.log
    finally:
        srv.stop()


def test_oversize_and_gzip_bombs_are_refused_without_growing(tmp_path):
    import gzip as gzip_module
    srv = ServerProcess(tmp_path, "--server-max-message-size", "1MiB").start()
    try:
        rss_before = process_rss_kib(srv.proc.pid)
        bomb = gzip_module.compress(b"\0" * (200 * 1024 * 1024), compresslevel=9)
        assert len(bomb) < 300 * 1024
        response, data = http_post(srv.http_port, body=bomb, headers={"Content-Encoding": "gzip"})
        assert response.status == 413
        assert status_of(data) == (8, f"decompressed body is over {1024 * 1024} bytes")
        response, data = http_post(srv.http_port, body=b"\0" * (1024 * 1024 + 1))
        assert response.status == 413
        assert status_of(data) == (8, f"body of {1024 * 1024 + 1} bytes is over the {1024 * 1024} byte limit")
        big = logs_request([("tool_result", {"session.id": "s", "output": "x" * (2 * 1024 * 1024)})])
        channel = grpc.insecure_channel(srv.target, compression=grpc.Compression.Gzip)
        with pytest.raises(grpc.RpcError) as err:
            logs_service_pb2_grpc.LogsServiceStub(channel).Export(big)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert process_rss_kib(srv.proc.pid) - rss_before < 60 * 1024  # never held the 200 MB
        assert stats(srv).total_requests == 0
    finally:
        srv.stop()


def process_rss_kib(pid: int, field: str = "VmHWM") -> int:
    """The process's peak resident size (VmHWM), or its current one (VmRSS), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


def test_per_record_caps_reject_through_partial_success(server):
    deep = common_pb2.AnyValue(string_value="leaf")
    for _ in range(10):
        deep = common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(values=[common_pb2.KeyValue(key="k",
                                                                                                     value=deep)]))
    request = logs_request([("tool_result", {"session.id": "s", "event.sequence": 1, "output": "x" * (1024 * 1024 + 1)}),
                            ("tool_result", {f"k{i}": i for i in range(1025)}),
                            ("tool_result", {"session.id": "s", "event.sequence": 3}),
                            ("api_request", api_request(4, "2026-03-01T10:00:00Z", input_tokens=5))])
    request.resource_logs[0].scope_logs[0].log_records[2].attributes.add(key="deep", value=deep)
    response = server.logs_stub().Export(request)
    assert response.partial_success.rejected_log_records == 3
    assert response.partial_success.error_message == (
        "rejected 3 of 4 log records: log record: an attribute value is longer than 1024 KiB; "
        "log record: more than 1024 attributes; log record: attribute values nested deeper than 8 levels")
    assert stats(server).total_tokens.input == 5


def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with openssl."""
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return cert, key


def test_token_is_required_everywhere_and_never_echoed(tmp_path):
    token = "s3cret-token-value"
    srv = ServerProcess(tmp_path, env={"CCMON_TOKEN": token}).start()
    try:
        request = logs_request(MIXED_EVENTS)
        for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                               ((("authorization", "Bearer wrong-token"),), grpc.StatusCode.UNAUTHENTICATED)):
            with pytest.raises(grpc.RpcError) as err:
                srv.logs_stub().Export(request, metadata=metadata)
            assert (err.value.code(), err.value.details()) == (code, "missing or wrong bearer token")
            with pytest.raises(grpc.RpcError) as err:
                srv.query().GetStats(ccmon_pb2.GetStatsRequest(), metadata=metadata)
            assert err.value.code() == code
        good = (("authorization", f"Bearer {token}"),)
        assert not srv.logs_stub().Export(request, metadata=good).HasField("partial_success")
        assert sdk_export(srv.port, events_for("sdk"), headers={"authorization": f"Bearer {token}"}) == ["SUCCESS"]
        assert sdk_export(srv.http_port, events_for("sdk-http"), protocol="http/protobuf",
                          headers={"Authorization": f"Bearer {token}"}) == ["SUCCESS"]
        response, data = http_post(srv.http_port, body=request.SerializeToString(),
                                   headers={"Authorization": "Bearer nope"})
        assert (response.status, response.getheader("WWW-Authenticate")) == (401, "Bearer")
        assert status_of(data) == (16, "missing or wrong bearer token")
        assert http_post(srv.http_port, body=request.SerializeToString())[0].status == 401
        assert srv.query().GetStats(ccmon_pb2.GetStatsRequest(), metadata=good).stats.total_requests == 9
        # The monitor side sends the token from CCMON_TOKEN or --monitor-token.
        with_env = run_ccmon(["--monitor-server", srv.target, "--format", "@monthly_tokens"], tmp_path,
                             env={"CCMON_TOKEN": token})
        assert with_env.returncode == 0
        refused = run_ccmon(["--monitor-server", srv.target, "--monitor-token", "bad", "--format", "@daily_cost"],
                            tmp_path)
        assert (refused.returncode, refused.stdout) == (1, "")
        assert refused.stderr == (f"ccmon: cannot reach the ccmon server at {srv.target}: the server refused the "
                                  "token (CCMON_TOKEN or monitor.token)\n")
        assert token not in srv.log and "wrong-token" not in srv.log and "nope" not in srv.log
    finally:
        srv.stop()


def test_tls_and_mutual_tls(tmp_path, monkeypatch):
    # requests lets these variables override the exporter's own CA file (session.verify); keep them out.
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    cert, key = make_certificate(tmp_path, "server")
    srv = ServerProcess(tmp_path, "--server-tls-cert", str(cert), "--server-tls-key", str(key)).start()
    try:
        assert "TLS" in srv.log
        assert sdk_export(srv.port, events_for("tls-grpc"), ca=cert) == ["SUCCESS"]
        assert sdk_export(srv.http_port, events_for("tls-http"), protocol="http/protobuf", ca=cert) == ["SUCCESS"]
        figures = run_ccmon(["--monitor-server", f"https://127.0.0.1:{srv.port}", "--monitor-tls-ca", str(cert),
                             "--format", "@monthly_tokens"], tmp_path)
        assert figures.returncode == 0, figures.stderr
        plain = run_ccmon(["--monitor-server", srv.target, "--format", "@daily_cost"], tmp_path)
        assert plain.returncode == 1
        untrusted = run_ccmon(["--monitor-server", f"https://127.0.0.1:{srv.port}", "--format", "@daily_cost"],
                              tmp_path, env={"SSL_CERT_FILE": str(tmp_path / "none.pem")})
        assert untrusted.returncode == 1 and "TLS handshake failed" in untrusted.stderr
        assert stats_over_tls(srv, cert).total_requests == 6
    finally:
        srv.stop()
    client_cert, client_key = make_certificate(tmp_path, "client")
    srv = ServerProcess(tmp_path, "--server-tls-cert", str(cert), "--server-tls-key", str(key),
                        "--server-tls-client-ca", str(client_cert)).start()
    try:
        assert "TLS with client certificates" in srv.log
        with_cert = run_ccmon(["--monitor-server", f"https://127.0.0.1:{srv.port}", "--monitor-tls-ca", str(cert),
                               "--monitor-tls-cert", str(client_cert), "--monitor-tls-key", str(client_key),
                               "--health"], tmp_path)
        assert with_cert.returncode == 0 and with_cert.stdout.startswith("ok: ccmon")
        without = run_ccmon(["--monitor-server", f"https://127.0.0.1:{srv.port}", "--monitor-tls-ca", str(cert),
                             "--health"], tmp_path)
        assert without.returncode == 1
        import ssl
        context = ssl.create_default_context(cafile=str(cert))
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            http_post(srv.http_port, body=b"", context=context)
        context.load_cert_chain(str(client_cert), str(client_key))
        assert http_post(srv.http_port, body=logs_request(MIXED_EVENTS).SerializeToString(),
                         context=context)[0].status == 200
    finally:
        srv.stop()


def test_health_follows_the_servers_own_settings(tmp_path):
    """As in the Docker image: --health reads the server's configuration (its address, a wildcard one, its
    token from CCMON_TOKEN, its TLS certificate for a name other than 127.0.0.1) and checks that server."""
    cert, key = tmp_path / "named.pem", tmp_path / "named-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", "/CN=ccmon.test", "-keyout", str(key), "-out", str(cert), "-addext",
                    "subjectAltName=DNS:ccmon.test"], check=True, capture_output=True)
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / ".ccmon").mkdir()
    (tmp_path / ".ccmon" / "config.toml").write_text(
        f'[server]\naddress = "0.0.0.0:{port}"\nhttp_address = "off"\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    env = {"CCMON_TOKEN": "s3cret"}
    srv = ServerProcess(tmp_path, "--server-address", f"0.0.0.0:{port}", env=env).start()
    try:
        healthy = run_ccmon(["--health"], tmp_path, env={"HOME": str(tmp_path), **env})
        assert (healthy.returncode, healthy.stdout) == (0, f"ok: ccmon {ccmon.VERSION} at https://127.0.0.1:{port}, "
                                                           "0 requests stored\n")
        wrong_token = run_ccmon(["--health"], tmp_path, env={"HOME": str(tmp_path), "CCMON_TOKEN": "guess"})
        assert wrong_token.returncode == 1 and "refused the token" in wrong_token.stderr
    finally:
        srv.stop()


def stats_over_tls(srv: ServerProcess, ca: Path):
    channel = grpc.secure_channel(srv.target, grpc.ssl_channel_credentials(ca.read_bytes()))
    return ccmon_pb2_grpc.QueryServiceStub(channel).GetStats(ccmon_pb2.GetStatsRequest()).stats


def test_exposed_server_warns_without_token(tmp_path):
    srv = ServerProcess(tmp_path, address="0.0.0.0:0").start()
    try:
        assert "LISTENING ON 0.0.0.0:0 WITHOUT A TOKEN" in srv.log
    finally:
        srv.stop()
    srv = ServerProcess(tmp_path, "--server-token", "t0ken", address="0.0.0.0:0").start()
    try:
        assert "WITHOUT A TOKEN" not in srv.log and "token required" in srv.log
    finally:
        srv.stop()


def _any_values():
    from hypothesis import strategies as st
    scalars = st.one_of(st.text(max_size=20), st.integers(min_value=-2 ** 63, max_value=2 ** 63 - 1),
                        st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.binary(max_size=8),
                        st.sampled_from(["12", "-3", "1e400", "NaN", "0x10", " 7 ", "1.5", "", "∞"]))

    def to_any(value):
        if isinstance(value, list):
            return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[to_any(v) for v in value]))
        if isinstance(value, dict):
            return common_pb2.AnyValue(kvlist_value=common_pb2.KeyValueList(
                values=[common_pb2.KeyValue(key=k, value=to_any(v)) for k, v in value.items()]))
        if isinstance(value, bytes):
            return common_pb2.AnyValue(bytes_value=value)
        return any_value(value)

    trees = st.recursive(scalars, lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)), max_leaves=12)
    return trees.map(to_any)


NUMERIC_KEYS = ["input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "cost_usd",
                "cost_usd_micros", "duration_ms", "ttft_ms", "event.sequence", "event.timestamp", "session.id"]


def test_random_otlp_input_never_crashes_or_stores_bad_figures(server):
    from hypothesis import HealthCheck, given, settings, strategies as st
    values = _any_values()
    record = st.builds(
        lambda body, attrs, ts: logs_pb2.LogRecord(
            body=body, time_unix_nano=ts,
            attributes=[common_pb2.KeyValue(key=k, value=v) for k, v in attrs.items()]),
        st.one_of(st.just(common_pb2.AnyValue(string_value="claude_code.api_request")), values),
        st.dictionaries(st.one_of(st.sampled_from(NUMERIC_KEYS + ["model", "event.name"]), st.text(max_size=8)),
                        values, max_size=8),
        st.integers(min_value=0, max_value=2 ** 64 - 1))
    point = st.builds(lambda v, t: metrics_pb2.NumberDataPoint(as_double=v, time_unix_nano=t),
                      st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=0, max_value=2 ** 64 - 1))
    logs_stub = server.logs_stub()
    metrics_stub = metrics_service_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(server.target))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(record, max_size=6), st.lists(point, max_size=4), values)
    def throw(records, points, resource_value):
        request = logs_service_pb2.ExportLogsServiceRequest(resource_logs=[logs_pb2.ResourceLogs(
            resource={"attributes": [common_pb2.KeyValue(key="r", value=resource_value)]},
            scope_logs=[logs_pb2.ScopeLogs(log_records=records)])])
        response = logs_stub.Export(request)
        assert response.partial_success.rejected_log_records <= len(records)
        metrics = metrics_service_pb2.ExportMetricsServiceRequest(resource_metrics=[metrics_pb2.ResourceMetrics(
            scope_metrics=[metrics_pb2.ScopeMetrics(metrics=[metrics_pb2.Metric(
                name="claude_code.cost.usage", sum=metrics_pb2.Sum(aggregation_temporality=1, data_points=points))])])])
        metrics_stub.Export(metrics)

    throw()
    bad = db_rows(server.db, "SELECT COUNT(*) FROM requests WHERE input_tokens < 0 OR output_tokens < 0 OR "
                             "cache_read_tokens < 0 OR cache_creation_tokens < 0 OR cost_nanos < 0 OR duration_ms < 0 "
                             "OR ts < 0 OR typeof(cost_nanos) != 'integer'")
    assert bad == [(0,)]
    assert db_rows(server.db, "SELECT COUNT(*) FROM metric_points WHERE NOT (value >= 0 AND value < 1e308)") == [(0,)]
    raw = db_rows(server.db, "SELECT COUNT(*), TOTAL(input_tokens), TOTAL(cost_nanos) FROM requests")
    assert db_rows(server.db, "SELECT TOTAL(requests), TOTAL(input_tokens), TOTAL(cost_nanos) FROM usage_rollup") == \
        [(float(raw[0][0]), raw[0][1], raw[0][2])]
    assert server.proc.poll() is None and "Traceback" not in server.log


def export_of(records: list, resource: dict = CLAUDE_RESOURCE) -> logs_service_pb2.ExportLogsServiceRequest:
    request = logs_request([], resource)
    request.resource_logs[0].scope_logs[0].log_records.extend(records)
    return request


def api_request_records(attrs: dict, limit_bytes: int, count: int = 10 ** 6) -> list:
    """Up to `count` api_request records an hour old with these attributes (and numbered sequences), as many
    as fit in `limit_bytes` of an export."""
    template = logs_request([("api_request", {**attrs, "session.id": "", "event.sequence": 0})])
    template = template.resource_logs[0].scope_logs[0].log_records[0]
    template.time_unix_nano = time.time_ns() - 3600 * 10 ** 9
    session, sequence = (next(kv.value for kv in template.attributes if kv.key == key)
                         for key in ("session.id", "event.sequence"))
    records, size = [], 0
    for seq in range(count):
        session.string_value, sequence.int_value = f"session-{seq % 100}", seq
        size += template.ByteSize() + 4
        if size > limit_bytes:
            break
        records.append(logs_pb2.LogRecord())
        records[-1].CopyFrom(template)
    return records


def test_big_exports_leave_the_server_near_its_idle_size(tmp_path):
    limit = 16 * 1024 * 1024
    many = export_of(api_request_records({"model": "claude-sonnet-4-5", "input_tokens": 1, "cost_usd": 0.001},
                                         limit - 1024, count=100_000))
    full = export_of(api_request_records(api_request(0, hours_ago(1), input_tokens="1200", output_tokens="340",
                                                     cache_read_tokens="15000", cost_usd="0.0421",
                                                     duration_ms="5120"), limit - 1024))
    huge_values = export_of([logs_pb2.LogRecord(body=any_value("claude_code.tool_result"), attributes=[
        common_pb2.KeyValue(key="session.id", value=any_value("huge")),
        common_pb2.KeyValue(key="event.sequence", value=any_value(seq)),
        common_pb2.KeyValue(key="output", value=any_value("x" * (1024 * 1024 - 200)))]) for seq in range(15)])
    many_count = len(many.resource_logs[0].scope_logs[0].log_records)
    full_count = len(full.resource_logs[0].scope_logs[0].log_records)
    assert many_count == 100_000 and full_count > 20_000
    assert all(limit - 2 * 1024 * 1024 < r.ByteSize() <= limit for r in (many, full, huge_values))
    srv = ServerProcess(tmp_path).start()
    try:
        stub = srv.logs_stub()
        stub.Export(logs_request([("api_request", api_request(0, hours_ago(1), session="warm-up"))]))
        processes = [srv.proc.pid, *decoder_pids(srv)]  # the server and its decoders
        idle = {pid: process_rss_kib(pid, "VmRSS") for pid in processes}
        for request in (many, full, huge_values):
            assert not stub.Export(request, timeout=120).HasField("partial_success")
        for pid in processes:
            assert process_rss_kib(pid) < 250 * 1024, "the peak (VmHWM)"
        deadline = time.monotonic() + 30  # memory is given back shortly after the last answer
        while any(process_rss_kib(pid, "VmRSS") > idle[pid] + 30 * 1024 for pid in processes) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in processes:
            assert process_rss_kib(pid, "VmRSS") <= idle[pid] + 30 * 1024, f"idle was {idle[pid] // 1024} MiB"
        assert stats(srv).total_requests == 1 + many_count + full_count  # and nothing lost on the way
        assert db_rows(srv.db, "SELECT COUNT(*) FROM events WHERE name = 'tool_result'") == [(15,)]
    finally:
        srv.stop()


# ---------------------------------------------------------------- client: what it says about wrong servers, the original Go ccmon both ways

def client_commands(address: str) -> list[list[str]]:
    """--health, a quick query and a report against `address`."""
    return [["--health", "--monitor-server", address], ["--monitor-server", address, "--format", "@daily_cost"],
            ["report", "daily", "--monitor-server", address]]


def assert_clients_say(address: str, found: str, cwd: Path) -> None:
    """Each client exits 1 with one line saying what it found at `address`."""
    health, quick, report = (run_ccmon(args, cwd) for args in client_commands(address))
    assert (health.returncode, health.stdout, health.stderr) == (1, "", f"unhealthy: {address}: {found}\n")
    for result in (quick, report):
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == f"ccmon: cannot reach the ccmon server at {address}: {found}\n"


def test_clients_say_what_they_found_instead_of_a_ccmon_server(server, tmp_path):
    from concurrent import futures
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(logs_service_pb2_grpc.LogsServiceServicer(), other)
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        assert_clients_say(f"127.0.0.1:{port}", "not a ccmon server (it does not answer ccmon.v1.QueryService)",
                           tmp_path)
        client = ccmon.Client(f"127.0.0.1:{port}")  # the monitor shows the same on its status line
        with pytest.raises(ccmon.ServerUnreachable, match=r"^not a ccmon server"):
            ccmon.fetch_snapshot(client, ccmon.query_for(ccmon.ViewState(), _settings(block_hour=None), int(time.time() * 1000)))
        client.close()
    finally:
        other.stop(None)
    assert_clients_say(f"127.0.0.1:{server.http_port}", "this is an HTTP port; the query service is on the gRPC port",
                       tmp_path)


def test_clients_over_tls_say_when_they_reached_the_https_port(tmp_path):
    cert, key = make_certificate(tmp_path, "server")
    srv = ServerProcess(tmp_path, "--server-tls-cert", str(cert), "--server-tls-key", str(key)).start()
    try:
        address = f"https://127.0.0.1:{srv.http_port}"
        result = run_ccmon(["--health", "--monitor-server", address, "--monitor-tls-ca", str(cert)], tmp_path)
        assert (result.returncode, result.stderr) == \
            (1, f"unhealthy: {address}: this is an HTTP port; the query service is on the gRPC port\n")
    finally:
        srv.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]



def test_clients_say_when_nothing_answers_in_time_or_the_server_speaks_tls(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        client = ccmon.Client(address, timeout_s=0.5)
        with pytest.raises(ccmon.ServerUnreachable) as raised:
            client.server_info()
        client.close()
        assert str(raised.value) == f"nothing answered at {address} within 0.5 s"
        health = run_ccmon(["--health", "--monitor-server", address], tmp_path)
        assert (health.returncode, health.stderr) == (1, f"unhealthy: {address}: nothing answered at {address} "
                                                         "within 3 s\n")
    cert, key = make_certificate(tmp_path, "server")
    srv = ServerProcess(tmp_path, "--server-tls-cert", str(cert), "--server-tls-key", str(key)).start()
    try:
        assert_clients_say(srv.target, f"the server speaks TLS (it closed a plaintext connection): use "
                                       f"https://{srv.target} or monitor.tls_ca", tmp_path)
    finally:
        srv.stop()


@pytest.fixture
def go_server(tmp_path):
    """The original Go ccmon server (v0.9.4) on a free loopback port, once it answers gRPC. Its stats cache is off:
    it keeps GetStats answers for a minute, so a figure asked for before an export could come back unchanged after
    it (the test of its clients failed 4 runs in 13 that way)."""
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([str(go_ccmon_binary()), "--server", "--server-address", address, "--database-path",
                             str(tmp_path / "go.db"), "--server-cache-stats-enabled=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield address
    finally:
        proc.terminate()
        proc.wait(20)


@e2e
def test_clients_against_the_original_go_server(go_server, tmp_path):
    port = int(go_server.rsplit(":", 1)[1])
    # It stores Claude Code 2.x's numbers as zeros: a quick query of nothing but zeros says why, once.
    zeros = run_ccmon(["--monitor-server", go_server, "--format", "@daily_cost @daily_tokens"], tmp_path)
    assert (zeros.returncode, zeros.stdout, zeros.stderr) == (0, "$0.00 0\n",
                                                              f"ccmon: {go_server}: {ccmon.GO_CCMON_ZEROS}\n")
    # The Go server reads figures only from strings, as Claude Code sends them.
    assert sdk_export(port, [("api_request", api_request(1, iso(int(time.time() * 1000) - 60_000),
                                                         input_tokens="100", cost_usd="0.5"))]) == ["SUCCESS"]
    health = run_ccmon(["--health", "--monitor-server", go_server], tmp_path)
    assert (health.returncode, health.stderr) == (0, "")
    assert health.stdout == f"ok: {go_server}: {ccmon.GO_CCMON_ONLY}; {ccmon.GO_CCMON_ZEROS}\n"
    assert sdk_export(port, [go_telemetry(2, "claude-sonnet-4-5", input_tokens=1200, output_tokens=300,
                                          cost_usd=1.25, duration_ms=900),
                             go_telemetry(3, "claude-haiku-4-5", input_tokens=100, output_tokens=10,
                                          cost_usd=0.0021, duration_ms=100)]) == ["SUCCESS"]
    quick = run_ccmon(["--monitor-server", go_server, "--format", "@monthly_tokens @daily_cost"], tmp_path)
    assert (quick.returncode, quick.stdout) == (0, "1.71K $1.75\n")
    # The monitor: the Current tab in ccmon's order (the Go server answers oldest first), other tabs say why not.
    client, settings, now = ccmon.Client(go_server), _settings(block_hour=None), int(time.time() * 1000)
    current = ccmon.fetch_snapshot(client, ccmon.query_for(ccmon.ViewState(), settings, now))
    assert [row.model for row in current.data.page.requests] == ["claude-haiku-4-5", "claude-sonnet-4-5",
                                                                 "claude-sonnet-4-5"]
    lines, _ = frame_text(ccmon.ViewState(), current, settings, 80, 24, now)
    assert lines[6].split()[:2] == ["Premium", "2"] and not current.unanswered
    for tab in ("daily", "models", "sessions", "tools", "users", "blocks"):
        snap = ccmon.fetch_snapshot(client, ccmon.query_for(ccmon.ViewState(tab=tab), settings, now))
        lines, _ = frame_text(ccmon.ViewState(tab=tab), snap, settings, 120, 24, now)
        assert "This tab needs ccmon's own server: the Go ccmon server answers only GetStats and GetAPIRequests." \
            in "\n".join(lines), tab
    client.close()
    for kind in ccmon.REPORT_KINDS:
        report = run_ccmon(["report", kind, "--monitor-server", go_server], tmp_path)
        assert (report.returncode, report.stdout) == (1, "")
        assert report.stderr == (f"ccmon: {go_server} is the Go ccmon server, which answers only GetStats and "
                                 f"GetAPIRequests: the {kind} report needs ccmon's own server\n")



class GoLikeQueryService(ccmon_pb2_grpc.QueryServiceServicer):
    """What the Go ccmon answers for Claude Code 2.x's telemetry: zeros, from GetStats and GetAPIRequests only
    (the rest UNIMPLEMENTED, as the base servicer answers)."""

    def GetStats(self, request, context):
        return ccmon_pb2.GetStatsResponse(stats=ccmon_pb2.Stats())

    def GetAPIRequests(self, request, context):
        return ccmon_pb2.GetAPIRequestsResponse()


def test_clients_against_a_server_that_answers_as_the_go_ccmon(tmp_path):
    from concurrent import futures
    go_like = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ccmon_pb2_grpc.add_QueryServiceServicer_to_server(GoLikeQueryService(), go_like)
    address = f"127.0.0.1:{go_like.add_insecure_port('127.0.0.1:0')}"
    go_like.start()
    try:
        quick = run_ccmon(["--monitor-server", address, "--format", "@daily_cost @monthly_cost @daily_tokens"],
                          tmp_path)
        assert (quick.returncode, quick.stdout) == (0, "$0.00 $0.00 0\n")
        assert quick.stderr == f"ccmon: {address}: {ccmon.GO_CCMON_ZEROS}\n"  # once, however many figures
        health = run_ccmon(["--health", "--monitor-server", address], tmp_path)
        assert (health.returncode, health.stdout, health.stderr) == \
            (0, f"ok: {address}: the Go ccmon server answers only GetStats and GetAPIRequests; the Go ccmon server "
                "records no tokens or cost for Claude Code 2.x (its figures are zeros)\n", "")
        report = run_ccmon(["report", "model", "--monitor-server", address], tmp_path)
        assert (report.returncode, report.stdout, report.stderr) == \
            (1, "", f"ccmon: {address} is the Go ccmon server, which answers only GetStats and GetAPIRequests: the "
                    "model report needs ccmon's own server\n")
        # It would ignore an agent filter and count every agent's usage as that agent's: never asked of it
        one_agent = run_ccmon(["--monitor-server", address, "--format", "@daily_cost", "--agent", "codex"], tmp_path)
        assert (one_agent.returncode, one_agent.stdout, one_agent.stderr) == (
            2, "", f"ccmon: config error: the server at {address} cannot keep one agent's usage (it is an older ccmon "
                   "server, or the Go ccmon): upgrade it, or leave out the agent filter\n")
    finally:
        go_like.stop(None)


def go_telemetry(sequence: int, model: str, **figures) -> tuple[str, dict]:
    """An api_request the Go ccmon can read: it takes figures only as strings."""
    return "api_request", api_request(sequence, earlier_today(0.01 - sequence / 10_000), model=model,
                                      **{key: str(value) for key, value in figures.items()})


@e2e
def test_the_real_go_ccmon_clients_against_a_ccmon_server(server, tmp_path):
    """The Go ccmon's quick query and monitor on a ccmon server see Claude Code's usage as before other agents were
    received: a Gemini CLI call in between ($0.30 at ccmon's price) is in none of their figures or rows."""
    go_ccmon = go_ccmon_binary()
    sdk_export(server.port, [go_telemetry(1, "claude-sonnet-4-5", input_tokens=1200, output_tokens=300, cost_usd=1.25,
                                          duration_ms=900),
                             ("api_request", api_request(2, earlier_today(0.01), model="claude-haiku-4-5",
                                                         input_tokens=100, output_tokens=10, cost_usd=0.0021))])
    server.logs_stub().Export(agent_logs_request([{
        "event.name": "gemini_cli.api_response", "event.timestamp": hours_ago(0.005), "session.id": "g-1",
        "model": "gemini-2.5-flash", "input_token_count": 1_000_000, "output_token_count": 0}],
        {"service.name": "gemini-cli"}))
    assert round(stats(server).total_cost.amount, 4) == 1.5521  # it is stored
    for template, shown in (("@daily_cost", "$1.3"), ("@monthly_cost", "$1.3"), ("@daily_plan_usage", "0%")):
        result = subprocess.run([str(go_ccmon), "--monitor-server", server.target, "--format", template],
                                capture_output=True, text=True, timeout=30)
        assert (result.returncode, result.stdout) == (0, shown)  # $1.2521, as the Go ccmon rounds it
    session = f"go-monitor-{os.getpid()}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30",
                    f"{go_ccmon} --monitor-server {server.target}"], check=True)
    try:
        deadline, screen = time.time() + 30, ""
        while time.time() < deadline and "0.002100" not in screen:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True).stdout
            time.sleep(0.2)
        assert re.search(r"Base \(Haiku\) +1 +110 .* 0\.002100", screen), screen
        assert re.search(r"Premium \(S/O\) +1 +1\.5K .* 1\.250000", screen), screen
        assert re.search(r"claude-sonnet-4-5 +1200 +300 .* 1\.250000 +900ms", screen), screen
        assert "gemini" not in screen and "1.55" not in screen, screen
        # "Latest First" (its default) puts the sonnet request, 0.36 s newer, on top; `o` turns it to "Oldest First".
        assert "Latest First" in screen and screen.index("claude-sonnet-4-5 ") < screen.index("claude-haiku-4-5 "), \
            screen
        subprocess.run(["tmux", "send-keys", "-t", session, "o"], check=True)

        def oldest_first(screen: str) -> bool:  # the header can be redrawn a moment before the rows
            return "Oldest First" in screen and "claude-haiku-4-5 " in screen and "claude-sonnet-4-5 " in screen \
                and screen.index("claude-haiku-4-5 ") < screen.index("claude-sonnet-4-5 ")
        deadline = time.time() + 30
        while time.time() < deadline and not oldest_first(screen):
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True).stdout
            time.sleep(0.2)
        assert oldest_first(screen), screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session])


# ---------------------------------------------------------------- quick query: --format, --json, --health

def midnight_ms(zone, days_back: int = 0) -> int:
    today = dt.datetime.now(zone).date() - dt.timedelta(days=days_back)
    return ccmon.ms_from_datetime(dt.datetime.combine(today, dt.time(), zone))


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def run_ccmon(args: list[str], cwd: Path, command: list[str] | None = None, env: dict | None = None,
              timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*(command or CCMON), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HOME": str(cwd), **(env or {})})


def seed_quick_query(srv: ServerProcess, zone) -> dict:
    """Today at local midnight, a minute before it, and a session 10 minutes ago; returns expected figures."""
    today, before = midnight_ms(zone), midnight_ms(zone) - 60_000
    # the latest session, 10 minutes ago, or just after midnight when midnight was less than 10 minutes ago
    recent = max(int(time.time() * 1000) - 10 * 60_000, today + 1000)
    events = [("api_request", api_request(1, iso(today), session="day", input_tokens=1000, output_tokens=500,
                                          cache_read_tokens=8500, cost_usd="1.25")),
              ("api_request", api_request(2, iso(before), session="yesterday", input_tokens=4000, output_tokens=0,
                                          cost_usd=2.5)),
              ("api_request", api_request(3, iso(recent), session="latest", model="claude-haiku-4-5",
                                          input_tokens=30, output_tokens=20, cost_usd=0.004))]
    sdk_export(srv.port, events)
    first_of_month = dt.datetime.now(zone).day == 1
    daily_cost = 1.25 + (0.004 if recent >= today else 0)
    return {"daily_cost": daily_cost, "monthly_cost": daily_cost + (0 if first_of_month else 2.5),
            "daily_tokens": 10_000 + (50 if recent >= today else 0),
            "monthly_tokens": 10_050 + (0 if first_of_month else 4000)}


def test_quick_query_format_and_json(server, tmp_path):
    zone = ccmon.ZoneInfo("Asia/Kolkata")
    expected = seed_quick_query(server, zone)
    days = __import__("calendar").monthrange(*dt.datetime.now(zone).timetuple()[:2])[1]
    base = ["--monitor-server", server.target, "--monitor-timezone", "Asia/Kolkata", "--claude-plan", "max"]
    result = run_ccmon([*base, "--format", "@daily_cost | @monthly_cost | @daily_plan_usage | @monthly_plan_usage | "
                        "@daily_tokens | @monthly_tokens | @session_cost | @daily_costs @nonsense"], tmp_path)
    assert result.returncode == 0
    assert result.stderr == ("ccmon: unknown in --format, left as written: @nonsense (known: @daily_cost "
                             "@monthly_cost @daily_plan_usage @monthly_plan_usage @daily_tokens @monthly_tokens "
                             "@block_usage @block_remaining @block_projection @weekly_usage @session_cost @five_hour "
                             "@five_hour_resets @seven_day @seven_day_resets)\n")
    cost = ccmon.format_cost  # as every screen shows it: $0.0040 below a dollar, $12.35 above
    assert result.stdout == (
        f"{cost(round(expected['daily_cost'] * 1e9))} | {cost(round(expected['monthly_cost'] * 1e9))} | "
        f"{expected['daily_cost'] / (100 / days) * 100:.0f}% | {expected['monthly_cost']:.0f}% | "
        f"{ccmon.format_count(expected['daily_tokens'])} | {ccmon.format_count(expected['monthly_tokens'])} | "
        f"$0.0040 | {cost(round(expected['daily_cost'] * 1e9))}s @nonsense\n")
    result = run_ccmon([*base, "--json"], tmp_path)
    figures = json.loads(result.stdout)
    assert figures == {"daily_cost": expected["daily_cost"], "monthly_cost": expected["monthly_cost"],
                       "daily_tokens": expected["daily_tokens"], "monthly_tokens": expected["monthly_tokens"],
                       "daily_plan_usage": figures["daily_plan_usage"], "monthly_plan_usage": expected["monthly_cost"],
                       "session_id": "latest", "session_cost": 0.004,
                       "weekly_premium_tokens": 5500, "weekly_premium_cost": 3.75, "weekly_usage": None,
                       "five_hour_percent": None, "five_hour_resets_at": None, "seven_day_percent": None,
                       "seven_day_resets_at": None, "limits_read_at": None}  # no status line reading
    assert figures["daily_plan_usage"] == pytest.approx(expected["daily_cost"] / (100 / days) * 100)
    unset = run_ccmon(["--monitor-server", server.target, "--format", "@daily_plan_usage"], tmp_path)
    assert unset.stdout == "0%\n"


def test_quick_query_of_one_agent(server, tmp_path):
    """--agent keeps one agent's cost and tokens in --format and --json (its newest session for @session_cost), and
    its own plan's 5-hour and weekly windows where Claude's would be (Codex's, as its rollouts said; none of
    Gemini's); Claude's blocks and plan figures are refused beside another agent, and --agent without a quick query
    is said."""
    now = ccmon.now_ms()
    just_now = ccmon.iso_from_ms(now - 1000)  # today, in UTC
    sdk_export(server.port, [("api_request", api_request(1, just_now, session="s-claude", input_tokens=1000,
                                                         output_tokens=100, cost_usd=0.5))])
    server.logs_stub().Export(agent_logs_request([codex_response(just_now, "c-now")], {"service.name": "codex_exec"}))
    resets = now + 3600_000
    server.query().ImportRequests(ccmon_pb2.ImportRequestsRequest(readings=[ccmon.reading_message(ccmon.LimitReading(
        "c-now", now - 2000, five_hour=ccmon.LimitWindow(12.5, resets), seven_day=ccmon.LimitWindow(34.0, now - 1000),
        agent=ccmon.CODEX))]))  # Codex's week has reset since: no figure
    base = ["--monitor-server", server.target, "--monitor-timezone", "UTC"]
    template = "@daily_cost @monthly_cost @daily_tokens @session_cost"
    lines = {agent: run_ccmon([*base, "--format", template, *(["--agent", agent] if agent else [])], tmp_path)
             for agent in ("", "claude-code", "codex", "gemini-cli")}
    cost, count = ccmon.format_cost, ccmon.format_count
    assert {agent: (result.returncode, result.stdout, result.stderr) for agent, result in lines.items()} == {
        "": (0, f"{cost(511_344_000)} {cost(511_344_000)} {count(1100 + 2434)} {cost(11_344_000)}\n", ""),
        "claude-code": (0, f"{cost(500_000_000)} {cost(500_000_000)} {count(1100)} {cost(500_000_000)}\n", ""),
        "codex": (0, f"{cost(11_344_000)} {cost(11_344_000)} {count(2434)} {cost(11_344_000)}\n", ""),
        "gemini-cli": (0, "$0.00 $0.00 0 $0.00\n", "")}
    figures = json.loads(run_ccmon([*base, "--json", "--agent", "codex"], tmp_path).stdout)
    assert figures == {"agent": "codex", "daily_cost": 0.011344, "monthly_cost": 0.011344, "daily_tokens": 2434,
                       "monthly_tokens": 2434, "session_id": "c-now", "session_cost": 0.011344,
                       "five_hour_percent": 12.5, "five_hour_resets_at": resets // 1000, "seven_day_percent": None,
                       "seven_day_resets_at": None, "limits_read_at": (now - 2000) // 1000}  # none of Claude's plan
    utc = ccmon.ZoneInfo("UTC")
    windows = {agent: run_ccmon([*base, "--format", "5h @five_hour (@five_hour_resets), week @seven_day", "--agent",
                                 agent], tmp_path).stdout for agent in ("codex", "gemini-cli")}
    assert windows == {"codex": f"5h 13% ({ccmon.reset_time(resets, ccmon.now_ms(), utc)}), week -\n",
                       "gemini-cli": "5h - (-), week -\n"}
    for args, message in (
            (["--format", "@daily_cost @five_hour @block_usage @daily_plan_usage", "--agent", "codex"],
             "ccmon: config error: --agent codex: @block_usage, @daily_plan_usage are Claude's blocks and plan, of "
             "Claude Code's usage alone (leave them out, or use --agent claude-code)\n"),
            (["--agent", "codex"], "ccmon: --agent is for the quick query: give --format or --json (the monitor's g "
                                   "key filters by agent; reports take --agent too) (see ccmon --help)\n"),
            (["--format", "@daily_cost", "--agent", "cursor"], "argument --agent: invalid choice: 'cursor' (choose "
                                                                "from 'claude-code', 'gemini-cli', 'codex', 'qwen-code')")):
        refused = run_ccmon([*base, *args], tmp_path)
        assert refused.returncode == 2 and (refused.stderr.endswith(message) if message.endswith("\n")
                                            else message in refused.stderr), refused.stderr


def test_quick_query_block_figures(server, tmp_path):
    now = int(time.time() * 1000)
    sdk_export(server.port, [("api_request", api_request(1, iso(now - 60_000), input_tokens=3000,
                                                         output_tokens=500)),
                             ("api_request", api_request(2, iso(now - 30_000), model="claude-3-5-haiku",
                                                         input_tokens=9999))])
    block_flag = block_flag_for_now()
    result = run_ccmon(["--monitor-server", server.target, "-b", block_flag, "--claude-plan", "pro", "--format",
                        "@block_usage @block_remaining"], tmp_path)
    start, end = ccmon.current_block(now, ccmon.ZoneInfo("UTC"), ccmon.parse_block_mode(block_flag))
    usage, remaining = result.stdout.split()
    assert usage == "50%"  # 3,500 premium limited tokens of pro's 7,000
    assert remaining in {ccmon.format_duration(end - now - delta) for delta in range(0, 120_000, 1000)}
    no_block = run_ccmon(["--monitor-server", server.target, "--format", "@block_usage"], tmp_path)
    assert (no_block.returncode, no_block.stdout) == (2, "")
    assert no_block.stderr == ("ccmon: config error: @block_usage, @block_remaining and @block_projection need "
                               "-b/--block (for example -b auto)\n")
    figures = json.loads(run_ccmon(["--monitor-server", server.target, "-b", block_flag, "--json"], tmp_path).stdout)
    assert (figures["block_tokens"], figures["block_limit"], figures["block_usage"]) == (3500, None, None)


def test_quick_query_and_health_when_server_is_down(tmp_path, server):
    result = run_ccmon(["--monitor-server", "127.0.0.1:9", "--format", "@daily_cost"], tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "ccmon: cannot reach the ccmon server at 127.0.0.1:9: connection refused\n"
    down = run_ccmon(["--health", "--monitor-server", "127.0.0.1:9"], tmp_path)
    assert (down.returncode, down.stderr) == (1, "unhealthy: 127.0.0.1:9: connection refused\n")
    up = run_ccmon(["--health", "--monitor-server", server.target], tmp_path)
    assert (up.returncode, up.stdout) == (0, f"ok: ccmon {ccmon.VERSION} at {server.target}, 0 requests stored\n")



def test_costs_and_percents_round_half_up_from_the_exact_figure():
    """Claude Code's own $0.01245 (one Sonnet call) and Claude's 20.5 %: every output rounds halves up."""
    assert [ccmon.format_cost(n) for n in (12_450_000, 20_750_000, 62_250_000, 49_999, 50_000, 999_949_999,
                                           999_950_000, 4_125_000_000, 1_234_565_000_000, 0)] == \
        ["$0.0125", "$0.0208", "$0.0623", "<$0.0001", "$0.0001", "$0.9999", "$1.00", "$4.13", "$1,234.57", "$0.00"]
    assert [ccmon.format_percent(p) for p in (20.5, 55.5, 41 / 200 * 100, 99.5, 0.49, 0)] == \
        ["21%", "56%", "21%", "100%", "0%", "0%"]
    now, zone = 1_795_762_477_000, ccmon.ZoneInfo("UTC")
    data = {"session_id": "s", "cost": {"total_cost_usd": 0.06225}, "rate_limits": {
        "five_hour": {"used_percentage": 55.5, "resets_at": now // 1000 + 3600},
        "seven_day": {"used_percentage": 20.5, "resets_at": now // 1000 + 86400}}}
    reading = ccmon.reading_from_status_input(data, now)
    values = ccmon.status_values(data, reading, None, ccmon.Split(ccmon.Usage(cost_nanos=20_750_000)), zone, now)
    assert ccmon.format_status_line("@session_cost @daily_cost @five_hour @seven_day", values) == \
        "$0.0623 $0.0208 56% 21%"
    figures = ccmon.QuickFigures("pro", 30, daily=ccmon.Usage(cost_nanos=12_450_000),
                                 monthly=ccmon.Usage(cost_nanos=4_100_000_000),
                                 session=ccmon.Usage(cost_nanos=62_250_000),
                                 claude=ccmon.ClaudeLimits(reading), now_ms=now, zone=zone)
    assert ccmon.format_quick("@daily_cost @session_cost @monthly_plan_usage @five_hour", figures) == \
        "$0.0125 $0.0623 21% 56%"  # $4.10 of pro's $20 is 20.5 %
    assert [ccmon.table_cell("cost_usd", usd, False) for usd in (0.01245, 0.06225, 4.125)] == \
        ["$0.0125", "$0.0623", "$4.13"]
    screen = ccmon.Screen(_settings(), 80, 24, now, ccmon.Glyphs.for_terminal(False))
    assert line_text(ccmon.claude_gauge("5h", ccmon.LimitWindow(20.5, now + 3_600_000), now, None, screen, 90)) == \
        "Claude 5h   ###.............  21%, resets 08:54 (read just now)"
    assert ccmon.share_cell(41, 200, screen.glyphs, 4).endswith(" 21%")


# ---------------------------------------------------------------- status line: ccmon statusline, Claude's own limits

def sample_status_inputs() -> list[dict]:
    """Real status line input of Claude Code 2.1.328: 4 lines of a subscriber session, then 4 of an API-key one."""
    path = FIXTURES / "claude-code-2.1.328" / "statusline-stdin.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_status_line_input_is_read_as_claude_code_writes_it():
    subscriber, api_key = sample_status_inputs()[3], sample_status_inputs()[7]
    now = 1_795_762_477_000  # when the sample was taken: 2026-11-27T06:54:37Z
    reading = ccmon.reading_from_status_input(subscriber, now)
    assert reading == ccmon.LimitReading(
        "c05b702a-6e79-483f-8620-85c0f585c90e", now, "/home/dev/proj-alpha", "claude-sonnet-4-5", 3.0,
        ccmon.LimitWindow(55.5, 1_795_764_643_000), ccmon.LimitWindow(20.5, 1_796_016_643_000), None, "2.1.328")
    values = ccmon.status_values(subscriber, reading, None, None, ccmon.ZoneInfo("Europe/Berlin"), now)
    assert values == {"model": "Sonnet 4.5", "context": "3%", "session_cost": "$0.0374", "five_hour": "56%",
                      "five_hour_resets": "08:30", "seven_day": "21%", "seven_day_resets": "Mon 06:30",
                      "project": "proj-alpha"}
    assert ccmon.format_status_line(ccmon.DEFAULT_STATUS_LINE, values) == \
        "Sonnet 4.5 | ctx 3% | session $0.0374 | 5h 56% (resets 08:30) | week 21% (Mon 06:30)"
    # An API-key session has no rate limits; before its first answer no context either: those parts go.
    first = ccmon.reading_from_status_input(api_key, now)
    assert (first.five_hour, first.seven_day) == (None, None)
    assert ccmon.format_status_line(ccmon.DEFAULT_STATUS_LINE, ccmon.status_values(
        sample_status_inputs()[4], ccmon.reading_from_status_input(sample_status_inputs()[4], now), None,
        ccmon.Split(premium=ccmon.Usage(cost_nanos=8_350_000_000)), ccmon.ZoneInfo("UTC"), now)) == \
        "Sonnet 4.5 | today $8.35"  # nothing spent yet: no session part
    # A window whose reset has passed says nothing any more; odd values are ignored, not trusted.
    later = ccmon.status_values(subscriber, reading, None, None, ccmon.ZoneInfo("UTC"), 1_795_764_643_000)
    assert "five_hour" not in later and later["seven_day"] == "21%"
    odd = ccmon.reading_from_status_input({"session_id": 7, "rate_limits": {"five_hour": {
        "used_percentage": "55", "resets_at": 1}, "seven_day": {"used_percentage": 250, "resets_at": 10}},
        "context_window": {"used_percentage": float("nan")}, "model": ["x"]}, now)
    assert odd == ccmon.LimitReading("", now)


@pytest.mark.parametrize("template,values,line", [
    ("@model | 5h @five_hour", {"model": "Opus"}, "Opus"),
    ("@five_hour of 5h", {}, "- of 5h"),
    ("[@project] @session_cost|@daily_cost today", {"project": "alpha", "session_cost": "$1.00"}, "[alpha] $1.00"),
    ("@five_hour_resets/@five_hour", {"five_hour": "9%", "five_hour_resets": "14:00"}, "14:00/9%"),
])
def test_status_line_templates(template, values, line):
    assert ccmon.format_status_line(template, values) == line


def status_line(srv_target: str, data: dict | str, *extra: str, cwd: Path, wait: str = "20s"
                ) -> subprocess.CompletedProcess:
    """`ccmon statusline` against `srv_target`, waiting up to `wait` for it (the 250 ms of Claude Code's status line
    leaves a loaded test machine without the server's figures now and then)."""
    return subprocess.run([*CCMON, "statusline", "--monitor-server", srv_target, "--monitor-timezone", "UTC",
                           "--monitor-statusline-wait", wait, *extra],
                          input=data if isinstance(data, str) else json.dumps(data), capture_output=True, text=True,
                          cwd=cwd, timeout=30, env={**os.environ, "HOME": str(cwd)})


def live_input(session: str, five_hour: float | None = 42.0, cost: bool = False) -> dict:
    """The subscriber sample as Claude Code would write it now, for `session`."""
    data = {k: v for k, v in sample_status_inputs()[3].items() if k != "cost" or cost}
    now_s = int(time.time())
    data["session_id"] = session
    data["rate_limits"] = {"five_hour": {"used_percentage": five_hour, "resets_at": now_s + 3600},
                           "seven_day": {"used_percentage": 20.5, "resets_at": now_s + 3 * 86400}}
    if five_hour is None:
        del data["rate_limits"]
    return data


def test_status_lines_of_two_sessions_show_their_own_figures(server, tmp_path):
    now = earlier_today(0.1)
    sdk_export(server.port, [
        ("api_request", {**api_request(1, now, session="s-ana", cost_usd=1.25), "user.email": "ana@example.com"}),
        ("api_request", {**api_request(2, now, session="s-ana-old", cost_usd=0.5), "user.email": "ana@example.com"}),
        ("api_request", {**api_request(3, now, session="s-bo", cost_usd=0.25), "user.email": "bo@example.com"})])
    ana = status_line(server.target, live_input("s-ana"), cwd=tmp_path)
    bo = status_line(server.target, live_input("s-bo", five_hour=80.0), cwd=tmp_path)
    assert (ana.returncode, ana.stderr, bo.returncode, bo.stderr) == (0, "", 0, "")
    assert ana.stdout.startswith("Sonnet 4.5 | ctx 3% | session $1.25 | today $1.75 | 5h 42% (resets ")
    assert bo.stdout.startswith("Sonnet 4.5 | ctx 3% | session $0.2500 | today $0.2500 | 5h 80% (resets ")
    # Claude Code's own figure for the session, when stdin has it, is newer than the server's.
    own = status_line(server.target, live_input("s-ana", cost=True), "--format", "@session_cost", cwd=tmp_path)
    assert own.stdout == "$0.0374\n"
    # The readings are kept per session, and each user's latest shows under that user.
    limits = {user: server.query().GetLimits(ccmon_pb2.GetLimitsRequest(user=user)).latest
              for user in ("ana@example.com", "bo@example.com")}
    assert (limits["ana@example.com"].session_id, limits["ana@example.com"].five_hour.used_percentage,
            limits["ana@example.com"].project_dir, limits["ana@example.com"].user) == \
        ("s-ana", 42.0, "/home/dev/proj-alpha", "ana@example.com")
    assert (limits["bo@example.com"].session_id, limits["bo@example.com"].five_hour.used_percentage) == ("s-bo", 80.0)
    assert db_rows(server.db, "SELECT COUNT(*) FROM limit_readings") == [(3,)]


def test_a_reading_before_the_sessions_events_is_attached_when_they_arrive(server, tmp_path):
    early = status_line(server.target, live_input("s-new", five_hour=10.0), cwd=tmp_path)
    assert early.stdout.startswith("Sonnet 4.5 | ctx 3% | 5h 10% (resets ")  # no session figures yet, no zeros
    assert not server.query().GetLimits(ccmon_pb2.GetLimitsRequest(user="cy@example.com")).HasField("latest")
    sdk_export(server.port, [("api_request", {**api_request(1, hours_ago(0.1), session="s-new", cost_usd=0.5),
                                              "user.email": "cy@example.com"})])
    latest = server.query().GetLimits(ccmon_pb2.GetLimitsRequest(user="cy@example.com")).latest
    assert (latest.session_id, latest.five_hour.used_percentage, latest.user) == ("s-new", 10.0, "cy@example.com")


def test_window_capacity_from_claudes_own_percentages(server, tmp_path):
    """Tokens used in Claude's window divided by the share Claude reports: what a full window holds."""
    start = ccmon.now_ms() - 3600_000
    sdk_export(server.port, [("api_request", {**api_request(i, iso(start + i * 60_000), session="s-cal",
                                                            input_tokens=1000, output_tokens=500),
                                              "user.email": "cal@example.com"}) for i in range(10)])
    status_line(server.target, live_input("s-cal", five_hour=25.0), cwd=tmp_path)  # 15,000 tokens = 25 %
    limits = server.query().GetLimits(ccmon_pb2.GetLimitsRequest(user="cal@example.com"))
    assert (limits.five_hour.tokens, limits.five_hour.readings) == (60_000, 1)
    assert (limits.seven_day.tokens, limits.seven_day.readings) == (73_171, 1)  # 15,000 / 20.5 %
    assert ccmon.window_capacity([(15_000, 25.0), (40_000, 50.0), (1_000, 1.0), (0, 30.0)]) == (70_000, 2)
    assert ccmon.window_capacity([]) == (None, 0)


def test_the_server_refuses_readings_claude_code_cannot_give(server):
    now = ccmon.now_ms()
    for window, problem in ((ccmon.LimitWindow(1e300, now + 3600_000), "five_hour.used_percentage 1e+300 is not 0-100"),
                            (ccmon.LimitWindow(float("nan"), now + 3600_000), "five_hour.used_percentage nan is not "
                                                                                "0-100"),
                            (ccmon.LimitWindow(50.0, 10 ** 15 * 1000), "five_hour.resets_at is not within 45 days")):
        reading = ccmon.LimitReading("s-odd", now, five_hour=window)
        with pytest.raises(grpc.RpcError) as err:
            server.query().ReportStatusLine(ccmon_pb2.ReportStatusLineRequest(reading=ccmon.reading_message(reading)))
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                           f"not a reading Claude Code gives: {problem}")
    assert db_rows(server.db, "SELECT COUNT(*) FROM limit_readings") == [(0,)]


@pytest.mark.parametrize("stdin,line", [
    (b"\xff\xfe{not utf-8", "ccmon: nothing to show yet\n"),
    (b"[" * 200_000, "ccmon: nothing to show yet\n"),
    (json.dumps({"context_window": {"used_percentage": 10 ** 400}, "model": {"display_name": "Opus"}}).encode(),
     "Opus\n"),
    (json.dumps({"rate_limits": {"five_hour": {"used_percentage": 5, "resets_at": 253402300799}}}).encode(),
     "ccmon: nothing to show yet\n"),
])
def test_status_line_input_that_is_odd_never_breaks_the_line(stdin, line, tmp_path):
    result = subprocess.run([*CCMON, "statusline", "--monitor-server", "127.0.0.1:9", "--monitor-timezone",
                             "Asia/Tokyo"], input=stdin, capture_output=True, cwd=tmp_path, timeout=30,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert (result.returncode, result.stdout.decode()) == (0, line), result.stderr
    assert b"Traceback" not in result.stderr


def test_status_line_ignores_the_project_folders_config_and_survives_its_own(server, tmp_path):
    """Claude Code runs the status line in each project folder: a config.toml there is the project's, never
    ccmon's (it could send the token elsewhere); a broken ~/.ccmon config still leaves a line."""
    (tmp_path / "config.toml").write_text('[monitor]\nserver = "127.0.0.1:9"\n')
    sdk_export(server.port, [("api_request", api_request(1, hours_ago(0.1), session="s-cfg", cost_usd=0.5))])
    (tmp_path / ".ccmon").mkdir()
    (tmp_path / ".ccmon" / "config.toml").write_text(f'[monitor]\nserver = "{server.target}"\n')
    result = subprocess.run([*CCMON, "statusline", "--format", "@session_cost"], input=json.dumps({
        "session_id": "s-cfg"}), capture_output=True, text=True, cwd=tmp_path, timeout=30,
        env={**os.environ, "HOME": str(tmp_path)})
    assert (result.returncode, result.stdout) == (0, "$0.5000\n")
    (tmp_path / ".ccmon" / "config.toml").write_text('[monitor]\nrefresh_interval = "soon"\n')
    broken = subprocess.run([*CCMON, "statusline"], input=json.dumps(live_input("s-cfg")), capture_output=True,
                            text=True, cwd=tmp_path, timeout=30, env={**os.environ, "HOME": str(tmp_path)})
    assert broken.returncode == 0 and broken.stdout.startswith("Sonnet 4.5 | ctx 3% | 5h 42% (resets ")
    assert broken.stderr.startswith("ccmon: config error: ")


def test_status_line_without_a_server_or_with_bad_input_is_never_blank(server, tmp_path):
    import socket
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        started = time.monotonic()
        stuck = status_line(f"127.0.0.1:{silent.getsockname()[1]}", live_input("s-x"), cwd=tmp_path, wait="250ms")
        waited = time.monotonic() - started
    finally:
        silent.close()
    assert (stuck.returncode, stuck.stderr) == (0, "")
    assert stuck.stdout.startswith("Sonnet 4.5 | ctx 3% | 5h 42% (resets ")
    assert waited < 10, waited  # bounded by its own deadline, not gRPC's default wait
    down = status_line("127.0.0.1:9", live_input("s-x", cost=True), cwd=tmp_path)
    assert (down.returncode, down.stdout.split(" | ")[:3]) == (0, ["Sonnet 4.5", "ctx 3%", "session $0.0374"])
    for template, shown in (("@five_hour 5h | @weekly_usage of the week", "42% 5h\n"),  # left out, as other parts
                            ("@five_hour 5h, @weekly_usage of the week", "42% 5h, - of the week\n")):
        down = status_line("127.0.0.1:9", live_input("s-x"), "--format", template, cwd=tmp_path)
        assert (down.returncode, down.stdout) == (0, shown)  # the server's figures unknown, not left as written
    sdk_export(server.port, [("api_request", api_request(1, earlier_today(0.1), cost_usd=2.5))])
    for data, problem in (("{not json", "ccmon statusline: stdin is not JSON (9 characters); showing server figures "
                                        "only\n"),
                          ("[1, 2]", "ccmon statusline: stdin is not a JSON object; showing server figures only\n"),
                          ("", "ccmon statusline: stdin is not JSON (0 characters); showing server figures only\n")):
        result = status_line(server.target, data, cwd=tmp_path)
        assert (result.returncode, result.stdout, result.stderr) == (0, "today $2.50\n", problem)
    mixed = status_line(server.target, live_input("s-x"), "--format", "@model: @monthly_cost this month, @nonsense",
                        cwd=tmp_path)
    assert mixed.stdout == "Sonnet 4.5: $2.50 this month, @nonsense\n"



def export_team_usage(srv: ServerProcess) -> None:
    """Today's usage of a team: a@example.com 10,000 premium tokens in session s-a, b@example.com 90,000 in s-b."""
    sdk_export(srv.port, [("api_request", {**api_request(1, earlier_today(0.1), session="s-a", input_tokens=6000,
                                                         output_tokens=4000), "user.email": "a@example.com"}),
                          ("api_request", {**api_request(1, earlier_today(0.1), session="s-b", input_tokens=60_000,
                                                         output_tokens=30_000), "user.email": "b@example.com"})])


def test_claudes_windows_on_a_team_server_count_the_usage_of_the_account_they_were_read_for(server, tmp_path):
    """Claude's windows are one account's. On a team's server, everyone's block and week count the usage of the one
    user whose readings are live (they showed 420 % of a block Claude read at 42 %, 205 % of a week at 20.5 %),
    and a status line its own session's user's (none while that user is not known); with several such users,
    everyone's have no calibrated limit."""
    export_team_usage(server)
    everyone = ["--json", "-b", "auto", "--claude-max-tokens", "auto", "--monitor-server", server.target]

    def shown(session: str) -> str:
        line = status_line(server.target, live_input(session), "--format", "@weekly_usage | @seven_day", cwd=tmp_path)
        assert line.returncode == 0, line.stderr
        return line.stdout

    assert shown("s-a") == "21% | 21%\n"  # the block at 42 %, the week at 20.5 % of a's 10,000 tokens
    assert shown("s-new") == "- | 21%\n"  # a session whose user is not known yet: a's week is not known to be its
    figures = json.loads(run_ccmon(everyone, tmp_path).stdout)
    assert (round(figures["weekly_usage"], 1), round(figures["block_usage"], 1), figures["block_tokens"],
            figures["daily_tokens"]) == (20.5, 42.0, 10_000, 100_000)  # the day stays the team's
    assert shown("s-b") == "21% | 21%\n"  # b's own, of b's 90,000 tokens
    figures = json.loads(run_ccmon(everyone, tmp_path).stdout)
    assert (figures["weekly_usage"], figures["block_tokens"], figures["seven_day_percent"]) == (None, 100_000, None)
    # a session whose user is not known yet, with a plan's and a weekly limit: not the team's usage against them
    line = status_line(server.target, live_input("s-new"), "--format", "@block_usage | @weekly_usage", "-b", "auto",
                       "--claude-plan", "max", "--claude-weekly-max-tokens", "1000000", cwd=tmp_path)
    assert (line.returncode, line.stdout) == (0, "- | -\n"), line.stderr


def test_readings_without_claudes_windows_leave_the_live_ones_live(server, tmp_path):
    """A status line without rate limits (an API key's, or before the first answer) reports readings too: 2,000 of
    them, more than GetLimits looks through, left Claude's live windows out of everyone's figures."""
    export_team_usage(server)
    assert status_line(server.target, live_input("s-a"), cwd=tmp_path).returncode == 0
    stub = server.query()
    for _ in range(ccmon.CALIBRATION_READINGS):
        stub.ReportStatusLine(ccmon_pb2.ReportStatusLineRequest(
            reading=ccmon.reading_message(ccmon.LimitReading("s-b", 0, context_percent=3.0))), timeout=30)
    figures = json.loads(run_ccmon(["--json", "-b", "auto", "--claude-max-tokens", "auto", "--monitor-server",
                                    server.target], tmp_path).stdout)
    assert (figures["five_hour_percent"], round(figures["block_usage"], 1), figures["block_tokens"]) == \
        (42.0, 42.0, 10_000)


def test_the_blocks_tab_on_a_team_server_shows_no_share_of_one_accounts_limit(server, tmp_path):
    """On a team's server the Blocks tab lists everyone's blocks: their share is not of the limit calibrated for the
    one user whose readings are live (it showed 420 % under the gauge's 42 %)."""
    export_team_usage(server)
    assert status_line(server.target, live_input("s-a"), cwd=tmp_path).returncode == 0
    with MonitorPty(["--monitor-server", server.target, "-b", "auto", "--claude-max-tokens", "auto",
                     "--monitor-refresh-interval", "1s"], cols=120, rows=40, cwd=tmp_path,
                    env={"HOME": str(tmp_path)}) as monitor:
        assert "42%" in monitor.wait_for("Claude 5h", "the gauge")
        monitor.send(b"7")
        screen = monitor.wait_for("Of limit", "the Blocks tab")
        monitor.send(b"q")
    row = next(line for line in screen.splitlines() if " 100K " in line)
    assert "%" not in row and row.rstrip().endswith("-"), screen


def test_the_week_chart_on_a_team_server_draws_the_week_the_gauge_shows(server, tmp_path):
    """The Charts tab's Claude's week is the account's whose readings the gauge shows (a's 20.5 %), not the newest
    weekly reading's (a session whose telemetry has not come, at 90 %: it drew 7 of 8 rows under a 21 % gauge)."""
    export_team_usage(server)
    other = live_input("s-x")
    other["rate_limits"]["seven_day"]["used_percentage"] = 90.0
    for data in (live_input("s-a"), other):  # s-x's the newer (readings of one moment: by the order stored)
        assert status_line(server.target, data, cwd=tmp_path).returncode == 0
    with MonitorPty(["--monitor-server", server.target, "--monitor-refresh-interval", "1s"], cols=120, rows=60,
                    cwd=tmp_path, env={"HOME": str(tmp_path)}) as monitor:
        assert "21%" in monitor.wait_for("Claude week", "the gauge")
        monitor.send(b"9jjj")
        screen = monitor.wait_for("Claude's week - cost per day", "the week chart")
        monitor.send(b"q")
    chart = screen.split("Claude's week - cost per day")[1].split("0% └")[0]
    assert sum("█" in line for line in chart.splitlines()) <= 2, screen  # 21 % of 8 rows


def test_a_reading_of_a_window_already_reset_calibrates_nothing(server, tmp_path):
    """Claude Code can hand its status line the last rate limits it saw after their window reset: such a share is of
    a window over, and the usage since its start is not its usage (a capacity came of 5,250 tokens over 17 %)."""
    sdk_export(server.port, [("api_request", api_request(1, earlier_today(0.1), session="s-a", input_tokens=4500,
                                                         output_tokens=750))])
    data = live_input("s-a")
    for window in data["rate_limits"].values():
        window["resets_at"] = int(time.time()) - 3600
    assert status_line(server.target, data, cwd=tmp_path).returncode == 0
    limits = server.query().GetLimits(ccmon_pb2.GetLimitsRequest(), timeout=30)
    assert limits.HasField("latest") and not limits.HasField("five_hour") and not limits.HasField("seven_day")


def test_claudes_windows_on_one_persons_server_count_the_usage_no_one_is_named_for(server, tmp_path):
    """On one person's server (one user with a name), usage no one is named for is theirs too: the capacity is
    calibrated against it, so the week shows Claude's share (it showed 41 %, a's tokens alone calibrated)."""
    unnamed = {k: v for k, v in api_request(2, earlier_today(0.1), session="s-old", input_tokens=6000,
                                            output_tokens=4000).items() if k != "user.id"}
    sdk_export(server.port, [("api_request", {**api_request(1, earlier_today(0.1), session="s-a", input_tokens=6000,
                                                            output_tokens=4000), "user.email": "a@example.com"}),
                             ("api_request", unnamed)])
    line = status_line(server.target, live_input("s-a"), "--format", "@weekly_usage", cwd=tmp_path)
    assert (line.returncode, line.stdout) == (0, "21%\n"), line.stderr
    figures = json.loads(run_ccmon(["--json", "--monitor-server", server.target], tmp_path).stdout)
    assert (round(figures["weekly_usage"], 1), figures["daily_tokens"]) == (20.5, 20_000)


def test_text_utf8_cannot_hold_is_taken_as_a_replacement_character(server, tmp_path):
    """JSON can escape a lone UTF-16 surrogate (a string cut inside an emoji, a Windows file name), which UTF-8 cannot
    hold: the status line, the server's page for it and an import take it as U+FFFD (each crashed on it)."""
    data = {**live_input("s-\ud83d"), "model": {"id": "claude-sonnet-4-5", "display_name": "Sonnet \ud83d"},
            "workspace": {"project_dir": "/home/dev/pro\ud83dj"}}
    line = status_line(server.target, data, cwd=tmp_path)
    assert (line.returncode, line.stderr) == (0, "")
    assert line.stdout.startswith("Sonnet \ufffd | ctx 3% | 5h 42% (resets ")
    auth = {"Content-Type": "application/json"}
    body = {"input": json.dumps({**data, "session_id": "s-page\udc00"}), "template": "@model @project",
            "timezone": "UTC"}
    response, answer = web(server.http_port, "/api/statusline", "POST", auth, json.dumps(body).encode())
    assert (response.status, json.loads(answer)) == (200, {"line": "Sonnet \ufffd pro\ufffdj", "problem": ""})
    assert db_rows(server.db, "SELECT s.session_id, limit_readings.project FROM limit_readings JOIN sessions s ON "
                              "s.id = limit_readings.session ORDER BY limit_readings.id") == \
        [("s-\ufffd", "/home/dev/pro\ufffdj"), ("s-page\ufffd", "/home/dev/pro\ufffdj")]
    folder = tmp_path / "projects"
    write_transcript(folder, "s-cut", [transcript_line("s-cut\udbff", "2026-05-01T10:00:00Z", "req_\ud83d", "msg_1",
                                                       cwd="/home/dev/caf\udce9")])
    imported = ccmon_import(server, str(folder))
    assert (imported.returncode, imported.stderr) == (0, "")
    assert imported.stdout.startswith("ccmon import: 1 file read; 1 request imported; ")
    assert db_rows(server.db, "SELECT session_id, request_id, s.project FROM r JOIN sessions s USING (session_id)") == \
        [("s-cut\ufffd", "req_\ufffd", "/home/dev/caf\ufffd")]


def test_status_line_reads_one_object_from_stdin_left_open(tmp_path):
    """Claude Code's JSON is parsed once it is whole, whether or not stdin is closed after it."""
    proc = subprocess.Popen([*CCMON, "statusline", "--monitor-server", "127.0.0.1:9"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "HOME": str(tmp_path)})
    try:
        proc.stdin.write(json.dumps({"model": {"display_name": "Opus"}, "cost": {"total_cost_usd": 0.01245}}))
        proc.stdin.flush()  # and left open, as a writer that never closes it would
        assert proc.wait(20) == 0
        assert (proc.stdout.read(), proc.stderr.read()) == ("Opus | session $0.0125\n", "")
    finally:
        proc.stdin.close()
        proc.kill() if proc.poll() is None else None


def test_status_line_input_too_large_and_output_to_a_full_disk(tmp_path):
    huge = json.dumps({"model": {"display_name": "Opus"}, "padding": "x" * 50 * 2**20})  # valid JSON, 50 MB
    result = status_line("127.0.0.1:9", huge, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "ccmon: nothing to show yet\n")
    assert result.stderr == ("ccmon statusline: stdin is larger than 1 MB, more than a status line's input; showing "
                             "server figures only\n")
    with open("/dev/full", "w") as full:  # every command's output goes through main's one writer check
        written = subprocess.run([*CCMON, "statusline", "--monitor-server", "127.0.0.1:9"], input="{}", stdout=full,
                                 stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=30,
                                 env={**os.environ, "HOME": str(tmp_path)})
    assert (written.returncode, written.stderr) == (1, "ccmon: cannot write the output: No space left on device\n")


# ---------------------------------------------------------------- reports: ccmon report

def run_report(srv: ServerProcess, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_ccmon(["report", *args, "--monitor-server", srv.target, "--monitor-timezone", "Asia/Tokyo"], cwd,
                     env=env)


def test_reports_as_table_json_and_csv(server, tmp_path):
    sdk_export(server.port, team_events())
    daily = run_report(server, "daily", "--since", "2026-05-04", "--until", "2026-05-06", "--json", cwd=tmp_path)
    assert daily.returncode == 0, daily.stderr
    report = json.loads(daily.stdout)
    assert (report["since"], report["until"], report["timezone"]) == \
        ("2026-05-04T00:00:00+09:00", "2026-05-07T00:00:00+09:00", "Asia/Tokyo")
    assert [(r["date"], r["requests"], r["total_tokens"], r["cost_usd"], r["premium_cost_usd"])
            for r in report["rows"]] == [("2026-05-04", 2, 1530, 0.51, 0.5), ("2026-05-05", 2, 5060, 2.375, 2.375)]
    # a day, week or month without usage is no row
    assert report["totals"] == {"requests": 4, "input_tokens": 1357, "output_tokens": 5233, "cache_read_tokens": 0,
                                "cache_creation_tokens": 0, "total_tokens": 6590, "cost_usd": 2.885,
                                "premium_requests": 3, "premium_cost_usd": 2.875}
    weekly = json.loads(run_report(server, "weekly", "--since", "2026-05-01", "--until", "2026-05-10", "--json",
                                   cwd=tmp_path).stdout)
    assert [(r["week_of"], r["requests"]) for r in weekly["rows"]] == [("2026-05-04", 4)]
    monthly = json.loads(run_report(server, "monthly", "--since", "2026-04-01", "--until", "2026-05-31", "--json",
                                    cwd=tmp_path).stdout)
    assert [(r["month"], r["cost_usd"]) for r in monthly["rows"]] == [("2026-05", 2.885)]
    csv_out = run_report(server, "model", "--since", "2026-05-01", "--until", "2026-05-31", "--csv", cwd=tmp_path)
    assert csv_out.stdout.splitlines() == [
        "model,requests,input_tokens,output_tokens,cache_read_tokens,cache_creation_tokens,total_tokens,cost_usd,"
        "avg_duration_ms,avg_ttft_ms",
        "claude-opus-4-1,1,50,5000,0,0,5050,2.25,60000,",  # no time to first token was reported for it
        "claude-sonnet-4-5,2,1007,203,0,0,1210,0.625,2500,650",
        "claude-haiku-4-5,1,300,30,0,0,330,0.01,900,200",
        "Total,4,1357,5233,0,0,6590,2.885,,"]
    table = run_report(server, "session", "--since", "2026-05-01", "--until", "2026-05-31", "--user",
                       "ana@example.com", cwd=tmp_path)
    lines = table.stdout.splitlines()
    assert lines[0] == ("session report, 2026-05-01T00:00:00+09:00 to 2026-06-01T00:00:00+09:00 (Asia/Tokyo), "
                        "user ana@example.com")
    assert lines[1:] == [  # what fits 120 columns, ids and times shortened
        "session  user             first             req  input  output  tokens     cost  models",
        "-------  ---------------  ----------------  ---  -----  ------  ------  -------  "
        "----------------------------------",
        "s-ana-2  ana@example.com  2026-05-05 19:00    1     50   5,000   5,050    $2.25  claude-opus-4-1",
        "s-ana-1  ana@example.com  2026-05-04 18:00    2  1,300     230   1,530  $0.5100  "
        "claude-sonnet-4-5 claude-haiku-4-5",
        "-------  ---------------  ----------------  ---  -----  ------  ------  -------  "
        "----------------------------------",
        "Total                                         3  1,350   5,230   6,580    $2.76",
        "(to fit 120 columns, not shown: failed, errors, source, agent, cache_write, cache_read, last, tools, project; --wide",
        "shows every column)"]
    wide = run_report(server, "session", "--since", "2026-05-01", "--until", "2026-05-31", "--user",
                      "ana@example.com", "--wide", cwd=tmp_path).stdout.splitlines()
    assert wide[1].split() == ["session", "user", "project", "first", "last", "req", "input", "output", "cache_read",
                               "cache_write", "tokens", "cost", "models", "tools", "failed", "errors", "source", "agent"]
    assert wide[3].split()[:7] == ["s-ana-2", "ana@example.com", "(no", "project)", "2026-05-05T19:00:00+09:00",
                                   "2026-05-05T19:00:00+09:00", "1"]
    assert wide[-1].split() == ["Total", "3", "1,350", "5,230", "0", "0", "6,580", "$2.76", "3", "1", "1"]
    model = run_report(server, "model", "--since", "2026-05-01", cwd=tmp_path).stdout.splitlines()
    assert model[3].split() == ["claude-opus-4-1", "1", "50", "5,000", "0", "0", "5,050", "$2.25", "60,000", "-"]
    reader = subprocess.Popen([*CCMON, "report", "daily", "--monitor-server", server.target, "--since", "2020-01-01"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout.readline().startswith(b"daily report, 2020-01-01")
    reader.stdout.close()  # like `| head -1`: the rest of the report has nowhere to go
    assert (reader.wait(30), reader.stderr.read()) == (0, b"")


def test_report_limits_lists_claudes_readings_as_table_json_and_csv(server, tmp_path):
    sdk_export(server.port, team_events())  # the sessions' users
    now = ccmon.now_ms() // 60_000 * 60_000  # whole minutes: tables show minutes
    for reading in (ccmon.LimitReading("s-ana-1", now - 7200_000, five_hour=ccmon.LimitWindow(42.0, now + 3600_000),
                                       seven_day=ccmon.LimitWindow(12.5, now + 3 * 86400_000)),
                    ccmon.LimitReading("s-ana-1", now - 5400_000),  # no limits (an API key): not listed
                    ccmon.LimitReading("s-bo-1", now - 1800_000, seven_day=ccmon.LimitWindow(80.0, now + 86400_000))):
        server.query().ReportStatusLine(ccmon_pb2.ReportStatusLineRequest(reading=ccmon.reading_message(reading)))
    tokyo = ccmon.ZoneInfo("Asia/Tokyo")

    def local(ms: int, spec: str = "minutes") -> str:
        return ccmon.dt.datetime.fromtimestamp(ms / 1000, tokyo).isoformat(timespec=spec)
    report = json.loads(run_report(server, "limits", "--json", cwd=tmp_path).stdout)
    assert (report["report"], report["rows"], report["totals"]) == ("limits", [  # oldest first, as daily and blocks
        {"limits": "Claude", "read_at": local(now - 7200_000, "seconds"), "user": "ana@example.com",
         "session_id": "s-ana-1",
         "five_hour_percent": 42.0, "five_hour_resets": local(now + 3600_000), "seven_day_percent": 12.5,
         "seven_day_resets": local(now + 3 * 86400_000)},
        {"limits": "Claude", "read_at": local(now - 1800_000, "seconds"), "user": "bo@example.com",
         "session_id": "s-bo-1",
         "five_hour_percent": None, "five_hour_resets": None, "seven_day_percent": 80.0,
         "seven_day_resets": local(now + 86400_000)}], {})
    assert run_report(server, "limits", "--csv", cwd=tmp_path).stdout.splitlines() == [
        "limits,read_at,user,session_id,five_hour_percent,five_hour_resets,seven_day_percent,seven_day_resets",
        f"Claude,{local(now - 7200_000, 'seconds')},ana@example.com,s-ana-1,42.0,{local(now + 3600_000)},12.5,"
        f"{local(now + 3 * 86400_000)}",
        f"Claude,{local(now - 1800_000, 'seconds')},bo@example.com,s-bo-1,,,80.0,{local(now + 86400_000)}"]
    table = run_report(server, "limits", cwd=tmp_path).stdout.splitlines()
    minutes = lambda ms: local(ms)[:16].replace("T", " ")  # noqa: E731
    assert table[1:] == [
        "limits  read              user             session   5h  5h_resets          week  week_resets",
        "------  ----------------  ---------------  -------  ---  ----------------  -----  ----------------",
        f"Claude  {minutes(now - 7200_000)}  ana@example.com  s-ana-1  42%  {minutes(now + 3600_000)}  12.5%  "
        f"{minutes(now + 3 * 86400_000)}",
        f"Claude  {minutes(now - 1800_000)}  bo@example.com   s-bo-1     -  -                   80%  "
        f"{minutes(now + 86400_000)}"]
    only_bo = json.loads(run_report(server, "limits", "--user", "bo@example.com", "--json", cwd=tmp_path).stdout)
    assert [row["session_id"] for row in only_bo["rows"]] == ["s-bo-1"]
    none = run_report(server, "limits", "--since", "2026-01-01", "--until", "2026-01-31", cwd=tmp_path)
    assert none.stdout.splitlines()[1:] == ["no readings of Claude's limits, nor of Codex's, in this period (ccmon "
                                            "statusline stores Claude's, ccmon import Codex's)"]
    assert run_report(server, "limits", "--since", "2026-01-01", "--until", "2026-01-31", "--csv",
                      cwd=tmp_path).stdout == ",".join(ccmon.LIMIT_FIELDS) + "\n"


@pytest.mark.parametrize("args,message", [
    (["limits", "--project", "alpha"], "ccmon: config error: --project: Claude's limits are an account's, not a "
                                       "project's (use --user)\n"),
    (["daily", "--since", "May 1"], "ccmon: config error: --since: invalid date 'May 1' (use YYYY-MM-DD)\n"),
    (["daily", "--since", "2026-05-02", "--until", "2026-05-01"],
     "ccmon: config error: --until 2026-05-01 is before --since 2026-05-02\n"),
    (["daily", "--until", "9999-12-31"], "ccmon: config error: --since/--until: dates from 0001-01-31 to 9999-12-30, "
                                         "please (got 9999-12-02 to 9999-12-31)\n"),
])
def test_report_errors(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["report", *args], capsys)
    assert (code, err) == (2, message)
    code, err = run_main(["report", "yearly"], capsys)
    assert code == 2 and "argument kind: invalid choice: 'yearly'" in err
    unreachable = run_ccmon(["report", "model", "--monitor-server", "127.0.0.1:9"], tmp_path)
    assert (unreachable.returncode, unreachable.stdout) == (1, "")
    assert unreachable.stderr == "ccmon: cannot reach the ccmon server at 127.0.0.1:9: connection refused\n"



HOSTILE = "x\x1b[31m\x07\r\x9b\x7fy"  # ESC starting a colour, BEL, CR, a C1 CSI and DEL, in anyone's names
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # any control character but the line ends


def test_names_with_control_characters_are_shown_not_obeyed(server, tmp_path):
    """Anyone who can export to a team server names projects, sessions, models and users; the status line's
    stdin names the model. Every output shows their control characters as escapes (\x1b), never raw."""
    assert sdk_export(server.port, [("api_request", api_request(
        1, hours_ago(0.1), model=f"claude-{HOSTILE}", session=f"s-{HOSTILE}", input_tokens=10, cost_usd=0.01245,
        **{"user.email": f"u-{HOSTILE}"}))], resource={**CLAUDE_RESOURCE, "project": f"p-{HOSTILE}"}) == ["SUCCESS"]
    shown = r"x\x1b[31m\x07\x0d\x9b\x7fy"
    outputs = []
    for kind, form in [(kind, form) for kind in ("project", "session", "model") for form in ([], ["--csv"])] + \
            [("session", ["--json"]), ("session", ["--wide"])]:
        result = run_ccmon(["report", kind, "--monitor-server", server.target, *form], tmp_path)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
        if form != ["--json"]:
            assert shown in result.stdout, (kind, form, result.stdout)
    data = live_input("s-live")
    data["model"]["display_name"] = f"Sonnet {HOSTILE}"
    data["workspace"]["project_dir"] = f"/home/p-{HOSTILE}"
    line = status_line(server.target, data, "--format", "@model @project", cwd=tmp_path)
    assert (line.returncode, line.stdout) == (0, f"Sonnet {shown} p-{shown}\n")
    outputs.append(line.stdout)
    assert [output for output in outputs if RAW_CONTROL.search(output)] == []
    # The monitor: at the drawing edge, whatever the screen built its lines from.
    written = []
    window = types.SimpleNamespace(erase=lambda: None, getmaxyx=lambda: (3, 40), noutrefresh=lambda: None,
                                   addstr=lambda y, x, text, attr: written.append(text))
    ccmon.draw(types.SimpleNamespace(doupdate=lambda: None), window, [[(f"a{HOSTILE}", "")], [("b\x1b]0;t\x07", "")]],
               {})
    assert written == [r"ax\x1b[31m\x07\x0d\x9b\x7fy", r"b\x1b]0;t\x07"]
    fitted = ccmon.fit_columns([ccmon.Column("model", 12, 0, left=True), ccmon.Column("cost", 7, 0)],
                               [[f"m{HOSTILE}", "$0.0125"]], 20)  # a table's cells: escaped, cut, still aligned
    assert ccmon.row_text(fitted, [f"m{HOSTILE}", "$0.0125"]) == r"mx\x1b[31m\~ $0.0125"


# ---------------------------------------------------------------- web dashboard: GET / and /api/ on the HTTP listener

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
USAGE_KEYS = ("requests", "input", "output", "cache_read", "cache_creation", "cost_nanos")


def web(port: int, path: str = "/", method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """One request to the HTTP listener, redirects not followed: (response, body)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def dashboard_api(port: int, query: str = "", headers: dict | None = None) -> dict:
    response, data = web(port, "/api/dashboard" + query, headers=headers)
    assert response.status == 200, data
    return json.loads(data)


def web_team_events() -> tuple[list, list]:
    """Recent requests of two users in two projects (ana's, then bo's export), and an older one of bo's."""
    def request(seq, session, email, hours, model, cost, **figures):
        return ("api_request", {**api_request(seq, hours_ago(hours), model=model, session=session, cost_usd=cost,
                                              **figures), "user.email": email})
    ana = [request(1, "s-ana", "ana@example.com", 0.2, "claude-sonnet-4-5", "1.25", input_tokens=1200,
                   output_tokens=340, cache_read_tokens=15000, cache_creation_tokens=2200, duration_ms=5120),
           request(2, "s-ana", "ana@example.com", 0.3, "claude-haiku-4-5", 0.000975, input_tokens=800,
                   output_tokens=95, duration_ms=830)]
    bo = [request(3, "s-bo", "bo@example.com", 0.5, "claude-opus-4-1", 0.06225, input_tokens=10, output_tokens=2048),
          request(4, "s-bo-old", "bo@example.com", 50, "claude-opus-4-1", "2.5", input_tokens=7, output_tokens=3)]
    return ana, bo


def seed_web_team(srv: ServerProcess) -> None:
    """web_team_events through the SDK's OTLP/HTTP exporter, and a status line reading of ana's limits."""
    ana, bo = web_team_events()
    assert sdk_export(srv.http_port, ana, resource={**CLAUDE_RESOURCE, "project": "web-app"},
                      protocol="http/protobuf") == ["SUCCESS"]
    assert sdk_export(srv.http_port, bo, resource={**CLAUDE_RESOURCE, "project": "api"},
                      protocol="http/protobuf") == ["SUCCESS"]
    resets = ccmon.now_ms() + 3600_000
    srv.query().ReportStatusLine(ccmon_pb2.ReportStatusLineRequest(reading=ccmon_pb2.LimitReading(
        session_id="s-ana", model="claude-sonnet-4-5",
        five_hour=ccmon_pb2.LimitWindow(used_percentage=20.5, resets_at=ccmon.timestamp_from_ms(resets)),
        seven_day=ccmon_pb2.LimitWindow(used_percentage=63.0,
                                        resets_at=ccmon.timestamp_from_ms(resets + 2 * 86400_000)))))


def usage_figures(usage) -> tuple:
    """A Usage's counts and cost, from the dashboard's JSON or from a value the client built."""
    if isinstance(usage, dict):
        return tuple(usage[key] for key in USAGE_KEYS)
    return (usage.requests, usage.input, usage.output, usage.cache_read, usage.cache_creation, usage.cost_nanos)


def split_figures(split) -> tuple:
    if isinstance(split, dict):
        return tuple(usage_figures(split[part]) for part in ("base", "premium", "total"))
    return tuple(usage_figures(part) for part in (split.base, split.premium, split.total))


def test_dashboard_api_figures_are_the_query_services_exactly(server):
    seed_web_team(server)
    client = ccmon.Client(server.target)
    for query, user, project in (("?period=d&tz=UTC", None, None),
                                 ("?period=a&user=bo%40example.com", "bo@example.com", None),
                                 ("?period=w&project=web-app", None, "web-app")):
        data = dashboard_api(server.http_port, query)
        now, (start, end) = data["now_ms"], (data["period"]["start_ms"], data["period"]["end_ms"])
        assert (data["user"], data["project"], data["timezone"], end) == (user, project, "UTC", now)
        midnight, month_start, _ = ccmon.day_and_month_start(now, ccmon.ZoneInfo("UTC"))
        today = dt.datetime.fromtimestamp(now / 1000, dt.timezone.utc).date()
        monday = ccmon.ms_from_datetime(dt.datetime.combine(today - dt.timedelta(days=today.weekday()), dt.time(),
                                                            dt.timezone.utc))
        for key, lo in (("today", midnight), ("week", monday), ("month", month_start), ("period_usage", start)):
            expected = client.stats(lo, now, user, project)
            assert split_figures(data[key]) == split_figures(expected), key
            assert data[key]["total"]["text"]["cost"] == ccmon.format_cost(expected.total.cost_nanos)
        days = client.days(None, now, "UTC", user, project)[::-1]
        assert [(day["date"], split_figures(day["split"])) for day in data["days"]] == \
            [(day.date, split_figures(day.split)) for day in days]
        assert [(u["user"], u["sessions"], split_figures(u["split"])) for u in data["users"]] == \
            [(u.user, u.sessions, split_figures(u.split)) for u in client.users(start, end, project)]
        assert [(m["model"], usage_figures(m["usage"])) for m in data["models"]] == \
            [(m.model, usage_figures(m.usage)) for m in client.models(start, end, user, project)]
        assert [(p["project"], p["sessions"], split_figures(p["split"])) for p in data["projects"]] == \
            [(p.project, p.sessions, split_figures(p.split)) for p in client.projects(start, end, user)]
        page = client.api_requests(start, end, 50, 0, False, user, project)
        assert [(r["ts_ms"], r["model"], r["session_id"], usage_figures(r["usage"])) for r in data["requests"]] == \
            [(r.ts_ms, r.model, r.session_id, usage_figures(r.usage)) for r in page.requests]
        assert [(s["session_id"], s["user"], s["project"], split_figures(s["split"])) for s in data["sessions"]] == \
            [(s.session_id, s.user, s.project, split_figures(s.split))
             for s in client.sessions(start, end, user, 50, project)]
    data = dashboard_api(server.http_port, "?period=d&tz=UTC")
    assert data["period_usage"]["total"]["cost_nanos"] == 1_313_225_000  # 1.25 + 0.000975 + 0.06225, exactly
    assert data["period_usage"]["total"]["text"] == {
        "cost": "$1.31", "requests": "3", "tokens": "21.7K", "input": "2.01K", "output": "2.48K", "cache": "17.2K",
        "limited": "4.49K", "duration": "6.0s"}  # 5,950 ms
    assert [r["usage"]["text"]["cost"] for r in data["requests"]] == ["$1.25", "$0.0010", "$0.0623"]  # halves up
    assert [(u["text"]["name"], u["five_hour"]["text"]["percent"] if u["five_hour"] else None)
            for u in data["users"]] == [("ana@example.com", "21%"), ("bo@example.com", None)]
    limits = data["limits"]
    assert [(entry["user"], entry["five_hour"]["window"]["percent"], entry["five_hour"]["text"]["age"],
             entry["seven_day"]["window"]["text"]["percent"]) for entry in limits] == \
        [("ana@example.com", 20.5, "just now", "63%")]
    assert limits[0]["five_hour"]["window"]["text"]["resets"] == ccmon.reset_time(
        limits[0]["five_hour"]["window"]["resets_ms"], data["now_ms"], ccmon.ZoneInfo("UTC"))
    assert [p["key"] for p in data["periods"]] == list(ccmon.PERIODS) and data["stored_requests"] == 4
    assert dashboard_api(server.http_port, "?user=nobody%40example.com")["limits"] == []
    # Codex's own plan's limits (read from its rollouts) are listed after Claude's, named as Codex's
    codex_session = "01a2419c-f77d-7560-a635-0779905e56e1"
    server.query().ImportRequests(ccmon_pb2.ImportRequestsRequest(
        requests=[ccmon_pb2.ImportedRequest(session_id=codex_session, timestamp_ms=data["now_ms"] - 60_000,
                                            model="gpt-5.5", input_tokens=10, agent="codex")],
        user="ana@example.com", readings=[ccmon.reading_message(ccmon.LimitReading(
            codex_session, data["now_ms"] - 60_000, five_hour=ccmon.LimitWindow(12.5, data["now_ms"] + 3600_000),
            agent=ccmon.CODEX))]))
    assert [(entry["user"], entry["of"], entry["five_hour"]["window"]["percent"], entry["seven_day"])
            for entry in dashboard_api(server.http_port, "?period=d&tz=UTC")["limits"]][1:] == \
        [("ana@example.com", "Codex", 12.5, None)]
    # The current block: the automatic 5-hour block running now, as GetBlocks finds it.
    block = dashboard_api(server.http_port, "?period=b")
    now = block["now_ms"]
    (running,) = [b for b in client.blocks(now - ccmon.BLOCK_MS, now) if b.start_ms <= now < b.end_ms]
    assert (block["period"]["name"], block["period"]["start_ms"]) == ("current block", running.start_ms)
    assert split_figures(block["period_usage"]) == split_figures(client.stats(running.start_ms, now))
    client.close()


def seed_codex_call(srv: ServerProcess, now: int) -> None:
    """One call of Codex's from its history (gpt-5.5, 1000 tokens in and 200 out, priced as `ccmon import` does) in
    ana's folder web-app, a minute ago, with a reading of Codex's own 5-hour limit."""
    session = "01a2419c-f77d-7560-a635-0779905e56e1"
    srv.query().ImportRequests(ccmon_pb2.ImportRequestsRequest(
        requests=[ccmon_pb2.ImportedRequest(session_id=session, timestamp_ms=now - 60_000, model="gpt-5.5",
                                            input_tokens=1000, output_tokens=200, cost_nanos=11_000_000,
                                            estimated=True, agent="codex", project_dir="/home/ana/web-app")],
        user="ana@example.com", readings=[ccmon.reading_message(ccmon.LimitReading(
            session, now - 60_000, five_hour=ccmon.LimitWindow(12.5, now + 3600_000), agent=ccmon.CODEX))]))


def test_dashboard_api_keeps_one_agents_figures_and_breaks_the_period_down_by_agent(server):
    """?agent= keeps that agent's usage in every figure, exactly as the QueryService's agent filter does; the
    period's usage by agent adds up to the whole; the requests name their agent; limits are the agent's plan's."""
    seed_web_team(server)
    seed_codex_call(server, ccmon.now_ms())
    client = ccmon.Client(server.target)
    whole = dashboard_api(server.http_port, "?period=d&tz=UTC")
    assert (whole["agent"], whole["agent_names"]) == (None, ["claude-code", "gemini-cli", "codex", "qwen-code"])
    assert [(a["agent"], a["models"], usage_figures(a["usage"]), a["usage"]["text"]["cost"])
            for a in whole["agents"]] == [
        ("claude-code", 3, (3, 2010, 2483, 15000, 2200, 1_313_225_000), "$1.31"),
        ("codex", 1, (1, 1000, 200, 0, 0, 11_000_000), "$0.0110")]  # 1000 * $5 + 200 * $30 per million
    assert sum((ccmon.Usage(**{k: a["usage"][k] for k in USAGE_KEYS}) for a in whole["agents"]), ccmon.Usage()) \
        == ccmon.Usage(**{k: whole["period_usage"]["total"][k] for k in USAGE_KEYS})
    assert [r["agent"] for r in whole["requests"]] == ["codex", "claude-code", "claude-code", "claude-code"]
    assert [(entry["of"], entry["user"]) for entry in whole["limits"]] == [("Claude", "ana@example.com"),
                                                                          ("Codex", "ana@example.com")]
    for agent, project in (("codex", None), ("claude-code", None), ("codex", "web-app"), ("gemini-cli", None)):
        data = dashboard_api(server.http_port, f"?period=d&tz=UTC&agent={agent}" +
                             (f"&project={project}" if project else ""))
        now, (start, end) = data["now_ms"], (data["period"]["start_ms"], data["period"]["end_ms"])
        assert (data["agent"], data["project"]) == (agent, project)
        midnight, month_start, _ = ccmon.day_and_month_start(now, ccmon.ZoneInfo("UTC"))
        for key, lo in (("today", midnight), ("month", month_start), ("period_usage", start)):
            assert split_figures(data[key]) == split_figures(client.stats(lo, now, None, project, agent)), key
        assert [(day["date"], split_figures(day["split"])) for day in data["days"]] == \
            [(day.date, split_figures(day.split)) for day in client.days(None, now, "UTC", None, project, agent)[::-1]]
        assert [(u["user"], u["sessions"], split_figures(u["split"])) for u in data["users"]] == \
            [(u.user, u.sessions, split_figures(u.split)) for u in client.users(start, end, project, agent)]
        assert [(m["model"], m["agent"], usage_figures(m["usage"])) for m in data["models"]] == \
            [(m.model, m.agent, usage_figures(m.usage)) for m in client.models(start, end, None, project, agent)]
        assert [(p["project"], p["sessions"], split_figures(p["split"])) for p in data["projects"]] == \
            [(p.project, p.sessions, split_figures(p.split)) for p in client.projects(start, end, None, None, agent)]
        page = client.api_requests(start, end, 50, 0, False, None, project, agent)
        assert [(r["ts_ms"], r["agent"], usage_figures(r["usage"])) for r in data["requests"]] == \
            [(r.ts_ms, r.agent, usage_figures(r.usage)) for r in page.requests]
        assert [(s["session_id"], s["agent"], split_figures(s["split"])) for s in data["sessions"]] == \
            [(s.session_id, s.agent, split_figures(s.split)) for s in client.sessions(start, end, None, 50, project,
                                                                                       agent)]
        assert [(a["agent"], usage_figures(a["usage"])) for a in data["agents"]] == \
            [(a["agent"], usage_figures(a["usage"])) for a in whole["agents"] if a["agent"] == agent]
        assert {entry["of"] for entry in data["limits"]} <= {ccmon.LIMITS_OF[agent]}
    codex = dashboard_api(server.http_port, "?period=d&tz=UTC&agent=codex")
    assert (usage_figures(codex["period_usage"]["total"]), [r["agent"] for r in codex["requests"]],
            [(s["agent"], s["project"]) for s in codex["sessions"]], [e["of"] for e in codex["limits"]]) == \
        ((1, 1000, 200, 0, 0, 11_000_000), ["codex"], [("codex", "/home/ana/web-app")], ["Codex"])
    gemini = dashboard_api(server.http_port, "?period=d&tz=UTC&agent=gemini-cli")
    assert (gemini["period_usage"]["total"]["requests"], gemini["agents"], gemini["requests"], gemini["limits"]) == \
        (0, [], [], [])
    assert dashboard_api(server.http_port, "?period=d&tz=UTC&agent=")["agent"] is None  # the page's "every agent"
    client.close()


def test_dashboard_pages_headers_methods_and_bad_requests(server):
    page, html = web(server.http_port, "/")
    assert (page.status, page.getheader("Content-Type")) == (200, "text/html; charset=utf-8")
    assert b'<body data-view="dashboard">' in html and b'<script src="/dashboard.js" defer></script>' in html
    for name, value in (("Content-Security-Policy", PAGE_CSP), ("X-Content-Type-Options", "nosniff"),
                        ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY"), ("Cache-Control", "no-store"),
                        ("Cross-Origin-Resource-Policy", "same-origin")):
        assert page.getheader(name) == value, name
    head, empty = web(server.http_port, "/", method="HEAD")
    assert (head.status, head.getheader("Content-Length"), empty) == (200, str(len(html)), b"")
    script, js = web(server.http_port, "/dashboard.js")
    assert (script.status, script.getheader("Content-Type"), script.getheader("Cache-Control")) == \
        (200, "text/javascript; charset=utf-8", "no-cache")
    assert js == (ROOT / "dashboard.js").read_bytes() and "innerHTML" not in js.decode()
    again, nothing = web(server.http_port, "/dashboard.js", headers={"If-None-Match": script.getheader("ETag")})
    assert (again.status, nothing) == (304, b"")
    style, css = web(server.http_port, "/dashboard.css")
    assert (style.status, style.getheader("Content-Type"), css) == \
        (200, "text/css; charset=utf-8", (ROOT / "dashboard.css").read_bytes())
    api, plain = web(server.http_port, "/api/dashboard")
    assert (api.status, api.getheader("Content-Type"), api.getheader("Cache-Control"),
            api.getheader("Content-Security-Policy"), api.getheader("Content-Encoding")) == \
        (200, "application/json", "no-store", PAGE_CSP, None)
    packed, data = web(server.http_port, "/api/dashboard", headers={"Accept-Encoding": "br, gzip"})
    assert (packed.getheader("Content-Encoding"), packed.getheader("Vary")) == ("gzip", "Accept-Encoding")
    assert json.loads(zlib.decompress(data, 31)).keys() == json.loads(plain).keys()
    refusals = [
        ("GET", "/nope", 404, "no such page '/nope'; the dashboard is at /", None),
        ("GET", "/api/", 404, "no such page '/api/'; the dashboard is at /", None),
        ("PUT", "/", 405, "PUT is not supported here; use GET, HEAD", "GET, HEAD"),
        ("DELETE", "/api/dashboard", 405, "DELETE is not supported here; use GET, HEAD", "GET, HEAD"),
        ("POST", "/api/dashboard", 405, "POST is not supported here; use GET, HEAD", "GET, HEAD"),
        ("GET", "/login", 405, "GET is not supported here; use POST", "POST"),
        ("TRACE", "/", 405, "TRACE is not supported here; use GET, HEAD", "GET, HEAD"),  # methods http.server
        ("MADEUP", "/api/dashboard", 405, "MADEUP is not supported here; use GET, HEAD", "GET, HEAD"),  # has no do_
    ]                                                                                 # for: its HTML 501 page before
    for method, path, status, message, allow in refusals:
        response, data = web(server.http_port, path, method=method, body=b"x" if method == "POST" else None)
        assert (response.status, data.decode(), response.getheader("Allow")) == (status, message + "\n", allow), path
        assert response.getheader("Content-Security-Policy") == PAGE_CSP
    response, data = web(server.http_port, "/v1/logs")  # the OTLP paths answer as before
    assert (response.status, response.getheader("Allow")) == (405, "POST")
    assert json.loads(data)["message"] == "GET is not supported; OTLP/HTTP exports use POST"
    [(status, headers, data)] = raw_http(server.http_port, b"GET /?project=" + b"x" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert (status, headers["content-type"], headers["content-security-policy"], data) == \
        (414, "text/plain; charset=utf-8", PAGE_CSP, b"Request-URI Too Long\n")
    bad = [("?period=x", "period 'x' is none of h, d, w, m, a, b (last hour, last 24 hours, last 7 days, last 30 days, "
                         "all time, current block)"),
           ("?tz=Mars/Olympus", "unknown timezone 'Mars/Olympus'"),
           ("?colour=red", "unknown parameter 'colour'; use period, user, project, agent, tz"),
           ("?agent=cursor", "unknown agent 'cursor' (known: claude-code, gemini-cli, codex, qwen-code)"),
           ("?agent=Codex", "unknown agent 'Codex' (known: claude-code, gemini-cli, codex, qwen-code)")]
    for query, message in bad:
        response, data = web(server.http_port, "/api/dashboard" + query)
        assert (response.status, json.loads(data)) == (400, {"error": message})
    # Without a token, only a request that names the server by address or localhost is answered: a web site whose
    # name resolves to this machine (DNS rebinding) is not.
    for host in ("localhost", f"localhost:{server.http_port}", f"127.0.0.1:{server.http_port}", "[::1]:80"):
        assert web(server.http_port, "/api/dashboard", headers={"Host": host})[0].status == 200, host
    for path in ("/", "/api/dashboard", "/dashboard.js"):
        response, data = web(server.http_port, path, headers={"Host": "evil.example:4318"})
        assert (response.status, data.decode()) == (403, "without a token the dashboard answers only at an IP "
                                                         "address or localhost (no web site can then reach it by a "
                                                         "name of its own): set server.token to open it by name\n")
    assert "Traceback" not in server.log


def test_dashboard_with_a_token_asks_for_it_and_signs_in_with_a_cookie(tmp_path):
    token = "s3cret-dashboard-token"
    srv = ServerProcess(tmp_path, env={"CCMON_TOKEN": token}).start()
    try:
        seed = logs_request([("api_request", api_request(1, hours_ago(0.1), cost_usd=0.5))])
        response, _ = http_post(srv.http_port, body=seed.SerializeToString())
        assert response.status == 401  # the OTLP endpoints keep their token rule
        response, _ = http_post(srv.http_port, body=seed.SerializeToString(),
                                headers={"Authorization": f"Bearer {token}"})
        assert response.status == 200
        page, html = web(srv.http_port, "/")
        assert (page.status, page.getheader("WWW-Authenticate"), page.getheader("Cache-Control")) == \
            (401, 'Bearer realm="ccmon"', "no-store")
        assert b'<body data-view="login">' in html and b'<form method="post" action="/login">' in html
        api, data = web(srv.http_port, "/api/dashboard")
        assert (api.status, json.loads(data)) == \
            (401, {"error": "missing or wrong token: sign in at / or send Authorization: Bearer"})
        for wrong in ("Bearer nope", "Basic " + token, token):
            assert web(srv.http_port, "/api/dashboard", headers={"Authorization": wrong})[0].status == 401
        by_bearer = dashboard_api(srv.http_port, headers={"Authorization": f"Bearer {token}"})
        assert by_bearer["period_usage"]["total"]["text"]["cost"] == "$0.5000" and by_bearer["sign_out"] is True
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        failed, html = web(srv.http_port, "/login", "POST", form, b"token=wrong")
        assert failed.status == 401 and failed.getheader("Set-Cookie") is None
        assert b'<body data-view="login-failed">' in html
        signed, _ = web(srv.http_port, "/login", "POST", form, f"token={token}".encode())
        cookie = signed.getheader("Set-Cookie")
        assert (signed.status, signed.getheader("Location")) == (303, "/")
        value, *flags = cookie.split("; ")
        assert value.startswith("ccmon_session=") and token not in cookie
        assert flags == [f"Max-Age={30 * 86400}", "Path=/", "HttpOnly", "SameSite=Strict"]  # Secure only over TLS
        session = {"Cookie": value}
        page, html = web(srv.http_port, "/", headers=session)
        assert page.status == 200 and b'<body data-view="dashboard">' in html
        assert dashboard_api(srv.http_port, headers={"Cookie": f"other=1; {value}"})["stored_requests"] == 1
        expires, mac = value.removeprefix("ccmon_session=").split(".")
        past = int(time.time()) - 1
        for forged in (f"{int(expires) + 1}.{mac}", f"{expires}.{'0' * len(mac)}", ccmon.session_cookie(token, past),
                       ccmon.session_cookie("another-token", int(expires)), "", "x.y", f"{expires}"):
            assert web(srv.http_port, "/api/dashboard", headers={"Cookie": f"ccmon_session={forged}"})[0].status == \
                401, forged
        # The cookie opens the dashboard alone: exports and the query service still want the token itself.
        assert http_post(srv.http_port, body=seed.SerializeToString(), headers=session)[0].status == 401
        out, _ = web(srv.http_port, "/logout", "POST", form, b"")
        assert (out.status, out.getheader("Location"), out.getheader("Set-Cookie")) == \
            (303, "/", "ccmon_session=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict")
        # With a token, a request naming the server by any host name is answered once it is signed in.
        assert web(srv.http_port, "/api/dashboard", headers={**session, "Host": "ccmon.example"})[0].status == 200
    finally:
        srv.stop()
    assert token not in srv.log and "refused dashboard sign-in from 127.0.0.1: wrong token" in srv.log


@pytest.mark.parametrize("header,takes", [("gzip", True), ("br;q=1.0, GZIP ; q=0.5", True),
                                          ("deflate, gzip;q=0", False), ("gzip; q=0.000", False), ("x-gzip", False),
                                          ("", False), (None, False)])
def test_dashboard_json_is_gzipped_for_clients_that_take_it(header, takes):
    assert ccmon.accepts_gzip(header) is takes


def test_dashboard_session_cookie_is_the_tokens_and_expires():
    cookie = ccmon.session_cookie("t", 2_000_000_000)
    assert re.fullmatch(r"2000000000\.[0-9a-f]{64}", cookie)
    assert ccmon.signed_in(f"ccmon_session={cookie}", "t", 1_999_999_999)
    assert not ccmon.signed_in(f"ccmon_session={cookie}", "t", 2_000_000_000)  # expired
    assert not ccmon.signed_in(f"ccmon_session={cookie}", "u", 1)
    assert not ccmon.signed_in(f"session={cookie}", "t", 1)
    assert not ccmon.signed_in("ccmon_session=\u00b2." + cookie.split(".")[1], "t", 1)  # a digit int() would take
    assert not ccmon.signed_in(None, "t", 1)


def test_dashboard_files_are_small_and_load_nothing_from_elsewhere():
    files = {name: (ROOT / name).read_text() for name in ("dashboard.html", "dashboard.js", "dashboard.css")}
    assert sum(map(len, files.values())) < 40_000
    for name, text in files.items():
        assert not re.search(r"(?:https?:)?//[a-z]", re.sub(r"http://www\.w3\.org/2000/svg", "", text)), name
    assert "innerHTML" not in files["dashboard.js"] and "insertAdjacentHTML" not in files["dashboard.js"]
    assert "style=" not in files["dashboard.html"] and "<script>" not in files["dashboard.html"]
    assert set(ccmon.DASHBOARD_FILES.values()) <= {(name, kind) for name in files for kind in (
        "text/html; charset=utf-8", "text/javascript; charset=utf-8", "text/css; charset=utf-8")}
    import build_zipapp
    assert all(name in build_zipapp.APP_FILES for name in files)


# In a real browser: headless Chromium (Debian's chromium package) loads the page, runs its script and its fetches
# (virtual time runs only once they have answered), and hands back the document as it then is.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("the dashboard's browser tests need Chromium: apt-get install -y chromium (README, Development)")
    return path


def in_browser(chromium: str, tmp_path: Path, url: str, *args: str) -> str:
    """What headless Chromium prints for `url` (with --dump-dom, the document once its script has run), in a new
    profile, in UTC (the zone the page asks the server for)."""
    profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-")
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=4000",
                             *args, url], capture_output=True, text=True, timeout=120, env={**os.environ, "TZ": "UTC"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@dataclasses.dataclass
class Document:
    """A dumped document as a reader sees it: each element's text by id, each table's rows of cell texts, the bars'
    titles, and every start tag (name and attributes) it has."""
    texts: dict[str, str]
    tables: dict[str, list[list[str]]]
    titles: list[str]
    tags: list[tuple[str, dict]]


def read_document(dom: str) -> Document:
    from html.parser import HTMLParser
    document = Document({}, {}, [], [])
    void = {"meta", "link", "input", "br", "img", "hr", "source", "area", "base", "col", "embed", "wbr"}

    class Reader(HTMLParser):
        open: list[tuple[str, str | None]] = []   # (tag, id) of the elements open here
        table: str | None = None

        def handle_starttag(self, tag, attrs):
            attributes = dict(attrs)
            document.tags.append((tag, attributes))
            if tag == "table":
                self.table = attributes.get("id")
                document.tables[self.table] = []
            elif tag == "tr" and self.table:
                document.tables[self.table].append([])
            elif tag == "td" and self.table:
                document.tables[self.table][-1].append("")
            if tag not in void:
                self.open.append((tag, attributes.get("id")))
                if attributes.get("id"):
                    document.texts[attributes["id"]] = ""
            if tag == "title" and any(name == "rect" for name, _ in self.open[:-1]):
                document.titles.append("")

        def handle_endtag(self, tag):
            while self.open and self.open.pop()[0] != tag:
                pass
            if tag == "table":
                self.table = None

        def handle_data(self, data):
            for _, element_id in self.open:
                if element_id:
                    document.texts[element_id] += data
            if self.table and self.open and self.open[-1][0] == "td":
                document.tables[self.table][-1][-1] += data
            if self.open and self.open[-1][0] == "title" and any(name == "rect" for name, _ in self.open):
                document.titles[-1] += data

    reader = Reader(convert_charrefs=True)
    reader.open = []
    reader.feed(dom)
    return document


@e2e
def test_dashboard_says_the_local_server_is_still_reading_the_history(tmp_path, chromium):
    """While the local server's first reading of the transcripts is under way (its QueryService's history_reading),
    /api/dashboard says how far it is, and the page says so, and that the figures are partial till it is done; then
    neither does."""
    store = ccmon.Writer(tmp_path / "ccmon.db")
    store.write(one_request_batch(1))
    reading: list[ccmon.HistoryReading | None] = [ccmon.HistoryReading(3, 929)]
    files = {path: (ROOT / name).read_bytes() for path, (name, _) in ccmon.DASHBOARD_FILES.items()}
    pages = ccmon.Dashboard(ccmon.Reader(store.path), "", ccmon.ZoneInfo("UTC"), files, "127.0.0.1",
                            lambda: reading[0]).pages()
    httpd = ccmon.OTLPHTTPServer(("127.0.0.1", 0), ccmon.Receiver(store), "", 1024 * 1024, pages=pages)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        assert dashboard_api(port)["history"] == {"files_read": 3, "files": 929, "text": "3 of 929 files"}
        status = read_document(in_browser(chromium, tmp_path, f"http://127.0.0.1:{port}/", "--dump-dom")).texts
        assert re.fullmatch(r"updated [0-9:]+( [AP]M)?; reading history: 3 of 929 files, the figures are partial until it is "
                            r"done", status["status"]), status["status"]
        reading[0] = ccmon.HistoryReading(0, 0)  # the files not listed yet
        assert dashboard_api(port)["history"]["text"] == "looking for files"
        reading[0] = None
        assert dashboard_api(port)["history"] is None
        status = read_document(in_browser(chromium, tmp_path, f"http://127.0.0.1:{port}/", "--dump-dom")).texts
        assert re.fullmatch(r"updated [0-9:]+( [AP]M)?", status["status"]), status["status"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        store.close()


@e2e
def test_dashboard_in_chromium_shows_the_servers_figures_exactly(server, chromium, tmp_path):
    seed_web_team(server)
    document = read_document(in_browser(chromium, tmp_path, f"http://127.0.0.1:{server.http_port}/?period=d",
                                        "--dump-dom"))
    assert document.texts["status"].startswith("updated ")
    client, now, utc = ccmon.Client(server.target), ccmon.now_ms(), ccmon.ZoneInfo("UTC")
    midnight, month_start, _ = ccmon.day_and_month_start(now, utc)
    today = client.stats(midnight, now).total
    assert (document.texts["today-cost"], document.texts["today-detail"]) == \
        (ccmon.format_cost(today.cost_nanos), f"{today.requests} requests, {ccmon.format_count(today.total)} tokens")
    assert document.texts["month-cost"] == ccmon.format_cost(client.stats(month_start, now).total.cost_nanos)
    period = client.stats(now - 86400_000, now).total
    assert (document.texts["period-name"], document.texts["period-cost"]) == \
        ("Last 24 hours", ccmon.format_cost(period.cost_nanos)) == ("Last 24 hours", "$1.31")
    assert document.tables["users"][1:] == [
        [u.user, str(u.sessions), ccmon.format_count(u.split.total.requests), ccmon.format_count(u.split.total.total),
         ccmon.format_count(u.split.premium.limited), ccmon.format_cost(u.split.total.cost_nanos),
         ccmon.format_percent(u.five_hour.percent) if u.five_hour else "–",
         ccmon.format_percent(u.seven_day.percent) if u.seven_day else "–"]
        for u in client.users(now - 86400_000, now)]
    assert [row[0] for row in document.tables["users"][1:]] == ["ana@example.com", "bo@example.com"]
    assert document.tables["models"][1:] == [
        [m.model, m.agent, ccmon.format_count(m.usage.requests), ccmon.format_count(m.usage.input),
         ccmon.format_count(m.usage.output), ccmon.format_count(m.usage.cache), ccmon.format_count(m.usage.total),
         ccmon.format_cost(m.usage.cost_nanos)] for m in client.models(now - 86400_000, now)]
    assert [row[0] for row in document.tables["projects"][1:]] == ["web-app", "api"]
    assert [row[7] for row in document.tables["requests"][1:]] == ["$1.25", "$0.0010", "$0.0623"]
    assert {row[2] for row in document.tables["requests"][1:]} == {"claude-code"}
    claude = client.stats(now - 86400_000, now, agent="claude-code").total
    assert document.tables["agents"][1:] == [["claude-code", "3", ccmon.format_count(claude.requests),
                                              ccmon.format_count(claude.input), ccmon.format_count(claude.output),
                                              ccmon.format_count(claude.cache), ccmon.format_count(claude.total),
                                              ccmon.format_cost(claude.cost_nanos)]]
    (limits,) = document.tables["limits"][1:]
    assert limits[:2] == ["ana@example.com", "Claude"] and limits[2].startswith("21%, resets ")
    assert limits[3] == "just now" and limits[4].startswith("63%, resets ")
    days = client.days(None, now, "UTC")
    assert len(document.titles) == 30 and document.titles[-1] == \
        f"{days[0].date}: {ccmon.format_cost(days[0].split.total.cost_nanos)}, {days[0].split.total.requests} requests"
    client.close()


class DevTools:
    """Headless Chromium driven through the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages, each
    ended by a NUL, read from its descriptor 3 and written to its descriptor 4), with the standard library alone."""

    def __init__(self, chromium: str, tmp_path: Path):
        import fcntl
        commands_read, self.commands = os.pipe()
        self.replies, replies_write = os.pipe()
        # the child's ends, above 4, to be put at 3 and 4 in the child (where one could otherwise land on the other)
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, replies_write)]
        for fd in (commands_read, replies_write):
            os.close(fd)

        def at_3_and_4():
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)

        profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-")
        self.proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-pipe", "about:blank"], preexec_fn=at_3_and_4,
                                     close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "TZ": "UTC"})
        for fd in ends:
            os.close(fd)
        self.answers: dict[int, dict] = {}
        self.events: list[dict] = []
        self.arrived = threading.Condition()
        self.next_id, self.session = 0, None
        threading.Thread(target=self._read, daemon=True).start()
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.call("Page.enable")

    def _read(self) -> None:
        pending = b""
        while chunk := os.read(self.replies, 65536):
            *messages, pending = (pending + chunk).split(b"\0")
            with self.arrived:
                for message in map(json.loads, messages):
                    if "id" in message:
                        self.answers[message["id"]] = message
                    else:
                        self.events.append(message)
                self.arrived.notify_all()

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        number = self.next_id
        message = {"id": number, "method": method, "params": params, **({"sessionId": self.session}
                                                                        if self.session else {})}
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        with self.arrived:
            assert self.arrived.wait_for(lambda: number in self.answers, 30), f"no answer to {method} in 30 s"
        answer = self.answers.pop(number)
        assert "error" not in answer, answer
        return answer["result"]

    def loaded(self, action: Callable[[], Any]) -> None:
        """Run `action` (a navigation, a form sent) and wait until the document it leads to has loaded."""
        with self.arrived:
            seen = len(self.events)
        action()
        with self.arrived:
            assert self.arrived.wait_for(lambda: any(event["method"] == "Page.loadEventFired"
                                                     for event in self.events[seen:]), 30), "the page did not load"

    def open(self, url: str) -> None:
        self.loaded(lambda: self.call("Page.navigate", url=url))

    def value(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, condition: str) -> None:
        """Until the page's document makes `condition` (a JavaScript expression) true: watched in the page, as the
        document changes."""
        assert self.value(f"""new Promise((resolve) => {{
            const met = () => {{ try {{ return Boolean({condition}); }} catch (error) {{ return false; }} }};
            if (met()) return resolve(true);
            const watch = new MutationObserver(() => {{ if (met()) {{ watch.disconnect(); resolve(true); }} }});
            watch.observe(document, {{subtree: true, childList: true, characterData: true, attributes: true}});
            setTimeout(() => resolve(met()), 20000);
        }})""") is True, f"not within 20 s: {condition}"

    def text(self, element_id: str) -> str:
        return self.value(f"document.getElementById({json.dumps(element_id)}).textContent")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        os.close(self.commands)
        os.close(self.replies)


@e2e
def test_dashboard_in_chromium_signs_in_filters_and_says_when_the_server_is_gone(tmp_path, chromium):
    srv = ServerProcess(tmp_path, env={"CCMON_TOKEN": "browser-token"}).start()
    browser = DevTools(chromium, tmp_path)
    try:
        moments = {0.5: hours_ago(0.1), 0.25: hours_ago(3)}  # cost -> time
        events = [("api_request", api_request(1, moments[0.5], cost_usd=0.5)),
                  ("api_request", api_request(2, moments[0.25], cost_usd=0.25, session="sess-2"))]
        assert sdk_export(srv.http_port, events, protocol="http/protobuf",
                          headers={"Authorization": "Bearer browser-token"}) == ["SUCCESS"]
        browser.open(f"http://127.0.0.1:{srv.http_port}/?period=d")
        assert browser.value("document.body.dataset.view") == "login"
        sign_in = "document.querySelector('input[name=token]').value = {!r}; document.querySelector('#login form')" \
                  ".submit()"
        browser.loaded(lambda: browser.value(sign_in.format("not-it")))
        assert browser.value("document.body.dataset.view") == "login-failed"
        assert browser.value("getComputedStyle(document.querySelector('.failed')).display") != "none"
        browser.loaded(lambda: browser.value(sign_in.format("browser-token")))
        assert browser.value("[document.body.dataset.view, location.pathname]") == ["dashboard", "/"]
        assert browser.value("document.cookie") == ""  # HttpOnly: no script on the page can read the sign-in
        browser.wait_for("document.getElementById('status').textContent.startsWith('updated ')")
        today = sum(cost for cost, moment in moments.items() if moment[:10] == utc_today())  # both, but after midnight
        assert (browser.text("today-cost"), browser.text("period-name"), browser.text("period-cost")) == \
            (ccmon.format_cost(round(today * 1e9)), "All time", "$0.7500")  # the sign-in leads to /: the default period
        browser.value("const select = document.getElementById('period'); select.value = 'h'; "
                      "select.dispatchEvent(new Event('change'))")
        browser.wait_for("document.getElementById('period-name').textContent === 'Last hour'")
        assert (browser.text("period-cost"), browser.value("location.search")) == ("$0.5000", "?period=h")
        srv.stop()
        browser.wait_for("document.getElementById('status').textContent.startsWith('server unreachable')")
        assert browser.text("status").startswith("server unreachable: retrying every 5 s; the figures are from ")
        assert browser.value("document.body.classList.contains('stale')") is True
        assert browser.text("period-cost") == "$0.5000"  # the last figures stay, dimmed
    finally:
        browser.close()
        if srv.proc.poll() is None:
            srv.stop()


@e2e
def test_dashboard_in_chromium_chooses_an_agent_and_shows_usage_by_agent(server, chromium, tmp_path):
    """The agent selector offers every agent ccmon knows; choosing one keeps its figures everywhere and puts it in
    the address; the By agent table and the requests' Agent column name each agent's usage."""
    seed_web_team(server)
    seed_codex_call(server, ccmon.now_ms())
    browser = DevTools(chromium, tmp_path)
    try:
        browser.open(f"http://127.0.0.1:{server.http_port}/?period=d")
        browser.wait_for("document.getElementById('status').textContent.startsWith('updated ')")
        assert browser.value("[...document.getElementById('agent').options].map((o) => [o.value, o.textContent])") \
            == [["", "every agent"], ["claude-code", "claude-code"], ["gemini-cli", "gemini-cli"], ["codex", "codex"],
                ["qwen-code", "qwen-code"]]
        rows = "[...document.querySelectorAll('#{} tbody tr')].map((row) => [...row.cells].map((c) => c.textContent))"
        assert browser.value(rows.format("agents")) == [
            ["claude-code", "3", "3", "2.01K", "2.48K", "17.2K", "21.7K", "$1.31"],
            ["codex", "1", "1", "1.00K", "200", "0", "1.20K", "$0.0110"]]
        assert [row[2] for row in browser.value(rows.format("requests"))] == \
            ["codex", "claude-code", "claude-code", "claude-code"]
        browser.value("const select = document.getElementById('agent'); select.value = 'codex'; "
                      "select.dispatchEvent(new Event('change'))")
        browser.wait_for("document.getElementById('period-cost').textContent === '$0.0110'")
        assert (browser.value("location.search"), browser.value("document.getElementById('agent').value")) == \
            ("?period=d&agent=codex", "codex")
        assert [row[0] for row in browser.value(rows.format("agents"))] == ["codex"]
        assert [row[2] for row in browser.value(rows.format("requests"))] == ["codex"]
        assert [row[:2] for row in browser.value(rows.format("limits"))] == [["ana@example.com", "Codex"]]
        assert [row[0] for row in browser.value(rows.format("models"))] == ["gpt-5.5"]
    finally:
        browser.close()


XSS = {"user": "<img src=x onerror=\"document.title='pwned-user'\">",
       "project": "</script><script>document.title='pwned-project'</script>",
       "model": "\"><svg onload=\"document.title='pwned-model'\"><b>claude</b>",
       "session": "<iframe src=\"javascript:parent.document.title='pwned-session'\"></iframe>"}


@e2e
def test_dashboard_in_chromium_shows_names_from_telemetry_as_text_and_runs_nothing(server, chromium, tmp_path):
    events = [("api_request", {**api_request(1, hours_ago(0.1), model=XSS["model"], session=XSS["session"],
                                             cost_usd=0.5), "user.email": XSS["user"]})]
    assert sdk_export(server.http_port, events, resource={**CLAUDE_RESOURCE, "project": XSS["project"]},
                      protocol="http/protobuf") == ["SUCCESS"]
    dom = in_browser(chromium, tmp_path, f"http://127.0.0.1:{server.http_port}/", "--dump-dom")
    document = read_document(dom)
    assert document.texts["status"].startswith("updated ")
    assert "<title>ccmon</title>" in dom and "pwned" not in dom.split("</title>")[0]  # no payload ran
    tags = [name for name, _ in document.tags]
    assert not {"img", "iframe", "b"} & set(tags) and tags.count("script") == 1  # no payload became an element
    assert [name for name, attributes in document.tags if name == "svg"] == ["svg"]  # the chart's alone
    assert document.tables["users"][1][0] == XSS["user"]
    assert document.tables["projects"][1][0] == XSS["project"]
    assert document.tables["models"][1][0] == XSS["model"]
    assert document.tables["requests"][1][1] == XSS["model"] and document.tables["requests"][1][9] == XSS["session"]
    assert document.tables["sessions"][1][1:3] == [XSS["user"], XSS["project"]]
    options = [attributes.get("value") for name, attributes in document.tags if name == "option"]
    assert XSS["user"] in options and XSS["project"] in options  # the filters' values, as they are


@e2e
def test_dashboard_in_chromium_without_the_token_shows_only_the_sign_in(tmp_path, chromium):
    srv = ServerProcess(tmp_path, env={"CCMON_TOKEN": "browser-token"}).start()
    try:
        response, _ = http_post(srv.http_port, body=logs_request([("api_request", api_request(
            1, hours_ago(0.1), cost_usd=0.5))]).SerializeToString(), headers={"Authorization": "Bearer browser-token"})
        assert response.status == 200
        dom = in_browser(chromium, tmp_path, f"http://127.0.0.1:{srv.http_port}/", "--dump-dom")
        document = read_document(dom)
        assert '<body data-view="login">' in dom and ("form", {"method": "post", "action": "/login"}) in document.tags
        assert "$" not in dom and document.texts["today-cost"] == "–"  # nothing fetched: no figure on the page
        api = in_browser(chromium, tmp_path, f"http://127.0.0.1:{srv.http_port}/api/dashboard", "--dump-dom")
        assert "missing or wrong token" in api and "cost" not in api
    finally:
        srv.stop()


# ---------------------------------------------------------------- Prometheus metrics: GET /metrics on the HTTP listener

def parse_exposition(text: str) -> dict[str, dict[tuple, str]]:
    """Prometheus's text format read back strictly: {metric: {sorted (label, value) pairs: sample value}}, every
    sample after its family's HELP and TYPE, label values unescaped, no sample twice."""
    families: dict[str, dict[tuple, str]] = {}
    kinds: dict[str, str] = {}
    for line in text.split("\n")[:-1]:
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in families, f"{name} twice"
            families[name] = {}
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in families and kind in ("counter", "gauge") and name not in kinds
            assert (kind == "counter") == name.endswith("_total"), name
            kinds[name] = kind
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        assert match, f"not a sample: {line!r}"
        name, body, value = match.groups()
        labels, at = [], 0
        for pair in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)', body or ""):
            assert pair.start() == at, f"unreadable labels: {body!r}"
            at = pair.end()
            labels.append((pair.group(1), re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1),
                                                 pair.group(2))))
        assert at == len(body or ""), f"unreadable labels: {body!r}"
        assert name in kinds, f"{name} before its TYPE"
        key = tuple(sorted(labels))
        assert key not in families[name], f"{name}{body} twice"
        families[name][key] = value
    return families


def scrape(port: int, headers: dict | None = None) -> dict[str, dict[tuple, str]]:
    response, data = web(port, "/metrics", headers=headers)
    assert (response.status, response.getheader("Content-Type")) == (200, "text/plain; version=0.0.4; charset=utf-8")
    return parse_exposition(data.decode())


def summed(family: dict[tuple, str], value=int, **chosen: str) -> dict:
    """A family's samples summed by the labels not chosen away: {label values of `by`...}."""
    total = 0
    for labels, text in family.items():
        if all(dict(labels).get(key) == wanted for key, wanted in chosen.items()):
            total += value(text)
    return total


HOSTILE_USER = 'eve"}\\n\n{evil="1"} 9e99\n# TYPE x counter'
LONG_PROJECT = "p" * 300


def metrics_events(now: str) -> list[tuple[str, dict]]:
    """Requests of two users (one with a hostile name) on two models, whose costs add up exactly in binary."""
    return [("api_request", {**api_request(1, now, session="s-ana", cost_usd=0.25, input_tokens=100, output_tokens=20,
                                           cache_read_tokens=3000, cache_creation_tokens=400),
                             "user.email": "ana@example.com"}),
            ("api_request", {**api_request(2, now, model="claude-opus-4-1", session="s-ana", cost_usd=1.5,
                                           input_tokens=7, output_tokens=8, cache_read_tokens=9,
                                           cache_creation_tokens=10), "user.email": "ana@example.com"}),
            ("api_request", {**api_request(3, now, session="s-eve", cost_usd=0.125, input_tokens=1, output_tokens=2,
                                           cache_read_tokens=3, cache_creation_tokens=4), "user.email": HOSTILE_USER})]


def test_metrics_equal_get_stats_with_names_escaped(server, tmp_path):
    now = hours_ago(0.1)
    assert sdk_export(server.port, metrics_events(now)[:2], resource={**CLAUDE_RESOURCE, "project": "alpha"}) == \
        ["SUCCESS"]
    assert sdk_export(server.http_port, metrics_events(now)[2:], resource={**CLAUDE_RESOURCE, "project": LONG_PROJECT},
                      protocol="http/protobuf") == ["SUCCESS"]
    assert status_line(server.target, live_input("s-ana", five_hour=91.5), cwd=tmp_path).returncode == 0
    metrics = scrape(server.http_port)
    whole = server.query().GetStats(ccmon_pb2.GetStatsRequest()).stats
    tokens = metrics["ccmon_tokens_total"]
    assert [summed(tokens, type=kind) for kind in ("input", "output", "cache_read", "cache_creation")] == \
        [whole.total_tokens.input, whole.total_tokens.output, whole.total_tokens.cache_read,
         whole.total_tokens.cache_creation] == [108, 30, 3012, 414]
    assert summed(metrics["ccmon_requests_total"]) == whole.total_requests == 3
    assert summed(metrics["ccmon_cost_usd_total"], float) == whole.total_cost.amount == 1.875
    cut = "p" * 99 + "…"
    claude = ("agent", "claude-code")
    assert metrics["ccmon_cost_usd_total"] == {
        (claude, ("model", "claude-opus-4-1"), ("project", "alpha"), ("user", "ana@example.com")): "1.5",
        (claude, ("model", "claude-sonnet-4-5"), ("project", "alpha"), ("user", "ana@example.com")): "0.25",
        (claude, ("model", "claude-sonnet-4-5"), ("project", cut), ("user", HOSTILE_USER)): "0.125"}
    for user in ("ana@example.com", HOSTILE_USER):  # per user, as GetStats answers for one
        one = server.query().GetStats(ccmon_pb2.GetStatsRequest(user=user)).stats
        assert summed(metrics["ccmon_cost_usd_total"], float, user=user) == one.total_cost.amount
        assert summed(tokens, user=user, type="input") == one.total_tokens.input
    # Claude's limits of ana's, read by her status line (the reading names the session's folder: no move, a project
    # OTEL_RESOURCE_ATTRIBUTES named wins).
    resets = {labels: float(value) for labels, value in metrics["ccmon_claude_limit_resets_timestamp_seconds"].items()}
    assert metrics["ccmon_claude_limit_used_ratio"] == {(("user", "ana@example.com"), ("window", "five_hour")): "0.915",
                                                        (("user", "ana@example.com"), ("window", "seven_day")): "0.205"}
    assert set(resets) == set(metrics["ccmon_claude_limit_used_ratio"])
    assert all(time.time() < at < time.time() + 4 * 86400 for at in resets.values())
    assert metrics["ccmon_receiver_records_accepted_total"] == {
        (("protocol", "grpc"), ("signal", "logs")): "2", (("protocol", "http/protobuf"), ("signal", "logs")): "1"}
    assert set(metrics["ccmon_receiver_records_rejected_total"].values()) == {"0"}
    assert len(metrics["ccmon_receiver_last_accepted_timestamp_seconds"]) == 2
    assert metrics["ccmon_build_info"] == {(("version", ccmon.VERSION),): "1"}
    packed, data = web(server.http_port, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert packed.getheader("Content-Encoding") == "gzip"
    assert parse_exposition(zlib.decompress(data, 31).decode())["ccmon_cost_usd_total"] == \
        metrics["ccmon_cost_usd_total"]
    assert web(server.http_port, "/metrics", headers={"Host": "evil.example"})[1] == (
        b"without a token /metrics answers only at an IP address or localhost (no web site can then reach it by a "
        b"name of its own): set server.token to scrape it by name\n")
    assert "Prometheus metrics at /metrics" in server.log


def test_metrics_show_codexs_own_limits_apart_from_claudes(server):
    """Codex's own 5-hour and weekly limits (read from its rollouts) are gauges of their own, by agent and user,
    while each window has not reset; Claude's gauges know nothing of them."""
    now = ccmon.now_ms()
    session = "01a2419c-f77d-7560-a635-0779905e56e1"
    server.query().ImportRequests(ccmon_pb2.ImportRequestsRequest(
        requests=[ccmon_pb2.ImportedRequest(session_id=session, timestamp_ms=now - 60_000, model="gpt-5.5",
                                            input_tokens=10, agent="codex")],
        user="ana@example.com", readings=[
            ccmon.reading_message(ccmon.LimitReading(session, now - 60_000, five_hour=ccmon.LimitWindow(
                12.5, now + 3600_000), seven_day=ccmon.LimitWindow(34.0, now - 1000), agent=ccmon.CODEX))]))
    metrics = scrape(server.http_port)
    assert metrics["ccmon_plan_limit_used_ratio"] == {
        (("agent", "codex"), ("user", "ana@example.com"), ("window", "five_hour")): "0.125"}  # the week has reset
    assert metrics["ccmon_plan_limit_resets_timestamp_seconds"] == {
        (("agent", "codex"), ("user", "ana@example.com"), ("window", "five_hour")): ccmon.decimal_text(now + 3600_000,
                                                                                                      3)}
    assert metrics["ccmon_claude_limit_used_ratio"] == {}


def test_metrics_exposition_escapes_and_merges_labels():
    usage = ccmon.Usage(requests=1, input=2, cost_nanos=1)
    series = [ccmon.CounterSeries("a\\b", None, "", usage),
              ccmon.CounterSeries(ccmon.OTHER_LABEL, None, "", usage),  # a user named like the overflow: summed
              ccmon.CounterSeries(None, None, "", usage),
              ccmon.CounterSeries(None, None, "", usage, "codex"),  # past the caps too, another agent's: apart
              ccmon.CounterSeries("u", "m", "x" * 101, usage),
              ccmon.CounterSeries("u", "m", "x" * 102, usage)]  # cut to the same text as the one above: summed
    text = ccmon.exposition(series, {}, [], [("m" * 120, "codex"), ("m" * 120 + "x", "qwen-code"),
                                             ("claude-sonnet-4-5", "claude-code")], {}, 0)
    assert 'ccmon_requests_total{user="a\\\\b",model="(other)",project="",agent="claude-code"} 1\n' in text
    assert 'ccmon_requests_total{user="(other)",model="(other)",project="",agent="claude-code"} 2\n' in text
    assert 'ccmon_requests_total{user="(other)",model="(other)",project="",agent="codex"} 1\n' in text
    assert f'ccmon_cost_usd_total{{user="u",model="m",project="{"x" * 99}…",agent="claude-code"}} 0.000000002\n' \
        in text
    assert 'ccmon_tokens_total{user="(other)",model="(other)",project="",agent="codex",type="input"} 2\n' in text
    assert len(parse_exposition(text)["ccmon_requests_total"]) == 4
    assert parse_exposition(text)["ccmon_model_info"] == {  # two agents' models cut to one text: one line, (other)
        (("agent", "(other)"), ("model", "(other)")): "1", (("agent", "(other)"), ("model", "m" * 99 + "…")): "1",
        (("agent", "claude-code"), ("model", "claude-sonnet-4-5")): "1"}
    assert [ccmon.decimal_text(value, 9) for value in (0, 5, 10 ** 9, 1_234_567_891, -5)] == \
        ["0", "0.000000005", "1", "1.234567891", "-0.000000005"]


def test_metrics_require_the_token(tmp_path):
    token = "s3cret-metrics-token"
    srv = ServerProcess(tmp_path, env={"CCMON_TOKEN": token}).start()
    try:
        for wrong in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic " + token},
                      {"Authorization": token}):
            response, data = web(srv.http_port, "/metrics", headers=wrong)
            assert (response.status, response.getheader("WWW-Authenticate"), data) == (
                401, 'Bearer realm="ccmon"', b"missing or wrong bearer token: give Prometheus the server's token in "
                                             b"the scrape config's authorization: credentials\n")
        right = {"Authorization": f"Bearer {token}", "Host": "ccmon.example"}  # any name, with the token
        assert scrape(srv.http_port, right)["ccmon_build_info"] == {(("version", ccmon.VERSION),): "1"}
        wait_until(lambda: "refused metrics /metrics from 127.0.0.1" in srv.log, "the refusal logged")
        assert token not in srv.log
    finally:
        srv.stop()


def test_metric_counters_survive_a_restart_and_retention(tmp_path):
    srv = ServerProcess(tmp_path).start()
    old = [("api_request", {**api_request(seq, hours_ago(24 * days), cost_usd=0.5, input_tokens=100),
                            "user.email": "ana@example.com"}) for seq, days in ((1, 10), (2, 9), (3, 1))]
    sdk_export(srv.port, old, resource={**CLAUDE_RESOURCE, "project": "alpha"})
    before = scrape(srv.http_port)
    srv.stop()
    srv.args += ["--server-retention", "7d"]
    srv.start()
    try:
        wait_until(lambda: "retention: deleted" in srv.log, "the retention sweep", 10)
        assert stats(srv).total_requests == 1  # two of the three are gone from the store...
        after = scrape(srv.http_port)
        for family in ("ccmon_requests_total", "ccmon_tokens_total", "ccmon_cost_usd_total"):
            assert after[family] == before[family]  # ...and the counters hold them still
        assert summed(after["ccmon_cost_usd_total"], float) == 1.5
        assert db_rows(srv.db, "SELECT u.name, requests, input_tokens, cost_nanos FROM retired_usage JOIN users u "
                               "ON u.id = retired_usage.user") == [("ana@example.com", 2, 200, 1_000_000_000)]
        sdk_export(srv.port, [("api_request", {**api_request(4, hours_ago(1), cost_usd=0.25, input_tokens=1),
                                               "user.email": "ana@example.com"})],
                   resource={**CLAUDE_RESOURCE, "project": "alpha"})
        assert summed(scrape(srv.http_port)["ccmon_cost_usd_total"], float) == 1.75
    finally:
        srv.stop()


UNCAPPED = {"user": 10 ** 6, "model": 10 ** 6, "project": 10 ** 6}


def counter_figures(reader: ccmon.Reader, labels: dict[str, int] = UNCAPPED,
                    most_series: int = 10 ** 6) -> dict[tuple, ccmon.Usage]:
    return {(one.user, one.model, one.project): one.usage for one in reader.counter_series(labels, most_series)}


def store_operations(st, moments, sessions, row, writes=("write",)):
    """What happens to a store, as a hypothesis strategy of (kind, payload): telemetry `row`s written (as each of
    `writes`), transcripts imported (which telemetry of the same request_id replaces), projects named late, status
    line readings naming a folder, retention sweeps."""
    imported = st.tuples(moments, sessions, st.integers(min_value=100, max_value=120),
                         st.just("claude-sonnet-4-5"), st.just(""), *[st.integers(min_value=0, max_value=10 ** 6)] * 6,
                         st.none(), st.none(), st.sampled_from(["req_1", "req_2", "req_3"]), st.none(), st.none(),
                         st.sampled_from([2, 3]), st.just("claude-code"))
    return st.one_of(st.tuples(st.sampled_from(writes), st.lists(row, min_size=1, max_size=8)),
                     st.tuples(st.just("import"), st.lists(imported, min_size=1, max_size=8)),
                     st.tuples(st.just("name"), st.tuples(sessions, st.sampled_from(["alpha", "beta"]))),
                     st.tuples(st.just("read"), st.tuples(sessions, st.sampled_from(["/w/alpha", "/w/gamma"]))),
                     st.tuples(st.just("sweep"), moments))


def run_store_operation(store: ccmon.Writer, kind: str, payload, base: int) -> None:
    """One of store_operations (a status line reading taken at `base`)."""
    if kind == "write":
        store.write(ccmon.Batch(requests=[r if r[-2] == 0 else r[:13] + (None,) + r[14:]
                                          for r in payload]))  # metric usage has no request_id
    elif kind == "import":
        store.import_requests(list(payload), {}, "importer@example.com")
    elif kind == "name":
        store.write(ccmon.Batch(projects={payload[0]: payload[1]}))
    elif kind == "read":
        store.record_reading(ccmon.LimitReading(payload[0], base, project=payload[1]))
    else:
        store.sweep(payload)


@pytest.mark.parametrize("staged", [False, True])
def test_metric_counters_never_go_down(tmp_path, monkeypatch, staged):
    """Random telemetry, metric-derived usage, imports, telemetry replacing imported copies at another cost and
    user, projects named late, retention sweeps: after each, no counter series is lower than before, and the
    counters less what was retired are the stored rows. Staged: telemetry of 2 requests or more waits in the log
    until the next job or read (see STAGE_MIN_REQUESTS)."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    store, reader = writer_and_reader(tmp_path / "counters.db", monkeypatch, 2 if staged else None)
    base = ccmon.parse_iso_ms("2026-03-01T00:00:00Z")
    moments = st.integers(min_value=base, max_value=base + 10 * 86400_000)
    sessions = st.sampled_from(["s1", "s2", "s3"])
    row = st.tuples(moments, sessions, st.integers(min_value=0, max_value=20),
                    st.sampled_from(["claude-sonnet-4-5", "claude-opus-4-1"]),
                    st.sampled_from(["ana@example.com", "bo@example.com"]),
                    *[st.integers(min_value=0, max_value=10 ** 6)] * 6, st.none(), st.none(),
                    st.sampled_from([None, "req_1", "req_2", "req_3"]), st.none(), st.none(), st.sampled_from([0, 1]),
                    st.just("claude-code"))

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(store_operations(st, moments, sessions, row), min_size=1, max_size=8))
    def check(operations):
        for kind, payload in operations:
            before, capped_before = counter_figures(reader), counter_figures(reader, {"user": 1, "model": 1,
                                                                                     "project": 1}, 2)
            run_store_operation(store, kind, payload, base)
            after, capped_after = counter_figures(reader), counter_figures(reader, {"user": 1, "model": 1,
                                                                                   "project": 1}, 2)
            for was_then, now_then in ((before, after), (capped_before, capped_after)):
                for key, figures in was_then.items():
                    assert all(now >= was for now, was in zip(dataclasses.astuple(now_then.get(key, ccmon.Usage())),
                                                              dataclasses.astuple(figures))), (kind, key)
            assert sum(capped_after.values(), ccmon.Usage()) == sum(after.values(), ccmon.Usage())
            # Every stored series has its number (none was missed): none can leave (other) later.
            assert db_rows(store.path, EVERY_SERIES_NUMBERED) == [(0,)]
            retired = db_rows(store.path, f"SELECT {', '.join(f'SUM({c})' for c in ccmon.SERIES_FIGURES)} "
                                          "FROM retired_usage")[0]
            stored = ccmon.Usage(*db_rows(store.path, f"SELECT {ccmon.RAW_SUMS} FROM requests")[0])
            counted = sum(after.values(), ccmon.Usage())
            assert dataclasses.astuple(counted) == tuple(
                (s or 0) + (r or 0) for s, r in zip(dataclasses.astuple(stored), retired))

    check()
    store.close()


EVERY_SERIES_NUMBERED = ("SELECT COUNT(*) FROM (SELECT su.user, su.model, COALESCE(p.id, 0) FROM session_usage su "
                         "JOIN sessions s ON s.id = su.session LEFT JOIN projects p ON p.name = s.project UNION "
                         "SELECT user, model, project FROM retired_usage EXCEPT SELECT user, model, project FROM "
                         "metric_series)")


# What a store holds, in names: the rows, each session's usage and user, the rollups, the sessions' projects. Not
# the counters' retired usage and series numbers: those follow the states the store went through, and batches
# applied together skip some (the metric-derived usage replaced, the project a session had while its rows
# waited); test_metric_counters_never_go_down holds the counters to their rules with batches waiting too.
STORED_STATE = [
    "SELECT ts, session_id, seq, model_name, user_name, input_tokens, output_tokens, cache_read_tokens, "
    "cache_creation_tokens, cost_nanos, duration_ms, prompt_id, request_id, origin FROM r ORDER BY 1, 2, 3",
    f"SELECT s.session_id, m.name, u.name, su.first_ts, su.last_ts, {', '.join(ccmon.FIGURES)} FROM session_usage su "
    "JOIN sessions s ON s.id = su.session JOIN models m ON m.id = su.model JOIN users u ON u.id = su.user ORDER BY 1, 2",
    *(f"SELECT bucket, m.name{', u.name' if by_user else ''}, {', '.join(ccmon.FIGURES)} FROM {table} t JOIN models m ON "
      f"m.id = t.model{' JOIN users u ON u.id = t.user' if by_user else ''} ORDER BY 1, 2{', 3' if by_user else ''}"
      for table, by_user in (("usage_rollup", True), ("usage_daily", True), ("total_hourly", False),
                             ("total_daily", False))),
    "SELECT session_id, project FROM sessions ORDER BY 1"]


def test_a_batch_waiting_to_be_applied_is_stored_as_it_would_be_at_once(tmp_path, monkeypatch):
    """Whatever comes before and after it (other batches, metric-derived usage, imports and the telemetry that
    replaces their copies, projects named late, status line readings, retention sweeps), a batch of Claude Code's
    api_request events that waits in the log (see STAGE_MIN_REQUESTS) leaves the database as the same
    batch stored at once does: the same rows, sessions' usage, users and projects, and rollups."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    monkeypatch.setattr(ccmon, "APPLY_IDLE_S", 3600)  # applied before the next job or read, not when idle
    monkeypatch.setattr(ccmon, "STAGE_MIN_SPAN_MS", 0)
    staged, direct = ccmon.Writer(tmp_path / "staged.db"), ccmon.Writer(tmp_path / "direct.db")
    base = ccmon.parse_iso_ms("2026-03-01T00:00:00Z")
    moments = st.integers(min_value=base, max_value=base + 10 * 86400_000)
    sessions = st.sampled_from(["s1", "s2", "s3"])  # each of one user: its user is its latest row's
    user_of = {"s1": "ana@example.com", "s2": "bo@example.com", "s3": "ana@example.com"}
    hours = st.integers(min_value=0, max_value=48).map(lambda hour: base + hour * 3600_000)  # keys sent again
    row = st.tuples(hours, sessions, st.integers(min_value=0, max_value=50),
                    st.sampled_from(["claude-sonnet-4-5", "claude-opus-4-1"]), st.just(""),
                    *[st.integers(min_value=0, max_value=10 ** 6)] * 6, st.none(), st.sampled_from([None, "p1"]),
                    st.sampled_from([None, "req_1", "req_2", "req_3"]), st.none(), st.none(), st.sampled_from([0, 1]),
                    st.just("claude-code")).map(lambda r: (*r[:4], user_of[r[1]], *r[5:]))

    def run(store: ccmon.Writer, kind: str, payload) -> None:
        if kind == "resend":  # api_request events (which may wait; the export naming a project for a session of
            # them, perhaps new), then the same keys with other figures: the first sent is stored
            events = [(*r[:16], ccmon.ORIGIN_EVENT, r[17]) for r in payload]
            store.write(ccmon.Batch(requests=events, projects={events[-1][1]: "gamma"}))
            store.write(ccmon.Batch(requests=[(*r[:5], r[5] + 1, *r[6:]) for r in events]))
        else:
            run_store_operation(store, kind, payload, base)

    waited = []  # the requests waiting after each operation

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(store_operations(st, moments, sessions, row, ("write", "resend")), min_size=1, max_size=8))
    def check(operations):
        for kind, payload in operations:
            for store, least in ((staged, 2), (direct, 10 ** 9)):
                monkeypatch.setattr(ccmon, "STAGE_MIN_REQUESTS", least)
                run(store, kind, payload)
            waited.append(staged.waiting)
        staged.catch_up()
        for sql in STORED_STATE:
            assert db_rows(staged.path, sql) == db_rows(direct.path, sql), sql
        assert staged.waiting == 0

    try:
        check()
        assert sum(waited) > 0
    finally:
        staged.close()
        direct.close()


def test_other_agents_metrics_sessions_and_turn_costs_keep_the_counters(server):
    """Another agent's usage from metrics naming no session (its metrics session) is numbered as it appears; its
    calls replacing that usage, and Codex's own turn cost replacing ccmon's estimate, never lower a counter."""
    reader = ccmon.Reader(server.db)

    def step(send: Callable[[], Any]) -> None:
        before = counter_figures(reader)
        send()
        after = counter_figures(reader)
        for key, figures in before.items():
            assert all(now >= was for now, was in zip(dataclasses.astuple(after.get(key, ccmon.Usage())),
                                                      dataclasses.astuple(figures))), key
        assert db_rows(server.db, EVERY_SERIES_NUMBERED) == [(0,)]

    metrics = metrics_service_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(server.target))
    base = ccmon.parse_iso_ms(hours_ago(5))
    step(lambda: metrics.Export(codex_token_metrics(base, 1000)))
    assert db_rows(server.db, "SELECT COUNT(*) FROM metric_series") == [(1,)]
    step(lambda: server.logs_stub().Export(agent_logs_request(  # replaces what the metrics counted
        [codex_response(ccmon.iso_from_ms(base + 30 * 60_000), "c-1", model="gpt-5.6-sol")],
        {"service.name": "codex_exec"})))  # (another model: the metrics' series loses what they counted)
    assert db_rows(server.db, "SELECT SUM(input_tokens) FROM retired_usage") == [(400,)]
    for export in agent_capture("codex-0.169.0", "grpc"):  # its turn costs replace ccmon's estimates
        step(lambda: replay(server, [export]))
    assert db_rows(server.db, "SELECT SUM(cost_nanos) > 0 FROM retired_usage") == [(1,)]


# What schemas 13 to 17 added (see total_everyone), dropped: a database written now, as a release before it left it.
# Back to version 12 from the current schema: no totals, and usage_rollup kept by its triggers again.
VERSIONS_13_TO_17_UNDONE = (f"DROP TABLE total_hourly; DROP TABLE total_daily; {ccmon.usage_triggers(ccmon.V8_FIGURES)} "
                            "CREATE INDEX requests_session_request ON requests(session, request_id) WHERE "
                            "request_id IS NOT NULL; DROP TABLE pending_requests; DROP TABLE waiting_log;")


def test_schema_9_numbers_projects_in_the_order_sessions_named_them(tmp_path):
    """A schema-8 database (as the release before wrote it) is upgraded with a backup: its projects get ids in the
    order of the sessions that named them, and no counter has anything retired yet."""
    db = tmp_path / "eight.db"
    store = ccmon.Writer(db)
    at = ccmon.parse_iso_ms("2026-03-01T00:00:00Z")
    for number, project in enumerate(["beta", "alpha", "beta", "gamma"]):
        store.write(ccmon.Batch(requests=[(at + number, f"s{number}", 1, "claude-sonnet-4-5", "ana@example.com",
                                           1, 0, 0, 0, 1000, 0, None, None, None, None, None, 0, "claude-code")],
                                projects={f"s{number}": project}))
    store.close()
    with sqlite3.connect(db) as conn:
        conn.executescript(f"{VERSIONS_13_TO_17_UNDONE} DROP TABLE metric_series; DROP INDEX limit_readings_agent; "
                           "DROP TRIGGER projects_named; DROP TABLE projects; "
                           "DROP TABLE retired_usage; ALTER TABLE limit_readings DROP COLUMN agent; "
                           "PRAGMA user_version = 8;")
    conn.close()
    store = ccmon.Writer(db)
    try:
        assert (tmp_path / "eight.db.v8.bak").exists()
        assert db_rows(db, "SELECT id, name FROM projects") == [(1, "beta"), (2, "alpha"), (3, "gamma")]
        assert db_rows(db, "SELECT COUNT(*) FROM retired_usage") == [(0,)]
        series = ccmon.Reader(db).counter_series({"user": 1, "model": 1, "project": 2}, 10)
        assert {one.project: one.usage.cost_nanos for one in series} == {"beta": 2000, "alpha": 1000, None: 1000}
    finally:
        store.close()

def test_a_counter_loses_a_removed_row_once_however_many_changes_a_transaction_holds(tmp_path):
    """session_usage is summed from the rows a transaction changed when the writer reads it: a second change in the
    same transaction sees the first's removal already, so what left a counter series is retired once."""
    store = ccmon.Writer(tmp_path / "ccmon.db")
    at = ccmon.parse_iso_ms("2026-03-01T00:00:00Z")
    try:
        store.write(ccmon.Batch(requests=[(at + n, "s1", n, "claude-sonnet-4-5", "ana@example.com", 1, 0, 0, 0,
                                           1000 * (n + 1), 0, None, None, None, None, None, 0, "claude-code")
                                          for n in range(2)]))

        def two_changes(conn: sqlite3.Connection) -> None:
            session = conn.execute("SELECT id FROM sessions WHERE session_id = 's1'").fetchone()[0]
            with ccmon.counters_kept(conn, {session}):
                conn.execute("DELETE FROM requests WHERE seq = 1")
            with ccmon.counters_kept(conn, {session}):
                pass

        store.submit(two_changes).result()
    finally:
        store.close()
    assert db_rows(tmp_path / "ccmon.db", "SELECT rows, cost_nanos FROM session_usage") == [(1, 1000)]
    assert db_rows(tmp_path / "ccmon.db", "SELECT requests, cost_nanos FROM retired_usage") == [(1, 2000)]


def test_metric_labels_are_capped_and_keep_their_series(tmp_path):
    """The first users, models and projects by id get labels; later ones are summed under (other), and a label
    once given is kept (adding users never moves a series)."""
    store, reader = ccmon.Writer(tmp_path / "labels.db"), ccmon.Reader(tmp_path / "labels.db")
    at = ccmon.parse_iso_ms("2026-03-01T00:00:00Z")

    def write(number: int) -> None:
        store.write(ccmon.Batch(requests=[(at + number, f"s{number}", 1, f"model-{number % 4}", f"user-{number}",
                                           1, 0, 0, 0, 1000, 0, None, None, None, None, None, 0, "claude-code")],
                                projects={f"s{number}": f"project-{number}"}))

    labels = {"user": 3, "model": 2, "project": 3}
    for number in range(3):
        write(number)
    first = {(one.user, one.model, one.project): one.usage.cost_nanos for one in reader.counter_series(labels, 10 ** 6)}
    assert first == {("user-0", "model-0", "project-0"): 1000, ("user-1", "model-1", "project-1"): 1000,
                     ("user-2", None, "project-2"): 1000}
    for number in range(3, 40):
        write(number)
    grown = {(one.user, one.model, one.project): one.usage.cost_nanos for one in reader.counter_series(labels, 10 ** 6)}
    assert {key: grown[key] for key in first} == first  # every series kept its labels and its figures
    assert {key: cost for key, cost in grown.items() if key not in first} == {
        (None, None, None): 19 * 1000, (None, "model-0", None): 9 * 1000, (None, "model-1", None): 9 * 1000}
    assert reader.first_users(2) == ["user-0", "user-1"]
    store.close()


def write_series(store: ccmon.Writer, at: int, number: int, session: str | None = None, user: str | None = None,
                 model: str | None = None, agent: str = "claude-code") -> None:
    """One request of 1000 nanodollars in a user, model and project of its own (numbered), or of a given session,
    user and model; Claude Code's, or another agent's."""
    store.write(ccmon.Batch(requests=[(at + number, session or f"s{number}", number, model or f"model-{number}",
                                       user or f"user-{number}", 1, 0, 0, 0, 1000, 0, None, None, None, None, None,
                                       0, agent)],
                            projects={} if session else {f"s{number}": f"project-{number}"}))


def test_metric_series_are_capped_in_the_order_they_occur(tmp_path):
    """One client sending a new user, model and project with every request: only the first series get labels, the
    others are summed under (other) in all three; a series that occurs later for an old session (a new latest user)
    is numbered after them, and the first ones keep their labels and figures."""
    store, reader = ccmon.Writer(tmp_path / "series.db"), ccmon.Reader(tmp_path / "series.db")
    at = ccmon.parse_iso_ms("2026-03-01T00:00:00Z")
    for number in range(6):
        write_series(store, at, number)
    named = {(f"user-{n}", f"model-{n}", f"project-{n}"): ccmon.Usage(requests=1, input=1, cost_nanos=1000)
             for n in range(3)}
    assert counter_figures(reader, UNCAPPED, 3) == {
        **named, (None, None, None): ccmon.Usage(requests=3, input=3, cost_nanos=3000)}
    write_series(store, at, 100, session="s0", user="user-9", model="model-0")  # s0's usage moves to user-9
    assert counter_figures(reader, UNCAPPED, 3) == {
        **named, (None, None, None): ccmon.Usage(requests=5, input=5, cost_nanos=5000)}
    assert db_rows(store.path, "SELECT ms.id, u.name FROM metric_series ms JOIN users u ON u.id = ms.user") == [
        (1, "user-0"), (2, "user-1"), (3, "user-2"), (4, "user-3"), (5, "user-4"), (6, "user-5"), (7, "user-9")]
    assert len(counter_figures(reader, UNCAPPED, ccmon.METRICS_SERIES)) == 7
    store.close()


def test_metric_series_past_the_caps_keep_their_agent(tmp_path):
    """Usage past the caps is summed under (other) per agent (its model's): `sum by (agent)` gives each agent's
    usage exactly, as the store's reads of that agent do, however few labels the caps leave."""
    store, reader = ccmon.Writer(tmp_path / "agents.db"), ccmon.Reader(tmp_path / "agents.db")
    at = ccmon.parse_iso_ms("2026-03-01T00:00:00Z")
    for number, agent in enumerate(["claude-code", "codex", "claude-code", "qwen-code", "codex", "gemini-cli"]):
        write_series(store, at, number, agent=agent)
    write_series(store, at, 6, session="s1", user="user-1", model="model-1")  # Codex's model: Codex's usage
    series = reader.counter_series({"user": 1, "model": 1, "project": 1}, 2)
    assert {(one.agent, one.user, one.model, one.project): one.usage.cost_nanos for one in series} == {
        ("claude-code", "user-0", "model-0", "project-0"): 1000, ("claude-code", None, None, None): 1000,
        ("codex", None, None, None): 3000,  # the second series (user and model past their caps), and those past it
        ("gemini-cli", None, None, None): 1000, ("qwen-code", None, None, None): 1000}
    assert len(series) == 5
    metrics = parse_exposition(ccmon.exposition(series, {}, [], reader.first_models(1), {}, at))
    assert {labels: value for labels, value in metrics["ccmon_requests_total"].items()
            if ("user", "(other)") in labels} == {
        (("agent", agent), ("model", "(other)"), ("project", "(other)"), ("user", "(other)")): requests
        for agent, requests in (("claude-code", "1"), ("codex", "3"), ("gemini-cli", "1"), ("qwen-code", "1"))}
    for agent in ccmon.AGENTS:
        stored = sum(reader.usage(at, at + 3600_000, agent=agent).values(), ccmon.Usage())
        assert summed(metrics["ccmon_cost_usd_total"], lambda text: round(float(text) * 10 ** 9), agent=agent) == \
            stored.cost_nanos, agent
        assert summed(metrics["ccmon_tokens_total"], agent=agent, type="input") == stored.input, agent
        assert summed(metrics["ccmon_requests_total"], agent=agent) == stored.requests, agent
    assert metrics["ccmon_model_info"] == {(("agent", "claude-code"), ("model", "model-0")): "1",
                                           (("agent", "(other)"), ("model", "(other)")): "1"}
    store.close()


def test_schema_11_numbers_the_stored_series_by_their_ids(tmp_path):
    """A schema-10 database is upgraded with a backup: the series it holds (stored and retired) are numbered by
    user, model and project id, and a series that occurs later is numbered after them."""
    db = tmp_path / "ten.db"
    store = ccmon.Writer(db)
    at = ccmon.parse_iso_ms("2026-03-01T00:00:00Z")
    for number in (2, 0, 1):
        write_series(store, at, number)
    store.close()
    with sqlite3.connect(db) as conn:
        conn.executescript(f"{VERSIONS_13_TO_17_UNDONE} DROP TABLE metric_series; DROP INDEX limit_readings_agent; "
                           "PRAGMA user_version = 10;")
    conn.close()
    store = ccmon.Writer(db)
    try:
        assert (tmp_path / "ten.db.v10.bak").exists()
        write_series(store, at, 3)
        assert db_rows(db, "SELECT ms.id, u.name, m.name, p.name FROM metric_series ms JOIN users u ON u.id = ms.user "
                           "JOIN models m ON m.id = ms.model JOIN projects p ON p.id = ms.project") == [
            (1, "user-2", "model-2", "project-2"), (2, "user-0", "model-0", "project-0"),
            (3, "user-1", "model-1", "project-1"), (4, "user-3", "model-3", "project-3")]
    finally:
        store.close()


@pytest.fixture(scope="session")
def prometheus() -> tuple[str, str]:
    """Debian's Prometheus and its promtool."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if None in found:
        pytest.fail("the metrics tests need Prometheus: apt-get install -y prometheus (README, Development)")
    return found


def prometheus_api(port: int, path: str, **query: str):
    """The data of one answer of Prometheus's HTTP API."""
    import urllib.request
    from urllib.parse import urlencode
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}?{urlencode(query)}", timeout=10) as reply:
        answer = json.loads(reply.read())
    assert answer["status"] == "success", answer
    return answer["data"]


@e2e
def test_a_real_prometheus_scrapes_the_exact_totals(prometheus, tmp_path):
    """Prometheus scrapes a real server with its token; PromQL gives back GetStats' cost and tokens exactly, the
    hostile and long names as they were sent (the long one cut), and promtool finds the exposition clean."""
    token = "s3cret-scrape-token"
    srv = ServerProcess(tmp_path, env={"CCMON_TOKEN": token}).start()
    now, metadata = hours_ago(0.1), {"authorization": f"Bearer {token}"}
    sdk_export(srv.port, metrics_events(now)[:2], resource={**CLAUDE_RESOURCE, "project": "alpha"}, headers=metadata)
    sdk_export(srv.port, metrics_events(now)[2:], resource={**CLAUDE_RESOURCE, "project": LONG_PROJECT},
               headers=metadata)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ccmon", "scrape_interval": "1s", "authorization": {"credentials": token},
                            "static_configs": [{"targets": [f"127.0.0.1:{srv.http_port}"]}]}]}))
    server = subprocess.Popen([prometheus[0], f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        def scraped() -> bool:
            with contextlib.suppress(OSError):
                targets = prometheus_api(port, "targets")["activeTargets"]
                return bool(targets) and targets[0]["health"] == "up"
            return False

        wait_until(scraped, "Prometheus's first good scrape", 60)
        whole = srv.query().GetStats(ccmon_pb2.GetStatsRequest(), metadata=tuple(metadata.items())).stats

        def value(promql: str) -> dict:
            return {tuple(sorted(found["metric"].items())): found["value"][1]
                    for found in prometheus_api(port, "query", query=promql)["result"]}

        assert value("sum(ccmon_cost_usd_total)") == {(): repr(whole.total_cost.amount)} == {(): "1.875"}
        assert value("sum by (type) (ccmon_tokens_total)") == {
            (("type", "input"),): str(whole.total_tokens.input), (("type", "output"),): str(whole.total_tokens.output),
            (("type", "cache_read"),): str(whole.total_tokens.cache_read),
            (("type", "cache_creation"),): str(whole.total_tokens.cache_creation)}
        assert value("sum(ccmon_requests_total)") == {(): str(whole.total_requests)}
        by_user = value("sum by (user, project) (ccmon_cost_usd_total)")
        assert by_user == {(("project", "alpha"), ("user", "ana@example.com")): "1.75",
                           (("project", "p" * 99 + "…"), ("user", HOSTILE_USER)): "0.125"}
        # Figures by agent: the counters' agent label, as GetStats answers for one agent (and the join with
        # ccmon_model_info on model that queries written before the label use still agrees)
        srv.logs_stub().Export(agent_logs_request([codex_response(now, "c-1")], {"service.name": "codex_exec"}),
                               metadata=tuple(metadata.items()))
        codex = srv.query().GetStats(ccmon_pb2.GetStatsRequest(agent="codex"), metadata=tuple(metadata.items())).stats
        by_agent = "sum by (agent) (ccmon_cost_usd_total)"
        wait_until(lambda: len(value(by_agent)) == 2, "the scrape after Codex's export", 60)
        assert value(by_agent) == {(("agent", "claude-code"),): "1.875",
                                   (("agent", "codex"),): repr(codex.total_cost.amount)} \
            == value("sum by (agent) (ccmon_cost_usd_total * on (model) group_left (agent) ccmon_model_info)")
        assert codex.total_cost.amount > 0 and codex.total_requests == 1
        assert value("sum by (agent) (ccmon_requests_total)") == {(("agent", "claude-code"),): "3",
                                                                  (("agent", "codex"),): "1"}
        assert value('sum by (type) (ccmon_tokens_total{agent="codex"})') == {
            (("type", kind),): str(getattr(codex.total_tokens, kind))
            for kind in ("input", "output", "cache_read", "cache_creation")}
        _, exposed = web(srv.http_port, "/metrics", headers={"Authorization": f"Bearer {token}"})
        check = subprocess.run([prometheus[1], "check", "metrics"], input=exposed, capture_output=True, timeout=60)
        assert (check.returncode, check.stdout, check.stderr) == (0, b"", b"")
    finally:
        server.terminate()
        server.wait(30)
        srv.stop()


@e2e
def test_the_prometheus_docs_queries_and_alerting_rule_are_valid(prometheus, tmp_path):
    """docs/prometheus.md: every PromQL line parses, and its alerting rule passes promtool check rules."""
    text = (ROOT / "docs" / "prometheus.md").read_text()
    queries = [line.split("   #")[0].strip() for block in re.findall(r"```promql\n(.*?)```", text, re.S)
               for line in block.splitlines() if line.strip()]
    assert len(queries) == 9
    (rules := tmp_path / "rules.yml").write_text(re.findall(r"```yaml\n(groups:.*?)```", text, re.S)[0])
    (recorded := tmp_path / "queries.yml").write_text(json.dumps({"groups": [{"name": "docs", "rules": [
        {"record": f"docs:query{number}", "expr": query} for number, query in enumerate(queries)]}]}))
    check = subprocess.run([prometheus[1], "check", "rules", str(rules), str(recorded)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 1 rules found" in check.stdout and f"SUCCESS: {len(queries)} rules found" in check.stdout


# ---------------------------------------------------------------- monitor: view model and pure render functions

def test_formatting():
    assert [ccmon.format_count(n) for n in (0, 950, 999, 1000, 1234, 12_345, 123_456, 999_499, 999_500,
                                            4_560_000, 1_200_000_000)] == \
        ["0", "950", "999", "1.00K", "1.23K", "12.3K", "123K", "999K", "1.00M", "4.56M", "1.20B"]
    assert [ccmon.format_cost(n) for n in (0, 1, 42_100_000, 999_990_000, 12_345_678_901, 1_234_567_000_000)] == \
        ["$0.00", "<$0.0001", "$0.0421", "$1.00", "$12.35", "$1,234.57"]
    assert [ccmon.format_duration(ms) for ms in (850, 1500, 45_000, 12 * 60_000, 65 * 60_000)] == \
        ["850ms", "1.5s", "45s", "12m", "1h05m"]
    assert ccmon.short_model("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert [ccmon.short_user(name) for name in ("3f" * 32, "ana@example.com", "4b1a0c7e-uuid-like-but-not-hex-x", "")] \
        == ["3f3f3f3f3f~", "ana@example.com", "4b1a0c7e-uuid-like-but-not-hex-x", ""]
    assert [ccmon.table_cell("user", name, False) for name in ("", "3f" * 32)] == ["-", "3f3f3f3f3f~"]


def _settings(block_hour=5, limit=35_000):
    return ccmon.MonitorSettings("127.0.0.1:4317", BERLIN, block_hour, limit, 5)


def test_keys():
    settings = _settings()
    state = ccmon.ViewState()
    frame = ccmon.Frame([], page_rows=10, total_rows=100)
    for key, period in (("h", "h"), ("d", "d"), ("w", "w"), ("m", "m"), ("b", "b"), ("a", "a")):
        state, action = ccmon.handle_key(state, key, settings, frame)
        assert (state.period, action) == (period, "refresh")
    state, action = ccmon.handle_key(state, "o", settings, frame)
    assert state.oldest_first and action == "refresh"
    state, _ = ccmon.handle_key(state, "KEY_NPAGE", settings, frame)
    state, _ = ccmon.handle_key(state, "j", settings, frame)
    assert state.scroll == 11
    state, _ = ccmon.handle_key(state, "KEY_END", settings, frame)
    assert state.scroll == 90
    state, action = ccmon.handle_key(state, "KEY_DOWN", settings, frame)
    assert state.scroll == 90 and action == ""
    state, _ = ccmon.handle_key(state, "KEY_HOME", settings, frame)
    state, _ = ccmon.handle_key(state, "k", settings, frame)
    assert state.scroll == 0
    state, action = ccmon.handle_key(state, "\t", settings, frame)
    assert (state.tab, action) == ("daily", "refresh")
    state, _ = ccmon.handle_key(state, "KEY_BTAB", settings, frame)
    assert state.tab == "current"
    state, _ = ccmon.handle_key(state, "?", settings, frame)
    assert state.help
    state, action = ccmon.handle_key(state, "x", settings, frame)
    assert not state.help and action == ""
    assert ccmon.handle_key(state, "q", settings, frame)[1] == "quit"
    assert ccmon.handle_key(state, "^C", settings, frame)[1] == "quit"
    off, action = ccmon.handle_key(state, "b", _settings(block_hour=None), frame)
    assert off.period == state.period and off.notice == "block tracking is off: start ccmon with -b auto"


def _frame_fixture():
    settings = _settings()
    now = local_ms("2026-03-10 10:30")
    usage = ccmon.Usage
    period = ccmon.Split(usage(4, 2000, 800, 10000, 500, 4_000_000),
                         usage(12, 9000, 6000, 250000, 12000, 1_234_567_890))
    block = ccmon.Split(usage(1, 100, 50, 0, 0, 1000), usage(8, 14000, 7000, 0, 0, 5))
    limits = ccmon.LimitFigures(ccmon.current_block(now, settings.zone, 5), block, 700.0, 35_000, None,
                                {"haiku": usage(1, 100, 50), "sonnet": usage(8, 14000, 7000, 0, 0, 5)})
    models = ["claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001", "claude-opus-4-1-20250805"] * 4
    rows = tuple(ccmon.ApiRequest(now - k * 7 * 60_000, model, f"{k:04d}abcd-ef",
                                  usage(1, 1000 + k, 200 * k, 30000, 0, 12_345_000 * k + 1, 1500 * k))
                 for k, model in enumerate(models))
    query = ccmon.query_for(ccmon.ViewState(period="b"), settings, now)
    return ccmon.Snapshot(query, now, 500, limits, data=ccmon.CurrentRequests(period, ccmon.RequestsPage(rows, 12))), \
        settings, now


def daily_snapshot(settings, now):
    query = ccmon.query_for(ccmon.ViewState(tab="daily"), settings, now)
    days = tuple(ccmon.DayUsage(f"2026-03-{10 - k:02d}", ccmon.Split(ccmon.Usage(k, 10 * k), ccmon.Usage(
        3 * k, 1000 * k, 500 * k, 20000 * k, 700 * k, 250_000_000 * k))) for k in range(10))
    block = ccmon.Split(ccmon.Usage(), ccmon.Usage(8, 14000, 7000))
    limits = ccmon.LimitFigures(ccmon.current_block(now, settings.zone, 5), block, 700.0, 35_000, None, {})
    return ccmon.Snapshot(query, now, 500, limits, data=days)


def line_text(line) -> str:
    """A rendered line's text without its styles."""
    return "".join(text for text, _ in line)


def frame_text(state, snap, settings, width, height, now, status=None, unicode=False):
    frame = ccmon.render(state, status or ccmon.ServerStatus(True, attempts=1), snap,
                         ccmon.Screen(settings, width, height, now, ccmon.Glyphs.for_terminal(unicode)))
    return [line_text(line) for line in frame.lines], frame


FRAME_80x24 = [
    ' ccmon - Claude Code usage monitor                                       v0.1.0 ',
    '  1 Now   2 Day   3 Mod   4 Ses   5 Tool   6 User   7 Blk   8 Proj   9 Cht  ',
    ' * connected 127.0.0.1:4317 | current block | newest first | updated 10:30:00',
    '-- Usage - current block -------------------------------------------------------',
    '         Requests  Limited    Cache    Total       Cost   Avg rate',
    'Base            4    2.80K    10.5K    13.3K    $0.0040          -',
    'Premium        12    15.0K     262K     277K      $1.23    500/min',
    'Total          16    17.8K     272K     290K      $1.24          -',
    'Block       ##########......  60%  21.0K / 35.0K, 4h30m left (ends 15:00)',
    'Recent pace 700/min; at this pace the limit is reached at 10:50',
    'Week        21.0K premium tokens, <$0.0001 (sonnet 21.0K)',
    '-- Requests 1-10 of 12 ---------------------------------------------------------',
    'Time     Model        Input  Output   Cache   Total      Cost    Dur Session    ',
    '10:30:00 sonnet-4-5   1.00K       0   30.0K   31.0K  <$0.0001    0ms 0000abcd-ef',
    '10:23:00 haiku-4-5    1.00K     200   30.0K   31.2K   $0.0123   1.5s 0001abcd-ef',
    '10:16:00 opus-4-1     1.00K     400   30.0K   31.4K   $0.0247   3.0s 0002abcd-ef',
    '10:09:00 sonnet-4-5   1.00K     600   30.0K   31.6K   $0.0370   4.5s 0003abcd-ef',
    '10:02:00 haiku-4-5    1.00K     800   30.0K   31.8K   $0.0494   6.0s 0004abcd-ef',
    '09:55:00 opus-4-1     1.00K   1.00K   30.0K   32.0K   $0.0617   7.5s 0005abcd-ef',
    '09:48:00 sonnet-4-5   1.01K   1.20K   30.0K   32.2K   $0.0741   9.0s 0006abcd-ef',
    '09:41:00 haiku-4-5    1.01K   1.40K   30.0K   32.4K   $0.0864    10s 0007abcd-ef',
    '09:34:00 opus-4-1     1.01K   1.60K   30.0K   32.6K   $0.0988    12s 0008abcd-ef',
    '09:27:00 sonnet-4-5   1.01K   1.80K   30.0K   32.8K   $0.1111    13s 0009abcd-ef',
    'h/d/w/m/a/b period  o order  Tab/1-9 tab  u user  p project  ? help  q quit',
]


FRAME_40x12 = [
    ' ccmon - Claude Code usage monitor',
    ' 1Now2Day3Mod4Ses5Tool6User7Blk8Proj9Cht',
    ' * connected | current block',
    'Current block: $1.24, 16 requests',
    'Block       ###..  60%  21.0K / 35.0K',
    '-- Requests 1-4 of 12 ------------------',
    'Time     Model        Total      Cost',
    '10:30:00 sonnet-4-5   31.0K  <$0.0001',
    '10:23:00 haiku-4-5    31.2K   $0.0123',
    '10:16:00 opus-4-1     31.4K   $0.0247',
    '10:09:00 sonnet-4-5   31.6K   $0.0370',
    'h/d/w/m/a/b  1-9  u/p  ? help  q quit',
]


DAILY_80x24 = [  # the cache columns give way to a cost bar per day: $0.25 / $2.25 × 16 cells is 1.78 cells (2 in ASCII)
    "-- Daily usage - last 10 days (Europe/Berlin) ----------------------------------",
    "Date        Base  Prem  Input Output  Total      Cost    Prem $ longest $2.25",
    "2026-03-10     0     0      0      0      0     $0.00     $0.00",
    "2026-03-09     1     3  1.00K    500  22.2K   $0.2500   $0.2500 ##",
    "2026-03-08     2     6  2.00K  1.00K  44.4K   $0.5000   $0.5000 ####",
]


def test_render_current_tab_80x24_exact():
    snap, settings, now = _frame_fixture()
    lines, frame = frame_text(ccmon.ViewState(period="b"), snap, settings, 80, 24, now)
    assert lines == FRAME_80x24
    assert (frame.page_rows, frame.total_rows) == (10, 12)


def test_render_40x12_exact_and_too_small():
    snap, settings, now = _frame_fixture()
    assert frame_text(ccmon.ViewState(period="b"), snap, settings, 40, 12, now)[0] == FRAME_40x12
    assert frame_text(ccmon.ViewState(), snap, settings, 39, 12, now)[0] == ["terminal too small: 39x12, need 40x12"]
    assert frame_text(ccmon.ViewState(), snap, settings, 80, 11, now)[0] == \
        ["terminal too small: 80x11, need 40x12"]


def test_render_wide_terminals_show_more_rows_and_columns():
    snap, settings, now = _frame_fixture()
    lines, frame = frame_text(ccmon.ViewState(period="b"), snap, settings, 120, 40, now)
    assert frame.page_rows == 26 and len(lines) == 40
    assert lines[12] == ("Time     Model                        Input  Output   Cache   Total      Cost    Dur "
                         "Session    ")
    assert lines[24] == ("09:13:00 claude-opus-4-1-20250805     1.01K   2.20K   30.0K   33.2K   $0.1358    16s "
                         "0011abcd-ef")
    assert lines[11].startswith("-- Requests 1-12 of 12 --")
    wide, _ = frame_text(ccmon.ViewState(period="b"), snap, settings, 200, 60, now, unicode=True)
    assert wide[8] == "Block       ██████████████████░░░░░░░░░░░░  60%  21.0K / 35.0K, 4h30m left (ends 15:00)"
    assert wide[0].endswith("v0.1.0 ") and len(wide[0]) == 200


def test_render_daily_tab():
    snap, settings, now = _frame_fixture()
    daily = daily_snapshot(settings, now)
    lines, frame = frame_text(ccmon.ViewState(tab="daily"), daily, settings, 80, 24, now)
    assert lines[5] == "Week        0 premium tokens, $0.00" and lines[6:11] == DAILY_80x24
    assert lines[18] == "Total         45   135  45.0K  22.5K   999K    $11.25    $11.25"
    assert lines[17] == "2026-03-01     9    27  9.00K  4.50K   200K     $2.25     $2.25 ################"
    assert (frame.page_rows, frame.total_rows) == (14, 10)
    narrow, _ = frame_text(ccmon.ViewState(tab="daily", scroll=2), daily, settings, 40, 14, now)
    assert narrow[3:13] == [
        "Block       ###..  60%  21.0K / 35.0K",
        "Recent pace 700/min; limit at 10:50",
        "Week        0 premium tokens, $0.00",
        "-- Daily usage - last 10 days (Europe/Be",
        "Date        Prem Output  Total      Cost",
        "2026-03-08     6  1.00K  44.4K   $0.5000",
        "2026-03-07     9  1.50K  66.6K   $0.7500",
        "2026-03-06    12  2.00K  88.8K     $1.00",
        "2026-03-05    15  2.50K   111K     $1.25",
        "Total        135  22.5K   999K    $11.25"]
    # The current tab's snapshot never stands in for the daily tab while it loads.
    assert "Loading..." in frame_text(ccmon.ViewState(tab="daily"), snap, settings, 80, 24, now)[0]


def test_a_split_crosses_the_wire_whole():
    """Stats carry base, premium and total: the other agents' usage is what the total has beyond the two, when it is
    requests or tokens (a cost alone went over the wire as doubles: the difference is rounding, no usage)."""
    base, premium = ccmon.Usage(1, 120, 30, 0, 0, 270_000), ccmon.Usage(2, 3000, 500, 8000, 1600, 24_900_000)
    other = ccmon.Usage(3, 700, 70, 0, 0, 1_234_567)
    for split in (ccmon.Split(base, premium), ccmon.Split(base, premium, other), ccmon.Split(other=other),
                  ccmon.Split(base, premium, ccmon.Usage(requests=2)), ccmon.Split(base, other=ccmon.Usage(input=5))):
        wire = ccmon_pb2.Stats.FromString(ccmon.stats_message(split).SerializeToString())
        assert ccmon.split_from_stats(wire) == split
    rounded = ccmon.stats_message(ccmon.Split(base, premium))
    rounded.total_cost.amount += 1e-9
    assert ccmon.split_from_stats(rounded) == ccmon.Split(base, premium)
    go = ccmon_pb2.Stats(total_requests=3, total_tokens=ccmon.token_message(other), total_cost=ccmon_pb2.Cost(
        amount=other.cost_usd))  # the Go ccmon's server: totals alone
    assert ccmon.split_from_stats(go) == ccmon.Split(other=other)


def test_render_states_without_data():
    snap, settings, now = _frame_fixture()
    empty = dataclasses.replace(snap, server_requests=0)
    lines, _ = frame_text(ccmon.ViewState(), empty, settings, 80, 24, now)
    assert "| Waiting for data: this server has not received any Claude Code request yet. |" in lines[4]
    assert any("export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317" in line for line in lines)
    # The local server reading the transcripts already on its machine: said instead, and in the header until done.
    reading = dataclasses.replace(empty, history=ccmon.HistoryReading(3, 929))
    lines, _ = frame_text(ccmon.ViewState(), reading, settings, 80, 24, now)
    assert lines[2] == " * connected 127.0.0.1:4317 | reading history: 3 of 929 files | all time"
    assert [line.strip("| ") for line in lines[4:8]] == [
        "Reading the transcripts and histories on this machine,", "the newest first: 3 of 929 files.", "",
        "Figures appear as they are stored."]
    lines, _ = frame_text(ccmon.ViewState(), dataclasses.replace(empty, history=ccmon.HistoryReading(0, 0)),
                          settings, 80, 24, now)  # the server has not listed them yet
    assert lines[2] == " * connected 127.0.0.1:4317 | reading history: looking for files | all time"
    assert lines[5].strip("| ") == "the newest first: looking for files."
    lines, _ = frame_text(ccmon.ViewState(), dataclasses.replace(snap, history=ccmon.HistoryReading(500, 929)),
                          settings, 80, 24, now)
    assert lines[2] == " * connected 127.0.0.1:4317 | reading history: 500 of 929 files | all time"
    assert lines[3:] == frame_text(ccmon.ViewState(), snap, settings, 80, 24, now)[0][3:]  # the figures so far
    down = ccmon.ServerStatus(False, "connection refused", now + 4000, 3)
    lines, _ = frame_text(ccmon.ViewState(), None, settings, 80, 24, now, status=down)
    assert lines[2] == " * disconnected (connection refused) - retrying in 4s | all time | newest first"
    assert lines[4:6] == ["Cannot reach the ccmon server at 127.0.0.1:4317: connection refused. Is 'ccmon",
                          "   --server' running?"]
    stale, _ = frame_text(ccmon.ViewState(period="b"), snap, settings, 80, 24, now, status=down)
    assert stale[2].startswith(" * disconnected (connection refused) - retrying in 4s")
    assert stale[6] == FRAME_80x24[6]  # the last data stays on screen
    help_lines, _ = frame_text(ccmon.ViewState(help=True), snap, settings, 80, 24, now)
    assert help_lines[3:5] == ["                    +- Keys ------------------------------+",
                               "                    | h  last hour       d  last 24 hours |"]
    assert help_lines[-1] == "any key closes this help"
    no_block, _ = frame_text(ccmon.ViewState(), dataclasses.replace(snap, limits=None), _settings(block_hour=None),
                             80, 24, now)
    assert no_block[8] == "Block tracking is off: run with -b auto (or -b 5am for fixed 5-hour windows)."
    unlimited = dataclasses.replace(snap, limits=dataclasses.replace(snap.limits, limit=None))
    no_limit, _ = frame_text(ccmon.ViewState(), unlimited, _settings(limit=None), 80, 24, now)
    assert no_limit[8:10] == ["Block       21.0K premium, 4h30m left (no limit set)", "Recent pace 700/min"]
    assert frame_text(ccmon.ViewState(), unlimited, _settings(limit=None), 100, 24, now)[0][8] == \
        "Block       21.0K premium, 4h30m left (no limit: set claude.plan or claude.max_tokens)"


def test_render_never_overflows_any_size():
    snap, settings, now = _frame_fixture()
    daily = daily_snapshot(settings, now)
    for width in range(30, 220, 7):
        for height in range(8, 70, 5):
            for state, data in ((ccmon.ViewState(period="b"), snap), (ccmon.ViewState(tab="daily"), daily),
                                (ccmon.ViewState(help=True, help_scroll=4), snap),
                                (ccmon.ViewState(period="b"), claude_snapshot(settings, now)),
                                *first_hour_screens(settings, now)[2:]):
                lines, _ = frame_text(state, data, settings, width, height, now, unicode=True)
                assert len(lines) <= height and all(len(line) <= width for line in lines)


SESSION_UUID = "0f0c2a9e-7d4b-4c1e-9a55-3e1f7c2b8d41"


CONTEXT = {"anthropic.custom_base_url": True, "event.sequence": 7, "event.timestamp": "2026-05-05T10:59:00Z",
           "session.id": SESSION_UUID, "user.email": "ana@example.com", "user.id": "u" * 64,
           "organization.id": "org-1", "terminal.type": "tmux", "prompt.id": "p-7"}


def timeline_entries(now: int) -> tuple:
    """One of everything a session's timeline holds, with the context attributes Claude Code sends."""
    row = ccmon.TimelineEntry
    return (row(now - 90_000, "user_prompt", None, {**CONTEXT, "prompt_length": "42",
                                                   "prompt": "fix the\nfailing\ttest"}),
            row(now - 60_000, "api_request", ccmon.ApiRequest(now - 60_000, "claude-sonnet-4-5-20250929", SESSION_UUID,
                                                              ccmon.Usage(1, 1000, 200, 5, 0, 500_000_000, 4000)), {}),
            row(now - 50_000, "tool_decision", None, {**CONTEXT, "tool_name": "Bash", "decision": "accept",
                                                     "source": "config"}),
            row(now - 30_000, "tool_result", None, {**CONTEXT, "tool_name": "Bash", "success": "false",
                                                   "duration_ms": "3000", "error": "Exit code 1"}),
            row(now - 25_000, "tool_result", None, {**CONTEXT, "tool_name": "Read", "success": True, "duration_ms": 15}),
            row(now - 20_000, "assistant_response", None, {**CONTEXT, "response_length": 400}),
            row(now - 15_000, "api_error", None, {**CONTEXT, "model": "claude-opus-4-1-20250805", "status_code": "529",
                                                 "error": "Overloaded", "attempt": 3}),
            row(now - 10_000, "api_retries_exhausted", None, {**CONTEXT, "total_attempts": 10}))


def first_hour_screens(settings, now) -> list[tuple[ccmon.ViewState, ccmon.Snapshot]]:
    """Every tab and a session's timeline with a busy first hour's figures: dated model names, UUID session
    ids, two users, a burn rate in thousands, a block far past its limit."""
    usage = ccmon.Usage
    requests, _, _ = _frame_fixture()
    page = requests.data.page
    requests = dataclasses.replace(requests, data=dataclasses.replace(requests.data, page=dataclasses.replace(
        page, requests=tuple(dataclasses.replace(r, session_id=SESSION_UUID) for r in page.requests))))
    days = (ccmon.DayUsage("2026-03-10", ccmon.Split(usage(5, 900), usage(40, 2_000_000, 100_000, 3_000_000, 90_000,
                                                                         37_200_000_000))),
            ccmon.DayUsage("2026-03-09", ccmon.Split(usage(), usage(80, 3_000_000, 153_600, 9_000_000, 90_000,
                                                                   99_000_000_000))))
    split = ccmon.Split(usage(1, 300, 30, 0, 0, 10_000_000), usage(1, 1000, 200, 0, 0, 500_000_000))
    sessions = tuple(ccmon.Session(f"{i}{SESSION_UUID[1:]}", user, now - 3600_000 * (i + 1), now - 3600_000 * i,
                                   split, ("claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001"), 3, 1, i, i == 2,
                                   "", "metrics" if i == 2 else "events")
                     for i, user in enumerate(["ana@example.com", "bo@example.com", "ana@example.com"]))
    models = (ccmon.ModelUsage("claude-opus-4-1-20250805",
                               usage(20, 119_000, 110_000, 1_640_000, 0, 18_600_000_000, 140_000)),
              ccmon.ModelUsage("claude-sonnet-4-5-20250929",
                               usage(20, 117_000, 108_000, 1_640_000, 0, 18_600_000_000, 136_000, 9000, 20)))
    tools = ccmon.ToolReport((ccmon.ToolFigures("Bash", 30, 22, 120, 3000),
                              ccmon.ToolFigures("mcp__github__create_pull_request", 1, 1, 900, 900)),
                             (ccmon.DecisionCount("accept", "config", 12), ccmon.DecisionCount("reject", "user_reject", 1)),
                             (ccmon.ApiErrorCount("529", "claude-opus-4-1-20250805", 1),), 1)
    blocks = (ccmon.UsageBlock(now - 3600_000, now + 4 * 3600_000,
                               ccmon.Split(usage(2, 100), usage(7, 400_000, 107_500, 500_000)), now),)
    return [(ccmon.ViewState(period="b"), requests),
            (ccmon.ViewState(tab="daily"), dataclasses.replace(daily_snapshot(settings, now), data=days)),
            insight_snapshot(settings, now, "models", data=models),
            insight_snapshot(settings, now, "sessions", data=sessions),
            insight_snapshot(settings, now, "sessions", session_id=SESSION_UUID, data=timeline_entries(now)),
            insight_snapshot(settings, now, "tools", data=tools),
            insight_snapshot(settings, now, "users", users=(ccmon.UserUsage("ana@example.com", split, 2),
                                                            ccmon.UserUsage("bo@example.com", split, 1))),
            insight_snapshot(settings, now, "blocks", data=blocks)]


def test_columns_take_the_room_there_is():
    """No cell is cut at 120 columns; where a screen is really too narrow, cells end in ~ rather than overflow."""
    snap, settings, now = _frame_fixture()
    for state, data in first_hour_screens(settings, now):
        lines, _ = frame_text(state, data, settings, 120, 30, now, unicode=True)
        assert not [line for line in lines if "~" in line], "\n".join(lines)
    daily, _ = frame_text(*first_hour_screens(settings, now)[1], settings, 120, 30, now)
    assert daily[9].split()[-4:] == ["2.19K/min", "$99.00", "$99.00", "#" * 32]  # and the costliest day's bar
    blocks, _ = frame_text(*first_hour_screens(settings, now)[-1], settings, 120, 30, now)
    assert blocks[8].endswith("######## 1450%")


def test_the_week_line_drops_parts_whole():
    """At 120 columns the family split is one character too long: it goes whole, never as `sonnet 14.`."""
    snap, settings, now = _frame_fixture()
    weekly = dataclasses.replace(settings, weekly_limit=500_000)
    limits = dataclasses.replace(snap.limits, weekly={"opus": ccmon.Usage(9, 120_000, 108_000),
                                                      "sonnet": ccmon.Usage(4, 10_000, 4_200)})
    week = {width: frame_text(ccmon.ViewState(period="b"), dataclasses.replace(snap, limits=limits), weekly, width, 24,
                              now)[0][10] for width in (40, 80, 115, 116)}
    assert week[40] == "Week        ##...  48%  242K / 500K"
    assert week[80] == "Week        ########........  48%  242K / 500K, limit Tue 16:38 at this pace"
    assert week[115] == "Week        ###############...............  48%  242K / 500K, limit Tue 16:38 at this pace"
    assert week[116] == week[115] + " (opus 228K, sonnet 14.2K)"
    unlimited = {width: frame_text(ccmon.ViewState(period="b"), dataclasses.replace(snap, limits=limits), settings,
                                   width, 24, now)[0][10] for width in (63, 64)}
    assert unlimited == {63: "Week        242K premium tokens, $0.00", 64: "Week        242K premium tokens, $0.00 "
                                                                             "(opus 228K, sonnet 14.2K)"}


def test_wide_screens_show_more():
    """Full model names and session ids where there is room, short ones where there is not."""
    snap, settings, now = _frame_fixture()
    screens = first_hour_screens(settings, now)
    for state, data in (screens[0], screens[3]):  # the requests, the sessions
        text = {width: "\n".join(frame_text(state, data, settings, width, 30, now)[0]) for width in (80, 120, 200)}
        assert "claude-sonnet-4-5-20250929" in text[200] and "claude-sonnet-4-5-20250929" not in text[120]
        assert SESSION_UUID in text[200]
        assert "sonnet-4-5" in text[80] and "claude-sonnet-4-5" not in text[80]
    requests = frame_text(*screens[0], settings, 120, 30, now)[0]
    assert requests[13] == ("10:30:00 claude-sonnet-4-5   1.00K       0   30.0K   31.0K  <$0.0001    0ms "
                            f"{SESSION_UUID}")
    sessions = frame_text(*screens[3], settings, 200, 30, now)[0]
    assert sessions[8].split() == [SESSION_UUID, "ana@example.com", "03-10", "09:30", "1h00m", "2", "1.53K", "$0.5100",
                                    "claude-sonnet-4-5-20250929,claude-haiku-4-5-20251001", "3", "1", "0", "events"]
    models = frame_text(*screens[2], settings, 80, 30, now)[0]
    assert models[7:9] == ["Model         Req   Input  Output   Cache      Cost Share of cost Avg dur   TTFT",
                            "opus-4-1       20    119K    110K   1.64M    $18.60 ####....  50%    7.0s      -"]


def test_fit_columns_widens_by_need_and_keeps_forms_whole():
    columns = [ccmon.Column("Name", 8, 0, left=True), ccmon.Column("Note", 4, 1, left=True),
               ccmon.Column("Extra", 5, 2)]
    rows = [[("claude-opus-4-1-20250805", "claude-opus-4-1", "opus-4-1"), "a long note", "1"]]

    def widths(width):
        return [(fitted.column.title, fitted.width, fitted.level) for fitted in ccmon.fit_columns(columns, rows, width)]

    assert widths(12) == [("Name", 8, 0)]  # Note (4) fits but for the space between
    assert widths(13) == [("Name", 8, 0), ("Note", 4, 0)]
    assert widths(19) == [("Name", 8, 0), ("Note", 4, 0), ("Extra", 5, 0)]
    assert widths(25) == [("Name", 8, 0), ("Note", 10, 0), ("Extra", 5, 0)]  # the rest to what it cuts
    assert widths(32) == [("Name", 8, 0), ("Note", 11, 0), ("Extra", 5, 0)]  # not half a longer name
    assert widths(33) == [("Name", 15, 1), ("Note", 11, 0), ("Extra", 5, 0)]
    assert widths(41) == widths(33)
    assert widths(42) == [("Name", 24, 2), ("Note", 11, 0), ("Extra", 5, 0)]
    assert widths(200) == widths(42)  # and no wider than their cells
    header, body = ccmon.table_lines(columns, [(rows[0], "")], 25)
    assert [line_text(line) for line in (header, *body)] == ["Name     Note       Extra",
                                                                   "opus-4-1 a long no~     1"]


def test_every_tab_is_named_at_every_width():
    snap, settings, now = _frame_fixture()
    for width in range(40, 201):
        strip = frame_text(ccmon.ViewState(period="b"), snap, settings, width, 24, now)[0][1]
        packed = "".join(f"{number}{tab.short_title}" for number, tab in enumerate(ccmon.TABS.values(), start=1))
        for number, tab in enumerate(ccmon.TABS.values(), start=1):
            assert f" {tab.title} " in strip or f"{number} {tab.short_title}" in strip or \
                f" {number}{tab.short_title} " in strip or strip == " " + packed, (width, strip)
    assert frame_text(ccmon.ViewState(), snap, settings, 60, 24, now)[0][1] == \
        " 1Now 2Day 3Mod 4Ses 5Tool 6User 7Blk 8Proj 9Cht "
    assert frame_text(ccmon.ViewState(), snap, settings, 80, 24, now)[0][1] == \
        "  1 Now   2 Day   3 Mod   4 Ses   5 Tool   6 User   7 Blk   8 Proj   9 Cht  "


def test_every_help_key_is_reachable_at_40x12():
    snap, settings, now = _frame_fixture()
    state, seen = ccmon.ViewState(help=True), []
    for key in ("", "KEY_NPAGE", "KEY_NPAGE", "k", "KEY_HOME", "KEY_END", "j"):
        if key:
            state, action = ccmon.handle_key(state, key, settings, frame)
            assert state.help and action == ""
        lines, frame = frame_text(state, snap, settings, 40, 12, now)
        seen.append(lines)
    first, second, *_ = seen
    assert first[3:] == ["+- Keys ------------------------------+",
                         "| h  last hour       d  last 24 hours |",
                         "| w  last 7 days     m  last 30 days  |",
                         "| a  all time        b  current block |",
                         "| o  sort order      r  refresh now   |",
                         "| Tab/Shift-Tab or 1-9  switch tab    |",
                         "| arrows/j/k PgUp/PgDn  scroll        |",
                         "+- 1-6 of 11 -------------------------+",
                         "arrows/PgDn: more  other keys close"]
    assert second[4:10] == [f"| {text.ljust(36)}|" for text in ccmon.HELP_TEXT[5:]]
    assert second[10] == "+- 6-11 of 11 ------------------------+"
    assert [lines[4] for lines in seen] == [first[4], second[4], second[4], first[8], first[4], second[4], second[4]]
    shown = "\n".join("\n".join(lines) for lines in seen)
    assert all(text in shown for text in ccmon.HELP_TEXT)
    closed, action = ccmon.handle_key(state, "x", settings, frame)
    assert not closed.help and action == "" and closed.tab == state.tab
    assert ccmon.handle_key(state, "q", settings, frame)[1] == "quit"
    reopened, _ = ccmon.handle_key(closed, "?", settings, frame)
    assert reopened.help and reopened.help_scroll == 0


def test_the_block_hint_never_takes_a_tables_row():
    snap, settings, now = _frame_fixture()
    off = _settings(block_hour=None)
    no_block = dataclasses.replace(snap, limits=None)
    hint = "Block tracking is off: run with -b auto (or -b 5am for fixed 5-hour windows)."
    small, frame = frame_text(ccmon.ViewState(), no_block, off, 40, 12, now)
    assert small[3:7] == ["All time: $1.24, 16 requests",  # the usage table in one line: the rows are the table's
                          "-- Requests 1-5 of 12 ------------------",
                          "Time     Model        Total      Cost",
                          "10:30:00 sonnet-4-5   31.0K  <$0.0001"]
    assert frame.page_rows == 5
    assert hint in frame_text(ccmon.ViewState(), no_block, off, 80, 24, now)[0]
    assert hint not in frame_text(ccmon.ViewState(), no_block, off, 80, 20, now)[0]  # 12 rows left: they are the table's
    for state, data in first_hour_screens(off, now)[1:]:
        lines, _ = frame_text(state, dataclasses.replace(data, limits=None), off, 80, 24, now)
        assert not [line for line in lines if "Block tracking" in line]  # the other tabs start with their table
        assert lines[3].startswith("-- ")


def test_the_timeline_shows_what_happened():
    snap, settings, now = _frame_fixture()
    state, data = first_hour_screens(settings, now)[4]
    lines, frame = frame_text(state, data, settings, 120, 24, now)
    assert lines[6:16] == [
        "-- Session 0f0c2a9e-7d4b-4c1e-9a55-3e1f7c2b8d41 (8 entries) - Esc: back " + "-" * 48,
        "Time     Event                 Model/tool                      Cost Detail                             ",
        "10:28:30 user_prompt                                                42 characters: fix the failing test",
        "10:29:00 api_request           claude-sonnet-4-5-20250929   $0.5000 in 1.00K out 200 cache 5, 4.0s     ",
        "10:29:10 tool_decision         Bash                                 accept (config)                    ",
        "10:29:30 tool_result           Bash                                 failed, 3.0s: Exit code 1          ",
        "10:29:35 tool_result           Read                                 ok, 15ms                           ",
        "10:29:40 assistant_response                                         response_length=400                ",
        "10:29:45 api_error             claude-opus-4-1-20250805             status 529: Overloaded (attempt 3) ",
        "10:29:50 api_retries_exhausted                                      total_attempts=10                  "]
    assert frame.total_rows == 8
    narrow, _ = frame_text(state, data, settings, 80, 24, now)
    assert [line[9:30].rstrip() for line in narrow[8:16]] == [row.kind for row in data.data]  # names in full
    assert narrow[11] == "10:29:30 tool_result           Bash                 failed, 3.0s: Exit code 1   "
    assert not [line for line in narrow + lines if re.search(r"anthropic|event\.|session\.|user\.|organization|"
                                                              r"terminal|prompt\.id", line)]


def test_block_rollover_renders_the_fetched_block():
    snap, settings, now = _frame_fixture()
    next_block = ccmon.current_block(now, settings.zone, settings.block_mode)[1]
    for moment in (next_block, next_block + 1, next_block + 60_000):
        lines, _ = frame_text(ccmon.ViewState(period="b"), snap, settings, 80, 24, moment)
        assert lines[8].endswith("60%  21.0K / 35.0K, 0ms left (ends 15:00)")
        assert lines[9] == "Recent pace 700/min; within limit at this pace (60% at block end)"  # the block as it ended
    assert ccmon.BlockStatus(0, ccmon.BLOCK_MS, 0, used=10, limit=100).limit_reached_ms() is None


def test_hashed_user_ids_are_cut_short_where_the_screen_is_narrow():
    settings, now = _settings(), ccmon.parse_iso_ms("2026-05-05T12:00:00Z")
    hashed = "9c" * 32
    state, snap = insight_snapshot(settings, now, "users", users=(
        ccmon.UserUsage(hashed, ccmon.Split(ccmon.Usage(1, 10)), 1), ccmon.UserUsage("ana@example.com", ccmon.Split(), 2)))
    narrow = "\n".join(frame_text(state, snap, settings, 80, 24, now)[0])
    assert "9c9c9c9c9c~" in narrow and hashed not in narrow and "ana@example.com" in narrow
    assert hashed in "\n".join(frame_text(state, snap, settings, 200, 24, now)[0])


def insight_snapshot(settings, now, tab, **fields):
    state = ccmon.ViewState(tab=tab, period="w", session_id=fields.pop("session_id", None))
    limits = ccmon.LimitFigures(ccmon.current_block(now, settings.zone, 5),
                                ccmon.Split(ccmon.Usage(), ccmon.Usage(8, 14000, 7000)), 700.0, 35_000, None, {})
    return state, ccmon.Snapshot(ccmon.query_for(state, settings, now), now, 500, limits=limits, **fields)


def test_the_monitor_names_the_agent_where_requests_or_sessions_of_several_agents_are_shown():
    """An Agent column on the Requests and Sessions tabs when their rows are of more than one agent (a Claude
    Code only screen stays as it was); Codex's conversation ids are shortened to their last characters."""
    settings, now = _settings(), local_ms("2026-05-05 13:00")
    usage = ccmon.Usage(1, 1667, 89, 678, 0, 11_344_000, 50)
    codex_session = "01a2419c-29ba-7ec3-a23f-f4d7c693747e"
    requests = (ccmon.ApiRequest(now - 60_000, "gpt-5.5", codex_session, usage, "codex"),
                ccmon.ApiRequest(now - 120_000, "claude-sonnet-4-5", "s-claude-1", usage),
                ccmon.ApiRequest(now - 180_000, "qwen3-coder-plus", "s-qwen-1", usage, "qwen-code"))
    limits = ccmon.LimitFigures(ccmon.current_block(now, settings.zone, 5), ccmon.Split(), 700.0, 35_000, None, {})
    state = ccmon.ViewState(period="b")
    snap = ccmon.Snapshot(ccmon.query_for(state, settings, now), now, 500, limits, data=ccmon.CurrentRequests(
        ccmon.Split(premium=usage, other=usage + usage), ccmon.RequestsPage(requests, 3)))
    lines = frame_text(state, snap, settings, 120, 30, now)[0]
    assert [line.split()[:2] for line in lines if line.split()[:1] in (["Premium"], ["Others"], ["Total"])] == \
        [["Premium", "1"], ["Others", "2"], ["Total", "3"]]  # the other agents' usage in a row of its own
    by_agent = dataclasses.replace(snap, data=dataclasses.replace(snap.data, others=(("qwen-code", usage),
                                                                                     ("codex", usage))))
    assert [line.split()[:2] for line in frame_text(state, by_agent, settings, 120, 30, now)[0]
            if line.split()[:1] in (["Premium"], ["Others"], ["Qwen"], ["Codex"], ["Total"])] == \
        [["Premium", "1"], ["Qwen", "1"], ["Codex", "1"], ["Total", "3"]]  # by agent, where the tab has them
    assert ccmon.usage_by_agent([ccmon.ModelUsage("qwen3-coder-plus", usage, "qwen-code"),
                                 ccmon.ModelUsage("claude-sonnet-4-5", usage),
                                 ccmon.ModelUsage("gpt-5.5", usage, "codex"), ccmon.ModelUsage("gpt-5", usage, "codex")]
                                ) == (("codex", usage + usage), ("qwen-code", usage))
    header = next(index for index, line in enumerate(lines) if line.split()[:3] == ["Time", "Agent", "Model"])
    assert [lines[header + n].split()[1:3] + lines[header + n].split()[-1:] for n in (1, 2, 3)] == [
        ["codex", "gpt-5.5", "c693747e"], ["claude-code", "claude-sonnet-4-5", "s-claude"],
        ["qwen-code", "qwen3-coder-plus", "s-qwen-1"]]
    alone = dataclasses.replace(snap, data=ccmon.CurrentRequests(ccmon.Split(), ccmon.RequestsPage(requests[1:2], 1)))
    assert not any(line.split()[:2] == ["Time", "Agent"] for line in frame_text(state, alone, settings, 120, 30, now)[0])
    split = ccmon.Split(premium=usage)
    sessions = tuple(ccmon.Session(sid, "", now - 3600_000, now - 60_000, split, (model,), 0, 0, 0, False, "", source,
                                   agent)
                     for sid, model, source, agent in ((codex_session, "gpt-5.5", "events*", "codex"),
                                                       ("s-claude-1", "claude-sonnet-4-5", "events", "claude-code")))
    state, snap = insight_snapshot(settings, now, "sessions", data=sessions)
    lines = frame_text(state, snap, settings, 120, 24, now)[0]
    assert lines[7].split()[:3] == ["Session", "Agent", "Started"]
    assert [line.split()[:2] + line.split()[-1:] for line in lines[8:10]] == [
        ["c693747e", "codex", "events*"], ["s-claude", "claude-code", "events"]]


def test_render_insight_tabs():
    settings, now = _settings(), local_ms("2026-05-05 13:00")
    usage = ccmon.Usage
    state, snap = insight_snapshot(settings, now, "models", data=(
        ccmon.ModelUsage("claude-opus-4-1-20250805", usage(1, 50, 5000, 0, 0, 2_250_000_000, 60000, 0, 0)),
        ccmon.ModelUsage("claude-sonnet-4-5", usage(2, 1007, 203, 0, 0, 625_000_000, 5000, 1300, 2))))
    lines, frame = frame_text(state, snap, settings, 100, 24, now)
    assert lines[1].startswith("  Current   Daily Usage   Models   Sessions   Tools & errors   Users")
    assert lines[6] == "-- Models - last 7 days " + "-" * 76
    assert lines[7].split() == ["Model", "Req", "Input", "Output", "Cache", "Cost", "Share", "of", "cost", "Avg",
                                "dur", "TTFT"]
    assert lines[8].split() == ["claude-opus-4-1-20250805", "1", "50", "5.00K", "0", "$2.25", "######..", "78%", "1m",
                                 "-"]
    assert lines[9].split() == ["claude-sonnet-4-5", "2", "1.01K", "203", "0", "$0.6250", "##......", "22%",
                                 "2.5s", "650ms"]
    assert lines[10].split()[:6] == ["Total", "3", "1.06K", "5.20K", "0", "$2.88"]
    split = ccmon.Split(usage(1, 300, 30, 0, 0, 10_000_000), usage(1, 1000, 200, 0, 0, 500_000_000))
    rows = tuple(ccmon.Session(f"s-{i}-0123456789", user, now - 3600_000 * (i + 1), now - 3600_000 * i, split,
                               ("claude-sonnet-4-5", "claude-haiku-4-5"), 3, 1, i, i == 2, "",
                               "metrics" if i == 2 else "events")
                 for i, user in enumerate(["ana@example.com", "bo@example.com", "ana@example.com"]))
    state, snap = insight_snapshot(settings, now, "sessions", data=rows)
    state = dataclasses.replace(state, scroll=1)
    lines, frame = frame_text(state, snap, settings, 120, 24, now)
    assert frame.session_ids == tuple(r.session_id for r in rows) and frame.total_rows == 3
    assert lines[6].startswith("-- Sessions - last 7 days (3) - Enter: details --")
    assert lines[7].split() == ["Session", "User", "Started", "Dur", "Req", "Tokens", "Cost", "Models", "Tools",
                                "Fail", "Err", "Source"]
    assert lines[9].split() == ["s-1-0123456789", "bo@example.com", "05-05", "11:00", "1h00m", "2", "1.53K",
                                 "$0.5100", "sonnet-4-5,haiku-4-5", "3", "1", "1", "events"]
    assert lines[10].split()[-1] == "metrics"
    selected = ccmon.render(state, ccmon.ServerStatus(True, attempts=1), snap,
                            ccmon.Screen(settings, 120, 24, now, ccmon.Glyphs.for_terminal(False))).lines[9]
    assert selected[0][1] == "tab_active"
    entered, action = ccmon.handle_key(state, "\n", settings, frame)
    assert (entered.session_id, action) == ("s-1-0123456789", "refresh")
    back, action = ccmon.handle_key(entered, "ESC", settings, frame)
    assert (back.session_id, back.tab, action) == (None, "sessions", "refresh")
    timeline = (ccmon.TimelineEntry(now - 60_000, "api_request", ccmon.ApiRequest(now - 60_000, "claude-sonnet-4-5", "s",
                                                                                usage(1, 1000, 200, 5, 0, 500_000_000,
                                                                                      4000)), {}),
                ccmon.TimelineEntry(now - 30_000, "tool_result", None, {"tool_name": "Bash", "success": "false",
                                                                      "duration_ms": "3000"}))
    state, snap = insight_snapshot(settings, now, "sessions", session_id="s-1-0123456789", data=timeline)
    lines, _ = frame_text(state, snap, settings, 100, 24, now)
    assert lines[6].startswith("-- Session s-1-0123456789 (2 entries) - Esc: back --")
    assert lines[8].split() == ["12:59:00", "api_request", "claude-sonnet-4-5", "$0.5000", "in", "1.00K", "out", "200",
                                 "cache", "5,", "4.0s"]
    assert lines[9].split() == ["12:59:30", "tool_result", "Bash", "failed,", "3.0s"]
    tools = ccmon.ToolReport((ccmon.ToolFigures("Bash", 3, 2, 200, 3000),), (ccmon.DecisionCount("accept", "config", 1),),
                             (ccmon.ApiErrorCount("529", "claude-opus-4-1", 1),), 1)
    state, snap = insight_snapshot(settings, now, "tools", data=tools)
    lines, _ = frame_text(state, snap, settings, 80, 24, now)
    assert lines[7].split() == ["Tool", "Calls", "Success", "p50", "p95"]
    assert lines[8].split() == ["Bash", "3", "67%", "200ms", "3.0s"]
    assert lines[9] == "Decisions: accept by config: 1"
    assert lines[12].split() == ["529", "claude-opus-4-1", "1"] and lines[13] == "Retries exhausted: 1"
    many = dataclasses.replace(tools, tools=tuple(ccmon.ToolFigures(f"Tool{i:02d}", 1, 1, 1, 1) for i in range(40)))
    state, snap = insight_snapshot(settings, now, "tools", data=many)
    lines, frame = frame_text(dataclasses.replace(state, scroll=30), snap, settings, 80, 24, now)
    assert (frame.total_rows, frame.page_rows, lines[8].split()[0]) == (40, 10, "Tool30")
    assert "Retries exhausted: 1" in lines
    state, snap = insight_snapshot(settings, now, "users", users=(ccmon.UserUsage("ana@example.com", split, 2),
                                                                  ccmon.UserUsage("", split, 1)))
    lines, frame = frame_text(state, snap, settings, 80, 24, now)
    assert lines[8].split() == ["ana@example.com", "2", "2", "1.53K", "1.20K", "$0.5100", "####....", "50%"]
    assert lines[9].split()[0] == "(unknown)"
    filtered, action = ccmon.handle_key(state, "u", settings, frame)
    assert (filtered.user, action) == ("ana@example.com", "refresh")
    assert "| user ana@example.com |" in frame_text(filtered, snap, settings, 80, 24, now)[0][2]
    assert ccmon.handle_key(filtered, "u", settings, frame)[0].user is None
    for key, tab in (("1", "current"), ("3", "models"), ("6", "users")):
        assert ccmon.handle_key(state, key, settings, frame)[0].tab == tab
    narrow, _ = frame_text(state, snap, settings, 40, 12, now)
    assert narrow[1] == " 1Now2Day3Mod4Ses5Tool6User7Blk8Proj9Cht"


def plan_guess_beside_claude(now, readings=1):
    """Issue #22's screen: -b auto --claude-plan max while Claude's own readings are live; Claude says 63 % of the
    5 hours and 56 % of the week, ccmon counted 14,000 and 7,000 tokens, and one reading calibrated each capacity."""
    settings = ccmon.MonitorSettings("127.0.0.1:4317", BERLIN, "auto", 35_000, 5, limit_from_plan=True)
    read = now - 2 * 60_000
    reading = ccmon.LimitReading("s-ana", read, five_hour=ccmon.LimitWindow(63.0, local_ms("2026-03-10 14:17")),
                                 seven_day=ccmon.LimitWindow(56.0, local_ms("2026-03-13 09:00")))
    block = ccmon.Split(ccmon.Usage(), ccmon.Usage(20, 9_000, 5_000))
    limits = ccmon.LimitFigures((local_ms("2026-03-10 09:17"), local_ms("2026-03-10 14:17")), block, 720.0, 35_000,
                                None, {"sonnet": ccmon.Usage(20, 4_000, 3_000)},
                                ccmon.ClaudeLimits(reading, reading, 22_200, readings, 3_150, readings),
                                weekly_window=(local_ms("2026-03-06 09:00"), local_ms("2026-03-13 09:00")),
                                window_from_claude=True)
    snap, _, _ = _frame_fixture()
    state = ccmon.ViewState(period="b")
    query = dataclasses.replace(ccmon.query_for(state, settings, now), start_ms=limits.window[0])  # as fetched
    snap = dataclasses.replace(snap, query=query, limits=limits, data=dataclasses.replace(snap.data, period=block))
    return state, snap, settings


def test_one_answer_per_screen_while_claudes_reading_is_live():
    """Claude's share is the gauge, ccmon's count supports it; the plan's guess and a capacity calibrated from one
    reading never stand beside it; the pace says what it leads to, and the table's rate is named an average."""
    now = local_ms("2026-03-10 10:30")
    state, snap, settings = plan_guess_beside_claude(now)
    lines, _ = frame_text(state, snap, settings, 80, 24, now)
    assert lines[4].split()[-2:] == ["Avg", "rate"] and lines[6].split()[-1] == "192/min"  # 14,000 in 73 min
    assert lines[8:11] == [
        "Claude 5h   ##########......  63%, resets 14:17; ccmon counted 14.0K (2 min ago)",
        "Recent pace 720/min; too few of Claude's readings to project its limit",
        "Claude week #########.......  56%, resets Fri 09:00; ccmon counted 7.00K"]
    small, _ = frame_text(state, snap, settings, 40, 12, now)
    assert small[3:6] == ["Current block: $0.00, 20 requests",
                          "Claude 5h   ###..  63%, resets 14:17",
                          "-- Requests 1-4 of 12 ------------------"]
    for text in ("\n".join(lines), "\n".join(small)):
        assert not re.search(r"35\.0K|guess|3\.15K|222%|Burn", text), text
    # With a capacity calibrated from 3 readings the pace leads to Claude's limit, and says so.
    state, snap, settings = plan_guess_beside_claude(now, readings=3)
    lines, _ = frame_text(state, snap, settings, 80, 24, now)
    assert lines[9] == "Recent pace 720/min; Claude's 5h limit at this pace at 10:41"  # 8,200 left of 22,200
    assert lines[10] == "Claude week #########.......  56%, resets Fri 09:00; ccmon counted 7.00K"  # 7,000 > 3,150


def test_small_screens_keep_data_rows_and_whole_key_hints():
    """At 40x12 with -b every table shows at least 3 rows (or all it has), j scrolls, and the key hints are whole
    in the 39 columns curses writes; at 80x24 the block/week panel takes 3 rows, and Daily shows 14 days."""
    snap, settings, now = _frame_fixture()
    screens = first_hour_screens(settings, now)
    days = tuple(ccmon.DayUsage((dt.date(2026, 3, 10) - dt.timedelta(days=k)).isoformat(), ccmon.Split(
        ccmon.Usage(1, 10), ccmon.Usage(3, 1000, 500, 0, 0, 250_000_000))) for k in range(30))
    screens[1] = (screens[1][0], dataclasses.replace(screens[1][1], data=days))
    for state, data in [screens[0], screens[1], screens[2], screens[3], screens[6], screens[7]]:
        lines, frame = frame_text(state, data, settings, 40, 12, now)
        table = next(i for i, line in enumerate(lines) if line.startswith("-- ") and not line.startswith("-- Usage"))
        rows = [line for line in lines[table + 2:-1] if line.strip() and not line.startswith("Total")]
        assert len(rows) >= min(frame.total_rows, 3), (state.tab, lines)
        assert lines[-1] == "h/d/w/m/a/b  1-9  u/p  ? help  q quit" and len(lines[-1]) < 40
    daily_state, daily = screens[1]
    lines, frame = frame_text(daily_state, daily, settings, 40, 12, now)
    scrolled, action = ccmon.handle_key(daily_state, "j", settings, frame)
    assert (scrolled.scroll, action) == (1, "refresh")
    assert frame_text(scrolled, daily, settings, 40, 12, now)[0][6].startswith("2026-03-09")
    lines, frame = frame_text(daily_state, daily, settings, 80, 24, now)
    assert [line.split()[0] for line in lines[3:7]] == ["Block", "Recent", "Week", "--"]
    assert frame.page_rows == 14 and sum(line.startswith("2026-") for line in lines) == 14
    assert ccmon.footer_hint(30) == "1-9  ? help  q quit"


def test_the_daily_tab_starts_with_history_and_shows_the_whole_cost():
    """A fresh database has 28 empty days before the first use: they are not listed; Cost is the whole cost, beside
    the premium one, and the totals agree."""
    snap, settings, now = _frame_fixture()
    used = ccmon.Split(ccmon.Usage(2, 100, 10, 0, 0, 300_000), ccmon.Usage(4, 1000, 500, 0, 0, 107_900_000))
    days = (ccmon.DayUsage("2026-03-10", used), ccmon.DayUsage("2026-03-09", ccmon.Split()),
            ccmon.DayUsage("2026-03-08", used)) + tuple(
        ccmon.DayUsage((dt.date(2026, 3, 7) - dt.timedelta(days=k)).isoformat(), ccmon.Split()) for k in range(27))
    state = ccmon.ViewState(tab="daily")
    daily = dataclasses.replace(daily_snapshot(settings, now), data=days)
    lines, frame = frame_text(state, daily, settings, 80, 24, now)
    assert lines[6:12] == [
        "-- Daily usage - last 3 days (Europe/Berlin) -----------------------------------",
        "Date        Base  Prem  Input Output  Total      Cost    Prem $ longest $0.1082",
        "2026-03-10     2     4  1.00K    500  1.50K   $0.1082   $0.1079 ################",
        "2026-03-09     0     0      0      0      0     $0.00     $0.00",  # no cost, no bar
        "2026-03-08     2     4  1.00K    500  1.50K   $0.1082   $0.1079 ################",
        "Total          4     8  2.00K  1.00K  3.00K   $0.2164   $0.2158"]
    assert frame.total_rows == 3
    empty = dataclasses.replace(daily, data=tuple(ccmon.DayUsage(day.date, ccmon.Split()) for day in days))
    lines, frame = frame_text(state, empty, settings, 80, 24, now)
    assert lines[6:9] == ["-- Daily usage - last 30 days (Europe/Berlin) ----------------------------------",
                          "No usage in the last 30 days.", ""]
    assert frame.total_rows == 0


def test_a_sessions_source_is_where_most_of_its_requests_came_from():
    """A session whose one lost turn was re-imported is still Claude Code's telemetry (4 of 5 requests), marked as
    holding some from a transcript; most from transcripts: transcript, * when ccmon priced some."""
    assert ccmon.session_source(ccmon.ORIGIN_TRANSCRIPT, False, 1, 5) == "events+tx"
    assert ccmon.session_source(ccmon.ORIGIN_TRANSCRIPT_COST, True, 1, 3) == "metrics+tx"
    assert ccmon.session_source(ccmon.ORIGIN_TRANSCRIPT, False, 4, 5) == "transcript*"
    assert ccmon.session_source(ccmon.ORIGIN_TRANSCRIPT_COST, False, 3, 3) == "transcript"
    assert ccmon.session_source(0, False, 0, 5) == "events" and ccmon.session_source(0, True, 0, 2) == "metrics"


def test_monitor_error_lines_wrap_to_the_width():
    now, settings = 1_773_138_600_000, _settings()
    error = "the server speaks TLS (it closed a plaintext connection): use https://127.0.0.1:4317 or monitor.tls_ca"
    down = ccmon.ServerStatus(False, error, now + 4000, 3)
    lines, _ = frame_text(ccmon.ViewState(), None, settings, 80, 24, now, status=down)
    assert lines[2:8] == [
        " * disconnected (the server speaks TLS (it closed a plaintext connection): use",
        "   https://127.0.0.1:4317 or monitor.tls_ca) - retrying in 4s | all time",
        "",
        "Cannot reach the ccmon server at 127.0.0.1:4317: the server speaks TLS (it",
        "   closed a plaintext connection): use https://127.0.0.1:4317 or monitor.tls_ca.",
        "   Is 'ccmon --server' running?"]
    narrow, _ = frame_text(ccmon.ViewState(), None, settings, 40, 24, now, status=down)
    assert narrow[2:10] == [
        " * disconnected - retrying in 4s",
        "",
        "Cannot reach the ccmon server at",
        "   127.0.0.1:4317: the server speaks TLS",
        "   (it closed a plaintext connection):",
        "   use https://127.0.0.1:4317 or",
        "   monitor.tls_ca. Is 'ccmon --server'",
        "   running?"]
    assert max(map(len, lines + narrow)) <= 80 and max(map(len, narrow)) <= 40


# ---------------------------------------------------------------- monitor in a real terminal

def terminal_screen(cols: int, rows: int):
    """A pyte screen and byte stream that also understand SU/SD (CSI n S / CSI n T) and REP (CSI n b),
    which ncurses sends to xterm-like terminals and pyte 0.8 does not implement."""
    import pyte

    class Screen(pyte.Screen):
        last_char = " "

        def draw(self, data: str) -> None:
            super().draw(data)
            if data:
                self.last_char = data[-1]

        def repeat_last(self, count=1, *_, **__):
            self.draw(self.last_char * (count or 1))

        def scroll_up(self, count=1, *_, **__):
            top, bottom = self.margins or pyte.screens.Margins(0, self.lines - 1)
            for _ in range(count or 1):
                for y in range(top, bottom):
                    self.buffer[y] = self.buffer[y + 1]
                self.buffer.pop(bottom, None)
            self.dirty.update(range(self.lines))

        def scroll_down(self, count=1, *_, **__):
            top, bottom = self.margins or pyte.screens.Margins(0, self.lines - 1)
            for _ in range(count or 1):
                for y in range(bottom, top, -1):
                    self.buffer[y] = self.buffer[y - 1]
                self.buffer.pop(top, None)
            self.dirty.update(range(self.lines))

    class Stream(pyte.ByteStream):
        csi = {**pyte.ByteStream.csi, "S": "scroll_up", "T": "scroll_down", "b": "repeat_last"}

    screen = Screen(cols, rows)
    return screen, Stream(screen)


class MonitorPty:
    """The real monitor in a pseudo-terminal, its screen read through pyte."""

    def __init__(self, args: list[str], cols: int = 80, rows: int = 24, term: str = "xterm-256color",
                 cwd: Path = ROOT, env: dict | None = None, command: list[str] | None = None):
        import fcntl
        import termios
        self.fcntl, self.termios = fcntl, termios
        self.master, slave = os.openpty()
        self._set_size(slave, cols, rows)
        self.screen, self.stream = terminal_screen(cols, rows)
        self.lock = threading.Lock()
        environment = {**os.environ, "TERM": term, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **(env or {})}
        # A session of its own with the pty as its controlling terminal, so ^C is SIGINT: util-linux's setsid
        # does that before it execs the monitor (same pid). Not a preexec_fn: that makes Python fork() rather than
        # vfork(), and in the child gRPC's fork handlers restart a poller on an epoll fd close_fds has closed
        # ("Epoll1Poller encountered epoll_wait error: Bad file descriptor"), killing it before the exec.
        self.proc = subprocess.Popen(["setsid", "--ctty", *(command or CCMON), *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=environment, cwd=cwd)
        os.close(slave)
        self.raw = bytearray()
        threading.Thread(target=self._pump, daemon=True).start()

    def _set_size(self, fd: int, cols: int, rows: int) -> None:
        import struct
        self.fcntl.ioctl(fd, self.termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.raw += data
                self.stream.feed(data)

    @property
    def text(self) -> str:
        with self.lock:
            return "\n".join(self.screen.display)

    def wait_for(self, predicate, what: str, timeout: float = 20.0) -> str:
        """The screen once it shows `predicate` and has stopped changing: curses writes a frame in pieces,
        and a loaded machine can leave one half-drawn for a moment."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.text
            if (predicate(text) if callable(predicate) else predicate in text):
                time.sleep(0.15)
                if self.text == text:
                    return text
                continue
            time.sleep(0.05)
        raise AssertionError(f"screen never showed {what}:\n{self.text}")

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def resize(self, cols: int, rows: int) -> None:
        with self.lock:
            self._set_size(self.master, cols, rows)
            self.screen.resize(rows, cols)
        self.proc.send_signal(signal.SIGWINCH)

    def close(self) -> int:
        code = self.proc.wait(10)
        os.close(self.master)
        return code

    def __enter__(self) -> MonitorPty:
        return self

    def __exit__(self, *_) -> None:
        if self.proc.poll() is None:  # a test that failed midway leaves no monitor behind
            self.proc.kill()


def line_with(text: str, prefix: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(prefix))


def block_flag_for_now() -> str:
    """A -b value whose block started two hours ago (UTC), so recent requests fall inside it."""
    hour = (dt.datetime.now(dt.timezone.utc).hour - 2) % 24
    return f"{hour % 12 or 12}{'am' if hour < 12 else 'pm'}"


def test_monitor_end_to_end_in_a_pty(tmp_path):
    srv = ServerProcess(tmp_path).start()
    moments = [hours_ago(0.5), hours_ago(0.25), hours_ago(30)]
    events = [("api_request", api_request(1, moments[0], input_tokens="1200", output_tokens=300,
                                          cost_usd=0.25, duration_ms=4000)),
              ("api_request", api_request(2, moments[1], model="claude-haiku-4-5-20251001", input_tokens=50,
                                          output_tokens=20, cache_read_tokens=1000, cost_usd=0.001)),
              ("api_request", api_request(3, moments[2], model="claude-opus-4-1", input_tokens=2000,
                                          output_tokens=1000, cost_usd=1.5))]
    sdk_export(srv.port, events)
    monitor = MonitorPty(["--monitor-server", srv.target, "-b", block_flag_for_now(), "--claude-plan", "pro",
                          "--monitor-refresh-interval", "1s"], cwd=tmp_path, env={"HOME": str(tmp_path)})
    try:
        screen = monitor.wait_for("Requests 1-2 of 2", "the current block's requests")
        assert "connected 127.0.0.1" in screen and "current block" in screen
        assert line_with(screen, "Premium").split() == ["Premium", "1", "1.50K", "0", "1.50K", "$0.2500",
                                                        line_with(screen, "Premium").split()[-1]]
        assert "1.50K / 7.00K" in line_with(screen, "Block ")
        monitor.send(b"a")
        screen = monitor.wait_for("Requests 1-3 of 3", "all time")
        assert line_with(screen, "Total").split()[1:6] == ["3", "4.57K", "1.00K", "5.57K", "$1.75"]
        monitor.send(b"d")
        screen = monitor.wait_for("Requests 1-2 of 2", "the last 24 hours")
        assert "last 24 hours" in screen.splitlines()[2]
        monitor.send(b"w")
        monitor.wait_for("Requests 1-3 of 3", "the last 7 days")
        rows = [line for line in monitor.text.splitlines() if re.match(r"\d\d-\d\d \d\d:\d\d ", line)]
        assert [row.split()[2] for row in rows] == ["haiku-4-5", "sonnet-4-5", "opus-4-1"]  # 80 columns: short names
        monitor.send(b"o")
        monitor.wait_for("oldest first", "the sort order")
        screen = monitor.wait_for(lambda text: re.search(r"\d\d:\d\d opus-4-1 .*\n.*sonnet-4-5", text),
                                  "oldest first rows")
        monitor.send(b"\t")
        # From the first day used: two days, three in the first half hour of a UTC day, when the recent requests
        # may fall on either side of midnight.
        days = (dt.date.fromisoformat(utc_today()) - dt.date.fromisoformat(moments[2][:10])).days + 1
        screen = monitor.wait_for(f"Daily usage - last {days} days (UTC)", "the daily tab")
        assert line_with(screen, "Total").split() == ["Total", "1", "2", "3.20K", "1.30K", "4.50K", "$1.75", "$1.75"]
        assert line_with(screen, "Date").rstrip().endswith("Prem $ longest $1.50")  # the cache columns gave way
        day_costs: dict[str, float] = {}
        for moment, cost in zip(moments, (0.25, 0.001, 1.5)):
            day_costs[moment[:10]] = round(day_costs.get(moment[:10], 0) + cost, 3)
        # A day's cost / $1.50 × 16 cells, in eighths: $0.251 and $0.25 21 (21.4 and 21.3), $0.001 the one-step least
        bars = {1.5: "█" * 16, 0.251: "██▋", 0.25: "██▋", 0.001: "▏"}
        assert sorted(line.split()[-1] for line in screen.splitlines()
                      if re.match(r"\d{4}-\d\d-\d\d ", line) and not line.split()[-1].startswith("$")) == \
            sorted(bars[cost] for cost in day_costs.values())
        monitor.send(b"3")
        screen = monitor.wait_for("Models - last 7 days", "the models tab")
        assert line_with(screen, "opus-4-1").split()[1:6] == ["1", "2.00K", "1.00K", "0", "$1.50"]
        monitor.send(b"4")
        screen = monitor.wait_for("Sessions - last 7 days (1) - Enter: details", "the sessions tab")
        monitor.send(b"\r")
        screen = monitor.wait_for("Session sess-1 (3 entries) - Esc: back", "a session's timeline")
        assert [line.split()[1] for line in screen.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)] == \
            ["api_request"] * 3
        monitor.send(b"\x1b")
        monitor.wait_for("Sessions - last 7 days (1) - Enter: details", "the sessions list again")
        monitor.send(b"5")
        monitor.wait_for("Retries exhausted: 0", "the tools tab")
        monitor.send(b"6")
        screen = monitor.wait_for("Users by cost", "the users tab")
        monitor.send(b"1")
        monitor.wait_for("Requests 1-3 of 3", "the current tab again")
        monitor.send(b"b")
        monitor.wait_for(lambda text: "current block" in text and "Requests 1-2 of 2" in text, "the block filter")
        monitor.resize(120, 30)
        screen = monitor.wait_for(lambda text: text.splitlines()[0].rstrip().endswith("v0.1.0") and
                                  "Session" in text, "the resized screen")
        assert len(screen.splitlines()) == 30 and len(screen.splitlines()[0]) == 120
        monitor.resize(30, 10)
        monitor.wait_for("terminal too small: 30x10", "the too-small notice")
        monitor.resize(80, 24)
        monitor.wait_for("Requests 1-2 of 2", "the screen after growing back")
        srv.stop()
        monitor.wait_for("disconnected (connection refused) - retrying in", "the disconnected status")
        assert "$0.2500" in monitor.text  # the last data stays
        srv.args[srv.args.index("--server-address") + 1] = srv.target
        srv.start()
        monitor.send(b"r")
        monitor.wait_for("connected 127.0.0.1", "the reconnection", timeout=40)
        monitor.send(b"q")
        assert monitor.close() == 0
    finally:
        if monitor.proc.poll() is None:
            monitor.proc.kill()
        if srv.proc.poll() is None:
            srv.stop()


@e2e
def test_the_charts_tab_in_a_pty_against_a_real_server(tmp_path):
    """The real monitor on a real server's requests: $0.25 two hours back and $0.50 in the last hour (UTC), drawn on
    the Charts tab's last 24 hours as columns two cells wide, the $0.50 one full height (7 rows) and the $0.25 one
    3½ rows; `c` redraws it in tokens."""
    srv = ServerProcess(tmp_path).start()
    hour = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)

    def at(moment: dt.datetime) -> str:
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    sdk_export(srv.port, [("api_request", api_request(1, at(hour - dt.timedelta(minutes=110)), input_tokens="1000",
                                                      output_tokens=200, cost_usd=0.25)),
                          ("api_request", api_request(2, at(hour - dt.timedelta(minutes=50)), input_tokens="3000",
                                                      output_tokens=600, cost_usd=0.5))])

    def expected(scale: str, cells: int, small: int, current: dt.datetime) -> list[str]:
        """The 24 hours to the end of `current`'s hour, columns `cells` wide (a space between when 3 or more): the
        two requests' hours are the columns 2 and 1 before the last, the second full height (7 rows of 8 eighths),
        the first `small` eighths high."""
        end = ccmon.ms_from_datetime(current + dt.timedelta(hours=1))
        back = (current - hour) // dt.timedelta(hours=1)  # 1 when the clock passed the hour meanwhile
        pad, gap = " " * (cells * (21 - back)), " " * (cells >= 3)
        glyph = 2 if cells == 2 else cells - 1

        def column(eighths: int, row: int) -> str:
            return " ▁▂▃▄▅▆▇█"[min(8, max(0, eighths - (6 - row) * 8))] * glyph + gap

        rows = [f"{scale if row == 0 else ''.rjust(len(scale))} │{pad}{column(small, row)}{column(56, row)}".rstrip()
                for row in range(7)]
        return ["each column: 1 hour", *rows, f"{'0'.rjust(len(scale))} └{'─' * 24 * cells}",
                " " * (len(scale) + 2) + ccmon.time_axis(end - ccmon.DAY_MS, end, 24 * cells, ccmon.ZoneInfo("UTC"))]

    def shows(scale: str, cells: int, small: int):
        def check(text: str) -> bool:
            lines = [line.rstrip() for line in text.splitlines()]
            return any(lines[4:14] == expected(scale, cells, small, hour + dt.timedelta(hours=later))
                       for later in (0, 1))
        return check

    with MonitorPty(["--monitor-server", srv.target, "--monitor-timezone", "UTC", "--monitor-refresh-interval", "1s"],
                    cwd=tmp_path, env={"HOME": str(tmp_path)}) as monitor:
        try:
            monitor.wait_for("Requests 1-2 of 2", "the requests")
            monitor.send(b"9")
            screen = monitor.wait_for(shows("$0.5000", 2, 28), "the last 24 hours' cost")  # $0.25: 3.5 rows
            assert screen.splitlines()[3].startswith("── Cost per hour - last 24 hours (1 of 3; j/k: more) ──")
            assert "last 4 weeks by the hour" in screen.splitlines()[2]
            monitor.send(b"c")
            screen = monitor.wait_for(shows("3.60K", 3, 19), "the last 24 hours' tokens")  # 1.20K / 3.60K × 56: 19
            assert screen.splitlines()[3].startswith("── Tokens per hour - last 24 hours (1 of 3; j/k: more) ──")
            monitor.send(b"q")
            assert monitor.close() == 0
        finally:
            srv.stop()


@e2e
def test_the_burnup_in_a_pty_against_a_real_server(tmp_path):
    """With -b and the pro plan's guess, the Charts tab starts with the block's burn-up: 1.50K premium tokens used
    an hour and a half ago, no recent pace (so the projection stays at 1.50K), the plan's guess of 7.00K the top
    line, named a guess; the Current tab draws it above the requests, at its least from 80x24."""
    srv = ServerProcess(tmp_path).start()
    sdk_export(srv.port, [("api_request", api_request(1, hours_ago(1.5), input_tokens="1200", output_tokens=300,
                                                      cost_usd=0.25))])
    with MonitorPty(["--monitor-server", srv.target, "-b", block_flag_for_now(), "--claude-plan", "pro",
                     "--monitor-timezone", "UTC", "--monitor-refresh-interval", "1s"], rows=40, cwd=tmp_path,
                    env={"HOME": str(tmp_path)}) as monitor:
        try:
            screen = monitor.wait_for("█ used 1.50K  ─ plan's guess 7.00K  · projected 1.50K", "the Current burn-up")
            lines = [line.rstrip() for line in screen.splitlines()]
            title = lines.index("── 5-hour window - premium tokens " + "─" * 46)
            assert lines[title + 1] == "7.00K │" + "─" * 73  # the guess: the top of the scale
            assert lines[title + 11].startswith("── Requests 1-1 of 1 ──")
            monitor.resize(80, 24)  # at its least: 2 rows of columns, the requests under it

            chart_title = "── 5-hour window - premium tokens " + "─" * 46

            def redrawn(text: str) -> bool:  # not the taller frame cut to 24 lines, which the resize leaves at first
                lines = text.splitlines()
                at = lines.index(chart_title) if chart_title in lines else len(lines)
                return any(line.startswith("── Requests 1-1 of 1") for line in lines[at + 6:at + 7])
            screen = monitor.wait_for(redrawn, "the Current burn-up at 80x24")
            lines = [line.rstrip() for line in screen.splitlines()]
            title = lines.index(chart_title)
            assert lines[title + 1] == "7.00K │" + "─" * 73
            assert lines[title + 5] == "█ used 1.50K  ─ plan's guess 7.00K  · projected 1.50K"
            assert lines[title + 6].startswith("── Requests 1-1 of 1 ──")
            monitor.send(b"9")
            screen = monitor.wait_for("5-hour window - premium tokens (1 of 4; j/k: more)", "the Charts tab")
            assert "█ used 1.50K  ─ plan's guess 7.00K  · projected 1.50K" in screen
            monitor.send(b"q")
            assert monitor.close() == 0
        finally:
            srv.stop()


@pytest.mark.parametrize("term", ["xterm", "screen", "tmux-256color", "linux", "vt100"])
def test_monitor_runs_on_every_terminal_type_and_without_color(term, tmp_path):
    with MonitorPty(["--monitor-server", "127.0.0.1:9"], term=term, cwd=tmp_path,
                    env={"HOME": str(tmp_path), "NO_COLOR": "1", "LANG": "C", "LC_ALL": "C"}) as monitor:
        screen = monitor.wait_for("disconnected", "the unreachable server")
        assert "Cannot reach the ccmon server at 127.0.0.1:9" in screen
        assert "*" in screen and "●" not in screen  # ASCII glyphs outside UTF-8 locales
        sgr_params = {p for group in re.findall(rb"\x1b\[([0-9;]*)m", bytes(monitor.raw)) for p in group.split(b";")}
        assert not {p for p in sgr_params if re.fullmatch(rb"(3|4|9|10)[0-8]", p)}  # no colours with NO_COLOR
        monitor.send(b"\x03")
        assert monitor.close() == 0


def test_the_monitor_follows_the_terminals_size_whatever_columns_and_lines_say(tmp_path):
    """$COLUMNS and $LINES exported (pytest-xdist's workers do) must not pin the screen: a resize is drawn anew."""
    with MonitorPty(["--monitor-server", "127.0.0.1:9"], cols=100, rows=30, cwd=tmp_path,
                    env={"HOME": str(tmp_path), "COLUMNS": "80", "LINES": "24"}) as monitor:
        screen = monitor.wait_for("disconnected", "the unreachable server")
        assert len(screen.splitlines()[0].rstrip()) > 80  # drawn 100 columns wide: the header's version at the end
        monitor.resize(30, 10)
        monitor.wait_for("terminal too small: 30x10", "the too-small notice")
        monitor.send(b"q")
        assert monitor.close() == 0


def test_ctrl_c_quits_the_monitor_started_with_sigint_ignored(tmp_path):
    """A parent that ignores SIGINT (a test runner's worker, nohup) passes SIG_IGN on; Ctrl-C must still quit."""
    ignoring = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])", str(ROOT / "ccmon.py")]
    with MonitorPty(["--monitor-server", "127.0.0.1:9"], command=ignoring, cwd=tmp_path,
                    env={"HOME": str(tmp_path)}) as monitor:
        monitor.wait_for("disconnected", "the unreachable server")
        monitor.send(b"\x03")
        assert monitor.close() == 0


def test_monitor_bad_address_and_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["--monitor-server", "nonsense"], capsys)
    assert (code, err) == (2, "ccmon: config error: --monitor-server: invalid address 'nonsense' (use HOST:PORT such "
                               "as 127.0.0.1:4317)\n")
    with MonitorPty(["--server", "no-such-host.invalid:4317"], cwd=tmp_path, env={"HOME": str(tmp_path)}) as monitor:
        screen = monitor.wait_for("disconnected", "the DNS failure")
        assert "cannot resolve the server's host name" in screen
        assert "Traceback" not in screen
        monitor.send(b"q")
        assert monitor.close() == 0


# ---------------------------------------------------------------- command line

CONFIG_ERRORS = [
    (["--claude-plan", "gold"], "--claude-plan: unknown plan 'gold' (accepted: unset, pro, max, max20)"),
    (["--monitor-timezone", "Mars/Olympus"],
     "--monitor-timezone: unknown timezone 'Mars/Olympus' (use an IANA name such as 'UTC', 'Europe/Berlin' "
     "or 'Asia/Taipei')"),
    (["--claude-max-tokens", "-5"],
     "--claude-max-tokens: invalid token limit '-5' (use a whole number >= 0, 0 meaning the plan's default, or "
     "'auto' to learn it)"),
    (["--server-retention", "5x"],
     "--server-retention: invalid retention '5x' (use 'never', or a number of days or hours such as '30d' or "
     "'48h')"),
    (["--server-retention", "12h"], "--server-retention: retention '12h' is below the minimum of 24h"),
    (["--monitor-refresh-interval", "0s"],
     "--monitor-refresh-interval: interval '0s' is outside the allowed range 1s to 5m"),
    (["--monitor-refresh-interval", "10m"],
     "--monitor-refresh-interval: interval '10m' is outside the allowed range 1s to 5m"),
    (["--monitor-refresh-interval", "fast"],
     "--monitor-refresh-interval: invalid interval 'fast' (use seconds or minutes such as '5s' or '1m', from "
     "1s to 5m)"),
    (["--monitor-statusline-wait", "quick"], "--monitor-statusline-wait: invalid wait 'quick' (use milliseconds "
                                             "or seconds such as '250ms' or '2s', from 50ms to 30s)"),
    (["--monitor-statusline-wait", "1m"], "--monitor-statusline-wait: invalid wait '1m' (use milliseconds or "
                                          "seconds such as '250ms' or '2s', from 50ms to 30s)"),
    (["--monitor-statusline-wait", "10ms"], "--monitor-statusline-wait: wait '10ms' is outside the allowed range "
                                            "50ms to 30s"),
    (["--server-address", "localhost"],
     "--server-address: invalid address 'localhost' (use HOST:PORT such as 127.0.0.1:4317)"),
    (["--monitor-server", "host:99999"],
     "--monitor-server: invalid address 'host:99999' (use HOST:PORT such as 127.0.0.1:4317)"),
    (["--config", "/nonexistent/ccmon.toml"], "--config: no such file: /nonexistent/ccmon.toml"),
    (["--server-http-address", "nope"],
     "--server-http-address: invalid address 'nope' (use HOST:PORT such as 127.0.0.1:4317) or 'off'"),
    (["--server-max-message-size", "lots"],
     "--server-max-message-size: invalid size 'lots' (use bytes or a size such as '16MiB')"),
    (["--server-max-message-size", "2GiB"],
     "--server-max-message-size: size '2GiB' is outside the allowed range 1MiB to 1GiB"),
    (["--server-max-message-size", "100KB"],
     "--server-max-message-size: size '100KB' is outside the allowed range 1MiB to 1GiB"),
    (["--server-tls-cert", "/nonexistent/cert.pem"], "--server-tls-cert: no such file: /nonexistent/cert.pem"),
    (["--server-tls-cert", __file__], "--server-tls-cert: TLS needs both server.tls_cert and server.tls_key"),
    (["--server-tls-client-ca", __file__],
     "--server-tls-client-ca: mutual TLS needs server.tls_cert and server.tls_key too"),
    (["--monitor-tls-key", __file__],
     "--monitor-tls-key: a client certificate needs both monitor.tls_cert and monitor.tls_key"),
    (["--server-token", "two words"], "--server-token: " + TOKEN_RULE),
    (["--alert", "150"], "--alert: invalid alert threshold '150' (use whole percentages from 1 to 100, such as 80)"),
    (["--alert", "80", "--alert", "eighty"],
     "--alert: invalid alert threshold 'eighty' (use whole percentages from 1 to 100, such as 80)"),
]


@pytest.mark.parametrize("args,message", [
    (["--formt", "@daily_cost"], "ccmon: unknown option --formt; did you mean --format? (see ccmon --help)"),
    (["--monitor-sever=x:1"], "ccmon: unknown option --monitor-sever; did you mean --monitor-server? (see ccmon "
                              "--help)"),
    (["--frobnicate"], "ccmon: unknown option --frobnicate (see ccmon --help)"),
    (["--server", "--format", "@daily_cost"], "ccmon: --server and --format cannot be used together (see ccmon "
                                              "--help)"),
    (["--format", "@daily_cost", "--json"], "ccmon: --format and --json cannot be used together (see ccmon --help)"),
    (["--health", "--json"], "ccmon: --health and --json cannot be used together (see ccmon --help)"),
    (["--monitor-server", "x:1", "report", "dialy"], "ccmon report: argument kind: invalid choice: 'dialy' (choose "
     "from 'daily', 'weekly', 'monthly', 'session', 'model', 'blocks', 'project', 'agent', 'limits') (see ccmon "
     "report --help)"),
    (["report", "daily", "--csv", "--json"], "ccmon report: argument --json: not allowed with argument --csv (see "
                                             "ccmon report --help)"),
])
def test_command_line_mistakes_get_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_main(args, capsys) == (2, message + "\n")


def test_options_go_before_or_after_the_report_command(capsys):
    for argv in (["--monitor-server", "report:1", "report", "daily", "--csv"],
                 ["report", "--monitor-server", "report:1", "daily", "--csv"],
                 ["-b", "auto", "report", "daily", "--csv", "--monitor-server=report:1"]):
        words = ccmon.without_command(argv, "report", ccmon.build_parser())
        args = ccmon.build_report_parser().parse_args(words)
        assert (args.kind, args.monitor_server, args.csv) == ("daily", "report:1", True)
    assert ccmon.without_command(["--format", "report"], "report", ccmon.build_parser()) is None
    assert "report {daily,weekly,monthly,session,model,blocks,project,agent,limits}" in \
        " ".join(ccmon.build_parser().format_help().split())  # wherever the help's lines wrap


@pytest.mark.parametrize("args,message", CONFIG_ERRORS)
def test_config_flag_errors(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, err = run_main(["--server", *args], capsys)
    assert code == 2
    assert err == f"ccmon: config error: {message}\n"


def test_version_flag(capsys):
    code, _ = run_main(["--version"], capsys)
    assert code == 0


# ---------------------------------------------------------------- ccmon.pyz and the Docker image

PYZ_PYTHONS, PYZ_PLATFORM = "CPython 3.11-3.14", f"manylinux2014_{os.uname().machine}"  # a default build's target


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pyz") / "ccmon.pyz"
    result = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"built {re.escape(str(output))} \(\d+\.\d MB, build [0-9a-f]{{16}}\) for "
                        rf"{re.escape(PYZ_PYTHONS)} on {PYZ_PLATFORM}\n", result.stdout)
    return output


def bare(pyz: Path, python: str = sys.executable) -> list[str]:
    """The interpreter with no site-packages at all (-S) and no user environment (-I)."""
    return [python, "-I", "-S", str(pyz)]


@pytest.fixture(scope="module")
def pythons() -> dict[tuple[int, int], str]:
    """One CPython 3 per minor version found on this machine: this one, pyenv's, python3.X on PATH."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [sys.executable, *map(str, sorted(pyenv.glob("*/bin/python3"))),
                  *filter(None, (shutil.which(f"python3.{minor}") for minor in range(4, 20)))]
    found: dict[tuple[int, int], str] = {}
    for python in candidates:
        probe = subprocess.run([python, "-c", "import sys; print(sys.implementation.name, *sys.version_info[:2])"],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:  # a pyenv shim for a version it does not have
            continue
        name, major, minor = probe.stdout.split()
        if name == "cpython":
            found.setdefault((int(major), int(minor)), python)
    return found


def test_bare_interpreter_has_no_dependencies(tmp_path):
    probe = subprocess.run([sys.executable, "-I", "-S", "-c", "import grpc"], capture_output=True, text=True)
    assert "No module named 'grpc'" in probe.stderr  # so the pyz tests below prove the pyz carries everything


def test_running_from_source_without_the_dependencies_says_so_in_one_line(tmp_path):
    """python3 ccmon.py on an interpreter without grpc & co. (-S: no site-packages): one line naming what is missing
    and the two ways out, no traceback. `import ccmon` there raises as any import would (a program importing it
    handles that itself)."""
    result = subprocess.run([sys.executable, "-E", "-S", str(ROOT / "ccmon.py"), "--version"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", (
        "ccmon: missing Python package 'grpc': run the single-file ccmon.pyz, or install the dependencies with "
        "'pip install -r requirements.txt'\n"))
    imported = subprocess.run([sys.executable, "-E", "-S", "-c", "import ccmon"], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
    assert imported.returncode == 1 and "Traceback" in imported.stderr
    assert imported.stderr.endswith("ModuleNotFoundError: No module named 'grpc'\n")


@e2e
def test_pyz_server_format_and_monitor_with_nothing_installed(pyz, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    srv = ServerProcess(tmp_path, command=bare(pyz), env=env).start()
    try:
        sdk_export(srv.port, MIXED_EVENTS)
        result = run_ccmon(["--monitor-server", srv.target, "--format", "@monthly_tokens"], tmp_path,
                           command=bare(pyz), env=env)
        assert result.returncode == 0 and result.stdout in {"0\n", "52.3K\n"}  # March 2026 data; now is later
        stats_now = stats(srv)
        assert (stats_now.total_requests, stats_now.total_cost.amount) == (3, 0.143075)
        with MonitorPty(["--monitor-server", srv.target, "--monitor-timezone", "America/New_York"],
                        cwd=tmp_path, env=env, command=bare(pyz)) as monitor:
            screen = monitor.wait_for("Requests 1-3 of 3", "the monitor from the pyz")
            assert line_with(screen, "Total").split()[1:2] == ["3"]
            monitor.send(b"q")
            assert monitor.close() == 0
        yaml_config = tmp_path / "config.yaml"
        yaml_config.write_text("claude:\n  plan: max20\n")
        result = run_ccmon(["--monitor-server", srv.target, "--format", "@daily_plan_usage"], tmp_path,
                           command=bare(pyz), env=env)
        assert (result.returncode, result.stdout, result.stderr) == (0, "0%\n", "")  # the bundled PyYAML
        for path, name in (("/", "dashboard.html"), ("/dashboard.js", "dashboard.js"), ("/dashboard.css",
                                                                                        "dashboard.css")):
            response, body = web(srv.http_port, path)  # the dashboard's files, unpacked from the pyz with ccmon.py
            assert (response.status, body) == (200, (ROOT / name).read_bytes())
        assert dashboard_api(srv.http_port)["period_usage"]["total"]["requests"] == 3
    finally:
        srv.stop()


@e2e
def test_pyz_version_names_the_build_without_unpacking_or_grpc(pyz, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    for flag in ("--version", "-v"):
        result = run_ccmon([flag], tmp_path, command=[sys.executable, "-X", "importtime", *bare(pyz)[1:]], env=env)
        match = re.fullmatch(rf"ccmon {re.escape(ccmon.VERSION)} \(build ([0-9a-f]{{16}}), "
                             rf"{re.escape(PYZ_PYTHONS)}, {PYZ_PLATFORM}\)\n", result.stdout)
        assert result.returncode == 0 and match, result.stdout
        imported = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()[1:]]
        assert "zipimport" in imported and not [name for name in imported if name.startswith(("grpc", "google"))]
    assert not (tmp_path / "cache").exists()
    # The build id it names is the cache folder a real run unpacks into.
    assert run_ccmon(["--help"], tmp_path, command=bare(pyz), env=env).returncode == 0
    assert os.listdir(tmp_path / "cache" / "ccmon") == [match.group(1)]


@contextlib.contextmanager
def canned_http_server(status: int, body: bytes):
    """A loopback HTTP server that answers every POST with `status` and `body`, as some server that is not ccmon
    might; yields its port."""
    import http.server

    class Canned(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Canned)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def imported_modules(importtime_stderr: str) -> list[str]:
    """The modules `python -X importtime` reports, from its stderr."""
    return [line.rsplit("|", 1)[1].strip() for line in importtime_stderr.splitlines()
            if line.startswith("import time:")][1:]


@e2e
def test_pyz_status_line_takes_the_quick_route_with_the_same_figures(pyz, tmp_path):
    """Claude Code runs the status line after every turn. From the pyz, once a full run has written down how, the
    bootstrap sends stdin to the server's POST /api/statusline (TLS and token as configured) and prints its answer:
    nothing of ccmon's, gRPC's or protobuf's is loaded, the figures are the same and the reading is stored. A config
    file written since, a template with quick query figures, or a server gone, take the full run again."""
    token = "quick-route-token"
    cert, key = make_certificate(tmp_path, "server")
    srv = ServerProcess(tmp_path, "--server-tls-cert", str(cert), "--server-tls-key", str(key),
                        env={"CCMON_TOKEN": token}).start()
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), "CCMON_TOKEN": token}
    live = live_input("s-q")  # once: the resets it names are minutes from now, and runs may straddle a minute

    def status_line_from_pyz(*extra: str, stdin: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-X", "importtime", *bare(pyz)[1:], "statusline", "--monitor-server",
                               f"https://127.0.0.1:{srv.port}", "--monitor-tls-ca", str(cert), "--monitor-timezone",
                               "UTC", "--monitor-statusline-wait", "20s", *extra],
                              input=json.dumps(stdin or live), capture_output=True, text=True,
                              cwd=tmp_path, timeout=60, env=env)

    def of_ccmon(result: subprocess.CompletedProcess) -> list[str]:
        return [name for name in imported_modules(result.stderr) if name.startswith(("ccmon", "grpc", "google"))]

    try:
        assert sdk_export(srv.port, [("api_request", {**api_request(1, earlier_today(0.1), session="s-q",
                                                                    cost_usd=1.25), "user.email": "q@example.com"})],
                          headers={"authorization": f"Bearer {token}"}, ca=cert) == ["SUCCESS"]
        full = status_line_from_pyz()
        assert full.returncode == 0 and "ccmon" in of_ccmon(full)
        assert full.stdout.startswith("Sonnet 4.5 | ctx 3% | session $1.25 | today $1.25 | 5h 42% (resets ")
        [build] = [path for path in (tmp_path / "cache" / "ccmon").iterdir() if path.is_dir()]
        routes = build / "quick-routes.json"  # the build's: a new one starts without
        assert stat.S_IMODE(routes.stat().st_mode) == 0o600  # it holds the token
        key = json.dumps(["statusline", "--monitor-server", f"https://127.0.0.1:{srv.port}", "--monitor-tls-ca",
                          str(cert), "--monitor-timezone", "UTC", "--monitor-statusline-wait", "20s"])
        assert json.loads(routes.read_text())[key]["url"] == f"https://127.0.0.1:{srv.http_port}/api/statusline"
        quick = status_line_from_pyz()
        assert (quick.returncode, quick.stdout, of_ccmon(quick)) == (0, full.stdout, [])
        assert db_rows(srv.db, "SELECT s.session_id, five_hour_percent FROM limit_readings JOIN sessions s ON "
                               "s.id = limit_readings.session") == [("s-q", 42.0)] * 2
        # A config file now read: the full run again, which writes the route anew.
        (tmp_path / ".ccmon").mkdir()
        (tmp_path / ".ccmon" / "config.toml").write_text('[claude]\nplan = "max"\n')
        assert of_ccmon(status_line_from_pyz()) != [] and of_ccmon(status_line_from_pyz()) == []
        # Quick query figures are worked out by the client, from its own settings: no route for them.
        plan = status_line_from_pyz("--format", "@model @daily_plan_usage")
        assert re.fullmatch(r"Sonnet 4\.5 \d+%\n", plan.stdout) and of_ccmon(plan) != []
        assert of_ccmon(status_line_from_pyz("--format", "@model @daily_plan_usage")) != []
        # A template with colours of its own has no route: the quick route shows a server's control characters as
        # escapes, and the full run prints the template as written.
        colours = [status_line_from_pyz("--format", "\x1b[32m@model\x1b[0m") for _ in range(2)]
        assert [(result.stdout, of_ccmon(result) != []) for result in colours] == [("\x1b[32mSonnet 4.5\x1b[0m\n", True)] * 2
        # A config named from the folder it runs in (a relative --config) ties the route to that folder.
        (tmp_path / "cfg.toml").write_text('[claude]\nplan = "pro"\n')
        named = [status_line_from_pyz("--config", "cfg.toml") for _ in range(2)]
        assert [of_ccmon(result) != [] for result in named] == [True, False]
        elsewhere = tmp_path / "project-b"
        elsewhere.mkdir()
        moved = subprocess.run([sys.executable, "-X", "importtime", *bare(pyz)[1:], "statusline", "--monitor-server",
                                f"https://127.0.0.1:{srv.port}", "--monitor-tls-ca", str(cert), "--monitor-timezone",
                                "UTC", "--monitor-statusline-wait", "20s", "--config", "cfg.toml"],
                               input=json.dumps(live_input("s-q")), capture_output=True, text=True, cwd=elsewhere,
                               timeout=60, env=env)
        assert of_ccmon(moved) != [] and "--config: no such file" in moved.stderr
        # Input larger than the page takes (32 KB) is handed on whole to the full run, which reads up to 1 MB.
        large = status_line_from_pyz(stdin={**live, "padding": "x" * 40_000})
        assert (large.stdout, of_ccmon(large) != []) == (full.stdout, True)
        # What a server answers is shown, not obeyed: its control characters as escapes, as ccmon shows any text.
        written = routes.read_text()
        with canned_http_server(200, json.dumps({"line": "\x1b]0;owned\x07red", "problem": "\x1b[2J"}).encode()) \
                as hostile:
            routes.write_text(json.dumps({key: {**entry, "url": f"http://127.0.0.1:{hostile}/api/statusline"}
                                          for key, entry in json.loads(written).items()}))
            shown = status_line_from_pyz()
        routes.write_text(written)
        assert (shown.stdout, of_ccmon(shown)) == ("\\x1b]0;owned\\x07red\n", [])
        assert [line for line in shown.stderr.splitlines() if not line.startswith("import time:")] == ["\\x1b[2J"]
        # A route the bootstrap cannot read: the full run, which writes it anew.
        routes.write_text(json.dumps({key: {"env": route["env"]} for key, route in json.loads(written).items()}))
        odd = status_line_from_pyz()
        rewritten, before = json.loads(routes.read_text()), json.loads(written)
        assert (odd.stdout, of_ccmon(odd) != []) == (full.stdout, True) and rewritten[key] == before[key]
        # The server gone: the full run, with stdin as Claude Code wrote it, and the line from it alone.
        assert srv.stop() == 0
        gone = status_line_from_pyz()
        assert gone.returncode == 0 and of_ccmon(gone) != []
        assert gone.stdout.startswith("Sonnet 4.5 | ctx 3% | 5h 42% (resets ")
    finally:
        if srv.proc.poll() is None:
            srv.stop()


@e2e
def test_pyz_takes_quick_routes_only_from_a_cache_folder_nobody_else_can_write(pyz, tmp_path):
    """The bootstrap looks for a quick route in ~/.cache/ccmon, then in $TMPDIR/ccmon-UID. A route names the server
    that gets the status line's stdin: one in a folder others may write to (anyone can make /tmp/ccmon-UID before
    its owner does) is not taken, as nothing is unpacked there. Output the quick route cannot write (a full disk, a
    closed pipe) ends as ccmon's does, in one line; with no cache folder at all, the status line says so."""
    srv = ServerProcess(tmp_path).start()
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(temp)}
    stdin = json.dumps(live_input("s-r"))

    def status_line(stdout=subprocess.PIPE, **changed: str) -> subprocess.CompletedProcess:
        return subprocess.run([*bare(pyz), "statusline", "--monitor-server", srv.target, "--monitor-statusline-wait",
                               "20s"], input=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              timeout=60, env={**env, **changed})

    try:
        full = status_line()
        assert full.returncode == 0 and full.stdout.startswith("Sonnet 4.5 | ctx 3% | 5h 42% (resets ")
        [build] = [path for path in (tmp_path / "cache" / "ccmon").iterdir() if path.is_dir()]
        routes = build / "quick-routes.json"
        written = json.loads(routes.read_text())
        with open("/dev/full", "w") as full_disk:
            no_room = status_line(stdout=full_disk)
        assert (no_room.returncode, no_room.stderr) == (1, "ccmon: cannot write the output: No space left on device\n")
        reader, writer = os.pipe()
        os.close(reader)
        with os.fdopen(writer, "w") as closed_pipe:
            no_reader = status_line(stdout=closed_pipe)
        assert (no_reader.returncode, no_reader.stderr) == (0, "")
        shared = temp / f"ccmon-{os.getuid()}"
        (shared / build.name).mkdir(parents=True)
        with canned_http_server(200, json.dumps({"line": "planted"}).encode()) as planted:
            (shared / build.name / "quick-routes.json").write_text(json.dumps(
                {key: {**route, "url": f"http://127.0.0.1:{planted}/api/statusline"} for key, route in written.items()}))
            taken = []
            for mode in (0o777, 0o700):  # others may write to it; then only its owner
                shared.chmod(mode)
                routes.unlink()
                taken.append(status_line().stdout)
        assert taken[0].startswith("Sonnet 4.5 | ctx 3% | 5h 42% (resets ") and taken[1] == "planted\n"
        (tmp_path / "not-a-folder").write_text("")
        shared.chmod(0o777)
        nowhere = status_line(XDG_CACHE_HOME=str(tmp_path / "not-a-folder"))
        assert nowhere.returncode == 1
        assert nowhere.stdout == "ccmon: cannot unpack ccmon.pyz (set XDG_CACHE_HOME to a writable folder of your own)\n"
        assert nowhere.stderr.startswith("ccmon: cannot unpack ccmon.pyz into a cache folder (")
    finally:
        srv.stop()


def test_a_route_is_not_written_to_what_answers_unlike_ccmon_nor_read_from_unreadable_tls_files(tmp_path):
    """page_answers takes only ccmon's own 400 in JSON: not a body too deeply nested to parse (which ended a full
    status line run with a traceback). A client whose TLS files went away since the configuration was read says
    so at its first call, as it says every failure (ServerUnreachable), rather than ending the monitor's poller."""
    with canned_http_server(400, b"[" * 100_000) as nested:
        assert not ccmon.page_answers(f"http://127.0.0.1:{nested}/api/statusline", ccmon.figure_config({}, "defaults"),
                                      5)
    client = ccmon.Client("https://127.0.0.1:9", tls=ccmon.TLSFiles(ca=tmp_path / "gone.pem"))
    with pytest.raises(ccmon.ServerUnreachable, match=rf"^cannot read the TLS files: No such file or directory "
                                                      rf"\({re.escape(str(tmp_path))}/gone\.pem\)$"):
        client.stats(None, ccmon.now_ms())
    client.close()


def test_the_server_renders_the_status_line_and_format_for_the_quick_route(tmp_path):
    """POST /api/statusline and /api/format: the line the client would print, for the token holder only, with its
    problems said; what cannot be rendered is refused with why (the client then does it the full way)."""
    srv = ServerProcess(tmp_path, env={"CCMON_TOKEN": "page-token"}).start()
    try:
        auth = {"Authorization": "Bearer page-token", "Content-Type": "application/json"}
        info = srv.query().GetServerInfo(ccmon_pb2.GetServerInfoRequest(),
                                         metadata=(("authorization", "Bearer page-token"),))
        assert info.quick_route_http_port == srv.http_port
        body = {"input": json.dumps(live_input("s-page")), "template": "@model | 5h @five_hour", "timezone": "UTC"}
        response, data = web(srv.http_port, "/api/statusline", "POST", auth, json.dumps(body).encode())
        assert (response.status, json.loads(data)) == (200, {"line": "Sonnet 4.5 | 5h 42%", "problem": ""})
        assert db_rows(srv.db, "SELECT s.session_id FROM limit_readings JOIN sessions s ON "
                               "s.id = limit_readings.session") == [("s-page",)]
        odd = {**body, "input": "not json", "template": ""}
        response, data = web(srv.http_port, "/api/statusline", "POST", auth, json.dumps(odd).encode())
        assert (response.status, json.loads(data)) == (200, {
            "line": "today $0.00",  # as the full run shows it: the server's figure of today, nothing from stdin
            "problem": "ccmon statusline: stdin is not JSON (8 characters); showing server figures only"})
        for headers, sent, status, error in (
                ({}, body, 401, "missing or wrong bearer token"),
                ({**auth, "Content-Type": "text/plain"}, body, 415, "the body is sent as application/json"),
                (auth, [1], 400, "the body is not a JSON object"),
                (auth, {"input": 1}, 400, 'the body is a JSON object {"input": TEXT, "template": TEXT, "timezone": '
                                          'ZONE}'),
                (auth, {**body, "timezone": "Mars/Base"}, 400, "unknown timezone 'Mars/Base'"),
                (auth, {**body, "template": "@block_usage"}, 400, "the template asks for quick query figures, which "
                                                                  "only the client works out (from its own limit "
                                                                  "settings)")):
            response, data = web(srv.http_port, "/api/statusline", "POST", headers, json.dumps(sent).encode())
            assert (response.status, json.loads(data)) == (status, {"error": error})
        assert db_rows(srv.db, "SELECT COUNT(*) FROM limit_readings") == [(1,)]
        # --format, with the client's settings as it wrote them.
        asked = {"template": "@daily_cost @block_usage", "agent": "", "settings": {"claude.block": "5am"}}
        response, data = web(srv.http_port, "/api/format", "POST", auth, json.dumps(asked).encode())
        assert (response.status, json.loads(data)) == (200, {"line": "$0.00 -", "problem": ""})  # no limit: no share
        for sent, error in (
                ({**asked, "settings": []}, 'the body is a JSON object {"template": TEXT, "agent": TEXT, "settings": '
                                            '{KEY: VALUE}}'),
                ({**asked, "agent": "vim"}, ccmon.unknown_agent("vim")),
                ({**asked, "settings": {}}, "@block_usage, @block_remaining and @block_projection need -b/--block "
                                            "(for example -b auto)"),
                ({**asked, "settings": {"claude.block": "noon"}}, "the quick query's settings: claude.block: invalid "
                                                                  "block start 'noon' (use auto, or an hour from 1 to "
                                                                  "12 followed by am or pm, such as 5am or 11pm)"),
                ({**asked, "settings": {"database.path": "/etc/x", "server.token": ""}},
                 "the quick query's settings: not the setting of a figure: database.path, server.token")):
            response, data = web(srv.http_port, "/api/format", "POST", auth, json.dumps(sent).encode())
            assert (response.status, json.loads(data)) == (400, {"error": error})
        # A route is written only to a page that answers as ccmon's: not to another path or service, nor without
        # the token.
        config = dataclasses.replace(ccmon.figure_config({}, "defaults"), monitor_server=srv.target,
                                     monitor_token="page-token")
        assert ccmon.page_answers(f"http://127.0.0.1:{srv.http_port}/api/format", config, 5)
        assert not ccmon.page_answers(f"http://127.0.0.1:{srv.http_port}/v1/logs", config, 5)
        assert not ccmon.page_answers(f"http://127.0.0.1:{srv.port}/api/format", config, 5)  # gRPC's port
        assert not ccmon.page_answers(f"http://127.0.0.1:{srv.http_port}/api/format",
                                      dataclasses.replace(config, monitor_token=""), 5)
    finally:
        srv.stop()


@e2e
def test_pyz_format_takes_the_quick_route_with_the_clients_settings(pyz, tmp_path):
    """A status bar's --format from the pyz: after a full run, the server works the figures out with this client's
    own settings (its plan, its timezone, -b) sent along, and the line is the same. Another folder (it may hold a
    config.*) takes the full run; an unknown @word is still warned about."""
    srv = ServerProcess(tmp_path).start()
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    words = ["--monitor-server", srv.target, "--claude-plan", "max20", "--monitor-timezone", "Asia/Tokyo", "-b",
             "auto", "--format", "@monthly_plan_usage @monthly_tokens @block_usage @typo"]

    def format_from_pyz(cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-X", "importtime", *bare(pyz)[1:], *words], capture_output=True,
                              text=True, cwd=cwd, timeout=60, env=env)

    def of_ccmon(result: subprocess.CompletedProcess) -> list[str]:
        return [name for name in imported_modules(result.stderr) if name.startswith(("ccmon", "grpc", "google"))]

    def warnings(result: subprocess.CompletedProcess) -> list[str]:
        return [line for line in result.stderr.splitlines() if not line.startswith("import time:")]

    try:
        assert sdk_export(srv.port, [("api_request", {**api_request(1, hours_ago(0.1), session="s-f", cost_usd=20.0,
                                                                    input_tokens=1000, output_tokens=234)})]) == \
            ["SUCCESS"]
        full = format_from_pyz(tmp_path)
        quick = format_from_pyz(tmp_path)
        assert of_ccmon(full) != [] and of_ccmon(quick) == []
        assert full.stdout == quick.stdout and re.fullmatch(r"(10%|0%) (1\.23K|0) (\S+%|-) @typo\n", full.stdout)
        assert warnings(full) == warnings(quick) == [
            "ccmon: unknown in --format, left as written: @typo (known: "
            f"{' '.join('@' + name for name in ccmon.FORMAT_VARIABLES)})"]
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        moved = format_from_pyz(elsewhere)
        assert (moved.stdout, of_ccmon(moved) != []) == (full.stdout, True)
    finally:
        srv.stop()


@e2e
def test_pyz_runs_on_every_cpython_here(pyz, pythons, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    supported = {version: python for version, python in pythons.items() if version >= (3, 11)}
    assert sys.version_info[:2] in supported  # always at least this interpreter
    for (major, minor), python in sorted(supported.items()):
        version = run_ccmon(["--version"], tmp_path, command=bare(pyz, python), env=env)
        assert version.returncode == 0, (python, version.stderr)
        assert version.stdout.endswith(f", {PYZ_PYTHONS}, {PYZ_PLATFORM})\n")
        srv = ServerProcess(tmp_path, db=tmp_path / f"{minor}.db", command=bare(pyz, python), env=env).start()
        try:
            sdk_export(srv.port, MIXED_EVENTS)
            result = run_ccmon(["--monitor-server", srv.target, "--format", "@monthly_tokens"], tmp_path,
                               command=bare(pyz, python), env=env)
            assert result.returncode == 0 and result.stdout in {"0\n", "52.3K\n"}, (python, result.stderr)
        finally:
            assert srv.stop() == 0
    # One build folder, and in it each version with its own grpc extension only.
    [build] = (tmp_path / "cache" / "ccmon").iterdir()
    assert sorted(p.name for p in build.iterdir() if p.is_dir()) == sorted(f"cp{major}{minor}" for major, minor in supported)
    for major, minor in supported:
        cygrpc = [p.name for p in (build / f"cp{major}{minor}" / "grpc" / "_cython").glob("cygrpc.*")]
        assert cygrpc == [f"cygrpc.cpython-{major}{minor}-{os.uname().machine}-linux-gnu.so"]


@e2e
def test_pyz_refuses_older_pythons_in_one_line(pyz, pythons, tmp_path):
    older = {version: python for version, python in pythons.items() if version < (3, 11)}
    if not older:
        pytest.skip("no CPython older than 3.11 on this machine")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    for (major, minor), python in sorted(older.items()):
        result = run_ccmon(["--version"], tmp_path, command=bare(pyz, python), env=env)
        assert (result.returncode, result.stdout) == (1, ""), python
        assert re.fullmatch(rf"ccmon: this ccmon.pyz is for {re.escape(PYZ_PYTHONS)} on {PYZ_PLATFORM}; "
                            rf"this is CPython {major}\.{minor} on Linux {os.uname().machine} \(glibc [\d.]+\)\n",
                            result.stderr)
    assert not (tmp_path / "cache").exists()


@e2e
def test_pyz_for_one_python_on_another_platform(tmp_path):
    foreign = "manylinux2014_aarch64" if os.uname().machine != "aarch64" else "manylinux2014_x86_64"
    output = tmp_path / "foreign.pyz"
    built = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "-o", str(output),
                            "--python-version", "3.11", "--platform", foreign],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    assert built.stdout.endswith(f") for CPython 3.11 on {foreign}\n")
    import zipfile
    names = zipfile.ZipFile(output).namelist()
    assert {name.split("/")[0] for name in names} == {"__main__.py", "app"}  # one version: nothing differs
    assert f"app/grpc/_cython/cygrpc.cpython-311-{foreign.split('_', 1)[1]}-linux-gnu.so" in names
    result = run_ccmon(["--version"], tmp_path, command=bare(output), env={"XDG_CACHE_HOME": str(tmp_path / "c")})
    assert (result.returncode, result.stdout) == (1, "")
    assert re.fullmatch(rf"ccmon: this ccmon.pyz is for CPython 3.11 on {foreign}; this is CPython "
                        rf"{sys.version_info[0]}\.{sys.version_info[1]} on Linux {os.uname().machine} "
                        rf"\(glibc [\d.]+\)\n", result.stderr)


@e2e
def test_pyz_concurrent_first_runs_share_one_cache(pyz, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = [subprocess.Popen(bare(pyz) + ["--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for _ in range(4)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0]
    assert all(out.startswith(b"usage: ccmon ") for out, _ in outputs)
    entries = sorted(p.name for p in (tmp_path / "cache" / "ccmon").iterdir())
    assert len(entries) == 1 and re.fullmatch(r"[0-9a-f]{16}", entries[0])  # no half-unpacked leftovers
    version = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    assert os.listdir(tmp_path / "cache" / "ccmon" / entries[0]) == [version]
    assert (tmp_path / "cache" / "ccmon" / entries[0] / version / ".complete").is_file()


@e2e
def test_pyz_keeps_the_two_newest_builds(pyz, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    root = tmp_path / "cache" / "ccmon"
    now = time.time()

    def fake(name: str, age_days: float) -> None:
        (root / name / "cp311").mkdir(parents=True)
        os.utime(root / name, (now - age_days * 86400,) * 2)

    for number, age in enumerate((3, 2, 1), start=1):
        fake(f"{number:016x}", age)
    fake("notes", 9)  # not named like a build: not ours to remove
    fake("0123456789abcdef0", 9)
    assert run_ccmon(["--help"], tmp_path, command=bare(pyz), env=env).returncode == 0
    [current] = {p.name for p in root.iterdir()} - {f"{n:016x}" for n in (1, 2, 3)} - {"notes", "0123456789abcdef0"}
    assert sorted(p.name for p in root.iterdir()) == sorted([current, f"{3:016x}", "notes", "0123456789abcdef0"])
    # The build in use stays even when two others look newer; a failing cleanup does not fail the run.
    shutil.rmtree(root / current)
    fake(f"{4:016x}", -1)
    fake(f"{5:016x}", -2)
    assert run_ccmon(["--help"], tmp_path, command=bare(pyz), env=env).returncode == 0
    assert sorted(p.name for p in root.iterdir()) == sorted([current, f"{4:016x}", f"{5:016x}", "notes",
                                                            "0123456789abcdef0"])
    shutil.rmtree(root / current)
    (root / f"{6:016x}").symlink_to(tmp_path / "gone")  # getmtime fails on it
    assert run_ccmon(["--help"], tmp_path, command=bare(pyz), env=env).returncode == 0
    assert (root / current / f"cp{sys.version_info[0]}{sys.version_info[1]}" / ".complete").is_file()


@e2e
def test_pyz_falls_back_to_temp_dir_when_home_is_unusable(pyz, tmp_path):
    env = {**os.environ, "HOME": "/dev/null/nohome", "TMPDIR": str(tmp_path)}
    env.pop("XDG_CACHE_HOME", None)
    result = subprocess.run(bare(pyz) + ["--help"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: ccmon ")
    assert list(tmp_path.glob(f"ccmon-{os.getuid()}/*/*/ccmon.py"))
    # A cache folder that others can write to is never imported from.
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "ccmon").mkdir(mode=0o777)
    os.chmod(shared / "ccmon", 0o777)
    env = {**env, "XDG_CACHE_HOME": str(shared), "TMPDIR": str(tmp_path / "tmp2")}
    (tmp_path / "tmp2").mkdir()
    result = subprocess.run(bare(pyz) + ["--help"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and not list((shared / "ccmon").iterdir())
    assert list((tmp_path / "tmp2").glob(f"ccmon-{os.getuid()}/*/*/ccmon.py"))
    corrupt = tmp_path / "corrupt.pyz"
    corrupt.write_bytes(pyz.read_bytes()[:200_000])
    result = subprocess.run([sys.executable, "-I", "-S", str(corrupt), "--help"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr


@e2e
def test_pyz_build_is_reproducible_and_lean(pyz, tmp_path):
    again = tmp_path / "again.pyz"
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "-o", str(again)], check=True,
                   capture_output=True, timeout=600)
    assert again.read_bytes() == pyz.read_bytes()
    assert pyz.stat().st_size <= 35_000_000
    import zipfile
    names = zipfile.ZipFile(pyz).namelist()
    assert names[0] == "__main__.py" and "app/ccmon.py" in names and "app/tzdata/zoneinfo/Europe/Berlin" in names
    assert not [n for n in names if n.endswith((".pyc", ".pyi")) or "__pycache__" in n or "/RECORD" in n
                or "test_ccmon" in n]
    assert any(n.startswith("app/yaml/") for n in names) and not any("_yaml." in n for n in names)
    # What the versions share is stored once; each version folder holds only what differs.
    per_version = {n.split("/", 1)[1] for n in names if n.startswith("cp3")}
    assert {n.split("/")[0] for n in names if "/" in n} == {"app", "cp311", "cp312", "cp313", "cp314"}
    assert {n for n in per_version if not n.endswith("/WHEEL")} == {
        f"grpc/_cython/cygrpc.cpython-{v}-{os.uname().machine}-linux-gnu.so" for v in (311, 312, 313, 314)}
    assert "app/google/_upb/_message.abi3.so" in names  # protobuf's extension is abi3: one for all


@e2e
def test_pyz_build_refuses_missing_wheels(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "-o", str(tmp_path / "x.pyz"),
                             "--platform", "win_nonexistent", "--python-version", "3.11"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert result.stderr.startswith("build_zipapp: cannot get wheels for CPython 3.11 on win_nonexistent: ")
    assert not (tmp_path / "x.pyz").exists()


def test_dockerfile_structure():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM python:${PYTHON_VERSION}-slim-bookworm AS build", "FROM python:${PYTHON_VERSION}-slim-bookworm"]
    assert re.search(r"^ARG PYTHON_VERSION=3\.12\.\d+$", joined, re.M)  # an exact version, not a moving tag
    assert "ARG PYTHON_MINOR=3.12" in lines
    build_stage, final = joined.split("FROM python:${PYTHON_VERSION}-slim-bookworm\n")
    assert 'RUN python build_zipapp.py --python-version "${PYTHON_MINOR}" --output /out/ccmon.pyz' in build_stage
    assert "mv /out/cache/ccmon/*/cp3*/ /app" in build_stage
    assert "COPY --from=build /app /app" in final and "ccmon.pyz" not in final  # the unpacked app, once
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert "--uid 10001 --gid 10001" in final and "--gid 10001 ccmon" in final
    assert final.index("USER 10001:10001") < final.index("ENTRYPOINT")
    assert "pip install" not in final  # nothing installed in the runtime image
    assert "ENV HOME=/home/ccmon " in final  # the settings' folder under any user id
    assert "VOLUME /data" in final and "EXPOSE 4317 4318" in final and "STOPSIGNAL SIGTERM" in final
    for label in ("title", "description", "licenses", "base.name"):
        assert f"org.opencontainers.image.{label}=" in final
    healthcheck = next(line for line in final.splitlines() if line.startswith("HEALTHCHECK"))
    assert healthcheck.endswith('CMD ["python", "/app/ccmon.py", "--health"]')  # the server's own settings
    assert 'ENTRYPOINT ["python", "/app/ccmon.py"]' in final and 'CMD ["--server"]' in final
    # The image's config file (written by printf) is one ccmon reads, with the settings the server needs there.
    printf = re.search(r"printf '%s\\n' (.*?) > /home/ccmon/\.ccmon/config\.toml", final).group(1)
    config = tomllib.loads("\n".join(re.findall(r"'([^']*)'", printf)))
    assert config == {"server": {"address": "0.0.0.0:4317", "http_address": "0.0.0.0:4318"},
                      "database": {"path": "/data/ccmon.db"}}
    # Every file the build stage copies exists, and .dockerignore lets exactly those through.
    copied = next(line for line in lines if line.startswith("COPY requirements.txt")).split()[1:-1]
    assert all((ROOT / name).is_file() for name in copied)
    allowed = [line[1:] for line in (ROOT / ".dockerignore").read_text().split() if line.startswith("!")]
    assert sorted(allowed) == sorted(copied)


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@e2e
def test_the_image_build_steps_give_a_working_app(tmp_path):
    """The build stage's commands, run here (no Docker engine in CI): the pyz for one Python, unpacked once,
    moved to app/, runs ccmon from there."""
    minor = "%d.%d" % sys.version_info[:2]
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--python-version", minor, "--output",
                    str(tmp_path / "out" / "ccmon.pyz")], check=True, capture_output=True)
    subprocess.run([sys.executable, str(tmp_path / "out" / "ccmon.pyz"), "--help"], check=True, capture_output=True,
                   env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "out" / "cache")})
    unpacked = list((tmp_path / "out" / "cache" / "ccmon").glob("*/cp3*/"))
    assert len(unpacked) == 1
    app = unpacked[0].rename(tmp_path / "app")
    # -S -E: no site-packages, no PYTHONPATH; what the app needs is beside ccmon.py, as in the image.
    version = subprocess.run([sys.executable, "-S", "-E", str(app / "ccmon.py"), "--version"], capture_output=True,
                             text=True)
    assert (version.returncode, version.stdout) == (0, f"ccmon {ccmon.VERSION}\n"), version.stderr


# ---------------------------------------------------------------- insights: models, sessions, tools, users

def test_adding_a_tab_is_one_entry_in_tabs():
    """The tab strip, digit key, help, footer, fetch and render of a new tab all follow from its Tab."""
    import types
    source = (ROOT / "ccmon.py").read_text()
    end_of_tabs = ")}\nTAB_KEYS"
    notes = ('    Tab("notes", "Notes", "Note",\n'
             '        lambda snap, state, screen: Frame([[(f"{snap.data} notes", "")]], 1, 3),\n'
             '        lambda client, query: 3),\n')
    assert source.count(end_of_tabs) == 1
    module = types.ModuleType("ccmon_with_notes")
    sys.modules[module.__name__] = module  # dataclasses look up their class's module
    try:
        exec(compile(source.replace(end_of_tabs, notes + end_of_tabs), "ccmon.py", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    settings, now = _settings(), local_ms("2026-05-05 13:00")
    state, action = module.handle_key(module.ViewState(), "KEY_BTAB", settings, module.Frame([]))
    assert (state.tab, action) == ("notes", "refresh")  # the tenth: past the digit keys, Tab reaches it
    assert module.handle_key(module.ViewState(), "9", settings, module.Frame([]))[0].tab == "charts"
    query = module.query_for(state, settings, now)
    snap = module.Snapshot(query, now, 500, data=query.fetch(None, query))

    def text(width):
        frame = module.render(state, module.ServerStatus(True, attempts=1), snap,
                              module.Screen(settings, width, 24, now, module.Glyphs.for_terminal(False)))
        return [line_text(line) for line in frame.lines], frame

    lines, frame = text(120)
    assert lines[1].rstrip().endswith("   Projects   Charts   Notes") and "3 notes" in lines
    assert (frame.page_rows, frame.total_rows) == (1, 3)
    assert lines[-1] == "h/d/w/m/a/b period  o order  Tab/1-9 tab  u user  p project  ? help  q quit"
    assert text(80)[0][1].rstrip().endswith("8Proj 9Cht 10Note")
    assert "Tab/Shift-Tab or 1-9  switch tab" in module.HELP_TEXT
    assert module.handle_key(state, "\t", settings, frame)[0].tab == "current"


# ---------------------------------------------------------------- limits: automatic blocks, learned limit, weekly, alerts

def block_history() -> list[tuple[str, dict]]:
    """Hand-made: two overlapping sessions, a gap, a block across midnight, a Haiku request, a DST night."""
    def request(seq, session, when, model="claude-sonnet-4-5", tokens=1000):
        return ("api_request", api_request(seq, when, session=session, model=model, input_tokens=tokens,
                                           output_tokens=0, cost_usd=tokens / 10000))
    return [request(1, "a", "2026-03-27T09:10:00Z"), request(2, "b", "2026-03-27T09:50:00Z", tokens=500),
            request(3, "a", "2026-03-27T13:59:00Z", model="claude-haiku-4-5", tokens=9999),
            request(4, "b", "2026-03-27T13:59:59Z"),           # block 1: 09:00-14:00, premium 2,500
            request(5, "a", "2026-03-27T14:00:00Z", tokens=2000),  # block 2 starts at its end: 14:00-19:00
            request(6, "c", "2026-03-27T22:30:00Z", tokens=4000),  # after a gap: 22:00-03:00 across midnight
            request(7, "c", "2026-03-28T02:59:00Z", tokens=3000),
            request(8, "c", "2026-03-28T03:05:00Z", tokens=100),   # block 4: 03:00-08:00
            request(9, "d", "2026-03-29T00:40:00Z", tokens=700)]   # Berlin switches to summer time in it


def test_automatic_blocks_from_a_hand_made_history(server, tmp_path):
    sdk_export(server.port, block_history())
    blocks = server.query().GetBlocks(ccmon_pb2.GetBlocksRequest(start_time=ts("2026-03-27T00:00:00Z"),
                                                                 end_time=ts("2026-03-30T00:00:00Z"))).blocks
    assert [(ccmon.ms_of(b.start_time), ccmon.ms_of(b.end_time), b.stats.premium_tokens.limited,
             b.stats.base_tokens.limited, b.stats.total_requests) for b in blocks] == [
        (ccmon.parse_iso_ms(start), ccmon.parse_iso_ms(end), premium, base, requests)
        for start, end, premium, base, requests in (
            ("2026-03-27T09:00:00Z", "2026-03-27T14:00:00Z", 2500, 9999, 4),
            ("2026-03-27T14:00:00Z", "2026-03-27T19:00:00Z", 2000, 0, 1),
            ("2026-03-27T22:00:00Z", "2026-03-28T03:00:00Z", 7000, 0, 2),
            ("2026-03-28T03:00:00Z", "2026-03-28T08:00:00Z", 100, 0, 1),
            ("2026-03-29T00:00:00Z", "2026-03-29T05:00:00Z", 700, 0, 1))]
    # A period starting inside a block still sees the block from its real start.
    late = server.query().GetBlocks(ccmon_pb2.GetBlocksRequest(start_time=ts("2026-03-28T01:00:00Z"),
                                                               end_time=ts("2026-03-28T02:00:00Z"))).blocks
    assert [ccmon.ms_of(b.start_time) for b in late] == [ccmon.parse_iso_ms("2026-03-27T22:00:00Z")]
    report = run_ccmon(["report", "blocks", "--since", "2026-03-28", "--until", "2026-03-29", "--csv",
                        "--monitor-server", server.target, "--monitor-timezone", "Europe/Berlin"], tmp_path)
    assert report.stdout.splitlines() == [
        "block_start,block_end,window,premium_tokens,requests,input_tokens,output_tokens,cache_read_tokens,"
        "cache_creation_tokens,total_tokens,cost_usd",
        "2026-03-27T23:00+01:00,2026-03-28T04:00+01:00,auto,7000,2,7000,0,0,0,7000,0.7",
        "2026-03-28T04:00+01:00,2026-03-28T09:00+01:00,auto,100,1,100,0,0,0,100,0.01",
        "2026-03-29T01:00+01:00,2026-03-29T07:00+02:00,auto,700,1,700,0,0,0,700,0.07",
        "Total,,,7800,4,7800,0,0,0,7800,0.78"]


def test_alerts_fire_once_per_window_and_rearm():
    settings = ccmon.MonitorSettings("x:1", BERLIN, "auto", 10_000, 5, weekly_limit=100_000, alerts=(50, 80))
    window = (0, ccmon.BLOCK_MS)

    def limits(block_tokens, weekly_tokens, window=window):
        return ccmon.LimitFigures(window, ccmon.Split(ccmon.Usage(), ccmon.Usage(1, block_tokens)), 0.0, 10_000,
                                  None, {"sonnet": ccmon.Usage(1, weekly_tokens)})

    fired: set = set()
    due = ccmon.due_alerts(limits(6_000, 10_000), settings, 1000, fired)
    assert [(key, message) for key, message, _ in due] == [
        (("block", 0, 50), "ALERT: block usage passed 50% (6.00K of 10.0K)")]
    assert due[0][2] == {"CCMON_ALERT_KIND": "block", "CCMON_ALERT_THRESHOLD": "50", "CCMON_ALERT_PERCENT": "60.0",
                         "CCMON_ALERT_USED": "6000", "CCMON_ALERT_LIMIT": "10000", "CCMON_ALERT_SOURCE": "ccmon"}
    assert ccmon.due_alerts(limits(6_500, 10_000), settings, 1000, fired) == []
    assert [key for key, _, _ in ccmon.due_alerts(limits(9_000, 85_000), settings, 1000, fired)] == \
        [("block", 0, 80), ("weekly", 0, 50), ("weekly", 0, 80)]
    next_block = (ccmon.BLOCK_MS, 2 * ccmon.BLOCK_MS)
    assert [key for key, _, _ in ccmon.due_alerts(limits(5_000, 40_000, next_block), settings,
                                                  ccmon.BLOCK_MS + 1, fired)] == [("block", ccmon.BLOCK_MS, 50)]
    assert [key for key, _, _ in ccmon.due_alerts(limits(5_000, 55_000, next_block), settings,
                                                  ccmon.BLOCK_MS + 1, fired)] == [("weekly", 0, 50)]  # re-armed


def test_auto_block_monitor_alert_and_format(tmp_path):
    srv = ServerProcess(tmp_path).start()
    now = int(time.time() * 1000)
    sdk_export(srv.port, [("api_request", api_request(1, iso(now - 20 * 60_000), input_tokens=3000, output_tokens=1000)),
                          ("api_request", api_request(2, iso(now - 5 * 60_000), model="claude-opus-4-1",
                                                      input_tokens=500, output_tokens=500))])
    first_hour = (now - 20 * 60_000) // 3600_000 * 3600_000
    marker = tmp_path / "alert.env"
    try:
        quick = run_ccmon(["--monitor-server", srv.target, "-b", "auto", "--claude-plan", "pro",
                           "--claude-weekly-max-tokens", "50000", "--format",
                           "@block_usage @block_projection @weekly_usage"], tmp_path)
        usage, projection, weekly = quick.stdout.split()
        assert (usage, weekly) == ("71%", "10%")  # 5,000 of pro's 7,000; 5,000 of 50,000
        assert int(projection.rstrip("%")) >= 71
        plain = run_ccmon(["--monitor-server", srv.target, "--format", "@weekly_usage"], tmp_path)
        assert plain.stdout == "-\n"  # no weekly limit, no share of one (--json has weekly_premium_tokens)
        figures = json.loads(run_ccmon(["--monitor-server", srv.target, "-b", "auto", "--json"], tmp_path).stdout)
        assert figures["block_end"] == (first_hour + ccmon.BLOCK_MS) // 1000
        assert figures["weekly_premium_tokens"] == 5000
        with MonitorPty(["--monitor-server", srv.target, "-b", "auto", "--claude-plan", "pro", "--alert", "50",
                         "--alert", "90", "--monitor-alert-command", f"env | grep CCMON_ALERT > {marker}"],
                        cols=100, cwd=tmp_path, env={"HOME": str(tmp_path)}) as monitor:
            screen = monitor.wait_for("ALERT: block usage passed 50% (5.00K of 7.00K)", "the alert")
            assert line_with(screen, "Block ").split()[2:6] == ["71%", "5.00K", "/", "7.00K"]
            assert "Week        5.00K premium tokens" in screen and "opus 1.00K, sonnet 4.00K" in screen
            # The shell creates the file before grep has written to it: wait for all six lines.
            wait_until(lambda: marker.exists() and len(marker.read_text().split()) >= 6, "the alert command's output",
                       20)
            assert sorted(marker.read_text().split()) == sorted([
                "CCMON_ALERT_KIND=block", "CCMON_ALERT_THRESHOLD=50", "CCMON_ALERT_PERCENT=71.4",
                "CCMON_ALERT_USED=5000", "CCMON_ALERT_LIMIT=7000", "CCMON_ALERT_SOURCE=ccmon"])
            monitor.send(b"7")
            monitor.wait_for("Blocks - current block (1; 5 hours from the first request)", "the blocks tab")
            monitor.send(b"q")
            assert monitor.close() == 0
    finally:
        srv.stop()


def test_learned_limit_from_recent_blocks(server, tmp_path):
    now = int(time.time() * 1000)
    day = 86400_000
    # Three completed blocks in the last 30 days with 8,000, 12,000 and 30,000 premium tokens.
    events = [("api_request", api_request(i, iso(now - days * day), session=f"l{i}", input_tokens=tokens))
              for i, (days, tokens) in enumerate(((3, 8000), (2, 12000), (1, 30000)))]
    sdk_export(server.port, events)
    base = ["--monitor-server", server.target, "-b", "auto", "--claude-max-tokens", "auto", "--json"]
    pro = json.loads(run_ccmon([*base, "--claude-plan", "pro"], tmp_path).stdout)
    assert pro["block_limit"] is None  # no block is active now: nothing to measure against
    limits = ccmon.limit_figures(ccmon.Client(server.target), ccmon.LimitQuery("auto", now, True, 7_000), BERLIN, None)
    assert (limits.window, limits.limit, limits.learned_from) == (None, 30_000, 3)  # p90 of three is the highest
    floor = ccmon.limit_figures(ccmon.Client(server.target), ccmon.LimitQuery("auto", now, True, 140_000), BERLIN,
                                None)
    assert (floor.limit, floor.learned_from) == (140_000, 3)  # never below the plan's figure


def test_limit_figures_are_computed_from_the_clients_answers_alone():
    """No server: a stand-in gives the answers. Claude's live window is the block and calibrates its limit (no
    history asked for); the week is Claude's, summed per family."""
    now = local_ms("2026-05-05 12:00")
    resets, week_resets = now + 3600_000, now + 2 * ccmon.DAY_MS
    reading = ccmon.LimitReading("s", now - 60_000, five_hour=ccmon.LimitWindow(40.0, resets),
                                 seven_day=ccmon.LimitWindow(20.0, week_resets))
    asked = []

    class Answers:
        def limits(self, user, at_ms):
            return ccmon.ClaudeLimits(reading, reading, 50_000, 4)

        def blocks(self, *args):
            raise AssertionError("Claude's own window needs no history")

        def models(self, start_ms, end_ms, user):
            asked.append(("models", start_ms))
            return (ccmon.ModelUsage("claude-opus-4-1", ccmon.Usage(1, 100, 10)),
                    ccmon.ModelUsage("claude-opus-4-5", ccmon.Usage(1, 50)),
                    ccmon.ModelUsage("claude-haiku-4-5", ccmon.Usage(1, 7)))

        def stats(self, start_ms, end_ms, user):
            asked.append(("stats", start_ms))
            return ccmon.Split(premium=ccmon.Usage(2, 3000, 600))

    figures = ccmon.limit_figures(Answers(), ccmon.LimitQuery("auto", now, True, 7_000), BERLIN, None)
    assert (figures.window, figures.window_from_claude) == ((resets - ccmon.BLOCK_MS, resets), True)
    assert (figures.limit, figures.calibrated_from, figures.learned_from) == (50_000, 4, None)
    assert figures.weekly == {"haiku": ccmon.Usage(1, 7), "opus": ccmon.Usage(2, 150, 10)}
    assert figures.weekly_window == (week_resets - 7 * ccmon.DAY_MS, week_resets)
    assert figures.block == ccmon.Split(premium=ccmon.Usage(2, 3000, 600))
    recent = ccmon.recent_pace_start(now)
    assert figures.recent_rate == 3600 / ((now - recent) / 60_000)
    assert asked == [("models", week_resets - 7 * ccmon.DAY_MS), ("stats", resets - ccmon.BLOCK_MS), ("stats", recent)]


def test_block_period_follows_the_automatic_block(server):
    now = int(time.time() * 1000)
    sdk_export(server.port, [("api_request", api_request(1, iso(now - 10 * 60_000), input_tokens=10))])
    settings = ccmon.MonitorSettings(server.target, BERLIN, "auto", 7_000, 5)
    client = ccmon.Client(server.target)
    snap = ccmon.fetch_snapshot(client, ccmon.query_for(ccmon.ViewState(period="b"), settings, now))
    assert snap.query.start_ms == snap.limits.window[0] == (now - 10 * 60_000) // 3600_000 * 3600_000
    assert snap.data.period.total.input == 10
    client.close()


def test_alerts_without_anything_to_measure_say_so():
    quiet = ccmon.MonitorSettings("x:1", BERLIN, None, None, 5, alerts=(80,))
    assert ccmon.alert_setup_problem(quiet) == ("alerts need a block limit (-b with claude.plan or claude.max_tokens), "
                                                "claude.weekly_max_tokens or Claude's own limits (ccmon statusline)")
    assert ccmon.alert_setup_problem(dataclasses.replace(quiet, block_mode="auto", limit=7_000)) == ""
    assert ccmon.alert_setup_problem(dataclasses.replace(quiet, weekly_limit=10)) == ""
    assert ccmon.alert_setup_problem(dataclasses.replace(quiet, alerts=())) == ""


# ---------------------------------------------------------------- Claude's own limits: blocks, monitor, alerts, quick query, reports

def test_blocks_follow_claudes_own_windows(tmp_path):
    """A reading says Claude's window is 09:20:30-14:20:30: that is the block; guessed blocks around it give way to
    it, and figures at its edges (inside quarter hours) are counted exactly, on the right side."""
    store, reader = ccmon.Writer(tmp_path / "claude.db"), ccmon.Reader(tmp_path / "claude.db")
    at = lambda hhmmss: ccmon.parse_iso_ms(f"2026-06-01T{hhmmss}Z")

    def request(seq, when, tokens):
        return (at(when), "s-ana", seq, "claude-sonnet-4-5", "ana@example.com", tokens, 0, 0, 0, 0, 0, None, None,
                None, None, None, 0, "claude-code")

    store.write(ccmon.Batch(requests=[
        request(1, "08:10:00", 100),   # a guessed block from 08:00, cut where Claude's window begins
        request(2, "09:18:00", 200),   # the same quarter hour as the window's start, before it
        request(3, "09:25:00", 400),   # in Claude's window
        request(4, "14:19:00", 800),   # in it, in the quarter hour it ends in
        request(5, "14:25:00", 1600),  # after it, same quarter hour: a guessed block from its end
        request(6, "19:25:00", 3200),  # after that block's end, in the quarter hour it ends in
    ]))
    store.record_reading(ccmon.LimitReading("s-ana", at("10:00:00"),
                                            five_hour=ccmon.LimitWindow(40.0, at("14:20:30"))))
    store.record_reading(ccmon.LimitReading("s-ana", at("10:00:01"),  # the same reset, read a second off
                                            five_hour=ccmon.LimitWindow(41.0, at("14:20:31"))))
    expected = [("08:00:00", "09:20:30", 300, False), ("09:20:30", "14:20:30", 1200, True),
                ("14:20:30", "19:20:30", 1600, False), ("19:20:30", "2026-06-02T00:20:30", 3200, False)]
    for user in (None, "ana@example.com"):
        blocks = reader.blocks(at("00:00:00"), at("23:59:00"), user)
        assert [(b.start_ms, b.end_ms, b.split.premium.input, b.from_claude) for b in blocks] == \
            [(at(start), ccmon.parse_iso_ms(end + "Z") if "T" in end else at(end), tokens, claude)
             for start, end, tokens, claude in expected]
    assert reader.blocks(at("00:00:00"), at("23:59:00"), "bo@example.com") == []
    assert reader.claude_windows("bo@example.com", at("00:00:00"), at("23:59:00")) == []
    store.close()
    assert ccmon.block_around(at("09:25:00"), 0, [(at("09:20:30"), at("14:20:30"))]) == \
        (at("09:20:30"), at("14:20:30"), True)
    assert ccmon.block_around(at("14:40:00"), at("12:00:00"), [(at("09:20:30"), at("14:20:30"))]) == \
        (at("14:20:30"), at("19:20:30"), False)  # never before Claude's window ended


def claude_snapshot(settings, now, **changes):
    """The Current tab's fixture with Claude's own readings, 2 minutes old: the 5-hour window 09:17-14:17 at 63 %
    (a full one holds about 33,300 premium tokens, from 14 readings), the week at 21.4 % until Friday 09:00."""
    snap, _, _ = _frame_fixture()
    read = now - 2 * 60_000
    reading = ccmon.LimitReading("s-ana", read, five_hour=ccmon.LimitWindow(63.0, local_ms("2026-03-10 14:17")),
                                 seven_day=ccmon.LimitWindow(21.4, local_ms("2026-03-13 09:00")))
    claude = ccmon.ClaudeLimits(reading, reading, 33_300, 14, 1_000_000, 3)
    limits = dataclasses.replace(snap.limits, window=(local_ms("2026-03-10 09:17"), local_ms("2026-03-10 14:17")),
                                 limit=33_300, claude=claude, calibrated_from=14, window_from_claude=True,
                                 weekly_window=(local_ms("2026-03-06 09:00"), local_ms("2026-03-13 09:00")))
    return dataclasses.replace(snap, limits=dataclasses.replace(limits, **changes))


CLAUDE_80x24 = [  # Claude's share is the gauge; ccmon's count supports it; the pace leads to Claude's limit
    "Claude 5h   ##########......  63%, resets 14:17; ccmon counted 21.0K (2 min ago)",
    "Recent pace 700/min; Claude's 5h limit at this pace at 10:47",
    "Claude week ###.............  21%, resets Fri 09:00; ccmon counted 21.0K",
    "-- Requests 1-10 of 12 ---------------------------------------------------------"]


CLAUDE_40x12 = [
    " ccmon - Claude Code usage monitor",
    " 1Now2Day3Mod4Ses5Tool6User7Blk8Proj9Cht",
    " * connected | current block",
    "Current block: $1.24, 16 requests",
    "Claude 5h   ###..  63%, resets 14:17",
    "-- Requests 1-4 of 12 ------------------",
    "Time     Model        Total      Cost",
    "10:30:00 sonnet-4-5   31.0K  <$0.0001",
    "10:23:00 haiku-4-5    31.2K   $0.0123",
    "10:16:00 opus-4-1     31.4K   $0.0247",
    "10:09:00 sonnet-4-5   31.6K   $0.0370",
    "h/d/w/m/a/b  1-9  u/p  ? help  q quit"]


def test_render_claudes_own_limits_80x24_and_40x12():
    _, settings, now = _frame_fixture()
    snap = claude_snapshot(settings, now)
    lines, frame = frame_text(ccmon.ViewState(period="b"), snap, settings, 80, 24, now)
    assert lines[:8] == FRAME_80x24[:8] and lines[8:12] == CLAUDE_80x24 and lines[-1] == FRAME_80x24[-1]
    assert frame.page_rows == 10
    assert frame_text(ccmon.ViewState(period="b"), snap, settings, 40, 12, now)[0] == CLAUDE_40x12
    wide = frame_text(ccmon.ViewState(period="b"), snap, settings, 130, 30, now)[0]
    assert wide[8] == ("Claude 5h   ###################...........  63%, resets 14:17; ccmon counted 21.0K (read 2 min "
                       "ago)")
    # Claude's share is what alerts measure: its gauge takes the alert colour.
    alerting = dataclasses.replace(settings, alerts=(60,))
    styled = ccmon.render(ccmon.ViewState(period="b"), ccmon.ServerStatus(True, attempts=1), snap,
                          ccmon.Screen(alerting, 80, 24, now, ccmon.Glyphs.for_terminal(False))).lines
    assert styled[8][1] == ("##########......", "alert") and styled[10][1] == ("###.............", "good")
    # Later: the figure is older, and once Claude's window has reset it is no longer shown.
    later = frame_text(ccmon.ViewState(period="b"), snap, settings, 80, 24, now + 65 * 60_000)[0]
    assert later[8] == "Claude 5h   ##########......  63%, resets 14:17; ccmon counted 21.0K (1h07m ago)"
    after = frame_text(ccmon.ViewState(period="b"), snap, settings, 80, 24, local_ms("2026-03-10 14:17"))[0]
    assert after[8:11] == ["Block       ##########......  63%  21.0K / 33.3K (calibrated), 0ms left",
                           "Recent pace 700/min; within limit at this pace (63% at block end)",
                           "Claude week ###.............  21%, resets Fri 09:00; ccmon counted 21.0K"]
    # Nothing read yet in this window but a calibrated capacity: the projection goes to the block's limit.
    guessed = dataclasses.replace(claude_snapshot(settings, now, window_from_claude=False, window=snap.limits.window),
                                  limits=dataclasses.replace(snap.limits, claude=ccmon.ClaudeLimits(
                                      five_hour_capacity=33_300, five_hour_readings=14), weekly_window=None,
                                      window_from_claude=False))
    assert frame_text(ccmon.ViewState(period="b"), guessed, settings, 80, 24, now)[0][8:10] == [
        "Block       ##########......  63%  21.0K / 33.3K (calibrated), 3h47m left",
        "Recent pace 700/min; at this pace the limit is reached at 10:47"]


def test_render_claudes_figures_without_block_tracking_and_the_limits_sources():
    _, settings, now = _frame_fixture()
    off = _settings(block_hour=None, limit=None)
    snap = claude_snapshot(off, now, window=None, window_from_claude=False, limit=None, calibrated_from=None)
    lines, _ = frame_text(ccmon.ViewState(), snap, off, 80, 30, now)
    assert lines[8:11] == ["Block tracking is off: run with -b auto (or -b 5am for fixed 5-hour windows).",
                           "Claude 5h   ##########......  63%, resets 14:17 (read 2 min ago)",
                           "Claude week ###.............  21%, resets Fri 09:00; ccmon counted 21.0K"]
    lines, _ = frame_text(ccmon.ViewState(), snap, off, 80, 22, now)
    assert lines[8].startswith("Claude 5h   ")  # the hint gives way to the table's rows
    plan = dataclasses.replace(settings, limit_from_plan=True)
    guessed = dataclasses.replace(snap, limits=dataclasses.replace(snap.limits, claude=ccmon.ClaudeLimits(),
                                                                   weekly_window=None, calibrated_from=None,
                                                                   window=(local_ms("2026-03-10 10:00"),
                                                                           local_ms("2026-03-10 15:00")),
                                                                   limit=35_000))
    tokens = {width: frame_text(ccmon.ViewState(period="b"), guessed, plan, width, 24, now)[0][8]
              for width in (63, 64, 97, 98)}
    assert tokens == {63: "Block       ###..  60%  21.0K / 35.0K (guess), 4h30m left",
                      64: "Block       ###..  60%  21.0K / 35.0K (plan's guess), 4h30m left",
                      97: "Block       ##################............  60%  21.0K / 35.0K (plan's guess), 4h30m left",
                      98: "Block       ##################............  60%  21.0K / 35.0K (a guess from the plan), "
                          "4h30m left"}
    # A guess's projection says it is a guess.
    assert frame_text(ccmon.ViewState(period="b"), guessed, plan, 80, 24, now)[0][9] == \
        "Recent pace 700/min; at this pace the plan's guess is reached at 10:50"
    learning = dataclasses.replace(plan, learn=True)
    assert frame_text(ccmon.ViewState(period="b"), guessed, learning, 130, 24, now)[0][8].endswith(
        "21.0K / 35.0K (a guess from the plan: nothing learned yet), 4h30m left")
    learned = dataclasses.replace(guessed, limits=dataclasses.replace(guessed.limits, learned_from=23))
    assert frame_text(ccmon.ViewState(period="b"), learned, learning, 120, 24, now)[0][8].endswith(
        "21.0K / 35.0K (learned from 23 blocks), 4h30m left (ends 15:00)")


def charts_snapshot(settings, now, claude=False, **state):
    """The Charts tab's data: four weeks of working hours (busiest on Mondays at 14:00), the current block's
    hours, and Claude's weekly readings in its week (reset on Friday 03-06 at 09:00)."""
    usage = ccmon.Usage
    base = claude_snapshot(settings, now) if claude else _frame_fixture()[0]
    points = []
    for back in range(28):
        day = dt.date(2026, 3, 10) - dt.timedelta(days=back)
        for hour in range(8, 19):
            start = local_ms(f"{day} {hour:02d}:00")
            if start >= now or day.weekday() >= 5:  # no weekend work
                continue
            weight = (hour - 7) * (3 if day.weekday() == 0 else 1) + (back < 7) * 5
            points.append(ccmon.SeriesPoint(start, "", ccmon.Split(usage(), usage(weight, 1000 * weight,
                                                                                    200 * weight, 0, 0,
                                                                                    30_000_000 * weight))))
    readings = tuple(ccmon.LimitReading(f"s-{k}", local_ms(at), user="ana",
                                        five_hour=ccmon.LimitWindow(five, local_ms("2026-03-10 14:17")),
                                        seven_day=ccmon.LimitWindow(week, local_ms("2026-03-13 09:00")))
                     for k, (at, five, week) in enumerate((("2026-03-06 11:00", 5.0, 4.0),
                                                           ("2026-03-09 15:00", 30.0, 12.0),
                                                           ("2026-03-10 09:40", 20.0, 18.0),
                                                           ("2026-03-10 10:05", 45.0, 20.0),
                                                           ("2026-03-10 10:28", 63.0, 21.4))))
    block = [r for r in readings if r.read_ms >= base.limits.window[0]]
    block_points = tuple(p for p in points if p.start_ms + ccmon.HOUR_MS > base.limits.window[0])
    query = ccmon.query_for(ccmon.ViewState(tab="charts", **state), settings, now)
    return dataclasses.replace(base, query=query, data=ccmon.UsageSeries("hour", tuple(points), readings),
                               block_series=ccmon.UsageSeries("hour", block_points, tuple(block)))


CHARTS_80x24_UNICODE_0 = [
    'Block       ██████████░░░░░░  60%  21.0K / 35.0K, 4h30m left (ends 15:00)',
    'Recent pace 700/min; at this pace the limit is reached at 10:50',
    'Week        21.0K premium tokens, <$0.0001 (sonnet 21.0K)',
    '── 5-hour window - premium tokens (1 of 5; j/k: more) ──────────────────────────',
    ' 210K │                                                               ··········',
    '      │                                                    ···········',
    '      │                                          ··········',
    '      │                               ···········',
    '      │                     ··········',
    '35.0K │───────────··········────────────────────────────────────────────────────',
    '      │       ▆···',
    '    0 └─────────────────────────────────────────────────────────────────────────',
    '       10:00         11:00          12:00         13:00          14:00',
    '█ used 21.0K  ─ limit 35.0K  · projected 210K',
    '── Cost per hour - last 24 hours (2 of 5; j/k: more) ───────────────────────────',
    'each column: 1 hour',
    '$1.14 │      ▂▂ ▃▃ ▄▄ ▅▅ ▇▇ ██',
    '      │▇▇ ██ ██ ██ ██ ██ ██ ██                                        ▃▃ ▃▃ ▃▃',
    '    0 └────────────────────────────────────────────────────────────────────────',
    '          12:00 14:00 16:00 18:00 20:00 22:00 00:00 02:00 04:00 06:00 08:00',
    'h/d/w/m/a/b period  o order  Tab/1-9 tab  u user  p project  ? help  q quit',
]

CHARTS_80x24_ASCII_0 = [
    '-- 5-hour window - premium tokens (1 of 5; j/k: more) --------------------------',
    ' 210K |                                                                   ......',
    '      |                                                         ..........',
    '      |                                              ...........',
    '      |                                    ..........',
    '      |                          ..........',
    '      |               ...........',
    '35.0K |-------#.......----------------------------------------------------------',
    '    0 +-------------------------------------------------------------------------',
    '       10:00         11:00          12:00         13:00          14:00',
    '# used 21.0K  - limit 35.0K  . projected 210K',
    '-- Cost per hour - last 24 hours (2 of 5; j/k: more) ---------------------------',
    'each column: 1 hour',
    '$1.14 |            ## ## ## ##',
    '      |## ## ## ## ## ## ## ##                                        ## ## ##',
    '    0 +------------------------------------------------------------------------',
    '          12:00 14:00 16:00 18:00 20:00 22:00 00:00 02:00 04:00 06:00 08:00',
]

CHARTS_40x12_UNICODE_0 = [
    ' ccmon - Claude Code usage monitor',
    ' 1Now2Day3Mod4Ses5Tool6User7Blk8Proj9Cht',
    ' ● connected | last 4 weeks by the hour',
    'Block       ███░░  60%  21.0K / 35.0K',
    '── 5-hour window - premium tokens 1/5 ──',
    ' 210K │                      ···········',
    '      │           ···········',
    '35.0K │───▂·······──────────────────────',
    '    0 └─────────────────────────────────',
    '       10:00 11:00  12:00 13:00  14:00',
    '█ used 21.0K ─ 35.0K · 210K',  # the legend's short forms: each glyph keeps its figure
    'h/d/w/m/a/b  1-9  u/p  ? help  q quit',
]

CHARTS_40x12_ASCII_0 = [
    'Block       ###..  60%  21.0K / 35.0K',
    '-- 5-hour window - premium tokens 1/5 --',
    ' 210K |                           ......',
    '      |                ...........',
    '35.0K |---#............-----------------',
    '    0 +---------------------------------',
    '       10:00 11:00  12:00 13:00  14:00',
    '# used 21.0K - 35.0K . 210K',
]

CHARTS_CLAUDE_80x24_UNICODE_0 = [
    'Claude 5h   ██████████░░░░░░  63%, resets 14:17; ccmon counted 21.0K (2 min ago)',
    "Recent pace 700/min; Claude's 5h limit at this pace at 10:47",
    'Claude week ███░░░░░░░░░░░░░  21%, resets Fri 09:00; ccmon counted 21.0K',
    "── 5-hour window - Claude's own % (1 of 5; j/k: more) ──────────────────────────",
    '540% │                                                                 ·········',
    '     │                                                        ·········',
    '     │                                               ·········',
    '     │                                      ·········',
    '     │                             ·········',
    '100% │────────────────────·········─────────────────────────────────────────────',
    '     │     ▂▂▂▂▂▂▅▅▅▅▅▅▇▇·',
    '   0 └──────────────────────────────────────────────────────────────────────────',
    '                10:00          11:00          12:00          13:00         14:00',
    "█ used 63%  ─ Claude's limit 100%  · projected 540%",
    '── Cost per hour - last 24 hours (2 of 5; j/k: more) ───────────────────────────',
    'each column: 1 hour',
    '$1.14 │      ▂▂ ▃▃ ▄▄ ▅▅ ▇▇ ██',
    '      │▇▇ ██ ██ ██ ██ ██ ██ ██                                        ▃▃ ▃▃ ▃▃',
    '    0 └────────────────────────────────────────────────────────────────────────',
    '          12:00 14:00 16:00 18:00 20:00 22:00 00:00 02:00 04:00 06:00 08:00',
]

CHARTS_80x24_UNICODE_3 = [
    "── Claude's week - cost per day (4 of 5; j/k: more) ────────────────────────────",
    '100% │',
    '     │',
    '     │',
    '     │',
    '     │                                                                         ▂',
    '     │                               ▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▂▆▆▆▆▆▆▆▆█',
    '  0% └──────────────────────────────────────────────────────────────────────────',
    '           Wed 04     Thu 05    Fri 06     Sat 07     Sun 08    Mon 09',
    'Tue 03-03 ████████████████▏                                              $1.98',
    'Wed 03-04 █████████████████████████████▋                                 $3.63',
    'Thu 03-05 █████████████████████████████▋                                 $3.63',
    'Fri 03-06 █████████████████████████████▋                                 $3.63',
    'Sat 03-07                                                                $0.00',
    'Sun 03-08                                                                $0.00',
    'Mon 03-09 ██████████████████████████████████████████████████████████████ $7.59',
    'Tue 03-10 █████▏                                                         $0.6300',
]

CHARTS_80x24_ASCII_4 = [
    '-- Cost by weekday and hour - last 4 weeks (5 of 5; j/k: more) -----------------',
    '    0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18 19 20 21 22 23',
    'Mon                         ......:::::::::*********#########',
    'Tue                         .................................',
    'Wed                         .....................::::::::::::',
    'Thu                         .....................::::::::::::',
    'Fri                         .....................::::::::::::',
    'Sat',
    'Sun',
]

CHARTS_CLAUDE_40x12_ASCII_2 = [
    'Claude 5h   ###..  63%, resets 14:17',
    '-- Cost - last 7 days 3/5 --------------',
    'each column: 6 hours',
    '$4.41 |                        #',
    '      |                        #',
    '      |## ### ### ###         ### #',
    '    0 +----------------------------',
    '         Wed Thu Fri Sat Sun Mon',
]


CURRENT_BURNUP_80x24 = [  # at its least: 2 rows of columns (0-270% and 270-540%), the limit on its row
    "-- 5-hour window - Claude's own % ----------------------------------------------",
    '540% |                                                          ................',
    '100% |-----##############.......................................----------------',
    '   0 +--------------------------------------------------------------------------',
    '                10:00          11:00          12:00          13:00         14:00',
    "# used 63%  - Claude's limit 100%  . projected 540%",
    '-- Requests 1-4 of 12 ----------------------------------------------------------',
]

CURRENT_BURNUP_80x40 = [  # Claude's own %: its readings in this window, 100% its limit; the pace's projection by
    # the capacity calibrated from 14 readings: 63% + 700/min × 227 min / 33,300 = 540%
    "-- 5-hour window - Claude's own % ----------------------------------------------",
    '540% |                                                                     .....',
    '     |                                                            .........',
    '     |                                                   .........',
    '     |                                          .........',
    '     |                                 .........',
    '     |                        .........',
    '100% |-----##############.....--------------------------------------------------',
    '   0 +--------------------------------------------------------------------------',
    '                10:00          11:00          12:00          13:00         14:00',
    "# used 63%  - Claude's limit 100%  . projected 540%",
    '-- Requests 1-12 of 12 ---------------------------------------------------------',
]


def test_render_charts_tab_80x24_and_40x12_in_unicode_and_ascii():
    """The Charts tab, chart by chart: each whole under its title, the first shrunk to the rows left, the next
    shown when it fits; at 40x12 one chart at a time, the heatmap (a row a weekday) stepping aside with a note."""
    _, settings, now = _frame_fixture()

    def charts(width, height, unicode, scroll=0, claude=False, **state):
        lines, frame = frame_text(ccmon.ViewState(tab="charts", scroll=scroll, **state),
                                  charts_snapshot(settings, now, claude), settings, width, height, now,
                                  unicode=unicode)
        assert (frame.page_rows, frame.total_rows) == (1, 5)
        return lines

    assert charts(80, 24, True)[3:] == CHARTS_80x24_UNICODE_0
    assert charts(80, 24, False)[6:-1] == CHARTS_80x24_ASCII_0
    assert charts(40, 12, True) == CHARTS_40x12_UNICODE_0
    assert charts(40, 12, False)[3:-1] == CHARTS_40x12_ASCII_0
    assert charts(80, 24, True, claude=True)[3:-1] == CHARTS_CLAUDE_80x24_UNICODE_0
    assert charts(80, 24, True, 3)[6:-1] == CHARTS_80x24_UNICODE_3
    assert charts(80, 24, False, 4)[6:15] == CHARTS_80x24_ASCII_4
    assert charts(40, 12, False, 2, claude=True)[3:-1] == CHARTS_CLAUDE_40x12_ASCII_2
    assert charts(40, 12, True, 4)[4:6] == ["Cost by weekday and hour - last 4 weeks:", "   needs a taller terminal."]
    # `c`: tokens instead of cost, the scale in tokens (Monday 18:00: 38 × 1,200 tokens)
    assert charts(80, 24, True, 1, chart_tokens=True)[6:9] == [
        "── Tokens per hour - last 24 hours (2 of 5; j/k: more) ─────────────────────────",
        "each column: 1 hour",
        "45.6K │                  ▄▄ ██"]
    for width in range(40, 140, 9):  # any size: within the screen, every chart whole
        for height in range(12, 50, 5):
            for scroll in range(5):
                lines = charts(width, height, width % 2 == 0, scroll, claude=height % 2 == 0)
                assert len(lines) == height and all(len(line) <= width for line in lines)


def test_the_charts_tab_draws_the_last_7_days_against_a_weekly_limit_without_claudes_readings():
    """No reading of Claude's week, claude.weekly_max_tokens set: in the week chart's place, the last 7 days'
    premium tokens as a burn-up (from the week's first whole hour; the Week gauge's figure now) against the limit
    as a line; with neither, no week chart at all."""
    _, settings, now = _frame_fixture()
    snap = charts_snapshot(settings, now)
    week = sum(p.split.premium.limited for p in snap.data.points if p.start_ms >= now - 7 * ccmon.DAY_MS)
    limits = dataclasses.replace(snap.limits, weekly={"sonnet": ccmon.Usage(1, week + 3_000, 0)})  # 3,000 since
    snap = dataclasses.replace(snap, limits=limits, data=dataclasses.replace(snap.data, readings=()))
    charts = ccmon.ViewState(tab="charts", scroll=3)
    assert frame_text(charts, snap, settings, 40, 12, now)[1].total_rows == 4  # the heatmap is the 4th
    limited = dataclasses.replace(settings, weekly_limit=1_500_000)
    lines, frame = frame_text(charts, snap, limited, 40, 12, now)
    assert frame.total_rows == 5 and lines[3:11] == [
        "Block       ###..  60%  21.0K / 35.0K",
        "-- Last 7 days against your weekly limit",
        "1.50M |---------------------------------",
        "      |                             ####",  # 839K of 1.50M × 3 rows: 1.68, two rows (from Monday)
        "      |#################################",
        "    0 +---------------------------------",
        "         Wed  Thu  Fri Sat  Sun  Mon Tue",
        "# used 839K  - weekly limit 1.50M"]
    for query in (dataclasses.replace(snap.query, project="web-app"), dataclasses.replace(snap.query, agent="codex")):
        # the limit is of the account's Claude Code usage: not drawn against a project's or another agent's
        assert frame_text(charts, dataclasses.replace(snap, query=query), limited, 40, 12, now)[1].total_rows == 4
    wide = [line.rstrip() for line in frame_text(charts, snap, limited, 80, 24, now, unicode=True)[0][3:17]]
    assert wide[2] == "Week        █████████░░░░░░░  56%  839K / 1.50M, limit Wed 02:13 at this pace"
    assert "```\n" + "\n".join(wide) + "\n```" in (ROOT / "docs" / "charts.md").read_text()  # its sample


def test_the_c_key_and_the_charts_tabs_scroll():
    settings = _settings()
    frame = ccmon.Frame([], page_rows=1, total_rows=5)
    state, action = ccmon.handle_key(ccmon.ViewState(), "9", settings, frame)
    assert (state.tab, action) == ("charts", "refresh")
    state, action = ccmon.handle_key(state, "c", settings, frame)
    assert state.chart_tokens and action == ""  # the series holds both: nothing to fetch
    state, action = ccmon.handle_key(state, "c", settings, frame)
    assert not state.chart_tokens
    state, _ = ccmon.handle_key(state, "KEY_END", settings, frame)
    assert state.scroll == 4  # the last chart at the top
    state, _ = ccmon.handle_key(state, "j", settings, frame)
    assert state.scroll == 4
    other, action = ccmon.handle_key(ccmon.ViewState(tab="daily"), "c", settings, frame)
    assert (other.chart_tokens, other.notice, action) == \
        (False, "c switches the Charts tab between cost and tokens", "")
    assert ccmon.query_for(state, settings, 0).burnup and ccmon.query_for(ccmon.ViewState(), settings, 0).burnup
    assert not ccmon.query_for(ccmon.ViewState(tab="daily"), settings, 0).burnup


def test_render_the_burnup_on_a_tall_current_tab():
    """The Current tab draws the 5-hour window's burn-up only where its requests still keep 10 rows (data rows
    first): not at 80x24; at 80x40 in Claude's own % while its reading is live, else in ccmon's tokens against
    the limit, which it names the plan's guess when it is one."""
    snap, settings, now = _frame_fixture()
    claude = dataclasses.replace(charts_snapshot(settings, now, claude=True), query=snap.query, data=snap.data)
    # 80x24: the burn-up at its least (2 rows of columns) and 4 requests under it
    lines, frame = frame_text(ccmon.ViewState(period="b"), claude, settings, 80, 24, now)
    assert lines[8:18] == [*CLAUDE_80x24[:3], *CURRENT_BURNUP_80x24]
    assert frame.page_rows == 4 and lines[18:23] == frame_text(ccmon.ViewState(period="b"), claude_snapshot(
        settings, now), settings, 80, 24, now)[0][12:17]  # the requests as without a burn-up, fewer of them
    assert frame_text(ccmon.ViewState(period="b"), claude, settings, 80, 23, now)[0][11].startswith("-- Requests")
    lines, frame = frame_text(ccmon.ViewState(period="b"), claude, settings, 80, 40, now)
    assert lines[8:11] == CLAUDE_80x24[:3] and lines[11:23] == CURRENT_BURNUP_80x40
    assert frame.page_rows == 15 and lines[24].startswith("10:30:00 sonnet-4-5")
    # without block tracking, Claude's window is the burn-up's all the same
    untracked = dataclasses.replace(claude, limits=dataclasses.replace(claude.limits, window=None))
    lines, _ = frame_text(ccmon.ViewState(period="b"), untracked, _settings(block_hour=None), 80, 40, now)
    assert CURRENT_BURNUP_80x40[:-1] == lines[lines.index(CURRENT_BURNUP_80x40[0]):][:11]
    # the hint that block tracking is off yields to the burn-up of Claude's own window: never a request row for it
    for height, requests in ((24, 5), (27, 8), (40, 16)):  # the burn-up at its least to 30 rows, then taller
        lines, frame = frame_text(ccmon.ViewState(period="b"), untracked, _settings(block_hour=None), 80, height, now)
        assert not [line for line in lines if "Block tracking is off" in line]
        assert frame.page_rows == requests
    guess = dataclasses.replace(settings, limit_from_plan=True)
    tokens = dataclasses.replace(charts_snapshot(settings, now), query=snap.query, data=snap.data)
    lines, _ = frame_text(ccmon.ViewState(period="b"), tokens, guess, 80, 40, now, unicode=True)
    assert lines[8] == "Block       ██████████░░░░░░  60%  21.0K / 35.0K (plan's guess), 4h30m left"
    assert lines[11] == "── 5-hour window - premium tokens ──────────────────────────────────────────────"
    assert lines[18] == "      │       ▆···"  # 10:00-10:30: 21.0K of 210K, 0.7 of 7 rows
    assert lines[21] == "█ used 21.0K  ─ plan's guess 35.0K  · projected 210K"


def test_the_pace_line_and_the_burnup_project_claudes_window_alike():
    """While Claude's 5-hour reading is live, the pace line under its gauge and the burn-up project from Claude's
    own % (63%), not from what ccmon counted (here 5,000 tokens: the rest was used on another machine): 63% +
    50/min × 227 min / 33,300 tokens = 97% at the reset, in both (the pace line once said 49%)."""
    _, settings, now = _frame_fixture()
    snap = charts_snapshot(settings, now, claude=True)
    limits = dataclasses.replace(snap.limits, recent_rate=50.0,
                                 block=ccmon.Split(premium=ccmon.Usage(2, 4_000, 1_000)))
    lines, _ = frame_text(ccmon.ViewState(tab="charts"), dataclasses.replace(snap, limits=limits), settings, 80, 24,
                          now)
    assert lines[3:5] == ["Claude 5h   ##########......  63%, resets 14:17; ccmon counted 5.00K (2 min ago)",
                          "Recent pace 50/min; at this pace 97% of Claude's 5h limit at reset"]
    assert lines[16] == "# used 63%  - Claude's limit 100%  . projected 97%"


def test_alerts_fire_on_claudes_own_percentages():
    settings = ccmon.MonitorSettings("x:1", BERLIN, "auto", 10_000, 5, weekly_limit=100_000, alerts=(50, 80))
    window_end, week_end = ccmon.BLOCK_MS + 500, 7 * ccmon.DAY_MS
    reading = ccmon.LimitReading("s", 0, five_hour=ccmon.LimitWindow(55.0, window_end),
                                 seven_day=ccmon.LimitWindow(81.5, week_end))
    # ccmon's own counts say 20 % of the block and 10 % of the week: Claude's say 55 % and 81.5 %.
    limits = ccmon.LimitFigures((500, window_end), ccmon.Split(premium=ccmon.Usage(1, 2_000)), 0.0, 10_000, None,
                                {"sonnet": ccmon.Usage(1, 10_000)}, ccmon.ClaudeLimits(reading, reading, 40_000, 3),
                                window_from_claude=True)
    fired: set = set()
    due = ccmon.due_alerts(limits, settings, 1000, fired)
    assert [(key, message) for key, message, _ in due] == [
        (("block", 0, 50), "ALERT: block usage passed 50% (Claude says 55%)"),  # the window to the ten minutes
        (("weekly", week_end, 50), "ALERT: weekly usage passed 50% (Claude says 82%)"),
        (("weekly", week_end, 80), "ALERT: weekly usage passed 80% (Claude says 82%)")]
    assert due[0][2] == {"CCMON_ALERT_KIND": "block", "CCMON_ALERT_THRESHOLD": "50", "CCMON_ALERT_PERCENT": "55.0",
                         "CCMON_ALERT_USED": "2000", "CCMON_ALERT_LIMIT": "40000", "CCMON_ALERT_SOURCE": "claude"}
    assert due[2][2]["CCMON_ALERT_LIMIT"] == "" and due[2][2]["CCMON_ALERT_USED"] == "10000"
    assert ccmon.due_alerts(limits, settings, 2000, fired) == []  # once per window
    jittered = ccmon.LimitReading("s", 1500, five_hour=ccmon.LimitWindow(56.0, window_end + 6_000),
                                  seven_day=ccmon.LimitWindow(81.6, week_end - 4_000))
    assert ccmon.due_alerts(dataclasses.replace(limits, claude=ccmon.ClaudeLimits(jittered, jittered, 40_000, 3)),
                            settings, 2000, fired) == []  # the same windows, read a few seconds apart
    # Once Claude's windows have reset, ccmon's own counts measure again: 20 % and 10 % fire nothing.
    assert ccmon.due_alerts(limits, settings, week_end, fired) == []


def claude_reading(srv: ServerProcess, session: str, email: str, tokens: list[tuple[int, int]], five_hour: float,
                   resets_in_s: int, cwd: Path) -> dict:
    """Requests of `session` in the last quarter hour ((input, output) each, a minute apart, the last 6 minutes
    ago), then Claude Code's status line input for it with Claude's 5-hour share, sent by `ccmon statusline`;
    returns the input and when it was read (between two moments)."""
    now = ccmon.now_ms()
    times = [now - (6 + len(tokens) - 1 - i) * 60_000 for i in range(len(tokens))]
    sdk_export(srv.port, [("api_request", {**api_request(i, iso(when), session=session, input_tokens=inp,
                                                         output_tokens=out), "user.email": email})
                          for i, (when, (inp, out)) in enumerate(zip(times, tokens))])
    data = live_input(session, five_hour=five_hour)
    data["rate_limits"]["five_hour"]["resets_at"] = now // 1000 + resets_in_s
    before = ccmon.now_ms()
    result = status_line(srv.target, data, cwd=cwd)
    assert (result.returncode, result.stderr) == (0, ""), result
    return {"input": data, "read_between": (before, ccmon.now_ms()),
            "requests": [(when, inp + out) for when, (inp, out) in zip(times, tokens)],
            "five_hour_resets": data["rate_limits"]["five_hour"]["resets_at"],
            "seven_day_resets": data["rate_limits"]["seven_day"]["resets_at"]}


def test_claudes_own_limits_on_every_screen(tmp_path):
    """One person's server: 15,000 premium tokens when Claude said 30 % (a full window: 50,000), 15,000 more since.
    The block is Claude's window; the limit (max_tokens auto) its calibrated capacity; the projection goes to
    Claude's 100 %; alerts fire on Claude's 30 %, not on ccmon's 60 %."""
    srv = ServerProcess(tmp_path).start()
    utc = ccmon.ZoneInfo("UTC")
    ana = claude_reading(srv, "s-ana", "ana@example.com", [(1000, 500)] * 10, 30.0, 7200, tmp_path)
    resets, week_resets = ana["five_hour_resets"] * 1000, ana["seven_day_resets"] * 1000
    time.sleep(0.01)  # after the reading, so not part of what it measured
    requests = [*ana["requests"], (ccmon.now_ms(), 15_000)]
    sdk_export(srv.port, [("api_request", {**api_request(99, iso(requests[-1][0]), session="s-ana", input_tokens=10_000,
                                                         output_tokens=5_000), "user.email": "ana@example.com"})])
    base = ["--monitor-server", srv.target, "--monitor-timezone", "UTC"]
    try:
        figures = json.loads(run_ccmon([*base, "-b", "auto", "--claude-max-tokens", "auto", "--json"], tmp_path).stdout)
        read_at = figures.pop("limits_read_at")
        assert ana["read_between"][0] // 1000 <= read_at <= ana["read_between"][1] // 1000
        assert {key: figures[key] for key in ("five_hour_percent", "five_hour_resets_at", "seven_day_percent",
                                              "seven_day_resets_at", "block_end", "block_tokens", "block_limit",
                                              "block_usage", "weekly_premium_tokens")} == {
            "five_hour_percent": 30.0, "five_hour_resets_at": resets // 1000, "seven_day_percent": 20.5,
            "seven_day_resets_at": week_resets // 1000, "block_end": resets // 1000, "block_tokens": 30_000,
            "block_limit": 50_000, "block_usage": 60.0, "weekly_premium_tokens": 30_000}
        assert figures["weekly_usage"] == 30_000 / 73_171 * 100  # Claude's week, calibrated: 15,000 / 20.5 %
        shown = run_ccmon([*base, "--format", "5h @five_hour until @five_hour_resets, week @seven_day until "
                           "@seven_day_resets"], tmp_path)
        now = ccmon.now_ms()
        assert (shown.stdout, shown.stderr) == (
            f"5h 30% until {ccmon.reset_time(resets, now, utc)}, week 21% until "
            f"{ccmon.reset_time(week_resets, now, utc)}\n", "")
        report = json.loads(run_ccmon(["report", "blocks", "--json", *base], tmp_path).stdout)
        assert [{key: row[key] for key in ("block_start", "block_end", "window", "premium_tokens")}
                for row in report["rows"]] == [
            {"block_start": dt.datetime.fromtimestamp((resets - ccmon.BLOCK_MS) / 1000, utc).isoformat(
                timespec="minutes"), "block_end": dt.datetime.fromtimestamp(resets / 1000, utc).isoformat(
                timespec="minutes"), "window": "claude", "premium_tokens": 30_000}]
        table = run_ccmon(["report", "blocks", *base], tmp_path).stdout.splitlines()
        assert table[1].split()[:4] == ["start", "end", "window", "premium"] and table[3].split()[4] == "claude"

        marker = tmp_path / "alerts.env"
        with MonitorPty([*base, "-b", "auto", "--claude-max-tokens", "auto", "--alert", "25", "--alert", "50",
                         "--monitor-alert-command", f"env | grep CCMON_ALERT | sort >> {marker}",
                         "--monitor-refresh-interval", "1s"], cols=100, rows=30, cwd=tmp_path,
                        env={"HOME": str(tmp_path)}) as monitor:
            started = ccmon.now_ms()
            screen = monitor.wait_for("ALERT: block usage passed 25% (Claude says 30%)", "the alert")
            # The gauge is Claude's 30 %; ccmon's 30,000 tokens support it.
            # (a reset after midnight has its weekday, and the line then leaves out "read" to fit)
            reset = ccmon.reset_time(resets, started, utc)
            assert re.fullmatch(rf"Claude 5h   [█░]+  30%, resets {reset}; ccmon counted "
                                rf"30\.0K \((read )?(just now|1 min ago)\) *", line_with(screen, "Claude 5h"))
            # The tokens since the previous quarter hour began (15 to 30 minutes before the refresh): the pace. All
            # 30,000, unless a quarter hour began since the first request. Not projected to one reading's capacity.
            paces = {ccmon.format_rate(sum(tokens for when, tokens in requests if when >= ccmon.recent_pace_start(
                moment)) / ((moment - ccmon.recent_pace_start(moment)) / 60_000))
                for moment in range(started - 60_000, ccmon.now_ms() + 1000, 1000)}
            pace = re.fullmatch(r"Recent pace (\S+); too few of Claude's readings to project its limit *",
                                line_with(screen, "Recent pace"))
            assert pace and pace.group(1) in paces, (line_with(screen, "Recent pace"), paces)
            assert re.match(rf"Claude week [█░]+  21%, resets "
                            rf"{re.escape(ccmon.reset_time(week_resets, ccmon.now_ms(), utc))}; ccmon counted 30\.0K",
                            line_with(screen, "Claude week"))
            assert not [line for line in screen.splitlines() if line.startswith(("Week", "Block", "Tokens"))]
            assert line_with(screen, "Premium").split()[:3] == ["Premium", "11", "30.0K"]  # the block's requests
            monitor.send(b"6")
            screen = monitor.wait_for("Users by cost", "the users tab")
            assert line_with(screen, "User ").split()[-2:] == ["5h", "Week"]
            assert line_with(screen, "ana@example.com").split()[-2:] == ["30%", "21%"]
            wait_until(marker.exists, "the alert command's output", 10)
            time.sleep(2)  # two more refreshes: nothing more fires
            assert marker.read_text().split() == [
                "CCMON_ALERT_KIND=block", "CCMON_ALERT_LIMIT=50000", "CCMON_ALERT_PERCENT=30.0",
                "CCMON_ALERT_SOURCE=claude", "CCMON_ALERT_THRESHOLD=25", "CCMON_ALERT_USED=30000"]
            monitor.send(b"q")
            assert monitor.close() == 0
    finally:
        srv.stop()


def test_each_users_own_limits_on_a_team_server(server, tmp_path):
    """Ana's Claude says 30 %, Bo's 80 %: the Users tab shows both; each one's own figures show under the user
    filter; without a filter, nobody's (they would be some user's, not the server's)."""
    utc = ccmon.ZoneInfo("UTC")
    ana = claude_reading(server, "s-ana", "ana@example.com", [(1000, 500)] * 10, 30.0, 7200, tmp_path)
    bo = claude_reading(server, "s-bo", "bo@example.com", [(700, 100)], 80.0, 3600, tmp_path)
    everyone = server.query().GetLimits(ccmon_pb2.GetLimitsRequest())
    assert everyone.HasField("latest") and not everyone.HasField("five_hour_now")
    only_bo = server.query().GetLimits(ccmon_pb2.GetLimitsRequest(user="bo@example.com"))
    assert (only_bo.five_hour_now.session_id, only_bo.five_hour_now.five_hour.used_percentage,
            only_bo.five_hour.tokens, only_bo.five_hour.readings) == ("s-bo", 80.0, 1000, 1)  # 800 / 80 %
    later = server.query().GetLimits(ccmon_pb2.GetLimitsRequest(user="bo@example.com", at=ccmon.timestamp_from_ms(
        bo["five_hour_resets"] * 1000)))
    assert not later.HasField("five_hour_now") and later.seven_day_now.seven_day.used_percentage == 20.5
    settings = ccmon.MonitorSettings(server.target, utc, "auto", 7_000, 5, limit_from_plan=True)
    client = ccmon.Client(server.target)
    try:
        now = ccmon.now_ms()
        snap = ccmon.fetch_snapshot(client, ccmon.query_for(ccmon.ViewState(tab="users"), settings, now))
        lines, _ = frame_text(ccmon.ViewState(tab="users"), snap, settings, 100, 30, now)
        assert not [line for line in lines if line.startswith("Claude")]
        table = lines.index(next(line for line in lines if line.startswith("-- Users by cost")))
        assert [line.split() for line in lines[table + 1:table + 4]] == [
            ["User", "Sessions", "Req", "Tokens", "Premium", "Cost", "Share", "of", "cost", "5h", "Week"],
            ["ana@example.com", "1", "10", "15.0K", "15.0K", "$0.00", "........", "0%", "30%", "21%"],
            ["bo@example.com", "1", "1", "800", "800", "$0.00", "........", "0%", "80%", "21%"]]
        state = ccmon.ViewState(tab="users", user="bo@example.com", period="b")
        snap = ccmon.fetch_snapshot(client, ccmon.query_for(state, settings, now))
        lines, _ = frame_text(state, snap, settings, 100, 30, now)
        resets = bo["five_hour_resets"] * 1000
        block = next(i for i, line in enumerate(lines) if line.startswith("Claude 5h"))
        assert lines[block] == (f"Claude 5h   {'#' * 24}{'.' * 6}  80%, resets {ccmon.reset_time(resets, now, utc)}; "
                                "ccmon counted 800 (read just now)")
        assert lines[block + 1].endswith("; too few of Claude's readings to project its limit")
        assert not [line for line in lines if "7.00K" in line]  # the plan's guess never stands beside Claude's 80 %
        assert snap.query.start_ms == resets - ccmon.BLOCK_MS  # the `b` period is Claude's window too
        assert ana["five_hour_resets"] != bo["five_hour_resets"]
    finally:
        client.close()


# ---------------------------------------------------------------- projects: from the resource or the status line

def project_events(session_filter=None) -> list[tuple[str, dict]]:
    """Two users, six sessions: two of project alpha, two in folders both named web, one without a project."""
    def request(seq, session, email, when, model, **figures):
        return ("api_request", {**api_request(seq, when, model=model, session=session, **figures),
                                "user.email": email})

    def tool(seq, session, email, when, name):
        return ("tool_result", {"event.name": "tool_result", "event.sequence": seq, "session.id": session,
                                "user.email": email, "event.timestamp": when, "tool_name": name, "success": "true",
                                "duration_ms": "10"})

    events = [
        request(1, "s-a1", "ana@example.com", "2026-05-04T09:00:00Z", "claude-sonnet-4-5", input_tokens=1000,
                output_tokens=200, cost_usd=0.5),
        request(2, "s-a1", "ana@example.com", "2026-05-04T09:05:00Z", "claude-haiku-4-5", input_tokens=300,
                output_tokens=30, cost_usd=0.01),
        tool(3, "s-a1", "ana@example.com", "2026-05-04T09:01:00Z", "Bash"),
        request(4, "s-a2", "bo@example.com", "2026-05-05T10:00:00Z", "claude-opus-4-1", input_tokens=50,
                output_tokens=5000, cost_usd=2.25),
        request(5, "s-web", "ana@example.com", "2026-05-05T11:00:00Z", "claude-sonnet-4-5", input_tokens=7,
                output_tokens=3, cost_usd=0.125),
        request(6, "s-web", "ana@example.com", "2026-05-06T08:00:00Z", "claude-sonnet-4-5", input_tokens=100,
                output_tokens=10, cost_usd=0.25),
        tool(7, "s-web", "ana@example.com", "2026-05-05T11:01:00Z", "Read"),
        request(8, "s-api", "bo@example.com", "2026-05-05T12:00:00Z", "claude-haiku-4-5", input_tokens=40,
                output_tokens=4, cost_usd=0.02),
        request(9, "s-none", "ana@example.com", "2026-05-05T13:00:00Z", "claude-sonnet-4-5", input_tokens=500,
                output_tokens=50, cost_usd=1.0),
    ]
    return [event for event in events if session_filter is None or session_filter(event[1]["session.id"])]


def report_reading(srv: ServerProcess, session: str, project_dir: str) -> None:
    """What `ccmon statusline` sends: a LimitReading with the status line's workspace.project_dir."""
    srv.query().ReportStatusLine(ccmon_pb2.ReportStatusLineRequest(reading=ccmon_pb2.LimitReading(
        session_id=session, project_dir=project_dir, model="claude-sonnet-4-5")))


def seed_projects(srv: ServerProcess, tmp_path: Path) -> None:
    """alpha from OTEL_RESOURCE_ATTRIBUTES (s-a2's status line reported a folder first: the name wins); the web
    folders from status lines, one through `ccmon statusline` itself; s-none has neither."""
    web = live_input("s-web")
    web["workspace"]["project_dir"] = "/home/dev/web"
    assert status_line(srv.target, web, cwd=tmp_path).returncode == 0
    assert status_line(srv.target, live_input("s-a2"), cwd=tmp_path).returncode == 0  # /home/dev/proj-alpha
    assert db_rows(srv.db, "SELECT session_id, project FROM sessions ORDER BY session_id") == \
        [("s-a2", "/home/dev/proj-alpha"), ("s-web", "/home/dev/web")]
    assert sdk_export(srv.port, project_events(lambda s: s in ("s-a1", "s-a2")),
                      resource={**CLAUDE_RESOURCE, "project": "alpha"}) == ["SUCCESS"]
    assert sdk_export(srv.port, project_events(lambda s: s not in ("s-a1", "s-a2"))) == ["SUCCESS"]
    report_reading(srv, "s-api", "/srv/api/web")
    report_reading(srv, "s-a1", "/home/dev/elsewhere")  # a status line's folder never replaces a project
    report_reading(srv, "s-none", "")                   # a status line without a folder says nothing


def project_figures(message) -> tuple:
    return message.project, message.sessions, message.stats.total_requests, message.stats.total_cost.amount, \
        message.stats.total_tokens.total


def test_sessions_get_their_project_from_the_resource_or_the_status_line(server, tmp_path):
    seed_projects(server, tmp_path)
    assert db_rows(server.db, "SELECT session_id, project FROM sessions ORDER BY session_id") == [
        ("s-a1", "alpha"), ("s-a2", "alpha"), ("s-api", "/srv/api/web"), ("s-none", None), ("s-web", "/home/dev/web")]
    q = server.query()
    projects = q.GetProjects(ccmon_pb2.GetProjectsRequest(**MAY)).projects
    assert [project_figures(p) for p in projects] == [
        ("alpha", 2, 3, 2.76, 6580), ("", 1, 1, 1.0, 550), ("/home/dev/web", 1, 2, 0.375, 120),
        ("/srv/api/web", 1, 1, 0.02, 44)]
    assert (projects[0].stats.base_requests, projects[0].stats.premium_cost.amount) == (1, 2.75)
    # 5 May (UTC): s-web crosses the end of the day, so only its first request counts; s-a1 was the day before.
    may5 = dict(start_time=ts("2026-05-05T00:00:00Z"), end_time=ts("2026-05-06T00:00:00Z"))
    day = q.GetProjects(ccmon_pb2.GetProjectsRequest(**may5)).projects
    assert [project_figures(p) for p in day] == [
        ("alpha", 1, 1, 2.25, 5050), ("", 1, 1, 1.0, 550), ("/home/dev/web", 1, 1, 0.125, 10),
        ("/srv/api/web", 1, 1, 0.02, 44)]
    late = dict(start_time=ts("2026-05-05T11:30:00Z"), end_time=ts("2026-06-01T00:00:00Z"))  # starts inside s-web
    assert [project_figures(p) for p in q.GetProjects(ccmon_pb2.GetProjectsRequest(**late)).projects] == [
        ("", 1, 1, 1.0, 550), ("/home/dev/web", 1, 1, 0.25, 110), ("/srv/api/web", 1, 1, 0.02, 44)]
    for period in (MAY, may5, late):  # the projects add up to the period's totals
        whole = q.GetStats(ccmon_pb2.GetStatsRequest(**period)).stats
        parts = q.GetProjects(ccmon_pb2.GetProjectsRequest(**period)).projects
        assert sum(p.stats.total_requests for p in parts) == whole.total_requests
        assert sum(p.stats.total_tokens.total for p in parts) == whole.total_tokens.total
        assert round(sum(p.stats.total_cost.amount for p in parts), 9) == whole.total_cost.amount
    ana = q.GetProjects(ccmon_pb2.GetProjectsRequest(**MAY, user="ana@example.com")).projects
    assert [project_figures(p) for p in ana] == [
        ("", 1, 1, 1.0, 550), ("alpha", 1, 2, 0.51, 1530), ("/home/dev/web", 1, 2, 0.375, 120)]
    bo_day = q.GetProjects(ccmon_pb2.GetProjectsRequest(**may5, user="bo@example.com")).projects
    assert [project_figures(p) for p in bo_day] == [("alpha", 1, 1, 2.25, 5050), ("/srv/api/web", 1, 1, 0.02, 44)]
    web = q.GetProjects(ccmon_pb2.GetProjectsRequest(**MAY, project="web")).projects
    assert [p.project for p in web] == ["/home/dev/web", "/srv/api/web"]
    assert q.GetProjects(ccmon_pb2.GetProjectsRequest(**MAY, user="nobody@example.com")).projects == []


def test_a_metrics_only_session_gets_its_project_from_the_resource(server):
    exporter = OTLPMetricExporter(endpoint=server.target, insecure=True,
                                  preferred_temporality={Counter: AggregationTemporality.DELTA})
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    provider = MeterProvider(resource=Resource.create({**CLAUDE_RESOURCE, "project": " gamma "}),
                             metric_readers=[reader])
    cost = provider.get_meter("com.anthropic.claude_code").create_counter("claude_code.cost.usage", unit="USD")
    cost.add(0.75, {"session.id": "m-gamma", "model": "claude-sonnet-4-5"})
    cost.add(0.5, {"model": "claude-sonnet-4-5"})  # no session: no project to give
    provider.force_flush()
    provider.shutdown()
    assert db_rows(server.db, "SELECT session_id, project FROM sessions ORDER BY session_id") == \
        [("", None), ("m-gamma", "gamma")]
    assert [project_figures(p) for p in server.query().GetProjects(ccmon_pb2.GetProjectsRequest()).projects] == \
        [("gamma", 1, 0, 0.75, 0)]


def test_the_project_filter_on_every_query(server, tmp_path):
    seed_projects(server, tmp_path)
    q = server.query()

    def stats(project, **period):
        s = q.GetStats(ccmon_pb2.GetStatsRequest(**(period or MAY), project=project)).stats
        return s.total_requests, s.total_cost.amount

    # By its stored value, or by the end of its path; a folder's inner part or a partial name is not a project.
    assert [stats(name) for name in ("alpha", "web", "api/web", "/srv/api/web", "/home/dev/web", "dev", "eb",
                                     "proj-alpha")] == \
        [(3, 2.76), (3, 0.395), (1, 0.02), (1, 0.02), (2, 0.375), (0, 0.0), (0, 0.0), (0, 0.0)]
    assert stats("web", start_time=ts("2026-05-05T11:00:00Z"), end_time=ts("2026-05-05T11:00:00.001Z")) == \
        (1, 0.125)  # half-open, to the millisecond
    assert [(s.session_id, s.project, s.stats.total_cost.amount) for s in
            q.GetSessions(ccmon_pb2.GetSessionsRequest(**MAY, project="web")).sessions] == \
        [("s-web", "/home/dev/web", 0.375), ("s-api", "/srv/api/web", 0.02)]
    assert [(s.session_id, s.project) for s in q.GetSessions(ccmon_pb2.GetSessionsRequest(**MAY)).sessions][-2:] == \
        [("s-a2", "alpha"), ("s-a1", "alpha")]
    assert [s.session_id for s in q.GetSessions(ccmon_pb2.GetSessionsRequest(
        **MAY, project="alpha", user="bo@example.com")).sessions] == ["s-a2"]
    page = q.GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(**MAY, project="alpha", oldest_first=True))
    assert (page.total_count, [(r.session_id, r.cost_usd) for r in page.requests]) == \
        (3, [("s-a1", 0.5), ("s-a1", 0.01), ("s-a2", 2.25)])
    assert [(m.model, m.requests, m.cost.amount) for m in
            q.GetModelStats(ccmon_pb2.GetModelStatsRequest(**MAY, project="alpha")).models] == \
        [("claude-opus-4-1", 1, 2.25), ("claude-sonnet-4-5", 1, 0.5), ("claude-haiku-4-5", 1, 0.01)]
    days = q.GetUsage(ccmon_pb2.GetUsageRequest(start_time=ts("2026-05-04T00:00:00Z"),
                                                end_time=ts("2026-05-07T00:00:00Z"), project="web")).days
    assert [(d.date, d.stats.total_requests, d.stats.total_cost.amount) for d in days] == \
        [("2026-05-06", 1, 0.25), ("2026-05-05", 2, 0.145), ("2026-05-04", 0, 0.0)]
    assert [(t.tool, t.calls) for t in q.GetToolStats(ccmon_pb2.GetToolStatsRequest(**MAY, project="alpha")).tools] \
        == [("Bash", 1)]
    assert [(t.tool, t.calls) for t in q.GetToolStats(ccmon_pb2.GetToolStatsRequest(**MAY, project="web")).tools] \
        == [("Read", 1)]
    assert [(u.user, u.sessions, u.stats.total_requests, u.stats.total_cost.amount) for u in
            q.GetUsers(ccmon_pb2.GetUsersRequest(**MAY, project="alpha")).users] == \
        [("bo@example.com", 1, 1, 2.25), ("ana@example.com", 1, 2, 0.51)]
    # Blocks stay the windows of everyone's activity (Claude's windows are the account's), with the project's
    # figures in them; a block without the project's usage is left out.
    everyone = q.GetBlocks(ccmon_pb2.GetBlocksRequest(**MAY)).blocks
    assert [(b.start_time, b.stats.total_requests) for b in everyone] == [
        (ts("2026-05-04T09:00:00Z"), 2), (ts("2026-05-05T10:00:00Z"), 4), (ts("2026-05-06T08:00:00Z"), 1)]
    web_blocks = q.GetBlocks(ccmon_pb2.GetBlocksRequest(**MAY, project="web")).blocks
    assert [(b.start_time, b.end_time, b.stats.total_requests, b.stats.total_cost.amount, b.last_activity_at)
            for b in web_blocks] == [
        (ts("2026-05-05T10:00:00Z"), ts("2026-05-05T15:00:00Z"), 2, 0.145, ts("2026-05-05T12:00:00Z")),
        (ts("2026-05-06T08:00:00Z"), ts("2026-05-06T13:00:00Z"), 1, 0.25, ts("2026-05-06T08:00:00Z"))]
    assert q.GetBlocks(ccmon_pb2.GetBlocksRequest(**MAY, project="web", user="ana@example.com")).blocks[0] \
        .start_time == ts("2026-05-05T11:00:00Z")  # ana's own windows


def test_the_monitor_snapshot_follows_the_project_filter(server, tmp_path):
    seed_projects(server, tmp_path)
    client = ccmon.Client(server.target)
    settings = ccmon.MonitorSettings(server.target, ccmon.ZoneInfo("UTC"), None, None, 5)
    end = ccmon.parse_iso_ms("2026-06-01T00:00:00Z")
    try:
        for tab, project, expected in (("current", "alpha", 3), ("sessions", "web", 2), ("models", "web", 2)):
            state = ccmon.ViewState(tab=tab, period="m", project=project)
            snap = ccmon.fetch_snapshot(client, ccmon.query_for(state, settings, end))
            assert [p.project for p in snap.projects] == ["alpha", "", "/home/dev/web", "/srv/api/web"]
            data = {"current": lambda d: d.page.total, "sessions": len, "models": len}[tab](snap.data)
            assert data == expected, tab
        assert [(u.user, u.split.total.cost_nanos, u.sessions) for u in snap.users] == \
            [("ana@example.com", 375_000_000, 1), ("bo@example.com", 20_000_000, 1)]
        state = ccmon.ViewState(tab="projects", period="m", user="bo@example.com")
        snap = ccmon.fetch_snapshot(client, ccmon.query_for(state, settings, end))
        assert [(p.project, p.split.total.cost_nanos, p.sessions) for p in snap.projects] == \
            [("alpha", 2_250_000_000, 1), ("/srv/api/web", 20_000_000, 1)]
    finally:
        client.close()


def test_report_project_and_the_project_filter_on_reports(server, tmp_path):
    seed_projects(server, tmp_path)
    may = ("--since", "2026-05-01", "--until", "2026-05-31")
    report = json.loads(run_report(server, "project", *may, "--json", cwd=tmp_path).stdout)
    assert (report["report"], report["project"]) == ("project", None)
    assert [(r["project"], r["sessions"], r["requests"], r["total_tokens"], r["cost_usd"], r["premium_cost_usd"])
            for r in report["rows"]] == [("alpha", 2, 3, 6580, 2.76, 2.75), ("", 1, 1, 550, 1.0, 1.0),
                                         ("/home/dev/web", 1, 2, 120, 0.375, 0.375),
                                         ("/srv/api/web", 1, 1, 44, 0.02, 0.0)]
    assert (report["totals"]["sessions"], report["totals"]["requests"], report["totals"]["cost_usd"]) == (5, 7, 4.155)
    table = run_report(server, "project", *may, cwd=tmp_path).stdout.splitlines()
    assert table == [
        "project report, 2026-05-01T00:00:00+09:00 to 2026-06-01T00:00:00+09:00 (Asia/Tokyo)",
        "project       sessions  req  input  output  cache_read  cache_write  tokens     cost  premium_req  premium_cost",
        "------------  --------  ---  -----  ------  ----------  -----------  ------  -------  -----------  ------------",
        "alpha                2    3  1,350   5,230           0            0   6,580    $2.76            2         $2.75",
        "(no project)         1    1    500      50           0            0     550    $1.00            1         $1.00",
        "dev/web              1    2    107      13           0            0     120  $0.3750            2       $0.3750",
        "api/web              1    1     40       4           0            0      44  $0.0200            0         $0.00",
        "------------  --------  ---  -----  ------  ----------  -----------  ------  -------  -----------  ------------",
        "Total                5    7  1,997   5,297           0            0   7,294    $4.16            5         $4.13"]
    wide = run_report(server, "project", *may, "--wide", cwd=tmp_path).stdout.splitlines()
    assert [line.split()[0] for line in wide[3:7]] == ["alpha", "(no", "/home/dev/web", "/srv/api/web"]
    csv_out = run_report(server, "project", *may, "--csv", "--project", "web", cwd=tmp_path).stdout.splitlines()
    assert csv_out == [
        "project,sessions,requests,input_tokens,output_tokens,cache_read_tokens,cache_creation_tokens,total_tokens,"
        "cost_usd,premium_requests,premium_cost_usd",
        "/home/dev/web,1,2,107,13,0,0,120,0.375,2,0.375",
        "/srv/api/web,1,1,40,4,0,0,44,0.02,0,0.0",
        "Total,2,3,147,17,0,0,164,0.395,2,0.375"]
    daily = json.loads(run_report(server, "daily", "--since", "2026-05-04", "--until", "2026-05-06", "--project",
                                  "alpha", "--json", cwd=tmp_path).stdout)
    assert report_rows_of(daily, "date", "requests", "cost_usd") == \
        [("2026-05-04", 2, 0.51), ("2026-05-05", 1, 2.25)]
    assert daily["project"] == "alpha"
    for kind, key, expected in (("model", "model", [("claude-sonnet-4-5", 2, 0.375)]),
                                ("session", "session_id", [("s-web", 2, 0.375)]),
                                ("blocks", "block_start", [("2026-05-05T19:00+09:00", 1, 0.125),
                                                           ("2026-05-06T17:00+09:00", 1, 0.25)]),
                                ("monthly", "month", [("2026-05", 2, 0.375)])):
        rows = json.loads(run_report(server, kind, *may, "--project", "dev/web", "--json", cwd=tmp_path).stdout)
        assert report_rows_of(rows, key, "requests", "cost_usd") == expected, kind
    session = run_report(server, "session", *may, "--project", "web", cwd=tmp_path).stdout.splitlines()
    assert session[0].endswith("(Asia/Tokyo), project web")
    assert [line.split()[0] for line in session[3:5]] == ["s-web", "s-api"]
    wide_session = run_report(server, "session", *may, "--project", "web", "--wide", cwd=tmp_path).stdout.splitlines()
    assert wide_session[3].split()[:3] == ["s-web", "ana@example.com", "/home/dev/web"]
    nothing = run_report(server, "daily", *may, "--project", "nowhere", "--json", cwd=tmp_path)
    assert json.loads(nothing.stdout)["totals"]["requests"] == 0


def report_rows_of(report: dict, *keys: str) -> list[tuple]:
    return [tuple(row[key] for key in keys) for row in report["rows"]]


def test_project_labels_tell_folders_apart():
    labels = ccmon.project_labels(["/home/dev/src/web", "/srv/api/web", "alpha", "/home/dev/alpha", "", "/x/y/tool/",
                                   "C:\\Users\\dev\\app", "/"])
    assert labels == {"/home/dev/src/web": "src/web", "/srv/api/web": "api/web", "alpha": "alpha",
                      "/home/dev/alpha": "dev/alpha", "": "(no project)", "/x/y/tool/": "tool",
                      "C:\\Users\\dev\\app": "app", "/": "/"}
    assert ccmon.project_forms("/srv/api/web", labels) == ("/srv/api/web", "api/web")
    assert ccmon.project_forms("alpha", labels) == ("alpha",)
    assert ccmon.project_forms("", labels) == ("(no project)",)


PROJECTS = (ccmon.ProjectUsage("alpha", ccmon.Split(ccmon.Usage(1, 300, 30, 0, 0, 10_000_000),
                                                   ccmon.Usage(2, 1050, 5200, 0, 0, 2_750_000_000)), 2),
            ccmon.ProjectUsage("", ccmon.Split(premium=ccmon.Usage(1, 500, 50, 0, 0, 1_000_000_000)), 1),
            ccmon.ProjectUsage("/home/dev/src/web", ccmon.Split(premium=ccmon.Usage(2, 107, 13, 0, 0, 375_000_000)), 1),
            ccmon.ProjectUsage("/srv/api/web", ccmon.Split(ccmon.Usage(1, 40, 4, 0, 0, 20_000_000)), 1))


def test_render_projects_tab_and_the_p_key():
    settings, now = _settings(), local_ms("2026-05-05 13:00")
    state, snap = insight_snapshot(settings, now, "projects", projects=PROJECTS)
    lines, frame = frame_text(state, snap, settings, 80, 24, now)
    assert lines[1] == "  1 Now   2 Day   3 Mod   4 Ses   5 Tool   6 User   7 Blk   8 Proj   9 Cht  "
    assert lines[6:12] == [
        "-- Projects by cost - last 7 days - p: filter by project -----------------------",
        "Project           Sessions    Req  Tokens      Cost Share of cost",
        "alpha                    2      3   6.58K     $2.76 #####...  66%",
        "(no project)             1      1     550     $1.00 ##......  24%",
        "/home/dev/src/web        1      2     120   $0.3750 #.......   9%",
        "/srv/api/web             1      1      44   $0.0200 ........   0%"]
    assert lines[-1] == "h/d/w/m/a/b period  o order  Tab/1-9 tab  u user  p project  ? help  q quit"
    assert (frame.project_names, frame.total_rows) == (tuple(p.project for p in PROJECTS), 4)
    narrow, _ = frame_text(state, snap, settings, 40, 14, now)
    assert narrow[6:11] == ["-- Projects by cost - last 7 days - p: f",
                            "Project           Req  Tokens      Cost",
                            "alpha               3   6.58K     $2.76",
                            "(no project)        1     550     $1.00",
                            "src/web             2     120   $0.3750"]
    assert narrow[-1] == "h/d/w/m/a/b  1-9  u/p  ? help  q quit"  # whole hints in 39 columns
    # p cycles through the period's projects (not the sessions without one), then back to every project.
    chosen = []
    for _ in range(4):
        state, action = ccmon.handle_key(state, "p", settings, frame)
        assert action == "refresh"
        chosen.append(state.project)
    assert chosen == ["alpha", "/home/dev/src/web", "/srv/api/web", None]
    state = dataclasses.replace(state, project="/srv/api/web")
    lines, _ = frame_text(state, snap, settings, 80, 24, now)
    assert lines[2] == " * connected 127.0.0.1:4317 | project api/web | last 7 days | newest first"
    styled = ccmon.render(state, ccmon.ServerStatus(True, attempts=1), snap,
                          ccmon.Screen(settings, 80, 24, now, ccmon.Glyphs.for_terminal(False))).lines
    assert [line[0][1] for line in styled[8:12]] == ["", "", "", "tab_active"]
    assert ccmon.query_for(state, settings, now).project == "/srv/api/web"
    empty = ccmon.handle_key(state, "p", settings, ccmon.Frame([], project_names=("",)))[0]
    assert (empty.project, empty.notice) == ("/srv/api/web", "no projects in this period to filter by")
    assert ccmon.handle_key(ccmon.ViewState(), "8", settings, frame)[0].tab == "projects"
    # The Sessions tab names each session's project where there is room, when any session has one.
    split = ccmon.Split(premium=ccmon.Usage(2, 1000, 200, 0, 0, 500_000_000))
    rows = tuple(ccmon.Session(f"s-{i}-0123456789", "ana@example.com", now - 3600_000 * (i + 1),
                               now - 3600_000 * i, split, ("claude-sonnet-4-5",), 3, 1, i, False, project, "events")
                 for i, project in enumerate(["/home/dev/src/web", "", "/srv/api/web"]))
    state, snap = insight_snapshot(settings, now, "sessions", data=rows, projects=PROJECTS)
    lines, _ = frame_text(state, snap, settings, 120, 24, now)
    assert lines[7].split()[:3] == ["Session", "Project", "Started"]
    assert [line.split()[1] for line in lines[8:11]] == ["/home/dev/src/web", "-", "/srv/api/web"]
    assert frame_text(state, snap, settings, 100, 24, now)[0][8].split()[1] == "src/web"
    no_projects = tuple(dataclasses.replace(row, project="") for row in rows)
    state, snap = insight_snapshot(settings, now, "sessions", data=no_projects)
    assert "Project" not in frame_text(state, snap, settings, 120, 24, now)[0][7]


# ---------------------------------------------------------------- import: ccmon import, Claude Code's transcripts, priced

SAMPLE_TRANSCRIPTS = FIXTURES / "claude-code-2.1.328" / "transcripts"


def transcript_line(session: str, when: str, request_id: str, message_id: str, model: str = "claude-sonnet-4-5",
                    usage: tuple = (1500, 250, 4000, 800), cwd: str = "/home/dev/proj", **extra) -> str:
    """An assistant line shaped as Claude Code writes it (compact JSON, usage as the API sent it)."""
    i, o, cr, cc, *one_hour = usage
    line = {"parentUuid": None, "isSidechain": False, "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": i, "cache_creation_input_tokens": cc, "cache_read_input_tokens": cr,
                  "output_tokens": o, "service_tier": "standard",
                  "cache_creation": {"ephemeral_1h_input_tokens": one_hour[0] if one_hour else 0,
                                     "ephemeral_5m_input_tokens": 0}}},
        "requestId": request_id, "type": "assistant", "uuid": f"u-{message_id}", "timestamp": when, "cwd": cwd,
        "sessionId": session, "version": "2.1.328", **extra}
    return json.dumps(line, separators=(",", ":"))


def user_line(session: str, when: str) -> str:
    return json.dumps({"type": "user", "message": {"role": "user", "content": "hello"}, "timestamp": when,
                       "sessionId": session, "cwd": "/home/dev/proj"}, separators=(",", ":"))


def ccmon_import(srv: ServerProcess, *args: str, env: dict | None = None, home: Path | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CCMON, "import", "--monitor-server", srv.target, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=srv.workdir,
                          env={**os.environ, "HOME": str(home or srv.workdir), **(env or {})})


def test_claude_codes_prices_are_bundled_exactly():
    """The notes' figures for the mock's usage (1,500 in / 250 out / 4,000 cache read / 800 cache write), as Claude
    Code computes them; provider spellings of a model name; 1-hour cache writes; long prompts; unknown models."""
    mock = (1500, 250, 4000, 800)
    for model, nanos in (("claude-sonnet-4-5", 12_450_000), ("claude-sonnet-4-5-20250929", 12_450_000),
                         ("claude-opus-4-5", 20_750_000), ("claude-opus-4-5-20251101", 20_750_000),
                         ("claude-opus-5-5", 15_800_000), ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", 12_450_000),
                         ("claude-sonnet-4-5@20250929", 12_450_000), ("claude-sonnet-4-20250514", 12_450_000),
                         ("claude-opus-4-1-20250805", 62_250_000)):
        assert ccmon.cost_nanos(ccmon.price_of(model), *mock) == nanos, model
    assert ccmon.cost_nanos(ccmon.price_of("claude-haiku-4-5-20251001"), 120, 30, 0, 0) == 270_000
    # 300 of the 800 cache-write tokens for an hour: at $6 instead of $3.75 a million
    assert ccmon.cost_nanos(ccmon.price_of("claude-sonnet-4-5"), *mock, 300) == 12_450_000 + 300 * 2250
    assert ccmon.cost_nanos(ccmon.price_of("claude-sonnet-4-5"), *mock, inference_geo="us") == 13_695_000
    haiku55 = ccmon.price_of("claude-haiku-5-5")  # prompts over 100,000 tokens cost five times as much
    assert ccmon.cost_nanos(haiku55, 100_000, 0, 0, 0) == 10_000_000
    assert ccmon.cost_nanos(haiku55, 100_001, 0, 0, 0) == 50_000_500
    assert ccmon.price_of("gpt-4o") is None and ccmon.price_of("<synthetic>") is None
    own = {"my-model": ccmon.Price(*(ccmon.decimal.Decimal(v) for v in ("1", "2", "0.1", "1.25", "2")))}
    assert ccmon.cost_nanos(ccmon.price_of("my-model-20260101", own), 1_000_000, 1_000_000, 0, 0) == 3 * 10 ** 9


def test_transcript_lines_are_read_as_claude_code_writes_them():
    sample = SAMPLE_TRANSCRIPTS
    [path] = sample.glob("*/*.jsonl")
    found = [ccmon.transcript_entry(line) for line in path.read_text().splitlines()]
    entries = [e for e in found if isinstance(e, ccmon.TranscriptEntry)]
    assert [e for e in found if isinstance(e, str)] == []
    assert [(e.request_id, e.message_id, e.model, e.input, e.output, e.cache_read, e.cache_creation, e.cache_1h,
             e.project, e.cost_usd) for e in entries] == [
        (r, m, "claude-sonnet-4-5", 1500, 250, 4000, 800, 0, "/home/dev/proj-alpha", None) for r, m in (
            ("req_011CVc24a37712b284815b5cf", "msg_96079c6a38004c4d90f9ed2d"),
            ("req_011CV9ec60954321e474e938a", "msg_ce12446355fc45f794d82929"),
            ("req_011CVd016700b686246efb449", "msg_e148106fb4cc4856b39ba7cb"))]
    assert entries[0].session_id == "c05b702a-6e79-483f-8620-85c0f585c90e"
    assert entries[0].ts_ms == ccmon.parse_iso_ms("2026-11-27T05:30:37.457Z")
    line = transcript_line("s", "2026-05-01T10:00:00Z", "req_1", "msg_1")
    assert ccmon.transcript_entry(line[:-20]) == "not JSON"
    assert ccmon.transcript_entry('{"type":"user"') == "not JSON"
    assert ccmon.transcript_entry("garbage") == "not JSON"
    assert ccmon.transcript_entry(user_line("s", "2026-05-01T10:00:00Z")) is None
    assert ccmon.transcript_entry(transcript_line("s", "2026-05-01T10:00:00Z", "", "m", model="<synthetic>")) == \
        "synthetic"
    no_usage = json.loads(line)
    del no_usage["message"]["usage"]
    assert ccmon.transcript_entry(json.dumps(no_usage)) == "no usage"
    assert ccmon.transcript_entry(transcript_line("s", "2026-05-01T10:00:00Z", "r", "m", costUSD=0.5)).cost_usd == \
        "0.5"


def write_transcript(folder: Path, session: str, lines: list[str], newline_at_end: bool = True) -> Path:
    path = folder / "-home-dev-proj" / f"{session}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""))
    return path


def test_import_tells_answers_apart_whose_ids_run_together_the_same(server, tmp_path):
    """An import remembers each answer's message.id and requestId as one string (see answer_key): two answers
    whose ids, run together, read the same are still two."""
    folder = tmp_path / "projects"
    write_transcript(folder, "s-ids", [
        transcript_line("s-ids", "2026-05-01T10:00:00Z", "2req_x", "msg_1"),
        transcript_line("s-ids", "2026-05-01T10:01:00Z", "req_x", "msg_12"),
        transcript_line("s-ids", "2026-05-01T10:01:00.100Z", "req_x", "msg_12")])  # its second block
    dry = ccmon_import(server, str(folder), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == "ccmon import (dry run): 1 file read; 2 requests to import; 0 already known; 0 skipped; " \
                         "1 streaming duplicates counted once; 2 priced by ccmon (estimated)\n"


def test_import_skips_answers_dated_in_the_future(server, tmp_path):
    """A transcript line dated more than a day ahead is damage: stored, it was the newest request for years (the
    quick query's current session). Hours ahead may be a clock's error, or one stepped back: imported."""
    folder = tmp_path / "projects"
    soon = ccmon.iso_from_ms(ccmon.now_ms() + 20 * 3600_000)
    path = write_transcript(folder, "s-f", [transcript_line("s-f", "2026-05-01T10:00:00Z", "req_f1", "msg_f1"),
                                            transcript_line("s-f", "9999-12-31T23:59:59Z", "req_f2", "msg_f2"),
                                            transcript_line("s-f", soon, "req_f3", "msg_f3")])
    imported = ccmon_import(server, str(folder))
    assert (imported.returncode, imported.stdout) == (0, "ccmon import: 1 file read; 2 requests imported; 0 already "
                                                         "known; 1 skipped (1 dated in the future); 2 priced by ccmon "
                                                         "(estimated)\n")
    assert f"ccmon import: dated in the future: {path}:2" in imported.stderr
    assert db_rows(server.db, "SELECT request_id FROM r ORDER BY ts") == [("req_f1",), ("req_f3",)]


def test_import_counts_every_request_once_and_says_what_it_skipped(server, tmp_path):
    """Streaming duplicates, a synthetic entry, an entry without usage, a line that is not JSON, a truncated last
    line, an unknown model (cost 0, named), a transcript with costUSD (its own cost, not estimated), --since,
    --dry-run, and a second import that finds everything known."""
    folder = tmp_path / "projects"
    answer = transcript_line("s-a", "2026-05-01T10:00:00.000Z", "req_a1", "msg_a1")
    tool_use = transcript_line("s-a", "2026-05-01T10:00:00.100Z", "req_a1", "msg_a1")  # same answer, 2nd block
    write_transcript(folder, "s-a", [
        user_line("s-a", "2026-05-01T09:59:59Z"), answer, tool_use,
        transcript_line("s-a", "2026-05-01T10:01:00Z", "req_a2", "msg_a2", model="claude-haiku-4-5",
                        usage=(120, 30, 0, 0)),
        transcript_line("s-a", "2026-05-01T10:02:00Z", "", "msg_syn", model="<synthetic>", usage=(0, 0, 0, 0)),
        "this is not JSON",
        transcript_line("s-a", "2026-05-01T10:03:00Z", "req_a3", "msg_a3", model="gpt-unknown", usage=(10, 10, 0, 0)),
        transcript_line("s-a", "2026-05-01T10:04:00Z", "req_a4", "msg_a4", usage=(1500, 250, 4000, 800, 800)),
        transcript_line("s-a", "2026-05-01T10:05:00Z", "req_a5", "msg_a5")[:80]], newline_at_end=False)
    write_transcript(folder, "s-old", [
        transcript_line("s-old", "2025-01-10T08:00:00Z", "req_o1", "msg_o1", model="claude-sonnet-4-20250514",
                        costUSD=0.0125, cwd="/home/dev/old"),
        transcript_line("s-old", "2026-04-30T08:00:00Z", "req_o2", "msg_o2", model="claude-opus-4-5", costUSD=0.02)])
    dry = ccmon_import(server, str(folder), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert db_rows(server.db, "SELECT COUNT(*) FROM requests") == [(0,)]
    assert dry.stdout.startswith("ccmon import (dry run): 2 files read; 6 requests to import; 0 already known; ")
    first = ccmon_import(server, str(folder))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "ccmon import: 2 files read; 6 requests imported; 0 already known; 3 skipped (1 not JSON, 1 synthetic, "
        "1 truncated last line); 1 streaming duplicates counted once; 3 priced by ccmon (estimated); unknown models "
        "counted at $0: gpt-unknown (1)"]
    assert f"ccmon import: truncated last line: {folder / '-home-dev-proj' / 's-a.jsonl'}" in first.stderr
    rows = db_rows(server.db, "SELECT session_id, request_id, model_name, input_tokens, output_tokens, "
                              "cache_read_tokens, cache_creation_tokens, cost_nanos, origin, user_name FROM r "
                              "ORDER BY ts")
    assert rows == [
        ("s-old", "req_o1", "claude-sonnet-4-20250514", 1500, 250, 4000, 800, 12_500_000, 3, ""),
        ("s-old", "req_o2", "claude-opus-4-5", 1500, 250, 4000, 800, 20_000_000, 3, ""),
        ("s-a", "req_a1", "claude-sonnet-4-5", 1500, 250, 4000, 800, 12_450_000, 2, ""),
        ("s-a", "req_a2", "claude-haiku-4-5", 120, 30, 0, 0, 270_000, 2, ""),
        ("s-a", "req_a3", "gpt-unknown", 10, 10, 0, 0, 0, 2, ""),
        ("s-a", "req_a4", "claude-sonnet-4-5", 1500, 250, 4000, 800, 12_450_000 + 800 * 2250, 2, "")]
    assert db_rows(server.db, "SELECT session_id, project FROM sessions ORDER BY session_id") == \
        [("s-a", "/home/dev/proj"), ("s-old", "/home/dev/old")]
    s = stats(server)
    assert (s.total_requests, s.total_cost.amount) == (6, 0.05947)
    sessions = {x.session_id: x for x in server.query().GetSessions(ccmon_pb2.GetSessionsRequest(
        start_time=ts("2020-01-01T00:00:00Z"))).sessions}
    assert (sessions["s-a"].source, sessions["s-old"].source) == ("transcript*", "transcript")
    page = server.query().GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(start_time=ts("2020-01-01T00:00:00Z")))
    assert page.total_count == 6 and len(page.requests) == 6
    again = ccmon_import(server, str(folder))
    assert again.stdout.startswith("ccmon import: 2 files read; 0 requests imported; 6 already known; "), again.stdout
    assert db_rows(server.db, "SELECT COUNT(*) FROM requests") == [(6,)]
    # the rest of the truncated line arrives: only that request is new
    with open(folder / "-home-dev-proj" / "s-a.jsonl", "a") as out:
        out.write(transcript_line("s-a", "2026-05-01T10:05:00Z", "req_a5", "msg_a5")[80:] + "\n")
    since = ccmon_import(server, str(folder), "--since", "2026-05-01")
    assert since.stdout.startswith("ccmon import: 2 files read; 1 request imported; 4 already known; 2 skipped "
                                   "(1 not JSON, 1 synthetic); 1 streaming duplicates counted once; 2 before "
                                   "--since;"), since.stdout
    report = subprocess.run([*CCMON, "report", "session", "--monitor-server", server.target, "--since",
                             "2025-01-01", "--json"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert {r["session_id"]: r["source"] for r in json.loads(report.stdout)["rows"]} == \
        {"s-a": "transcript*", "s-old": "transcript"}


def test_a_request_seen_by_telemetry_and_in_a_transcript_is_counted_once(server, tmp_path):
    """Telemetry first: the transcript's copy is already known. Import first: the api_request event that arrives
    later replaces the estimate with Claude Code's own cost. The session keeps the user telemetry names."""
    sdk_export(server.port, [("api_request", api_request(1, "2026-05-02T10:00:00.050Z", session="s-both",
                                                         request_id="req_b1", cost_usd=0.0125,
                                                         input_tokens=1500, output_tokens=250,
                                                         cache_read_tokens=4000, cache_creation_tokens=800))])
    folder = tmp_path / "projects"
    write_transcript(folder, "s-both", [
        transcript_line("s-both", "2026-05-02T10:00:00Z", "req_b1", "msg_b1"),
        transcript_line("s-both", "2026-05-02T10:01:00Z", "req_b2", "msg_b2")])
    result = ccmon_import(server, str(folder), "--user", "importer@example.com")
    assert result.stdout.startswith("ccmon import: 1 file read; 1 request imported; 1 already known;"), result
    rows = db_rows(server.db, "SELECT request_id, origin, cost_nanos, user_name FROM r ORDER BY ts")
    assert rows == [("req_b1", 0, 12_500_000, "u" * 64), ("req_b2", 2, 12_450_000, "u" * 64)]
    sessions = server.query().GetSessions(ccmon_pb2.GetSessionsRequest(start_time=ts("2026-05-01T00:00:00Z"))).sessions
    assert [(x.session_id, x.source) for x in sessions] == [("s-both", "events+tx")]  # half from telemetry
    sdk_export(server.port, [("api_request", api_request(2, "2026-05-02T10:01:00.030Z", session="s-both",
                                                         request_id="req_b2", cost_usd=0.013))])
    rows = wait_until(lambda: [r for r in db_rows(server.db, "SELECT request_id, origin, cost_nanos FROM r "
                                                             "ORDER BY ts") if r[1] == 0 and r[0] == "req_b2"],
                      "the api_request event replacing the imported request", 30)
    assert db_rows(server.db, "SELECT request_id, origin, cost_nanos FROM r ORDER BY ts") == \
        [("req_b1", 0, 12_500_000), ("req_b2", 0, 13_000_000)]
    s = stats(server, "2026-05-02T00:00:00Z", "2026-05-03T00:00:00Z")
    assert (s.total_requests, s.total_cost.amount) == (2, 0.0255)
    # a session the server never saw gets the importer's user (default: user.email of OTEL_RESOURCE_ATTRIBUTES)
    write_transcript(folder, "s-new", [transcript_line("s-new", "2026-05-02T11:00:00Z", "req_n1", "msg_n1")])
    ccmon_import(server, str(folder), env={"OTEL_RESOURCE_ATTRIBUTES": "team=x,user.email=ana%40example.com"})
    assert db_rows(server.db, "SELECT user_name FROM r WHERE session_id = 's-new'") == [("ana@example.com",)]


def test_a_transcripts_copy_in_another_session_is_known(server, tmp_path):
    """A request_id is found within its session (telemetry and transcripts share the session id), among imported
    rows in any session, and near its time in any session: a copy of an answer in a forked session's transcript
    is known, whether an import or telemetry stored the answer."""
    original, fork = tmp_path / "original", tmp_path / "fork"
    write_transcript(original, "s-orig", [transcript_line("s-orig", "2026-05-01T10:00:00Z", "req_f1", "msg_f1")])
    write_transcript(fork, "s-fork", [transcript_line("s-fork", "2026-05-01T10:00:00Z", "req_f1", "msg_f1"),
                                      transcript_line("s-fork", "2026-05-01T11:00:00Z", "req_f2", "msg_f2")])
    sdk_export(server.port, [("api_request", api_request(1, "2026-05-01T12:00:00Z", session="s-tele",
                                                         request_id="req_t1", cost_usd=0.5)),
                             ("api_request", api_request(2, "2026-05-01T12:00:30Z", session="s-tele",
                                                         request_id="req_t2", cost_usd=0.25))])
    write_transcript(tmp_path / "tele", "s-tele", [
        transcript_line("s-tele", "2026-05-01T12:00:01Z", "req_t1", "msg_t1")])
    write_transcript(tmp_path / "tele-late", "s-tele", [  # in its session, however far from telemetry's time
        transcript_line("s-tele", "2026-05-01T13:30:00Z", "req_t2", "msg_t2")])
    write_transcript(tmp_path / "tele-fork", "s-tele-fork", [  # a copy of an answer only telemetry stored
        transcript_line("s-tele-fork", "2026-05-01T12:00:01Z", "req_t1", "msg_t1")])
    assert ccmon_import(server, str(original)).stdout.startswith("ccmon import: 1 file read; 1 request imported; "
                                                                  "0 already known")
    assert ccmon_import(server, str(fork)).stdout.startswith("ccmon import: 1 file read; 1 request imported; "
                                                              "1 already known")
    for folder in ("tele", "tele-fork", "tele-late"):
        assert ccmon_import(server, str(tmp_path / folder)).stdout.startswith(
            "ccmon import: 1 file read; 0 requests imported; 1 already known")
        assert ccmon_import(server, str(tmp_path / folder), "--dry-run").stdout.startswith(
            "ccmon import (dry run): 1 file read; 0 requests to import; 1 already known")
    assert db_rows(server.db, "SELECT session_id, request_id, origin FROM r ORDER BY ts") == [
        ("s-orig", "req_f1", 2), ("s-fork", "req_f2", 2), ("s-tele", "req_t1", 0), ("s-tele", "req_t2", 0)]


def test_import_follow_picks_up_appended_lines_and_stops_cleanly(server, tmp_path):
    home = tmp_path / "home"
    folder = home / ".claude" / "projects"
    path = write_transcript(folder, "s-live", [transcript_line("s-live", "2026-05-03T10:00:00Z", "req_l1", "msg_l1")])
    (path.parent / "not-a-file.jsonl").mkdir()  # unreadable: named once, though --follow looks every second
    proc = subprocess.Popen([*CCMON, "import", "--follow", "--monitor-server", server.target], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HOME": str(home)})
    try:
        wait_until(lambda: db_rows(server.db, "SELECT COUNT(*) FROM requests") == [(1,)], "the first import", 30)
        half = transcript_line("s-live", "2026-05-03T10:01:00Z", "req_l2", "msg_l2")
        with open(path, "a") as out:  # Claude Code writing a line: first half, then the rest
            out.write(half[:100])
            out.flush()
            time.sleep(1.5)  # the half line stays there past one of --follow's looks (each second): not a wait
            out.write(half[100:] + "\n" + user_line("s-live", "2026-05-03T10:01:01Z") + "\n")
        write_transcript(folder, "s-new", [transcript_line("s-new", "2026-05-03T10:02:00Z", "req_l3", "msg_l3")])
        wait_until(lambda: db_rows(server.db, "SELECT COUNT(*) FROM requests") == [(3,)], "the appended lines", 30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out == "ccmon import: 2 files read; 3 requests imported; 0 already known; 1 skipped (1 unreadable file); " \
                  "3 priced by ccmon (estimated)\n"
    assert err == f"ccmon import: unreadable: {path.parent / 'not-a-file.jsonl'} (not a regular file: a folder)\n"
    assert db_rows(server.db, "SELECT request_id FROM r ORDER BY ts") == [("req_l1",), ("req_l2",), ("req_l3",)]


# The other agents' local histories of the same runs as their gRPC captures (fixtures/<tool>/history/, under the
# paths they have in the home folder): tool -> (agent, files, model calls in them, a model message written twice).
# Gemini's chats leave out its router's calls; Codex's gRPC capture has a conversation without its rollout.
AGENT_HISTORIES = {"gemini-cli-0.61.0": ("gemini-cli", 3, 4, 1), "codex-0.169.0": ("codex", 4, 5, 0),
                   "qwen-code-0.24.4": ("qwen-code", 5, 10, 0)}


def agent_home(home: Path, *tools: str) -> Path:
    """A home folder holding these tools' histories."""
    home.mkdir(exist_ok=True)
    for tool in tools:
        shutil.copytree(FIXTURES / tool / "history", home, dirs_exist_ok=True)
    return home


def test_another_agents_models_imported_from_its_history_are_its_own(server, tmp_path):
    """Models first seen in Codex's rollouts (no telemetry) are Codex's: not Claude's premium, not claude-code's."""
    ccmon_import(server, home=agent_home(tmp_path / "home", "codex-0.169.0"))
    models = server.query().GetModelStats(ccmon_pb2.GetModelStatsRequest(
        agent=ccmon.ALL_AGENTS, start_time=ts("2026-01-01T00:00:00Z")))
    assert {(m.agent, m.premium) for m in models.models} == {("codex", False)}
    assert stats(server).premium_requests == 0


@pytest.mark.parametrize("tool", list(AGENT_HISTORIES))
def test_another_agents_history_is_imported_exactly_once_priced_as_its_telemetry(server, tool, tmp_path):
    """`ccmon import` reads Gemini CLI's chats, Codex's rollouts and Qwen Code's chats in their default folders:
    each model call once (Gemini's message written again with its tool calls too), in ccmon's kinds as the agent's
    telemetry maps them (the stand-in's fixed usage, to the token), priced by ccmon as the telemetry is
    (estimated); importing again adds nothing."""
    agent, files, calls, duplicates = AGENT_HISTORIES[tool]
    home = agent_home(tmp_path / "home", tool)
    first = ccmon_import(server, home=home)
    assert first.returncode == 0 and first.stderr == "", first
    assert first.stdout.startswith(f"ccmon import: {files} files read; {calls} requests imported; 0 already known; "
                                   "0 skipped"), first.stdout
    assert first.stdout.rstrip().endswith(f"by agent: {agent} ({files} files, {calls} imported, 0 known)")
    assert ("streaming duplicates" in first.stdout) == bool(duplicates)
    assert agent_totals(server) == (calls, tuple(calls * n for n in STANDIN_CALL[agent]), calls * STANDIN_TOTAL[agent])
    rows = db_rows(server.db, "SELECT a.name, r.model_name, r.cost_nanos, r.origin FROM r JOIN agents a "
                              "ON a.id = r.agent")
    assert {(name, cost, origin) for name, model, cost, origin in rows} == \
        {(agent, ccmon.estimated_cost(model, *STANDIN_CALL[agent]), ccmon.ORIGIN_TRANSCRIPT)
         for _, model, _, _ in rows}
    assert any(cost > 0 for _, _, cost, _ in rows)  # a priced model among them
    again = ccmon_import(server, home=home)
    assert again.stdout.startswith(f"ccmon import: {files} files read; 0 requests imported; {calls} already known"), \
        again.stdout
    assert agent_totals(server)[0] == calls


@pytest.mark.parametrize("tool", list(AGENT_HISTORIES))
def test_another_agents_history_adds_nothing_to_its_telemetry_of_the_same_runs(server, tool, tmp_path):
    """Joined with the telemetry of the same runs: Qwen's calls by their response_id, Gemini's and Codex's by
    session (their histories name no id their telemetry does; the telemetry has Gemini's router calls the chats
    lack). History imported after the telemetry adds nothing; telemetry arriving after the history replaces it."""
    agent, files, calls, _ = AGENT_HISTORIES[tool]
    _, telemetry_calls, _ = AGENT_CAPTURES[tool, "grpc"]
    expected = (telemetry_calls, tuple(telemetry_calls * n for n in STANDIN_CALL[agent]),
                telemetry_calls * STANDIN_TOTAL[agent])
    replay(server, agent_capture(tool, "grpc"))
    home = agent_home(tmp_path / "home", tool)
    after = ccmon_import(server, home=home)
    assert after.stdout.startswith(f"ccmon import: {files} files read; 0 requests imported; {calls} already known"), \
        after.stdout
    assert agent_totals(server) == expected
    assert db_rows(server.db, "SELECT COUNT(*) FROM r WHERE origin IN (2, 3)") == [(0,)]


@pytest.mark.parametrize("tool", list(AGENT_HISTORIES))
def test_telemetry_replaces_another_agents_history_imported_first(server, tool, tmp_path):
    agent, files, calls, _ = AGENT_HISTORIES[tool]
    _, telemetry_calls, _ = AGENT_CAPTURES[tool, "grpc"]
    before = ccmon_import(server, home=agent_home(tmp_path / "home", tool))
    assert f"{calls} requests imported" in before.stdout, before.stdout
    replay(server, agent_capture(tool, "grpc"))
    assert agent_totals(server) == (telemetry_calls, tuple(telemetry_calls * n for n in STANDIN_CALL[agent]),
                                    telemetry_calls * STANDIN_TOTAL[agent])
    assert db_rows(server.db, "SELECT COUNT(*) FROM r WHERE origin IN (2, 3)") == [(0,)]


@pytest.mark.parametrize("tool", list(AGENT_HISTORIES))
def test_another_agents_history_replaces_what_its_metrics_counted(server, tool, tmp_path):
    """A metrics-only user's history: its calls replace what the agent's token metrics counted, as events do
    (Gemini's in their sessions, Codex's and Qwen's session-less ones within an hour of a call)."""
    agent, files, calls, _ = AGENT_HISTORIES[tool]
    replay(server, agent_capture(tool, "grpc"), ("metrics",))
    assert agent_totals(server)[0] == 0 and agent_totals(server)[2] > 0
    imported = ccmon_import(server, home=agent_home(tmp_path / "home", tool))
    assert f"; {calls} requests imported; " in imported.stdout, imported.stdout
    assert agent_totals(server) == (calls, tuple(calls * n for n in STANDIN_CALL[agent]), calls * STANDIN_TOTAL[agent])
    replay(server, agent_capture(tool, "grpc"), ("metrics",))  # sent again: still the history's
    assert agent_totals(server)[0:2] == (calls, tuple(calls * n for n in STANDIN_CALL[agent]))


def assert_rollups_are_their_rows(db: Path) -> None:
    """Every rollup of `db` as rebuild_rollups computes it from the raw rows (the writer sums them per transaction)."""
    # session_usage's first and last times are the bounds of every row the session had (a replaced row's too)
    tables = ("usage_rollup", "usage_daily", "total_hourly", "total_daily",
              f"(SELECT session, model, user, {', '.join(ccmon.FIGURES)} FROM session_usage)")
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as kept, \
            contextlib.closing(sqlite3.connect(":memory:")) as rebuilt:
        assert {"session_usage_insert", "total_hourly_insert"}.isdisjoint(
            name for name, in kept.execute("SELECT name FROM sqlite_master"))  # not kept by triggers
        kept.backup(rebuilt)
        ccmon.rebuild_rollups(rebuilt)
        for table in tables:
            rows = f"SELECT * FROM {table} ORDER BY 1, 2, 3"
            assert kept.execute(rows).fetchall() == rebuilt.execute(rows).fetchall(), table
        assert kept.execute("SELECT COUNT(*) FROM usage_rollup").fetchone()[0] > 0


def test_the_rollups_stay_the_sum_of_the_rows_through_every_replacement(server, tmp_path):
    """Each agent's metrics replaced by its history, the history by its telemetry, Codex's estimates by its turn
    costs (rows added and removed in one transaction), all sent twice: every rollup is still its rows' sum."""
    for tool in AGENT_HISTORIES:
        replay(server, agent_capture(tool, "grpc"), ("metrics",))
        ccmon_import(server, home=agent_home(tmp_path / tool, tool))
        replay(server, agent_capture(tool, "grpc"))
        replay(server, agent_capture(tool, "grpc"))
    claude = [("api_request", api_request(day, f"2026-11-{day:02}T23:59:59Z", cost_usd=0.01, input_tokens=day))
              for day in range(1, 29)]  # Claude Code's alone: no other agent's model settles them before the commit
    for _ in range(2):
        server.logs_stub().Export(logs_request(claude))
    assert db_rows(server.db, "SELECT DISTINCT origin FROM requests ORDER BY 1") == [(0,), (4,)]  # events, turns
    assert db_rows(server.db, "SELECT COUNT(*), SUM(cost_nanos) FROM usage_daily WHERE model = "
                   "(SELECT id FROM models WHERE name = 'claude-sonnet-4-5')") == [(28, 28 * 10_000_000)]
    assert_rollups_are_their_rows(server.db)


def test_every_agents_history_is_read_together_and_bad_lines_are_named(server, tmp_path):
    """One import of every agent's default folder names what it read of each; a line that is no JSON, a call whose
    figures cannot be read, a limit reading the server would refuse and a line cut short at the end of a file are
    skipped and named (file:line)."""
    home = agent_home(tmp_path / "home", *AGENT_HISTORIES)
    chats = home / ".qwen" / "projects" / "-home-dev-work-qwen" / "chats"
    damaged = chats / "d8f47574-eaa5-4e1e-aada-948cf23da699.jsonl"
    lines = damaged.read_text().splitlines()
    bad_call = next(number for number, line in enumerate(lines) if '"input_token_count":3456' in line)
    broken = [*lines[:bad_call], lines[bad_call].replace('"input_token_count":3456', '"input_token_count":-5'),
              *lines[bad_call + 1:]]
    damaged.write_text("\n".join(["{not json", *broken]) + "\n")
    rollout = next((home / ".codex" / "sessions").rglob("rollout-*29ba*.jsonl"))
    over = next(line for line in rollout.read_text().splitlines() if '"rate_limits"' in line) \
        .replace('"used_percent":12.5', '"used_percent":125.0').replace("15:11:23.210Z", "15:11:23.999Z")
    rollout.write_text(rollout.read_text() + over + "\n" + '{"timestamp":"2026-12-04T15:11:24.000Z","type":"tok')
    result = ccmon_import(server, home=home)
    assert result.returncode == 0, result
    lines_written = len(rollout.read_text().splitlines())
    assert result.stderr.splitlines() == [
        f"ccmon import: limits out of range: {rollout}:{lines_written - 1}",
        f"ccmon import: truncated last line: {rollout}:{lines_written}",
        f"ccmon import: not JSON: {damaged}:1", f"ccmon import: figures out of range: {damaged}:{bad_call + 2}"], \
        result.stderr
    assert result.stdout.rstrip().endswith(
        "by agent: gemini-cli (3 files, 4 imported, 0 known), codex (4 files, 5 imported, 0 known), "
        "qwen-code (5 files, 9 imported, 0 known)"), result.stdout
    assert "4 skipped (1 figures out of range, 1 limits out of range, 1 not JSON, 1 truncated last line)" \
        in result.stdout
    assert "; 5 limit readings of Codex stored; " in result.stdout


# Codex's plan's limits in its newest rollout's token_count event (the TUI run's), as the stand-in's x-codex-*
# headers gave them: each run's resets are 5 hours and a week after it.
CODEX_PRIMARY = ccmon.LimitWindow(12.5, 1796400740_000)    # 5 hours
CODEX_SECONDARY = ccmon.LimitWindow(34.0, 1796483540_000)  # a week


def test_codexs_own_limits_are_read_from_its_rollouts_and_shown_apart_from_claudes(server, tmp_path):
    """Each token_count event of a rollout is a reading of Codex's limits (primary: 5 hours, secondary: weekly):
    stored once as Codex's, answered by GetLimits and listed by `report limits` as Codex's, never as Claude's."""
    home = agent_home(tmp_path / "home", "codex-0.169.0")
    first = ccmon_import(server, home=home)
    assert "; 5 limit readings of Codex stored; " in first.stdout, first.stdout
    again = ccmon_import(server, home=home)
    assert "limit reading" not in again.stdout, again.stdout
    assert db_rows(server.db, "SELECT a.name, COUNT(*), MIN(five_hour_percent), MAX(five_hour_resets), "
                              "MIN(seven_day_percent), MAX(seven_day_resets) FROM limit_readings lr JOIN agents a "
                              "ON a.id = lr.agent GROUP BY 1") == \
        [("codex", 5, 12.5, CODEX_PRIMARY.resets_ms, 34.0, CODEX_SECONDARY.resets_ms)]
    answer = server.query().GetLimits(ccmon_pb2.GetLimitsRequest(at=ts("2026-12-04T15:13:00Z")))
    assert not answer.HasField("latest") and not answer.HasField("five_hour_now") \
        and not answer.HasField("seven_day_now")  # Claude's figures know nothing of Codex's
    assert [(r.agent, r.session_id, ccmon.window_of(r, "five_hour"), ccmon.window_of(r, "seven_day"))
            for r in answer.agents] == [("codex", "01a2419c-f77d-7560-a635-0779905e56e1", CODEX_PRIMARY,
                                         CODEX_SECONDARY)]  # the newest
    report = json.loads(run_report(server, "limits", "--since", "2026-12-04", "--until", "2026-12-05", "--json",
                                   cwd=tmp_path).stdout)
    assert [(row["limits"], row["five_hour_percent"], row["seven_day_percent"]) for row in report["rows"]] == \
        [("Codex", 12.5, 34.0)] * 5
    with pytest.raises(grpc.RpcError) as failure:  # a client cannot pass Claude's readings off as an import
        server.query().ImportRequests(ccmon_pb2.ImportRequestsRequest(readings=[ccmon.reading_message(
            ccmon.LimitReading("s-1", ccmon.now_ms(), five_hour=ccmon.LimitWindow(50.0, ccmon.now_ms() + 60_000)))]))
    assert failure.value.details() == "an imported limit reading is not valid: claude-code: not another agent's " \
                                      "(gemini-cli, codex, qwen-code): Claude's come from its status line"


@pytest.mark.parametrize("request_, message", [
    (ccmon_pb2.ImportRequestsRequest(requests=[ccmon_pb2.ImportedRequest(
        session_id="s-1", timestamp_ms=1796400000000, model="m", agent="cursor")]),
     "an imported request is not valid: unknown agent 'cursor' (known: claude-code, gemini-cli, codex, qwen-code)"),
    (ccmon_pb2.ImportRequestsRequest(readings=[ccmon.reading_message(ccmon.LimitReading(
        "s-1", 1796400000000, five_hour=ccmon.LimitWindow(120.0, 1796400000000), agent=ccmon.CODEX))]),
     "an imported limit reading is not valid: codex: five_hour.used_percentage 120.0 is not 0-100"),
    (ccmon_pb2.ImportRequestsRequest(readings=[ccmon.reading_message(ccmon.LimitReading(
        "", 1796400000000, five_hour=ccmon.LimitWindow(12.0, 1796400000000), agent=ccmon.CODEX))]),
     "an imported limit reading is not valid: codex: a reading needs its session_id")])
def test_an_imported_request_or_limit_reading_the_server_cannot_store_is_refused(server, request_, message):
    with pytest.raises(grpc.RpcError) as failure:
        server.query().ImportRequests(request_)
    assert (failure.value.code(), failure.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert db_rows(server.db, "SELECT (SELECT COUNT(*) FROM requests), (SELECT COUNT(*) FROM limit_readings)") == \
        [(0, 0)]


def test_the_users_tab_shows_each_users_codex_limits_beside_claudes(server, tmp_path):
    """GetUsers names each user's live windows of Codex's plan (from the rollouts' readings), and the Users tab
    shows them in columns of their own, beside Claude's; once a window has reset it is a dash, and with none live
    the columns are gone."""
    ccmon_import(server, home=agent_home(tmp_path / "home", "codex-0.169.0"))
    client = ccmon.Client(server.target)
    try:
        at = ccmon.parse_iso_ms("2026-12-04T15:13:00Z")
        users = client.users(at - ccmon.DAY_MS, at)
    finally:
        client.close()
    assert [(u.user, u.agents) for u in users] == [("", (ccmon.LimitReading(
        "01a2419c-f77d-7560-a635-0779905e56e1", db_rows(server.db, "SELECT MAX(ts) FROM limit_readings")[0][0],
        five_hour=CODEX_PRIMARY, seven_day=CODEX_SECONDARY, user="", agent=ccmon.CODEX),))]
    ana = ccmon.UserUsage("ana@example.com", ccmon.Split(ccmon.Usage(1, 10)), 1,
                          five_hour=ccmon.LimitWindow(30.0, at + 3600_000))
    settings = _settings()
    frames = []
    for now in (at, CODEX_PRIMARY.resets_ms, CODEX_SECONDARY.resets_ms):
        state, snap = insight_snapshot(settings, now, "users", users=(ana, *users))
        lines, _ = frame_text(state, snap, settings, 120, 24, now)
        table = lines.index(next(line for line in lines if line.startswith("-- Users by cost")))
        frames.append([line.split("Share of cost")[-1].split("%", 1)[-1].split() for line in lines[table + 1:table + 4]])
    assert frames == [
        [["5h", "Week", "Codex", "5h", "Codex", "week"], ["30%", "-", "-", "-"], ["-", "-", "13%", "34%"]],
        [["5h", "Week", "Codex", "week"], ["30%", "-", "-"], ["-", "-", "34%"]],  # Codex's 5 hours have reset
        [[], [], []]]  # and its week too: no column of Codex's (nor of Claude's, whose window ana read reset too)


def test_the_monitor_shows_codexs_live_limits_below_claudes(tmp_path):
    snap, settings, now = _frame_fixture()
    reading = ccmon.LimitReading("c-1", now - 120_000, five_hour=ccmon.LimitWindow(12.5, now + 3600_000),
                                 seven_day=ccmon.LimitWindow(34.0, now + 3 * 86400_000), agent=ccmon.CODEX)
    limits = dataclasses.replace(snap.limits, claude=ccmon.ClaudeLimits(agents=(reading,)))
    lines, _ = frame_text(ccmon.ViewState(period="b"), dataclasses.replace(snap, limits=limits), settings, 120, 30,
                          now)
    codex = [line for line in lines if line.startswith("Codex 5h")]
    assert len(codex) == 1 and codex[0].endswith("  13%, resets 11:30; week 34%, resets Fri 10:30 (read 2 min "
                                                 "ago)"), lines
    assert not any(line.startswith("Claude") for line in lines)  # Claude's own gauges are not fed by it
    reset = dataclasses.replace(reading, five_hour=ccmon.LimitWindow(12.5, now - 1), seven_day=None)
    limits = dataclasses.replace(snap.limits, claude=ccmon.ClaudeLimits(agents=(reset,)))
    lines, _ = frame_text(ccmon.ViewState(period="b"), dataclasses.replace(snap, limits=limits), settings, 100, 30,
                          now)
    assert not any(line.startswith("Codex") for line in lines)  # a window that has reset is not shown


def test_import_into_a_server_with_a_token(tmp_path):
    srv = ServerProcess(tmp_path, "--server-token", "t0ken").start()
    try:
        folder = tmp_path / "projects"
        write_transcript(folder, "s-t", [transcript_line("s-t", "2026-05-04T10:00:00Z", "req_t1", "msg_t1")])
        refused = ccmon_import(srv, str(folder))
        assert refused.returncode == 1 and "token" in refused.stderr.lower(), refused.stderr
        assert db_rows(srv.db, "SELECT COUNT(*) FROM requests") == [(0,)]
        accepted = ccmon_import(srv, str(folder), env={"CCMON_TOKEN": "t0ken"})
        assert accepted.returncode == 0 and "1 request imported" in accepted.stdout, accepted
        missing = ccmon_import(srv, str(tmp_path / "nowhere"))
        assert missing.returncode == 1 and "no Claude Code transcripts in" in missing.stderr
    finally:
        srv.stop()


@e2e
def test_claude_codes_own_transcripts_are_imported_exactly_and_once(server, claude_code, mock_anthropic, tmp_path):
    """A real Claude Code, offline: two runs without telemetry (one with a tool call: two API calls), one with
    Haiku, one with telemetry on. `ccmon import` of its HOME's transcripts stores each API call once, costed as
    Claude Code costed it; the telemetry run's calls are already known; importing again adds nothing."""
    api = mock_anthropic()
    home, project = tmp_path / "home", tmp_path / "project"
    runs = [("RUN_TOOL: print a word", "claude-sonnet-4-5", None, 2), ("say hello", "claude-sonnet-4-5", None, 1),
            ("say hello with haiku", "claude-haiku-4-5", None, 1),
            ("say hello with telemetry", "claude-sonnet-4-5", telemetry_env(server), 1)]
    results = []
    for prompt, model, env, calls in runs:
        result = run_claude_print(claude_code, api.port, project, prompt, env, home=home, model=model)
        assert round(result["total_cost_usd"] * 1e9) == calls * MOCK_USAGE[model][4]
        results.append((result["session_id"], result["total_cost_usd"], model, calls))
    telemetry_session = results[-1][0]
    wait_until(lambda: db_rows(server.db, "SELECT COUNT(*) FROM r WHERE session_id = ?", (telemetry_session,))
               == [(1,)], "the telemetry run's api_request", 30)
    imported = ccmon_import(server, home=home)  # the default folder: ~/.claude/projects
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("ccmon import: 4 files read; 4 requests imported; 1 already known; "
                                      "0 skipped;"), imported.stdout
    for session, cost_usd, model, calls in results:
        rows = db_rows(server.db, "SELECT model_name, input_tokens, output_tokens, cache_read_tokens, "
                                  "cache_creation_tokens, cost_nanos, origin, request_id FROM r WHERE session_id = ? "
                                  "ORDER BY ts", (session,))
        i, o, cr, cc, nanos = MOCK_USAGE[model]
        origin = 0 if session == telemetry_session else 2
        assert [row[:7] for row in rows] == [(model, i, o, cr, cc, nanos, origin)] * calls, session
        assert sum(row[5] for row in rows) == round(cost_usd * 1e9), "Claude Code's own cost"
        assert sorted(row[7] for row in rows) == sorted(transcript_requests(claude_transcript(home, session)))
    for session, *_ in results:  # -p sends no folder; its transcript names it, for telemetry's sessions too
        assert db_rows(server.db, "SELECT project FROM sessions WHERE session_id = ?", (session,)) == \
            [(str(project.resolve()),)], session
    s = stats(server)
    assert (s.total_requests, round(s.total_cost.amount * 1e9)) == (5, 4 * 12_450_000 + 270_000)
    again = ccmon_import(server, home=home)
    assert again.stdout.startswith("ccmon import: 4 files read; 0 requests imported; 5 already known;"), again.stdout
    assert db_rows(server.db, "SELECT COUNT(*) FROM requests") == [(5,)]


@e2e
def test_bundled_prices_are_what_claude_code_charges(claude_code, mock_anthropic, tmp_path):
    """One model of each price in Claude Code's catalog, run for real against the stand-in API: ccmon's price of the
    transcript's usage equals Claude Code's own total_cost_usd, to the nano-dollar."""
    api = mock_anthropic()
    home, project = tmp_path / "home", tmp_path / "project"
    for model in ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-3-5-haiku", "claude-haiku-5-5", "claude-sonnet-5",
                  "claude-sonnet-5-5", "claude-opus-4-5", "claude-opus-5-5", "claude-fable-5", "claude-fable-5-1",
                  "claude-fable-5-2"):
        result = run_claude_print(claude_code, api.port, project, "say hello", home=home, model=model)
        [entry] = [e for e in map(ccmon.transcript_entry, map(json.dumps, claude_transcript(home, result["session_id"])))
                   if isinstance(e, ccmon.TranscriptEntry)]
        assert entry.model == model
        request, priced = ccmon.imported_request(entry, {})
        assert priced and request.estimated and request.cost_nanos == round(result["total_cost_usd"] * 1e9), model


def test_pricing_in_the_config_adds_and_overrides_models(server, tmp_path):
    (tmp_path / "config.toml").write_text('[pricing]\n"my-model" = {input = 2, output = 8}\n'
                                          '"claude-sonnet-4-5" = {input = 1, output = 1, cache_read = 1, '
                                          'cache_write_5m = 1, cache_write_1h = 1}\n')
    folder = tmp_path / "projects"
    write_transcript(folder, "s-p", [
        transcript_line("s-p", "2026-05-05T10:00:00Z", "req_p1", "msg_p1", model="my-model-20260101",
                        usage=(1_000_000, 1_000_000, 1_000_000, 1_000_000)),
        transcript_line("s-p", "2026-05-05T10:01:00Z", "req_p2", "msg_p2")])
    result = ccmon_import(server, "--config", str(tmp_path / "config.toml"), str(folder))
    assert result.returncode == 0 and "unknown" not in result.stdout, result
    # my-model: $2 input + $8 output + $0.20 cache read (0.1 x input) + $2.50 cache write (1.25 x input)
    assert db_rows(server.db, "SELECT request_id, cost_nanos FROM r ORDER BY ts") == \
        [("req_p1", 12_700_000_000), ("req_p2", 6_550_000)]


def test_import_progress_is_drawn_on_one_line():
    class Counting:
        def import_requests(self, rows, user, dry_run):
            return ccmon.ImportCounts(len(rows), 0)

    shown = io.StringIO()
    importer = ccmon.Importer(Counting(), ccmon.load_config(ccmon.build_import_parser().parse_args([])), "", None,
                              False, shown)
    importer.tally.of_agent(ccmon.CLAUDE_CODE)[0] = 3  # files read
    importer.add([(n, transcript_line("s", "2026-05-01T10:00:00Z", f"req_{n}", f"msg_{n}"), True) for n in range(7)],
                 "s.jsonl")
    importer.show_progress(10)
    importer.flush(wait=True)
    importer.show_progress(done=True)
    importer.sender.shutdown()
    assert re.fullmatch(r"\r\x1b\[Kccmon import: \[######\.{14}\] 3/10 files, 7 entries, [0-9,]+/s\r\x1b\[K",
                        shown.getvalue())
    assert importer.tally.imported == 7


def test_an_import_stores_a_small_first_batch_then_doubles_it(server):
    """The answers read first (the newest, see TranscriptFiles.paths) are stored once 1,000 are read, not 20,000:
    each call sends twice the one before, up to IMPORT_BATCH."""
    client, sizes = ccmon.Client(server.target), []
    send = client.import_requests
    client.import_requests = lambda rows, *args, **kwargs: sizes.append(len(rows)) or send(rows, *args, **kwargs)
    importer = importer_of(client)
    base = ccmon.parse_iso_ms("2026-05-01T10:00:00Z")
    importer.add([(n, transcript_line("s", ccmon.iso_from_ms(base + n * 1000), f"req_{n}", f"msg_{n}"), True)
                  for n in range(5000)], "s.jsonl")
    importer.flush(wait=True)
    importer.sender.shutdown()
    client.close()
    assert sizes == [ccmon.FIRST_IMPORT_BATCH, 2000, 2000] and importer.tally.imported == 5000
    assert stats(server).total_requests == 5000


def test_import_requests_rejects_what_is_not_a_request(server):
    good = dict(session_id="s-x", timestamp_ms=ccmon.parse_iso_ms("2026-05-06T10:00:00Z"), model="claude-haiku-4-5",
                input_tokens=120, output_tokens=30, cost_nanos=270_000, estimated=True, request_id="req_x1",
                message_id="msg_x1")
    for bad in ({"session_id": ""}, {"timestamp_ms": 0}, {"input_tokens": -1}, {"cost_nanos": -5}):
        with pytest.raises(grpc.RpcError) as error:
            server.query().ImportRequests(ccmon_pb2.ImportRequestsRequest(requests=[
                ccmon_pb2.ImportedRequest(**good), ccmon_pb2.ImportedRequest(**{**good, **bad})]))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert db_rows(server.db, "SELECT COUNT(*) FROM requests") == [(0,)]  # all or nothing
    answer = server.query().ImportRequests(ccmon_pb2.ImportRequestsRequest(
        requests=[ccmon_pb2.ImportedRequest(**good)] * 2, user="importer"))
    assert (answer.imported, answer.already_known) == (1, 1)
    assert db_rows(server.db, "SELECT user_name, origin, cost_nanos FROM r") == [("importer", 2, 270_000)]



def dense_import_rows(count: int, start: int = 0, sessions: int = 10) -> list[tuple]:
    """`count` answers in ten minutes, as the server's requests rows (REQUEST_COLUMNS)."""
    base = ccmon.parse_iso_ms("2026-05-07T10:00:00Z")
    return [ccmon.imported_row(ccmon_pb2.ImportedRequest(
        session_id=f"s-{n % sessions}", timestamp_ms=base + n * 600_000 // count, model="claude-haiku-4-5",
        input_tokens=120, output_tokens=30, cost_nanos=270_000, estimated=True, request_id=f"req_{n}",
        message_id=f"msg_{n}")) for n in range(start, start + count)]


def vm_steps(writer: ccmon.Writer, call: Callable[[], Any], answer: Any) -> int:
    """The thousands of SQLite virtual machine steps the writer's connection takes for `call` (work counted, not
    timed), which must answer `answer`."""
    steps = [0]

    def count_steps() -> int:
        steps[0] += 1
        return 0

    writer._write_conn.set_progress_handler(count_steps, 1000)
    try:
        assert call() == answer
    finally:
        writer._write_conn.set_progress_handler(None, 0)
    return steps[0]


def test_the_duplicate_check_of_an_import_grows_linearly(tmp_path):
    """Each imported row is looked up in one read of the stored rows near the batch's times, not by scanning them for
    each row: importing twice
    as many answers dated within ten minutes, over twice as many stored there, costs about twice the SQLite work
    (counted in virtual machine steps, not seconds); it was four times as much."""
    def steps_to_import(count: int) -> int:
        writer = ccmon.Writer(tmp_path / f"{count}.db")
        try:
            assert writer.import_requests(dense_import_rows(count), {}, "") == ccmon.ImportCounts(count, 0)
            return vm_steps(writer, lambda: writer.import_requests(dense_import_rows(count, count), {}, ""),
                            ccmon.ImportCounts(count, 0))
        finally:
            writer.close()

    small, large = steps_to_import(1000), steps_to_import(2000)
    assert large < 2.5 * small, (small, large)



def test_reimporting_one_long_session_grows_linearly(tmp_path):
    """A request_id is looked for among its session's rows near the chunk's times, not among all of them for each
    chunk: re-importing a session of twice as many answers (all known) costs about twice the SQLite work (it was
    3.6 times as much)."""
    def steps_to_reimport(count: int) -> int:
        writer = ccmon.Writer(tmp_path / f"{count}.db")
        try:
            base = ccmon.parse_iso_ms("2026-05-07T10:00:00Z")
            rows = [ccmon.imported_row(ccmon_pb2.ImportedRequest(
                session_id="s-long", timestamp_ms=base + n * 30_000, model="claude-sonnet-4-5", input_tokens=120,
                output_tokens=30, cost_nanos=270_000, estimated=True, request_id=f"req_{n}", message_id=f"msg_{n}"))
                for n in range(count)]
            assert writer.import_requests(rows, {}, "") == ccmon.ImportCounts(count, 0)
            return vm_steps(writer, lambda: writer.import_requests(rows, {}, ""), ccmon.ImportCounts(0, count))
        finally:
            writer.close()

    small, large = steps_to_reimport(10_000), steps_to_reimport(20_000)
    assert large < 2.5 * small, (small, large)


def test_telemetry_is_stored_while_a_large_import_is(server, tmp_path):
    """20,000 answers dated within ten minutes are imported while telemetry keeps arriving: every export is
    acknowledged (an import was one transaction of a minute, and exporters were told UNAVAILABLE), and the totals
    are exact. A telemetry answer in a forked session's transcript, exported before its copy is read, is known."""
    folder = tmp_path / "projects"
    base = ccmon.parse_iso_ms("2026-05-08T10:00:00Z")
    for first in range(0, 20_000, 2_000):
        write_transcript(folder, f"s-{first}", [
            transcript_line(f"s-{first}", ccmon.iso_from_ms(base + n * 30), f"req_{n}", f"msg_{n}")
            for n in range(first, first + 2_000)])
    write_transcript(folder, "s-fork", [transcript_line("s-fork", ccmon.iso_from_ms(base + 300_000), "req_t0", "m")])
    stub, answers, during = server.logs_stub(), [], []
    stub.Export(logs_request([("api_request", api_request(0, ccmon.iso_from_ms(base + 300_000), session="s-tele",
                                                          request_id="req_t0", cost_usd=0.01))]), timeout=30)
    answers.append("ok")
    importing = subprocess.Popen([*CCMON, "import", "--monitor-server", server.target, str(folder)], text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                                 env={**os.environ, "HOME": str(tmp_path)})
    while importing.poll() is None:  # one export at a time, as an exporter sends them
        n = len(answers)
        try:
            stub.Export(logs_request([("api_request", api_request(
                n, ccmon.iso_from_ms(base + 300_000 + n), session="s-tele", request_id=f"req_t{n}",
                cost_usd=0.01))]), timeout=30)
            answers.append("ok")
        except grpc.RpcError as exc:
            answers.append(exc.code().name)
        during.append(importing.poll() is None)
    out, err = importing.communicate(timeout=60)
    assert importing.returncode == 0, err
    assert set(answers) == {"ok"} and sum(during) >= 1, answers  # the first was sent before the import
    telemetry = len(answers)
    assert out == "ccmon import: 11 files read; 20,000 requests imported; 1 already known; 0 skipped; " \
                  "20,000 priced by ccmon (estimated)\n"
    assert db_rows(server.db, "SELECT origin, COUNT(*) FROM requests GROUP BY origin") == \
        [(0, telemetry), (2, 20_000)]
    s = stats(server, "2026-05-08T00:00:00Z", "2026-05-09T00:00:00Z")
    assert (s.total_requests, round(s.total_cost.amount * 1e9)) == \
        (20_000 + telemetry, 20_000 * 12_450_000 + telemetry * 10_000_000)



def remove_deep_folders(top: Path) -> None:
    """Remove a tree of folders deeper than Python's recursion limit, the deepest first."""
    stack = [top]
    while stack:
        inside = [entry for entry in os.scandir(stack[-1])]
        for entry in inside:
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
        folders = [entry.path for entry in inside if entry.is_dir(follow_symlinks=False)]
        if folders:
            stack.extend(folders)
        else:
            os.rmdir(stack.pop())


def test_import_skips_what_it_cannot_read_and_goes_on(server, tmp_path):
    """A line nested too deep to parse, an answer with more tokens than one call can have or priced over the
    server's bound for one record, a FIFO named like a transcript, 1,500 nested folders and a link back up: each
    is skipped and named (file:line), and every other answer is imported."""
    folder = tmp_path / "projects"
    good = [transcript_line("s-g", f"2026-05-09T10:0{n}:00Z", f"req_g{n}", f"msg_g{n}") for n in range(3)]
    deep = '{"type":"assistant","message":' + "[" * 100_000 + "]" * 100_000 + "}"
    costly = transcript_line("s-g", "2026-05-09T10:05:00Z", "req_c", "msg_c", model="claude-opus-4-5",
                             usage=(10 ** 12 - 1, 0, 0, 0))
    huge = transcript_line("s-g", "2026-05-09T10:06:00Z", "req_h", "msg_h", usage=(10 ** 12, 0, 0, 0))
    path = write_transcript(folder, "s-g", [good[0], deep, good[1], costly, huge])
    os.mkfifo(path.parent / "fifo.jsonl")
    nested = folder
    for _ in range(1500):  # one by one: pathlib's mkdir(parents=True) recurses too
        nested = nested / "d"
        nested.mkdir()
    (nested / "up").symlink_to(folder, target_is_directory=True)  # a loop
    (nested / "s-n.jsonl").write_text(good[2] + "\n")
    try:
        result = ccmon_import(server, str(folder), timeout=60)
    finally:
        remove_deep_folders(folder / "d")  # shutil.rmtree, and so pytest's cleanup, recurses
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ccmon import: 2 files read; 3 requests imported; 0 already known; 4 skipped (2 figures " \
                            "out of range, 1 not JSON, 1 unreadable file); 3 priced by ccmon (estimated)\n"
    assert result.stderr.splitlines() == [
        f"ccmon import: unreadable: {path.parent / 'fifo.jsonl'} (not a regular file: a FIFO)",
        f"ccmon import: not JSON: {path}:2", f"ccmon import: figures out of range: {path}:4",
        f"ccmon import: figures out of range: {path}:5"]
    assert db_rows(server.db, "SELECT request_id FROM r ORDER BY ts") == [("req_g0",), ("req_g1",), ("req_g2",)]



class CountingImports:
    """A stand-in server for the importer: imports every request it is sent, refusing those of `refused`."""

    def __init__(self, refused: set[str] = frozenset()):
        self.refused, self.calls = refused, 0

    def import_requests(self, rows, user, dry_run):
        self.calls += 1
        bad = [r.request_id for r in rows if r.request_id in self.refused]
        if bad:
            raise ccmon.ImportRefused(f"an imported request is not valid: {bad[0]} " + "is refused " * 20)
        return ccmon.ImportCounts(len(rows), 0)


def importer_of(client) -> ccmon.Importer:
    return ccmon.Importer(client, ccmon.load_config(ccmon.build_import_parser().parse_args([])), "", None, False)


def test_a_large_transcript_is_read_in_little_memory(tmp_path):
    """A 60 MB transcript (Claude Code's grow to gigabytes) is read a line at a time: the importer's peak memory
    grows by far less than the file (it read the file whole, and held it three times over)."""
    path = tmp_path / "s-big.jsonl"
    base = ccmon.parse_iso_ms("2026-05-10T10:00:00Z")
    tool_output = user_line("s-big", "2026-05-10T10:00:00Z").replace('"hello"', '"' + "x" * 100_000 + '"')
    with open(path, "w") as out:
        for n in range(600):
            answer = transcript_line("s-big", ccmon.iso_from_ms(base + n), f"r{n}", f"m{n}")
            out.write(tool_output + "\n" + answer + "\n")
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        import ccmon, test_ccmon
        def peak_kb():
            return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
        importer = test_ccmon.importer_of(test_ccmon.CountingImports())
        before = peak_kb()
        importer.add_file(ccmon.TranscriptFiles([Path(sys.argv[1])]), Path(sys.argv[1]), final=True)
        importer.flush(wait=True)
        importer.sender.shutdown()
        print(importer.tally.imported, peak_kb() - before)""")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    imported, grown_kb = map(int, result.stdout.split())
    assert imported == 600 and grown_kb < 15_000, (result.stdout, result.stderr)


def test_a_folder_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    """Named once, as a file is, however often --follow walks the folders (tests may run as root: the folder
    refuses to be listed through a stand-in for os.scandir)."""
    write_transcript(tmp_path, "s-ok", [transcript_line("s-ok", "2026-05-10T10:00:00Z", "req_1", "msg_1")])
    (tmp_path / "closed").mkdir()
    listing = os.scandir

    def refusing(folder):
        if Path(folder).name == "closed":
            raise PermissionError(13, "Permission denied")
        return listing(folder)

    monkeypatch.setattr(ccmon.os, "scandir", refusing)
    files, importer = ccmon.TranscriptFiles([tmp_path]), importer_of(CountingImports())
    for _ in range(2):
        assert importer.transcript_paths(files) == [tmp_path / "-home-dev-proj" / "s-ok.jsonl"]
    importer.sender.shutdown()
    assert importer.tally.problems == [f"unreadable: {tmp_path / 'closed'} (Permission denied)"]
    assert importer.tally.skipped == {"unreadable folder": 1}


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_transcript_lines_come_out_whole_whatever_the_blocks(tmp_path, monkeypatch, block):
    """A file's lines come out as a plain split gives them, however its blocks cut them: lines spanning blocks,
    characters of several bytes cut at a block's end, bytes that are no UTF-8, empty lines, a last line without
    its newline. Read again after it grew (as --follow does), it goes on at the next line, numbered on."""
    monkeypatch.setattr(ccmon, "READ_BLOCK", block)
    pieces = [b'{"type":"user"}', b"", "\u00e9\u20ac\U0001f600".encode() * 30, b"x" * 700, b"\xff\xfe{", b"\xe2\x82"]
    chooser = random.Random(block)
    content = b"\n".join(chooser.choice(pieces) for _ in range(300)) + b"\n" + "tail \u20ac".encode()
    path = tmp_path / "t.jsonl"
    path.write_bytes(content[:len(content) // 2])
    files = ccmon.TranscriptFiles([path])
    read = list(files.lines(path, final=False))
    with path.open("ab") as handle:
        handle.write(content[len(content) // 2:])
    read += files.lines(path, final=True)
    *whole, last = content.split(b"\n")
    assert read == [(number, line.decode("utf-8", errors="replace"), True) for number, line in enumerate(whole, 1)] \
        + [(len(whole) + 1, "tail \u20ac", False)]
    assert files.positions[path] == (len(content), len(whole) + 1)


def test_a_line_too_long_is_skipped_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(ccmon, "MAX_LINE_BYTES", 2000)
    monkeypatch.setattr(ccmon, "READ_BLOCK", 512)  # shorter than MAX_LINE_BYTES, as it is: lines span blocks
    path = tmp_path / "s-long.jsonl"
    lines = [transcript_line("s-long", f"2026-05-10T10:0{n}:00Z", f"req_{n}", f"msg_{n}") for n in range(3)]
    path.write_text(lines[0] + "\n" + "x" * 5000 + "\n" + lines[1] + "\n" + lines[2] + "\n" + "y" * 3000)
    importer = importer_of(CountingImports())
    importer.add_file(ccmon.TranscriptFiles([path]), path, final=True)
    importer.flush(wait=True)
    importer.sender.shutdown()
    assert (importer.tally.imported, importer.tally.skipped) == (3, {"line too long": 2})
    assert importer.tally.problems == [f"line too long: {path}:2", f"line too long: {path}:5"]


def test_a_request_the_server_refuses_is_named_and_the_rest_imported(server):
    """The server stores all of a call or nothing: the importer sends a refused batch again in halves, until the
    refused request is alone, and names it with the server's whole reason."""
    client = CountingImports({"req_5"})
    importer = importer_of(client)
    importer.add([(n, transcript_line("s", "2026-05-11T10:00:00Z", f"req_{n}", f"msg_{n}"), True)
                  for n in range(1, 10)], "s.jsonl")
    importer.flush(wait=True)
    importer.sender.shutdown()
    assert (importer.tally.imported, importer.tally.skipped, client.calls) == (8, {"refused by the server": 1}, 7)
    assert importer.tally.problems == [
        "refused by the server: s.jsonl:5 (an imported request is not valid: req_5 " + "is refused " * 20 + ")"]
    bad = ccmon_pb2.ImportedRequest(session_id="s", timestamp_ms=ccmon.parse_iso_ms("2026-05-11T10:00:00Z"),
                                    input_tokens=10 ** 12 - 1, cost_nanos=10 ** 15 + 1, request_id="r")
    with pytest.raises(ccmon.ImportRefused) as refused:  # the whole reason, where a call's errors are cut short
        ccmon.Client(server.target).import_requests([bad], "")
    assert str(refused.value) == "an imported request is not valid: a token count or the cost is out of range: " \
                                 "(999999999999, 0, 0, 0), 1000000000000001 nano-dollars"



def test_an_interrupted_import_says_what_is_stored(tmp_path, monkeypatch, capsys):
    """The server writes an import a chunk at a time: when one fails, it says how much is stored, and importing
    again counts those as known. The importer, when a call fails, says its requests may be stored."""
    monkeypatch.setattr(ccmon, "IMPORT_CHUNK", 1000)
    writer = ccmon.Writer(tmp_path / "interrupted.db")
    chunks, store = [], ccmon.Writer._import

    def second_chunk_fails(self, conn, rows, *rest):
        chunks.append(len(rows))
        if len(chunks) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return store(self, conn, rows, *rest)

    monkeypatch.setattr(ccmon.Writer, "_import", second_chunk_fails)
    rows = dense_import_rows(2500)
    try:
        with pytest.raises(ccmon.ImportInterrupted) as interrupted:
            writer.import_requests(rows, {}, "")
        assert str(interrupted.value) == "1,000 of the 2,500 requests were stored or found known (1,000 new), " \
                                         "then: database write failed: disk I/O error"
        monkeypatch.setattr(ccmon.Writer, "_import", store)
        assert writer.import_requests(rows, {}, "") == ccmon.ImportCounts(1500, 1000)
    finally:
        writer.close()
    folder = tmp_path / "projects"
    write_transcript(folder, "s-i", [transcript_line("s-i", "2026-05-12T10:00:00Z", "req_i1", "msg_i1"),
                                     transcript_line("s-i", "2026-05-12T10:01:00Z", "req_i2", "msg_i2")])

    def no_answer(self, rows, user, dry_run):
        raise ccmon.ServerUnreachable("server did not answer in time")

    monkeypatch.setattr(ccmon.Client, "import_requests", no_answer)
    args = ccmon.build_import_parser().parse_args([str(folder)])
    assert ccmon.run_import(ccmon.load_config(args), args, environ={}) == 1
    out, err = capsys.readouterr()
    assert err == "ccmon import: stopped: server did not answer in time. The 2 requests sent last may be stored " \
                  "already (not counted below); importing again counts each request once.\n"
    assert out == "ccmon import: 1 file read; 0 requests imported; 0 already known; 0 skipped\n"



def test_an_import_reads_on_while_two_calls_are_unanswered():
    """The importer sends IMPORT_CALLS_AHEAD calls before it waits for the first answer: the reading goes on while the
    server stores. When the oldest call fails, its requests and those of the call sent after it are the ones that
    may be stored, and what is read meanwhile is kept to be sent (it was lost)."""
    answer = threading.Event()

    class SlowServer:
        calls = 0

        def import_requests(self, rows, user, dry_run):
            self.calls += 1
            assert answer.wait(30)
            if self.calls == 1:
                raise ccmon.ServerUnreachable("server did not answer in time")
            return ccmon.ImportCounts(len(rows), 0)

    importer = importer_of(SlowServer())
    importer.add([(n, transcript_line("s", "2026-05-01T10:00:00Z", f"req_{n}", f"msg_{n}"), True)
                  for n in range(3000)], "s.jsonl")  # 1,000 then 2,000 sent; lock-step, the second waits here
    assert [len(batch) for _, batch, _ in importer.in_flight] == [1000, 2000]
    assert not any(importer.pending.values())
    answer.set()
    with pytest.raises(ccmon.ServerUnreachable):  # the next 4,000 read, the first call's failure is heard
        importer.add([(n, transcript_line("s", "2026-05-01T10:00:00Z", f"req_{n}", f"msg_{n}"), True)
                      for n in range(3000, 7000)], "s.jsonl")
    assert importer.unconfirmed == 3000  # the first call's requests and the second's
    assert [len(kept) for kept in importer.pending.values()] == [5000]  # the first call's, and the 4,000 read
    importer.collect()  # the second call's answer
    importer.sender.shutdown()
    assert importer.tally.imported == 2000


def test_a_failed_import_ends_without_waiting_out_the_call_sent_after_it(tmp_path, monkeypatch, capsys):
    """When a call fails while the next one is under way (IMPORT_CALLS_AHEAD), the import closes its connection,
    which ends that call at once (or cancels it, not started yet), rather than waiting for it to reach its deadline
    (IMPORT_TIMEOUT_S)."""
    folder = tmp_path / "projects"
    write_transcript(folder, "s", [transcript_line("s", "2026-05-12T10:00:00Z", f"req_{n}", f"msg_{n}")
                                   for n in range(3000)])
    closed, ended_by = threading.Event(), []

    def import_requests(self, rows, user, dry_run=False, readings=()):
        if len(rows) == ccmon.FIRST_IMPORT_BATCH:
            raise ccmon.ServerUnreachable("server did not answer in time")
        ended_by.append("the connection closed" if closed.wait(30) else "its deadline")  # as a real call would
        raise ccmon.ServerUnreachable("cancelled")

    close = ccmon.Client.close
    monkeypatch.setattr(ccmon.Client, "import_requests", import_requests)
    monkeypatch.setattr(ccmon.Client, "close", lambda self: closed.set() or close(self))
    args = ccmon.build_import_parser().parse_args([str(folder)])
    assert ccmon.run_import(ccmon.load_config(args), args, environ={}) == 1
    assert ended_by in ([], ["the connection closed"])  # [] when it was cancelled before it started
    assert "The 3,000 requests sent last may be stored already" in capsys.readouterr().err


def test_telemetry_stored_between_an_imports_chunks_is_known(tmp_path, monkeypatch):
    """An import reads the telemetry near its rows' times once; what telemetry the writer stores between its
    chunks is added: a forked session's copy of that answer, in a later chunk, is known."""
    monkeypatch.setattr(ccmon, "IMPORT_CHUNK", 1000)
    writer = ccmon.Writer(tmp_path / "between.db")
    rows = dense_import_rows(1500)
    copy_at = rows[1200][0]
    rows[1200] = rows[1200][:1] + ("s-fork",) + rows[1200][2:-5] + ("req_tele",) + rows[1200][-4:]
    telemetry = (copy_at, "s-tele", 1, "claude-haiku-4-5", "u", 120, 30, 0, 0, 270_000, 900, None, None, "req_tele",
                 None, None, ccmon.ORIGIN_EVENT, ccmon.CLAUDE_CODE)
    store = ccmon.Writer._import

    def telemetry_first(self, conn, chunk, *rest):
        if chunk[0] == rows[1000]:  # before the second chunk, as if an export had been queued meanwhile
            self._insert(conn, ccmon.Batch(requests=[telemetry]))
        return store(self, conn, chunk, *rest)

    monkeypatch.setattr(ccmon.Writer, "_import", telemetry_first)
    try:
        assert writer.import_requests(rows, {}, "") == ccmon.ImportCounts(1499, 1)
    finally:
        writer.close()
    assert db_rows(tmp_path / "between.db", "SELECT session_id, origin FROM r WHERE request_id = 'req_tele'") == \
        [("s-tele", 0)]


# ---------------------------------------------------------------- local server: started on demand

def local_home(tmp_path: Path, extra: str = "") -> tuple[Path, int]:
    """A HOME whose ~/.ccmon/config.toml puts the local server on a free port (never 4317: tests run side by side)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / ".ccmon").mkdir()
    (tmp_path / ".ccmon" / "config.toml").write_text(
        f'[server]\naddress = "127.0.0.1:{port}"\nhttp_address = "off"\n{extra}')
    return tmp_path, port


def local_server_pids(home: Path) -> list[int]:
    """The `ccmon --server` processes running with this HOME (from /proc), not counting their decoders (forked
    children of theirs)."""
    parents = {}
    for folder in Path("/proc").glob("[0-9]*"):
        try:
            command = (folder / "cmdline").read_bytes().split(b"\0")
            environment = (folder / "environ").read_bytes().split(b"\0")
            state, parent = (folder / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if b"--server" in command and f"HOME={home}".encode() in environment and state != "Z":
            parents[int(folder.name)] = int(parent)
    return sorted(pid for pid, parent in parents.items() if parent not in parents)


def pid_file(home: Path) -> dict:
    return json.loads((home / ".ccmon" / "ccmon.pid").read_text())


def stop_local_servers(home: Path) -> None:
    """Every server started for this HOME, stopped (a detached server outlives the client that started it)."""
    pids = local_server_pids(home)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not local_server_pids(home), "the local servers to stop", timeout=20)


def test_a_client_starts_the_local_server_with_its_own_config_and_server_flags(tmp_path):
    """The local server a client starts runs in its log's folder: it is given the client's --config and the server
    settings the client was given as flags, the files they name (a relative database.path of the file too) named
    whole. A relative --config was not found, flags were dropped (the server took the default address, and the
    client waited 20 s for it), and a relative database.path was taken from the log's folder."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    work = tmp_path / "work"
    (work / "cfg").mkdir(parents=True)
    (work / "cfg" / "local.toml").write_text('[server]\nhttp_address = "off"\n[database]\npath = "data/x.db"\n')
    try:
        first = run_ccmon(["--json", "--config", "cfg/local.toml", "--server-address", f"127.0.0.1:{port}"], work,
                          env={"HOME": str(tmp_path)})
        running = json.loads((work / "data" / "x.pid").read_text())
        assert (first.returncode, first.stderr) == (0, f"ccmon: local server started, pid {running['pid']}\n")
        assert json.loads(first.stdout)["monthly_cost"] == 0.0
        assert (running["address"], running["http_address"]) == (f"127.0.0.1:{port}", "")
        assert (work / "data" / "x.db").is_file() and not (tmp_path / ".ccmon" / "ccmon.db").exists()
    finally:
        stop_local_servers(tmp_path)


def test_a_client_starts_the_local_server_which_keeps_running_and_server_stops_it(tmp_path):
    home, port = local_home(tmp_path)
    try:
        first = run_ccmon(["--json"], home)
        running = pid_file(home)
        assert (first.returncode, first.stderr) == (0, f"ccmon: local server started, pid {running['pid']}\n")
        assert json.loads(first.stdout)["monthly_cost"] == 0.0
        assert local_server_pids(home) == [running["pid"]]  # it outlives the client that started it
        assert (running["address"], running["http_address"]) == (f"127.0.0.1:{port}", "")
        assert (home / ".ccmon" / "server.log").stat().st_mode & 0o777 == 0o600
        status = run_ccmon(["server", "status"], home)
        since = dt.datetime.fromtimestamp(running["started_ms"] / 1000, dt.timezone.utc).isoformat(timespec="seconds")
        assert (status.returncode, status.stdout) == (0, (
            f"ccmon server: running, pid {running['pid']}\n  gRPC:     127.0.0.1:{port}\n  OTLP/HTTP: off\n"
            f"  database: {home}/.ccmon/ccmon.db\n  log:      {home}/.ccmon/server.log\n  up since: {since}\n"))
        again = run_ccmon(["report", "daily", "--json"], home)  # the running one answers; nothing more started
        assert (again.returncode, again.stderr) == (0, "")
        assert local_server_pids(home) == [running["pid"]]
        stopped = run_ccmon(["server", "stop"], home)
        assert (stopped.returncode, stopped.stdout) == (0, f"ccmon server: stopped pid {running['pid']}\n")
        assert local_server_pids(home) == [] and not (home / ".ccmon" / "ccmon.pid").exists()
        down = run_ccmon(["server", "status"], home)
        assert (down.returncode, down.stdout) == (1, f"ccmon server: not running (no live pid in "
                                                     f"{home}/.ccmon/ccmon.pid)\n")
    finally:
        stop_local_servers(home)


def test_two_clients_at_once_start_one_local_server(tmp_path):
    home, _ = local_home(tmp_path)
    start = threading.Barrier(2)
    results: list[subprocess.CompletedProcess] = []

    def client():
        start.wait()
        results.append(run_ccmon(["--format", "@daily_cost"], home))
    try:
        threads = [threading.Thread(target=client) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        winner = pid_file(home)["pid"]
        assert local_server_pids(home) == [winner]
        assert [(r.returncode, r.stdout) for r in results] == [(0, "$0.00\n")] * 2
        # A client that started a server says so, naming the one that answers: its own, or (when its server lost
        # the database's lock) the winner's. A client slowed down enough to find the winner already answering
        # (the machine busy) says nothing.
        started = f"ccmon: local server started, pid {winner}\n"
        assert started in [r.stderr for r in results] and {r.stderr for r in results} <= {started, ""}
    finally:
        stop_local_servers(home)


def test_a_named_server_or_autostart_off_is_never_replaced_by_a_local_one(tmp_path):
    home, port = local_home(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    try:
        named = run_ccmon(["--monitor-server", f"127.0.0.1:{closed}", "--format", "@daily_cost"], home)
        assert (named.returncode, named.stderr) == (
            1, f"ccmon: cannot reach the ccmon server at 127.0.0.1:{closed}: connection refused\n")
        off = run_ccmon(["--monitor-autostart", "false", "--json"], home)
        # server.address is where a client of this config looks (not 4317), and nothing is started there
        assert (off.returncode, off.stderr) == (
            1, f"ccmon: cannot reach the ccmon server at 127.0.0.1:{port}: connection refused\n")
        (home / ".ccmon" / "config.toml").write_text(
            f'[server]\naddress = "127.0.0.1:{port}"\nhttp_address = "off"\n[monitor]\nautostart = false\n')
        report = run_ccmon(["report", "daily"], home)
        assert (report.returncode, report.stderr) == (
            1, f"ccmon: cannot reach the ccmon server at 127.0.0.1:{port}: connection refused\n")
        assert local_server_pids(home) == [] and not (home / ".ccmon" / "server.log").exists()
    finally:
        stop_local_servers(home)


def test_a_local_server_that_cannot_start_or_an_unknown_action_is_one_line(tmp_path):
    home, _ = local_home(tmp_path)
    database = home / ".ccmon" / "ccmon.db"
    database.mkdir()  # a folder where the database should be: the server cannot start
    try:
        failed = run_ccmon(["--json"], home)
        assert (failed.returncode, failed.stdout) == (1, "")
        assert failed.stderr == (f"ccmon: the local server did not start: ccmon: {database} is a folder; "
                                 "--database-path (database.path) names ccmon's database file, created when missing "
                                 f"(its log: {home}/.ccmon/server.log)\n")
        unknown = run_ccmon(["server", "restart"], home)
        assert (unknown.returncode, unknown.stderr) == (2, "ccmon server: argument action: invalid choice: 'restart' "
                                                           "(choose from 'status', 'stop') (see ccmon server --help)\n")
    finally:
        stop_local_servers(home)


def test_the_status_line_starts_the_local_server_without_waiting_for_it(tmp_path):
    home, _ = local_home(tmp_path)
    try:
        line = subprocess.run([*CCMON, "statusline", "--format", "@model"], input=json.dumps(live_input("s-x")),
                              capture_output=True, text=True, cwd=home, timeout=30, env={**os.environ, "HOME": str(home)})
        assert (line.returncode, line.stdout) == (0, "Sonnet 4.5\n")
        started = re.fullmatch(r"ccmon: local server starting, pid (\d+); this line is from Claude Code's input "
                               r"alone\n", line.stderr)
        assert started, line.stderr
        ready = wait_until(lambda: local_server_pids(home) and (home / ".ccmon" / "ccmon.pid").exists(),
                           "the local server to be ready", timeout=20)
        assert ready and pid_file(home)["pid"] == int(started.group(1))
    finally:
        stop_local_servers(home)


def test_the_monitor_says_it_started_the_local_server(tmp_path):
    home, _ = local_home(tmp_path)
    monitor = MonitorPty([], cwd=home, env={"HOME": str(home)})
    try:
        screen = monitor.wait_for("local server started, pid", "the notice of the start")
        assert f"local server started, pid {pid_file(home)['pid']}" in screen
        monitor.send(b"q")
        assert monitor.close() == 0
        assert local_server_pids(home) == [pid_file(home)["pid"]]  # still running once the monitor has quit
    finally:
        if monitor.proc.poll() is None:
            monitor.proc.kill()
            monitor.close()
        stop_local_servers(home)


def test_a_first_run_shows_the_transcripts_totals_on_its_first_screen(tmp_path):
    """A fresh HOME with Claude Code's transcripts and no server: the monitor starts the local server, which reads
    them, and the first screen connected shows their totals exactly."""
    home, _ = local_home(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    when = [(now - dt.timedelta(minutes=m)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            for m in (30, 20, 10)]
    sonnet, haiku = ("claude-sonnet-4-5", (1500, 250, 4000, 800)), ("claude-haiku-4-5", (120, 30, 0, 0))
    for project, session, lines in (("-home-dev-proj", "s-one", [(when[0], *sonnet), (when[1], *sonnet)]),
                                    ("-home-dev-other", "s-two", [(when[2], *haiku)])):
        folder = home / ".claude" / "projects" / project
        folder.mkdir(parents=True)
        (folder / f"{session}.jsonl").write_text("".join(
            transcript_line(session, at, f"req_{session}_{i}", f"msg_{session}_{i}", model=model, usage=usage) + "\n"
            for i, (at, model, usage) in enumerate(lines)))
    try:
        with MonitorPty([], cwd=home, env={"HOME": str(home)}) as monitor:
            # the server reads the transcripts as it starts: the screen fills in (in a refresh or two) and then holds
            # exactly their totals
            screen = monitor.wait_for(lambda text: "● connected" in text and "Requests 1-3 of 3" in text and
                                      "reading history" not in text, "the transcripts' requests on screen, all read")
            # two Sonnet 4.5 requests at $0.01245 each and one Haiku 4.5 request of 120 in, 30 out: $0.00027
            assert line_with(screen, "Base").split() == ["Base", "1", "150", "0", "150", "$0.0003", "-"]
            assert line_with(screen, "Premium").split() == ["Premium", "2", "3.50K", "9.60K", "13.1K", "$0.0249", "-"]
            assert line_with(screen, "Total").split() == ["Total", "3", "3.65K", "9.60K", "13.2K", "$0.0252", "-"]
            assert "Requests 1-3 of 3" in screen
            monitor.send(b"q")
            assert monitor.close() == 0
    finally:
        stop_local_servers(home)


def test_two_monitors_started_at_the_same_instant_leave_one_server(tmp_path):
    home, _ = local_home(tmp_path)
    try:
        with MonitorPty([], cwd=home, env={"HOME": str(home)}) as first, \
                MonitorPty([], cwd=home, env={"HOME": str(home)}) as second:
            screens = [monitor.wait_for(lambda text: "● connected" in text and "local server started" in text,
                                        "the monitor connected") for monitor in (first, second)]
            winner = pid_file(home)["pid"]
            assert local_server_pids(home) == [winner]
            assert all(f"local server started, pid {winner}" in screen for screen in screens)
            for monitor in (first, second):
                monitor.send(b"q")
                assert monitor.close() == 0
        assert local_server_pids(home) == [winner]  # still running once both monitors have quit
    finally:
        stop_local_servers(home)


def test_the_local_server_reads_and_follows_the_transcripts(tmp_path):
    home, _ = local_home(tmp_path)
    project = home / ".claude" / "projects" / "-home-dev-proj"
    project.mkdir(parents=True)
    now = dt.datetime.now(dt.timezone.utc)
    when = [(now - dt.timedelta(minutes=m)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            for m in (3, 2, 1)]
    transcript = project / "s-local.jsonl"
    transcript.write_text("".join(transcript_line("s-local", when[i], f"req_{i}", f"msg_{i}") + "\n"
                                  for i in range(2)))

    def figures():
        result = run_ccmon(["--json"], home)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    try:
        # two Sonnet 4.5 requests of 1,500 in, 250 out, 4,000 cache read, 800 cache write: $0.01245 each
        wait_until(lambda: figures()["monthly_tokens"] == 2 * 6550, "the transcripts' two requests")
        assert figures()["monthly_cost"] == 0.0249
        # the telemetry of the next request, then its transcript line: one request, at Claude Code's own cost
        port = int(pid_file(home)["address"].rsplit(":", 1)[1])
        sdk_export(port, [("api_request", api_request(2, when[2], session="s-local", request_id="req_2",
                                                      cost_usd=0.013, input_tokens=1500, output_tokens=250,
                                                      cache_read_tokens=4000, cache_creation_tokens=800))])
        wait_until(lambda: figures()["monthly_tokens"] == 3 * 6550, "the telemetry of the third request")
        with transcript.open("a") as handle:  # Claude Code writes on: followed
            handle.write(transcript_line("s-local", when[2], "req_2", "msg_2") + "\n")
        log = home / ".ccmon" / "server.log"
        wait_until(lambda: "transcripts: 1 files read, 2 requests imported, 1 already known" in log.read_text(),
                   "the appended line, known by its request_id")
        assert (figures()["monthly_tokens"], figures()["monthly_cost"]) == (3 * 6550, 0.0379)
        with transcript.open("a") as handle:  # a request telemetry missed: the transcript fills the gap
            handle.write(transcript_line("s-local", when[2], "req_3", "msg_3") + "\n")
        wait_until(lambda: figures()["monthly_tokens"] == 4 * 6550, "the appended request")
        assert figures()["monthly_cost"] == 0.05035
    finally:
        stop_local_servers(home)


def test_transcripts_are_read_the_most_recently_written_first(tmp_path):
    """A first reading of a year of transcripts shows the current figures first: files by their modification time,
    newest first (a name breaks a tie), wherever they lie."""
    times = {"a/old.jsonl": 1_000, "b/new.jsonl": 3_000, "a/mid.jsonl": 2_000, "c/tie-b.jsonl": 500,
             "c/tie-a.jsonl": 500}
    for name, when in times.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (when, when))
    assert [str(path.relative_to(tmp_path)) for path in ccmon.TranscriptFiles([tmp_path]).paths()] == [
        "b/new.jsonl", "a/mid.jsonl", "a/old.jsonl", "c/tie-a.jsonl", "c/tie-b.jsonl"]
    # Files named as roots (ccmon import FILE ...) among them, by the same order.
    roots = [tmp_path / "a/old.jsonl", tmp_path / "b/new.jsonl", tmp_path / "c"]
    assert [str(path.relative_to(tmp_path)) for path in ccmon.TranscriptFiles(roots).paths()] == [
        "b/new.jsonl", "a/old.jsonl", "c/tie-a.jsonl", "c/tie-b.jsonl"]


def test_a_follow_pass_reads_only_the_files_that_grew(tmp_path):
    """--follow (and the local server) walks the folders every second: a file read to its end and no longer since
    the walk is not opened again; one that grew is read from where it stopped, one cut short from its start (even
    when it is empty for a while); a file named as a root (never walked) is always looked at."""
    folder = tmp_path / "projects" / "-home-dev-proj"
    folder.mkdir(parents=True)
    grows, stays = folder / "s-grows.jsonl", folder / "s-stays.jsonl"
    first = {path: transcript_line(path.stem, "2026-05-01T10:00:00Z", f"req_{path.stem}", "msg_1") + "\n"
             for path in (grows, stays)}
    for path, line in first.items():
        path.write_text(line)
    importer, files, opened = importer_of(CountingImports()), ccmon.TranscriptFiles([tmp_path / "projects"]), []
    read_lines = files.lines
    files.lines = lambda path, final: opened.append(path.name) or read_lines(path, final)

    def follow_pass() -> list[str]:
        opened.clear()
        for path in files.paths():
            importer.add_file(files, path, final=False)
        importer.flush(wait=True)
        return sorted(opened)

    assert follow_pass() == ["s-grows.jsonl", "s-stays.jsonl"] and importer.tally.entries == 2
    assert follow_pass() == []
    with grows.open("a") as handle:
        handle.write(transcript_line("s-grows", "2026-05-01T10:01:00Z", "req_2", "msg_2") + "\n")
    assert follow_pass() == ["s-grows.jsonl"] and importer.tally.entries == 3
    assert follow_pass() == []
    grows.write_text("")  # cut short: read from its start from now on
    assert follow_pass() == ["s-grows.jsonl"] and follow_pass() == []
    grows.write_text(first[grows].replace("req_s-grows", "req_s-grown"))  # as long as the first reading was
    assert follow_pass() == ["s-grows.jsonl"] and importer.tally.entries == 4
    single = ccmon.TranscriptFiles([stays])  # a root: found without a look at its size
    assert single.paths() == [stays] and len(list(single.lines(stays, final=False))) == 1
    assert not single.unchanged(stays)
    importer.sender.shutdown()


def test_the_local_servers_first_reading_is_shown_file_by_file_until_it_is_stored(server, tmp_path, monkeypatch):
    """What the local server runs (follow_transcripts), against a real server: the service's history_reading counts
    the files of the first reading, then is cleared once everything they hold is stored; what is read later is no
    first reading."""
    home = tmp_path / "home"
    project = home / ".claude" / "projects" / "-home-dev-proj"
    project.mkdir(parents=True)
    for n in range(3):
        (project / f"s-{n}.jsonl").write_text("".join(transcript_line(
            f"s-{n}", f"2026-05-0{n + 1}T10:00:0{i}.000Z", f"req_{n}_{i}", f"msg_{n}_{i}") + "\n" for i in range(2)))
    monkeypatch.setenv("HOME", str(home))
    for variable in ("CLAUDE_CONFIG_DIR", "CODEX_HOME"):
        monkeypatch.delenv(variable, raising=False)
    config = dataclasses.replace(ccmon.load_config(ccmon.build_parser().parse_args([])),
                                 server_address=f"127.0.0.1:{server.port}")

    class Shown:  # what the monitor would be told, and how many requests were stored when it was
        def __init__(self):
            self.readings, self.done = [], threading.Event()

        @property
        def history_reading(self):
            return self.readings[-1][0] if self.readings else None

        @history_reading.setter
        def history_reading(self, reading):
            self.readings.append((reading, stats(server).total_requests if reading is None else None))
            if reading is None:
                self.done.set()

    shown, stop = Shown(), threading.Event()
    reader = threading.Thread(target=ccmon.follow_transcripts, args=(config, stop, shown))
    reader.start()
    try:
        assert shown.done.wait(30), shown.readings
        (project / "s-3.jsonl").write_text(transcript_line("s-3", "2026-05-04T10:00:00.000Z", "req_3", "msg_3") + "\n")
        wait_until(lambda: stats(server).total_requests == 7, "the file written later")
    finally:
        stop.set()
        reader.join(30)
    assert shown.readings == [(ccmon.HistoryReading(0, 3), None), (ccmon.HistoryReading(1, 3), None),
                              (ccmon.HistoryReading(2, 3), None), (None, 6)]


def test_a_file_ccmon_fails_on_leaves_the_local_servers_other_files_read(server, tmp_path, monkeypatch, caplog):
    """A bug of ccmon's on one transcript (here its reading made to raise) is logged once, however often the local
    server looks again, and the files read after it (older, and written later) are stored; it stopped every pass
    at that file."""
    project = tmp_path / "home" / ".claude" / "projects" / "-home-dev-proj"
    project.mkdir(parents=True)
    for n, name in enumerate(["s-old", "s-bad", "s-new"]):  # read newest first: s-new, s-bad, s-old
        path = project / f"{name}.jsonl"
        path.write_text(transcript_line(name, f"2026-05-0{n + 1}T10:00:00.000Z", f"req_{name}", "msg_1") + "\n")
        os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for variable in ("CLAUDE_CONFIG_DIR", "CODEX_HOME"):
        monkeypatch.delenv(variable, raising=False)
    entry, failed = ccmon.transcript_entry, []

    def failing_on_s_bad(line):
        if '"s-bad"' in line:
            failed.append(line)
            raise KeyError("a bug")
        return entry(line)

    monkeypatch.setattr(ccmon, "transcript_entry", failing_on_s_bad)
    config = dataclasses.replace(ccmon.load_config(ccmon.build_parser().parse_args([])),
                                 server_address=f"127.0.0.1:{server.port}")
    stop = threading.Event()
    reader = threading.Thread(target=ccmon.follow_transcripts, args=(config, stop, types.SimpleNamespace()))
    reader.start()
    try:
        wait_until(lambda: stats(server).total_requests == 2, "the files beside the one ccmon fails on")
        (project / "s-later.jsonl").write_text(
            transcript_line("s-later", "2026-05-04T10:00:00.000Z", "req_later", "msg_1") + "\n")
        wait_until(lambda: stats(server).total_requests == 3, "a file written later")
    finally:
        stop.set()
        reader.join(30)
    failures = [record for record in caplog.records if record.levelname == "ERROR"]
    assert [record.getMessage() for record in failures] == [f"transcripts: reading {project / 's-bad.jsonl'} failed; "
                                                            "the other files are read on, this one again once the "
                                                            "server restarts"]
    assert "KeyError: 'a bug'" in caplog.text and len(failed) == 1  # not read again at each look


def test_the_local_server_reads_and_follows_the_other_agents_histories(tmp_path):
    """The local server follows Codex's rollouts, Qwen's chats and Gemini's chats in their default folders as it
    follows the transcripts: what is there at start, then a session written later; Codex's limits with them."""
    home, _ = local_home(tmp_path)
    agent_home(home, "codex-0.169.0", "qwen-code-0.24.4")
    log = home / ".ccmon" / "server.log"
    try:
        assert run_ccmon(["--json"], home).returncode == 0  # starts the local server
        wait_until(lambda: "transcripts: 9 files read, 15 requests imported, 0 already known" in log.read_text(),
                   "Codex's and Qwen's histories")
        chats = home / ".gemini" / "tmp" / "gemini" / "chats"
        chats.mkdir(parents=True)
        shutil.copy(next((FIXTURES / "gemini-cli-0.61.0" / "history").rglob("*-d5de2ac9.jsonl")), chats)
        wait_until(lambda: "transcripts: 10 files read, 16 requests imported, 0 already known" in log.read_text(),
                   "a Gemini chat written later")
        db = home / ".ccmon" / "ccmon.db"
        assert db_rows(db, "SELECT a.name, COUNT(*) FROM requests r JOIN agents a ON a.id = r.agent GROUP BY 1 "
                           "ORDER BY 1") == [("codex", 5), ("gemini-cli", 1), ("qwen-code", 10)]
        assert db_rows(db, "SELECT COUNT(*) FROM limit_readings") == [(5,)]
    finally:
        stop_local_servers(home)


def test_only_the_local_server_reads_the_local_transcripts(tmp_path, monkeypatch):
    """The default database on a loopback address with auto-start on; a team server (any other) does not."""
    local = config_for(tmp_path, monkeypatch)
    assert ccmon.is_local_server(local)
    assert local.database_path == tmp_path / "home" / ".ccmon" / "ccmon.db"
    for args in (["--database-path", str(tmp_path / "team.db")], ["--server-address", "0.0.0.0:4317"],
                 ["--monitor-autostart", "false"]):
        assert not ccmon.is_local_server(config_for(tmp_path, monkeypatch, args)), args


# ---------------------------------------------------------------- setup: ccmon setup

SETUP_ORIGINAL = (b'{\n  "model": "opus",\n  "permissions": {"allow": ["Bash(ls:*)"], "deny": []},\n'
                  b'  "hooks": {"Stop": [{"hooks": [{"type": "command", "command": "notify-send done"}]}]},\n'
                  b'  "env": {"OTEL_RESOURCE_ATTRIBUTES": "project=proj-alpha", "EDITOR": "vim"}\n}\n')
TELEMETRY_LINES = ["set env.CLAUDE_CODE_ENABLE_TELEMETRY = 1", "set env.OTEL_LOGS_EXPORTER = otlp",
                   "set env.OTEL_METRICS_EXPORTER = otlp", "set env.OTEL_EXPORTER_OTLP_PROTOCOL = grpc",
                   "set env.OTEL_EXPORTER_OTLP_ENDPOINT = http://127.0.0.1:4317"]
TELEMETRY_ENV = {"CLAUDE_CODE_ENABLE_TELEMETRY": "1", "OTEL_LOGS_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp",
                 "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
THIS_CCMON = shlex.join([sys.executable, os.path.abspath(ccmon.__file__), "statusline"])


@pytest.fixture
def setup_home(tmp_path, monkeypatch) -> Path:
    """A HOME of its own, no config file in reach and no ccmon or Claude Code variables: returns HOME."""
    for name in ("CLAUDE_CONFIG_DIR", "CCMON_TOKEN", "GEMINI_CLI_HOME", "QWEN_HOME", "CODEX_HOME",
                 "OTEL_EXPORTER_OTLP_ENDPOINT", *(f"{tool}_TELEMETRY_{name}" for tool in ("GEMINI", "QWEN")
                                                  for name in ("ENABLED", "TARGET", "OTLP_ENDPOINT", "OTLP_PROTOCOL",
                                                               "OUTFILE"))):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def settings_file(home: Path, content: bytes, mode: int = 0o644) -> Path:
    path = home / ".claude" / "settings.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    path.chmod(mode)
    return path


def ccmon_setup(capsys, *args: str) -> tuple[int, list[str], str]:
    """(exit code, stdout lines, stderr) of `ccmon setup ARGS`."""
    code = ccmon.main(["setup", *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_setup_sets_telemetry_and_the_status_line_and_keeps_every_other_key(setup_home, capsys):
    path = settings_file(setup_home, SETUP_ORIGINAL, 0o640)
    code, lines, err = ccmon_setup(capsys)
    assert (code, err) == (0, "")
    backup = setup_home / ".claude" / "settings.json.ccmon-backup"
    assert lines == [*TELEMETRY_LINES, f"set statusLine: {THIS_CCMON}",
                     f"wrote {path} (before ccmon: {backup}; ccmon setup --undo restores it)"]
    written = json.loads(path.read_bytes())
    assert list(written.items()) == [
        ("model", "opus"), ("permissions", {"allow": ["Bash(ls:*)"], "deny": []}),
        ("hooks", {"Stop": [{"hooks": [{"type": "command", "command": "notify-send done"}]}]}),
        ("env", {"OTEL_RESOURCE_ATTRIBUTES": "project=proj-alpha", "EDITOR": "vim", **TELEMETRY_ENV}),
        ("statusLine", {"type": "command", "command": THIS_CCMON})]
    assert path.read_bytes() == (json.dumps(written, indent=2) + "\n").encode()
    assert backup.read_bytes() == SETUP_ORIGINAL
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(backup.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["settings.json", "settings.json.ccmon-backup"]


def test_setup_twice_changes_nothing_the_second_time(setup_home, capsys):
    path = settings_file(setup_home, SETUP_ORIGINAL)
    assert ccmon_setup(capsys)[0] == 0
    first = path.read_bytes()
    assert ccmon_setup(capsys) == (0, [f"nothing to change: {path} already points Claude Code at ccmon "
                                     "(http://127.0.0.1:4317)"], "")
    assert path.read_bytes() == first
    assert (path.parent / "settings.json.ccmon-backup").read_bytes() == SETUP_ORIGINAL


def test_setup_dry_run_prints_the_changes_and_writes_nothing(setup_home, capsys):
    path = settings_file(setup_home, SETUP_ORIGINAL)
    assert ccmon_setup(capsys, "--dry-run") == (0, [*(f"would {line}" for line in TELEMETRY_LINES),
                                                  f"would set statusLine: {THIS_CCMON}",
                                                  f"nothing written (--dry-run): {path}"], "")
    assert path.read_bytes() == SETUP_ORIGINAL
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]


def test_setup_undo_puts_back_the_original_bytes_and_removes_the_backup(setup_home, capsys):
    path = settings_file(setup_home, SETUP_ORIGINAL, 0o600)
    ccmon_setup(capsys)
    assert ccmon_setup(capsys, "--undo", "--dry-run") == \
        (0, [f"would restore {path} as it was before ccmon setup"], "")
    assert ccmon_setup(capsys, "--undo") == (0, [f"restored {path} as it was before ccmon setup"], "")
    assert path.read_bytes() == SETUP_ORIGINAL
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]
    assert ccmon_setup(capsys, "--undo") == (0, [f"nothing to undo: no {path}.ccmon-backup"], "")


def test_setup_undo_keeps_what_the_user_changed_since(setup_home, capsys):
    path = settings_file(setup_home, b'{"env": {"OTEL_METRICS_EXPORTER": "console", "EDITOR": "vim"}}')
    ccmon_setup(capsys)
    edited = json.loads(path.read_bytes())
    edited["model"] = "sonnet"
    edited["env"]["DEBUG"] = "1"
    path.write_text(json.dumps(edited))
    assert ccmon_setup(capsys, "--undo") == (0, [f"restored ccmon's entries in {path} as they were before ccmon "
                                               "setup; other changes since are kept"], "")
    assert json.loads(path.read_bytes()) == {"model": "sonnet", "env": {"EDITOR": "vim", "DEBUG": "1",
                                                                        "OTEL_METRICS_EXPORTER": "console"}}


def test_setup_undo_leaves_a_settings_file_it_cannot_read_as_it_is(setup_home, capsys):
    path = settings_file(setup_home, SETUP_ORIGINAL)
    ccmon_setup(capsys)
    path.write_bytes(b'{"model": "opus"')
    assert ccmon_setup(capsys, "--undo") == (1, [], f"ccmon setup: {path} line 1: not valid JSON (Expecting ',' "
                                                    "delimiter); left as it is\n")
    assert path.read_bytes() == b'{"model": "opus"'
    assert (path.parent / "settings.json.ccmon-backup").read_bytes() == SETUP_ORIGINAL


def test_setup_creates_the_settings_file_and_undo_removes_it(setup_home, capsys):
    path = setup_home / ".claude" / "settings.json"
    assert ccmon_setup(capsys)[0] == 0
    assert json.loads(path.read_bytes()) == {"env": TELEMETRY_ENV,
                                             "statusLine": {"type": "command", "command": THIS_CCMON}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ccmon_setup(capsys, "--undo") == (0, [f"restored {path} as it was before ccmon setup (there was none)"],
                                           "")
    assert list(path.parent.iterdir()) == []


def test_setup_keeps_a_status_line_that_is_not_ccmons_unless_told(setup_home, capsys):
    foreign = b'{"statusLine": {"type": "command", "command": "~/bin/my-line.sh", "padding": 0}}'
    path = settings_file(setup_home, foreign)
    code, lines, _ = ccmon_setup(capsys)
    assert code == 0 and lines[5:] == [
        'kept statusLine: {"type": "command", "command": "~/bin/my-line.sh", "padding": 0} is not ccmon\'s; '
        "--replace-status-line replaces it",
        f"wrote {path} (before ccmon: {path}.ccmon-backup; ccmon setup --undo restores it)"]
    assert json.loads(path.read_bytes())["statusLine"] == json.loads(foreign)["statusLine"]
    assert ccmon_setup(capsys)[1] == [lines[5], f"nothing to change: {path} already points Claude Code at ccmon "
                                              "(http://127.0.0.1:4317)"]
    assert ccmon_setup(capsys, "--replace-status-line")[1] == [
        f'set statusLine: {THIS_CCMON} (was: {{"type": "command", "command": "~/bin/my-line.sh", "padding": 0}})',
        f"wrote {path} (before ccmon: {path}.ccmon-backup; ccmon setup --undo restores it)"]
    assert json.loads(path.read_bytes())["statusLine"] == {"type": "command", "command": THIS_CCMON, "padding": 0}
    assert (path.parent / "settings.json.ccmon-backup").read_bytes() == foreign  # the first change's original


def test_setup_follows_a_moved_ccmon_and_keeps_its_status_lines_format(setup_home, capsys):
    old = {"type": "command", "command": "python3 ~/old/ccmon.pyz statusline -f '@model | @daily_cost'", "padding": 1}
    path = settings_file(setup_home, json.dumps({"statusLine": old}).encode())
    command = f"{THIS_CCMON} --format '@model | @daily_cost'"
    assert ccmon_setup(capsys)[1][5] == f"set statusLine: {command} (was: {json.dumps(old)})"
    assert json.loads(path.read_bytes())["statusLine"] == {"type": "command", "command": command, "padding": 1}
    assert ccmon_setup(capsys)[1] == [f"nothing to change: {path} already points Claude Code at ccmon "
                                      "(http://127.0.0.1:4317)"]


@pytest.mark.parametrize("command, template", [
    ("python3 ccmon.pyz statusline --format=@model", "@model"),
    ("python3 ccmon.pyz statusline --monitor-server h:1 -f '@model @context'", "@model @context"),
    ("python3 ccmon.pyz statusline", None),
    ("python3 ccmon.pyz statusline -f", None),  # cut short: ccmon statusline itself refuses it
    ("python3 my-line.py statusline -f @model", None),  # not ccmon's
])
def test_setup_keeps_the_format_of_ccmons_status_line(command, template):
    assert ccmon.status_line_template({"type": "command", "command": command}) == template


def test_setup_names_the_pyz_it_runs_from(tmp_path, monkeypatch):
    """From ccmon.pyz, __main__ is the archive's bootstrap (build_zipapp.py): the archive is the program."""
    import types
    archive = tmp_path / "bin" / "ccmon.pyz"
    archive.parent.mkdir()
    archive.write_bytes(b"PK")
    monkeypatch.chdir(tmp_path)
    bootstrap = types.ModuleType("__main__")
    bootstrap.__file__ = "bin/ccmon.pyz/__main__.py"  # as `python3 bin/ccmon.pyz` names it
    monkeypatch.setitem(sys.modules, "__main__", bootstrap)
    assert ccmon.ccmon_program() == str(archive)
    bootstrap.__file__ = str(tmp_path / "bin" / "__main__.py")  # a script that imports ccmon
    assert ccmon.ccmon_program() == os.path.abspath(ccmon.__file__)


@pytest.mark.parametrize("command, ccmons", [
    ("python3 ~/bin/ccmon.pyz statusline", True),
    ("CCMON_TOKEN=t /usr/bin/python3 '/opt/my tools/ccmon.py' statusline --monitor-server h:1", True),
    ("ccmon statusline", True),
    ("ccmon.pyz --monitor-server h:1 statusline", True),
    ("python3 ~/bin/ccmon.pyz --format @daily_cost", False),  # a quick query of ccmon's, not its status line
    ("~/bin/my-line.sh statusline", False),
    ("bash -c 'ccmon statusline", False),  # unbalanced quote
    ("npx ccusage statusline", False),
])
def test_ccmons_status_line_is_known_by_its_program_and_command(command, ccmons):
    assert ccmon.is_ccmon_status_line({"type": "command", "command": command}) is ccmons


@pytest.mark.parametrize("content, message", [
    (b'{\n  // my settings\n  "model": "opus"\n}\n', "line 2: not valid JSON (Expecting property name enclosed in "
     "double quotes)"),
    (b'{"model": "opus",\n "env": {}\n', "line 3: not valid JSON (Expecting ',' delimiter)"),  # cut short
    (b"", "line 1: not valid JSON (Expecting value)"),
    (b'\n\n["not", "an", "object"]\n', "line 3: not a JSON object (Claude Code's settings are one {...})"),
    (b'{"env": ["A=1"]}', ': "env" is not a JSON object (Claude Code\'s env is {"NAME": "value"})'),
    (b'{"model": "caf\xe9"}\n', "line 1: not UTF-8 text"),
    (b"[" * 100_000, ": nested too deeply to read as JSON"),
])
def test_setup_leaves_a_settings_file_it_cannot_read_as_it_is(setup_home, capsys, content, message):
    path = settings_file(setup_home, content)
    separator = "" if message.startswith(":") else " "
    assert ccmon_setup(capsys) == (1, [], f"ccmon setup: {path}{separator}{message}; left as it is\n")
    assert path.read_bytes() == content
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]


def test_setup_says_when_it_cannot_read_the_settings_file(setup_home, capsys):
    path = setup_home / ".claude" / "settings.json"
    path.mkdir(parents=True)
    assert ccmon_setup(capsys) == (1, [], f"ccmon setup: cannot read {path}: Is a directory; left as it is\n")


def test_setup_that_cannot_write_leaves_the_file_whole(setup_home, capsys, monkeypatch):
    path = settings_file(setup_home, SETUP_ORIGINAL)

    def refused(source, target):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(ccmon.os, "replace", refused)
    assert ccmon_setup(capsys) == (1, [], f"ccmon setup: cannot write {path}.ccmon-backup: Permission denied; "
                                          f"{path} is as it was\n")
    assert path.read_bytes() == SETUP_ORIGINAL
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]  # no temporary file left behind


def test_setup_points_claude_code_at_a_team_server_with_its_token(setup_home, capsys):
    path = settings_file(setup_home, b"{}")
    code, lines, _ = ccmon_setup(capsys, "--monitor-server", "team-box:4317", "--monitor-token", "s3cret&t0ken")
    command = "CCMON_TOKEN='s3cret&t0ken' " + shlex.join(
        [sys.executable, os.path.abspath(ccmon.__file__), "statusline", "--monitor-server", "team-box:4317"])
    assert json.loads(path.read_bytes()) == {
        "env": {**TELEMETRY_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://team-box:4317",
                "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer s3cret&t0ken"},
        "statusLine": {"type": "command", "command": command}}
    assert code == 0 and lines[4:7] == [  # the token stays off the terminal
        "set env.OTEL_EXPORTER_OTLP_ENDPOINT = http://team-box:4317",
        "set env.OTEL_EXPORTER_OTLP_HEADERS = Authorization=Bearer <token>",
        f"set statusLine: {command.replace('s3cret&t0ken', '<token>')}"]


def test_setup_takes_the_token_from_ccmon_token_too(setup_home, capsys, monkeypatch):
    monkeypatch.setenv("CCMON_TOKEN", "from-env")
    path = settings_file(setup_home, b"{}")
    assert ccmon_setup(capsys)[0] == 0
    written = json.loads(path.read_bytes())
    assert written["env"]["OTEL_EXPORTER_OTLP_HEADERS"] == "Authorization=Bearer from-env"
    assert written["statusLine"]["command"] == f"CCMON_TOKEN=from-env {THIS_CCMON}"


def test_setup_with_a_tls_server_exports_over_https(setup_home, capsys):
    path = settings_file(setup_home, b"{}")
    assert ccmon_setup(capsys, "--monitor-server", "https://team-box:443")[0] == 0
    assert json.loads(path.read_bytes())["env"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "https://team-box:443"


def test_setup_writes_the_settings_in_claude_config_dir(setup_home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLAUDE_CONFIG_DIR", str(tmp_path / "claude-config"))
    assert ccmon_setup(capsys)[0] == 0
    assert json.loads((tmp_path / "claude-config" / "settings.json").read_bytes())["env"] == TELEMETRY_ENV
    assert not (setup_home / ".claude").exists()


def test_setup_writes_through_a_symlinked_settings_file(setup_home, tmp_path, capsys):
    target = tmp_path / "dotfiles" / "claude-settings.json"
    target.parent.mkdir()
    target.write_bytes(b'{"model": "opus"}')
    (setup_home / ".claude").mkdir()
    (setup_home / ".claude" / "settings.json").symlink_to(target)
    assert ccmon_setup(capsys)[0] == 0
    assert (setup_home / ".claude" / "settings.json").is_symlink()
    assert json.loads(target.read_bytes())["model"] == "opus"
    assert (tmp_path / "dotfiles" / "claude-settings.json.ccmon-backup").read_bytes() == b'{"model": "opus"}'


@pytest.mark.parametrize("args, message", [
    (["--undo", "--replace-status-line"], "ccmon setup: argument --replace-status-line: not allowed with argument "
     "--undo (see ccmon setup --help)\n"),
    (["--dryrun"], "ccmon setup: unknown option --dryrun; did you mean --dry-run? (see ccmon setup --help)\n"),
    (["--monitor-server", "team-box"], "ccmon: config error: --monitor-server: invalid address 'team-box' (use "
     "HOST:PORT such as 127.0.0.1:4317)\n"),
    (["--agent", "cursor"], "ccmon setup: argument --agent: unknown agent 'cursor' (known: claude-code, gemini-cli, "
     "codex, qwen-code) (see ccmon setup --help)\n"),
    (["--agent", "gemini", "--replace-status-line"], "ccmon setup: --replace-status-line is for Claude Code's status "
     "line (not with --agent gemini-cli) (see ccmon setup --help)\n"),
])
def test_setup_refuses_bad_flags(setup_home, capsys, args, message):
    try:
        code = ccmon.main(["setup", *args])
    except SystemExit as exc:
        code = exc.code
    assert (code, capsys.readouterr().err) == (2, message)
    assert not (setup_home / ".claude").exists()


# ---------------------------------------------------------------- setup --agent: Gemini CLI, Qwen Code, Codex CLI

# A Gemini CLI or Qwen Code settings.json as the real-CLI tests write it, with telemetry of the user's own.
AGENT_SETTINGS_ORIGINAL = (b'{\n  "general": {"enableAutoUpdate": false},\n  "privacy": {"usageStatisticsEnabled": '
                           b'false},\n  "telemetry": {"enabled": false, "logPrompts": true, "outfile": "/tmp/t.log"},'
                           b'\n  "ui": {"theme": "GitHub"}\n}\n')
# ccmon's telemetry entries, as the real-CLI tests export to a server (gRPC, target local).
AGENT_TELEMETRY = {"enabled": True, "target": "local", "otlpEndpoint": "http://127.0.0.1:4317", "otlpProtocol": "grpc"}
AGENT_TELEMETRY_LINES = ["set telemetry.enabled = true (was: false)", 'set telemetry.target = "local"',
                         'set telemetry.otlpEndpoint = "http://127.0.0.1:4317"', 'set telemetry.otlpProtocol = "grpc"',
                         'removed telemetry.outfile (was: "/tmp/t.log"): with it the telemetry goes to that file, '
                         "not to ccmon"]
AGENT_SETTINGS = {"gemini": (".gemini/settings.json", "Gemini CLI"), "qwen": (".qwen/settings.json", "Qwen Code")}
CODEX_ORIGINAL = textwrap.dedent('''\
    # Codex, offline against the stand-in
    model = "gpt-5.5"  # a slug in the catalogue
    notes = """
    [otel]
    exporter = "none"
    """

    [model_providers.standin]
    name = "Stand-in Responses API"
    base_url = "http://127.0.0.1:18081/v1"

    [otel]
    log_user_prompt = true  # prompts in the clear
    exporter = "none"
    # metrics went to another collector
    [otel.metrics_exporter.otlp-http]
    endpoint = "https://collector.example/v1/metrics"
    protocol = "binary"

    [otel.trace_exporter.otlp-grpc]
    endpoint = "http://127.0.0.1:14317"

    [analytics]
    enabled = false
    ''').encode()
# The exporter as the real-CLI tests write it for gRPC (run_agent_cli), to ccmon's default server.
CODEX_EXPORTER_TEXT = '{ otlp-grpc = { endpoint = "http://127.0.0.1:4317" } }'
CODEX_EXPORTER = {"otlp-grpc": {"endpoint": "http://127.0.0.1:4317"}}


def agent_file(home: Path, relative: str, content: bytes) -> Path:
    path = home / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def wrote(path: Path, agent: str) -> str:
    """What setup --agent says it wrote: the undo named with the agent's word (gemini, qwen, codex)."""
    return f"wrote {path} (before ccmon: {path}.ccmon-backup; ccmon setup --agent {agent} --undo restores it)"


@pytest.mark.parametrize("agent", ["gemini", "qwen"])
def test_setup_agent_writes_the_tools_telemetry_block_and_keeps_every_other_key(setup_home, capsys, agent):
    relative, tool = AGENT_SETTINGS[agent]
    path = agent_file(setup_home, relative, AGENT_SETTINGS_ORIGINAL)
    assert ccmon_setup(capsys, "--agent", agent, "--dry-run") == \
        (0, [*(f"would {line}" for line in AGENT_TELEMETRY_LINES), f"nothing written (--dry-run): {path}"], "")
    assert path.read_bytes() == AGENT_SETTINGS_ORIGINAL and [p.name for p in path.parent.iterdir()] == ["settings.json"]
    assert ccmon_setup(capsys, "--agent", agent) == (0, [*AGENT_TELEMETRY_LINES, wrote(path, agent)], "")
    written = json.loads(path.read_bytes())
    assert list(written.items()) == [("general", {"enableAutoUpdate": False}),
                                     ("privacy", {"usageStatisticsEnabled": False}),
                                     ("telemetry", {"enabled": True, "logPrompts": True, **AGENT_TELEMETRY}),
                                     ("ui", {"theme": "GitHub"})]
    assert path.read_bytes() == (json.dumps(written, indent=2) + "\n").encode()
    assert (path.parent / "settings.json.ccmon-backup").read_bytes() == AGENT_SETTINGS_ORIGINAL
    assert ccmon_setup(capsys, "--agent", agent) == \
        (0, [f"nothing to change: {path} already points {tool} at ccmon (http://127.0.0.1:4317)"], "")
    assert ccmon_setup(capsys, "--agent", agent, "--undo") == (0, [f"restored {path} as it was before ccmon setup"], "")
    assert path.read_bytes() == AGENT_SETTINGS_ORIGINAL
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]
    assert not (setup_home / ".claude").exists()  # Claude Code's settings are not touched


@pytest.mark.parametrize("agent", ["gemini-cli", "qwen-code"])
def test_setup_agent_creates_the_tools_settings_and_undo_removes_them(setup_home, capsys, agent):
    path = setup_home / AGENT_SETTINGS[agent.split("-")[0]][0]
    assert ccmon_setup(capsys, "--agent", agent) == (0, ["set telemetry.enabled = true", *AGENT_TELEMETRY_LINES[1:4],
                                                         wrote(path, agent.split("-")[0])], "")
    assert json.loads(path.read_bytes()) == {"telemetry": AGENT_TELEMETRY}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ccmon_setup(capsys, "--agent", agent, "--undo") == \
        (0, [f"restored {path} as it was before ccmon setup (there was none)"], "")
    assert list(path.parent.iterdir()) == []


def test_setup_agent_undo_keeps_what_the_user_changed_since(setup_home, capsys):
    path = agent_file(setup_home, ".gemini/settings.json", AGENT_SETTINGS_ORIGINAL)
    ccmon_setup(capsys, "--agent", "gemini")
    edited = json.loads(path.read_bytes())
    edited["model"] = {"name": "gemini-2.5-flash"}
    edited["telemetry"]["traces"] = True
    path.write_text(json.dumps(edited))
    assert ccmon_setup(capsys, "--agent", "gemini", "--undo") == (0, [
        f"restored ccmon's entries in {path} as they were before ccmon setup; other changes since are kept"], "")
    assert json.loads(path.read_bytes()) == {
        **json.loads(AGENT_SETTINGS_ORIGINAL), "model": {"name": "gemini-2.5-flash"},
        "telemetry": {"logPrompts": True, "traces": True, "enabled": False, "outfile": "/tmp/t.log"}}


def test_setup_agent_takes_the_tools_own_folder_variables(setup_home, tmp_path, capsys, monkeypatch):
    """Gemini CLI's GEMINI_CLI_HOME stands for the home folder; Qwen Code's QWEN_HOME and Codex's CODEX_HOME
    for the tool's folder (as Gemini CLI 0.61.0 and Qwen Code 0.24.4 read them; Codex as the notes say)."""
    monkeypatch.setenv("GEMINI_CLI_HOME", str(tmp_path / "g"))
    monkeypatch.setenv("QWEN_HOME", str(tmp_path / "q"))
    monkeypatch.setenv("CODEX_HOME", str(tmp_path / "c"))
    for agent in ("gemini", "qwen", "codex"):
        assert ccmon_setup(capsys, "--agent", agent)[0] == 0
    assert json.loads((tmp_path / "g" / ".gemini" / "settings.json").read_bytes()) == {"telemetry": AGENT_TELEMETRY}
    assert json.loads((tmp_path / "q" / "settings.json").read_bytes()) == {"telemetry": AGENT_TELEMETRY}
    assert tomllib.loads((tmp_path / "c" / "config.toml").read_text()) == \
        {"otel": {"exporter": CODEX_EXPORTER, "metrics_exporter": CODEX_EXPORTER}}
    assert list(setup_home.iterdir()) == []


def test_setup_agent_codex_writes_its_otel_exporters_and_keeps_every_other_line(setup_home, capsys):
    path = agent_file(setup_home, ".codex/config.toml", CODEX_ORIGINAL)
    lines = [f'set otel.exporter = {CODEX_EXPORTER_TEXT} (was: "none")',
             f"set otel.metrics_exporter = {CODEX_EXPORTER_TEXT} (was: {{ otlp-http = {{ endpoint = "
             '"https://collector.example/v1/metrics", protocol = "binary" } })']
    assert ccmon_setup(capsys, "--agent", "codex", "--dry-run") == \
        (0, [f"would {line}" for line in lines] + [f"nothing written (--dry-run): {path}"], "")
    assert path.read_bytes() == CODEX_ORIGINAL and [p.name for p in path.parent.iterdir()] == ["config.toml"]
    assert ccmon_setup(capsys, "--agent", "codex") == (0, [*lines, wrote(path, "codex")], "")
    assert path.read_text() == CODEX_ORIGINAL.decode().replace(
        'exporter = "none"\n# metrics went to another collector\n[otel.metrics_exporter.otlp-http]\n'
        'endpoint = "https://collector.example/v1/metrics"\nprotocol = "binary"\n',
        f"exporter = {CODEX_EXPORTER_TEXT}\nmetrics_exporter = {CODEX_EXPORTER_TEXT}\n"
        "# metrics went to another collector\n")
    original = tomllib.loads(CODEX_ORIGINAL.decode())
    assert tomllib.loads(path.read_text()) == {**original, "otel": {
        "log_user_prompt": True, "exporter": CODEX_EXPORTER, "metrics_exporter": CODEX_EXPORTER,
        "trace_exporter": original["otel"]["trace_exporter"]}}
    assert (path.parent / "config.toml.ccmon-backup").read_bytes() == CODEX_ORIGINAL
    assert ccmon_setup(capsys, "--agent", "codex") == \
        (0, [f"nothing to change: {path} already points Codex CLI at ccmon (http://127.0.0.1:4317)"], "")
    assert ccmon_setup(capsys, "--agent", "codex", "--undo", "--dry-run") == \
        (0, [f"would restore {path} as it was before ccmon setup"], "")
    assert ccmon_setup(capsys, "--agent", "codex", "--undo") == \
        (0, [f"restored {path} as it was before ccmon setup"], "")
    assert path.read_bytes() == CODEX_ORIGINAL
    assert [p.name for p in path.parent.iterdir()] == ["config.toml"]


def test_setup_agent_codex_undo_keeps_what_the_user_changed_since(setup_home, capsys):
    path = agent_file(setup_home, ".codex/config.toml", CODEX_ORIGINAL)
    ccmon_setup(capsys, "--agent", "codex")
    path.write_text(path.read_text().replace("[analytics]\n", '[analytics]\nmode = "off"\n'))
    assert ccmon_setup(capsys, "--agent", "codex", "--undo") == (0, [
        f"restored ccmon's entries in {path} as they were before ccmon setup; other changes since are kept"], "")
    original = tomllib.loads(CODEX_ORIGINAL.decode())
    assert tomllib.loads(path.read_text()) == {**original, "analytics": {"enabled": False, "mode": "off"}}
    assert path.read_text().startswith(CODEX_ORIGINAL.decode().split("[otel]\nlog_user")[0])  # comments kept


@pytest.mark.parametrize("content, written", [
    ("", f"[otel]\nexporter = {CODEX_EXPORTER_TEXT}\nmetrics_exporter = {CODEX_EXPORTER_TEXT}\n"),
    ('model = "gpt-5.5"', f'model = "gpt-5.5"\n\n[otel]\nexporter = {CODEX_EXPORTER_TEXT}\n'
                          f"metrics_exporter = {CODEX_EXPORTER_TEXT}\n"),  # no newline at the end
    # dotted keys of otel at the top take no [otel] after them
    ('otel.environment = "dev"\notel.exporter.otlp-http.endpoint = "http://x/v1/logs"\n[a]\nb = 1\n',
     f'otel.environment = "dev"\notel.exporter = {CODEX_EXPORTER_TEXT}\notel.metrics_exporter = {CODEX_EXPORTER_TEXT}'
     "\n[a]\nb = 1\n"),
    # only what differs is written; a subtable of otel is kept, and [otel] may follow it
    (f'[otel.trace_exporter]\notlp-grpc = {{ endpoint = "http://t:4317" }}\n[otel]\nexporter = {CODEX_EXPORTER_TEXT}'
     "\n'metrics_exporter' = 'statsig'  # OpenAI's\n",
     f'[otel.trace_exporter]\notlp-grpc = {{ endpoint = "http://t:4317" }}\n[otel]\nexporter = {CODEX_EXPORTER_TEXT}'
     f"\nmetrics_exporter = {CODEX_EXPORTER_TEXT}\n"),
    # an array over lines, a multi-line literal string with a header in it
    ("[otel]\nenvironment = [\n  'a', # [x]\n  \"b]\",\n]\nexporter.otlp-grpc.endpoint = \"http://old:1\"\n"
     "x = '''\n[otel.exporter]\n'''\n",
     "[otel]\nenvironment = [\n  'a', # [x]\n  \"b]\",\n]\nx = '''\n[otel.exporter]\n'''\n"
     f"exporter = {CODEX_EXPORTER_TEXT}\nmetrics_exporter = {CODEX_EXPORTER_TEXT}\n"),
])
def test_setup_agent_codex_edits_otel_however_it_is_written(setup_home, capsys, content, written):
    path = agent_file(setup_home, ".codex/config.toml", content.encode())
    assert ccmon_setup(capsys, "--agent", "codex")[0] == 0
    assert path.read_text() == written
    assert ccmon_setup(capsys, "--agent", "codex")[1][0].startswith("nothing to change")
    assert ccmon_setup(capsys, "--agent", "codex", "--undo")[0] == 0
    assert (path.read_bytes() == content.encode()) if content else not path.exists()  # an empty backup: no file


def test_setup_agent_with_a_token_writes_it_where_the_tool_takes_headers(setup_home, capsys):
    """Codex sends gRPC metadata from its config; Gemini CLI's and Qwen Code's settings hold no headers: the
    output says what to set instead, the token kept off the terminal."""
    token = ("--monitor-server", "https://team-box:4317", "--monitor-token", "s3cret&t0ken")
    code, lines, err = ccmon_setup(capsys, "--agent", "codex", *token)
    exporter = {"otlp-grpc": {"endpoint": "https://team-box:4317", "headers": {"authorization": "Bearer s3cret&t0ken"}}}
    path = setup_home / ".codex" / "config.toml"
    assert (code, err) == (0, "") and tomllib.loads(path.read_text()) == \
        {"otel": {"exporter": exporter, "metrics_exporter": exporter}}
    text = '{ otlp-grpc = { endpoint = "https://team-box:4317", headers = { authorization = "Bearer <token>" } } }'
    assert lines == [f"set otel.exporter = {text}", f"set otel.metrics_exporter = {text}", wrote(path, "codex")]
    for agent, command in (("gemini", "gemini"), ("qwen", "qwen")):
        relative, tool = AGENT_SETTINGS[agent]
        code, lines, err = ccmon_setup(capsys, "--agent", agent, *token)
        assert json.loads((setup_home / relative).read_bytes()) == \
            {"telemetry": {**AGENT_TELEMETRY, "otlpEndpoint": "https://team-box:4317"}}
        assert (code, err, lines[-2]) == (0, "", f"the server wants a token, which {tool}'s settings cannot hold: run "
                                          f"{command} with OTEL_EXPORTER_OTLP_HEADERS='Authorization=Bearer <token>' "
                                          "in its environment (your shell's profile), or the server refuses its "
                                          "telemetry")
        assert "s3cret" not in "".join(lines)


def test_setup_agent_says_which_variables_here_would_win_over_the_file(setup_home, capsys, monkeypatch):
    monkeypatch.setenv("QWEN_TELEMETRY_OTLP_PROTOCOL", "http")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("GEMINI_TELEMETRY_TARGET", "gcp")  # Gemini CLI's, not Qwen Code's
    code, lines, _ = ccmon_setup(capsys, "--agent", "qwen")
    assert code == 0 and lines[4:6] == [
        "QWEN_TELEMETRY_OTLP_PROTOCOL is set here (http): Qwen Code takes it over its settings file",
        "OTEL_EXPORTER_OTLP_ENDPOINT is set here (http://127.0.0.1:4318): Qwen Code takes it over its settings file"]
    assert ccmon_setup(capsys, "--agent", "gemini")[1][4:6] == [
        "GEMINI_TELEMETRY_TARGET is set here (gcp): Gemini CLI takes it over its settings file",
        "OTEL_EXPORTER_OTLP_ENDPOINT is set here (http://127.0.0.1:4318): Gemini CLI takes it over its settings file"]


@pytest.mark.parametrize("relative, content, message", [
    (".gemini/settings.json", b'{\n  // mine\n}', "line 2: not valid JSON (Expecting property name enclosed in "
     "double quotes)"),
    (".gemini/settings.json", b'\n[]', "line 2: not a JSON object (Gemini CLI's settings are one {...})"),
    (".gemini/settings.json", b'{"telemetry": true}', ': "telemetry" is not a JSON object (Gemini CLI\'s telemetry '
     'is {"enabled": true, ...})'),
    (".qwen/settings.json", b'{"telemetry": []}', ': "telemetry" is not a JSON object (Qwen Code\'s telemetry is '
     '{"enabled": true, ...})'),
    (".qwen/settings.json", b'"settings"', "line 1: not a JSON object (Qwen Code's settings are one {...})"),
    (".qwen/settings.json", b'{"ui": "caf\xe9"}', "line 1: not UTF-8 text"),
    (".codex/config.toml", b'model = "gpt-5.5"\n[otel\n', "line 2: not valid TOML (Expected ']' at the end of a "
     "table declaration)"),
    (".codex/config.toml", b"a = [1,\n", ": not valid TOML (Invalid value at the end)"),
    (".codex/config.toml", b'otel = "on"\n', ': "otel" is not a table (Codex CLI\'s [otel] is a table of exporter '
     "settings)"),
    (".codex/config.toml", b"[[otel]]\n", ': "otel" is not a table (Codex CLI\'s [otel] is a table of exporter '
     "settings)"),
    (".codex/config.toml", b'otel = { environment = "dev" }\n', ": otel is an inline table (otel = {...}); write "
     "it as an [otel] table for ccmon setup to edit"),
    (".codex/config.toml", b'x = "\xff"\n', "line 1: not UTF-8 text"),
])
def test_setup_agent_leaves_a_file_it_cannot_read_as_it_is(setup_home, capsys, relative, content, message):
    path = agent_file(setup_home, relative, content)
    agent = relative.split("/")[0].strip(".")
    separator = "" if message.startswith(":") else " "
    assert ccmon_setup(capsys, "--agent", agent) == (1, [], f"ccmon setup: {path}{separator}{message}; left as it is\n")
    assert path.read_bytes() == content
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@pytest.mark.parametrize("agent", ["gemini", "codex"])
def test_setup_agent_says_when_it_cannot_read_the_file(setup_home, capsys, agent):
    path = setup_home / {"gemini": ".gemini/settings.json", "codex": ".codex/config.toml"}[agent]
    path.mkdir(parents=True)
    assert ccmon_setup(capsys, "--agent", agent) == (1, [], f"ccmon setup: cannot read {path}: Is a directory; left "
                                                            "as it is\n")


def test_setup_agent_undo_leaves_a_file_it_cannot_read_as_it_is(setup_home, capsys):
    path = agent_file(setup_home, ".codex/config.toml", CODEX_ORIGINAL)
    ccmon_setup(capsys, "--agent", "codex")
    path.write_bytes(b"[otel\n")
    assert ccmon_setup(capsys, "--agent", "codex", "--undo") == \
        (1, [], f"ccmon setup: {path} line 1: not valid TOML (Expected ']' at the end of a table declaration); left "
                "as it is\n")
    assert path.read_bytes() == b"[otel\n"
    assert (path.parent / "config.toml.ccmon-backup").read_bytes() == CODEX_ORIGINAL


def test_setup_agent_refuses_an_edit_that_would_change_another_key(setup_home, capsys, monkeypatch):
    """The edited text is read back: anything but ccmon's keys changed (here, a line taken out that was not
    ccmon's) and nothing is written."""
    path = agent_file(setup_home, ".codex/config.toml", b'[otel]\nenvironment = "dev"\n')
    monkeypatch.setattr(ccmon, "toml_with_entries", lambda *args: "[otel]\n")
    assert ccmon_setup(capsys, "--agent", "codex") == (1, [], (
        f"ccmon setup: {path}: ccmon setup cannot rewrite its [otel] table as it is written and keep every other key "
        "(set otel.exporter and otel.metrics_exporter by hand: see ccmon's docs/setup.md); left as it is\n"))
    assert path.read_bytes() == b'[otel]\nenvironment = "dev"\n'

# ---------------------------------------------------------------- doctor: ccmon doctor

def doctor(home: Path, *args: str) -> tuple[int, list[tuple[str, str, str]], list[dict]]:
    """(exit code, (status, link, message) per check, receiver counts) of `ccmon doctor --json ARGS` in HOME."""
    result = run_ccmon(["doctor", "--json", *args], home)
    assert result.stderr == "", result.stderr
    answer = json.loads(result.stdout)
    checks = [(check["status"], check["link"], check["message"]) for check in answer["checks"]]
    assert answer["ok"] == (result.returncode == 0) == all(status == "ok" for status, _, _ in checks)
    return result.returncode, checks, answer["received"]


def failing(checks: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [check for check in checks if check[0] != "ok"]


def edit_settings(home: Path, change: Callable[[dict], None]) -> None:
    path = home / ".claude" / "settings.json"
    settings = json.loads(path.read_text())
    change(settings)
    path.write_text(json.dumps(settings))


@pytest.fixture
def doctor_home(tmp_path, monkeypatch) -> tuple[Path, int]:
    """A HOME with a local server's config (a free port, a token, no OTLP/HTTP) and none of Claude Code's or
    ccmon's variables in the environment; its servers stopped at the end."""
    for name in ("CLAUDE_CONFIG_DIR", "CCMON_TOKEN", *ccmon.TELEMETRY_ENV_KEYS):
        monkeypatch.delenv(name, raising=False)
    home, port = local_home(tmp_path, 'token = "s3cret"\n')
    yield home, port
    stop_local_servers(home)


def test_doctor_turns_each_link_red_when_broken_and_green_when_fixed(doctor_home):
    home, port = doctor_home
    settings = home / ".claude" / "settings.json"
    code, checks, received = doctor(home)
    pid = pid_file(home)["pid"]
    assert (code, received) == (1, [])
    assert checks == [
        ("ok", "config", f"{home}/.ccmon/config.toml is valid"),
        ("ok", "server", checks[1][2]),
        ("fail", "telemetry", "off: CLAUDE_CODE_ENABLE_TELEMETRY is unset; run ccmon setup, then restart Claude Code"),
        ("fail", "status line", f"not set in {settings}: run ccmon setup"),
        ("ok", "transcripts", f"none under {home}/.claude/projects or {home}/.config/claude/projects")]
    assert re.fullmatch(rf"ccmon {ccmon.VERSION} at 127\.0\.0\.1:{port} \(local server started, pid {pid}\), up "
                        rf"\S+, database {home}/\.ccmon/ccmon\.db \(the default\)", checks[1][2]), checks[1][2]

    assert run_ccmon(["setup"], home).returncode == 0
    code, checks, _ = doctor(home)
    assert code == 1 and failing(checks) == [
        ("fail", "received grpc", "nothing yet; once the settings above hold, restart Claude Code and use it")]
    assert checks[2:5] == [("ok", "telemetry", f"on ({settings})"),
                           ("ok", "exporter", f"grpc to http://127.0.0.1:{port}, this server"),
                           ("ok", "token", "Claude Code sends the server's token")]
    assert checks[6] == ("ok", "status line", "ccmon's; no reading yet (one comes each time Claude Code draws it)")

    # Claude Code's telemetry and a status line reading arrive: every link holds
    when = hours_ago(0.01)
    assert sdk_export(port, [("api_request", api_request(1, when)), ("api_request", api_request(2, when))],
                      headers={"authorization": "Bearer s3cret"}) == ["SUCCESS"]
    line = subprocess.run([*CCMON, "statusline", "--format", "@model"], input=json.dumps(live_input("s-doc")),
                          capture_output=True, text=True, cwd=home, timeout=30, env={**os.environ, "HOME": str(home)})
    assert (line.returncode, line.stdout, line.stderr) == (0, "Sonnet 4.5\n", "")
    code, checks, received = doctor(home)
    assert code == 0, checks
    last = received[0]["last_ms"]
    assert received == [{"protocol": "grpc", "signal": "logs", "last_ms": last, "accepted": 2, "rejected": 0}]
    received_at = dt.datetime.fromtimestamp(last / 1000, dt.timezone.utc)
    assert checks[5:7] == [
        ("ok", "received grpc", f"last just now ({received_at:%Y-%m-%d %H:%M:%S} UTC), 2 records accepted"),
        ("ok", "status line", "ccmon's; last reading just now, with Claude's limits (a subscription)")]
    text = run_ccmon(["doctor"], home)
    assert text.returncode == 0
    uptime = re.compile(r", up \S+, ")  # it went on between the two
    assert [uptime.sub(", up T, ", line) for line in text.stdout.splitlines()] == \
        [uptime.sub(", up T, ", f"ok   {link:<13}  {message}") for _, link, message in checks]

    # each link broken, then fixed by ccmon setup
    breaks = [
        (lambda s: s["env"].update(CLAUDE_CODE_ENABLE_TELEMETRY="0"),
         ("fail", "telemetry", f"off: CLAUDE_CODE_ENABLE_TELEMETRY is 0 ({settings}); run ccmon setup, then restart "
                               "Claude Code")),
        (lambda s: s["env"].update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://localhost:{port + 1}"),
         ("fail", "exporter", f"grpc to http://localhost:{port + 1} ({settings}): it sends to localhost:{port + 1}, "
                              f"not to this server's 127.0.0.1:{port}; run ccmon setup")),
        (lambda s: s["env"].update(OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer guess"),
         ("fail", "token", f"Claude Code sends another token than the server's ({settings}): run ccmon setup")),
        (lambda s: s["env"].pop("OTEL_EXPORTER_OTLP_HEADERS"),
         ("fail", "token", "the server has a token; Claude Code sends none (OTEL_EXPORTER_OTLP_HEADERS): run ccmon "
                           "setup")),
        (lambda s: s.pop("statusLine"), ("fail", "status line", f"not set in {settings}: run ccmon setup")),
        (lambda s: s.update(statusLine={"type": "command", "command": "starship prompt"}),
         ("fail", "status line", f"{settings} runs another status line: ccmon setup --replace-status-line makes it "
                                 "ccmon's")),
    ]
    for change, broken in breaks:
        edit_settings(home, change)
        code, checks, _ = doctor(home)
        assert (code, failing(checks)) == (1, [broken])
        assert run_ccmon(["setup", "--replace-status-line"], home).returncode == 0
        assert doctor(home)[0] == 0, broken

    # the server stopped: red when it may not be started; started again by doctor, what it received is kept
    assert run_ccmon(["server", "stop"], home).returncode == 0
    code, checks, _ = doctor(home, "--monitor-autostart", "false")
    assert (code, checks) == (1, [
        ("ok", "config", f"{home}/.ccmon/config.toml is valid"),
        ("fail", "server", f"cannot reach 127.0.0.1:{port}: connection refused; start it: ccmon --server, or turn "
                           "monitor.autostart on")])
    code, checks, received = doctor(home)
    assert code == 0 and f"(local server started, pid {pid_file(home)['pid']})" in checks[1][2]
    assert received == [{"protocol": "grpc", "signal": "logs", "last_ms": last, "accepted": 2, "rejected": 0}]


def test_doctor_warns_when_transcripts_are_newer_than_the_telemetry(doctor_home):
    home, port = doctor_home
    assert run_ccmon(["setup"], home).returncode == 0
    project = home / ".claude" / "projects" / "-home-dev-proj"
    project.mkdir(parents=True)
    minutes_ago = [(dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=m)).isoformat(timespec="milliseconds")
                   .replace("+00:00", "Z") for m in (20, 10)]
    (project / "s-t.jsonl").write_text("".join(transcript_line("s-t", when, f"req_t{i}", f"msg_t{i}") + "\n"
                                               for i, when in enumerate(minutes_ago)))
    code, checks, _ = doctor(home)
    assert (code, failing(checks)) == (1, [
        ("fail", "received grpc", "nothing yet; once the settings above hold, restart Claude Code and use it"),
        ("warn", "transcripts", "1 file, newest entry 10 min ago, no telemetry: telemetry is not arriving; history "
                                "is being filled from transcripts. Likely: Claude Code was started before ccmon setup "
                                "(restart it), its environment or a project's .claude/settings.json overrides the "
                                "exporter, the server was down or unreachable from Claude Code, or this Claude Code "
                                "release does not export")])
    assert sdk_export(port, [("api_request", api_request(1, minutes_ago[1]))],
                      headers={"authorization": "Bearer s3cret"}) == ["SUCCESS"]
    code, checks, _ = doctor(home)
    assert (code, checks[-1]) == (0, ("ok", "transcripts", "1 file, read by this server; newest entry 10 min ago, "
                                                           "newest telemetry just now"))


def test_doctor_names_the_other_agents_histories_and_whether_the_server_reads_them(doctor_home):
    home, port = doctor_home
    assert run_ccmon(["setup"], home).returncode == 0
    _, before, _ = doctor(home)  # (which starts the local server)
    assert not [check for check in before if check[1].endswith(" history")]  # none on this machine: no line
    assert sdk_export(port, [("api_request", api_request(1, hours_ago(0.1)))],
                      headers={"authorization": "Bearer s3cret"}) == ["SUCCESS"]
    rollouts = home / ".codex" / "sessions" / "2026" / "12" / "04"
    chats = home / ".gemini" / "tmp" / "abc123" / "chats"
    for folder, names in ((rollouts, ("rollout-1.jsonl", "rollout-2.jsonl")), (chats, ("session-1.jsonl",))):
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_text("")
    code, checks, _ = doctor(home)
    assert (code, checks[-2:]) == (0, [
        ("ok", "gemini-cli history", f"1 file under {home / '.gemini' / 'tmp'}, read by this server"),
        ("ok", "codex history", f"2 files under {home / '.codex' / 'sessions'}, read by this server")])
    named = json.loads(run_ccmon(["doctor", "--json", "--monitor-server", f"127.0.0.1:{port}"], home,
                                 env={"CCMON_TOKEN": "s3cret"}).stdout)["checks"][-1]
    assert (named["status"], named["link"], named["message"]) == ("ok", "codex history", f"2 files under {home / '.codex' / 'sessions'}, not read by this "
                                                "server (not the local one): ccmon import sends them")


def test_doctor_follows_the_environment_claude_code_inherits_and_a_named_server(doctor_home, tmp_path):
    """Values in the environment count where the settings file has none; a named server's OTLP/HTTP address is
    not known, and it does not read the local transcripts."""
    home, _ = doctor_home
    team = ServerProcess(tmp_path, "--server-token", "team").start()
    try:
        env = {"CLAUDE_CODE_ENABLE_TELEMETRY": "1", "OTEL_LOGS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL":
               "http/protobuf", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{team.http_port}",
               "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20team", "CCMON_TOKEN": "team"}
        result = run_ccmon(["doctor", "--json", "--monitor-server", team.target], home, env=env)
        checks = [(c["status"], c["link"], c["message"]) for c in json.loads(result.stdout)["checks"]]
        assert result.returncode == 1
        assert checks[1][2].startswith(f"ccmon {ccmon.VERSION} at {team.target} (local), up ")
        assert checks[1][2].endswith(f", database {tmp_path}/ccmon.db")
        assert checks[2:6] == [
            ("ok", "telemetry", "on (the environment)"),
            ("warn", "exporter", f"http/protobuf to http://127.0.0.1:{team.http_port}: this server's OTLP/HTTP "
                                 "address is not known here (--server-http-address), so not checked"),
            ("ok", "token", "Claude Code sends the server's token"),
            ("fail", "received http/protobuf", "nothing yet; once the settings above hold, restart Claude Code and "
                                               "use it")]
    finally:
        team.stop()


def test_doctor_checks_an_http_exporter_against_the_local_servers_otlp_http_address(doctor_home):
    home, port = doctor_home
    assert run_ccmon(["setup"], home).returncode == 0
    edit_settings(home, lambda s: s["env"].update(OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                                                  OTEL_EXPORTER_OTLP_ENDPOINT="http://localhost:4318"))
    code, checks, _ = doctor(home)
    assert code == 1 and checks[3] == ("fail", "exporter", "http/protobuf to http://localhost:4318: this server does "
                                                           "not take OTLP/HTTP (server.http_address is off); run ccmon "
                                                           "setup (it writes grpc)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    config = home / ".ccmon" / "config.toml"
    config.write_text(config.read_text().replace('http_address = "off"', f'http_address = "127.0.0.1:{http_port}"'))
    assert run_ccmon(["server", "stop"], home).returncode == 0
    code, checks, _ = doctor(home)  # started again, with OTLP/HTTP on
    assert checks[3] == ("fail", "exporter", f"http/protobuf to http://localhost:4318 ({home}/.claude/settings.json): "
                                             f"it sends to localhost:4318, not to this server's 127.0.0.1:{http_port}; "
                                             "run ccmon setup")
    edit_settings(home, lambda s: s["env"].update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://localhost:{http_port}"))
    assert sdk_export(http_port, [("api_request", api_request(1, hours_ago(0.01)))], protocol="http/protobuf",
                      headers={"authorization": "Bearer s3cret"}) == ["SUCCESS"]
    code, checks, _ = doctor(home)
    assert (code, checks[3], checks[5][:2]) == (0, ("ok", "exporter", f"http/protobuf to http://localhost:{http_port}, "
                                                                      "this server"), ("ok", "received http/protobuf"))


def test_doctor_reports_a_bad_config_or_settings_file_and_refuses_bad_flags(doctor_home):
    home, _ = doctor_home
    config = home / ".ccmon" / "config.toml"
    good = config.read_text()
    config.write_text(good + "[monitor]\nrefresh_interval = \"forever\"\n")
    code, checks, _ = doctor(home)
    assert (code, checks) == (1, [("fail", "config", checks[0][2])])
    assert checks[0][2].startswith(f"{config}: monitor.refresh_interval")
    config.write_text(good)
    settings = home / ".claude" / "settings.json"
    settings.parent.mkdir()
    settings.write_text('{\n  "env": {\n')
    code, checks, _ = doctor(home)
    assert (code, checks[2:]) == (1, [("fail", "claude settings", f"{settings} line 3: not valid JSON (Expecting "
                                       "property name enclosed in double quotes); fix it, then run ccmon setup")])
    for args, message in ((["--jsn"], "ccmon doctor: unknown option --jsn; did you mean --json? (see ccmon doctor "
                                      "--help)\n"),
                          (["now"], "ccmon doctor: unrecognized arguments: now (see ccmon doctor --help)\n")):
        result = run_ccmon(["doctor", *args], home)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", message), args
    flag = run_ccmon(["doctor", "--monitor-server", "team-box"], home)  # a link of its own, as a file's error is
    assert (flag.returncode, flag.stdout) == (1, "FAIL config  --monitor-server: invalid address 'team-box' (use "
                                                 "HOST:PORT such as 127.0.0.1:4317)\n")


def test_receiver_counts_per_protocol_are_cumulative_and_durable(tmp_path):
    """One upsert per export, per protocol and signal: records accepted (duplicates too) and rejected, and when a
    record was last accepted; they survive a restart and only ever grow."""
    srv = ServerProcess(tmp_path).start()
    when = hours_ago(1)
    good = [("api_request", api_request(seq, when)) for seq in range(1, 4)]
    bad = [("api_request", api_request(9, when, output_tokens=-4))]
    before = ccmon.now_ms()
    assert sdk_export(srv.port, good + bad) == ["SUCCESS"]
    assert sdk_export(srv.http_port, good, protocol="http/protobuf") == ["SUCCESS"]  # duplicates: accepted
    from google.protobuf import json_format
    response, _ = http_post(srv.http_port, body=json_format.MessageToJson(logs_request(bad)).encode(),
                            headers={"Content-Type": "application/json"})  # rejected only: no time of acceptance
    assert response.status == 200
    after = ccmon.now_ms()

    def counts():
        info = srv.query().GetServerInfo(ccmon_pb2.GetServerInfoRequest())
        return [ccmon.receiver_counts_of(message) for message in info.receivers]
    first = counts()
    assert [dataclasses.replace(c, last_ms=None) for c in first] == [
        ccmon.ReceiverCounts("grpc", "logs", None, 3, 1), ccmon.ReceiverCounts("http/json", "logs", None, 0, 1),
        ccmon.ReceiverCounts("http/protobuf", "logs", None, 3, 0)]
    assert before <= first[0].last_ms <= first[2].last_ms <= after and first[1].last_ms is None
    assert srv.stop() == 0
    srv.start()
    assert counts() == first
    assert sdk_export(srv.port, good) == ["SUCCESS"]
    assert [(c.protocol, c.accepted, c.rejected) for c in counts()] == [("grpc", 6, 1), ("http/json", 0, 1),
                                                                        ("http/protobuf", 3, 0)]
    info = srv.query().GetServerInfo(ccmon_pb2.GetServerInfoRequest())
    assert (info.database_path, info.default_database) == (str(tmp_path / "ccmon.db"), False)
    srv.stop()


# ---------------------------------------------------------------- a real Claude Code: telemetry, transcripts, status line

# Claude Code itself (the npm package, a native binary) runs offline against fixtures/mock_anthropic.py, a
# stand-in Anthropic API: in `-p` mode with run_claude_print(), interactively in tmux with ClaudeTmux. Each test
# gives it a fresh HOME under tmp_path. Notes on what it sends: notes/claude-code-sources.md in ../shared.

CLAUDE_CODE_VERSION = "2.1.328"


TEST_API_KEY = "sk-ant-api03-ccmon-tests-0123456789abcdefghijklmnop"


TEST_OAUTH_TOKEN = "sk-ant-oat01-ccmon-tests-0123456789abcdefghijklmnop"  # a subscriber: status line rate_limits


MOCK_REPLY = "Hello from the stand-in API."


MOCK_REQUEST_ID = re.compile(r"req_011CV[0-9a-f]{20}")  # the mock's request-id header


# The mock's usage per model family, and what Claude Code charges for it (its own cost_usd), in nano-dollars.
MOCK_USAGE = {"claude-sonnet-4-5": (1500, 250, 4000, 800, 12_450_000),
              "claude-haiku-4-5": (120, 30, 0, 0, 270_000)}


def wait_until(check, what: str, timeout: float = 60.0, interval: float = 0.1):
    """Poll `check` until it returns something truthy (which is returned); fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def at_least(count: int, rows: list) -> list:
    """`rows` once there are `count` of them (for wait_until), else nothing."""
    return rows if len(rows) >= count else []


@pytest.fixture(scope="session")
def claude_code() -> Path:
    """The `claude` executable of @anthropic-ai/claude-code at CLAUDE_CODE_VERSION, installed with npm once."""
    claude = npm_install_once("claude-code", {"@anthropic-ai/claude-code": CLAUDE_CODE_VERSION}) / \
        "node_modules" / ".bin" / "claude"
    version = subprocess.run([claude, "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith(f"{CLAUDE_CODE_VERSION} "), (version.stdout, version.stderr)
    return claude


class MockAnthropic:
    """fixtures/mock_anthropic.py on a free loopback port; `env` sets its options (RL_HEADERS=1, ...)."""

    def __init__(self, folder: Path, **env: str):
        self.folder, self.env = folder, env
        self.log_path = folder / "requests.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MockAnthropic":
        import urllib.request
        self.folder.mkdir(parents=True, exist_ok=True)
        port_file = self.folder / "port"
        with open(port_file, "w") as out, open(self.folder / "stderr", "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(FIXTURES / "mock_anthropic.py"), "0",
                                          str(self.log_path)], stdout=out, stderr=err, env={**os.environ, **self.env})

        def port():
            assert self.proc.poll() is None, f"mock_anthropic.py exited: {(self.folder / 'stderr').read_text()}"
            text = port_file.read_text()
            return int(text) if text.endswith("\n") else 0

        self.port = wait_until(port, "mock_anthropic.py to print its port", 30)

        def answers():
            try:
                with urllib.request.urlopen(f"{self.url}/api/oauth/profile", timeout=5) as reply:
                    return reply.status == 200
            except OSError:
                return False

        wait_until(answers, f"mock_anthropic.py to answer on port {self.port}", 30)
        self.log_path.write_text("")  # forget the readiness probe
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def calls(self) -> list[str]:
        """The model of every POST /v1/messages it answered, in order."""
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return re.findall(r" POST /v1/messages\S* .* model=(\S+) stream=", text)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def mock_anthropic(tmp_path):
    """Starts the stand-in Anthropic API: `mock_anthropic(RL_HEADERS="1", ...)`; each is stopped after the test."""
    started: list[MockAnthropic] = []

    def start(**env: str) -> MockAnthropic:
        started.append(MockAnthropic(tmp_path / f"mock-anthropic-{len(started)}", **env).start())
        return started[-1]

    yield start
    for mock in started:
        mock.stop()


def claude_home(home: Path, workdir: Path, settings: dict | None = None) -> Path:
    """A fresh HOME in which Claude Code starts without onboarding, trust or API-key questions, with
    `settings` as its ~/.claude/settings.json."""
    (home / ".claude").mkdir(parents=True, exist_ok=True)
    (home / "tmp").mkdir(exist_ok=True)
    (home / ".claude.json").write_text(json.dumps({
        "hasCompletedOnboarding": True, "theme": "dark", "numStartups": 1,
        "customApiKeyResponses": {"approved": [TEST_API_KEY[-20:]], "rejected": []},
        "projects": {str(workdir): {"hasTrustDialogAccepted": True, "allowedTools": []}}}))
    (home / ".claude" / "settings.json").write_text(json.dumps(settings or {}))
    return home


def claude_env(home: Path, api_port: int, env_extra: dict | None = None) -> dict[str, str]:
    """Claude Code's whole environment: nothing of the caller's (which may be a Claude Code session itself), the
    stand-in API, no update checks or other traffic, its temp files under HOME, and an API key unless
    `env_extra` signs in otherwise (CLAUDE_CODE_OAUTH_TOKEN: a subscriber)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
           "TMPDIR": str(home / "tmp"), "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{api_port}",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1"}
    if not {"CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN"} & set(env_extra or {}):
        env["ANTHROPIC_API_KEY"] = TEST_API_KEY
    return {**env, **(env_extra or {})}


def telemetry_env(srv: ServerProcess, protocol: str = "grpc") -> dict[str, str]:
    """What README's "Point Claude Code at it" sets, for `srv`, exporting events every second."""
    port = srv.port if protocol == "grpc" else srv.http_port
    return {"CLAUDE_CODE_ENABLE_TELEMETRY": "1", "OTEL_LOGS_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_LOGS_EXPORT_INTERVAL": "1000", "OTEL_METRIC_EXPORT_INTERVAL": "1000"}


def run_claude_print(claude: Path, api_port: int, workdir: Path, prompt: str, env_extra: dict | None = None, *,
                     home: Path | None = None, model: str = "claude-sonnet-4-5", timeout: float = 180) -> dict:
    """`claude -p PROMPT --output-format json` in `workdir` (HOME: `home`, default `workdir`/../home, made fresh
    when it has no .claude.json), Bash allowed so RUN_TOOL works; returns Claude Code's JSON result
    (`session_id`, `total_cost_usd`, `usage`, ...). Claude Code flushes its telemetry before it exits."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    home = home or workdir.parent / "home"
    if not (home / ".claude.json").exists():
        claude_home(home, workdir)
    try:
        result = subprocess.run([str(claude), "-p", prompt, "--model", model, "--output-format", "json",
                                 "--allowedTools", "Bash"], cwd=workdir, env=claude_env(home, api_port, env_extra),
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"claude -p {prompt!r} took over {timeout:.0f} s: {e.stdout!r} {e.stderr!r}")
    assert result.returncode == 0, f"claude -p {prompt!r} exited {result.returncode}: {result.stdout}{result.stderr}"
    return json.loads(result.stdout)


def claude_transcript(home: Path, session_id: str, timeout: float = 30) -> list[dict]:
    """The lines of the transcript Claude Code wrote for a session, ~/.claude/projects/<cwd>/<session id>.jsonl."""
    found = wait_until(lambda: list((home / ".claude" / "projects").glob(f"*/{session_id}.jsonl")),
                       f"the transcript of session {session_id} under {home}", timeout)
    assert len(found) == 1, found
    return [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()]


def transcript_requests(lines: list[dict]) -> dict[str, dict]:
    """requestId -> usage of the assistant lines (one API answer may be written as several lines)."""
    return {line["requestId"]: line["message"]["usage"] for line in lines if line.get("type") == "assistant"}


def status_capture_command(folder: Path, marker: str = "ccmon-test-status") -> tuple[str, Path]:
    """A statusLine command that appends its stdin (one JSON object a run) to a file and prints
    `MARKER #N`, N counting its runs; returns the command and the file."""
    folder.mkdir(parents=True, exist_ok=True)
    captured, script = folder / "statusline-stdin.jsonl", folder / "statusline.sh"
    script.write_text(f"#!/bin/sh\n{{ cat; echo; }} >> '{captured}'\necho \"{marker} #$(grep -c . '{captured}')\"\n")
    script.chmod(0o755)
    return str(script), captured


def status_inputs(captured: Path) -> list[dict]:
    """What the statusLine command got on stdin, one object a run (a line still being written is left out)."""
    text = captured.read_text() if captured.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


class ClaudeTmux:
    """A real interactive Claude Code in a detached 160x40 tmux session on a tmux server of its own, with a fresh
    HOME whose settings.json runs `status_command` as the statusLine:

        session = ClaudeTmux(claude_code, api.port, tmp_path / "project", tmp_path / "home", command).start("marker")
        screen = session.turn("say hello")     # waits for the stand-in API's reply on screen
        session.wait_for("text", "what it is")  # or a predicate on the captured pane
        assert session.exit() == 0              # /exit; the pane stays readable after it ends
    """

    def __init__(self, claude: Path, api_port: int, workdir: Path, home: Path, status_command: str,
                 env_extra: dict | None = None, model: str = "claude-sonnet-4-5"):
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home = claude_home(home, self.workdir, {"statusLine": {"type": "command", "command": status_command}})
        self.command = ["env", "-i", *(f"{k}={v}" for k, v in claude_env(home, api_port, {
            "TERM": "screen-256color", **(env_extra or {})}).items()), str(claude), "--model", model]
        # a tmux server of its own, its socket removed at close() (tmux leaves it behind)
        self.socket = Path(tempfile.gettempdir()) / f"ccmon-test-tmux-{os.getpid()}-{id(self):x}"
        self.started = False

    def tmux(self, *args: str, check: bool = True) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
        result = subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, env=env,
                                timeout=30)
        assert result.returncode == 0 or not check, f"tmux {' '.join(args)}: {result.stderr}"
        return result.stdout

    def start(self, status_marker: str, timeout: float = 90) -> "ClaudeTmux":
        """Start Claude Code and wait until its status line shows `status_marker`."""
        if not shutil.which("tmux"):
            pytest.fail("tmux is not installed (.ci/run installs it with apt-get when it is missing)")
        conf = self.home / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g status off\nset -g history-limit 20000\n")
        self.tmux("-f", str(conf), "new-session", "-d", "-s", "claude", "-x", "160", "-y", "40",
                  "-c", str(self.workdir), shlex.join(self.command))
        self.started = True
        self.wait_for(status_marker, "the status line", timeout)
        return self

    def screen(self, history: bool = False) -> str:
        """The pane as text (with its whole scrollback when `history`)."""
        return self.tmux("capture-pane", "-p", "-J", "-t", "claude", *(["-S", "-"] if history else []))

    def dead(self) -> tuple[bool, int]:
        dead, status = (self.tmux("display-message", "-p", "-t", "claude", "#{pane_dead} #{pane_dead_status}")
                        .split() + ["0"])[:2]
        return dead == "1", int(status or 0)

    def wait_for(self, expected, what: str, timeout: float = 60) -> str:
        """Wait until the pane contains `expected` (a string, or a predicate on the pane's text); returns it."""
        last = [""]

        def check():
            last[0] = self.screen()
            if (expected(last[0]) if callable(expected) else expected in last[0]):
                return last[0]
            assert not self.dead()[0], f"Claude Code ended while waiting for {what}:\n{last[0]}"
            return None

        try:
            return wait_until(check, what, timeout, interval=0.2)
        except AssertionError as error:
            raise AssertionError(f"{error}; the pane:\n{last[0]}") from None

    def send(self, text: str) -> None:
        self.tmux("send-keys", "-t", "claude", "-l", text)
        self.tmux("send-keys", "-t", "claude", "Enter")

    def turn(self, prompt: str, reply: str = MOCK_REPLY, timeout: float = 90) -> str:
        """Send a prompt and wait until one more `reply` is on screen (scrollback included); returns the pane."""
        before = self.screen(history=True).count(reply)
        self.send(prompt)
        self.wait_for(lambda _: self.screen(history=True).count(reply) > before, f"the answer to {prompt!r}",
                      timeout)
        return self.screen()

    def exit(self, timeout: float = 60) -> int:
        """/exit, wait until Claude Code has ended, and return its exit status."""
        self.send("/exit")
        wait_until(lambda: self.dead()[0], "Claude Code to exit after /exit", timeout, interval=0.2)
        return self.dead()[1]

    def close(self) -> None:
        if self.started:
            self.tmux("kill-server", check=False)
            self.started = False
        self.socket.unlink(missing_ok=True)


@e2e
def test_claude_code_print_mode_is_recorded_exactly_over_every_protocol(server, claude_code, mock_anthropic, tmp_path):
    """Claude Code in -p mode, telemetry on, exporting over each OTLP protocol to a real server: one api_request per
    model call with the stand-in API's usage, Claude Code's own cost and the API's request-id, the same requestId
    in Claude Code's transcript, and a tool call's tool_result event."""
    api = mock_anthropic()
    home, project = tmp_path / "home", tmp_path / "project"
    runs = [("grpc", "RUN_TOOL: print a word", "claude-sonnet-4-5", 2),
            ("http/protobuf", "say hello over protobuf", "claude-sonnet-4-5", 1),
            ("http/json", "say hello over json", "claude-sonnet-4-5", 1),
            ("http/json", "say hello with haiku", "claude-haiku-4-5", 1)]
    sessions = []
    for protocol, prompt, model, calls in runs:
        before = len(api.calls())
        result = run_claude_print(claude_code, api.port, project, prompt, telemetry_env(server, protocol), home=home,
                                  model=model)
        assert api.calls()[before:] == [model] * calls, (protocol, prompt)
        session, (i, o, cr, cc, nanos) = result["session_id"], MOCK_USAGE[model]
        assert round(result["total_cost_usd"] * 1e9) == calls * nanos
        rows = wait_until(lambda: at_least(calls, db_rows(
            server.db, "SELECT model_name, input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens, "
                       "cost_nanos, request_id FROM r WHERE session_id = ? ORDER BY ts, seq", (session,))),
            f"the api_request events of the {protocol} run in ccmon", 30)
        assert [row[:6] for row in rows] == [(model, i, o, cr, cc, nanos)] * calls, protocol
        request_ids = [row[6] for row in rows]
        assert len(set(request_ids)) == calls and all(MOCK_REQUEST_ID.fullmatch(r) for r in request_ids), rows
        usage = transcript_requests(claude_transcript(home, session))
        assert sorted(usage) == sorted(request_ids), "the transcript's requestId is the telemetry's request_id"
        assert {(u["input_tokens"], u["output_tokens"], u["cache_read_input_tokens"],
                 u["cache_creation_input_tokens"]) for u in usage.values()} == {(i, o, cr, cc)}
        sessions.append((session, request_ids))
    tool_session, tool_requests = sessions[0]
    [(attributes,)] = db_rows(server.db, "SELECT attributes FROM e WHERE session_id = ? AND name = 'tool_result'",
                              (tool_session,))
    tool = json.loads(attributes)
    assert (tool["tool_name"], tool["success"], tool["request_id"]) == ("Bash", "true", tool_requests[0])
    s = stats(server)
    assert (s.base_requests, s.premium_requests, s.total_requests) == (1, 4, 5)
    assert s.premium_tokens == ccmon_pb2.Token(input=6000, output=1000, cache_read=16000, cache_creation=3200,
                                               limited=7000, cache=19200, total=26200)
    assert s.base_tokens == ccmon_pb2.Token(input=120, output=30, limited=150, total=150)
    assert (s.premium_cost.amount, s.base_cost.amount, s.total_cost.amount) == (0.0498, 0.00027, 0.05007)
    assert len(api.calls()) == 5


@e2e
def test_claude_code_exports_to_the_server_ccmon_setup_pointed_it_at(claude_code, mock_anthropic, tmp_path,
                                                                      monkeypatch, capsys):
    """A HOME whose settings.json only `ccmon setup` wrote (a team server with a token): Claude Code in -p mode
    sends its api_request to that server, with the stand-in API's exact usage."""
    srv = ServerProcess(tmp_path, "--server-token", "team-t0ken").start()
    try:
        api = mock_anthropic()
        home, project = tmp_path / "home", (tmp_path / "project").resolve()
        project.mkdir()
        (claude_home(home, project) / ".claude" / "settings.json").unlink()
        for name in ("CLAUDE_CONFIG_DIR", "CCMON_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.chdir(tmp_path)
        assert ccmon.main(["setup", "--monitor-server", srv.target, "--monitor-token", "team-t0ken"]) == 0
        assert json.loads((home / ".claude" / "settings.json").read_bytes())["env"]["OTEL_EXPORTER_OTLP_HEADERS"] == \
            "Authorization=Bearer team-t0ken"
        result = run_claude_print(claude_code, api.port, project, "say hello", home=home)
        model = "claude-sonnet-4-5"
        rows = wait_until(lambda: at_least(1, db_rows(
            srv.db, "SELECT model_name, input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens, "
                    "cost_nanos FROM r WHERE session_id = ?", (result["session_id"],))),
            "the api_request of a Claude Code set up by ccmon setup", 30)
        assert rows == [(model, *MOCK_USAGE[model])]
        # and ccmon doctor finds every link holding, its telemetry received over gRPC
        capsys.readouterr()  # what setup said
        code = ccmon.main(["doctor", "--monitor-server", srv.target, "--monitor-token", "team-t0ken"])
        lines = capsys.readouterr().out.splitlines()
        assert code == 0, lines
        assert [line.split()[:3] for line in lines] == [
            ["ok", "config", "no"], ["ok", "server", "ccmon"], ["ok", "telemetry", "on"], ["ok", "exporter", "grpc"],
            ["ok", "token", "Claude"], ["ok", "received", "grpc"], ["ok", "status", "line"], ["ok", "transcripts", "1"]]
    finally:
        srv.stop()


@e2e
def test_claude_code_set_up_by_ccmon_alone_feeds_the_server_its_status_line_started(claude_code, mock_anthropic,
                                                                                     tmp_path):
    """A new user's machine: a HOME with nothing of ccmon's but `ccmon setup`'s changes (and a config moving the local
    server off 4317, as tests run side by side). Claude Code, interactive, runs ccmon's status line, which starts
    the local server; its telemetry and its status line readings reach that server, and the server, following
    the transcript too, keeps the one answer once, at Claude Code's exact figures."""
    api = mock_anthropic()
    home = tmp_path / "home"
    home.mkdir()
    _, port = local_home(home)
    session = ClaudeTmux(claude_code, api.port, tmp_path / "project", home, "true")  # then replaced by setup's
    try:
        done = run_ccmon(["setup", "--replace-status-line"], home)
        assert done.returncode == 0, done.stderr
        settings = json.loads((home / ".claude" / "settings.json").read_text())
        assert settings["env"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://127.0.0.1:{port}"
        assert local_server_pids(home) == []
        session.start("Sonnet 4.5")  # ccmon's status line, from Claude Code's input while the server starts
        wait_until(lambda: run_ccmon(["server", "status"], home).returncode == 0, "the local server, running", 60)
        session.turn("say hello")
        db = home / ".ccmon" / "ccmon.db"
        model = "claude-sonnet-4-5"
        # the transcript's copy (origin 2) may come first; telemetry's event replaces it: one request, Claude Code's
        wait_until(lambda: db_rows(db, "SELECT model_name, input_tokens, output_tokens, cache_read_tokens, "
                                       "cache_creation_tokens, cost_nanos, origin FROM r")
                   == [(model, *MOCK_USAGE[model], 0)], "the turn's api_request in the auto-started server, once", 60)
        wait_until(lambda: db_rows(db, "SELECT COUNT(*) FROM limit_readings")[0][0] >= 1,
                   "a status line reading in the auto-started server", 60)
        session.turn("say hello again")
        wait_until(lambda: db_rows(db, "SELECT COUNT(*), SUM(cost_nanos), MAX(origin) FROM r")
                   == [(2, 2 * MOCK_USAGE[model][4], 0)], "the second turn, once, from telemetry", 60)
        assert session.exit() == 0
        assert len(local_server_pids(home)) == 1  # it keeps running after Claude Code has gone
    finally:
        session.close()
        stop_local_servers(home)


@e2e
def test_claude_code_status_line_gets_the_session_and_the_subscription_limits(server, claude_code, mock_anthropic,
                                                                              tmp_path):
    """Claude Code interactive in tmux, signed in as a subscriber, with a statusLine command that keeps its stdin:
    the command's output shows, and its input carries the session, model, project and the rate-limit headers of
    the last answer (changed between turns), joined to ccmon's records by session and prompt id."""
    limits = tmp_path / "rate-limits.json"
    api = mock_anthropic(RL_HEADERS="1", RL_5H_UTIL="0.555", RL_STATE_FILE=str(limits))
    command, captured = status_capture_command(tmp_path / "status")
    session = ClaudeTmux(claude_code, api.port, tmp_path / "project", tmp_path / "home", command,
                         {"CLAUDE_CODE_OAUTH_TOKEN": TEST_OAUTH_TOKEN, **telemetry_env(server)})

    def after_turn(cost: float) -> tuple[int, dict]:
        """The status line's run after the turn that brought the session's cost to `cost`, once it shows."""
        found = wait_until(lambda: next(((n, s) for n, s in enumerate(status_inputs(captured), 1)
                                         if s["cost"]["total_cost_usd"] == cost), None),
                           f"a status line run with the session cost at {cost}", 60)
        session.wait_for(lambda pane: any(int(n) >= found[0] for n in re.findall(r"ccmon-test-status #(\d+)", pane)),
                         f"the status line of run {found[0]}")
        return found

    try:
        session.start("ccmon-test-status #")
        for early in status_inputs(captured):  # the start-up runs, before any API call
            assert "rate_limits" not in early and early["cost"]["total_cost_usd"] == 0, early
            assert early["context_window"]["used_percentage"] is None
        sent = int(time.time())
        session.turn("say hello")
        _, first = after_turn(0.01245)
        answered = int(time.time())
        project = str(tmp_path.resolve() / "project")
        assert (first["model"], first["workspace"]["project_dir"], first["workspace"]["current_dir"], first["cwd"]) \
            == ({"id": "claude-sonnet-4-5", "display_name": "Sonnet 4.5"}, project, project, project)
        five_hour, seven_day = first["rate_limits"]["five_hour"], first["rate_limits"]["seven_day"]
        assert (five_hour["used_percentage"], seven_day["used_percentage"]) == (55.5, 17)
        assert sent + 7200 <= five_hour["resets_at"] <= answered + 7200, (sent, five_hour)
        assert sent + 259200 <= seven_day["resets_at"] <= answered + 259200, (sent, seven_day)

        limits.write_text(json.dumps({"RL_5H_UTIL": "0.4237", "RL_5H_RESET_IN": "3600"}))
        sent = int(time.time())
        session.turn("say hello again")
        _, second = after_turn(0.0249)
        answered = int(time.time())
        assert second["rate_limits"]["five_hour"]["used_percentage"] == 42.4  # round(423.7) / 10
        assert sent + 3600 <= second["rate_limits"]["five_hour"]["resets_at"] <= answered + 3600
        assert session.exit() == 0
    finally:
        session.close()
    runs = status_inputs(captured)
    assert {run["session_id"] for run in runs} == {first["session_id"]}
    assert Path(first["transcript_path"]).name == f"{first['session_id']}.jsonl"
    transcript = claude_transcript(tmp_path / "home", first["session_id"])
    rows = wait_until(lambda: at_least(2, db_rows(
        server.db, "SELECT model_name, cost_nanos, prompt_id, request_id FROM r WHERE session_id = ? ORDER BY ts",
        (first["session_id"],))), "both turns' api_request events in ccmon", 30)
    assert [row[:3] for row in rows] == [("claude-sonnet-4-5", 12_450_000, first["prompt_id"]),
                                         ("claude-sonnet-4-5", 12_450_000, second["prompt_id"])]
    assert sorted(transcript_requests(transcript)) == sorted(row[3] for row in rows)


@e2e
def test_ccmon_statusline_in_a_real_claude_code(server, claude_code, mock_anthropic, tmp_path):
    """`ccmon statusline` as a subscriber's Claude Code runs it: Claude's own limits on the status line, the
    session's cost, today's once its events are in, and each reading kept by the server."""
    limits = tmp_path / "rate-limits.json"
    api = mock_anthropic(RL_HEADERS="1", RL_5H_UTIL="0.555", RL_STATE_FILE=str(limits))
    command = f"{sys.executable} {ROOT / 'ccmon.py'} statusline --monitor-server {server.target} --monitor-timezone UTC"
    session = ClaudeTmux(claude_code, api.port, tmp_path / "project", tmp_path / "home", command,
                         {"CLAUDE_CODE_OAUTH_TOKEN": TEST_OAUTH_TOKEN, **telemetry_env(server)})
    one_turn = ccmon.format_cost(12_450_000)
    try:
        session.start("Sonnet 4.5")
        session.turn("say hello")
        pane = session.wait_for(lambda text: f"session {one_turn} | " in text and "5h 56% (resets " in text,
                                "the status line after the first turn")
        # The 5-hour reset is written with its weekday when it falls after midnight.
        assert re.search(rf"Sonnet 4\.5 \| ctx \d+% \| session {re.escape(one_turn)} \| (today \S+ \| )?5h 56% "
                         r"\(resets (\w{3} )?\d\d:\d\d\) \| week 17% \(\w{3} \d\d:\d\d\)", pane), pane
        wait_until(lambda: db_rows(server.db, "SELECT COUNT(*) FROM r")[0][0] >= 1, "the first turn's api_request")
        limits.write_text(json.dumps({"RL_5H_UTIL": "0.4237", "RL_5H_RESET_IN": "3600"}))
        session.turn("say hello again")
        pane = session.wait_for(lambda text: "5h 42% (resets " in text, "the status line after the second turn")
        # Today's cost is the user's: the first turn's, or both turns' once the second's event is in (telemetry is
        # exported every second here, so it may come before the line is drawn); left out, never wrong, when the
        # machine was too busy for the server's answer to come within the line's 250 ms.
        line = pane.split("5h 42%")[0].splitlines()[-1]
        assert any(f"| today {cost} | " in line for cost in (one_turn, ccmon.format_cost(2 * 12_450_000))) \
            or "today" not in line, line
        assert session.exit() == 0
    finally:
        session.close()
    # The readings reached the server (a run that a loaded machine slows past its 250 ms budget leaves the
    # line as it is and its reading unsent: other tests hold the server's side to exact figures).
    kept = db_rows(server.db, "SELECT s.session_id, lr.five_hour_percent, lr.seven_day_percent, lr.model FROM "
                              "limit_readings lr JOIN sessions s ON s.id = lr.session WHERE five_hour_percent > 0")
    assert kept and {row[1:] for row in kept} <= {(55.5, 17.0, "claude-sonnet-4-5"), (42.4, 17.0, "claude-sonnet-4-5")}
    assert db_rows(server.db, "SELECT project FROM sessions WHERE session_id = ?", (kept[0][0],)) == \
        [(str(tmp_path.resolve() / "project"),)]


# ---------------------------------------------------------------- real Gemini CLI, Codex and Qwen Code, offline

# agent -> (npm package, version, executable): each runs against its stand-in (fixtures/gemini_api.py, codex_api.py,
# qwen_api.py, copied from the notes' tools) and exports to a real server over each protocol it supports.
AGENT_CLIS = {"gemini-cli": ("@google/gemini-cli", "0.61.0", "gemini"), "codex": ("@openai/codex", "0.169.0", "codex"),
              "qwen-code": ("@qwen-code/qwen-code", "0.24.4", "qwen")}
STANDINS = {"gemini-cli": "gemini_api.py", "codex": "codex_api.py", "qwen-code": "qwen_api.py"}
# The model calls a stand-in answered: the requests its log holds on these paths.
MODEL_CALL_PATHS = {"gemini-cli": r"/v1beta/models/[^/:]+:(?:stream)?[gG]enerateContent",
                    "codex": r"/v1/responses$", "qwen-code": r"/v1/chat/completions$"}


def agent_cli(agent: str) -> Path:
    """The tool's executable, installed with npm once, checked to be the version the notes describe."""
    package, version, name = AGENT_CLIS[agent]
    cli = npm_install_once(agent, {package: version}) / "node_modules" / ".bin" / name
    found = subprocess.run([cli, "--version"], capture_output=True, text=True, timeout=120)
    assert version in found.stdout, (found.stdout, found.stderr)
    return cli


class StandIn:
    """A stand-in model API of fixtures/ on a free loopback port, logging every request it answers."""

    def __init__(self, agent: str, folder: Path):
        self.agent, self.folder = agent, folder
        self.log_path = folder / "requests.jsonl"

    def __enter__(self) -> "StandIn":
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "stderr", "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(FIXTURES / STANDINS[self.agent]), "--port", "0",
                                          "--log", str(self.log_path)], stdout=subprocess.PIPE, stderr=err, text=True)
        self.port = int(self.proc.stdout.readline())  # printed once it listens
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def model_calls(self) -> int:
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        return sum(1 for line in lines if json.loads(line)["method"] == "POST" and
                   re.search(MODEL_CALL_PATHS[self.agent], json.loads(line)["path"].split("?")[0]))


def run_agent_cli(agent: str, protocol: str, srv: ServerProcess, standin: StandIn, home: Path) -> str:
    """Run the tool once, offline, with one prompt, exporting its telemetry to `srv` over `protocol` (grpc,
    http-json or, for Codex, http-protobuf); its output."""
    work = home / "work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "README.md").write_text("# demo\n")
    grpc_url, http_url = f"http://127.0.0.1:{srv.port}", f"http://127.0.0.1:{srv.http_port}"
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "NO_COLOR": "1"}
    if agent == "codex":
        exporter = {signal: f'{{ otlp-grpc = {{ endpoint = "{grpc_url}" }} }}' if protocol == "grpc" else
                    f'{{ otlp-http = {{ endpoint = "{http_url}/v1/{signal}", protocol = '
                    f'"{"binary" if protocol == "http-protobuf" else "json"}" }} }}' for signal in ("logs", "metrics")}
        (home / ".codex").mkdir(parents=True, exist_ok=True)
        (home / ".codex" / "config.toml").write_text(textwrap.dedent(f"""\
            model = "gpt-5.5"
            model_provider = "standin"
            check_for_update_on_startup = false
            approval_policy = "never"
            sandbox_mode = "danger-full-access"
            [model_providers.standin]
            name = "Stand-in Responses API"
            base_url = "{standin.url}/v1"
            env_key = "STANDIN_API_KEY"
            wire_api = "responses"
            [analytics]
            enabled = false
            [otel]
            exporter = {exporter["logs"]}
            metrics_exporter = {exporter["metrics"]}
            """))
        env.update(CODEX_HOME=str(home / ".codex"), STANDIN_API_KEY="fake-key-for-standin")
        command = [agent_cli(agent), "exec", "--skip-git-repo-check", "Say hi"]
    else:
        prefix, folder = ("GEMINI", ".gemini") if agent == "gemini-cli" else ("QWEN", ".qwen")
        (home / folder).mkdir(parents=True, exist_ok=True)
        (home / folder / "settings.json").write_text(json.dumps({
            "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
            "privacy": {"usageStatisticsEnabled": False},
            "security": {"auth": {"selectedType": "gemini-api-key" if agent == "gemini-cli" else "openai"},
                         "folderTrust": {"enabled": False}},
            "telemetry": {"enabled": True, "target": "local"}}))
        env.update({f"{prefix}_TELEMETRY_ENABLED": "true", f"{prefix}_TELEMETRY_TARGET": "local",
                    f"{prefix}_TELEMETRY_OTLP_PROTOCOL": "grpc" if protocol == "grpc" else "http",
                    f"{prefix}_TELEMETRY_OTLP_ENDPOINT": grpc_url if protocol == "grpc" else http_url})
        if agent == "gemini-cli":
            env.update(GEMINI_API_KEY="fake-key-for-standin", GOOGLE_GEMINI_BASE_URL=standin.url,
                       GEMINI_CLI_TRUST_WORKSPACE="true")
        else:
            env.update(OPENAI_API_KEY="fake-key-for-standin", OPENAI_BASE_URL=f"{standin.url}/v1",
                       OPENAI_MODEL="qwen3-coder-plus")
        command = [agent_cli(agent), "-p", "Say hi"]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result.stdout


AGENT_PROTOCOLS = [("gemini-cli", "grpc"), ("gemini-cli", "http-json"), ("codex", "grpc"),
                   ("codex", "http-protobuf"), ("codex", "http-json"), ("qwen-code", "grpc"), ("qwen-code", "http-json")]


@e2e
@pytest.mark.parametrize("agent, protocol", AGENT_PROTOCOLS)
def test_a_real_agent_cli_offline_is_counted_exactly_on_every_protocol(tmp_path, agent, protocol):
    """The real CLI, one prompt against its stand-in, exporting to a real server: every model call the stand-in
    answered is one request of the agent, with exactly the stand-in's usage (its metrics, arriving too, add
    nothing), in one session of the agent."""
    srv = ServerProcess(tmp_path).start()
    try:
        with StandIn(agent, tmp_path / "standin") as standin:
            run_agent_cli(agent, protocol, srv, standin, tmp_path / "home")
            calls = standin.model_calls()
        assert calls >= 1
        wait_until(lambda: agent_totals(srv)[0] >= calls, f"{calls} model calls of {agent} stored", 30)
        assert agent_totals(srv) == (calls, tuple(calls * n for n in STANDIN_CALL[agent]),
                                     calls * STANDIN_TOTAL[agent])
        sessions = srv.query().GetSessions(ccmon_pb2.GetSessionsRequest(
            agent=ccmon.ALL_AGENTS, start_time=ts(hours_ago(1)))).sessions
        assert [(s.agent, s.source, s.stats.total_requests) for s in sessions] == [(agent, "events*", calls)]
    finally:
        srv.stop()


# ---------------------------------------------------------------- module structure

def top_level_uses_above_their_section(source: str) -> list[str]:
    """Uses of a top-level name in a section above the one defining it (annotations aside)."""
    import ast
    banner = re.compile(r"^# -{8,} (.+)$")
    starts = [number for number, line in enumerate(source.splitlines(), 1) if banner.match(line)]

    def section(line: int) -> int:
        return sum(1 for start in starts if start <= line)

    tree = ast.parse(source)
    defined: dict[str, int] = {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            names = [target.name] if hasattr(target, "name") else \
                [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
            for name in names:
                defined.setdefault(name, section(node.lineno))

    class Uses(ast.NodeVisitor):
        found: list[str] = []

        def visit_arg(self, node):  # parameter annotations are not uses
            pass

        def visit_FunctionDef(self, node):
            for child in (*node.decorator_list, *node.args.defaults, *filter(None, node.args.kw_defaults), *node.body):
                self.visit(child)

        def visit_AnnAssign(self, node):
            if node.value is not None:
                self.visit(node.value)

        def visit_Name(self, node):
            if isinstance(node.ctx, ast.Load) and defined.get(node.id, 0) > section(node.lineno):
                self.found.append(f"line {node.lineno}: {node.id}")

    uses = Uses()
    uses.found = []
    uses.visit(tree)
    return uses.found


def names_defined_twice(source: str) -> list[str]:
    """Top-level functions and classes defined more than once: the later one silently replaces the first."""
    import ast
    seen, twice = set(), []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            if node.name in seen:
                twice.append(f"line {node.lineno}: {node.name}")
            seen.add(node.name)
    return twice


def test_no_top_level_name_is_defined_twice():
    assert names_defined_twice((ROOT / "ccmon.py").read_text()) == []
    assert names_defined_twice("def f():\n    pass\n\n\ndef f():\n    pass\n") == ["line 5: f"]


def test_sections_depend_only_on_sections_above():
    source = (ROOT / "ccmon.py").read_text()
    assert top_level_uses_above_their_section(source) == []
    # the check itself finds an upward use
    assert top_level_uses_above_their_section(
        "# -------- A\ndef f():\n    return g()\n\n# -------- B\ndef g():\n    return 1\n") == ["line 3: g"]


ORIGIN_BY_NUMBER = re.compile(r"\borigin\s*(?:[=!<>]=?|<>|IN\s*\()\s*\d", re.IGNORECASE)


def origins_by_number(source: str, historical: set[str]) -> list[str]:
    """Where code outside the top-level definitions named `historical` selects or sets a request's origin by its
    number: in SQL text, a comparison in Python, an "origin" key."""
    import ast

    def number(node) -> bool:
        return isinstance(node, ast.Constant) and type(node.value) is int

    def origin(node) -> bool:
        return "origin" in (getattr(node, "id", "") or getattr(node, "attr", "")).lower()

    def by_number(node) -> bool:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return ORIGIN_BY_NUMBER.search(node.value) is not None
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            return any(map(origin, operands)) and any(map(number, operands))
        return isinstance(node, ast.Dict) and any(isinstance(key, ast.Constant) and key.value == "origin" and
                                                  number(value) for key, value in zip(node.keys, node.values))

    found = []
    for node in ast.parse(source).body:
        names = {node.name} if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            {target.id for target in node.targets if isinstance(target, ast.Name)} if isinstance(node, ast.Assign) \
            else set()
        if not names & historical:
            found += [f"line {part.lineno}" for part in ast.walk(node) if by_number(part)]
    return found


def test_which_source_wins_is_said_once():
    """Outside the migrations, which keep the SQL they were written with, origins are selected by ORIGIN_RULES."""
    historical = {migration.__name__ for migration in ccmon.MIGRATIONS} | {"SCHEMA", "V1_FIGURES", "V5_FIGURES",
                                                                          "V8_FIGURES"}
    assert origins_by_number((ROOT / "ccmon.py").read_text(), historical) == []
    # the check itself finds an origin by number in SQL, a comparison and a row
    planted = ('X = "SELECT 1 FROM requests WHERE r.origin >= 2"\nY = f"WHERE origin IN (2, {z})"\n'
               'def f(row, origin):\n    return origin == 1 or {"origin": 0}\nSCHEMA = "origin = 0"\n')
    assert origins_by_number(planted, {"SCHEMA"}) == ["line 1", "line 2", "line 4", "line 4"]


def test_module_docstring_lists_the_sections_in_order():
    titles = re.findall(r"^# -{8,} (.+)$", (ROOT / "ccmon.py").read_text(), re.MULTILINE)
    listed = [line.strip() for line in ccmon.__doc__.splitlines() if line.startswith("  ")]
    assert listed == titles


# ---------------------------------------------------------------- docs: README.md and docs/*.md

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def markdown_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces as hyphens, a
    repeated heading numbered (-1, -2, ...); headings inside code blocks are not headings."""
    anchors: set[str] = set()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            anchor, number = slug, 0
            while anchor in anchors:
                number += 1
                anchor = f"{slug}-{number}"
            anchors.add(anchor)
    return anchors


def test_markdown_anchors():
    assert markdown_anchors("# ccmon\n## Claude Code's status line: `ccmon statusline`\n```\n# not one\n```\n"
                            "## ccmon.pyz\n## Notes\n## Notes\n") == \
        {"ccmon", "claude-codes-status-line-ccmon-statusline", "ccmonpyz", "notes", "notes-1"}


def test_docs_links_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists, and a heading in it when it
    names an anchor; the README stays a front door (under 200 lines); no page names a path on one machine."""
    broken = []
    for page in DOC_FILES:
        text = page.read_text()
        prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in markdown_anchors(linked.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
        assert "/work/" not in text, f"{page.relative_to(ROOT)} names a path on one machine"
    assert broken == []
    assert len(DOC_FILES) > 1
    assert len((ROOT / "README.md").read_text().splitlines()) < 200


def test_configuration_page_has_the_generated_settings_block():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert text.count("<!-- settings:begin (generated from SETTINGS in ccmon.py; do not edit) -->") == 1
    assert text.count("<!-- settings:end -->") == 1
    assert text.index("<!-- settings:begin") < text.index("<!-- settings:end -->")


def test_readme_has_the_test_command_ci_runs():
    """.ci/run runs the README's test command verbatim: the two stay one line."""
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command.startswith("python3 -m venv .venv") and \
        command in (ROOT / "README.md").read_text().splitlines()



def test_report_chart_draws_a_bar_per_row(server, tmp_path):
    """--chart: a bar beside each row, its length cost (or tokens) / the largest row's × the width the table
    leaves, in eighths of a cell where the locale is UTF-8 (piped or not, as ccusage-like tools do), '#' else."""
    sdk_export(server.port, team_events())
    daily = ["daily", "--since", "2026-05-03", "--until", "2026-05-06", "--chart"]
    table = [
        "date        req  input  output  cache_read  cache_write  tokens     cost  premium_req  premium_cost  "
        "cost, longest $2.38",
        "----------  ---  -----  ------  ----------  -----------  ------  -------  -----------  ------------  "
        "-------------------",
        "2026-05-04    2  1,300     230           0            0   1,530  $0.5100            1       $0.5000  {small}",
        "2026-05-05    2     57   5,003           0            0   5,060    $2.38            2         $2.38  {large}",
        "----------  ---  -----  ------  ----------  -----------  ------  -------  -----------  ------------",
        "Total         4  1,357   5,233           0            0   6,590    $2.89            3         $2.88"]
    # a locale the system does not have is not taken for UTF-8, whatever its name says
    for locale_env, small, large in (("C.UTF-8", "████▏", "█" * 19), ("C", "####", "#" * 19),
                                     ("xx_XX.UTF-8", "####", "#" * 19)):
        out = run_report(server, *daily, cwd=tmp_path, env={"LC_ALL": locale_env})
        assert (out.returncode, out.stderr) == (0, "")
        # $0.51 / $2.375 × 19 cells = 4.08 cells: 33 eighths (4 whole cells and one eighth), 4 '#'
        assert out.stdout.splitlines()[1:] == [line.format(small=small, large=large) for line in table]
    tokens = run_report(server, "model", "--since", "2026-05-01", "--until", "2026-05-31", "--chart", "tokens",
                        cwd=tmp_path, env={"LC_ALL": "C.UTF-8"})
    assert tokens.stdout.splitlines()[1:5] == [
        "model              req  input  output  cache_read  cache_write  tokens     cost  avg_ms  ttft_ms  "
        "tokens, longest 5.05K",
        "-----------------  ---  -----  ------  ----------  -----------  ------  -------  ------  -------  "
        "----------------------",
        "claude-opus-4-1      1     50   5,000           0            0   5,050    $2.25  60,000        -  "
        "██████████████████████",
        # 1,210 / 5,050 × 22 cells × 8 = 42.2 eighths: 5 cells and 2 eighths; 330 tokens: 11.5, so 12 eighths
        "claude-sonnet-4-5    2  1,007     203           0            0   1,210  $0.6250   2,500      650  █████▎"]
    assert tokens.stdout.splitlines()[5].endswith("  █▌")
    wide = run_report(server, "project", "--since", "2026-05-01", "--until", "2026-05-31", "--chart", "--wide",
                      cwd=tmp_path, env={"LC_ALL": "C"}).stdout.splitlines()
    assert wide[1].endswith("premium_cost  cost, longest $2.89") and wide[3].endswith("$2.88  " + "#" * 40)


def test_report_chart_keeps_its_scale_in_a_narrow_bar_column():
    """The bars' title gives the largest row's figure however narrow the column the table leaves: it drops words,
    never the figure (it once fell back to a bare `cost`)."""
    def title(name_width: int) -> str:
        rows = [{"name": "x" * name_width, "req": 1, "cost_usd": 2.375}, {"name": "y", "req": 2, "cost_usd": 0.51}]
        head, rule = ccmon.report_table(rows, {}, 120, "cost").splitlines()[:2]
        return f"{head.split('  ')[-1]} ({len(rule.split('  ')[-1])} cells)"
    assert [title(n) for n in (80, 89, 94)] == ["cost, longest $2.38 (24 cells)", "longest $2.38 (15 cells)",
                                                "$2.38 (10 cells)"]


def test_report_limits_chart_draws_claudes_readings_over_the_period(server, tmp_path):
    """`report limits --chart`: under the table, Claude's 5-hour then weekly % over the period (each column the
    newest reading by then, 0 once its window reset, every reset marked), 100% at the top."""
    tokyo = ccmon.ZoneInfo("Asia/Tokyo")

    def at(text: str) -> int:
        return local_ms(text, tokyo)
    for session, read, five, five_resets, week in (("s-1", "2026-05-04 10:00", 20.0, "2026-05-04 12:00", 10.0),
                                                   ("s-1", "2026-05-04 22:00", 90.0, "2026-05-05 02:00", 40.0),
                                                   ("s-2", "2026-05-05 12:00", 50.0, "2026-05-05 16:00", 80.0)):
        reading = ccmon.LimitReading(session, at(read), five_hour=ccmon.LimitWindow(five, at(five_resets)),
                                     seven_day=ccmon.LimitWindow(week, at("2026-05-06 00:00")))
        server.query().ReportStatusLine(ccmon_pb2.ReportStatusLineRequest(reading=ccmon.reading_message(reading)))
    out = run_report(server, "limits", "--since", "2026-05-04", "--until", "2026-05-06", "--chart", cwd=tmp_path,
                     env={"LC_ALL": "C"})
    assert (out.returncode, out.stderr) == (0, "")
    lines = out.stdout.splitlines()
    assert lines[6:] == LIMITS_CHART
    assert run_report(server, "limits", "--since", "2026-05-04", "--until", "2026-05-06", "--chart", cwd=tmp_path,
                      env={"LC_ALL": "C.UTF-8"}).stdout.splitlines()[8] == "100% │                                  ▂▂▂▂▂▂▂▂"
    # a period with Codex's plan's readings alone: the table lists them, and the chart says why it is not drawn
    server.query().ImportRequests(ccmon_pb2.ImportRequestsRequest(
        requests=[ccmon_pb2.ImportedRequest(session_id="codex-1", timestamp_ms=at("2026-05-08 09:00"),
                                            model="gpt-5.5", input_tokens=10, agent="codex")],
        readings=[ccmon.reading_message(ccmon.LimitReading("codex-1", at("2026-05-08 09:00"), agent=ccmon.CODEX,
                                                           five_hour=ccmon.LimitWindow(12.5, at("2026-05-08 12:00"))))]))
    codex = run_report(server, "limits", "--since", "2026-05-08", "--until", "2026-05-08", "--chart", cwd=tmp_path)
    assert (codex.returncode, codex.stderr) == (0, "")
    assert codex.stdout.splitlines()[3].startswith("Codex   2026-05-08 09:00") and codex.stdout.splitlines()[4:] == [
        "", "no readings of Claude's limits in this period to chart (--chart draws Claude's own, not Codex's)"]


def seeded_readings(db: Path, sessions: dict[str, str], first_ms: int, step_ms: int, count: int,
                    codex: int = 0, codex_first_ms: int = 0) -> list[ccmon.LimitReading]:
    """A database with a request in each session (its user's: readings are a session's user's) and `count`
    readings of Claude's limits in turn across the sessions, `step_ms` apart from first_ms; then `codex` readings of
    Codex's plan, as far apart from codex_first_ms. Written as the server writes (its Writer), before a server
    opens it."""
    store = ccmon.Writer(db)
    store.write(ccmon.Batch(requests=[(first_ms, session, 0, "claude-sonnet-4-5", user, 1, 1, 0, 0, 0, 0, None,
                                       None, None, None, None, 0, "claude-code") for session, user in sessions.items()]))
    names = list(sessions)
    readings = [ccmon.LimitReading(names[i % len(names)], first_ms + i * step_ms,
                                   five_hour=ccmon.LimitWindow(i % 100, first_ms + (i // 100 + 1) * 100 * step_ms),
                                   seven_day=ccmon.LimitWindow(i % 50, first_ms + 7 * ccmon.DAY_MS))
                for i in range(count)]
    readings += [ccmon.LimitReading("codex-1", codex_first_ms + i * step_ms, agent=ccmon.CODEX,
                                    five_hour=ccmon.LimitWindow(12.5, codex_first_ms + i * step_ms + 5 * ccmon.HOUR_MS))
                 for i in range(codex)]
    assert store.record_agent_readings(readings) == count + codex
    store.close()
    return readings


def test_report_limits_lists_every_reading_past_what_one_answer_holds(tmp_path):
    """GetSeries lists each agent's newest 5,000 readings; `report limits` asks again, agent by agent, for the time
    up to the oldest until every reading is in (it once listed the newest 5,000 alone): 5,003 of Claude's from
    May 2nd and 5,002 of Codex's plan from May 1st, a minute apart each, every one once, oldest first."""
    tokyo = ccmon.ZoneInfo("Asia/Tokyo")
    seeded_readings(tmp_path / "ccmon.db", {"s-1": "ana@example.com"}, local_ms("2026-05-02 00:00", tokyo), 60_000,
                    5_003, codex=5_002, codex_first_ms=local_ms("2026-05-01 00:00", tokyo))
    srv = ServerProcess(tmp_path).start()
    try:
        out = run_report(srv, "limits", "--since", "2026-05-01", "--until", "2026-05-06", "--json", cwd=tmp_path)
        assert (out.returncode, out.stderr) == (0, "")
        rows = json.loads(out.stdout)["rows"]
        assert [row["limits"] for row in rows] == ["Claude"] * 5_003 + ["Codex"] * 5_002
        assert [(row["read_at"], row["five_hour_percent"]) for row in (rows[0], rows[4999], rows[5002])] == [
            ("2026-05-02T00:00:00+09:00", 0.0), ("2026-05-05T11:19:00+09:00", 99.0), ("2026-05-05T11:22:00+09:00", 2.0)]
        assert [row["read_at"] for row in (rows[5003], rows[-1])] == ["2026-05-01T00:00:00+09:00",
                                                                      "2026-05-04T11:21:00+09:00"]
        for kind in (rows[:5_003], rows[5_003:]):  # each once, in order
            assert [row["read_at"] for row in kind] == sorted({row["read_at"] for row in kind})
        chart = run_report(srv, "limits", "--since", "2026-05-01", "--until", "2026-05-06", "--chart", cwd=tmp_path,
                           env={"LC_ALL": "C"})
        assert chart.stdout.count("Claude's 5-hour limit, % used") == 1
    finally:
        srv.stop()


def test_the_charts_tab_asks_the_week_of_one_user_when_everyones_readings_are_too_many(tmp_path):
    """Over the Charts tab's 4 weeks a team's readings pass the 5,000 GetSeries lists; the week chart's (the newest
    reading's user) are asked again for the last 7 days alone, so that they cover its week: 3 users' 6,000
    readings, a minute apart each, in the last 7 days (the newest 5,000 of everyone's reach back 5 days)."""
    now = ccmon.now_ms()
    first = now - 7 * ccmon.DAY_MS + ccmon.HOUR_MS
    readings = seeded_readings(tmp_path / "ccmon.db", {"s-a": "ana@example.com", "s-b": "bo@example.com",
                                                       "s-c": "cy@example.com"}, first, 100_000, 6_000)
    srv = ServerProcess(tmp_path).start()
    client = ccmon.Client(srv.target)
    try:
        query = ccmon.query_for(ccmon.ViewState(tab="charts"), _settings(), now)
        series = ccmon.chart_series(client, query)
        cy = [r for r in readings if r.session_id == "s-c"]  # the newest reading's user
        assert len(series.readings) == 2_000 and {r.user for r in series.readings} == {"cy@example.com"}
        assert [r.read_ms for r in series.readings] == [r.read_ms for r in cy]
        everyone = client.series(query.end_ms - 28 * ccmon.DAY_MS, query.end_ms, "hour", query.timezone)
        assert len(everyone.readings) == 5_000 and everyone.readings[0].read_ms == readings[1_000].read_ms
    finally:
        client.close()
        srv.stop()


LIMITS_CHART = [  # 90% of 7 rows: 6.3, so 6 '#'; nothing past the last reading (12:00, one column)
    '',
    "Claude's 5-hour limit, % used",
    '100% |',
    '     |                                  ########',
    '     |                                  ########',
    '     |                                  ########               #',
    '     |                                  ########               #',
    '     |                                  ########               #',
    '     |               ####               ########               #',
    '  0% +-------------------^---------------------^---------------------^--------------------------------------------------',
    '      Mon 04                                Tue 05                                Wed 06',
    "^ Claude's 5-hour limit reset",
    '',
    "Claude's weekly limit, % used",
    '100% |',
    '     |                                                         #',
    '     |                                                         #',
    '     |                                                         #',
    '     |                                  ########################',
    '     |                                  ########################',
    '     |               ###########################################',
    '  0% +----------------------------------------------------------------------------^-------------------------------------',
    '      Mon 04                                Tue 05                                Wed 06',
    "^ Claude's weekly limit reset",
]

@pytest.mark.parametrize("args,message", [
    (["daily", "--chart", "--json"], "argument --json: not allowed with argument --chart"),
    (["daily", "--csv", "--chart", "tokens"], "argument --chart: not allowed with argument --csv"),
    (["daily", "--chart", "requests"], "argument --chart: invalid choice: 'requests' (choose from 'cost', 'tokens')"),
])
def test_report_chart_flag_errors(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["report", *args], capsys)
    assert (code, err) == (2, f"ccmon report: {message} (see ccmon report --help)\n")
    code, err = run_main(["report", "session", "--chart", "--monitor-server", "127.0.0.1:9"], capsys)
    assert (code, err) == (2, "ccmon: config error: --chart: charts are drawn for the daily, weekly, monthly, model, "
                              "project, agent and limits reports, not the session report\n")
    code, err = run_main(["report", "limits", "--chart", "tokens", "--monitor-server", "127.0.0.1:9"], capsys)
    assert (code, err) == (2, "ccmon: config error: --chart tokens: the limits report draws Claude's own percentages "
                              "(use --chart)\n")


# ---------------------------------------------------------------- charts: pure render functions, golden frames

CHART_ZONE = ccmon.ZoneInfo("Asia/Tokyo")
CHART_START = int(dt.datetime(2026, 5, 4, tzinfo=CHART_ZONE).timestamp() * 1000)  # a Monday, local midnight
H = ccmon.HOUR_MS
HOURLY_TOKENS = [0, 0, 0, 0, 0, 0, 0, 0, 120_000, 800_000, 2_400_000, 3_100_000, 2_900_000, 900_000, 1_500_000,
                 4_200_000, 5_000_000, 3_900_000, 2_500_000, 1_100_000, 300_000, 0, 0, 2_000]
A_DAY = [(CHART_START + hour * H, tokens) for hour, tokens in enumerate(HOURLY_TOKENS) if tokens]
# the same day each day of the week, divided by the day's number (Monday 1), and nothing on Saturday
A_WEEK = [(CHART_START + day * 24 * H + hour * H, tokens // (day + 1)) for day in range(7) if day != 5
          for hour, tokens in enumerate(HOURLY_TOKENS) if tokens]


def bar_length_in_steps(bar: str, unicode: bool) -> int:
    return sum(ccmon.EIGHTHS.index(glyph) for glyph in bar) if unicode else len(bar)


def test_bars_are_value_over_largest_times_width_in_steps():
    """A bar's length in steps (eighths of a cell; '#' cells in ASCII) is value / largest × width × steps to the
    nearest step (halves up), except that a non-zero value too small for one step shows one; zero shows none."""
    from fractions import Fraction

    from hypothesis import given, strategies as st

    values = st.one_of(st.integers(0, 10**15), st.floats(0, 1e6, allow_nan=False, allow_infinity=False))

    @given(st.lists(values, min_size=1, max_size=30), st.integers(1, 120), st.booleans())
    def check(series, width, unicode):
        largest, steps = max(series), 8 if unicode else 1
        for value in series:
            bar = ccmon.hbar(value, largest, width, unicode)
            exact = Fraction(value) / Fraction(largest) * width * steps if value else Fraction(0)
            expected = int(exact + Fraction(1, 2)) if exact >= Fraction(1, 2) else (1 if value else 0)
            assert bar_length_in_steps(bar, unicode) == expected
            assert len(bar) <= width and set(bar) <= set("█▏▎▍▌▋▊▉" if unicode else "#")
            assert set(bar[:-1]) <= {"█" if unicode else "#"}  # whole cells, then at most one part of a cell

    check()


def test_columns_are_value_over_largest_times_rows_in_steps():
    """The time chart's columns are honest as the bars are: a column's height in steps (eighths of a row; '#' rows
    in ASCII) is its buckets' sum / the largest column's × the rows, to the nearest step, at least one for any
    usage and none for none; the largest's value is written at the top; every column as wide as the others."""
    from fractions import Fraction

    from hypothesis import given, settings, strategies as st

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.integers(0, 10**12), min_size=1, max_size=200), st.integers(11, 160), st.integers(4, 14),
           st.booleans())
    def check(hourly, width, height, unicode):
        points = [(CHART_START + hour * H, value) for hour, value in enumerate(hourly)]
        lines = ccmon.time_chart(points, CHART_START, CHART_START + len(hourly) * H, H, width, height, unicode,
                                 CHART_ZONE, ccmon.format_count)
        if not lines:
            return
        group = int(re.fullmatch(r"(?:each column: )?(\d+) hours?", lines[0])[1]) if lines[0] else None
        plot = lines[1:-2]
        side = plot[0].index("│" if unicode else "|")
        cells = width - side - 1
        group = group or -(-len(hourly) // cells)  # the caption gives way to nothing at the least widths
        columns = [sum(hourly[i:i + group]) for i in range(0, len(hourly), group)]
        cell_width = max(1, cells // len(columns))
        gap = 1 if cell_width >= 3 else 0
        assert plot[0][:side].strip() == ccmon.format_count(max(columns))
        rows, steps = len(plot), 8 if unicode else 1
        heights = [sum((ccmon.RISING.index(line[side + 1 + x]) if unicode else 1 if line[side + 1 + x] == "#" else 0)
                       if side + 1 + x < len(line) else 0 for line in plot) for x in range(cells)]
        exact = [Fraction(value) / Fraction(max(columns)) * rows * steps if value else Fraction(0) for value in columns]
        expected = [int(e + Fraction(1, 2)) if e >= Fraction(1, 2) else (1 if value else 0)  # halves up
                    for e, value in zip(exact, columns)]
        assert heights == [h for h in expected for h in [h] * (cell_width - gap) + [0] * gap] + \
            [0] * (cells - len(columns) * cell_width)
        assert all(height == 0 for value, height in zip(columns, expected) if not value)
        assert all(height >= 1 for value, height in zip(columns, expected) if value)

    check()


def test_bar_glyphs():
    assert [ccmon.hbar(value, 80, 10, True) for value in (0, 0.01, 1, 5, 40, 79, 80)] == \
        ["", "▏", "▏", "▋", "█████", "█████████▉", "██████████"]
    assert [ccmon.hbar(value, 80, 10, False) for value in (0, 0.01, 1, 5, 40, 79, 80)] == \
        ["", "#", "#", "#", "#####", "##########", "##########"]


def day_chart(width: int, height: int, unicode: bool = True) -> list[str]:
    return ccmon.time_chart(A_DAY, CHART_START, CHART_START + 24 * H, H, width, height, unicode, CHART_ZONE,
                            ccmon.format_count)


def week_of_hours(width: int, height: int, unicode: bool = True) -> list[str]:
    return ccmon.time_chart(A_WEEK, CHART_START, CHART_START + 7 * 24 * H, H, width, height, unicode, CHART_ZONE,
                            ccmon.format_count)


def test_time_chart_24_hours_and_7_days():
    """One column per hour, two cells wide where 60 columns have room; the week's hours four to a column (their
    sum); the largest column's value at the top, the local hours or days under the axis."""
    assert day_chart(60, 8) == [
        'each column: 1 hour',
        '5.00M │                              ▂▂██',
        '      │                      ▁▁      ████▇▇',
        '      │                    ▃▃██▇▇    ██████▄▄',
        '      │                    ██████  ▄▄████████▁▁',
        '      │                ▁▁▆▆██████▇▇████████████▂▂    ▁▁',
        '    0 └────────────────────────────────────────────────',
        '       00:00 03:00 06:00 09:00 12:00 15:00 18:00 21:00',
    ]
    assert day_chart(60, 8, unicode=False) == [
        'each column: 1 hour',
        '5.00M |                                ##',
        '      |                              ######',
        '      |                      ####    ########',
        '      |                    ######  ##########',
        '      |                ##########################    ##',
        '    0 +------------------------------------------------',
        '       00:00 03:00 06:00 09:00 12:00 15:00 18:00 21:00',
    ]
    assert week_of_hours(60, 7) == [
        'each column: 4 hours',
        '12.5M │    █',
        '      │   ██',
        '      │  ███    ▄█     ▃',
        '      │  ███▁  ███▁  ▅██▁  ▄▆█▁  ▃▅▆▁        ▂▃▅▁',
        '    0 └──────────────────────────────────────────',
        '       Mon   Tue   Wed   Thu   Fri   Sat   Sun',
    ]
    assert week_of_hours(60, 7, unicode=False) == [
        'each column: 4 hours',
        '12.5M |    #',
        '      |   ##',
        '      |  ###    ##',
        '      |  ####  ####  ####  ####  ####        ####',
        '    0 +------------------------------------------',
        '       Mon   Tue   Wed   Thu   Fri   Sat   Sun',
    ]


def test_time_chart_at_small_sizes():
    """40 columns: a cell per hour, six hours to a column for the week; too small to draw: nothing."""
    assert day_chart(40, 5) == [
        'each column: 1 hour',
        '5.00M │           ▂▁  ▅█▄',
        '      │        ▁▃███▃▅████▄▁  ▁',
        '    0 └────────────────────────',
        '       00:00 06:00 12:00 18:00',
    ]
    assert week_of_hours(40, 6, unicode=False) == [
        'each column: 6 hours',
        '18.4M |  #',
        '      |  #   #',
        '      | ### ### ### ### ###     ###',
        '    0 +----------------------------',
        '       Mon Tue Wed Thu Fri Sat Sun',
    ]
    assert day_chart(60, 3) == day_chart(10, 8) == []


def test_time_axis_over_years():
    """Months alone within a year's span; past it the months each quarter with their year, then the years (a
    span of years once got no labels at all, and months past a year repeated without theirs)."""
    tokyo = ccmon.ZoneInfo("Asia/Tokyo")

    def axis(start: str, end: str, cells: int = 110) -> str:
        return ccmon.time_axis(local_ms(f"{start} 00:00", tokyo), local_ms(f"{end} 00:00", tokyo), cells, tokyo)
    assert axis("2025-06-04", "2026-06-05") == \
        "        Jul      Aug      Sep      Oct       Nov      Dec      Jan      Feb      Mar      Apr      May"
    assert axis("2024-12-01", "2026-06-05") == \
        "      Jan 2025          Apr 2025          Jul 2025          Oct 2025           Jan 2026          Apr 2026"
    assert axis("2023-01-01", "2026-12-05") == \
        "2023                       2024                         2025                        2026"
    assert axis("2023-01-01", "2026-12-05", 40) == "2023      2024      2025      2026"


BLOCK_START = CHART_START + 14 * H
# the running total every 10 minutes, 2,500 tokens a minute; 95 minutes into the window
SO_FAR = [(BLOCK_START + minute * 60_000, minute * 2500) for minute in range(0, 100, 10)]


def burnup(width: int, height: int, unicode: bool = True, limit: int | None = 880_000) -> list[str]:
    return ccmon.burnup_chart(BLOCK_START, BLOCK_START + 5 * H, SO_FAR, limit, 600_000, BLOCK_START + 95 * 60_000,
                              width, height, unicode, CHART_ZONE, ccmon.format_count)


def test_burnup_chart():
    """Columns for the running total so far, dots for the projection to the reset, a line for the limit with its
    value on the scale, and a legend that says each with its figure."""
    assert burnup(60, 9) == [
        '880K │──────────────────────────────────────────────────────',
        '     │                                                     ·',
        '     │                                       ··············',
        '     │                        ···············',
        '     │            ▂▂▃▃▄▄······',
        '     │ ▁▁▃▃▄▄▅▅▇████████',
        '   0 └──────────────────────────────────────────────────────',
        '      14:00     15:00      16:00      17:00      18:00',
        '█ used 225K  ─ limit 880K  · projected 600K',
    ]
    assert burnup(60, 9, unicode=False) == [
        '880K |------------------------------------------------------',
        '     |',
        '     |                                             .........',
        '     |                               ..............',
        '     |                ##.............',
        '     | #################',
        '   0 +------------------------------------------------------',
        '      14:00     15:00      16:00      17:00      18:00',
        '# used 225K  - limit 880K  . projected 600K',
    ]
    # no limit: scaled to the projection; 40 columns; the legend keeps the parts that fit whole
    assert burnup(40, 6, limit=None) == [
        '600K │                      ············',
        '     │          ▁···········',
        '     │ ▁▂▃▄▅▆▇▇██',
        '   0 └──────────────────────────────────',
        '      14:00 15:00  16:00  17:00  18:00',
        '█ used 225K  · projected 600K',
    ]
    # 30 columns: the legend's short forms, each glyph with its figure
    assert burnup(30, 6, unicode=False) == [
        '880K |------------------------',
        '     |                 .......',
        '     |########.........',
        '   0 +------------------------',
        '      14:00    16:00     18:00',
        '# used 225K - 880K . 600K',
    ]
    assert burnup(40, 4) == burnup(8, 9) == []


def test_burnup_chart_keeps_the_limit_off_the_top_rows_label():
    """A limit that would fall in the top row, which is labelled with the largest value, gets a row and a label
    of its own: the scale's top is raised to limit × rows / (rows - 1) (a line on the row labelled 600K read as a
    limit of 600K)."""
    def chart(limit: int, height: int) -> list[str]:
        return ccmon.burnup_chart(BLOCK_START, BLOCK_START + 5 * H, SO_FAR, limit, 600_000,
                                  BLOCK_START + 95 * 60_000, 40, height, False, CHART_ZONE, ccmon.format_count)
    assert chart(560_000, 5) == [  # 2 rows of 560K each: 600K rounds to one
        '1.12M |',
        ' 560K |-##########......................',
        '    0 +---------------------------------',
        '       14:00 15:00  16:00 17:00  18:00',
        '# used 225K - 560K . 600K',
    ]
    # 7 rows: 560K of 600K is 6.53 rows, the top one; of 653K (560K × 7 / 6) it is 6, the second
    assert chart(560_000, 10)[:2] == ['653K |', '560K |----------------------------......']
    assert chart(540_000, 10)[:2] == ['600K |                               ...',  # 6.3 rows: the second already
                                      '540K |--------------------------.....---']
    # a limit written as the top value shares the top row and its label
    assert chart(600_000, 5)[:2] == ['600K |------------------------..........', '     | ##########.............']


WEEKLY_RESET = CHART_START + (2 * 24 + 10) * H  # Wednesday 10:00
READINGS = [ccmon.LimitReading("s", CHART_START + hour * H, seven_day=ccmon.LimitWindow(percent, resets))
            for hour, percent, resets in [(6, 4, WEEKLY_RESET), (18, 15, WEEKLY_RESET), (30, 33, WEEKLY_RESET),
                                          (44, 52, WEEKLY_RESET), (60, 6, WEEKLY_RESET + 7 * 24 * H),
                                          (80, 21, WEEKLY_RESET + 7 * 24 * H), (100, 40, WEEKLY_RESET + 7 * 24 * H)]]
DAILY_COST = [(CHART_START + day * 24 * H, nanos) for day, nanos in enumerate(
    [12_500_000_000, 30_000_000_000, 8_000_000_000, 0, 20_250_000_000, 40_000_000, 1_000_000_000])]


def week(width: int, height: int, unicode: bool = True) -> list[str]:
    return ccmon.week_chart(CHART_START, CHART_START + 7 * 24 * H, READINGS, DAILY_COST, width, height, unicode,
                            CHART_ZONE, lambda nanos: ccmon.format_cost(round(nanos)))


def test_week_chart():
    """Claude's weekly % as read (100% at the top), falling at the reset marked on the axis, nothing drawn past
    the last reading; a bar per day for its cost, the largest day the longest, Saturday's $0.04 one eighth."""
    assert week(60, 16) == [
        '100% │',
        '     │',
        '     │              ▁▁▁▁▁',
        '     │              █████             ▃',
        '     │         ██████████      ▂▂▂▂▂▂▂█',
        '     │ ▂▂▂▂▇▇▇▇██████████▃▃▃▃▃▃████████',
        '  0% └──────────────────▲───────────────────────────────────',
        '      Mon 04 Tue 05  Wed 06  Thu 07 Fri 08  Sat 09  Sun 10',
        "▲ Claude's weekly limit reset",
        'Mon 05-04 █████████████████▌                         $12.50',
        'Tue 05-05 ██████████████████████████████████████████ $30.00',
        'Wed 05-06 ███████████▎                               $8.00',
        'Thu 05-07                                            $0.00',
        'Fri 05-08 ████████████████████████████▍              $20.25',
        'Sat 05-09 ▏                                          $0.0400',
        'Sun 05-10 █▍                                         $1.00',
    ]
    assert week(60, 16, unicode=False) == [
        '100% |',
        '     |',
        '     |',
        '     |              #####',
        '     |         ##########             #',
        '     | ################################',
        '  0% +------------------^-----------------------------------',
        '      Mon 04 Tue 05  Wed 06  Thu 07 Fri 08  Sat 09  Sun 10',
        "^ Claude's weekly limit reset",
        'Mon 05-04 ##################                         $12.50',
        'Tue 05-05 ########################################## $30.00',
        'Wed 05-06 ###########                                $8.00',
        'Thu 05-07                                            $0.00',
        'Fri 05-08 ############################               $20.25',
        'Sat 05-09 #                                          $0.0400',
        'Sun 05-10 #                                          $1.00',
    ]


def test_week_chart_at_small_sizes():
    """Without room for both, the days step aside; a narrow legend says less; too small: nothing."""
    assert week(40, 8) == [
        '100% │',
        '     │',
        '     │        ▅▅▅▅',
        '     │      ▅▅████        █',
        '     │ ▂▂▆▆▆██████▂▂▂▂█████',
        '  0% └───────────▲──────────────────────',
        '      Mon Tue  Wed  Thu  Fri  Sat  Sun',
        "▲ Claude's weekly limit reset",
    ]
    assert week(28, 8, unicode=False) == [
        '100% |',
        '     |',
        '     |     ##',
        '     |   ####      #',
        '     |##############',
        '  0% +-------^--------------',
        '      05-04',
        '^ reset',
    ]
    assert week(40, 3) == week(9, 16) == []


def heat(width: int, unicode: bool = True) -> list[str]:
    return ccmon.heatmap(A_WEEK, width, unicode, CHART_ZONE, ccmon.format_count)


def test_heatmap():
    """Days by local hours, each cell shaded by its quarter of the busiest (any usage at least the lightest), a
    legend with the busiest hour's figure; three columns an hour at 80, one at 40, nothing under 28."""
    assert heat(80) == [
        '    0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18 19 20 21 22 23',
        'Mon                         ░░░░░░▒▒▒▓▓▓▓▓▓░░░▒▒▒█████████▒▒▒░░░░░░      ░░░',
        'Tue                         ░░░░░░░░░▒▒▒▒▒▒░░░░░░▒▒▒▒▒▒▒▒▒░░░░░░░░░      ░░░',
        'Wed                         ░░░░░░░░░░░░░░░░░░░░░▒▒▒▒▒▒▒▒▒░░░░░░░░░      ░░░',
        'Thu                         ░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░      ░░░',
        'Fri                         ░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░      ░░░',
        'Sat',
        'Sun                         ░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░░      ░░░',
        '░ up to 25%, ▒ 50%, ▓ 75%, █ 100% of the busiest hour (5.00M); blank: none',
    ]
    assert heat(80, unicode=False) == [
        '    0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18 19 20 21 22 23',
        'Mon                         ......:::******...:::#########:::......      ...',
        'Tue                         .........::::::......:::::::::.........      ...',
        'Wed                         .....................:::::::::.........      ...',
        'Thu                         .......................................      ...',
        'Fri                         .......................................      ...',
        'Sat',
        'Sun                         .......................................      ...',
        '. up to 25%, : 50%, * 75%, # 100% of the busiest hour (5.00M); blank: none',
    ]
    assert heat(40) == [
        '    0  3  6  9  12 15 18 21',
        'Mon         ░░▒▓▓░▒███▒░░  ░',
        'Tue         ░░░▒▒░░▒▒▒░░░  ░',
        'Wed         ░░░░░░░▒▒▒░░░  ░',
        'Thu         ░░░░░░░░░░░░░  ░',
        'Fri         ░░░░░░░░░░░░░  ░',
        'Sat',
        'Sun         ░░░░░░░░░░░░░  ░',
        '░ up to 25%, ▒ 50%, ▓ 75%, █ 100% of the',
        'busiest hour (5.00M); blank: none',
    ]
    assert heat(28, unicode=False) == [
        '    0  3  6  9  12 15 18 21',
        'Mon         ..:**.:###:..  .',
        'Tue         ...::..:::...  .',
        'Wed         .......:::...  .',
        'Thu         .............  .',
        'Fri         .............  .',
        'Sat',
        'Sun         .............  .',
        '. up to 25%, : 50%, * 75%, #',
        '100% of the busiest hour',
        '(5.00M); blank: none',
    ]
    assert heat(27) == []



def test_the_charts_page_shows_real_charts():
    """docs/charts.md's samples are these functions' output for the data above."""
    page = (ROOT / "docs" / "charts.md").read_text()
    for lines in (day_chart(80, 10), week_of_hours(80, 9), day_chart(40, 6, unicode=False), burnup(72, 11),
                  burnup(40, 7, unicode=False), week(72, 17), week(40, 8, unicode=False), heat(80),
                  heat(40, unicode=False)):
        assert "```\n" + "\n".join(lines) + "\n```" in page


def test_the_charts_page_shows_the_monitors_real_frames():
    """docs/charts.md's monitor samples, and the README's opening frame, are the monitor's frames for its golden
    tests' data; the limits report sample is the report's output."""
    page = (ROOT / "docs" / "charts.md").read_text()
    _, settings, now = _frame_fixture()

    def frame(state, snap, width, height, unicode, lines=slice(None)) -> str:
        shown = frame_text(state, snap, settings, width, height, now, unicode=unicode)[0][lines]
        return "```\n" + "\n".join(line.rstrip() for line in shown) + "\n```"
    charts = ccmon.ViewState(tab="charts")
    current, _, _ = _frame_fixture()
    claude = dataclasses.replace(charts_snapshot(settings, now, claude=True), query=current.query, data=current.data)
    for sample in (frame(ccmon.ViewState(tab="daily"), daily_snapshot(settings, now), 80, 24, True, slice(6, 18)),
                   frame(ccmon.ViewState(period="b"), claude, 80, 24, True),
                   frame(charts, charts_snapshot(settings, now), 80, 24, True),
                   frame(charts, charts_snapshot(settings, now, True), 80, 24, True, slice(3, 17)),
                   frame(dataclasses.replace(charts, scroll=3), charts_snapshot(settings, now), 80, 24, True),
                   frame(dataclasses.replace(charts, scroll=4), charts_snapshot(settings, now), 80, 24, True,
                         slice(6, 16)),
                   frame(dataclasses.replace(charts, scroll=1), charts_snapshot(settings, now), 40, 12, False)):
        assert sample in page
    assert "\n".join(LIMITS_CHART[1:]) + "\n```" in page
    assert frame(ccmon.ViewState(period="b"), claude, 80, 24, True) in (ROOT / "README.md").read_text()  # its front
