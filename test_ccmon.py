"""ccmon's test suite: a real server on a loopback port, real OpenTelemetry SDK exporters,
a real SQLite file, the real monitor in a pseudo-terminal. Run: python -m pytest -q"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
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
CLAUDE_RESOURCE = {"service.name": "claude-code", "service.version": "2.0.14", "os.type": "linux",
                   "host.arch": "amd64"}


# ---------------------------------------------------------------- helpers: server process, exporters, queries

class ServerProcess:
    """`ccmon --server` as a subprocess on an ephemeral loopback port, with its stderr collected."""

    def __init__(self, workdir: Path, *extra: str, db: Path | None = None, address: str = "127.0.0.1:0",
                 command: list[str] | None = None, env: dict | None = None):
        self.workdir, self.db, self.env = workdir, db or workdir / "ccmon.db", env or {}
        self.args = [*(command or CCMON), "--server", "--server-address", address, "--server-http-address",
                     "127.0.0.1:0", "--database-path", str(self.db), *extra]
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.port = self.http_port = 0

    def start(self) -> "ServerProcess":
        self.lines = []
        self.proc = subprocess.Popen(self.args, cwd=self.workdir, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "HOME": str(self.workdir), **self.env})
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line)
                if match := re.search(r" ready: gRPC \S+:(\d+)(?:, HTTP \S+:(\d+))?$", line):
                    self.port, self.http_port = int(match.group(1)), int(match.group(2) or 0)
                    ready.set()
            ready.set()  # the server exited before it was ready

        threading.Thread(target=pump, daemon=True).start()
        assert ready.wait(60), f"server did not start within 60 s: {''.join(self.lines)}"
        assert self.port, f"server failed to start: {''.join(self.lines)}"
        return self

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(20)
        time.sleep(0.05)  # let the pump thread read the last lines
        return code

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
    request = ccmon_pb2.GetStatsRequest()
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


# ---------------------------------------------------------------- server: ingestion and the query service

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
    page = server.query().GetAPIRequests(ccmon_pb2.GetAPIRequestsRequest(limit=2))
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
    assert "logs: 1 records, 1 api requests, 0 new, 0 rejected" in server.log


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
        deadline = time.time() + 10
        while "retention: deleted" not in srv.log and time.time() < deadline:
            time.sleep(0.05)
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
    assert f"ccmon: cannot listen on {server.target}: the port is in use" in second.stderr
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    for path, message in ((foreign, "is an SQLite database of something else"),
                          (garbage, "cannot use")):
        result = subprocess.run([sys.executable, str(ROOT / "ccmon.py"), "-s", "--server-address",
                                 "127.0.0.1:0", "--server-http-address", "off", "--database-path", str(path)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1
        assert message in result.stderr and str(path) in result.stderr
    assert garbage.read_bytes() == b"this is not a database" * 100


# ---------------------------------------------------------------- configuration

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
        monitor_timezone="UTC", refresh_interval_s=5, plan="unset", max_tokens=0, source="defaults")


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
    (["--server-token", "two words"], "--server-token: a token must be a string without spaces"),
]


@pytest.mark.parametrize("args,message", CONFIG_ERRORS)
def test_config_flag_errors(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, err = run_main(["--server", *args], capsys)
    assert code == 2
    assert err == f"ccmon: config error: {message}\n"


FILE_ERRORS = [
    ("config.toml", '[claude]\nplan = "gold"\n', "{path}: claude.plan: unknown plan 'gold' (accepted: unset, pro, "
                                                 "max, max20)"),
    ("config.toml", '[claude]\nmax_tokens = -1\n',
     "{path}: claude.max_tokens: invalid token limit -1 (use a whole number >= 0, 0 meaning the plan's default, or "
     "'auto' to learn it)"),
    ("config.toml", '[server]\nport = 4317\n', "{path}: unknown key server.port (known in [server]: address, "
                                               "http_address, retention, token, tls_cert, tls_key, tls_client_ca, "
                                               "max_message_size)"),
    ("config.toml", '[mointor]\nserver = "x:1"\n', "{path}: unknown section [mointor] (known: database, server, "
                                                   "monitor, claude)"),
    ("config.toml", '[monitor]\ntimezone = 3\n', "{path}: monitor.timezone: expected a non-empty string, got 3"),
    ("config.toml", 'plan = \n', "{path}: not valid TOML: "),
    ("config.json", '{"claude": ', "{path}: not valid JSON: "),
    ("config.yaml", 'claude: [unclosed', "{path}: not valid YAML: "),
    ("config.json", '[1, 2]', "{path}: the top level must be a table of sections"),
    ("config.toml", 'claude = 5\n', "{path}: [claude] must be a table of settings"),
    ("config.toml", '[monitor]\ntoken = 5\n', "{path}: monitor.token: a token must be a string without spaces"),
    ("config.toml", '[monitor]\ntls_ca = true\n', "{path}: monitor.tls_ca: expected a file path, got True"),
]


@pytest.mark.parametrize("name,content,message", FILE_ERRORS)
def test_config_file_errors(name, content, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / name).write_text(content)
    code, err = run_main(["--server"], capsys)
    assert code == 2
    assert err.startswith("ccmon: config error: " + message.format(path=tmp_path / name))


def test_yaml_without_pyyaml_says_how_to_get_it(tmp_path):
    (tmp_path / "config.yaml").write_text("claude:\n  plan: pro\n")
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['yaml'] = None; "
                             f"sys.path.insert(0, {str(ROOT)!r}); import ccmon; sys.exit(ccmon.main(['-s']))"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "config.yaml: YAML config needs PyYAML: run 'pip install pyyaml'" in result.stderr


def test_version_flag(capsys):
    code, _ = run_main(["--version"], capsys)
    assert code == 0


# ---------------------------------------------------------------- domain math

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


# ---------------------------------------------------------------- monitor: block math, formatting, keys, layouts

BERLIN = ccmon.ZoneInfo("Europe/Berlin")


def local_ms(text: str, zone=BERLIN) -> int:
    return ccmon.ms_from_datetime(dt.datetime.fromisoformat(text).replace(tzinfo=zone))


@pytest.mark.parametrize("text,hour", [("5am", 5), ("11pm", 23), ("12am", 0), ("12pm", 12), ("1AM", 1),
                                       (" 07pm ", 19), ("10 am", 10)])
def test_block_hour_forms(text, hour):
    assert ccmon.parse_block_mode(text) == hour


@pytest.mark.parametrize("text", ["25am", "5", "noon", "13pm", "0am", "5 o'clock", "automatic"])
def test_block_hour_errors(text, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["-b", text], capsys)
    assert code == 2
    assert err == (f"ccmon: config error: -b/--block: invalid block start {text!r} (use auto, or an hour from 1 to "
                   "12 followed by am or pm, such as 5am or 11pm)\n")


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


def test_formatting():
    assert [ccmon.format_count(n) for n in (0, 950, 999, 1000, 1234, 12_345, 123_456, 999_499, 999_500,
                                            4_560_000, 1_200_000_000)] == \
        ["0", "950", "999", "1.00K", "1.23K", "12.3K", "123K", "999K", "1.00M", "4.56M", "1.20B"]
    assert [ccmon.format_cost(n) for n in (0, 1, 42_100_000, 999_990_000, 12_345_678_901, 1_234_567_000_000)] == \
        ["$0.00", "<$0.0001", "$0.0421", "$1.00", "$12.35", "$1,234.57"]
    assert [ccmon.format_duration(ms) for ms in (850, 1500, 45_000, 12 * 60_000, 65 * 60_000)] == \
        ["850ms", "1.5s", "45s", "12m", "1h05m"]
    assert ccmon.short_model("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"


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
                                (("haiku", usage(1, 100, 50)), ("sonnet", usage(8, 14000, 7000, 0, 0, 5))))
    models = ["claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001", "claude-opus-4-1-20250805"] * 4
    rows = tuple(ccmon.RequestRow(now - k * 7 * 60_000, model, f"{k:04d}abcd-ef",
                                  usage(1, 1000 + k, 200 * k, 30000, 0, 12_345_000 * k + 1, 1500 * k))
                 for k, model in enumerate(models))
    query = ccmon.query_for(ccmon.ViewState(period="b"), settings, now)
    return ccmon.Snapshot(query, now, 500, period=period, requests=rows, period_requests=12, limits=limits), \
        settings, now


def daily_snapshot(settings, now):
    query = ccmon.query_for(ccmon.ViewState(tab="daily"), settings, now)
    days = tuple((f"2026-03-{10 - k:02d}", ccmon.Split(ccmon.Usage(k, 10 * k), ccmon.Usage(
        3 * k, 1000 * k, 500 * k, 20000 * k, 700 * k, 250_000_000 * k))) for k in range(10))
    block = ccmon.Split(ccmon.Usage(), ccmon.Usage(8, 14000, 7000))
    limits = ccmon.LimitFigures(ccmon.current_block(now, settings.zone, 5), block, 700.0, 35_000, None, ())
    return ccmon.Snapshot(query, now, 500, days=days, limits=limits)


def frame_text(state, snap, settings, width, height, now, connection=None, unicode=False):
    frame = ccmon.render(state, connection or ccmon.Connection(True, attempts=1), snap, settings, width, height,
                         now, ccmon.Glyphs.for_terminal(unicode))
    return [ccmon.line_text(line) for line in frame.lines], frame


FRAME_80x24 = [
    " ccmon - Claude Code usage monitor                                       v0.1.0 ",
    "  Current   Daily Usage   Models   Sessions   Tools & errors   Users   Blocks  ",
    " * connected 127.0.0.1:4317 | current block | newest first | updated 10:30:00",
    "-- Usage - current block -------------------------------------------------------",
    "         Requests  Limited    Cache    Total       Cost    Burn rate",
    "Base            4    2.80K    10.5K    13.3K    $0.0040            -",
    "Premium        12    15.0K     262K     277K      $1.23      500/min",
    "Total          16    17.8K     272K     290K      $1.24            -",
    "-- Block 10:00-15:00 -----------------------------------------------------------",
    "Tokens ########################................  60%  21.0K / 35.0K",
    "Time   ####....................................  10% 4h30m left, ends 15:00",
    "Burn 700/min; at this pace the limit is reached at 10:50",
    "Week   21.0K premium tokens, <$0.0001 (sonnet 21.0K)",
    "-- Requests 1-8 of 12 ----------------------------------------------------------",
    "Time     Model                    Input  Output   Cache   Total      Cost    Dur",
    "10:30:00 claude-sonnet-4-5        1.00K       0   30.0K   31.0K  <$0.0001    0ms",
    "10:23:00 claude-haiku-4-5         1.00K     200   30.0K   31.2K   $0.0123   1.5s",
    "10:16:00 claude-opus-4-1          1.00K     400   30.0K   31.4K   $0.0247   3.0s",
    "10:09:00 claude-sonnet-4-5        1.00K     600   30.0K   31.6K   $0.0370   4.5s",
    "10:02:00 claude-haiku-4-5         1.00K     800   30.0K   31.8K   $0.0494   6.0s",
    "09:55:00 claude-opus-4-1          1.00K   1.00K   30.0K   32.0K   $0.0617   7.5s",
    "09:48:00 claude-sonnet-4-5        1.01K   1.20K   30.0K   32.2K   $0.0741   9.0s",
    "09:41:00 claude-haiku-4-5         1.01K   1.40K   30.0K   32.4K   $0.0864    10s",
    "h/d/w/m/a/b period  o order  Tab/1-7 tab  u user  ? help  q quit",
]

FRAME_40x12 = [
    " ccmon - Claude Code usage monitor",
    "  1 Now   2 Day   3 Mod   4 Ses   5 Tool",
    " * connected | current block",
    "-- Usage - current block ---------------",
    "         Requests  Limited       Cost",
    "Base            4    2.80K    $0.0040",
    "Premium        12    15.0K      $1.23",
    "Total          16    17.8K      $1.24",
    "-- Block 10:00-15:00 -------------------",
    "Tokens ###..  60%  21.0K / 35.0K",
    "Time   .....  10% 4h30m left, ends 15:00",
    "h/d/w/m/a/b  o  1-7  u  ? help  q quit",
]

DAILY_80x24 = [
    "-- Daily usage - last 10 days (Europe/Berlin) ----------------------------------",
    "Date        Base  Prem  Input Output CacheR CacheW  Total     Burn    Prem $",
    "2026-03-10     0     0      0      0      0      0      0    0/min     $0.00",
    "2026-03-09     1     3  1.00K    500  20.0K    700  22.2K    1/min   $0.2500",
    "2026-03-08     2     6  2.00K  1.00K  40.0K  1.40K  44.4K    2/min   $0.5000",
]


def test_render_current_tab_80x24_exact():
    snap, settings, now = _frame_fixture()
    lines, frame = frame_text(ccmon.ViewState(period="b"), snap, settings, 80, 24, now)
    assert lines == FRAME_80x24
    assert (frame.page_rows, frame.total_rows) == (8, 12)


def test_render_40x12_exact_and_too_small():
    snap, settings, now = _frame_fixture()
    assert frame_text(ccmon.ViewState(period="b"), snap, settings, 40, 12, now)[0] == FRAME_40x12
    assert frame_text(ccmon.ViewState(), snap, settings, 39, 12, now)[0] == ["terminal too small: 39x12, need 40x12"]
    assert frame_text(ccmon.ViewState(), snap, settings, 80, 11, now)[0] == \
        ["terminal too small: 80x11, need 40x12"]


def test_render_wide_terminals_show_more_rows_and_columns():
    snap, settings, now = _frame_fixture()
    lines, frame = frame_text(ccmon.ViewState(period="b"), snap, settings, 120, 40, now)
    assert frame.page_rows == 24 and len(lines) == 40
    assert lines[14] == ("Time     Model                          Input  Output   Cache   Total      Cost    Dur "
                         "Session ")
    assert lines[26] == ("09:13:00 claude-opus-4-1                1.01K   2.20K   33.2K   33.2K   $0.1358    16s "
                         "0011abcd").replace("33.2K   33.2K", "30.0K   33.2K")
    assert lines[13].startswith("-- Requests 1-12 of 12 --")
    wide, _ = frame_text(ccmon.ViewState(period="b"), snap, settings, 200, 60, now, unicode=True)
    assert wide[9] == "Tokens ████████████████████████░░░░░░░░░░░░░░░░  60%  21.0K / 35.0K"
    assert wide[0].endswith("v0.1.0 ") and len(wide[0]) == 200


def test_render_daily_tab():
    snap, settings, now = _frame_fixture()
    daily = daily_snapshot(settings, now)
    lines, frame = frame_text(ccmon.ViewState(tab="daily"), daily, settings, 80, 24, now)
    assert lines[7] == "Week   0 premium tokens, $0.00" and lines[8:13] == DAILY_80x24
    assert lines[20] == "Total         45   135  45.0K  22.5K   900K  31.5K   999K             $11.25"
    assert (frame.page_rows, frame.total_rows) == (12, 10)
    narrow, _ = frame_text(ccmon.ViewState(tab="daily", scroll=2), daily, settings, 40, 14, now)
    assert narrow[4:13] == [
        "Tokens ###..  60%  21.0K / 35.0K",
        "Time   .....  10% 4h30m left, ends 15:00",
        "Burn 700/min; limit at 10:50",
        "Week   0 premium tokens, $0.00",
        "-- Daily usage - last 10 days (Europe/Be",
        "Date        Prem Output  Total    Prem $",
        "2026-03-08     6  1.00K  44.4K   $0.5000",
        "2026-03-07     9  1.50K  66.6K   $0.7500",
        "Total        135  22.5K   999K    $11.25"]
    # The current tab's snapshot never stands in for the daily tab while it loads.
    assert "Loading..." in frame_text(ccmon.ViewState(tab="daily"), snap, settings, 80, 24, now)[0]


def test_render_states_without_data():
    snap, settings, now = _frame_fixture()
    empty = dataclasses_replace(snap, server_requests=0)
    lines, _ = frame_text(ccmon.ViewState(), empty, settings, 80, 24, now)
    assert "| Waiting for data: this server has not received any Claude Code request yet. |" in lines[4]
    assert any("export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317" in line for line in lines)
    down = ccmon.Connection(False, "connection refused", now + 4000, 3)
    lines, _ = frame_text(ccmon.ViewState(), None, settings, 80, 24, now, connection=down)
    assert lines[2] == " * disconnected (connection refused) - retrying in 4s | all time | newest first"
    assert lines[4] == ("Cannot reach the ccmon server at 127.0.0.1:4317: connection refused. Is 'ccmon --server' "
                        "running?")[:80]
    stale, _ = frame_text(ccmon.ViewState(period="b"), snap, settings, 80, 24, now, connection=down)
    assert stale[2].startswith(" * disconnected (connection refused) - retrying in 4s")
    assert stale[6] == FRAME_80x24[6]  # the last data stays on screen
    help_lines, _ = frame_text(ccmon.ViewState(help=True), snap, settings, 80, 24, now)
    assert help_lines[5].strip() == "| h  last hour        d  last 24 hours  |"
    no_block, _ = frame_text(ccmon.ViewState(), dataclasses_replace(snap, limits=None), _settings(block_hour=None),
                             80, 24, now)
    assert no_block[8] == "Block tracking is off: start with -b auto (or -b 5am for fixed 5-hour windows)."
    unlimited = dataclasses_replace(snap, limits=dataclasses_replace(snap.limits, limit=None))
    no_limit, _ = frame_text(ccmon.ViewState(), unlimited, _settings(limit=None), 80, 24, now)
    assert no_limit[9] == "Tokens 21.0K premium (no limit: set claude.plan or claude.max_tokens)"
    assert no_limit[11] == "Burn 700/min"


def test_render_never_overflows_any_size():
    snap, settings, now = _frame_fixture()
    daily = daily_snapshot(settings, now)
    for width in range(30, 220, 7):
        for height in range(8, 70, 5):
            for state, data in ((ccmon.ViewState(period="b"), snap), (ccmon.ViewState(tab="daily"), daily),
                                (ccmon.ViewState(help=True), snap)):
                lines, _ = frame_text(state, data, settings, width, height, now, unicode=True)
                assert len(lines) <= height and all(len(line) <= width for line in lines)


def dataclasses_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------- monitor end to end: a real pty, a real server

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
        self.proc = subprocess.Popen([*(command or CCMON), *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=environment, cwd=cwd, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # so ^C is SIGINT
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
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.text
            if (predicate(text) if callable(predicate) else predicate in text):
                return text
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


def line_with(text: str, prefix: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(prefix))


def block_flag_for_now() -> str:
    """A -b value whose block started two hours ago (UTC), so recent requests fall inside it."""
    hour = (dt.datetime.now(dt.timezone.utc).hour - 2) % 24
    return f"{hour % 12 or 12}{'am' if hour < 12 else 'pm'}"


def test_monitor_end_to_end_in_a_pty(tmp_path):
    srv = ServerProcess(tmp_path).start()
    events = [("api_request", api_request(1, hours_ago(0.5), input_tokens="1200", output_tokens=300,
                                          cost_usd=0.25, duration_ms=4000)),
              ("api_request", api_request(2, hours_ago(0.25), model="claude-haiku-4-5-20251001", input_tokens=50,
                                          output_tokens=20, cache_read_tokens=1000, cost_usd=0.001)),
              ("api_request", api_request(3, hours_ago(30), model="claude-opus-4-1", input_tokens=2000,
                                          output_tokens=1000, cost_usd=1.5))]
    sdk_export(srv.port, events)
    monitor = MonitorPty(["--monitor-server", srv.target, "-b", block_flag_for_now(), "--claude-plan", "pro",
                          "--monitor-refresh-interval", "1s"], cwd=tmp_path, env={"HOME": str(tmp_path)})
    try:
        screen = monitor.wait_for("Requests 1-2 of 2", "the current block's requests")
        assert "connected 127.0.0.1" in screen and "current block" in screen
        assert line_with(screen, "Premium").split() == ["Premium", "1", "1.50K", "0", "1.50K", "$0.2500",
                                                        line_with(screen, "Premium").split()[-1]]
        assert "1.50K / 7.00K" in line_with(screen, "Tokens")
        monitor.send(b"a")
        screen = monitor.wait_for("Requests 1-3 of 3", "all time")
        assert line_with(screen, "Total").split()[1:6] == ["3", "4.57K", "1.00K", "5.57K", "$1.75"]
        monitor.send(b"d")
        screen = monitor.wait_for("Requests 1-2 of 2", "the last 24 hours")
        assert "last 24 hours" in screen.splitlines()[2]
        monitor.send(b"w")
        monitor.wait_for("Requests 1-3 of 3", "the last 7 days")
        rows = [line for line in monitor.text.splitlines() if re.match(r"\d\d-\d\d \d\d:\d\d claude", line)]
        assert [row.split()[2] for row in rows] == ["claude-haiku-4-5", "claude-sonnet-4-5", "claude-opus-4-1"]
        monitor.send(b"o")
        monitor.wait_for("oldest first", "the sort order")
        screen = monitor.wait_for(lambda text: re.search(r"\d\d:\d\d claude-opus-4-1 .*\n.*claude-sonnet", text),
                                  "oldest first rows")
        monitor.send(b"\t")
        screen = monitor.wait_for("Daily usage - last 30 days (UTC)", "the daily tab")
        assert line_with(screen, "Total").split() == ["Total", "1", "2", "3.20K", "1.30K", "0", "0", "4.50K",
                                                      "$1.75"]
        monitor.send(b"3")
        screen = monitor.wait_for("Models - last 7 days", "the models tab")
        assert line_with(screen, "claude-opus-4-1").split()[1:6] == ["1", "2.00K", "1.00K", "0", "$1.50"]
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


@pytest.mark.parametrize("term", ["xterm", "screen", "tmux-256color", "linux", "vt100"])
def test_monitor_runs_on_every_terminal_type_and_without_color(term, tmp_path):
    monitor = MonitorPty(["--monitor-server", "127.0.0.1:9"], term=term, cwd=tmp_path,
                         env={"HOME": str(tmp_path), "NO_COLOR": "1", "LANG": "C", "LC_ALL": "C"})
    try:
        screen = monitor.wait_for("disconnected", "the unreachable server")
        assert "Cannot reach the ccmon server at 127.0.0.1:9" in screen
        assert "*" in screen and "●" not in screen  # ASCII glyphs outside UTF-8 locales
        sgr_params = {p for group in re.findall(rb"\x1b\[([0-9;]*)m", bytes(monitor.raw)) for p in group.split(b";")}
        assert not {p for p in sgr_params if re.fullmatch(rb"(3|4|9|10)[0-8]", p)}  # no colours with NO_COLOR
        monitor.send(b"\x03")
        assert monitor.close() == 0
    finally:
        if monitor.proc.poll() is None:
            monitor.proc.kill()


def test_monitor_bad_address_and_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["--monitor-server", "nonsense"], capsys)
    assert (code, err) == (2, "ccmon: config error: --monitor-server: invalid address 'nonsense' (use HOST:PORT such "
                               "as 127.0.0.1:4317)\n")
    monitor = MonitorPty(["--server", "no-such-host.invalid:4317"], cwd=tmp_path, env={"HOME": str(tmp_path)})
    try:
        screen = monitor.wait_for("disconnected", "the DNS failure")
        assert "cannot resolve the server's host name" in screen
        assert "Traceback" not in screen
        monitor.send(b"q")
        assert monitor.close() == 0
    finally:
        if monitor.proc.poll() is None:
            monitor.proc.kill()


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
    recent = int(time.time() * 1000) - 10 * 60_000
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
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == (
        f"${expected['daily_cost']:.2f} | ${expected['monthly_cost']:.2f} | "
        f"{expected['daily_cost'] / (100 / days) * 100:.0f}% | {expected['monthly_cost']:.0f}% | "
        f"{ccmon.format_count(expected['daily_tokens'])} | {ccmon.format_count(expected['monthly_tokens'])} | "
        f"$0.00 | ${expected['daily_cost']:.2f}s @nonsense\n")
    result = run_ccmon([*base, "--json"], tmp_path)
    figures = json.loads(result.stdout)
    assert figures == {"daily_cost": expected["daily_cost"], "monthly_cost": expected["monthly_cost"],
                       "daily_tokens": expected["daily_tokens"], "monthly_tokens": expected["monthly_tokens"],
                       "daily_plan_usage": figures["daily_plan_usage"], "monthly_plan_usage": expected["monthly_cost"],
                       "session_id": "latest", "session_cost": 0.004,
                       "weekly_tokens": 5500, "weekly_cost": 3.75, "weekly_usage": None}
    assert figures["daily_plan_usage"] == pytest.approx(expected["daily_cost"] / (100 / days) * 100)
    unset = run_ccmon(["--monitor-server", server.target, "--format", "@daily_plan_usage"], tmp_path)
    assert unset.stdout == "0%\n"


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


# ---------------------------------------------------------------- ccmon.pyz and the Docker image

@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pyz") / "ccmon.pyz"
    result = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--output", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"built {re.escape(str(output))} \(\d+\.\d MB, build [0-9a-f]{{16}}\) for CPython "
                        rf"{sys.version_info[0]}\.{sys.version_info[1]} on this platform\n", result.stdout)
    return output


def bare(pyz: Path) -> list[str]:
    """The interpreter with no site-packages at all (-S) and no user environment (-I)."""
    return [sys.executable, "-I", "-S", str(pyz)]


def test_bare_interpreter_has_no_dependencies(tmp_path):
    probe = subprocess.run([sys.executable, "-I", "-S", "-c", "import grpc"], capture_output=True, text=True)
    assert "No module named 'grpc'" in probe.stderr  # so the pyz tests below prove the pyz carries everything


def test_pyz_server_format_and_monitor_with_nothing_installed(pyz, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    version = run_ccmon(["--version"], tmp_path, command=bare(pyz), env=env)
    assert (version.returncode, version.stdout) == (0, f"ccmon {ccmon.VERSION}\n")
    srv = ServerProcess(tmp_path, command=bare(pyz), env=env).start()
    try:
        sdk_export(srv.port, MIXED_EVENTS)
        result = run_ccmon(["--monitor-server", srv.target, "--format", "@monthly_tokens"], tmp_path,
                           command=bare(pyz), env=env)
        assert result.returncode == 0 and result.stdout in {"0\n", "52.3K\n"}  # March 2026 data; now is later
        stats_now = stats(srv)
        assert (stats_now.total_requests, stats_now.total_cost.amount) == (3, 0.143075)
        monitor = MonitorPty(["--monitor-server", srv.target, "--monitor-timezone", "America/New_York"],
                             cwd=tmp_path, env=env, command=bare(pyz))
        try:
            screen = monitor.wait_for("Requests 1-3 of 3", "the monitor from the pyz")
            assert line_with(screen, "Total").split()[1:2] == ["3"]
            monitor.send(b"q")
            assert monitor.close() == 0
        finally:
            if monitor.proc.poll() is None:
                monitor.proc.kill()
        yaml_config = tmp_path / "config.yaml"
        yaml_config.write_text("claude:\n  plan: max20\n")
        result = run_ccmon(["--monitor-server", srv.target, "--format", "@daily_plan_usage"], tmp_path,
                           command=bare(pyz), env=env)
        assert (result.returncode, result.stdout) == (0, "0%\n")  # YAML parsed by the bundled PyYAML
    finally:
        srv.stop()


def test_pyz_concurrent_first_runs_share_one_cache(pyz, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    procs = [subprocess.Popen(bare(pyz) + ["--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for _ in range(4)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0]
    assert [out for out, _ in outputs] == [f"ccmon {ccmon.VERSION}\n".encode()] * 4
    entries = sorted(p.name for p in (tmp_path / "cache" / "ccmon").iterdir())
    assert len(entries) == 1 and re.fullmatch(r"[0-9a-f]{16}", entries[0])  # no half-unpacked leftovers
    assert (tmp_path / "cache" / "ccmon" / entries[0] / ".complete").is_file()


def test_pyz_falls_back_to_temp_dir_when_home_is_unusable(pyz, tmp_path):
    env = {**os.environ, "HOME": "/dev/null/nohome", "TMPDIR": str(tmp_path)}
    env.pop("XDG_CACHE_HOME", None)
    result = subprocess.run(bare(pyz) + ["--version"], capture_output=True, text=True, env=env, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"ccmon {ccmon.VERSION}\n")
    assert list(tmp_path.glob(f"ccmon-{os.getuid()}/*/ccmon.py"))
    # A cache folder that others can write to is never imported from.
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "ccmon").mkdir(mode=0o777)
    os.chmod(shared / "ccmon", 0o777)
    env = {**env, "XDG_CACHE_HOME": str(shared), "TMPDIR": str(tmp_path / "tmp2")}
    (tmp_path / "tmp2").mkdir()
    result = subprocess.run(bare(pyz) + ["--version"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and not list((shared / "ccmon").iterdir())
    assert list((tmp_path / "tmp2").glob(f"ccmon-{os.getuid()}/*/ccmon.py"))
    corrupt = tmp_path / "corrupt.pyz"
    corrupt.write_bytes(pyz.read_bytes()[:200_000])
    result = subprocess.run([sys.executable, "-I", "-S", str(corrupt), "--version"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_pyz_build_is_reproducible_and_lean(pyz, tmp_path):
    again = tmp_path / "again.pyz"
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "-o", str(again)], check=True,
                   capture_output=True, timeout=600)
    assert again.read_bytes() == pyz.read_bytes()
    import zipfile
    names = zipfile.ZipFile(pyz).namelist()
    assert names[0] == "__main__.py" and "app/ccmon.py" in names and "app/tzdata/zoneinfo/Europe/Berlin" in names
    assert not [n for n in names if n.endswith((".pyc", ".pyi")) or "__pycache__" in n or "/RECORD" in n
                or "test_ccmon" in n]
    assert any(n.startswith("app/yaml/") for n in names) and not any("_yaml." in n for n in names)


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
    assert froms == ["FROM python:${PYTHON_VERSION}-slim AS build", "FROM python:${PYTHON_VERSION}-slim"]
    assert "ARG PYTHON_VERSION=3.12" in lines
    build_stage = joined.split("FROM python:${PYTHON_VERSION}-slim\n")[0]
    assert "RUN python build_zipapp.py --output /out/ccmon.pyz" in build_stage
    final = joined.split("FROM python:${PYTHON_VERSION}-slim\n")[1]
    assert "COPY --from=build /out/ccmon.pyz /app/ccmon.pyz" in final
    assert re.search(r"^USER ccmon$", final, re.M) and "useradd --system --uid 10001" in final
    assert final.index("USER ccmon") < final.index("ENTRYPOINT")
    assert "pip install" not in final  # nothing installed in the runtime image
    assert "VOLUME /data" in final and "EXPOSE 4317 4318" in final and "STOPSIGNAL SIGTERM" in final
    healthcheck = next(line for line in final.splitlines() if line.startswith("HEALTHCHECK"))
    assert healthcheck.endswith('CMD ["python", "/app/ccmon.pyz", "--health", "--monitor-server", "127.0.0.1:4317"]')
    assert 'ENTRYPOINT ["python", "/app/ccmon.pyz"]' in final
    assert ('CMD ["--server", "--server-address", "0.0.0.0:4317", "--server-http-address", "0.0.0.0:4318",  '
            '"--database-path", "/data/ccmon.db"]') in final
    # Every file the build stage copies exists, and .dockerignore lets exactly those through.
    copied = next(line for line in lines if line.startswith("COPY requirements.txt")).split()[1:-1]
    assert all((ROOT / name).is_file() for name in copied)
    allowed = [line[1:] for line in (ROOT / ".dockerignore").read_text().split() if line.startswith("!")]
    assert sorted(allowed) == sorted(copied)
    # The HEALTHCHECK and CMD arguments are ones ccmon accepts.
    parser = ccmon.build_parser()
    assert parser.parse_args(["--health", "--monitor-server", "127.0.0.1:4317"]).health
    assert parser.parse_args(["--server", "--server-address", "0.0.0.0:4317", "--server-http-address", "0.0.0.0:4318",
                              "--database-path", "/data/x"]).server


# ---------------------------------------------------------------- OTLP/HTTP, the Node.js SDK, tokens, TLS, limits, faults

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


@pytest.fixture(scope="session")
def node_emitter() -> Path:
    """The OpenTelemetry JS SDK installed from the npm registry once into a cache folder."""
    import hashlib
    key = hashlib.sha256(json.dumps(NODE_PACKAGES, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ccmon-tests" / f"node-otel-{key}"
    script = cache / "emit.js"
    if not (cache / "node_modules" / "@opentelemetry" / "exporter-logs-otlp-grpc").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(cache),
                        *[f"{name}@{version}" for name, version in NODE_PACKAGES.items()]],
                       check=True, capture_output=True, timeout=600)
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
    import random
    srv = ServerProcess(tmp_path).start()
    acknowledged: set[int] = set()
    rng = random.Random(7)
    next_seq = 0
    for round_number in range(3):
        stop = threading.Event()

        def send(port=srv.port):
            nonlocal next_seq
            stub = logs_service_pb2_grpc.LogsServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            while not stop.is_set():
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
        time.sleep(rng.uniform(0.3, 1.2))
        srv.proc.kill()
        srv.proc.wait()
        stop.set()
        for sender in senders:
            sender.join()
        assert db_rows(srv.db, "PRAGMA integrity_check") == [("ok",)]
        srv.start()
        stored = db_rows(srv.db, "SELECT seq, COUNT(*) FROM requests GROUP BY seq")
        stored_seqs = {seq for seq, _ in stored}
        print(f"round {round_number}: {len(acknowledged)} acknowledged, {len(stored_seqs)} stored")
        assert all(count == 1 for _, count in stored)
        assert acknowledged <= stored_seqs
        assert stats(srv).total_tokens.input == len(stored_seqs)
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


def test_example_config_is_valid_and_shows_the_defaults(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text((ROOT / "config.toml.example").read_text())
    example = config_for(tmp_path, monkeypatch)
    (tmp_path / "config.toml").unlink()
    assert dataclasses_replace(example, source="defaults") == config_for(tmp_path, monkeypatch)


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


def test_block_rollover_renders_the_fetched_block():
    snap, settings, now = _frame_fixture()
    next_block = ccmon.current_block(now, settings.zone, settings.block_mode)[1]
    for moment in (next_block, next_block + 1, next_block + 60_000):
        lines, _ = frame_text(ccmon.ViewState(period="b"), snap, settings, 80, 24, moment)
        assert lines[8].startswith("-- Block 10:00-15:00 ")
        assert lines[11] == "Burn 700/min; within limit at this pace (60% at block end)"  # the block as it ended
    assert ccmon.BlockStatus(0, ccmon.BLOCK_MS, 0, used=10, limit=100).limit_reached_ms() is None


def test_rollups_always_agree_with_raw_rows(tmp_path):
    """Random inserts (with duplicates) and retention sweeps; every period, in any timezone, answered from the
    rollups equals the brute-force sum over the raw rows."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    store = ccmon.Store(tmp_path / "rollups.db")
    base = ccmon.parse_iso_ms("2026-03-01T00:00:00Z")
    span = 40 * 86400_000
    moments = st.integers(min_value=base - 86400_000, max_value=base + span)
    row = st.tuples(moments, st.sampled_from(["s1", "s2", ""]), st.integers(min_value=0, max_value=50),
                    st.sampled_from(["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"]),
                    st.sampled_from(["ana@example.com", "bo@example.com", ""]),
                    *[st.integers(min_value=0, max_value=10 ** 6)] * 6,
                    st.one_of(st.none(), st.integers(min_value=0, max_value=5000)),  # ttft_ms
                    st.none(), st.none(), st.none(), st.none(), st.sampled_from([0, 0, 1]))  # ..., origin
    operation = st.one_of(st.tuples(st.just("insert"), st.lists(row, min_size=1, max_size=30)),
                          st.tuples(st.just("sweep"), moments))
    zones = st.sampled_from(["UTC", "Europe/Berlin", "Asia/Kolkata", "America/St_Johns", "Australia/Lord_Howe"])

    def brute_force(start, end, by="model_name", user=None):
        rows = db_rows(store.path, f"SELECT {by}, SUM(origin = 0), SUM(input_tokens), SUM(output_tokens), "
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
        for start, end in periods:
            lo, hi = min(start, end), max(start, end)
            assert store.usage(lo, hi) == brute_force(lo, hi)
            assert store.usage(lo, hi, by="user") == brute_force(lo, hi, by="user_name")
            assert store.usage(lo, hi, user="ana@example.com") == brute_force(lo, hi, user="ana@example.com")
        zone = ccmon.ZoneInfo(zone_name)
        for _, lo, hi in ccmon.day_bounds(zone, base + span, 42)[::7]:
            assert store.usage(lo, hi) == brute_force(lo, hi)
        assert store.usage(0, base + 2 * span) == brute_force(0, base + 2 * span)

    check()
    assert db_rows(store.path, "SELECT COUNT(*) FROM usage_rollup WHERE rows <= 0") == [(0,)]
    store.close()


# ---------------------------------------------------------------- wrong servers, empty tokens, TLS files, future records, memory

GO_CCMON = Path("/work/shared/peers/go-ccmon/ccmon")


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
            client.snapshot(ccmon.query_for(ccmon.ViewState(), _settings(block_hour=None), int(time.time() * 1000)))
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


@pytest.fixture
def go_server(tmp_path):
    """The original Go ccmon server (v0.9.4) on a free loopback port, once it answers gRPC."""
    if not GO_CCMON.exists():
        pytest.skip(f"{GO_CCMON} is not on this machine")
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([str(GO_CCMON), "--server", "--server-address", address, "--database-path",
                             str(tmp_path / "go.db")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield address
    finally:
        proc.terminate()
        proc.wait(20)


def test_clients_against_the_original_go_server(go_server, tmp_path):
    port = int(go_server.rsplit(":", 1)[1])
    # The Go server reads figures only from strings, as Claude Code sends them.
    assert sdk_export(port, [("api_request", api_request(1, iso(int(time.time() * 1000) - 60_000),
                                                         input_tokens="100", cost_usd="0.5"))]) == ["SUCCESS"]
    health = run_ccmon(["--health", "--monitor-server", go_server], tmp_path)
    assert (health.returncode, health.stderr) == (0, "")
    assert health.stdout == f"ok: {go_server}: the Go ccmon server answers only GetStats and GetAPIRequests\n"
    quick = run_ccmon(["--monitor-server", go_server, "--format", "@monthly_tokens"], tmp_path)
    assert (quick.returncode, quick.stdout) == (0, "100\n")
    for kind in ccmon.REPORT_KINDS:
        report = run_ccmon(["report", kind, "--monitor-server", go_server], tmp_path)
        assert (report.returncode, report.stdout) == (1, "")
        assert report.stderr == (f"ccmon: cannot reach the ccmon server at {go_server}: the Go ccmon server answers "
                                 "only GetStats and GetAPIRequests\n")


@pytest.mark.parametrize("args,env,message", [
    (["--server-token", ""], {}, "--server-token: the token is empty; give a token, or leave --server-token out "
                                 "for none"),
    (["--monitor-token", ""], {}, "--monitor-token: the token is empty; give a token, or leave --monitor-token out "
                                  "for none"),
    ([], {"CCMON_TOKEN": ""}, "CCMON_TOKEN: the token is empty; give a token, or unset CCMON_TOKEN for none"),
    (["--monitor-token", "m"], {"CCMON_TOKEN": ""},  # the server's token still comes from the variable
     "CCMON_TOKEN: the token is empty; give a token, or unset CCMON_TOKEN for none"),
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
        idle = process_rss_kib(srv.proc.pid, "VmRSS")
        for request in (many, full, huge_values):
            assert not stub.Export(request, timeout=120).HasField("partial_success")
        assert process_rss_kib(srv.proc.pid) < 250 * 1024, "the peak (VmHWM)"
        deadline = time.monotonic() + 30  # memory is given back shortly after the last answer
        while process_rss_kib(srv.proc.pid, "VmRSS") > idle + 30 * 1024 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process_rss_kib(srv.proc.pid, "VmRSS") <= idle + 30 * 1024, f"idle was {idle // 1024} MiB"
        assert stats(srv).total_requests == 1 + many_count + full_count  # and nothing lost on the way
        assert db_rows(srv.db, "SELECT COUNT(*) FROM events WHERE name = 'tool_result'") == [(15,)]
    finally:
        srv.stop()


# ---------------------------------------------------------------- insights: models, sessions, tools, users, reports

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


def run_report(srv: ServerProcess, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_ccmon(["report", *args, "--monitor-server", srv.target, "--monitor-timezone", "Asia/Tokyo"], cwd)


def test_reports_as_table_json_and_csv(server, tmp_path):
    sdk_export(server.port, team_events())
    daily = run_report(server, "daily", "--since", "2026-05-04", "--until", "2026-05-06", "--json", cwd=tmp_path)
    assert daily.returncode == 0, daily.stderr
    report = json.loads(daily.stdout)
    assert (report["since"], report["until"], report["timezone"]) == \
        ("2026-05-04T00:00:00+09:00", "2026-05-07T00:00:00+09:00", "Asia/Tokyo")
    assert [(r["date"], r["requests"], r["total_tokens"], r["cost_usd"], r["premium_cost_usd"])
            for r in report["rows"]] == [("2026-05-04", 2, 1530, 0.51, 0.5), ("2026-05-05", 2, 5060, 2.375, 2.375),
                                         ("2026-05-06", 0, 0, 0.0, 0.0)]
    assert report["totals"] == {"requests": 4, "input_tokens": 1357, "output_tokens": 5233, "cache_read_tokens": 0,
                                "cache_creation_tokens": 0, "total_tokens": 6590, "cost_usd": 2.885,
                                "premium_requests": 3, "premium_cost_usd": 2.875}
    weekly = json.loads(run_report(server, "weekly", "--since", "2026-05-01", "--until", "2026-05-10", "--json",
                                   cwd=tmp_path).stdout)
    assert [(r["week_of"], r["requests"]) for r in weekly["rows"]] == [("2026-04-27", 0), ("2026-05-04", 4)]
    monthly = json.loads(run_report(server, "monthly", "--since", "2026-04-01", "--until", "2026-05-31", "--json",
                                    cwd=tmp_path).stdout)
    assert [(r["month"], r["cost_usd"]) for r in monthly["rows"]] == [("2026-04", 0.0), ("2026-05", 2.885)]
    csv_out = run_report(server, "model", "--since", "2026-05-01", "--until", "2026-05-31", "--csv", cwd=tmp_path)
    assert csv_out.stdout.splitlines() == [
        "model,requests,input_tokens,output_tokens,cache_read_tokens,cache_creation_tokens,total_tokens,cost_usd,"
        "avg_duration_ms,avg_ttft_ms",
        "claude-opus-4-1,1,50,5000,0,0,5050,2.25,60000,0",
        "claude-sonnet-4-5,2,1007,203,0,0,1210,0.625,2500,650",
        "claude-haiku-4-5,1,300,30,0,0,330,0.01,900,200",
        "Total,4,1357,5233,0,0,6590,2.885,,"]
    table = run_report(server, "session", "--since", "2026-05-01", "--until", "2026-05-31", "--user",
                       "ana@example.com", cwd=tmp_path)
    lines = table.stdout.splitlines()
    assert lines[0] == ("session report, 2026-05-01T00:00:00+09:00 to 2026-06-01T00:00:00+09:00 (Asia/Tokyo), "
                        "user ana@example.com")
    assert lines[1].split() == ["session_id", "user", "first_request", "last_request", "requests", "input_tokens",
                                "output_tokens", "cache_read_tokens", "cache_creation_tokens", "total_tokens",
                                "cost_usd", "models", "tool_calls", "tool_failures", "api_errors", "source"]
    assert lines[3].split()[:5] == ["s-ana-2", "ana@example.com", "2026-05-05T19:00:00+09:00",
                                    "2026-05-05T19:00:00+09:00", "1"]
    assert lines[-1].split() == ["Total", "3", "1,350", "5,230", "0", "0", "6,580", "$2.76", "3", "1", "1"]


@pytest.mark.parametrize("args,message", [
    (["daily", "--since", "May 1"], "ccmon: config error: --since: invalid date 'May 1' (use YYYY-MM-DD)\n"),
    (["daily", "--since", "2026-05-02", "--until", "2026-05-01"],
     "ccmon: config error: --until 2026-05-01 is before --since 2026-05-02\n"),
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


def insight_snapshot(settings, now, tab, **fields):
    state = ccmon.ViewState(tab=tab, period="w", session_id=fields.pop("session_id", None))
    limits = ccmon.LimitFigures(ccmon.current_block(now, settings.zone, 5),
                                ccmon.Split(ccmon.Usage(), ccmon.Usage(8, 14000, 7000)), 700.0, 35_000, None, ())
    return state, ccmon.Snapshot(ccmon.query_for(state, settings, now), now, 500, limits=limits, **fields)


def test_render_insight_tabs():
    settings, now = _settings(), local_ms("2026-05-05 13:00")
    usage = ccmon.Usage
    state, snap = insight_snapshot(settings, now, "models", models=(
        ("claude-opus-4-1-20250805", usage(1, 50, 5000, 0, 0, 2_250_000_000, 60000, 0, 0)),
        ("claude-sonnet-4-5", usage(2, 1007, 203, 0, 0, 625_000_000, 5000, 1300, 2))))
    lines, frame = frame_text(state, snap, settings, 100, 24, now)
    assert lines[1].startswith("  Current   Daily Usage   Models   Sessions   Tools & errors   Users")
    assert lines[8] == "-- Models - last 7 days " + "-" * 76
    assert lines[9].split() == ["Model", "Req", "Input", "Output", "Cache", "Cost", "Share", "of", "cost", "Avg",
                                "dur", "TTFT"]
    assert lines[10].split() == ["claude-opus-4-1", "1", "50", "5.00K", "0", "$2.25", "######..", "78%", "1m", "-"]
    assert lines[11].split() == ["claude-sonnet-4-5", "2", "1.01K", "203", "0", "$0.6250", "##......", "22%",
                                 "2.5s", "650ms"]
    assert lines[12].split()[:6] == ["Total", "3", "1.06K", "5.20K", "0", "$2.88"]
    split = ccmon.Split(usage(1, 300, 30, 0, 0, 10_000_000), usage(1, 1000, 200, 0, 0, 500_000_000))
    rows = tuple(ccmon.SessionRow(f"s-{i}-0123456789", user, now - 3600_000 * (i + 1), now - 3600_000 * i, split,
                                  ("claude-sonnet-4-5", "claude-haiku-4-5"), 3, 1, i, i == 2)
                 for i, user in enumerate(["ana@example.com", "bo@example.com", "ana@example.com"]))
    state, snap = insight_snapshot(settings, now, "sessions", sessions=rows)
    state = dataclasses_replace(state, scroll=1)
    lines, frame = frame_text(state, snap, settings, 120, 24, now)
    assert frame.session_ids == tuple(r.session_id for r in rows) and frame.total_rows == 3
    assert lines[8].startswith("-- Sessions - last 7 days (3) - Enter: details --")
    assert lines[9].split() == ["Session", "User", "Started", "Dur", "Req", "Tokens", "Cost", "Models", "Tools",
                                "Fail", "Err", "Source"]
    assert lines[11].split() == ["s-1-0123", "bo@example.com", "05-05", "11:00", "1h00m", "2", "1.53K", "$0.5100",
                                 "sonnet-4-5,haiku-4-5", "3", "1", "1", "events"]
    assert lines[12].split()[-1] == "metrics"
    selected = ccmon.render(state, ccmon.Connection(True, attempts=1), snap, settings, 120, 24, now,
                            ccmon.Glyphs.for_terminal(False)).lines[11]
    assert selected[0][1] == "tab_active"
    entered, action = ccmon.handle_key(state, "\n", settings, frame)
    assert (entered.session_id, action) == ("s-1-0123456789", "refresh")
    back, action = ccmon.handle_key(entered, "ESC", settings, frame)
    assert (back.session_id, back.tab, action) == (None, "sessions", "refresh")
    timeline = (ccmon.TimelineRow(now - 60_000, "api_request", ccmon.RequestRow(now - 60_000, "claude-sonnet-4-5", "s",
                                                                              usage(1, 1000, 200, 5, 0, 500_000_000,
                                                                                    4000)), {}),
                ccmon.TimelineRow(now - 30_000, "tool_result", None, {"tool_name": "Bash", "success": "false",
                                                                      "duration_ms": "3000"}))
    state, snap = insight_snapshot(settings, now, "sessions", session_id="s-1-0123456789", timeline=timeline)
    lines, _ = frame_text(state, snap, settings, 100, 24, now)
    assert lines[8].startswith("-- Session s-1-0123456789 (2 entries) - Esc: back --")
    assert lines[10].split() == ["12:59:00", "api_request", "claude-sonnet-4-5", "1.21K", "$0.5000", "in", "1.00K",
                                "out", "200", "cache", "5,", "4.0s"]
    assert lines[11].split() == ["12:59:30", "tool_result", "Bash", "failed,", "3000", "ms"]
    tools = ccmon.ToolsData((("Bash", 3, 2, 200, 3000),), (("accept", "config", 1),), (("529", "claude-opus-4-1", 1),),
                            1)
    state, snap = insight_snapshot(settings, now, "tools", tools=tools)
    lines, _ = frame_text(state, snap, settings, 80, 24, now)
    assert lines[9].split() == ["Tool", "Calls", "Success", "p50", "p95"]
    assert lines[10].split() == ["Bash", "3", "67%", "200ms", "3.0s"]
    assert lines[11] == "Decisions: accept by config: 1"
    assert lines[14].split() == ["529", "claude-opus-4-1", "1"] and lines[15] == "Retries exhausted: 1"
    many = dataclasses_replace(tools, tools=tuple((f"Tool{i:02d}", 1, 1, 1, 1) for i in range(40)))
    state, snap = insight_snapshot(settings, now, "tools", tools=many)
    lines, frame = frame_text(dataclasses_replace(state, scroll=30), snap, settings, 80, 24, now)
    assert (frame.total_rows, frame.page_rows, lines[10].split()[0]) == (40, 8, "Tool30")
    assert "Retries exhausted: 1" in lines
    state, snap = insight_snapshot(settings, now, "users", users=(("ana@example.com", split, 2), ("", split, 1)),
                                   user_names=("ana@example.com", ""))
    lines, frame = frame_text(state, snap, settings, 80, 24, now)
    assert lines[10].split() == ["ana@example.com", "2", "2", "1.53K", "1.20K", "$0.5100", "####....", "50%"]
    assert lines[11].split()[0] == "(unknown)"
    filtered, action = ccmon.handle_key(state, "u", settings, frame)
    assert (filtered.user, action) == ("ana@example.com", "refresh")
    assert "| user ana@example.com |" in frame_text(filtered, snap, settings, 80, 24, now)[0][2]
    assert ccmon.handle_key(filtered, "u", settings, frame)[0].user is None
    for key, tab in (("1", "current"), ("3", "models"), ("6", "users")):
        assert ccmon.handle_key(state, key, settings, frame)[0].tab == tab
    narrow, _ = frame_text(state, snap, settings, 40, 12, now)
    assert narrow[1] == "  1 Now   2 Day   3 Mod   4 Ses   5 Tool"


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
        "block_start,block_end,premium_tokens,requests,input_tokens,output_tokens,cache_read_tokens,"
        "cache_creation_tokens,total_tokens,cost_usd",
        "2026-03-27T23:00+01:00,2026-03-28T04:00+01:00,7000,2,7000,0,0,0,7000,0.7",
        "2026-03-28T04:00+01:00,2026-03-28T09:00+01:00,100,1,100,0,0,0,100,0.01",
        "2026-03-29T01:00+01:00,2026-03-29T07:00+02:00,700,1,700,0,0,0,700,0.07",
        "Total,,7800,4,7800,0,0,0,7800,0.78"]


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


def test_alerts_fire_once_per_window_and_rearm():
    settings = ccmon.MonitorSettings("x:1", BERLIN, "auto", 10_000, 5, weekly_limit=100_000, alerts=(50, 80))
    window = (0, ccmon.BLOCK_MS)

    def limits(block_tokens, weekly_tokens, window=window):
        return ccmon.LimitFigures(window, ccmon.Split(ccmon.Usage(), ccmon.Usage(1, block_tokens)), 0.0, 10_000,
                                  None, (("sonnet", ccmon.Usage(1, weekly_tokens)),))

    fired: set = set()
    due = ccmon.due_alerts(limits(6_000, 10_000), settings, 1000, fired)
    assert [(key, message) for key, message, _ in due] == [
        (("block", 0, 50), "ALERT: block usage passed 50% (6.00K of 10.0K)")]
    assert due[0][2] == {"CCMON_ALERT_KIND": "block", "CCMON_ALERT_THRESHOLD": "50", "CCMON_ALERT_PERCENT": "60.0",
                         "CCMON_ALERT_USED": "6000", "CCMON_ALERT_LIMIT": "10000"}
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
        assert plain.stdout == "5.00K\n"  # no block tracking, no weekly limit: the week's premium tokens
        figures = json.loads(run_ccmon(["--monitor-server", srv.target, "-b", "auto", "--json"], tmp_path).stdout)
        assert figures["block_end"] == (first_hour + ccmon.BLOCK_MS) // 1000 and figures["weekly_tokens"] == 5000
        monitor = MonitorPty(["--monitor-server", srv.target, "-b", "auto", "--claude-plan", "pro", "--alert", "50",
                              "--alert", "90", "--monitor-alert-command", f"env | grep CCMON_ALERT > {marker}"],
                             cols=100, cwd=tmp_path, env={"HOME": str(tmp_path)})
        try:
            screen = monitor.wait_for("ALERT: block usage passed 50% (5.00K of 7.00K)", "the alert")
            assert "(auto)" in screen and "5.00K / 7.00K" in screen
            assert "Week   5.00K premium tokens" in screen and "opus 1.00K, sonnet 4.00K" in screen
            deadline = time.time() + 10
            while not marker.exists() and time.time() < deadline:
                time.sleep(0.05)
            assert sorted(marker.read_text().split()) == sorted([
                "CCMON_ALERT_KIND=block", "CCMON_ALERT_THRESHOLD=50", "CCMON_ALERT_PERCENT=71.4",
                "CCMON_ALERT_USED=5000", "CCMON_ALERT_LIMIT=7000"])
            monitor.send(b"7")
            monitor.wait_for("Blocks - current block (1; 5 hours from the first request)", "the blocks tab")
            monitor.send(b"q")
            assert monitor.close() == 0
        finally:
            if monitor.proc.poll() is None:
                monitor.proc.kill()
    finally:
        srv.stop()


LIMIT_CONFIG_ERRORS = [
    ("[claude]\nblock = \"dawn\"\n", "claude.block: invalid block start 'dawn' (use auto, or an hour from 1 to 12 "
                                     "followed by am or pm, such as 5am or 11pm)"),
    ("[claude]\nweekly_max_tokens = -3\n", "claude.weekly_max_tokens: invalid token limit -3 (use a whole number >= "
                                           "0; 0 means none)"),
    ("[monitor]\nalert_percent = [80, 120]\n", "monitor.alert_percent: invalid alert threshold in [80, 120] (use "
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


def test_weekly_gauge_and_its_projection():
    settings = ccmon.MonitorSettings("x:1", BERLIN, "auto", 10_000, 5, weekly_limit=100_000)
    now = local_ms("2026-05-04 09:00")  # a Monday
    limits = ccmon.LimitFigures(None, ccmon.Split(), 50.0, 10_000, None,
                                (("opus", ccmon.Usage(3, 20_000, 5_000)), ("sonnet", ccmon.Usage(9, 40_000, 5_000)),
                                 ("haiku", ccmon.Usage(2, 999, 1))))
    line = ccmon.line_text(ccmon.weekly_line(limits, settings, 120, ccmon.Glyphs.for_terminal(False), 101, now))
    # 70,000 used; 30,000 left at 50 tokens/min: 600 minutes, Monday 19:00
    assert line == ("Week   ############################............  70%  70.0K / 100K, limit Mon 19:00 at this "
                    "pace (opus 25.0K, sonnet 45.0K)")
    assert ccmon.weekly_reached_ms(100, 100, 0.0, now) == now and ccmon.weekly_reached_ms(1, 100, 0.0, now) is None


def test_monitor_and_quick_query_work_against_the_original_go_api(tmp_path):
    """A server with only the Go ccmon's two RPCs (every other method is UNIMPLEMENTED, as there)."""
    from concurrent import futures

    class GoQueryService(ccmon_pb2_grpc.QueryServiceServicer):
        def GetStats(self, request, context):
            token = ccmon_pb2.Token(total=1500, input=1000, output=500, limited=1500)
            return ccmon_pb2.GetStatsResponse(stats=ccmon_pb2.Stats(
                premium_requests=2, total_requests=2, premium_tokens=token, total_tokens=token,
                premium_cost=ccmon_pb2.Cost(amount=1.5), total_cost=ccmon_pb2.Cost(amount=1.5)))

        def GetAPIRequests(self, request, context):
            return ccmon_pb2.GetAPIRequestsResponse(total_count=1, requests=[ccmon_pb2.APIRequest(
                session_id="go", timestamp=ccmon.timestamp_from_ms(int(time.time() * 1000) - 60_000),
                model="claude-sonnet-4-5", input_tokens=1000, output_tokens=500, total_tokens=1500, cost_usd=1.5)])

    go = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ccmon_pb2_grpc.add_QueryServiceServicer_to_server(GoQueryService(), go)
    port = go.add_insecure_port("127.0.0.1:0")
    go.start()
    try:
        quick = run_ccmon(["--monitor-server", f"127.0.0.1:{port}", "--format", "@daily_cost @session_cost"], tmp_path)
        assert (quick.returncode, quick.stdout) == (0, "$1.50 $0.00\n")
        client = ccmon.Client(f"127.0.0.1:{port}")
        settings = _settings(block_hour=None)
        snap = client.snapshot(ccmon.query_for(ccmon.ViewState(), settings, int(time.time() * 1000)))
        lines, _ = frame_text(ccmon.ViewState(), snap, settings, 80, 24, int(time.time() * 1000))
        assert lines[6].split()[:2] == ["Premium", "2"] and lines[9].startswith("-- Requests 1-1 of 1 --")
        assert client.snapshot(ccmon.query_for(ccmon.ViewState(tab="sessions"), settings, 0)).sessions == ()
        client.close()
    finally:
        go.stop(None)


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
    limits = ccmon.Client(server.target).limit_figures(ccmon.LimitQuery("auto", now, True, 7_000), BERLIN, None)
    assert (limits.window, limits.limit, limits.learned_from) == (None, 30_000, 3)  # p90 of three is the highest
    floor = ccmon.Client(server.target).limit_figures(ccmon.LimitQuery("auto", now, True, 140_000), BERLIN, None)
    assert (floor.limit, floor.learned_from) == (140_000, 3)  # never below the plan's figure


def test_block_chains_and_edges(tmp_path):
    store = ccmon.Store(tmp_path / "chain.db")
    base = ccmon.parse_iso_ms("2026-06-01T00:05:00Z")
    # One request every 40 minutes for 80 hours: never a pause of 5 hours.
    rows = [(base + i * 40 * 60_000, "s", i, "claude-sonnet-4-5", "", 100, 0, 0, 0, 0, 0, None, None, None, None,
             None, 0) for i in range(120)]
    store.write(ccmon.Batch(requests=rows))
    for hours in (30.5, 60.33, 61.0, 61.33, 63.0, 63.33):
        now = base + int(hours * 3600_000)
        near = store.blocks(now - ccmon.DAY_MS, now)[-1]
        far = store.blocks(now - 30 * ccmon.DAY_MS, now)[-1]
        assert (near.start_ms, near.end_ms) == (far.start_ms, far.end_ms)
        assert (near.start_ms - ccmon.parse_iso_ms("2026-06-01T00:00:00Z")) % ccmon.BLOCK_MS == 0
    store.close()
    # No usage yet in a new block but a fast recent pace: the limit is near, not "within limit".
    status = ccmon.BlockStatus(0, ccmon.BLOCK_MS, 60_000, used=0, limit=35_000, recent_rate=3_000.0)
    assert status.limit_reached_ms() == 60_000 + int(35_000 / 3_000 * 60_000)
    assert ccmon.block_window(None, 0, BERLIN, [(0, ccmon.BLOCK_MS)]) is None


def test_block_period_follows_the_automatic_block(server):
    now = int(time.time() * 1000)
    sdk_export(server.port, [("api_request", api_request(1, iso(now - 10 * 60_000), input_tokens=10))])
    settings = ccmon.MonitorSettings(server.target, BERLIN, "auto", 7_000, 5)
    client = ccmon.Client(server.target)
    snap = client.snapshot(ccmon.query_for(ccmon.ViewState(period="b"), settings, now))
    assert snap.query.start_ms == snap.limits.window[0] == (now - 10 * 60_000) // 3600_000 * 3600_000
    assert snap.period.total.input == 10
    client.close()


def test_alerts_without_anything_to_measure_say_so():
    quiet = ccmon.MonitorSettings("x:1", BERLIN, None, None, 5, alerts=(80,))
    assert ccmon.alert_setup_problem(quiet) == ("alerts need a block limit (-b with claude.plan or claude.max_tokens) "
                                                "or claude.weekly_max_tokens")
    assert ccmon.alert_setup_problem(dataclasses_replace(quiet, block_mode="auto", limit=7_000)) == ""
    assert ccmon.alert_setup_problem(dataclasses_replace(quiet, weekly_limit=10)) == ""
    assert ccmon.alert_setup_problem(dataclasses_replace(quiet, alerts=())) == ""


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


def test_sections_depend_only_on_sections_above():
    source = (ROOT / "ccmon.py").read_text()
    assert top_level_uses_above_their_section(source) == []
    # the check itself finds an upward use
    assert top_level_uses_above_their_section(
        "# -------- A\ndef f():\n    return g()\n\n# -------- B\ndef g():\n    return 1\n") == ["line 3: g"]


def test_module_docstring_lists_the_sections_in_order():
    titles = re.findall(r"^# -{8,} (.+)$", (ROOT / "ccmon.py").read_text(), re.MULTILINE)
    listed = [line.strip() for line in ccmon.__doc__.splitlines() if line.startswith("  ")]
    assert listed == titles
